"""--init_from: warm starts from guided-diffusion's models and from RCDMs (foundations.py), through the
train command and TrainLoop, the mapping's exactness, bad inputs, and the named foundations'
architectures against guided-diffusion's own (tests/reference/openai_*_keys.json)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _train_photos import make_photo_dir
from guided_diffusion_rcdm import foundations, hub, logger
from guided_diffusion_rcdm.cli import train as train_cli
from guided_diffusion_rcdm.config import MODEL_FLAGS, ModelConfig
from guided_diffusion_rcdm.cli.flags import parse_args
from guided_diffusion_rcdm.script_util import create_model_and_diffusion
from guided_diffusion_rcdm.train_util import TrainLoop

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, diffusion_steps=100)
ENCODER_WIDTH = 512  # resnet18's representation


def _random_weights(model: torch.nn.Module, seed: int) -> dict:
    """Every tensor random (the UNet zero-initialises its output layers, which would make any
    prediction trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in sorted(model.state_dict().items())}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    # guided-diffusion's layout: a plain state dict of a class-conditional UNet (label_emb).
    classy, _ = create_model_and_diffusion(**TINY, class_cond=True)
    class_sd = _random_weights(classy, 1)
    torch.save(class_sd, root / "class_cond.pt")
    # An RCDM of this project for another encoder width (64), with its meta.
    rcdm, _ = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=64)
    rcdm_sd = _random_weights(rcdm, 2)
    hub.save_checkpoint(root / "rcdm64.pt", rcdm_sd, meta={"model_flags": {**TINY, "feat_cond": True, "ssl_dim": 64}})
    # Another architecture (64 channels), and a file that runs code when unpickled.
    wide, _ = create_model_and_diffusion(**{**TINY, "num_channels": 64})
    torch.save(_random_weights(wide, 3), root / "wide.pt")
    torch.save({"state_dict": class_sd, "payload": _RunsCode(str(root / "ran"))}, root / "payload.pt")
    return {"root": root, "class": root / "class_cond.pt", "class_sd": class_sd, "rcdm": root / "rcdm64.pt",
            "rcdm_sd": rcdm_sd, "wide": root / "wide.pt", "payload": root / "payload.pt",
            "photos": make_photo_dir(root / "photos", names=("astronaut", "coffee", "chelsea"), short_side=40)}


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _argv(files, out, *extra):
    argv = [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    return argv + ["--feat_cond", "--data_dir", files["photos"], "--type_model", "resnet18",
                   "--pretrained_encoder", "False", "--out_dir", str(out), "--batch_size", "2",
                   "--ema_rate", "0.9", "--log_interval", "1", "--save_interval", "1",
                   "--num_workers", "0", "--progress", "False", *extra]


def test_from_a_class_conditional_file_one_step_at_lr_0_keeps_every_shared_tensor_exactly(files, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(_argv(files, out, "--init_from", str(files["class"]), "--lr", "0",
                                "--max_steps", "1")) == 0
    logger.reset()
    source = files["class_sd"]
    for name in ("model000001.pt", "ema_0.9_000001.pt"):
        sd, meta = hub.load_checkpoint(out / name)
        shared = [k for k in sd if k in source]
        assert len(shared) == len(source) - 1 and len(sd) == len(source) + 1
        assert all(torch.equal(sd[k], source[k]) for k in shared), name
        assert "label_emb.weight" not in sd
        assert sd["ssl_emb.weight"].shape == (4 * TINY["num_channels"], ENCODER_WIDTH)
        assert torch.equal(sd["ssl_emb.weight"], torch.zeros_like(sd["ssl_emb.weight"]))
        mean = source["label_emb.weight"].double().mean(0).float()
        assert torch.equal(sd["ssl_emb.bias"], mean)
        assert meta["foundation"] == {"init_from": str(files["class"]), "name": None, "file": "class_cond.pt",
                                      "sha256": hub.sha256_of(files["class"]),
                                      "new": ["ssl_emb.weight", "ssl_emb.bias"]}
    log = (out / "log.txt").read_text()
    assert "warm start from" in log and "tensors copied" in log
    line = next(x for x in log.splitlines() if "warm start from" in x)
    assert f"{len(source) - 1} tensors copied, 1 dropped (label_emb.weight), 2 new" in line

    # The first prediction: the foundation's with the mean class embedding in place of a class's
    # (its label_emb rows all set to their mean), whatever the representation.
    sd, _ = hub.load_checkpoint(out / "model000001.pt")
    rcdm, _ = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=ENCODER_WIDTH)
    rcdm.load_state_dict(sd)
    foundation, _ = create_model_and_diffusion(**TINY, class_cond=True)
    foundation.load_state_dict({**source, "label_emb.weight": mean.expand_as(source["label_emb.weight"]).clone()})
    rcdm.eval(), foundation.eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 50, 99])
    with torch.no_grad():
        ours = rcdm(x, t, feat=torch.randn(3, ENCODER_WIDTH) * 10)
        theirs = foundation(x, t, y=torch.tensor([0, 7, 999]))
    assert torch.equal(ours, theirs)  # bit for bit: 0 * feat + bias adds exactly the mean embedding
    # The representation path learns from the first step: its weights receive a gradient.
    rcdm.train()
    rcdm(x, t, feat=torch.randn(3, ENCODER_WIDTH)).square().mean().backward()
    assert rcdm.ssl_emb.weight.grad.abs().sum() > 0


