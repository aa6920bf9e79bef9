"""The model and diffusion reproduce the original code's numbers in fp32.

`parity_small.pt` comes from the original RCDM code (representation-conditioned model);
`parity_configs.pt` from guided-diffusion, which RCDM forks, for the other configurations.

Tolerance. fp32 kernels round differently per instruction set (AVX2, AVX-512, AMX), so one UNet
output differs across CPUs by about 1e-6 of its largest value, and the diffusion amplifies that
difference by quantity: the x_0 prediction by sqrt(1 / alpha_bar - 1) (up to ~100x), a sampling loop
by every step it chains. Each compared quantity therefore gets its own tolerance, per batch item:
how far the quantity itself moves when the model output is shifted by `MODEL_ROUNDING` of its
largest value (its amplification, measured on the quantity, so sampling loops and learned variances
need no hand-derived factor), plus a few float32 ulps of its magnitude for the diffusion's own
arithmetic. A formula change moves results by orders of magnitude more:
`test_a_wrong_formula_fails_parity` shows one.
"""

import pytest
import torch

from guided_diffusion_rcdm import gaussian_diffusion as gd
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

# Spread of one fp32 UNet output across CPU instruction sets, relative to its largest value:
# measured up to 1.3e-6 between AVX2 and AVX-512/AMX kernels; 4e-6 leaves margin.
MODEL_ROUNDING = 4e-6
# The diffusion's own float32 arithmetic: ulps of each quantity's magnitude (at least 1).
ARITHMETIC_ULPS = 8


class RoundingShift(torch.nn.Module):
    """The model with its output shifted by a rounding-sized amount: `MODEL_ROUNDING` times the
    output's largest magnitude, with a fixed +/- pattern (the same at every call, as a different
    instruction set's rounding is the same at every call)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        signs = torch.randint(0, 2, out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return out + MODEL_ROUNDING * out.abs().amax() * signs.to(out.dtype)


def _per_item_max(values: torch.Tensor) -> torch.Tensor:
    """Largest value per batch item (dim 0); a scalar stays a scalar."""
    return values.flatten(1).amax(dim=1) if values.dim() > 1 else values


def parity_failures(actual: dict, shifted: dict, expected: dict) -> list[str]:
    """The quantities of `actual` farther from `expected` than their rounding tolerance, one line
    each; `shifted` holds the same quantities computed with `RoundingShift(model)`."""
    failures = []
    eps = torch.finfo(torch.float32).eps
    for name, want in expected.items():
        want = torch.as_tensor(want).double()
        got = torch.as_tensor(actual[name]).double().expand_as(want)
        moved = torch.as_tensor(shifted[name]).double().expand_as(want)
        err = _per_item_max((got - want).abs())
        tol = _per_item_max((moved - got).abs()) + ARITHMETIC_ULPS * eps * _per_item_max(want.abs()).clamp(min=1)
        if (err > tol).any():
            worst = int((err / tol).argmax())
            failures.append(
                f"{name}: max abs error {float(err.flatten()[worst]):.3g} > tolerance "
                f"{float(tol.flatten()[worst]):.3g} (item {worst})"
            )
    return failures


def assert_parity(compute, model, expected: dict) -> None:
    """`compute(model)` -> {name: tensor} matches `expected` within each quantity's tolerance."""
    with torch.no_grad():
        actual = compute(model)
        shifted = compute(RoundingShift(model))
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    failures = parity_failures(actual, shifted, expected)
    assert not failures, "\n".join(failures)


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


def _small_outputs(ref, diffusion, model) -> dict:
    kwargs = {"feat": ref["feat"]}
    out = {
        "model_out_raw": model(ref["x"], ref["t"], feat=ref["feat"]),
        "q_sample": diffusion.q_sample(ref["x_start"], ref["t"], noise=ref["noise"]),
    }
    pmv = diffusion.p_mean_variance(model, ref["x"], ref["t"], clip_denoised=True, model_kwargs=kwargs)
    out.update({f"p_{key}": pmv[key] for key in ("mean", "variance", "log_variance", "pred_xstart")})
    losses = diffusion.training_losses(model, ref["x_start"], ref["t"], model_kwargs=kwargs, noise=ref["noise"])
    out.update({key: losses[key] for key in ("loss", "mse", "vb")})
    out["ddim_sample"] = diffusion.ddim_sample_loop(
        model, (2, 3, 32, 32), noise=ref["noise"], clip_denoised=True, model_kwargs=kwargs, eta=0.0
    )
    return out


SMALL_KEYS = ("model_out_raw", "q_sample", "p_mean", "p_variance", "p_log_variance", "p_pred_xstart",
              "loss", "mse", "vb", "ddim_sample")


