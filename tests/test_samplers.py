"""Samplers on an analytic case: Gaussian data, whose optimal denoiser is known in closed form."""

import numpy as np
import pytest
import torch

from guided_diffusion_rcdm.samplers import sample_images
from guided_diffusion_rcdm.script_util import create_gaussian_diffusion

MU, STD = 0.3, 0.5  # data ~ N(MU, STD^2) per pixel


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-prediction for N(MU, STD^2) data under a 1000-step schedule (counts its calls).

    Outputs 6 channels (eps and a learned-variance value of 0) to exercise the learned-variance split.
    """

    def __init__(self, base_alphas_cumprod):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(base_alphas_cumprod))
        self.calls = 0

    def forward(self, x, t, feat=None):
        self.calls += 1
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        alpha, var = abar.sqrt(), 1 - abar
        # E[x0 | x_t] for Gaussian data, then eps = (x_t - alpha x0) / sigma
        x0 = MU + alpha * STD**2 / (abar * STD**2 + var) * (x - alpha * MU)
        eps = ((x - alpha * x0) / var.sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def _sample(sampler, steps, noise, schedule="linear"):
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, timestep_respacing="250", noise_schedule=schedule
    )
    model = GaussianDenoiser(create_gaussian_diffusion(steps=1000, noise_schedule=schedule).alphas_cumprod).double()
    out = sample_images(
        model, diffusion, tuple(noise.shape), sampler=sampler, steps=steps, noise=noise,
        clip_denoised=False, device="cpu",
    )
    return out, model.calls


def _ode_solution(noise, schedule="linear"):
    """Where the probability-flow ODE takes x_T for Gaussian data: the standardised value is kept."""
    abar_T = create_gaussian_diffusion(steps=1000, noise_schedule=schedule).alphas_cumprod[-1]
    z = (noise - np.sqrt(abar_T) * MU) / np.sqrt(abar_T * STD**2 + 1 - abar_T)
    return MU + STD * z


def test_dpm_solver_converges_to_the_ode_solution_faster_than_ddim():
    torch.manual_seed(0)
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    reference = _ode_solution(noise)
    ddim_1000, _ = _sample("ddim", 1000, noise)
    assert float((ddim_1000 - reference).abs().max()) < 0.01
    errors = {}
    for sampler in ("ddim", "dpm++"):
        for steps in (5, 10, 20, 50):
            out, calls = _sample(sampler, steps, noise)
            assert calls == steps
            errors[sampler, steps] = float((out - reference).abs().max())
    assert errors["ddim", 5] > errors["ddim", 10] > errors["ddim", 20] > errors["ddim", 50]
    assert errors["dpm++", 5] > errors["dpm++", 10] and errors["dpm++", 20] > errors["dpm++", 50]
    assert errors["dpm++", 5] < errors["ddim", 5]
    for steps in (10, 20, 50):
        assert errors["dpm++", steps] < errors["ddim", steps] / 5, steps
    assert errors["dpm++", 20] < 0.03 and errors["dpm++", 50] < 0.005


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_makes_exactly_steps_model_calls_on_every_schedule(schedule):
    # The cosine schedule's last beta is clipped at 0.999: log-SNR falls from -12.9 to -19.8 in
    # its final step, where evenly spaced steps used to collide and be dropped (9 calls for 10).
    noise = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 5, 10, 20, 50, 100, 250):
        _, calls = _sample("dpm++", steps, noise, schedule)
        assert calls == steps, (schedule, steps, calls)


def test_dpm_solver_on_the_cosine_schedule_beats_ddim():
    torch.manual_seed(0)
    noise = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    reference = _ode_solution(noise, "cosine")
    for steps in (10, 20, 50):
        ddim, _ = _sample("ddim", steps, noise, "cosine")
        dpm, _ = _sample("dpm++", steps, noise, "cosine")
        ddim_error, dpm_error = float((ddim - reference).abs().max()), float((dpm - reference).abs().max())
        assert dpm_error < ddim_error / 4, (steps, dpm_error, ddim_error)
    assert dpm_error < 0.01


def test_log_snr_timesteps_are_distinct_and_span_the_schedule():
    from guided_diffusion_rcdm.samplers import logsnr_timesteps

    for schedule, num in (("linear", 1000), ("linear", 50), ("cosine", 1000), ("cosine", 20)):
        alphas_cumprod = create_gaussian_diffusion(steps=num, noise_schedule=schedule).alphas_cumprod
        for steps in range(1, num + 1):
            chosen = logsnr_timesteps(alphas_cumprod, steps)
            assert len(chosen) == steps and chosen[-1] == num - 1
            assert all(a < b for a, b in zip(chosen, chosen[1:]))
            assert steps == 1 or chosen[0] == 0


def test_respacing_for_dpm_solver_is_even_in_log_snr():
    from guided_diffusion_rcdm.samplers import respace_for_sampler

    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="100")
    spaced = respace_for_sampler(diffusion, "dpm++", 20)
    assert spaced.num_timesteps == 20 and spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    log_snr = np.log(spaced.alphas_cumprod / (1 - spaced.alphas_cumprod))
    gaps = -np.diff(log_snr)
    assert gaps.max() < 2 * np.median(gaps)
    assert respace_for_sampler(diffusion, "ddim", 25).timestep_map == sorted(
        create_gaussian_diffusion(steps=1000, timestep_respacing="25").timestep_map
    )
    with pytest.raises(ValueError, match="`steps` must be between 1 and"):
        respace_for_sampler(diffusion, "ddim", 0)


def test_ddpm_sampler_matches_the_data_distribution():
    torch.manual_seed(0)
    noise = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    out, calls = _sample("ddpm", 100, noise)
    assert calls == 100  # the diffusion's own 250 steps, respaced to 100
    assert float(out.mean()) == pytest.approx(MU, abs=0.03)
    assert float(out.std()) == pytest.approx(STD, abs=0.03)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="dpm\\+\\+"):
        sample_images(lambda x, t: x, create_gaussian_diffusion(steps=100), (1, 3, 4, 4), sampler="euler", device="cpu")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_noise_fn_draws_every_steps_noise(sampler, eta):
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    model = GaussianDenoiser(diffusion.alphas_cumprod).double()
    start = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def run(seed, noise_fn=None):
        torch.manual_seed(seed)
        return sample_images(model, diffusion, tuple(start.shape), sampler=sampler, steps=20, noise=start,
                             eta=eta, clip_denoised=False, device="cpu", noise_fn=noise_fn)

    # the default draws fresh noise at every step, so the seed matters ...
    assert (run(0) - run(1)).abs().mean() > 0.01
    # ... a noise_fn replaces it: rows 0-1 and 2-3 share each step's noise, whatever the seed
    def paired(x):
        half = torch.randn(x.shape[0] // 2, *x.shape[1:], dtype=x.dtype)
        return half.repeat(2, 1, 1, 1)

    a = run(0, paired)
    b = torch.cat([start[:2], start[:2]])
    torch.manual_seed(5)
    b = sample_images(model, diffusion, tuple(b.shape), sampler=sampler, steps=20, noise=b, eta=eta,
                      clip_denoised=False, device="cpu", noise_fn=paired)
    torch.testing.assert_close(b[:2], b[2:], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:2], a[2:])  # other starting noise, other samples
    # with no noise at all the steps follow the mean: a function of the starting noise alone
    zero = torch.zeros_like
    torch.testing.assert_close(run(0, zero), run(1, zero), atol=0, rtol=0)