def test_trainloop_from_an_rcdm_of_another_width_changes_only_ssl_emb_weight_and_resume_wins(files, tmp_path):
    out = tmp_path / "run"
    logger.configure(dir=str(out))

    def loop(init_from):
        model, diffusion = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=ENCODER_WIDTH)
        return TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-4,
                         ema_rate="0.9", log_interval=1, save_interval=1, resume_checkpoint="",
                         progress=False, out_dir=str(out), init_from=init_from)

    first = loop(str(files["rcdm"]))
    sd = first.model.state_dict()
    differ = [k for k in sd if not (k in files["rcdm_sd"] and torch.equal(sd[k], files["rcdm_sd"][k]))]
    assert differ == ["ssl_emb.weight"]
    assert torch.equal(sd["ssl_emb.weight"], torch.zeros(4 * TINY["num_channels"], ENCODER_WIDTH))
    assert all(torch.equal(e, p) for e, p in zip(first.ema_params[0], first.params))
    first.save()
    record = first.checkpoint_meta["foundation"]
    assert record["sha256"] == hub.sha256_of(files["rcdm"])

    # A rerun in the same folder resumes: --init_from is ignored, and said to be.
    second = loop(str(files["class"]))
    assert second.checkpoint_meta["foundation"] == record
    assert all(torch.equal(a, b) for a, b in zip(second.model.state_dict().values(), sd.values()))
    logger.reset()
    log = (out / "log.txt").read_text()
    assert "resumed from checkpoint" in log
    assert f"resuming: --init_from {files['class']} ignored" in log


def test_a_named_foundation_comes_through_the_hub_only_with_the_releases_architecture(files, tmp_path, monkeypatch):
    """`openai_256_uncond` from an RCDM_MIRROR directory: a file with the release's keys and shapes (one
    random row broadcast per large tensor: a few MB) is read with the name's flags; a tiny UNet under the
    release's name is refused, naming the file and its first tensor of another shape, before TrainLoop
    builds anything, and nothing enters the download cache."""
    from helpers_hub import random_state

    f = foundations.FOUNDATIONS["openai_256_uncond"]
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in f.build().state_dict().items()}
    good, bad = tmp_path / "mirror", tmp_path / "bad_mirror"
    good.mkdir()
    bad.mkdir()
    torch.save(random_state(shapes, 4, big=1 << 16), good / f.file_name())
    uncond, _ = create_model_and_diffusion(**TINY)
    torch.save(_random_weights(uncond, 4), bad / f.file_name())
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    monkeypatch.setenv(hub.MIRROR_ENV, str(good))
    weights = foundations.load_foundation("openai_256_uncond", progress=False)
    assert (weights.name, weights.path, weights.flags) == ("openai_256_uncond", str(good / f.file_name()), f.flags)
    assert {k: list(v.shape) for k, v in weights.state_dict.items()} == shapes

    monkeypatch.setenv(hub.MIRROR_ENV, str(bad))
    model, diffusion = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=8)
    with pytest.raises(hub.DownloadError) as err:
        TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-4,
                  ema_rate="0.9", log_interval=1, save_interval=1, resume_checkpoint="", progress=False,
                  out_dir=str(tmp_path / "run"), init_from="openai_256_uncond")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{bad / f.file_name()} is not the expected checkpoint")
    assert "time_embed.0.weight: file [128, 32], model [1024, 256]" in message
    assert not list(home.rglob(f.file_name())) and (bad / f.file_name()).is_file()


