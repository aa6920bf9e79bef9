"""The representation-conditioned UNet of RCDM.

The UNet of Dhariwal & Nichol (2021): residual blocks with optional up/down-sampling and FiLM-like
scale-shift normalisation, multi-head self-attention at chosen resolutions, and a sinusoidal
timestep embedding. RCDM adds one thing: with `feat_cond=True`, a linear layer `ssl_emb` maps the
frozen encoder's representation (`feat`, [N x ssl_dim]) to the embedding width, and its output is
added to the timestep embedding, so every ResBlock sees the representation through the same
scale-shift path as the timestep. Parameter names match the original exactly, so the published
checkpoints load with `strict=True`.

Two options go beyond the published architecture. `norm_style="cbn"` is the paper's conditional
batch norm: the ResBlocks' GroupNorms become batch norms without affine parameters whose per-channel
gain and bias are linear functions of the representation (after a shared projection to
`shared_dim`), and the representation enters only there. `feat_drop_prob > 0` adds a learned null
representation that replaces the real one for that fraction of training examples, so the model also
learns the unconditional distribution and can be sampled with representation guidance.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import avg_pool_nd, checkpoint, conv_nd, linear, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep (and representation) embedding as a second input,
    and the conditional-norm input (None unless `norm_style="cbn"`) as a third."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence that hands the embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, cond) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine parameters, then a gain and bias computed from a condition.

    `out = BN(x) * (1 + gain(cond)) + bias(cond)` per channel (Brock et al., 2019). The gain and bias
    layers start at zero, so the block starts as plain batch norm. Statistics are computed in float32.

    :param channels: channels of x ([N x C x ...]).
    :param cond_dim: width of the condition ([N x cond_dim]).
    """

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)
        self.gain = zero_module(nn.Linear(cond_dim, channels))
        self.bias = zero_module(nn.Linear(cond_dim, channels))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond is None:
            raise ValueError("a conditional batch norm (norm_style='cbn') model needs a representation")
        shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
        gain = self.gain(cond.float()).reshape(shape)
        bias = self.bias(cond.float()).reshape(shape)
        h = self.bn(x.float().reshape(x.shape[0], x.shape[1], -1, 1))  # any spatial rank as 2D
        return (h.reshape(x.shape) * (1 + gain) + bias).type(x.dtype)


