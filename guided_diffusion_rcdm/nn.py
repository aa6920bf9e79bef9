"""Small building blocks shared by the UNet and the diffusion.

Public names follow the original guided-diffusion `nn` module (users import them): `conv_nd`,
`linear`, `avg_pool_nd`, `zero_module`, `scale_module`, `normalization`, `timestep_embedding`,
`checkpoint`, `mean_flat`, `update_ema`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

NUM_NORM_GROUPS = 32


class SiLU(nn.SiLU):
    """Kept for code that imports `nn.SiLU` from here; identical to `torch.nn.SiLU`."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (stable under fp16/bf16).

    A float32 input takes the original path. A bf16/fp16 input goes to the kernel as it is: the
    kernels accumulate the statistics in float32 themselves, and skipping the round trip through a
    float32 copy saves two passes over the activations.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps).type(x.dtype)
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` and return it (residual branches start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of `module` and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: GroupNorm with 32 groups, computed in float32."""
    if channels % NUM_NORM_GROUPS:
        raise ValueError(
            f"GroupNorm({NUM_NORM_GROUPS}) cannot normalise {channels} channels: every channel "
            f"count (num_channels x channel_mult) must be a multiple of {NUM_NORM_GROUPS}"
        )
    return GroupNorm32(NUM_NORM_GROUPS, channels)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embeddings.

    :param timesteps: [N] tensor of (possibly fractional) timesteps, one per batch element.
    :param dim: embedding width.
    :param max_period: the lowest frequency of the embedding.
    :return: [N x dim] tensor, cosines first then sines (zero-padded when `dim` is odd).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(
    func: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Iterable[torch.Tensor],
    flag: bool,
) -> torch.Tensor:
    """Run `func(*inputs)`, recomputing activations in the backward pass when `flag` is set.

    Trades compute for memory. Uses torch's non-reentrant checkpointing, which tracks `params`
    by itself (the argument is kept for the original's signature).
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


@torch.no_grad()
def update_ema(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], rate: float = 0.99
) -> None:
    """Move `target_params` towards `source_params` by an exponential moving average."""
    targets = list(target_params)
    sources = [s.detach().to(t.dtype) for t, s in zip(targets, source_params)]
    torch._foreach_lerp_(targets, sources, 1.0 - rate)