def test_a_name_sets_the_flags_it_needs_unless_given():
    args = parse_args(train_cli.create_argparser(), ["--init_from", "openai_256", "--num_channels", "128"])
    config, notes = train_cli.model_config(args)
    assert (config.image_size, config.num_head_channels, config.resblock_updown, config.num_channels) == (256, 64, True, 128)
    assert len(notes) == 1 and "--image_size 256" in notes[0] and "--num_channels" not in notes[0], notes
    assert config.class_cond is False  # an RCDM takes a representation, not the foundation's classes
    file_args = parse_args(train_cli.create_argparser(), ["--init_from", "some/file.pt"])
    assert train_cli.model_config(file_args) == (ModelConfig(**{k: getattr(file_args, k) for k in MODEL_FLAGS}), [])


@pytest.mark.parametrize("case", ["shapes", "payload", "missing_name", "unknown_name", "other_architecture"])
def test_bad_init_from_is_one_line_exit_2_nothing_written(case, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))  # no release file there: offline
    out = tmp_path / "run"
    if case == "other_architecture":  # a tiny UNet under the release's name, in the mirror
        (tmp_path / "256x256_diffusion_uncond.pt").write_bytes(files["wide"].read_bytes())
    init = {"shapes": str(files["wide"]), "payload": str(files["payload"]), "missing_name": "openai_128",
            "unknown_name": "openai_1024", "other_architecture": "openai_256_uncond"}[case]
    assert train_cli.main(_argv(files, out, "--init_from", init, "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert not out.exists()
    assert not (tmp_path / "torch_home").exists()  # no download, no cache entry
    assert not (files["root"] / "ran").exists()
    expected = {"shapes": "time_embed.0.weight is 256x64 in the file, 128x32 in the model",
                "payload": "refused to load", "missing_name": "128x128_diffusion.pt",
                "unknown_name": "no such foundation name",
                "other_architecture": f"{tmp_path / '256x256_diffusion_uncond.pt'} is not the expected checkpoint "
                                      "(the published openai_256_uncond (256x256_diffusion_uncond.pt) does not fit: "}[case]
    assert expected in err
    if case == "shapes":
        assert "--num_channels 64" in err


@pytest.mark.parametrize("name", ["openai_64", "openai_128", "openai_256", "openai_256_uncond", "openai_512"])
def test_named_foundation_flags_build_guided_diffusions_architecture(name, reference_dir):
    """Keys and shapes built from FOUNDATIONS[name].flags on the meta device equal those of
    guided-diffusion's own code with the release's flags."""
    ref = json.loads((reference_dir / f"{name}_keys.json").read_text())
    f = foundations.FOUNDATIONS[name]
    assert f.class_cond == ref["flags"]["class_cond"]
    release = {k: v for k, v in ref["flags"].items() if k not in ("class_cond", "use_fp16")}
    assert ModelConfig(**f.flags) == ModelConfig(**release)  # the same configuration as the release's flags
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**f.flags, class_cond=f.class_cond)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    counts = foundations.mapping_counts(name)
    n = len(ref["state_dict"])
    assert counts == ({"copied": n - 1, "dropped": 1, "new": 2} if f.class_cond
                      else {"copied": n, "dropped": 0, "new": 2})


def test_published_rcdm_names_and_model_flags_256():
    names = [n for n in foundations.FOUNDATIONS if n.startswith("rcdm_")]
    assert len(names) == 9 and "rcdm_supervised" in names and "rcdm_supervised_head" not in names
    assert foundations.mapping_counts("rcdm_dino_head", ssl_dim=768) == {"copied": 493, "dropped": 0, "new": 1}
    assert foundations.MODEL_FLAGS_256["image_size"] == 256 and foundations.MODEL_FLAGS_256["class_cond"] is False
    assert os.path.basename(foundations.FOUNDATIONS["openai_512"].url) == "512x512_diffusion.pt"


def test_quickstart_refuses_a_foundation_of_another_architecture_before_any_work(files, tmp_path, capsys):
    from guided_diffusion_rcdm.apps import quickstart

    out = tmp_path / "qs"
    assert quickstart.main(["--init_from", str(files["wide"]), "--out_dir", str(out), "--train_steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit the model flags" in err, err
    assert not out.exists()


def test_train_only_cond_updates_only_the_representation_path_first(files, tmp_path):
    model, diffusion = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=ENCODER_WIDTH)
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-2,
                     ema_rate="0.9", log_interval=1, save_interval=1, resume_checkpoint="", progress=False,
                     out_dir=str(tmp_path / "run"), init_from=str(files["class"]), train_only="cond",
                     train_only_steps=1)
    logger.reset()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, cond = torch.randn(2, 3, 32, 32), {"feat": torch.randn(2, ENCODER_WIDTH)}
    loop.run_step(batch, cond)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert "ssl_emb.weight" in changed and "input_blocks.1.0.emb_layers.1.weight" in changed
    assert all(foundations.is_conditioning_parameter(k) for k in changed), sorted(changed)
    loop.run_step(batch, cond)  # then everything
    assert not torch.equal(model.state_dict()["input_blocks.0.0.weight"], before["input_blocks.0.0.weight"])
    with pytest.raises(Exception, match="train_only"):
        TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-2, ema_rate="0.9",
                  log_interval=1, save_interval=1, resume_checkpoint="", progress=False,
                  out_dir=str(tmp_path / "run2"), train_only="all")


