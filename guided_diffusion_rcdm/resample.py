"""Schedule samplers: which timesteps a training batch uses, and with what importance weights.

`uniform` draws timesteps uniformly. `loss-second-moment` (Nichol & Dhariwal, 2021) draws them in
proportion to the root mean square of each timestep's recent losses, reducing the variance of the
variational-bound objective; its loss history is shared across ranks when torch.distributed is up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """A `ScheduleSampler` by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"unknown schedule_sampler {name!r}: choose one of {', '.join(SCHEDULE_SAMPLERS)}"
    )


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights that keep the objective unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, one per diffusion step."""

    def sample(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch_size` timesteps.

        :return: (timesteps [N] long, weights [N] float) where weight = 1 / (T * p(t)).
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1 / (len(p) * p[indices_np])
        return _to_device(indices_np.astype(np.int64), device), _to_device(weights_np.astype(np.float32), device)


def _to_device(array: np.ndarray, device) -> torch.Tensor:
    """`array` on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts to the losses it is told about."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's losses; with torch.distributed up, every rank records all ranks'.

        Call it on every rank with the same timing, so all ranks keep identical state.

        :param local_ts: [N] timesteps used on this rank.
        :param local_losses: [N] their losses.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world_size = dist.get_world_size()
            # Ranks may have different batch sizes: gather sizes first, then pad to the largest.
            batch_sizes = [torch.tensor([0], dtype=torch.int32, device=local_ts.device) for _ in range(world_size)]
            dist.all_gather(
                batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=local_ts.device)
            )
            sizes = [int(x.item()) for x in batch_sizes]
            max_bs = max(sizes)
            timestep_batches = [torch.zeros(max_bs).to(local_ts) for _ in sizes]
            loss_batches = [torch.zeros(max_bs).to(local_losses) for _ in sizes]
            dist.all_gather(timestep_batches, _pad(local_ts, max_bs))
            dist.all_gather(loss_batches, _pad(local_losses, max_bs))
            timesteps = [int(x) for y, bs in zip(timestep_batches, sizes) for x in y[:bs].tolist()]
            losses = [float(x) for y, bs in zip(loss_batches, sizes) for x in y[:bs].tolist()]
        else:
            timesteps = [int(x) for x in local_ts.tolist()]
            losses = [float(x) for x in local_losses.tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Update the reweighting from the losses of every rank (same call on every rank)."""


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=x.dtype, device=x.device)
    out[: len(x)] = x.detach()
    return out


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t with probability proportional to sqrt(E[loss_t^2]) over the last losses seen.

    Uniform until every timestep has `history_per_term` losses; `uniform_prob` of the mass always
    stays uniform so no timestep starves.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        """The loss history, so a resumed run keeps its importance weights."""
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self._loss_history = np.asarray(state["loss_history"], dtype=np.float64).copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()