def test_small_model_and_diffusion(small):
    ref, model, diffusion = small
    assert diffusion.num_timesteps == ref["num_timesteps"]
    with torch.no_grad():
        assert model(ref["x"], ref["t"], feat=ref["feat"]).shape == (2, 6, 32, 32)
    assert_parity(lambda m: _small_outputs(ref, diffusion, m), model, {k: ref[k] for k in SMALL_KEYS})


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


def _mapped_timesteps(rec, diffusion):
    """The timesteps the model sees for `rec["t"]`: respaced and possibly rescaled to 1000."""
    t = rec["t"]
    if "timestep_map" not in rec:
        return t
    mapped = rec["timestep_map"][t]
    if diffusion.rescale_timesteps:
        mapped = mapped.float() * (1000.0 / diffusion.original_num_steps)
    return mapped


def _config_outputs(rec, diffusion, model, *, loops: bool = True) -> dict:
    """Every quantity `parity_configs.pt` records, under its key there (sampling loops if `loops`)."""
    x, noise, x_start, t, kw = rec["x"], rec["noise"], rec["x_start"], rec["t"], rec["model_kwargs"]
    shape = tuple(x.shape)
    out = {"model_out_raw": model(x, _mapped_timesteps(rec, diffusion), **kw)}
    if "timestep_map" in rec:
        out["betas"] = torch.from_numpy(diffusion.betas)
    out["q_sample"] = diffusion.q_sample(x_start, t, noise=noise)
    for clip in (True, False):
        pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=clip, model_kwargs=kw)
        out.update({f"p_{key}_clip{int(clip)}": value for key, value in pmv.items()})
    losses = diffusion.training_losses(model, x_start, t, model_kwargs=kw, noise=noise)
    out.update({f"loss_{key}": value for key, value in losses.items()})
    if not loops:
        return out
    out["ddim_sample"] = diffusion.ddim_sample_loop(model, shape, noise=noise, clip_denoised=True, model_kwargs=kw)
    torch.manual_seed(1234)
    clip = "base_diffusion" in rec
    out["p_sample_loop"] = diffusion.p_sample_loop(model, shape, noise=noise, clip_denoised=clip, model_kwargs=kw)
    if "ddim_eta1_sample" in rec:
        torch.manual_seed(1234)
        out["ddim_eta1_sample"] = diffusion.ddim_sample_loop(
            model, shape, noise=noise, clip_denoised=True, model_kwargs=kw, eta=1.0
        )
    if "bpd_total_bpd" in rec:
        torch.manual_seed(4321)
        bpd = diffusion.calc_bpd_loop(model, x_start, clip_denoised=True, model_kwargs=kw)
        out.update({f"bpd_{key}": value for key, value in bpd.items()})
        reverse = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False, model_kwargs=kw)
        out["ddim_reverse"] = reverse["sample"]
    return out


# What a `parity_configs.pt` record holds besides the outputs.
RECORD_INPUTS = {"config", "base_diffusion", "weight_seed", "x", "noise", "x_start", "t", "model_kwargs",
                 "timestep_map"}


def _expected(rec, keys=None) -> dict:
    """The recorded outputs (only `keys`, if given)."""
    keys = set(rec) - RECORD_INPUTS if keys is None else keys
    return {key: rec[key] for key in sorted(keys)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configuration_matches_guided_diffusion(name):
    rec = CONFIGS[name]
    model, diffusion = _build(rec)
    if "timestep_map" in rec:
        assert diffusion.timestep_map == rec["timestep_map"].tolist()
    assert_parity(lambda m: _config_outputs(rec, diffusion, m), model, _expected(rec))


def test_a_wrong_formula_fails_parity(monkeypatch):
    """A classic slip, x_0 = (x_t - eps) / sqrt(alpha_bar) (the noise coefficient should be
    sqrt(1 / alpha_bar - 1)), is caught on the quantities it touches and on nothing else."""
    rec = CONFIGS["eps_fixed_small_mse"]
    model, diffusion = _build(rec)

    def wrong_predict_xstart_from_eps(x_t, t, eps):
        coef = torch.as_tensor(diffusion.sqrt_recip_alphas_cumprod)[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return coef * (x_t - eps)

    monkeypatch.setattr(diffusion, "_predict_xstart_from_eps", wrong_predict_xstart_from_eps)
    with torch.no_grad():
        actual = _config_outputs(rec, diffusion, model, loops=False)
        shifted = _config_outputs(rec, diffusion, RoundingShift(model), loops=False)
    failures = parity_failures(actual, shifted, _expected(rec, actual.keys()))
    failed = {line.split(":")[0] for line in failures}
    assert {"p_pred_xstart_clip0", "p_pred_xstart_clip1", "p_mean_clip0", "p_mean_clip1"} <= failed, failures
    assert not failed & {"model_out_raw", "q_sample", "p_variance_clip0", "p_log_variance_clip0"}, failures
