"""Samplers over any diffusion of this package: DDPM, DDIM and a multistep DPM-Solver++.

Each sampler is written against the diffusion's public quantities (`alphas_cumprod`,
`p_mean_variance`) so it works for every model parameterisation (eps, x_0 or x_{t-1} prediction,
fixed or learned variance: the x_0 prediction comes from `p_mean_variance`, which splits off the
variance channels). The number of model calls is the diffusion's number of (respaced) steps; with
`steps=N`, `sample_images` respaces the diffusion to N steps first: evenly in time for DDPM and DDIM
(as `--timestep_respacing N`), evenly in log signal-to-noise ratio for DPM-Solver++, where the
solver is most accurate (on a 1000-step linear schedule, time-uniform steps leave one huge final
jump in log-SNR). Exactly N model calls on every schedule: see `logsnr_timesteps`.

Representation guidance (`guidance_scale`, for models trained with `feat_drop_prob > 0`) works
like classifier-free guidance: eps = eps_null + s * (eps_feat - eps_null), from one batched forward
over the real and the null representation. s = 1 is the plain conditional model, s = 0 the
unconditional one, s > 1 pushes samples towards what the representation pins down.

`sample_images` is the one entry point the scripts use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import UsageError
from .gaussian_diffusion import GaussianDiffusion
from .precision import AutocastModel
from .respace import SpacedDiffusion, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++")


def sample_images(
    model: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    model_kwargs: dict | None = None,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw samples of `shape` (N, C, H, W) with the named sampler ("ddpm", "ddim" or "dpm++").

    :param steps: number of model calls; None keeps the diffusion's own (respaced) steps.
    :param noise: the starting noise x_T (default: fresh standard normal noise).
    :param eta: DDIM's stochasticity (0: deterministic).
    :param guidance_scale: representation guidance (1: none; needs a model with a null representation).
    :param noise_fn: draws the noise DDPM (and DDIM with eta > 0) add at each step, `noise_fn(x)`
        (default: `torch.randn_like(x)`); DPM-Solver++ adds none.
    :return: [N x C x H x W] samples in [-1, 1] (when `clip_denoised`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps is not None:
        diffusion = respace_for_sampler(diffusion, sampler, steps)
    if device is None and isinstance(model, nn.Module):
        device = next(model.parameters()).device
    # The weights are fixed while sampling: cast them to bf16/fp16 once for the whole loop.
    weight_casts = model.reuse_weight_casts() if isinstance(model, AutocastModel) else contextlib.nullcontext()
    if guidance_scale != 1.0:
        model = GuidedModel(model, guidance_scale)
    kwargs = dict(
        noise=noise,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        device=device,
        progress=progress,
    )
    with weight_casts:
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model, shape, noise_fn=noise_fn, **kwargs)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(model, shape, eta=eta, noise_fn=noise_fn, **kwargs)
        return dpm_solver_pp_sample_loop(model, diffusion, shape, **kwargs)


def find_unet(model: nn.Module) -> nn.Module:
    """The UNet inside wrappers (autocast, torch.compile, DistributedDataParallel)."""
    seen = model
    for attr in ("inner", "_orig_mod", "module") * 3:
        seen = getattr(seen, attr, seen)
    return seen


class GuidedModel(nn.Module):
    """A model whose eps output is guided by the representation: one forward over [feat; null].

    The variance channels (learned-variance models) are the conditional ones. Other keyword
    arguments (e.g. class labels `y`) are duplicated for the batched forward.
    """

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        unet = find_unet(model)
        if not getattr(unet, "supports_guidance", False):
            raise ValueError(
                f"`guidance_scale` {scale} needs a model trained with `feat_drop_prob` > 0 (it has a "
                "learned null representation); this one was not. Use `guidance_scale` 1."
            )
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, feat: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        n, channels = x.shape[0], x.shape[1]
        null = self.unet.null_representation(n).detach()
        if self.scale == 0 or feat is None:
            return self.model(x, t, feat=null.to(x.device), **kwargs)
        both = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out = self.model(
            torch.cat([x, x]), torch.cat([t, t]), feat=torch.cat([feat, null.to(feat)]), **both
        )
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :channels] + self.scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)


def respace_for_sampler(diffusion: GaussianDiffusion, sampler: str, steps: int) -> SpacedDiffusion:
    """The same process with `steps` steps chosen for the sampler (see the module docstring)."""
    base_betas = getattr(diffusion, "base_betas", diffusion.betas)
    num_base = len(base_betas)
    if not 1 <= steps <= num_base:
        raise UsageError(f"`steps` must be between 1 and {num_base}, got {steps}")
    if sampler == "dpm++":
        timesteps = logsnr_timesteps(np.cumprod(1.0 - base_betas), steps)
    else:
        timesteps = space_timesteps(num_base, str(steps))
    return SpacedDiffusion(
        use_timesteps=timesteps,
        betas=base_betas,
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
    )


# The noisy end of the log-SNR range the steps are spread over (log(abar / (1 - abar))): the
# 1000-step linear schedule ends at -10.1, but the cosine one clips its last beta at 0.999, which
# drops log-SNR from -12.9 to -19.8 in its final step. Spreading steps evenly down to -19.8 would
# spend several on that single interval, where the signal is under 1% of x_t. DPM-Solver's
# authors clip the same end (half log-SNR -5.1 in their diffusers scheduler): the steps are spread
# down to here, and the first step from x_T covers the rest.
MIN_LOG_SNR = -10.2


def logsnr_timesteps(alphas_cumprod: np.ndarray, steps: int, min_log_snr: float = MIN_LOG_SNR) -> list[int]:
    """Exactly `steps` distinct timesteps (0 and the last one included), as evenly spaced in log-SNR
    between the schedule's start and max(its end, `min_log_snr`) as the discrete schedule allows.
    """
    log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
    last = len(log_snr) - 1
    if not 1 <= steps <= last + 1:
        raise UsageError(f"`steps` must be between 1 and {last + 1}, got {steps}")
    targets = np.linspace(log_snr[0], max(log_snr[-1], min_log_snr), steps)
    chosen = [int(np.argmin(np.abs(log_snr - target))) for target in targets]
    chosen[0], chosen[-1] = 0, last  # sampling starts from x_T, at the last timestep
    # Where rounding collides (log-SNR steps finer than the schedule's), push later steps along,
    # then pull them back from the end, so the count stays exact and the order strict.
    for k in range(1, steps):
        chosen[k] = max(chosen[k], chosen[k - 1] + 1)
    upper = last
    for k in reversed(range(steps)):
        chosen[k] = min(chosen[k], upper)
        upper = chosen[k] - 1
    return chosen


@torch.no_grad()
def dpm_solver_pp_sample_loop(
    model: Callable[..., torch.Tensor],
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022), one model call per step of `diffusion`.

    In terms of alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR
    lambda_t = log(alpha_t / sigma_t), a step from s to t with h = lambda_t - lambda_s is

        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,

    with D the x_0 prediction at s (first order, the first step: this is DDIM) or the
    second-order extrapolation (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h. The last update
    is first order (extrapolating over the final, longest log-SNR interval is unstable), and the
    last model call returns its x_0 prediction, as DDIM does.
    """
    if device is None:
        device = next(model.parameters()).device
    x = noise if noise is not None else torch.randn(*shape, device=device)
    abar = torch.from_numpy(diffusion.alphas_cumprod).to(device=device, dtype=torch.float64)
    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        indices = tqdm(indices, desc="sampling (dpm++)", unit="step")

    def lam(a: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    prev_x0 = prev_h = None
    for i in indices:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x0 = diffusion.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )["pred_xstart"]
        if i == 0:
            return x0
        a_s, a_t = abar[i], abar[i - 1]
        h = lam(a_t) - lam(a_s)
        if prev_x0 is None or i == 1:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        sigma_ratio = torch.sqrt((1 - a_t) / (1 - a_s))
        coef = -torch.sqrt(a_t) * torch.expm1(-h)
        x = (sigma_ratio.float() * x + coef.float() * d).to(x.dtype)
        prev_x0, prev_h = x0, h
    return x

