"""The training data loader on real photographs and on every kind of bad file."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _train_photos import make_photo_dir, photo
from guided_diffusion_rcdm import logger
from guided_diffusion_rcdm.image_datasets import (
    ImageDataset,
    center_crop_arr,
    find_images,
    list_image_files_recursively,
    load_data,
)

REPO = Path(__file__).resolve().parents[1]


def _bad_folder(root: Path) -> dict:
    """Good photos in many modes plus two files that are not decodable images."""
    make_photo_dir(root, names=("astronaut", "coffee"), nested=False)
    base = photo("chelsea", 80)
    base.convert("L").save(root / "gray.png")
    rgba = photo("rocket", 80).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))))
    rgba.save(root / "alpha.png")
    base.convert("P", palette=Image.ADAPTIVE, colors=32).save(root / "palette.gif")
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(root / "deep16.png")
    assert Image.open(root / "deep16.png").mode.startswith("I")
    base.convert("CMYK").save(root / "cmyk.jpg")
    good = root / "truncated_src.jpg"
    photo("immunohistochemistry", 96).save(good, quality=95)
    data = good.read_bytes()
    good.unlink()
    (root / "sub").mkdir()
    (root / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "sub" / "notes.jpg").write_text("this is a text file with an image name\n")
    (root / "readme.txt").write_text("not an image extension, never listed\n")
    return {"bad": {str(root / "sub" / "truncated.jpg"), str(root / "sub" / "notes.jpg")}}


def test_every_mode_becomes_rgb_and_bad_files_are_skipped_and_counted(tmp_path):
    data_dir = tmp_path / "data"
    expected = _bad_folder(data_dir)
    files = list_image_files_recursively(str(data_dir))
    assert len(files) == 9 and not any(f.endswith(".txt") for f in files)  # recursive, images only

    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    stream = load_data(data_dir=str(data_dir), batch_size=3, image_size=32, deterministic=True,
                       num_workers=1, rank=0, world_size=1)
    seen = 0
    for _ in range(6):  # two passes over the 9 files
        images, big, kwargs = next(stream)
        assert images.shape == (3, 3, 32, 32) and big.shape == (3, 3, 224, 224)
        for x in (images, big):
            assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        seen += len(images)
    logger.reset()
    assert set(stream.bad_files) == expected["bad"]
    assert "truncated" in stream.bad_files[str(data_dir / "sub" / "truncated.jpg")]
    text = (tmp_path / "log" / "log.txt").read_text()
    for path in expected["bad"]:
        assert text.count(f"skipping unreadable image {path}") == 1  # reported once, by name
    assert "2 file(s) skipped so far" in text


def test_sixteen_bit_and_alpha_images_keep_their_content(tmp_path):
    data_dir = tmp_path / "data"
    _bad_folder(data_dir)
    ds = ImageDataset(32, [str(data_dir / "deep16.png"), str(data_dir / "alpha.png")], random_flip=False)
    deep, _, _ = ds[0]
    # a 16-bit image must not be clipped to white: it matches its 8-bit version
    ref = torch.from_numpy(center_crop_arr(photo("chelsea", 80).convert("L").convert("RGB"), 32)).permute(2, 0, 1)
    assert (deep - (ref.float() / 127.5 - 1)).abs().max() < 0.02
    alpha, _, _ = ds[1]
    assert alpha.std() > 0.1


def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        find_images(str(tmp_path / "does_not_exist"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=2, image_size=32)
    with pytest.raises(ValueError, match="pass `data_dir` DIR"):
        find_images("")


def _train(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "image_train.py"), *argv],
                          capture_output=True, text=True, timeout=timeout)


def test_an_encoder_file_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    photos = make_photo_dir(tmp_path / "photos", names=("coffee", "chelsea"))
    bogus = tmp_path / "encoder.pt"
    bogus.write_bytes(b"not a checkpoint")
    proc = _train("--data_dir", photos, "--feat_cond", "--type_model", str(bogus), "--out_dir",
                  str(tmp_path / "run"), "--max_steps", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"cannot read checkpoint {bogus}" in line and "weights_only" not in line
    assert not (tmp_path / "run").exists()


def test_ranks_read_disjoint_shards_that_cover_the_data(tmp_path):
    data_dir = make_photo_dir(tmp_path / "data")
    files = find_images(data_dir)
    shards = [ImageDataset(32, files, shard=r, num_shards=2).local_images for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(files)
    # a shard smaller than the batch still gives full batches
    stream = load_data(data_dir=data_dir, batch_size=5, image_size=32, rank=1, world_size=2, num_workers=0)
    assert next(stream)[0].shape[0] == 5
    with pytest.raises(ValueError, match="fewer than the 8 processes"):
        load_data(data_dir=data_dir, batch_size=1, image_size=32, rank=0, world_size=8)


def test_model_and_encoder_views_share_the_flip(tmp_path):
    torch.manual_seed(0)
    import random

    random.seed(0)
    path = tmp_path / "astronaut.png"
    photo("astronaut", 128).save(path)
    image = Image.open(path).convert("RGB")
    small = torch.from_numpy(center_crop_arr(image, 32).copy()).permute(2, 0, 1).float() / 127.5 - 1
    big = torch.from_numpy(center_crop_arr(image, 224).copy()).permute(2, 0, 1).float() / 127.5 - 1
    ds = ImageDataset(32, [str(path)], random_flip=True)
    flips = []
    for _ in range(12):
        x, xb, _ = ds[0]
        small_flip = torch.allclose(x, small.flip(-1))
        assert small_flip or torch.allclose(x, small)
        assert torch.allclose(xb, big.flip(-1) if small_flip else big)
        flips.append(small_flip)
    assert any(flips) and not all(flips)
    # random crops are real crops of the image at the requested sizes
    ds = ImageDataset(32, [str(path)], random_crop=True, random_flip=False)
    x, xb, _ = ds[0]
    assert x.shape == (3, 32, 32) and xb.shape == (3, 224, 224)


def test_class_labels_come_from_folders(tmp_path):
    data_dir = make_photo_dir(tmp_path / "data", nested=True)
    stream = load_data(data_dir=data_dir, batch_size=6, image_size=32, class_cond=True,
                       deterministic=True, num_workers=0, rank=0, world_size=1)
    _, _, kwargs = next(stream)
    assert sorted(kwargs["y"].tolist()) == [0, 0, 0, 1, 1, 1]


class _SignalStates(torch.utils.data.Dataset):
    """Each item: whether SIGINT and SIGTERM are ignored in the process that loads it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal

        return torch.tensor([signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)])