def _norm(layer: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return layer(x, cond) if isinstance(layer, ConditionalBatchNorm) else layer(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    For 3D signals only the inner two dimensions are upsampled.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the embedding, optionally changing channels or resolution.

    :param channels: input channels.
    :param emb_channels: width of the timestep/representation embedding.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output channels (default: `channels`).
    :param use_conv: with a channel change, use a 3x3 instead of a 1x1 convolution on the skip path.
    :param use_scale_shift_norm: apply the embedding as `norm(h) * (1 + scale) + shift` (FiLM)
        instead of adding it before the norm.
    :param dims: 1, 2 or 3 for 1D, 2D or 3D signals.
    :param use_checkpoint: recompute activations in the backward pass to save memory.
    :param up: upsample by 2 inside the block.
    :param down: downsample by 2 inside the block.
    :param cbn_dim: if set, conditional batch norms driven by a [N x cbn_dim] condition replace
        the two GroupNorms.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        cbn_dim: int | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        def norm(ch: int) -> nn.Module:
            return normalization(ch) if cbn_dim is None else ConditionalBatchNorm(ch, cbn_dim)

        self.in_layers = nn.Sequential(
            norm(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            norm(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [N x C x ...] features. :param emb: [N x emb_channels].
        :param cond: [N x cbn_dim] for conditional batch norm, else None. :return: [N x C' x ...]."""
        return checkpoint(self._forward, (x, emb, cond), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        in_norm, in_act, in_conv = self.in_layers
        h = in_act(_norm(in_norm, x, cond))
        if self.updown:
            # Resample between the activation and the convolution, on both paths.
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(_norm(out_norm, h, cond) * (1 + scale) + shift)
        else:
            h = out_rest(_norm(out_norm, h + emb_out, cond))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    :param num_heads: number of heads, used when `num_head_channels` is -1.
    :param num_head_channels: if not -1, a fixed width per head (heads = channels // width).
    :param use_new_attention_order: split q/k/v before heads (`QKVAttention`) instead of heads
        before q/k/v (`QKVAttentionLegacy`, what the published checkpoints use).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"{channels} attention channels cannot be split into num_heads={num_heads}")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} attention channels are not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if _use_fused(self.attention.fused, x):
            return x + self._fused_residual(x)
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)

    def _fused_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch in token-major layout ([N x T x C]), for the fused kernel.

        The 1x1 convolutions become linear maps over tokens, so q, k and v come out with their
        channels innermost, as `scaled_dot_product_attention` wants them; for a channels-last
        input no tensor is transposed in memory. Same maths as the channel-major path.
        """
        b, c, *spatial = x.shape
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        out = self.attention.attend_tokens(qkv)
        h = F.linear(out, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return h.transpose(1, 2).reshape(b, c, *spatial)


def _use_fused(fused: bool | None, x: torch.Tensor) -> bool:
    """Whether to take the fused attention kernel: as forced, else only in reduced precision (fp16
    or bf16 tensors, or under autocast), so that the fp32 path stays the original's arithmetic."""
    if fused is not None:
        return fused
    return x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool | None) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, for [B x ch x T] tensors.

    The einsum path is the original's arithmetic (q and k each scaled by ch^-1/4, softmax in
    float32). The fused path (`scaled_dot_product_attention`) is the same maths in one kernel.
    """
    if _use_fused(fused, q):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


def _attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused attention over [N x T x H x C] views; returns [N x T x (H * C)]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class _QKVAttentionBase(nn.Module):
    """What both head layouts share: the head count and the fused-kernel switch.

    `fused`: True/False forces the fused kernel on/off; None (default) uses it in bf16/fp16 only.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.fused: bool | None = None


class QKVAttentionLegacy(_QKVAttentionBase):
    """QKV attention on an [N x (H * 3 * C) x T] tensor: heads first, then q, k, v."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """:return: [N x (H * C) x T]."""
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attend(q, k, v, self.fused).reshape(bs, -1, length)

    def attend_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """The fused kernel on token-major input: [N x T x (H * 3 * C)] -> [N x T x (H * C)]."""
        bs, length, width = qkv.shape
        q, k, v = qkv.reshape(bs, length, self.n_heads, 3, width // (3 * self.n_heads)).unbind(3)
        return _attend_heads(q, k, v)


class QKVAttention(_QKVAttentionBase):
    """QKV attention on an [N x (3 * H * C) x T] tensor: q, k, v first, then heads."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """:return: [N x (H * C) x T]."""
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _attend(q, k, v, self.fused).reshape(bs, -1, length)

    def attend_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """The fused kernel on token-major input: [N x T x (3 * H * C)] -> [N x T x (H * C)]."""
        bs, length, width = qkv.shape
        q, k, v = qkv.reshape(bs, length, 3, self.n_heads, width // (3 * self.n_heads)).unbind(2)
        return _attend_heads(q, k, v)


class UNetModel(nn.Module):
    """The full UNet with attention, timestep embedding and (RCDM) representation conditioning.

    :param image_size: input resolution (recorded; the network itself is resolution-agnostic).
    :param in_channels: channels of the input image.
    :param model_channels: base channel count.
    :param out_channels: output channels (6 with a learned variance: eps and the variance value).
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsampling rates (1, 2, 4, ...) at which to add attention.
    :param dropout: dropout rate in the ResBlocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: use learned convolutions for up/downsampling (when not `resblock_updown`).
    :param dims: 1, 2 or 3 for 1D, 2D or 3D signals.
    :param num_classes: if set, class-conditional with that many classes (input `y`).
    :param use_checkpoint: gradient checkpointing in every ResBlock and AttentionBlock.
    :param use_fp16: the torso (input, middle, output blocks) is meant to run in float16 once
        `convert_to_fp16()` is called.
    :param num_heads: attention heads (when `num_head_channels` is -1).
    :param num_head_channels: fixed width per attention head, overriding `num_heads`.
    :param num_heads_upsample: heads in the upsampling half (-1: same as `num_heads`).
    :param use_scale_shift_norm: FiLM-like conditioning in the ResBlocks.
    :param resblock_updown: ResBlocks with built-in resampling instead of Upsample/Downsample.
    :param use_new_attention_order: split q/k/v before heads.
    :param feat_cond: condition on a representation `feat` through `ssl_emb`.
    :param ssl_dim: width of the representation.
    :param norm_style: "gn" (GroupNorm, the published architecture) or "cbn" (conditional batch
        norm driven by the representation; needs `feat_cond`).
    :param shared_dim: with "cbn", width of the shared projection of the representation that every
        conditional norm reads (0: each reads the representation itself).
    :param feat_drop_prob: in training, the fraction of examples whose representation is replaced
        by a learned null representation (> 0 enables representation guidance at sampling time).
    :param instance_cond: the original's name for `feat_cond` (accepted for old call sites).
    :param G_shared: accepted for the original's signature; has no effect.
    :param pretrained: accepted for the original's signature; has no effect.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        feat_cond: bool = False,
        ssl_dim: int = 2048,
        norm_style: str = "gn",
        shared_dim: int = 128,
        feat_drop_prob: float = 0.0,
        instance_cond: bool | None = None,
        G_shared: bool = False,
        pretrained: bool = False,
    ):
        super().__init__()
        del G_shared, pretrained  # no effect; kept so the original's call sites still work
        if instance_cond is not None:
            feat_cond = feat_cond or instance_cond
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        # The torso runs in float32 unless the caller converts it with `convert_to_fp16()` (the
        # original's API, kept for its users); this project's training and sampling use autocast
        # (`precision.py`) instead and never call it.
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.feat_cond = feat_cond
        self.ssl_dim = ssl_dim
        if norm_style not in ("gn", "cbn"):
            raise ValueError(f"unknown norm_style {norm_style!r}: use 'gn' or 'cbn'")
        if (norm_style == "cbn" or feat_drop_prob > 0) and not feat_cond:
            raise ValueError("norm_style='cbn' and feat_drop_prob > 0 need a representation (feat_cond)")
        if not 0.0 <= feat_drop_prob < 1.0:
            raise ValueError(f"feat_drop_prob must be in [0, 1), got {feat_drop_prob}")
        self.norm_style = norm_style
        self.feat_drop_prob = feat_drop_prob

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        cbn_dim = None
        if feat_cond and norm_style == "gn":
            # The representation joins the timestep embedding (the published architecture).
            self.ssl_emb = nn.Linear(ssl_dim, time_embed_dim)
        elif norm_style == "cbn":
            # The representation drives the conditional norms, through one shared projection.
            if shared_dim > 0:
                self.shared = nn.Linear(ssl_dim, shared_dim)
            cbn_dim = shared_dim if shared_dim > 0 else ssl_dim
        if feat_drop_prob > 0:
            self.null_feat = nn.Parameter(torch.zeros(ssl_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int | None = None, **kwargs) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                cbn_dim=cbn_dim,
                **kwargs,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch), attention(ch, num_heads), res_block(ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def set_fused_attention(self, fused: bool | None) -> None:
        """Force the fused attention kernel on (True) or off (False); None: only in bf16/fp16."""
        for module in self.modules():
            if isinstance(module, _QKVAttentionBase):
                module.fused = fused

    def convert_to_fp16(self) -> None:
        """Store the torso's convolutions in float16."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16`."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f32)
        self.dtype = torch.float32

    @property
    def supports_guidance(self) -> bool:
        """Whether the model has a learned null representation (trained with feat_drop_prob > 0)."""
        return hasattr(self, "null_feat")

    def null_representation(self, batch_size: int) -> torch.Tensor:
        """[batch_size x ssl_dim] copies of the learned null representation."""
        if not self.supports_guidance:
            raise ValueError(
                "this model has no null representation: it was not trained with `feat_drop_prob` > 0, "
                "so representation guidance (`guidance_scale` other than 1) is not available"
            )
        return self.null_feat.unsqueeze(0).expand(batch_size, -1)

    def _representation(self, feat: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The representation the network sees: checked, with null-representation dropout in training."""
        if feat is None:
            return self.null_representation(batch_size) if self.supports_guidance else None
        if not self.feat_cond:
            raise ValueError("feat was given but the model was built without feat_cond")
        if feat.dim() != 2 or feat.shape[1] != self.ssl_dim:
            raise ValueError(
                f"feat has shape {tuple(feat.shape)}; this model expects [N, {self.ssl_dim}] "
                f"(ssl_dim={self.ssl_dim})"
            )
        if self.training and self.feat_drop_prob > 0:
            drop = torch.rand(feat.shape[0], device=feat.device) < self.feat_drop_prob
            feat = torch.where(drop[:, None], self.null_representation(feat.shape[0]).to(feat.dtype), feat)
        return feat

    def embed(
        self, timesteps: torch.Tensor, y: torch.Tensor | None = None, feat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The [N x 4*model_channels] embedding every ResBlock receives: time (+ class) (+ feat)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y is None or y.shape != (timesteps.shape[0],):
                raise ValueError("a class-conditional model needs labels y of shape [N]")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("y was given but the model is not class-conditional (class_cond=False)")
        if feat is not None and self.norm_style == "gn":
            emb = emb + self.ssl_emb(feat.to(self.ssl_emb.weight.dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        feat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the model.

        :param x: [N x C x H x W] noisy images.
        :param timesteps: [N] timesteps.
        :param y: [N] class labels, for a class-conditional model.
        :param feat: [N x ssl_dim] representations, for a `feat_cond` model (None: unconditional,
            through the null representation when the model has one).
        :return: [N x out_channels x H x W].
        """
        feat = self._representation(feat, x.shape[0])
        emb = self.embed(timesteps, y=y, feat=feat)
        cond = None
        if self.norm_style == "cbn":
            if feat is None:
                raise ValueError("a conditional batch norm (norm_style='cbn') model needs feat")
            cond = self.shared(feat.float()) if hasattr(self, "shared") else feat.float()
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, cond)
            hs.append(h)
        h = self.middle_block(h, emb, cond)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(h.type(x.dtype))
