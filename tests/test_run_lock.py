"""One training run per output folder; clean-up spares the temporary files of live writers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _train_photos import make_photo_dir
from guided_diffusion_rcdm import fileio
from guided_diffusion_rcdm.train_util import list_checkpoint_steps, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "image_train.py")
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(key, None)
    return env


def _argv(photos, out, max_steps):
    argv = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    return argv + ["--feat_cond", "--data_dir", photos, "--type_model", "resnet18",
                   "--pretrained_encoder", "False", "--out_dir", str(out), "--batch_size", "2",
                   "--ema_rate", "0.9", "--log_interval", "1", "--save_interval", "1",
                   "--max_steps", str(max_steps), "--num_workers", "0", "--progress", "False"]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_the_same_folder_gets_one_line_and_a_dead_runs_lock_is_taken_over(tmp_path):
    photos = make_photo_dir(tmp_path / "photos")
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, SCRIPT, *_argv(photos, out, 100000)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (out / "model000001.pt").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    second = subprocess.run([sys.executable, SCRIPT, *_argv(photos, out, 3)], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        f"image_train.py: error: --out_dir: {out} is in use by another training run (host {fileio._hostname()}, "
        f"PID {first.pid}, since {json.loads((out / 'train.lock').read_text())['since']}): wait for it "
        f"to end, choose another --out_dir, or delete {out / 'train.lock'} if that run is gone"]
    assert (out / "log.txt").read_text().count("Logging to") == 1  # the second run wrote nothing there
    assert first.poll() is None  # and the first one goes on

    first.send_signal(signal.SIGKILL)  # dies without releasing its lock
    first.wait()
    step = list_checkpoint_steps(str(out))[0]
    third = subprocess.run([sys.executable, SCRIPT, *_argv(photos, out, step + 1)], env=_env(),
                           capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over {out / 'train.lock'}: the run that held it (host {fileio._hostname()}, PID {first.pid}" in third.stdout
    assert f"at step {step}" in third.stdout
    assert not (out / "train.lock").exists()  # released at the end


def test_lock_rules_live_dead_reused_pid_other_host_and_requeued_job(tmp_path, sleeper, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock_path = tmp_path / "train.lock"
    me = fileio._hostname()

    def plant(**holder):
        lock_path.write_text(json.dumps({"host": me, "since": "earlier", **holder}))

    plant(pid=sleeper.pid, start=fileio._process_start(sleeper.pid))
    with pytest.raises(fileio.RunLockedError, match=f"PID {sleeper.pid}"):
        fileio.acquire_run_lock(str(tmp_path))
    plant(pid="x", host="elsewhere")
    with pytest.raises(fileio.RunLockedError, match="host elsewhere"):  # cannot tell: refused
        fileio.acquire_run_lock(str(tmp_path))

    warnings = []
    for holder in (dict(pid=_dead_pid()),  # its process has ended
                   dict(pid=sleeper.pid, start=1),  # its PID now belongs to another process
                   dict(pid=1, host="elsewhere", slurm_job="77", slurm_restart="0")):  # requeued job
        plant(**holder)
        if "slurm_job" in holder:
            monkeypatch.setenv("SLURM_JOB_ID", "77")
            monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        lock = fileio.acquire_run_lock(str(tmp_path), warn=warnings.append)
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        assert fileio.acquire_run_lock(str(tmp_path)) is lock  # re-entrant within a process
        lock.release()
        assert lock_path.exists()
        lock.release()
        assert not lock_path.exists()
    assert len(warnings) == 3 and all("is no longer running" in w for w in warnings)


def test_clean_up_removes_only_temporary_files_whose_writer_is_dead(tmp_path, sleeper):
    host = fileio._hostname()
    live = tmp_path / f".model000004.pt.{host}.{sleeper.pid}.ab12.tmp"
    dead = tmp_path / f".opt000004.pt.{host}.{_dead_pid()}.cd34.tmp"
    foreign = tmp_path / ".ema_0.9_000004.pt.otherhost.123.ef56.tmp"
    other = tmp_path / ".notes.txt.tmp"
    for path in (live, dead, foreign, other):
        path.write_bytes(b"partial")
    removed = remove_stale_temporaries(str(tmp_path))
    assert removed == [str(dead)]
    assert live.exists() and foreign.exists() and other.exists()
    old = time.time() - 2 * 3600  # another host's file untouched for two hours: abandoned
    os.utime(foreign, (old, old))
    sleeper.kill()
    sleeper.wait()
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted([str(live), str(foreign)])
    assert other.exists()
