"""TrainLoop and scripts/image_train.py on real photographs, with encoder conditioning."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_photos import make_photo_dir
from guided_diffusion_rcdm import hub, logger
from guided_diffusion_rcdm.feature_cache import load_cache, prepare_feature_cache
from guided_diffusion_rcdm.get_ssl_models import get_model
from guided_diffusion_rcdm.image_datasets import encoder_input, find_images, load_data
from guided_diffusion_rcdm.resample import create_named_schedule_sampler
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.train_util import TrainLoop, conditioned_batches

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)
TINY_ARGV = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]


def tiny_model(ssl_dim=512, seed=0):
    torch.manual_seed(seed)
    flags = {**model_and_diffusion_defaults(), **TINY}
    return create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=ssl_dim)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def encoder():
    return get_model("resnet18", use_head=False, pretrained=False)


def _repeat(batch, cond):
    while True:
        yield batch, cond


def _fixed_loss(model, diffusion, batch, cond):
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, diffusion.num_timesteps, (len(batch),), generator=g)
    noise = torch.randn(batch.shape, generator=g)
    with torch.no_grad():
        return diffusion.training_losses(model, batch, t, model_kwargs=cond, noise=noise)["loss"].mean().item()


def test_loss_goes_down_on_a_repeated_batch_of_photos(photos, encoder, tmp_path):
    stream = load_data(data_dir=photos, batch_size=4, image_size=32, deterministic=True,
                       num_workers=0, rank=0, world_size=1)
    batch, cond = next(conditioned_batches(stream, encoder, "cpu"))
    assert cond["feat"].shape == (4, 512) and not cond["feat"].requires_grad
    model, diffusion = tiny_model()
    before = _fixed_loss(model, diffusion, batch, cond)
    logger.configure(dir=str(tmp_path), format_strs="csv")
    loop = TrainLoop(model=model, diffusion=diffusion, data=_repeat(batch, cond), batch_size=4,
                     microbatch=-1, lr=2e-3, ema_rate="0.9", log_interval=5, save_interval=1000,
                     resume_checkpoint="", max_steps=15, progress=False, out_dir=str(tmp_path))
    loop.run_loop()
    after = _fixed_loss(model, diffusion, batch, cond)
    logger.reset()
    assert after < 0.7 * before, (before, after)
    assert all(p.grad is None for p in encoder.parameters())  # the encoder stays frozen
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [5, 10, 15]
    for row in rows:
        for key in ("loss", "mse", "vb", "grad_norm"):
            assert math.isfinite(float(row[key]))


def test_microbatches_accumulate_to_the_full_batch_step(photos, encoder):
    stream = load_data(data_dir=photos, batch_size=4, image_size=32, num_workers=0, rank=0, world_size=1)
    batch, cond = next(conditioned_batches(stream, encoder, "cpu"))
    results = []
    for micro in (-1, 1, 3):
        model, diffusion = tiny_model()
        loop = TrainLoop(model=model, diffusion=diffusion, data=_repeat(batch, cond), batch_size=4,
                         microbatch=micro, lr=1e-3, ema_rate="0.5", log_interval=100,
                         save_interval=100, resume_checkpoint="", progress=False, out_dir="unused")
        np.random.seed(7)
        torch.manual_seed(7)
        loop.run_step(batch, cond)
        results.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results[0].abs().max() > 0
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-6)


def test_ema_rates_and_bf16_autocast(photos, encoder, tmp_path):
    stream = load_data(data_dir=photos, batch_size=2, image_size=32, num_workers=0, rank=0, world_size=1)
    model, diffusion = tiny_model()
    init = [p.detach().clone() for p in model.parameters()]
    dtypes = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    logger.configure(dir=str(tmp_path), format_strs="csv")
    loop = TrainLoop(model=model, diffusion=diffusion, data=conditioned_batches(stream, encoder, "cpu"),
                     batch_size=2, microbatch=-1, lr=1e-3, ema_rate="0,0.5,0.9999", log_interval=1,
                     save_interval=3, resume_checkpoint="", progress=False, out_dir=str(tmp_path),
                     precision="bf16", max_steps=3,
                     schedule_sampler=create_named_schedule_sampler("loss-second-moment", diffusion))
    loop.run_loop()
    logger.reset()
    assert loop.precision == "bf16" and loop.step == 3
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the UNet really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    model_sd, meta = hub.load_checkpoint(tmp_path / "model000003.pt")
    ema0, meta0 = hub.load_checkpoint(tmp_path / "ema_0.0_000003.pt")
    ema_half, _ = hub.load_checkpoint(tmp_path / "ema_0.5_000003.pt")
    ema_slow, _ = hub.load_checkpoint(tmp_path / "ema_0.9999_000003.pt")
    assert meta["step"] == 3 and meta0["weights"] == "ema_0.0"
    names = [n for n, _ in model.named_parameters()]
    moved = [n for n, p0 in zip(names, init) if not torch.equal(model_sd[n], p0)]
    assert moved
    for n, p0 in zip(names, init):
        torch.testing.assert_close(ema0[n], model_sd[n])  # rate 0 follows the model
        # rate 0.9999 barely moves from the initial weights; 0.5 lies in between
        assert (ema_slow[n] - p0).abs().max() <= 1e-3 * (model_sd[n] - p0).abs().max() + 1e-12
    n = moved[0]
    assert 0 < (ema_half[n] - init[names.index(n)]).abs().max() < (model_sd[n] - init[names.index(n)]).abs().max()
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_feature_cache_encodes_once_and_matches_the_encoder(photos, encoder, tmp_path):
    info = {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one", "pretrained": False}
    built = []

    def make():
        built.append(1)
        return encoder

    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    files = find_images(photos)
    paths, feats = prepare_feature_cache(str(tmp_path / "cache"), photos, files[:4], info, make, batch_size=3)
    assert len(built) == 1 and len(paths) == 4 and feats.shape == (4, 2, 512)
    with torch.no_grad():
        direct = encoder(encoder_input(paths[2]).unsqueeze(0))[0]
        flipped = encoder(encoder_input(paths[2]).flip(-1).unsqueeze(0))[0]
    torch.testing.assert_close(feats[2, 0], direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats[2, 1], flipped, rtol=1e-4, atol=1e-4)

    # all cached: the encoder is not even built; new files are encoded and appended
    prepare_feature_cache(str(tmp_path / "cache"), photos, files[:4], info, make)
    assert len(built) == 1
    paths, feats = prepare_feature_cache(str(tmp_path / "cache"), photos, files, info, make)
    assert len(built) == 2 and len(paths) == len(files) and len(load_cache(str(tmp_path / "cache"))["paths"]) == 6
    with pytest.raises(ValueError, match="was made with encoder"):
        prepare_feature_cache(str(tmp_path / "cache"), photos, files, {**info, "input_size": 64}, make)
    # the encoder's precision is part of the cache's identity: fp32 features are not passed off as bf16
    with pytest.raises(ValueError, match="holds fp32 representations.*`encoder_precision` fp32"):
        prepare_feature_cache(str(tmp_path / "cache"), photos, files, info, make, precision="bf16")
    assert load_cache(str(tmp_path / "cache"))["encoder_precision"] == "fp32"

    # the cached features reach the model through the loader, flipped with the image
    stream = load_data(data_dir=photos, batch_size=6, image_size=32, features=feats, image_paths=paths,
                       deterministic=True, num_workers=0, rank=0, world_size=1)
    images, big, kwargs = next(stream)
    logger.reset()
    assert big is None and kwargs["feat"].shape == (6, 512)
    for k in range(6):
        assert any(torch.equal(kwargs["feat"][k], feats[k, f]) for f in (0, 1))


def _run_train(args, **kw):
    cmd = [sys.executable, str(REPO / "scripts" / "image_train.py"), *TINY_ARGV, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def test_image_train_script_writes_checkpoints_logs_and_meta(photos, tmp_path):
    # the cache built by its own command, then used by training without building the encoder
    proc = subprocess.run([sys.executable, "-m", "guided_diffusion_rcdm", "cache", "--data_dir", photos,
                           "--type_model", "resnet18", "--pretrained_encoder", "False",
                           "--feat_cache", str(tmp_path / "cache"), "--num_workers", "0"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 images cached, representation width 512" in proc.stdout
    # resnet18 is fed the ImageNet scaling its weights were trained with, unless a flag says otherwise
    cache = load_cache(str(tmp_path / "cache"))
    assert cache["encoder"]["normalize"] == "imagenet"
    encoder = get_model("resnet18", pretrained=False)
    first = str(Path(photos) / cache["paths"][0])
    with torch.no_grad():
        direct = encoder(encoder_input(first, normalize="imagenet").unsqueeze(0))[0]
    torch.testing.assert_close(cache["features"][0, 0], direct, rtol=1e-4, atol=1e-4)
    out = tmp_path / "run"
    proc = _run_train(["--feat_cond", "--data_dir", photos, "--type_model", "resnet18",
                       "--pretrained_encoder", "False", "--out_dir", str(out), "--lr", "1e-4",
                       "--batch_size", "4", "--microbatch", "2", "--ema_rate", "0.9,0.99",
                       "--log_interval", "2", "--save_interval", "2", "--max_steps", "3",
                       "--num_workers", "0", "--schedule_sampler", "loss-second-moment",
                       "--feat_cache", str(tmp_path / "cache")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    for step in ("000002", "000003"):
        for name in (f"model{step}.pt", f"opt{step}.pt", f"ema_0.9_{step}.pt", f"ema_0.99_{step}.pt"):
            assert name in names
    assert "log.txt" in names and "progress.csv" in names
    assert not [n for n in names if n.endswith(".tmp")]
    sd, meta = hub.load_checkpoint(out / "model000003.pt")
    assert meta["model_flags"]["image_size"] == 32 and meta["model_flags"]["ssl_dim"] == 512
    assert meta["model_flags"]["feat_cond"] is True
    assert meta["encoder"] == {"type_model": "resnet18", "use_head": False, "normalize": "imagenet",
                               "input_size": 224, "pretrained": False, "pooling": "", "width": 512}
    assert meta["train_flags"]["encoder_precision"] == "fp32"  # the encoder's own, exact by default
    model, _ = tiny_model()
    hub.load_state_dict_checked(model, sd, meta=meta)
    rows = list(csv.DictReader(open(out / "progress.csv")))
    assert [r["step"] for r in rows] == ["2"]
    assert all(math.isfinite(float(v)) for k, v in rows[0].items() if v)
    log = (out / "log.txt").read_text()
    assert "saved checkpoint" in log and "encoding" not in log


def test_encoder_input_scaling_defaults_to_the_encoders_own_and_the_flag_overrides_it():
    from guided_diffusion_rcdm.encoders import EncoderSpec
    from guided_diffusion_rcdm.cli import train as image_train

    parser = image_train.create_argparser()
    for argv, expected in (([], "minus_one_one"), (["--type_model", "supervised"], "minus_one_one"),
                           (["--type_model", "resnet18"], "imagenet"),
                           (["--type_model", "resnet18", "--encoder_normalize", "minus_one_one"], "minus_one_one"),
                           (["--encoder_normalize", "imagenet"], "imagenet")):
        assert EncoderSpec.from_flags(parser.parse_args(argv)).input_normalize == expected, argv


def test_fp16_loss_scaling_skips_overflowing_steps_and_is_checkpointed(tmp_path):
    model, diffusion = tiny_model()
    batch = torch.rand(2, 3, 16, 16) * 2 - 1  # 16x16: fp16 is emulated on CPUs
    cond = {"feat": torch.randn(2, 512)}

    def make(m):
        return TrainLoop(model=m, diffusion=diffusion, data=_repeat(batch, cond), batch_size=2,
                         microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1, save_interval=4,
                         resume_checkpoint="", precision="fp16", fp16_scale_growth=1e-3,
                         max_steps=4, progress=False, out_dir=str(tmp_path))

    logger.configure(dir=str(tmp_path), format_strs="csv")
    loop = make(model)
    assert loop.scaler.get_scale() == 2.0**20 and loop.scaler.get_growth_interval() == 1000
    loop.run_loop()
    scale = loop.scaler.get_scale()
    adam_steps = {int(s["step"]) for s in loop.opt.state_dict()["state"].values()}
    # every overflow halves the scale and skips the update; the other steps are taken
    backoffs = round(math.log2(2.0**20 / scale))
    assert len(adam_steps) <= 1 and (adam_steps or {0}).pop() + backoffs == 4
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [float(r["lg_loss_scale"]) for r in rows][0] == 20.0
    resumed = make(tiny_model(seed=1)[0])
    logger.reset()
    assert resumed.step == 4 and resumed.scaler.get_scale() == scale


MODEL_FLAGS_128 = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 128 "
                   "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
                   "--resblock_updown True --use_fp16 False --use_scale_shift_norm True")
TRAIN_FLAGS = "--lr 1e-4 --batch_size 8"


def test_the_readme_command_lines_parse_with_every_original_flag():
    sys.path.insert(0, str(REPO))
    from guided_diffusion_rcdm.cli import train as image_train
    import run_with_submitit

    extra = ("--schedule_sampler loss-second-moment --weight_decay 0.05 --lr_anneal_steps 100 --microbatch 2 "
             "--ema_rate 0.9999,0.999 --log_interval 5 --save_interval 50 --resume_checkpoint R/model000010.pt "
             "--fp16_scale_growth 0.002")
    line = f"{MODEL_FLAGS_128} {TRAIN_FLAGS} --feat_cond --data_dir D --type_model dino --out_dir S {extra}"
    args = image_train.create_argparser().parse_args(line.split())
    assert (args.image_size, args.num_channels, args.attention_resolutions) == (128, 256, "32,16,8")
    assert args.feat_cond is True and args.use_head is False and args.use_fp16 is False
    assert (args.lr, args.batch_size, args.microbatch, args.ema_rate) == (1e-4, 8, 2, "0.9999,0.999")
    assert (args.weight_decay, args.lr_anneal_steps, args.fp16_scale_growth) == (0.05, 100, 0.002)
    assert args.schedule_sampler == "loss-second-moment" and args.resume_checkpoint == "R/model000010.pt"
    sub = run_with_submitit.parse_args(
        f"--nodes 4 --ngpus 8 --use_volta32 --partition p --timeout 60 --comment c {line}".split())
    assert (sub.nodes, sub.ngpus, sub.use_volta32, sub.partition, sub.timeout, sub.comment) == (4, 8, True, "p", 60, "c")
    assert sub.out_dir == "S" and sub.image_size == 128


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_steps_read_nothing_back_from_the_device_between_log_lines(precision, tmp_path):
    # On a GPU every read-back (`.item()`, `float(t)`) or tensor made from host data waits for the
    # GPU to finish; counted here on the CPU, where the same operations pass through the dispatcher.
    from _host_traffic import HostTraffic

    model, diffusion = tiny_model()
    # 16x16 images, two microbatches of one: fp16 is emulated on CPUs (a 32x32 batch of 4 took 40 s)
    batch = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = {"feat": torch.randn(2, 512)}
    logger.configure(dir=str(tmp_path), format_strs="csv")
    loop = TrainLoop(model=model, diffusion=diffusion, data=_repeat(batch, cond), batch_size=2,
                     microbatch=1, lr=1e-3, ema_rate="0.9,0.99", log_interval=3, save_interval=1000,
                     resume_checkpoint="", precision=precision, progress=False, out_dir=str(tmp_path))
    loop.run_step(batch, cond)  # first step: optimizer state, autocast caches
    per_step = []
    for _ in range(2):
        with HostTraffic() as traffic:
            loop.run_step(batch, cond)
        per_step.append(dict(traffic.counts))
    # the two tensors per step are the timesteps and weights drawn with numpy (copied from pinned
    # memory without waiting on a GPU); nothing is read back
    assert per_step == [{"host_tensors": 2}] * 2, per_step
    with HostTraffic() as traffic:
        row = loop._write_logs()
    logger.reset()
    assert 1 <= traffic.reads <= 2, traffic.counts  # the log line: one read (plus the loss scale)
    assert row["step"] == 3 and math.isfinite(row["loss"]) and "grad_norm" in row
    assert ("lg_loss_scale" in row) == (precision == "fp16")  # fp16's first steps overflow: inf norms
    assert {"mse", "vb", "param_norm"} <= row.keys() and any(k.startswith("loss_q") for k in row)


def test_a_non_finite_gradient_skips_the_step_and_the_ema_without_a_host_read(tmp_path):
    model, diffusion = tiny_model()
    batch = torch.rand(2, 3, 32, 32) * 2 - 1
    logger.configure(dir=str(tmp_path), format_strs="log")
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-3,
                     ema_rate="0.5", log_interval=1, save_interval=1000, resume_checkpoint="",
                     progress=False, out_dir=str(tmp_path))
    loop.run_step(batch, {"feat": torch.randn(2, 512)})
    params = [p.detach().clone() for p in loop.params]
    ema = [p.clone() for p in loop.ema_params[0]]
    loop.run_step(batch, {"feat": torch.full((2, 512), float("nan"))})
    assert all(torch.equal(a, b) for a, b in zip(params, loop.params))
    assert all(torch.equal(a, b) for a, b in zip(ema, loop.ema_params[0]))
    loop._write_logs()
    loop.run_step(batch, {"feat": torch.randn(2, 512)})
    assert not all(torch.equal(a, b) for a, b in zip(ema, loop.ema_params[0]))
    logger.reset()
    assert "1 step(s) up to step 2 skipped: non-finite gradients" in (tmp_path / "log.txt").read_text()
