"""Representation guidance (null representation, guided sampling) and conditional batch norm."""

import pytest
import torch

from guided_diffusion_rcdm import hub
from guided_diffusion_rcdm.samplers import GuidedModel, sample_images
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion_rcdm.unet import ConditionalBatchNorm

TINY = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    learn_sigma=True, diffusion_steps=100, timestep_respacing="8", noise_schedule="linear",
)
SSL_DIM = 12


def build(randomize=True, **overrides):
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    flags.update(overrides)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=SSL_DIM, G_shared=False)
    if randomize:
        with torch.no_grad():  # random weights everywhere, so every input matters
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model, diffusion, flags


def _sample(model, diffusion, sampler, scale, feat, seed=0):
    torch.manual_seed(seed)
    noise = torch.randn(feat.shape[0], 3, 16, 16)
    return sample_images(
        model, diffusion, tuple(noise.shape), sampler=sampler, noise=noise, guidance_scale=scale,
        model_kwargs={"feat": feat}, device="cpu",
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_guidance_scale_one_is_the_unguided_sampler(sampler):
    model, diffusion, _ = build(feat_drop_prob=0.2)
    model.eval()
    feat = torch.randn(2, SSL_DIM)
    plain = _sample(model, diffusion, sampler, 1.0, feat)
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 16, 16)
    reference = sample_images(model, diffusion, (2, 3, 16, 16), sampler=sampler, noise=noise,
                              model_kwargs={"feat": feat}, device="cpu")
    assert torch.equal(plain, reference)
    guided = _sample(model, diffusion, sampler, 3.0, feat)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)


def test_guided_prediction_is_the_classifier_free_combination():
    model, diffusion, _ = build(feat_drop_prob=0.1)
    model.eval()
    x, t, feat = torch.randn(3, 3, 16, 16), torch.tensor([10, 50, 90]), torch.randn(3, SSL_DIM)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        guided = GuidedModel(model, 2.5)(x, t, feat=feat)
        assert calls == [6], "guidance must be one batched forward"
        cond = model(x, t, feat=feat)
        uncond = model(x, t, feat=model.null_representation(3))
        assert torch.equal(model(x, t), uncond)  # no representation: the null one
        unconditional = GuidedModel(model, 0.0)(x, t, feat=feat)
    expected_eps = uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(guided[:, :3], expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unconditional, uncond, atol=1e-6, rtol=1e-6)


def test_null_representation_replaces_the_right_fraction_in_training():
    model, _, _ = build(feat_drop_prob=0.3)
    feat = torch.randn(4000, SSL_DIM)
    model.train()
    torch.manual_seed(1)
    seen = model._representation(feat, feat.shape[0])
    dropped = (seen == model.null_feat).all(dim=1)
    kept = (seen == feat).all(dim=1)
    assert torch.all(dropped ^ kept)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    model.eval()
    assert torch.equal(model._representation(feat, feat.shape[0]), feat)  # never in eval
    # the null representation is learned
    model.train()
    x = torch.randn(8, 3, 16, 16)
    model(x, torch.randint(0, 100, (8,)), feat=torch.randn(8, SSL_DIM)).square().mean().backward()
    assert model.null_feat.grad is not None


def test_guidance_needs_a_model_trained_for_it():
    model, diffusion, _ = build()
    assert not model.supports_guidance
    with pytest.raises(ValueError, match="`feat_drop_prob`"):
        _sample(model.eval(), diffusion, "ddim", 2.0, torch.randn(1, SSL_DIM))


