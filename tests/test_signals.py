"""Stop signals (SIGTERM, SIGUSR1, SIGINT, a scheduler's preemption) save before the run ends."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_photos import make_photo_dir
from guided_diffusion_rcdm.train_util import list_checkpoint_steps
from helpers_hub import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "image_train.py")
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_", "PMI_", "OMPI_"))] + ["RANK", "WORLD_SIZE"]:
        env.pop(key, None)
    env.update(extra)
    return env


def _argv(photos, out, max_steps):
    argv = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    return argv + ["--feat_cond", "--data_dir", photos, "--type_model", "resnet18",
                   "--pretrained_encoder", "False", "--out_dir", str(out), "--batch_size", "2",
                   "--ema_rate", "0.9", "--log_interval", "1", "--save_interval", "100000",
                   "--max_steps", str(max_steps), "--num_workers", "0", "--progress", "False"]


def _logged_steps(out: Path) -> list:
    path = out / "progress.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]


def _signal_after(proc, out: Path, steps: int, sig) -> None:
    deadline = time.time() + 180
    while len(_logged_steps(out)) < steps:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_current_step_and_resuming_continues_from_it(photos, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *_argv(photos, out, 100000)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _signal_after(proc, out, 2, sig)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 128 + sig, output[-3000:]
    step = _logged_steps(out)[-1]
    assert step >= 2 and list_checkpoint_steps(str(out)) == [step]  # the step in flight was finished
    assert f"stopped by {signal.Signals(sig).name} at step {step}, checkpoint saved" in output
    for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt", f"ema_0.9_{step:06d}.pt"):
        assert (out / name).is_file()
    if sig != signal.SIGTERM:
        return

    proc = subprocess.run([sys.executable, SCRIPT, *_argv(photos, out, step + 1)], env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint {out / f'model{step:06d}.pt'} at step {step}" in proc.stdout
    assert list_checkpoint_steps(str(out)) == [step + 1, step]


def _as_in_a_terminal() -> None:
    # A job started in the background by a non-interactive shell (nohup, `cmd &`) inherits SIGINT
    # ignored, and the trainer keeps an ignored signal ignored; ctrl-c comes from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_then_exits_without_a_traceback(photos, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *_argv(photos, out, 100000)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_as_in_a_terminal)
    _signal_after(proc, out, 1, signal.SIGINT)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert list_checkpoint_steps(str(out)) == [_logged_steps(out)[-1]]


SECOND_SIGNAL = r"""
import os, signal, time
from guided_diffusion_rcdm.train_util import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    assert stop.received == signal.SIGTERM, stop.received
    print("first signal recorded", flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(5)
print("still alive")
"""


def test_a_second_signal_ends_the_process_at_once():
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert "first signal recorded" in proc.stdout and "still alive" not in proc.stdout
    assert proc.returncode == -signal.SIGUSR1, proc.stderr



def test_two_ranks_agree_on_the_step_they_save_when_one_is_signalled(photos, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, SCRIPT, *_argv(photos, out, 100000)],
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    deadline = time.time() + 180
    while len(_logged_steps(out)) < 2:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    step = _logged_steps(out)[-1]
    assert list_checkpoint_steps(str(out)) == [step]
    assert "stopped by SIGTERM at step" in outputs[0]  # rank 0 learnt of it from rank 1
    state = torch.load(out / f"opt{step:06d}.pt", weights_only=True)
    assert state["step"] == step


def test_the_stop_rule_of_one_process_stops_at_the_target_the_time_limit_or_a_signal():
    from guided_diffusion_rcdm.run_control import StopRule

    rule = StopRule(step=0, target=3)
    assert rule.check(2, None) == (False, 0)
    assert rule.check(2, signal.SIGTERM) == (False, signal.SIGTERM)  # the loop saves, then passes it on
    assert rule.check(3, None) == (True, 0)
    assert StopRule(step=5, target=None).check(10**6, None) == (False, 0)  # no target: never done by steps
    timed = StopRule(step=0, max_seconds=0.2)
    assert timed.check(1, None) == (False, 0)
    time.sleep(0.25)
    assert timed.check(2, None) == (True, 0)
