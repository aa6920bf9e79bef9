"""What the project writes stays in its folder, whole or not at all: planted symbolic links at every
output name, a full disk (a real small tmpfs where mounting is allowed, else a writer that fails
with ENOSPC), an unwritable folder, a save that fails half-way."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _sampling_helpers import SCRIPTS, TINY_ARGV, make_tiny_checkpoint, run_script, write_photos
from _train_photos import make_photo_dir
from guided_diffusion_rcdm import fileio, hub, logger
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop, list_checkpoint_steps

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)


def _plant(link: Path, outside: Path, content: bytes = b"precious") -> None:
    outside.write_bytes(content)
    link.symlink_to(outside)


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith((".tmp", ".partial"))]


# ----------------------------------------------------------------------------- links


def test_atomic_writes_replace_a_planted_link_and_give_the_usual_permissions(tmp_path):
    outside = tmp_path / "outside.txt"
    _plant(tmp_path / "out.json", outside)
    old = os.umask(0o022)
    try:
        fileio.atomic_write_text(str(tmp_path / "out.json"), "{}")
        hub.save_checkpoint(str(tmp_path / "model.pt"), {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert outside.read_bytes() == b"precious"
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "{}"
    for name in ("out.json", "model.pt"):  # readable by a cluster group, as files the user makes
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert _no_temporaries(tmp_path)


def test_logs_refuse_to_append_through_a_planted_link(tmp_path):
    _plant(tmp_path / "log.txt", tmp_path.parent / f"{tmp_path.name}-log-outside")
    with pytest.raises(fileio.UnsafePathError, match="log.txt is a symbolic link"):
        logger.configure(dir=str(tmp_path), format_strs="log")
    logger.reset()
    (tmp_path / "log.txt").unlink()
    _plant(tmp_path / "progress.csv", tmp_path.parent / f"{tmp_path.name}-csv-outside")
    with pytest.raises(fileio.UnsafePathError, match="progress.csv is a symbolic link"):
        logger.configure(dir=str(tmp_path), format_strs="log,csv")
    logger.reset()
    assert (tmp_path.parent / f"{tmp_path.name}-csv-outside").read_bytes() == b"precious"


def test_sampling_and_evaluation_never_write_through_planted_links(tmp_path):
    photos = write_photos(tmp_path / "photos", ("astronaut", "coffee"))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("samples.jpeg", "samples.npz", "samples.npz.tmp.npz", "samples_eval.json"):
        _plant(out / name, outside / name)
    argv = ["--model_path", ckpt, "--data_dir", Path(photos[0]).parent, "--num_images", 2, "--batch_size", 1,
            "--out_dir", out, "--progress", "False", "--device", "cpu", *TINY_ARGV]
    run_script("image_sample.py", *argv)
    run_script("image_eval.py", out / "samples.npz", "--progress", "False", "--device", "cpu")
    for name in ("samples.jpeg", "samples.npz", "samples.npz.tmp.npz", "samples_eval.json"):
        assert (outside / name).read_bytes() == b"precious", name
    for name in ("samples.jpeg", "samples.npz", "samples_eval.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((out / "samples_eval.json").read_text())["fidelity"]
    assert _no_temporaries(out)

    (out / "log.txt").unlink()
    _plant(out / "log.txt", outside / "log.txt")  # an append would follow it: refused, one line
    proc = run_script("image_sample.py", *argv, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{out / 'log.txt'} is a symbolic link" in proc.stderr
    assert (outside / "log.txt").read_bytes() == b"precious"


def _train_argv(photos, out, max_steps, save_interval=1):
    argv = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    return argv + ["--feat_cond", "--data_dir", photos, "--type_model", "resnet18",
                   "--pretrained_encoder", "False", "--out_dir", str(out), "--batch_size", "2",
                   "--ema_rate", "0.9", "--log_interval", "1", "--save_interval", str(save_interval),
                   "--max_steps", str(max_steps), "--num_workers", "0", "--progress", "False"]


def _train(argv, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPTS / "image_train.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_training_refuses_a_planted_log_link_and_an_unwritable_folder_before_building_anything(tmp_path):
    photos = make_photo_dir(tmp_path / "photos", names=("coffee", "chelsea"))
    out = tmp_path / "run"
    out.mkdir()
    _plant(out / "log.txt", tmp_path / "outside.txt")
    proc = _train(_train_argv(photos, out, 1))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"image_train.py: error: {out / 'log.txt'} is a symbolic link (to {tmp_path / 'outside.txt'}): " \
                                  "refusing to write through it; remove the link or choose another output name"
    assert (tmp_path / "outside.txt").read_bytes() == b"precious"

    (tmp_path / "a_file").write_text("x")
    proc = _train(_train_argv(photos, tmp_path / "a_file" / "run", 1))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"image_train.py: error: --out_dir: cannot write in {tmp_path / 'a_file' / 'run'} (")
    assert "creating model" not in proc.stdout


# ----------------------------------------------------------------------------- full disk


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full device does (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)


def test_a_writer_that_runs_out_of_space_leaves_the_old_file_and_says_so_in_one_line(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous checkpoint")
    big = {"w": torch.zeros(256, 1024)}
    with pytest.raises(fileio.DiskFullError) as info:
        fileio.atomic_write(str(target), lambda f: torch.save(big, _FullDisk(f, 100_000)))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"no space left to write {target} (")
    assert f"free in {tmp_path}" in message and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"the previous checkpoint" and _no_temporaries(tmp_path)


def _tiny_loop(out, **kwargs):
    torch.manual_seed(0)
    flags = {**model_and_diffusion_defaults(), **TINY}
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=512)

    def batches():
        while True:
            yield torch.randn(2, 3, 32, 32), {"feat": torch.randn(2, 512)}

    return TrainLoop(model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1000, save_interval=1, resume_checkpoint="", progress=False,
                     out_dir=str(out), **kwargs)


def test_a_save_that_fails_half_way_removes_the_files_it_wrote(tmp_path):
    out = tmp_path / "run"
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    loop = _tiny_loop(out, max_steps=1)
    loop.run_loop()
    (out / "opt000002.pt").mkdir()  # the optimizer file of step 2 cannot be put in place
    (out / "opt000002.pt" / "x").write_text("x")
    loop.max_steps = 2
    with pytest.raises(OSError):
        loop.run_loop()
    logger.reset()
    assert not (out / "ema_0.9_000002.pt").exists()  # the EMA of step 2 was written, then removed
    assert list_checkpoint_steps(str(out)) == [1] and _no_temporaries(out)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 24 MiB tmpfs, or a skip where mounting is not permitted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_tmpfs_gives_one_line_and_leaves_no_partial_file(small_tmpfs, tmp_path):
    # a real ENOSPC from the kernel inside torch.save
    with pytest.raises(fileio.DiskFullError, match=f"no space left to write {small_tmpfs / 'big.pt'}"):
        hub.save_checkpoint(str(small_tmpfs / "big.pt"), {"w": torch.zeros(8, 1024, 1024)})
    assert list(small_tmpfs.iterdir()) == []

    # training: step 1 (about 13 MiB) fits, step 2 does not; the run says so and keeps step 1
    photos = make_photo_dir(tmp_path / "photos", names=("coffee", "chelsea"))
    out = small_tmpfs / "run"
    proc = _train(_train_argv(photos, out, 5))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"image_train.py: error: no space left to write {out / 'model000002.pt'} (") and "MiB free" in last
    assert list_checkpoint_steps(str(out)) == [1] and _no_temporaries(out)
    assert not list(out.glob("*000002*"))


def _sample_argv(photos, ckpt, out):
    return ["sample", "--model_path", ckpt, "--device", "cpu", "--data_dir", os.path.dirname(photos[0]),
            "--out_dir", str(out), "--num_images", "2", "--batch_size", "2", *TINY_ARGV]


def test_sample_on_a_full_tmpfs_keeps_nothing_of_the_run_and_says_so(small_tmpfs, tmp_path, capsys):
    """The tmpfs has room for the log and the grid (~17 KB) but not the .npz (~28 KB): the grid is not
    put in place alone, the log and the folder the run made are removed, and the one line says so."""
    from guided_diffusion_rcdm import __main__ as rcdm_command

    photos = write_photos(tmp_path / "photos", ("astronaut", "coffee"))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    st = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 32 * 1024))
    out = small_tmpfs / "out"
    assert rcdm_command.main(_sample_argv(photos, ckpt, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"rcdm sample: error: no space left to write {out / 'samples.npz'} ("), last
    assert last.endswith(f"(nothing of this run was kept in {out})"), last
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]
    # a folder with an earlier run's log: the log keeps what was there and the lines this run added
    out.mkdir()
    (out / "log.txt").write_text("an earlier run\n")
    assert rcdm_command.main(_sample_argv(photos, ckpt, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"(nothing of this run was kept in {out} but the lines it added to log.txt)"), last
    assert os.listdir(out) == ["log.txt"] and (out / "log.txt").read_text().startswith("an earlier run\n")
    logger.reset()


def test_outputs_written_together_are_put_in_place_together_or_not_at_all(tmp_path):
    with pytest.raises(fileio.DiskFullError):
        with fileio.all_or_nothing():
            fileio.atomic_write_bytes(str(tmp_path / "grid.jpeg"), b"grid")
            assert os.listdir(tmp_path) and not (tmp_path / "grid.jpeg").exists()  # under its temporary name
            fileio.atomic_write(str(tmp_path / "samples.npz"), lambda f: _FullDisk(f, 10).write(b"x" * 100))
    assert os.listdir(tmp_path) == []
    with fileio.all_or_nothing():
        fileio.atomic_write_bytes(str(tmp_path / "grid.jpeg"), b"grid")
        fileio.atomic_write_bytes(str(tmp_path / "samples.npz"), b"npz")
    assert sorted(os.listdir(tmp_path)) == ["grid.jpeg", "samples.npz"]


# ----------------------------------------------------------------------------- the one atomic writer


def test_a_check_that_fails_before_the_rename_writes_nothing(tmp_path):
    """`atomic_write(check=...)` sees the whole synced file (the hub verifies downloads this way);
    when it raises, the old file stays and no temporary is left."""
    target = tmp_path / "weights.pt"
    target.write_bytes(b"the cached file")
    seen = []

    def reject(tmp: str) -> None:
        seen.append(Path(tmp).read_bytes())
        raise ValueError("digest does not match")

    with pytest.raises(ValueError, match="digest"):
        fileio.atomic_write(str(target), lambda f: f.write(b"new bytes"), check=reject)
    assert seen == [b"new bytes"] and target.read_bytes() == b"the cached file" and _no_temporaries(tmp_path)
    fileio.atomic_write(str(target), lambda f: f.write(b"new bytes"), check=lambda tmp: None)
    assert target.read_bytes() == b"new bytes" and _no_temporaries(tmp_path)


def test_npz_and_speed_cache_writes_replace_a_planted_link(tmp_path, monkeypatch):
    import numpy as np

    from guided_diffusion_rcdm import precision

    outside = tmp_path / "outside"
    _plant(tmp_path / "samples.npz", outside)
    fileio.save_npz(str(tmp_path / "samples.npz"), features=torch.ones(2, 3, requires_grad=True),
                    labels=np.arange(2))
    with np.load(tmp_path / "samples.npz") as data:
        assert data["features"].tolist() == [[1.0] * 3] * 2 and data["labels"].tolist() == [0, 1]
    assert outside.read_bytes() == b"precious"

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(precision.SPEED_CACHE_ENV, str(cache))
    monkeypatch.setattr(precision, "_CPU_MEASUREMENT", {})
    path = precision.speed_cache_path()
    _plant(path, tmp_path / "speed-outside")
    precision.cpu_kernel_timings()  # unreadable cache (the link's target is not JSON): measures, saves
    assert not path.is_symlink() and json.loads(path.read_text())
    assert (tmp_path / "speed-outside").read_bytes() == b"precious" and _no_temporaries(cache)