def test_loader_workers_leave_stop_signals_to_the_training_process(tmp_path):
    import signal

    from guided_diffusion_rcdm.image_datasets import loader_worker_init

    loader = torch.utils.data.DataLoader(_SignalStates(), batch_size=2, num_workers=1,
                                         worker_init_fn=loader_worker_init)
    assert next(iter(loader)).all()  # in the worker: both ignored
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # this process keeps its handlers
    # the training stream uses it
    photos = make_photo_dir(tmp_path)
    stream = load_data(data_dir=photos, batch_size=2, image_size=32, num_workers=1, rank=0, world_size=1)
    assert stream.loader.worker_init_fn is loader_worker_init


def test_a_script_holding_an_open_stream_exits_and_close_stops_the_workers(tmp_path):
    # The workers ignore SIGTERM, which is how Python's exit terminates them: an open stream at exit
    # (a script's global) used to hang the process forever.
    photos = make_photo_dir(tmp_path)
    script = (
        "import multiprocessing as mp\n"
        "from guided_diffusion_rcdm.image_datasets import load_data\n"
        f"stream = load_data(data_dir={str(photos)!r}, batch_size=2, image_size=32, num_workers=1,"
        " rank=0, world_size=1)\n"
        "next(stream)\n"
        "assert mp.active_children(), 'the stream reads in a worker process'\n"
        "stream.close()\n"
        "assert not mp.active_children(), mp.active_children()\n"
        "next(stream)  # reading again starts a worker again, left open for the exit\n"
        "print('read', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read"


def test_default_loader_processes_follow_the_cpus_each_rank_may_use():
    from guided_diffusion_rcdm.image_datasets import default_num_workers

    assert default_num_workers(cpus=10, processes_here=1) == 8  # a submitit task with 10 CPUs
    assert default_num_workers(cpus=96, processes_here=8) == 8  # torchrun on a 96-core, 8-GPU node
    assert default_num_workers(cpus=16, processes_here=8) == 1
    assert default_num_workers(cpus=2, processes_here=1) == 1
    assert default_num_workers(cpus=1, processes_here=4) == 1
    assert 1 <= default_num_workers() <= 8
