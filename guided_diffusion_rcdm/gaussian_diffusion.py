"""Gaussian diffusion: noise schedules, the forward process, the model's reverse process, sampling
(DDPM ancestral and DDIM) and the training losses.

The maths follows Ho et al. (2020), Nichol & Dhariwal (2021) (learned variance, cosine schedule,
hybrid loss) and Song et al. (2021) (DDIM), as implemented by guided-diffusion, whose numbers
this module reproduces. Schedule constants are computed in float64 with numpy and cast to the
input's precision when gathered for a batch of timesteps.

Conventions: `t` is a [N] integer tensor of timestep indices in [0, num_timesteps); 0 is the last
denoising step. Images are [N x C x H x W] in [-1, 1].
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """A named beta schedule ("linear" or "cosine") of `num_diffusion_timesteps` steps.

    The linear schedule of Ho et al. is rescaled so that any number of steps spans the same noise
    range as 1000 steps. Schedules stay fixed once published: checkpoints depend on them.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be positive, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 >= 1:
            # The schedule is stretched to span 1000 steps' noise; too few steps push beta to 1.
            raise ValueError(
                f"diffusion_steps={num_diffusion_timesteps} is too few for the linear noise_schedule "
                "(its last beta would reach 1): use more than 20 steps or the cosine schedule"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise_schedule {schedule_name!r}: choose one of {', '.join(BETA_SCHEDULES)}"
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a cumulative-signal function `alpha_bar(t)`, t in [0, 1], into betas.

    :param max_beta: upper bound on each beta, avoiding a singularity at the end of the chain.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the model predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained.

    LEARNED_RANGE: the model outputs v in [-1, 1] interpolating (in log space) between the
    posterior variance (FIXED_SMALL) and beta_t (FIXED_LARGE).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE, with the VB term rescaled to the number of steps
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound, scaled to estimate the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


ModelKwargs = dict[str, Any] | None
NoiseFn = Callable[[torch.Tensor], torch.Tensor] | None  # draws a sampling step's noise, like x


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion model over `len(betas)` steps.

    :param betas: 1-D array of betas, one per step (index 0 is the first noising step).
    :param model_mean_type: what the model outputs.
    :param model_var_type: how the variance is obtained.
    :param loss_type: the training loss.
    :param rescale_timesteps: pass float timesteps scaled to [0, 1000) to the model, whatever the
        number of steps.
    """

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0, so its log takes the value at t = 1 there.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # ----------------------------------------------------------------- schedule tables

    # Tables derived from the schedule, computed (in float64, like the others) on first use.
    _DERIVED_TABLES: dict[str, Callable[["GaussianDiffusion"], np.ndarray]] = {
        "one_minus_alphas_cumprod": lambda d: 1.0 - d.alphas_cumprod,
        "log_betas": lambda d: np.log(d.betas),
        "recip_posterior_mean_coef1": lambda d: 1.0 / d.posterior_mean_coef1,
        "posterior_mean_coef2_over_coef1": lambda d: d.posterior_mean_coef2 / d.posterior_mean_coef1,
        # beta_t, but the posterior variance at t = 0 for a better decoder likelihood.
        "fixed_large_variance": lambda d: np.append(d.posterior_variance[1], d.betas[1:]),
        "fixed_large_log_variance": lambda d: np.log(np.append(d.posterior_variance[1], d.betas[1:])),
    }

    def schedule_table(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The schedule array `name` (e.g. "alphas_cumprod") as a float64 tensor on `device`.

        Each table is copied to a device once and kept: a step of sampling or training gathers from
        it without a host-to-device copy (a copy from host memory waits for the GPU to catch up).
        """
        device = torch.device(device)
        tables = self.__dict__.setdefault("_device_tables", {})
        key = (name, device)
        table = tables.get(key)
        if table is None:
            derive = self._DERIVED_TABLES.get(name)
            array = derive(self) if derive is not None else getattr(self, name)
            table = tables[key] = torch.from_numpy(np.asarray(array)).to(device)
        return table

    def _gather(self, name: str, t: torch.Tensor, broadcast_shape) -> torch.Tensor:
        """`name[t]` as float32 on t's device, broadcastable to `broadcast_shape`
        (what `_extract_into_tensor` computes, from the cached table)."""
        return _broadcast(self.schedule_table(name, t.device)[t].float(), broadcast_shape)

    # ----------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0), each of x_start's shape."""
        mean = self._gather("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._gather("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._gather("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): `x_start` noised for t+1 steps (with `noise` if given)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        posterior_mean = (
            self._gather("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._gather("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._gather("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._gather("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: ModelKwargs = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: called as `model(x, t, **model_kwargs)`.
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with `mean`, `variance`, `log_variance`, `pred_xstart`, all of x's shape
            (`variance` may broadcast for fixed variances).
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        model_output, model_variance, model_log_variance = self._split_variance(model_output, x, t)

        def process_xstart(pred: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _split_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Separate the mean output from the variance; returns (output, variance, log_variance)."""
        B, C = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"a learned-variance diffusion needs {C * 2} output channels, got "
                    f"{tuple(model_output.shape)} (is learn_sigma set as for the model?)"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._gather("posterior_log_variance_clipped", t, x.shape)
                max_log = self._gather("log_betas", t, x.shape)
                frac = (model_var_values + 1) / 2  # [-1, 1] -> [min_var, max_var]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            return model_output, torch.exp(model_log_variance), model_log_variance

        if self.model_var_type == ModelVarType.FIXED_LARGE:
            variance, log_variance = "fixed_large_variance", "fixed_large_log_variance"
        else:
            variance, log_variance = "posterior_variance", "posterior_log_variance_clipped"
        return model_output, self._gather(variance, t, x.shape), self._gather(log_variance, t, x.shape)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        assert x_t.shape == xprev.shape
        return (  # (xprev - coef2 * x_t) / coef1
            self._gather("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._gather("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ----------------------------------------------------------------- guidance by gradients

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs: ModelKwargs = None):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al., 2015)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs: ModelKwargs = None):
        """p_mean_variance's output with the score conditioned by `cond_fn` (Song et al., 2021)."""
        alpha_bar = self._gather("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(
            x, self._scale_timesteps(t), **(model_kwargs or {})
        )
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ----------------------------------------------------------------- DDPM sampling

    def p_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        noise_fn: NoiseFn = None,
    ) -> dict[str, torch.Tensor]:
        """Sample x_{t-1} from the model. Returns `sample` and `pred_xstart`.

        `noise_fn(x)`, if given, draws the step's noise instead of `torch.randn_like(x)` (for
        example the same noise for several rows of a batch).
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn_like(x) if noise_fn is None else noise_fn(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        device=None,
        progress: bool = False,
        noise_fn: NoiseFn = None,
    ) -> torch.Tensor:
        """Generate samples of `shape` (N, C, H, W), starting from `noise` if given (and drawing
        each step's noise with `noise_fn`, see `p_sample`)."""
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            noise_fn=noise_fn,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        device=None,
        progress: bool = False,
        noise_fn: NoiseFn = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like `p_sample_loop`, yielding each step's `p_sample` output."""
        yield from self._sample_loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            dict(
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                noise_fn=noise_fn,
            ),
        )

    def _sample_loop(self, step_fn, model, shape, noise, device, progress, step_kwargs):
        if device is None:
            device = next(model.parameters()).device
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            indices = tqdm(indices, desc="sampling", unit="step")
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # no host copy
            with torch.no_grad():
                out = step_fn(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    # ----------------------------------------------------------------- DDIM sampling

    def ddim_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> dict[str, torch.Tensor]:
        """Sample x_{t-1} with DDIM (eta = 0: deterministic). Same usage as `p_sample`."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 in case the model predicts x_0 or x_{t-1}.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._gather("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._gather("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = torch.randn_like(x) if noise_fn is None else noise_fn(x)
        # Equation 12 of Song et al. (2021).
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: ModelKwargs = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """x_{t+1} from x_t by the deterministic DDIM ODE run forwards (encoding an image)."""
        if eta != 0.0:
            raise ValueError("the reverse ODE is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._gather("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> torch.Tensor:
        """Generate samples with DDIM. Same usage as `p_sample_loop`."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            noise_fn=noise_fn,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: ModelKwargs = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like `ddim_sample_loop`, yielding each step's `ddim_sample` output."""
        yield from self._sample_loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            dict(
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                eta=eta,
                noise_fn=noise_fn,
            ),
        )

    # ----------------------------------------------------------------- losses and likelihood

    def _vb_terms_bpd(
        self, model, x_start, x_t, t, clip_denoised: bool = True, model_kwargs: ModelKwargs = None
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL at t = 0.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: ModelKwargs = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for one timestep per example.

        :return: dict of [N] tensors: `loss`, and with an MSE loss `mse` (plus `vb` when the
            variance is learned: the VB term trains the variance without moving the mean).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms: dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                assert model_output.shape == (B, C * 2, *x_t.shape[2:])
                model_output, model_var_values = torch.split(model_output, C, dim=1)
                # The VB term learns the variance; the mean is frozen so it only follows the MSE.
                frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # 1/1000 keeps the VB term from overwhelming the MSE term.
                    terms["vb"] *= self.num_timesteps / 1000.0

            target = {
                ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(
                    x_start=x_start, x_t=x_t, t=t
                )[0],
                ModelMeanType.START_X: lambda: x_start,
                ModelMeanType.EPSILON: lambda: noise,
            }[self.model_mean_type]()
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: the bound's constant prior term."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self, model, x_start: torch.Tensor, clip_denoised: bool = True, model_kwargs: ModelKwargs = None
    ) -> dict[str, torch.Tensor]:
        """The full variational bound in bits per dimension, term by term.

        :return: dict with `total_bpd` [N], `prior_bpd` [N], `vb` [N x T], `xstart_mse` [N x T]
            and `mse` [N x T] (eps MSE).
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = torch.full((batch_size,), t, device=device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """Gather `arr[timesteps]` as float32 on the timesteps' device, broadcastable to `broadcast_shape`.

    Copies `arr` to the device at every call; the diffusion's own tables go through
    `GaussianDiffusion.schedule_table`, which copies each once.
    """
    return _broadcast(torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float(), broadcast_shape)


def _broadcast(res: torch.Tensor, broadcast_shape) -> torch.Tensor:
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