def _train(model, diffusion, steps=30):
    torch.manual_seed(3)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    feat = torch.randn(8, SSL_DIM)
    t = torch.randint(0, diffusion.num_timesteps, (8,))
    noise = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = diffusion.training_losses(model, x, t, model_kwargs={"feat": feat}, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_cbn_model_trains_saves_reloads_and_samples_deterministically(tmp_path):
    model, diffusion, flags = build(randomize=False, norm_style="cbn", shared_dim=16)
    norms = [m for m in model.modules() if isinstance(m, ConditionalBatchNorm)]
    assert norms and not hasattr(model, "ssl_emb")
    resblocks = [m for m in model.modules() if hasattr(m, "in_layers")]
    assert all(isinstance(b.in_layers[0], ConditionalBatchNorm) and isinstance(b.out_layers[0], ConditionalBatchNorm)
               for b in resblocks)
    stats_before = norms[0].bn.running_mean.clone()
    losses = _train(model, diffusion)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(norms[0].bn.running_mean, stats_before)  # statistics move in training

    model.eval()
    feat = torch.randn(2, SSL_DIM)
    frozen = norms[0].bn.running_mean.clone()
    first = _sample(model, diffusion, "ddpm", 1.0, feat, seed=5)
    assert torch.equal(norms[0].bn.running_mean, frozen)  # and not in eval
    second = _sample(model, diffusion, "ddpm", 1.0, feat, seed=5)
    assert torch.equal(first, second)

    path = tmp_path / "cbn.pt"
    hub.save_checkpoint(path, model.state_dict(), meta={"model_flags": {**flags, "feat_cond": True, "ssl_dim": SSL_DIM}})
    state_dict, meta = hub.load_checkpoint(path)
    assert any(k.endswith("bn.running_var") for k in state_dict)
    rebuilt, _, _ = build(randomize=False, **{k: meta["model_flags"][k] for k in ("norm_style", "shared_dim")})
    hub.load_state_dict_checked(rebuilt, state_dict, meta)
    rebuilt.eval()
    assert torch.equal(_sample(rebuilt, diffusion, "ddpm", 1.0, feat, seed=5), first)


def test_cbn_output_depends_on_each_examples_representation_in_eval():
    model, _, _ = build(norm_style="cbn", shared_dim=0)
    _train(model, build(norm_style="cbn")[1], steps=3)
    model.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    feat = torch.randn(2, SSL_DIM)
    with torch.no_grad():
        both = model(x, t, feat=feat)
        alone = model(x[:1], t[:1], feat=feat[:1])
        changed = model(x, t, feat=torch.stack([feat[0], feat[1] + 1]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)  # no batch coupling in eval
    torch.testing.assert_close(changed[0], both[0], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[1], both[1])


def test_cbn_converts_to_sync_batch_norm():
    model, _, _ = build(norm_style="cbn")
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bns = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    synced.eval()
    with torch.no_grad():
        assert synced(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), feat=torch.randn(2, SSL_DIM)).shape == (2, 6, 16, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(norm_style="layer"), "`norm_style`"), (dict(feat_drop_prob=1.0), "`feat_drop_prob`")],
)
def test_invalid_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(**overrides)


def test_options_need_a_representation():
    flags = model_and_diffusion_defaults()
    flags.update(TINY, norm_style="cbn")
    with pytest.raises(ValueError, match="`feat_cond`"):
        create_model_and_diffusion(**flags, feat_cond=False, ssl_dim=SSL_DIM, G_shared=False)


def test_train_then_sample_with_guidance_from_the_command_line(tmp_path, capsys):
    """image_train.py with --norm_style cbn --feat_drop_prob, then image_sample.py --guidance_scale:
    the checkpoint records both options, so sampling needs no model flags."""
    import numpy as np

    from _sampling_helpers import TINY_ARGV, make_tiny_checkpoint, run_script, write_photos

    photos = tmp_path / "photos"
    write_photos(photos, names=("astronaut", "coffee", "chelsea", "rocket"))
    out = tmp_path / "run"
    run_script(
        "image_train.py", *TINY_ARGV, "--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1,2", "--attention_resolutions", "16", "--learn_sigma", "True",
        "--diffusion_steps", "100", "--norm_style", "cbn", "--shared_dim", "16", "--feat_drop_prob", "0.25",
        "--feat_cond", "--data_dir", photos, "--type_model", "resnet18", "--pretrained_encoder", "False",
        "--out_dir", out, "--batch_size", "4", "--max_steps", "2", "--save_interval", "2", "--num_workers", "0",
        "--progress", "False",
    )
    _, meta = hub.load_checkpoint(out / "model000002.pt")
    assert meta["model_flags"]["norm_style"] == "cbn" and meta["model_flags"]["feat_drop_prob"] == 0.25
    samples = tmp_path / "samples"
    results = {}
    # image_sample.py's main, in this process (the training above ran as its own process)
    from guided_diffusion_rcdm.cli.sample import main as image_sample

    for scale in ("1", "3"):
        assert image_sample("sample", [str(a) for a in (
            "--model_path", out / "model000002.pt", "--data_dir", photos, "--num_images", "1",
            "--batch_size", "2", "--timestep_respacing", "4", "--use_ddim", "True", "--guidance_scale", scale,
            "--out_dir", samples, "--name", f"s{scale}", "--progress", "False",
        )]) == 0
        results[scale] = np.load(samples / f"s{scale}.npz")["samples"]
    assert results["1"].shape == results["3"].shape == (1, 2, 32, 32, 3)
    # (how guidance changes samples is checked on the model above; 2 training steps say little)
    plain = make_tiny_checkpoint(tmp_path / "plain.pt")
    capsys.readouterr()
    assert image_sample("sample", [str(a) for a in (
        "--model_path", plain, "--data_dir", photos, "--num_images", "1",
        "--batch_size", "2", "--timestep_respacing", "4", "--guidance_scale", "3", "--out_dir", samples,
    )]) == 2
    err = capsys.readouterr().err
    assert "--feat_drop_prob" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
