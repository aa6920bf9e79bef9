"""Training killed at any moment (SIGKILL, even mid-save) resumes from the last complete step."""

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
from guided_diffusion_rcdm import hub, logger
from guided_diffusion_rcdm.get_ssl_models import get_model
from guided_diffusion_rcdm.image_datasets import load_data
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop, conditioned_batches, find_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


def _argv(photos, out, max_steps):
    argv = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    return argv + ["--feat_cond", "--data_dir", photos, "--type_model", "resnet18",
                   "--pretrained_encoder", "False", "--out_dir", str(out), "--batch_size", "2",
                   "--lr", "1e-3", "--ema_rate", "0.9,0.99", "--log_interval", "1",
                   "--save_interval", "1", "--max_steps", str(max_steps), "--num_workers", "0",
                   "--progress", "False"]


def _tiny_loop(out, data=None):
    flags = {**model_and_diffusion_defaults(), **TINY}
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=512)
    return TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1,
                     lr=1e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=1,
                     resume_checkpoint="", progress=False, out_dir=str(out))


def _adam_steps(path) -> set:
    state = hub.safe_torch_load(path)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


def test_sigkill_mid_run_and_mid_save_then_resume(photos, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(REPO / "scripts" / "image_train.py")

    # 1. killed from outside at an arbitrary moment of a long run
    proc = subprocess.Popen([sys.executable, script, *_argv(photos, out, 1000)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "model000002.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training did not reach step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = find_resume_checkpoint(str(out), [0.9, 0.99])
    assert first is not None and first["step"] >= 2 and not first["problems"]

    # 2. resumed, then killed while the model file of step first+2 is half written
    kill_at = first["step"] + 2
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_train_kill_during_save.py"),
                           *_argv(photos, out, 1000)], env=dict(env, RCDM_TEST_KILL_AT_SAVE=str(kill_at)),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    start = first["step"]
    assert f"resumed from checkpoint {out / f'model{start:06d}.pt'} at step {start}" in proc.stdout
    assert not (out / f"model{kill_at:06d}.pt").exists()
    assert list(out.glob(f".model{kill_at:06d}.pt.*"))  # the half-written temporary file is there
    assert (out / f"opt{kill_at:06d}.pt").exists()  # companions of the unfinished step were written

    # the state a resume picks up: step, EMA and optimizer of the last complete step
    last = kill_at - 1
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    loop = _tiny_loop(out)
    logger.reset()
    assert loop.step == last
    # the half-written file was never a candidate, and resuming cleared it away
    assert "left by a save that was interrupted" in (tmp_path / "log" / "log.txt").read_text()
    assert not list(out.glob(".*.tmp"))
    sd, _ = hub.load_checkpoint(out / f"model{last:06d}.pt")
    names = [n for n, _ in loop.model.named_parameters()]
    for n, p in zip(names, loop.model.parameters()):
        assert torch.equal(p, sd[n])
    for rate, ema in zip((0.9, 0.99), loop.ema_params):
        ema_sd, _ = hub.load_checkpoint(out / f"ema_{rate}_{last:06d}.pt")
        assert all(torch.equal(p, ema_sd[n]) for n, p in zip(names, ema))
        assert not all(torch.equal(p, sd[n]) for n, p in zip(names, ema))  # EMA is not the model
    assert {int(s["step"]) for s in loop.opt.state_dict()["state"].values()} == {last}

    # 3. resume and finish
    final = last + 2
    proc = subprocess.run([sys.executable, script, *_argv(photos, out, final)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from checkpoint {out / f'model{last:06d}.pt'} at step {last}" in proc.stdout
    assert _adam_steps(out / f"opt{final:06d}.pt") == {final}  # the optimizer kept counting
    assert not list(out.glob(".*.tmp"))
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "progress.csv"))]
    assert steps[-2:] == [final - 1, final] and steps[0] == 1  # the log kept its history
    assert steps == list(range(1, final + 1))  # the steps redone after each resume appear once
    _, meta = hub.load_checkpoint(out / f"ema_0.99_{final:06d}.pt")
    assert meta["step"] == final


def test_damaged_checkpoints_are_skipped_with_a_warning(photos, tmp_path):
    out = tmp_path / "run"
    encoder = get_model("resnet18", use_head=False, pretrained=False)
    stream = load_data(data_dir=photos, batch_size=2, image_size=32, num_workers=0, rank=0, world_size=1)
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    loop = _tiny_loop(out, conditioned_batches(stream, encoder, "cpu"))
    loop.max_steps = 3
    loop.run_loop()
    data = (out / "model000003.pt").read_bytes()
    (out / "model000003.pt").write_bytes(data[: len(data) // 3])  # truncated by a non-atomic copy
    (out / "model000009.pt").write_text("not a checkpoint")
    (out / "opt000002.pt").write_bytes(b"\x00" * 100)  # step 2: model fine, optimizer damaged
    found = find_resume_checkpoint(str(out), [0.9, 0.99])
    resumed = _tiny_loop(out)
    logger.reset()
    log = (tmp_path / "log" / "log.txt").read_text()
    assert found["step"] == 1 and not found["problems"] and resumed.step == 1
    assert f"skipping damaged checkpoint {out / 'model000009.pt'}" in log
    assert f"skipping damaged checkpoint {out / 'model000003.pt'}" in log
    assert f"damaged optimizer file {out / 'opt000002.pt'}" in log
    assert f"resumed from checkpoint {out / 'model000001.pt'} at step 1" in log

    # an explicit --resume_checkpoint is honoured; what it lacks starts afresh, and says so
    for p in out.glob("ema_*_000001.pt"):
        p.unlink()
    logger.configure(dir=str(tmp_path / "log2"), format_strs="log")
    loop = _tiny_loop(tmp_path / "elsewhere")
    explicit = TrainLoop(model=loop.model, diffusion=loop.diffusion, data=None, batch_size=2,
                         microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=1,
                         resume_checkpoint=str(out / "model000001.pt"), progress=False,
                         out_dir=str(tmp_path / "elsewhere"))
    logger.reset()
    assert explicit.step == 1
    log = (tmp_path / "log2" / "log.txt").read_text()
    assert "no EMA file" in log and "starting afresh" in log


class _RecordingLoop(TrainLoop):
    """TrainLoop that keeps what each step was given (images, representations)."""

    seen: list

    def run_step(self, batch, cond):
        self.seen.append((self.step, batch.clone(), cond["feat"].clone()))
        return super().run_step(batch, cond)


def _loop_on_photos(photos, out, max_steps, encoder):
    stream = load_data(data_dir=photos, batch_size=2, image_size=32, num_workers=0, rank=0, world_size=1,
                       random_crop=True, random_flip=True, seed=5)
    torch.manual_seed(0)  # the same initial weights; a resumed run replaces them anyway
    flags = {**model_and_diffusion_defaults(), **TINY, "dropout": 0.1, "feat_drop_prob": 0.3}
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=512)
    loop = _RecordingLoop(model=model, diffusion=diffusion, data=conditioned_batches(stream, encoder, "cpu"),
                          batch_size=2, microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1,
                          save_interval=1000, resume_checkpoint="", progress=False, out_dir=str(out),
                          max_steps=max_steps, seed=11)
    loop.seen = []
    torch.manual_seed(1234)  # what the global generators hold must not matter
    loop.run_loop()
    return loop


def test_an_interrupted_and_resumed_run_sees_the_same_batches_and_noise_as_an_uninterrupted_one(photos, tmp_path):
    encoder = get_model("resnet18", use_head=False, pretrained=False)
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    straight = _loop_on_photos(photos, tmp_path / "straight", 5, encoder)  # 3 batches an epoch: crosses one
    first = _loop_on_photos(photos, tmp_path / "resumed", 2, encoder)
    second = _loop_on_photos(photos, tmp_path / "resumed", 5, encoder)
    logger.reset()
    assert second.resume_step == 2 and [s for s, *_ in second.seen] == [2, 3, 4]
    seen = first.seen + second.seen
    assert len(seen) == len(straight.seen) == 5
    for (step, images, feat), (step_ref, images_ref, feat_ref) in zip(seen, straight.seen):
        assert step == step_ref and torch.equal(images, images_ref) and torch.equal(feat, feat_ref)
    assert not torch.equal(straight.seen[0][1], straight.seen[3][1])  # a new order, crops and flips
    # timesteps, noise and dropout were the same too: the weights, EMA and optimizer agree exactly
    for a, b in zip(second.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(second.ema_params[0], straight.ema_params[0]):
        assert torch.equal(a, b)
