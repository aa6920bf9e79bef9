"""Configuration as data: `ModelConfig` (the UNet and its diffusion) and `SamplingConfig` (how
samples are drawn).

`ModelConfig` is the one declaration of the model and diffusion settings. Each field is a flag of
the same name on every command (its help and accepted range are the field's metadata), a checkpoint
records `to_record()` and is rebuilt with `from_record()`, and `build()` gives the UNet and the
diffusion:

    >>> from guided_diffusion_rcdm import ModelConfig
    >>> config = ModelConfig.preset("published_128", ssl_dim=768)   # the paper's 128x128 UNet
    >>> model, diffusion = config.build()

Presets (`PRESETS`, small factories taking overrides): `published_128` (the published RCDMs:
guided-diffusion's ImageNet 128x128 UNet, the README's `$MODEL_FLAGS_128`), `rcdm_256` (guided-
diffusion's 256x256 UNet, for an RCDM at 256 px warm-started from it), `quickstart` (a small UNet that
trains in minutes on a CPU) and `tiny` (a few hundred thousand weights, for tests).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: from `low` to `high` (None: unbounded), both ends
    included unless `low_open`/`high_open`, plus the special values in `also` (e.g. -1: off).
    NaN and the infinities are in no range. A text setting with a range (e.g. `ema_rate`) is a
    comma-separated list whose every number must be in it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {num(self.low)}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {num(self.high)}"
        if lo and hi:
            text = (f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        else:
            text = lo or hi or "any finite number"
        return " or ".join([*map(num, self.also), text])

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def problem(self, value: Any) -> str | None:
        """Why `value` (a number, or for a text setting a comma-separated list of numbers) is not
        accepted; None when it is."""
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
            try:
                numbers = [float(v) for v in items]
            except ValueError:
                return f"{value!r} is not a comma-separated list of numbers in {self}"
            bad = [v for v, x in zip(items, numbers) if not self.contains(x)]
            return f"{bad[0]} is outside the accepted range {self}" if bad else None
        if value is None or isinstance(value, bool):
            return None
        return None if self.contains(value) else f"{value} is outside the accepted range {self}"


POSITIVE = Range(1)  # counts of at least one
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # rates in [0, 1)
OFF_OR_POSITIVE = Range(1, also=(-1,))  # -1: off


@dataclass(frozen=True)
class ModelFlag:
    """One model or diffusion flag: its default (the original's), what it means, and which part
    of `create_model_and_diffusion` it builds ("model": the UNet, "diffusion": the schedule)."""

    default: Any
    help: str
    part: str = "model"
    range: Range | None = None  # the values a numeric flag accepts (checked when parsing flags)


def _flag(default: Any, help: str, part: str = "model", range: Range | None = None) -> Any:
    return field(default=default, metadata={"flag": ModelFlag(default, help, part, range)})


@dataclass(frozen=True)
class ModelConfig:
    """The UNet and diffusion settings, under the original's flag names and with its defaults.

    Fields before `feat_cond` are the model/diffusion flags (in the original's order); `feat_cond`
    (condition the UNet on a representation) and `ssl_dim` (its width) complete what a checkpoint
    records. `channel_mult=""` takes the multipliers of `image_size`'s level count (128: 1,1,2,3,4).
    """

    image_size: int = _flag(64, "image side in pixels (the published models: 128)", range=Range(8, 1024))
    num_channels: int = _flag(128, "base channel count of the UNet (a multiple of 32)", range=Range(32, 4096))
    num_res_blocks: int = _flag(2, "residual blocks per resolution level", range=Range(1, 64))
    num_heads: int = _flag(4, "attention heads (when --num_head_channels is -1)", range=Range(1, 1024))
    num_heads_upsample: int = _flag(-1, "attention heads in the upsampling half (-1: --num_heads)",
                                    range=Range(1, 1024, also=(-1,)))
    num_head_channels: int = _flag(-1, "fixed channels per attention head, overriding --num_heads (-1: off)",
                                   range=Range(1, 4096, also=(-1,)))
    attention_resolutions: str = _flag("16,8", "comma-separated resolutions with self-attention, e.g. 32,16,8")
    channel_mult: str = _flag("", "comma-separated channel multiplier per level (default: by --image_size)")
    dropout: float = _flag(0.0, "dropout rate in the residual blocks", range=FRACTION)
    class_cond: bool = _flag(False, "condition on an ImageNet class label")
    use_checkpoint: bool = _flag(False, "gradient checkpointing (less memory, slower)")
    use_scale_shift_norm: bool = _flag(True, "scale-shift (FiLM) conditioning in the residual blocks")
    resblock_updown: bool = _flag(False, "residual blocks with built-in up/downsampling")
    use_fp16: bool = _flag(False, "the original's half-precision switch (here: fp16 autocast on GPU, bf16 on CPU)")
    use_new_attention_order: bool = _flag(False, "split q/k/v before the heads")
    # Beyond the original (the defaults build the published architecture):
    norm_style: str = _flag("gn", "gn: GroupNorm (published); cbn: the paper's conditional batch norm")
    shared_dim: int = _flag(128, "with --norm_style cbn: width of the shared projection of the representation",
                            range=Range(0, 65536))
    feat_drop_prob: float = _flag(0.0, "train with a learned null representation for this fraction of "
                                       "examples (enables --guidance_scale when sampling)", range=FRACTION)
    learn_sigma: bool = _flag(False, "the UNet also predicts the variance (6 output channels)", "diffusion")
    diffusion_steps: int = _flag(1000, "steps of the forward diffusion", "diffusion", Range(1, 100000))
    noise_schedule: str = _flag("linear", "beta schedule: linear or cosine", "diffusion")
    timestep_respacing: str = _flag("", "sampling steps: e.g. 100, ddim25 or 10,20,30 (default: every step)",
                                    "diffusion")
    use_kl: bool = _flag(False, "train with the variational bound (rescaled KL) loss", "diffusion")
    predict_xstart: bool = _flag(False, "the UNet predicts the clean image instead of the noise", "diffusion")
    rescale_timesteps: bool = _flag(False, "feed the UNet timesteps scaled to 0..1000", "diffusion")
    rescale_learned_sigmas: bool = _flag(False, "rescaled MSE loss with a learned variance", "diffusion")
    # The conditioning (recorded by every checkpoint; not flags of their own here):
    feat_cond: bool = False
    ssl_dim: int = 2048

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (`PRESETS`), with `overrides` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown ModelConfig preset {name!r}: choose one of {', '.join(PRESETS)}")
        return PRESETS[name](**overrides)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ModelConfig":
        """The configuration a checkpoint recorded (`meta["model_flags"]`); entries it lacks take
        the defaults, entries that are not settings are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names and v is not None})

    def to_record(self) -> dict[str, Any]:
        """Every setting, as a checkpoint records it (`meta["model_flags"]`)."""
        return dataclasses.asdict(self)

    def flags(self) -> dict[str, Any]:
        """The model/diffusion flags (every setting but `feat_cond` and `ssl_dim`)."""
        return {k: v for k, v in self.to_record().items() if k in MODEL_FLAGS}

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` (unknown names: TypeError)."""
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise `UsageError` naming the first setting that cannot build a model."""
        from .script_util import check_diffusion_flags, check_model_flags

        check_model_flags(**self.to_record())
        check_diffusion_flags(diffusion_steps=self.diffusion_steps, noise_schedule=self.noise_schedule,
                              timestep_respacing=self.timestep_respacing)

    def build(self):
        """`(UNetModel, SpacedDiffusion)`, after the checks (`create_model_and_diffusion`)."""
        from .script_util import create_model_and_diffusion

        return create_model_and_diffusion(**self.to_record())


# The model and diffusion flags, read from ModelConfig's fields: the defaults
# (`model_and_diffusion_defaults`), the builder's keywords, the command-line flags (with this help)
# and the checkpoint record all come from this one declaration. Order: the original's.
MODEL_FLAGS: dict[str, ModelFlag] = {f.name: f.metadata["flag"] for f in fields(ModelConfig) if "flag" in f.metadata}


# ----------------------------------------------------------------------------- presets


def published_128(**overrides: Any) -> ModelConfig:
    """The published RCDMs: guided-diffusion's ImageNet 128x128 UNet (`$MODEL_FLAGS_128`), the
    representation (2048-d: a ResNet-50 trunk) where the class label was."""
    return ModelConfig(**{**dict(
        image_size=128, num_channels=256, num_res_blocks=2, num_heads=4, attention_resolutions="32,16,8",
        learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, noise_schedule="linear",
        diffusion_steps=1000, feat_cond=True, ssl_dim=2048), **overrides})


def rcdm_256(**overrides: Any) -> ModelConfig:
    """An RCDM at 256 px (the paper published none): guided-diffusion's 256x256 UNet, the one its
    256x256 models (`openai_256`, `openai_256_uncond`) were trained with (`$MODEL_FLAGS_256`)."""
    return ModelConfig(**{**dict(
        image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64, attention_resolutions="32,16,8",
        learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, noise_schedule="linear",
        diffusion_steps=1000, feat_cond=True, ssl_dim=2048), **overrides})


def quickstart(image_size: int = 32, num_channels: int = 32, num_res_blocks: int = 1,
               **overrides: Any) -> ModelConfig:
    """The quickstart's small UNet (32 or 64 px; 1.26M weights at 32 px and 32 channels): trains
    in minutes on a CPU."""
    mult = {32: "1,2,2", 64: "1,2,2,2"}.get(image_size, "")
    return ModelConfig(**{**dict(
        image_size=image_size, num_channels=num_channels, num_res_blocks=num_res_blocks, channel_mult=mult,
        attention_resolutions="8", num_head_channels=32, learn_sigma=False, noise_schedule="cosine",
        diffusion_steps=1000, resblock_updown=False, use_scale_shift_norm=True, feat_cond=True), **overrides})


def tiny(**overrides: Any) -> ModelConfig:
    """A 32 px UNet of 32 channels and 100 diffusion steps, for tests."""
    return ModelConfig(**{**dict(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
        learn_sigma=True, diffusion_steps=100, feat_cond=True, ssl_dim=512), **overrides})


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "published_128": published_128,
    "rcdm_256": rcdm_256,
    "quickstart": quickstart,
    "tiny": tiny,
}


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingConfig:
    """How an `RCDM` draws samples, and where it runs.

    :param sampler: ddpm (the original's), ddim or dpm++ (DPM-Solver++(2M), few steps).
    :param steps: model calls per sample (None: every step of the diffusion, or of its respacing).
    :param eta: DDIM's noise (0: deterministic).
    :param guidance_scale: representation guidance (1: none; > 1 needs a model trained with
        `feat_drop_prob` > 0).
    :param clip_denoised: clip the predicted clean image to [-1, 1] at every step.
    :param device: cpu, cuda, cuda:N (None: a GPU when there is one).
    :param precision: fp32, bf16, fp16 or auto (None: fp32; fp16 on a GPU for a `use_fp16` model).
    :param tf32: TF32 matrix products on an NVIDIA GPU.
    :param channels_last, compile: speed options (channels-last layout, `torch.compile`).
    :param progress: a progress bar while sampling.
    """

    sampler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    guidance_scale: float = 1.0
    clip_denoised: bool = True
    device: str | None = None
    precision: str | None = None
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False
    progress: bool = True

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with `changes` (unknown names: TypeError)."""
        return dataclasses.replace(self, **changes)
