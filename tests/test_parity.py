"""The model and diffusion reproduce the original code's numbers (fp32, 1e-5 absolute).

`parity_small.pt` comes from the original RCDM code (representation-conditioned model);
`parity_configs.pt` from guided-diffusion, which RCDM forks, for the other configurations.
"""

import pytest
import torch

from guided_diffusion_rcdm import gaussian_diffusion as gd
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ATOL = 1e-5


def assert_close(actual, expected, name):
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual).expand_as(expected)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def small(request):
    from conftest import REFERENCE_DIR

    ref = torch.load(REFERENCE_DIR / "parity_small.pt", weights_only=True)
    args = model_and_diffusion_defaults()
    args.update(ref["config"])
    model, diffusion = create_model_and_diffusion(
        **args, G_shared=False, feat_cond=True, ssl_dim=ref["ssl_dim"]
    )
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    return ref, model, diffusion


def test_small_model_output(small):
    ref, model, diffusion = small
    with torch.no_grad():
        out = model(ref["x"], ref["t"], feat=ref["feat"])
    assert out.shape == (2, 6, 32, 32)
    assert_close(out, ref["model_out_raw"], "model_out_raw")


def test_small_diffusion(small):
    ref, model, diffusion = small
    kwargs = {"feat": ref["feat"]}
    assert diffusion.num_timesteps == ref["num_timesteps"]
    with torch.no_grad():
        assert_close(diffusion.q_sample(ref["x_start"], ref["t"], noise=ref["noise"]), ref["q_sample"], "q_sample")
        pmv = diffusion.p_mean_variance(model, ref["x"], ref["t"], clip_denoised=True, model_kwargs=kwargs)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert_close(pmv[key], ref[f"p_{key}"], f"p_{key}")
        losses = diffusion.training_losses(model, ref["x_start"], ref["t"], model_kwargs=kwargs, noise=ref["noise"])
        for key in ("loss", "mse", "vb"):
            assert_close(losses[key], ref[key], key)
        sample = diffusion.ddim_sample_loop(
            model, (2, 3, 32, 32), noise=ref["noise"], clip_denoised=True, model_kwargs=kwargs, eta=0.0
        )
    assert_close(sample, ref["ddim_sample"], "ddim_sample")


def _configs():
    from conftest import REFERENCE_DIR

    return torch.load(REFERENCE_DIR / "parity_configs.pt", weights_only=True)


CONFIGS = _configs()


def _build(rec):
    args = model_and_diffusion_defaults()
    args.update(rec["config"])
    model, diffusion = create_model_and_diffusion(**args, feat_cond=False, ssl_dim=2048, G_shared=False)
    if "base_diffusion" in rec:
        spec = rec["base_diffusion"]
        diffusion = gd.GaussianDiffusion(
            betas=gd.get_named_beta_schedule(spec["schedule"], spec["steps"]),
            model_mean_type=gd.ModelMeanType[spec["mean"]],
            model_var_type=gd.ModelVarType[spec["var"]],
            loss_type=gd.LossType[spec["loss"]],
        )
    generator = torch.Generator().manual_seed(rec["weight_seed"])
    current = model.state_dict()
    weights = {k: torch.randn(current[k].shape, generator=generator) * 0.05 for k in sorted(current)}
    model.load_state_dict(weights, strict=True)
    return model.eval(), diffusion


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_matches_guided_diffusion(name):
    rec = CONFIGS[name]
    model, diffusion = _build(rec)
    x, noise, x_start, t, kw = rec["x"], rec["noise"], rec["x_start"], rec["t"], rec["model_kwargs"]
    shape = tuple(x.shape)
    with torch.no_grad():
        if "timestep_map" in rec:
            assert diffusion.timestep_map == rec["timestep_map"].tolist()
            assert_close(torch.from_numpy(diffusion.betas), rec["betas"], "betas")
            mapped = rec["timestep_map"][t]
            if diffusion.rescale_timesteps:
                mapped = mapped.float() * (1000.0 / diffusion.original_num_steps)
        else:
            mapped = t
        assert_close(model(x, mapped, **kw), rec["model_out_raw"], "model_out_raw")
        assert_close(diffusion.q_sample(x_start, t, noise=noise), rec["q_sample"], "q_sample")
        for clip in (True, False):
            out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip, model_kwargs=kw)
            for key, value in out.items():
                assert_close(value, rec[f"p_{key}_clip{int(clip)}"], f"p_{key} clip={clip}")
        losses = diffusion.training_losses(model, x_start, t, model_kwargs=kw, noise=noise)
        expected_losses = {k[len("loss_") :] for k in rec if k.startswith("loss_")}
        assert set(losses) == expected_losses
        for key in expected_losses:
            assert_close(losses[key], rec[f"loss_{key}"], f"loss {key}")
        sample = diffusion.ddim_sample_loop(model, shape, noise=noise, clip_denoised=True, model_kwargs=kw)
        assert_close(sample, rec["ddim_sample"], "ddim_sample")
        torch.manual_seed(1234)
        clip = "base_diffusion" in rec
        sample = diffusion.p_sample_loop(model, shape, noise=noise, clip_denoised=clip, model_kwargs=kw)
        assert_close(sample, rec["p_sample_loop"], "p_sample_loop")
        if "ddim_eta1_sample" in rec:
            torch.manual_seed(1234)
            sample = diffusion.ddim_sample_loop(
                model, shape, noise=noise, clip_denoised=True, model_kwargs=kw, eta=1.0
            )
            assert_close(sample, rec["ddim_eta1_sample"], "ddim eta=1")
        if "bpd_total_bpd" in rec:
            torch.manual_seed(4321)
            bpd = diffusion.calc_bpd_loop(model, x_start, clip_denoised=True, model_kwargs=kw)
            for key, value in bpd.items():
                assert_close(value, rec[f"bpd_{key}"], f"calc_bpd_loop {key}")
            reverse = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False, model_kwargs=kw)
            assert_close(reverse["sample"], rec["ddim_reverse"], "ddim_reverse_sample")