def test_init_lr_scale_trains_the_copied_weights_slower_and_a_resume_keeps_both_groups(files, tmp_path):
    """Two AdamW groups after a warm start: the new `ssl_emb` at lr, the copied tensors at
    lr * init_lr_scale; a resumed run rebuilds them and gets back the saved optimizer state."""
    out = tmp_path / "run"

    def loop(**kwargs):
        model, diffusion = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=ENCODER_WIDTH)
        return TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1, lr=1e-2,
                         ema_rate="0.9", log_interval=1, save_interval=1, resume_checkpoint="", progress=False,
                         out_dir=str(out), seed=0, **kwargs)

    first = loop(init_from=str(files["class"]), init_lr_scale=0.1, lr_anneal_steps=10)
    logger.reset()
    names = {id(p): n for n, p in first.model.named_parameters()}
    new, copied = first.opt.param_groups
    assert sorted(names[id(p)] for p in new["params"]) == ["ssl_emb.bias", "ssl_emb.weight"]
    assert len(copied["params"]) == len(first.params) - 2
    batch, cond = torch.randn(2, 3, 32, 32), {"feat": torch.randn(2, ENCODER_WIDTH)}
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.run_step(batch, cond)
    assert (new["lr"], copied["lr"]) == (1e-2, pytest.approx(1e-3))  # step 0 of the annealing: the full lr
    # Adam's first step moves each weight by about its group's lr
    moved = {k: (v - before[k]).abs().max().item() for k, v in first.model.state_dict().items()}
    assert moved["ssl_emb.weight"] == pytest.approx(1e-2, rel=0.05)
    assert moved["out.2.weight"] == pytest.approx(1e-3, rel=0.05)
    first.run_step(batch, cond)
    assert (new["lr"], copied["lr"]) == (pytest.approx(9e-3), pytest.approx(9e-4))
    first.save()
    saved = first.opt.state_dict()

    second = loop(init_from=str(files["class"]), lr_anneal_steps=10)  # resumes: same groups, saved state
    logger.reset()
    assert second.step == 2 and len(second.opt.param_groups) == 2
    assert [g["lr_scale"] for g in second.opt.param_groups] == [1.0, 0.1]
    state = second.opt.state_dict()
    for i, s in saved["state"].items():
        assert all(torch.equal(s[k], state["state"][i][k]) for k in s)
    second.run_step(batch, cond)
    assert [g["lr"] for g in second.opt.param_groups] == [pytest.approx(8e-3), pytest.approx(8e-4)]
    with pytest.raises(Exception, match="init_lr_scale"):
        loop(init_lr_scale=-1)


