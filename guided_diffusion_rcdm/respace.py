"""Timestep respacing: run a model trained on T steps with a subset of them.

`space_timesteps(1000, "100")` keeps 100 evenly strided steps, `"ddim25"` the fixed stride DDIM
uses, `"10,20,30"` splits the chain into three equal sections with 10, 20 and 30 steps each.
`SpacedDiffusion` is a `GaussianDiffusion` over the kept steps whose betas reproduce the original
cumulative noise levels; it maps its step indices back to the original timesteps before calling the
model, so the model always sees the timesteps it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The set of original timesteps to keep.

    :param num_timesteps: steps in the original process.
    :param section_counts: a list of step counts per equal section of the chain, or a string of
        comma-separated counts, or `"ddimN"` for N steps at a fixed integer stride as in DDIM.
    :raises ValueError: with the reason, for counts that cannot be honoured.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired_count = int(text[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"invalid timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N"
                ) from None
            if not 1 <= desired_count <= num_timesteps:
                raise ValueError(
                    f"timestep_respacing {section_counts!r} asks for {desired_count} steps out of "
                    f"{num_timesteps}"
                )
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            if desired_count == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly "
                f"{desired_count} steps out of {num_timesteps}; use a plain count such as "
                f"'{desired_count}' instead"
            )
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid timestep_respacing {section_counts!r}: expected a count ('100'), "
                "counts per section ('10,20,30') or 'ddimN'"
            ) from None

    if not section_counts or any(c < 0 for c in section_counts):
        raise ValueError(f"invalid timestep_respacing {section_counts!r}")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    if size_per == 0:
        raise ValueError(
            f"timestep_respacing has {len(section_counts)} sections, more than the {num_timesteps} steps"
        )
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"timestep_respacing: cannot take {section_count} steps from a section of {size} steps"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that skips steps of a base process.

    :param use_timesteps: the original timesteps to keep (e.g. from `space_timesteps`).
    :param kwargs: the base `GaussianDiffusion`'s arguments (its full `betas`).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: list[int] = []
        self.original_num_steps = len(kwargs["betas"])
        self.base_betas = np.array(kwargs["betas"], dtype=np.float64)  # to respace again later

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        if not self.timestep_map:
            raise ValueError("timestep respacing kept no timesteps")
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps, self.schedule_table
        )

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model does the scaling, after mapping to the original timesteps.
        return t


class _WrappedModel:
    """Calls the model with original timesteps in place of the respaced indices."""

    def __init__(
        self,
        model,
        timestep_map: list[int],
        rescale_timesteps: bool,
        original_num_steps: int,
        schedule_table: Callable[[str, torch.device], torch.Tensor] | None = None,
    ):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self.schedule_table = schedule_table  # the diffusion's per-device tables (the map among them)

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.schedule_table is not None:
            map_tensor = self.schedule_table("timestep_map", ts.device)
        else:
            map_tensor = torch.tensor(self.timestep_map, device=ts.device)
        new_ts = map_tensor[ts].to(ts.dtype)
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