def test_warm_start_benchmark_runs_end_to_end(tmp_path, capsys):
    """scripts/warm_start_benchmark.py in miniature, from a class-conditional foundation: it trains
    the foundation on the photos' classes (two photographs a class), the RCDM runs (scratch, warm,
    fitted `ssl_emb`), evaluates each and writes the curves."""
    from guided_diffusion_rcdm.apps import warm_start

    out = tmp_path / "curves.json"
    argv = ["--foundation", "class", "--pretrain_steps", "2", "--train_steps", "2", "--eval_every", "1",
            "--steps", "2", "--crops_per_photo", "1", "--samples_per_image", "1", "--fit", "--photos_per_class", "2",
            "--out_json", str(out)]
    assert warm_start.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["runs"] == ["scratch", "warm", "warm_fit"] and r["pretrain"]["conditioning"] == "class"
    # the fitted ssl_emb starts elsewhere than the zero one: its first samples differ
    assert r["warm_fit"]["curve"][0] != r["warm"]["curve"][0]
    assert r["pretrain"]["steps"] == 2 and r["pretrain"]["final_loss"] > 0
    assert r["num_heldout"] == 16 and r["num_train"] == 14  # one crop of each photo but the two unseen
    for name in r["runs"]:
        curve = r[name]["curve"]
        assert [p["step"] for p in curve] == [0, 1, 2]
        assert all(0 < p["mrr"] <= 1 and 0 < p["shuffled_mrr"] <= 1 for p in curve)
        assert all(p["loss"] > 0 for p in curve[1:])
    # the same command, the same figures: every run draws the same batches, timesteps and noise
    assert warm_start.main(argv[:-1] + [str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [again[n]["curve"] for n in r["runs"]] == [r[n]["curve"] for n in r["runs"]]
    assert again["pretrain"]["final_loss"] == r["pretrain"]["final_loss"]
    printed = capsys.readouterr().out
    assert "foundation (class-conditional): 2 steps" in printed and "warm: reaches it at step" in printed
    # bad input: one line, status 2
    assert warm_start.main(["--warm_lr_scales", "x"]) == 2
    assert "--warm_lr_scales" in capsys.readouterr().err
    assert warm_start.main(["--fit"]) == 2
    assert "--fit needs --foundation class" in capsys.readouterr().err


def test_train_command_warm_start_recipe_flags(files, tmp_path, capsys):
    """--train_only cond --train_only_steps 1 --init_lr_scale 0.5 through the train command: after
    one step only the representation's path moved, after two everything did; the flags are recorded.
    Without --init_from they are refused in one line, nothing written."""
    out = tmp_path / "run"
    argv = _argv(files, out, "--init_from", str(files["class"]), "--lr", "1e-2", "--train_only", "cond",
                 "--train_only_steps", "1", "--init_lr_scale", "0.5")
    source = files["class_sd"]
    assert train_cli.main([*argv, "--max_steps", "1"]) == 0
    logger.reset()
    sd, meta = hub.load_checkpoint(out / "model000001.pt")
    moved = {k for k in sd if k in source and not torch.equal(sd[k], source[k])}
    assert moved and all(foundations.is_conditioning_parameter(k) for k in moved), sorted(moved)
    assert "input_blocks.1.0.emb_layers.1.weight" in moved and "out.2.weight" not in moved
    assert {k: meta["train_flags"][k] for k in ("init_lr_scale", "train_only", "train_only_steps")} == \
        {"init_lr_scale": 0.5, "train_only": "cond", "train_only_steps": 1}
    assert train_cli.main([*argv, "--max_steps", "2"]) == 0  # resumes; the held weights train now
    logger.reset()
    sd, _ = hub.load_checkpoint(out / "model000002.pt")
    assert not torch.equal(sd["out.2.weight"], source["out.2.weight"])

    bad = tmp_path / "bad"
    assert train_cli.main(_argv(files, bad, "--init_lr_scale", "0.1", "--max_steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init_lr_scale and --train_only shape a warm start" in err, err
    assert "--init_from" in err and not bad.exists()
    assert train_cli.main(_argv(files, bad, "--init_from", str(files["class"]), "--train_only", "cond")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--train_only 'cond' with --train_only_steps 0: give both" in err, err
    assert not bad.exists()


def test_a_fitted_ssl_emb_makes_the_rcdm_predict_the_foundations_prediction_for_each_images_class(files):
    """`with_fitted_ssl_emb`: with a tiny ridge the least-squares map sends each fitted
    representation to its class's embedding, so the warm-started RCDM predicts exactly what the
    foundation predicts for that class (not for the mean class)."""
    source = files["class_sd"]
    weights = foundations.load_foundation(str(files["class"]))
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, ENCODER_WIDTH, generator=g) * 3 + 1  # fewer images than dimensions: an exact fit
    labels = torch.tensor([3, 3, 7, 7, 42, 999])
    fitted = foundations.with_fitted_ssl_emb(weights, feats, labels, ridge=1e-9)
    assert fitted.fit == {"images": 6, "classes": 4, "ridge": 1e-9} and weights.fitted == {}
    rcdm, _ = create_model_and_diffusion(**TINY, feat_cond=True, ssl_dim=ENCODER_WIDTH)
    mapped = foundations.apply_warm_start(rcdm, fitted)
    assert mapped.new == ["ssl_emb.weight", "ssl_emb.bias"]
    assert "ssl_emb fitted to the class embeddings of 6 labelled images (4 classes)" in mapped.summary("f")
    assert fitted.record()["ssl_emb_fit"] == fitted.fit
    foundation, _ = create_model_and_diffusion(**TINY, class_cond=True)
    foundation.load_state_dict(source)
    rcdm.eval(), foundation.eval()
    x, t = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([1, 20, 40, 60, 80, 99])
    with torch.no_grad():
        assert torch.allclose(rcdm.ssl_emb(feats), source["label_emb.weight"][labels], atol=1e-4)
        ours, theirs = rcdm(x, t, feat=feats), foundation(x, t, y=labels)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # A foundation without class embeddings has nothing to fit to: one line.
    with pytest.raises(foundations.UsageError, match="needs a class-conditional foundation"):
        foundations.with_fitted_ssl_emb(foundations.load_foundation(str(files["rcdm"])), feats, labels)
    with pytest.raises(foundations.UsageError, match="beyond the foundation's 1000 classes"):
        foundations.with_fitted_ssl_emb(weights, feats, labels + 1)


def test_train_command_init_fit_images_fits_ssl_emb_to_the_folders_classes(files, tmp_path, capsys):
    """--init_fit_images 3 through the train command: at --lr 0 the checkpoint's `ssl_emb` is the fit
    of the three photographs' representations (same encoder, centre crops) to the class embeddings of
    their folders' classes; logged and recorded. Bad uses: one line, exit 2, nothing written."""
    from guided_diffusion_rcdm.encoders import EncoderSpec, encode_images
    from guided_diffusion_rcdm.image_datasets import find_images, folder_classes

    out = tmp_path / "run"
    assert train_cli.main(_argv(files, out, "--init_from", str(files["class"]), "--init_fit_images", "3",
                                "--lr", "0", "--max_steps", "1")) == 0
    logger.reset()
    sd, meta = hub.load_checkpoint(out / "model000001.pt")
    paths = find_images(files["photos"])
    encoder = EncoderSpec("resnet18", pretrained=False).build("cpu")
    feats = encode_images(encoder, paths).features
    labels = torch.tensor(folder_classes(paths))
    assert sorted(labels.tolist()) == [0, 0, 1]
    weight, bias = foundations.fit_ssl_emb(files["class_sd"]["label_emb.weight"], feats, labels)
    assert torch.allclose(sd["ssl_emb.weight"], weight, atol=1e-6) and torch.allclose(sd["ssl_emb.bias"], bias, atol=1e-5)
    assert sd["ssl_emb.weight"].abs().sum() > 0
    assert meta["foundation"]["ssl_emb_fit"] == {"images": 3, "classes": 2, "ridge": 0.1}
    assert meta["foundation"]["new"] == ["ssl_emb.weight", "ssl_emb.bias"]
    assert meta["train_flags"]["init_fit_images"] == 3
    log = (out / "log.txt").read_text()
    assert "ssl_emb fitted to the class embeddings of 3 labelled images (2 classes)" in log
    # The Python front door takes a foundation fitted to representations and labels of one's own.
    from guided_diffusion_rcdm import training
    own = foundations.with_fitted_ssl_emb(foundations.load_foundation(str(files["class"])), feats, labels + 5)
    training.train(files["photos"], str(tmp_path / "own"), model=ModelConfig(**TINY), encoder=encoder.spec,
                   init_from=own, lr=0.0, max_steps=1, batch_size=2, num_workers=0, progress=False,
                   log_formats="log")
    logger.reset()
    sd, meta = hub.load_checkpoint(tmp_path / "own" / "model000001.pt")
    assert torch.equal(sd["ssl_emb.weight"], own.fitted["ssl_emb.weight"])
    assert meta["foundation"]["ssl_emb_fit"] == {"images": 3, "classes": 2, "ridge": 0.1}

    flat = make_photo_dir(tmp_path / "flat", names=("astronaut", "coffee"), short_side=40, nested=False)
    cases = [
        (["--init_from", str(files["rcdm"]), "--init_fit_images", "2"], "needs a class-conditional foundation"),
        (["--init_fit_images", "2"], "--init_fit_images 2: give 0 (no fit) or at least 2; it fits"),
        (["--init_from", str(files["class"]), "--init_fit_images", "1"], "--init_fit_images 1: give 0 (no fit)"),
        (["--init_from", str(files["class"]), "--init_fit_images", "2", "--data_dir", flat], "in one folder per class"),
    ]
    for i, (extra, expected) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        assert train_cli.main(_argv(files, bad, "--max_steps", "1", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not bad.exists()


def test_init_fit_images_with_two_torchrun_ranks_shares_the_encoding_and_trains(files, tmp_path):
    """Two real processes (gloo on 127.0.0.1): each encodes one of the two images, both fit on the
    gathered rows; the run finishes and its checkpoint holds the single-process fit."""
    import subprocess
    import sys

    from helpers_hub import free_port
    from guided_diffusion_rcdm.encoders import EncoderSpec, encode_images
    from guided_diffusion_rcdm.image_datasets import find_images, folder_classes
    from guided_diffusion_rcdm.training import _fit_images

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    argv = _argv(files, out, "--init_from", str(files["class"]), "--init_fit_images", "2", "--lr", "0",
                 "--max_steps", "1", "--batch_size", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=repo)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(repo, "scripts", "image_train.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sd, meta = hub.load_checkpoint(out / "model000001.pt")
    paths = find_images(files["photos"])
    pick = _fit_images(paths, 2, 0)
    feats = encode_images(EncoderSpec("resnet18", pretrained=False).build("cpu"), [paths[i] for i in pick]).features
    labels = torch.tensor([folder_classes(paths)[i] for i in pick])
    weight, _ = foundations.fit_ssl_emb(files["class_sd"]["label_emb.weight"], feats, labels)
    assert torch.allclose(sd["ssl_emb.weight"], weight, atol=1e-6)
    assert meta["foundation"]["ssl_emb_fit"]["images"] == 2 and meta["train_flags"]["world_size"] == 2


def test_a_fit_that_cannot_be_made_stops_both_ranks_with_the_same_line(files, tmp_path):
    """Two ranks started as torchrun starts them (RANK, WORLD_SIZE; gloo on 127.0.0.1), each
    encoding one of the two images the fit reads; one image is unreadable, so one representation is
    left: both ranks refuse in the same line and exit 2, and no checkpoint is written."""
    import subprocess
    import sys

    from helpers_hub import free_port

    data = tmp_path / "data"
    make_photo_dir(data, names=("astronaut",), short_side=40)
    os.makedirs(data / "sub")
    (data / "sub" / "broken.jpg").write_bytes(b"not a JPEG")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    argv = _argv(files, out, "--init_from", str(files["class"]), "--init_fit_images", "2", "--max_steps", "1")
    argv[argv.index("--data_dir") + 1] = str(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=repo, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, os.path.join(repo, "scripts", "image_train.py"), *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = [err.strip().splitlines()[-1] for _, err in results]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert errors[0] == errors[1] and "give at least two images" in errors[0], errors
    assert not list(out.glob("*.pt"))
