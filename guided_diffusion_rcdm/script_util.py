"""Defaults, factories and argparse helpers: the public entry points to build RCDM models.

`model_and_diffusion_defaults()` lists every model/diffusion flag with the original's default;
`create_model_and_diffusion(**defaults, feat_cond=True, ssl_dim=2048, G_shared=False)` builds the
UNet and the (respaced) diffusion. Flags are checked before anything heavy is built, and a bad
combination fails with a message that names the flag.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import gaussian_diffusion as gd
from .errors import UsageError
from .nn import NUM_NORM_GROUPS
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

NUM_CLASSES = 1000

# Channel multipliers per level for the resolutions the original supports without --channel_mult.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: from `low` to `high` (None: unbounded), both ends
    included unless `low_open`/`high_open`, plus the special values in `also` (e.g. -1: off).
    NaN and the infinities are in no range. A text flag with a range (e.g. --ema_rate) is a
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
        """Why `value` (a number, or for a text flag a comma-separated list of numbers) is not
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


# The one declaration of the model and diffusion flags: the defaults (`model_and_diffusion_defaults`),
# the builder (`create_model_and_diffusion`), the flags a checkpoint records and the command-line
# flags (with this help) are all read from it. Order: the original's.
MODEL_FLAGS: dict[str, ModelFlag] = {
    "image_size": ModelFlag(64, "image side in pixels (the published models: 128)", range=Range(8, 1024)),
    "num_channels": ModelFlag(128, "base channel count of the UNet (a multiple of 32)", range=Range(32, 4096)),
    "num_res_blocks": ModelFlag(2, "residual blocks per resolution level", range=Range(1, 64)),
    "num_heads": ModelFlag(4, "attention heads (when --num_head_channels is -1)", range=Range(1, 1024)),
    "num_heads_upsample": ModelFlag(-1, "attention heads in the upsampling half (-1: --num_heads)",
                                    range=Range(1, 1024, also=(-1,))),
    "num_head_channels": ModelFlag(-1, "fixed channels per attention head, overriding --num_heads (-1: off)",
                                   range=Range(1, 4096, also=(-1,))),
    "attention_resolutions": ModelFlag("16,8", "comma-separated resolutions with self-attention, e.g. 32,16,8"),
    "channel_mult": ModelFlag("", "comma-separated channel multiplier per level (default: by --image_size)"),
    "dropout": ModelFlag(0.0, "dropout rate in the residual blocks", range=FRACTION),
    "class_cond": ModelFlag(False, "condition on an ImageNet class label"),
    "use_checkpoint": ModelFlag(False, "gradient checkpointing (less memory, slower)"),
    "use_scale_shift_norm": ModelFlag(True, "scale-shift (FiLM) conditioning in the residual blocks"),
    "resblock_updown": ModelFlag(False, "residual blocks with built-in up/downsampling"),
    "use_fp16": ModelFlag(False, "the original's half-precision switch (here: fp16 autocast on GPU, bf16 on CPU)"),
    "use_new_attention_order": ModelFlag(False, "split q/k/v before the heads"),
    # Beyond the original (the defaults build the published architecture):
    "norm_style": ModelFlag("gn", "gn: GroupNorm (published); cbn: the paper's conditional batch norm"),
    "shared_dim": ModelFlag(128, "with --norm_style cbn: width of the shared projection of the representation",
                            range=Range(0, 65536)),
    "feat_drop_prob": ModelFlag(0.0, "train with a learned null representation for this fraction of "
                                     "examples (enables --guidance_scale when sampling)", range=FRACTION),
    "learn_sigma": ModelFlag(False, "the UNet also predicts the variance (6 output channels)", "diffusion"),
    "diffusion_steps": ModelFlag(1000, "steps of the forward diffusion", "diffusion", Range(1, 100000)),
    "noise_schedule": ModelFlag("linear", "beta schedule: linear or cosine", "diffusion"),
    "timestep_respacing": ModelFlag("", "sampling steps: e.g. 100, ddim25 or 10,20,30 (default: every step)",
                                    "diffusion"),
    "use_kl": ModelFlag(False, "train with the variational bound (rescaled KL) loss", "diffusion"),
    "predict_xstart": ModelFlag(False, "the UNet predicts the clean image instead of the noise", "diffusion"),
    "rescale_timesteps": ModelFlag(False, "feed the UNet timesteps scaled to 0..1000", "diffusion"),
    "rescale_learned_sigmas": ModelFlag(False, "rescaled MSE loss with a learned variance", "diffusion"),
}

# Flags a checkpoint records besides `model_and_diffusion_defaults()` to rebuild its model.
CONDITIONING_KEYS = ("feat_cond", "ssl_dim")

# Keywords `create_model_and_diffusion` takes besides MODEL_FLAGS: the conditioning and the
# original's no-op switches.
EXTRA_MODEL_KWARGS: dict[str, Any] = {"feat_cond": False, "ssl_dim": 2048, "G_shared": False, "pretrained": False}


def diffusion_defaults() -> dict[str, Any]:
    """Defaults of the diffusion flags."""
    return {k: f.default for k, f in MODEL_FLAGS.items() if f.part == "diffusion"}


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Defaults of every model and diffusion flag (the original's names and values)."""
    return {k: f.default for k, f in MODEL_FLAGS.items()}


def complete_model_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """`flags` over the defaults of MODEL_FLAGS and EXTRA_MODEL_KWARGS; a name that is neither is a
    `TypeError`, as for a function's unknown keyword."""
    unknown = sorted(set(flags) - set(MODEL_FLAGS) - set(EXTRA_MODEL_KWARGS))
    if unknown:
        raise TypeError(f"create_model_and_diffusion() got unexpected keyword argument(s): {', '.join(unknown)}")
    return {**model_and_diffusion_defaults(), **EXTRA_MODEL_KWARGS, **flags}


def recorded_model_flags(flags: Mapping[str, Any], *, feat_cond: bool, ssl_dim: int) -> dict[str, Any]:
    """The model flags a checkpoint records (`meta["model_flags"]`): every MODEL_FLAGS entry and
    the conditioning, enough to rebuild the model with `create_model_and_diffusion`."""
    return {**{k: flags.get(k, f.default) for k, f in MODEL_FLAGS.items()},
            "feat_cond": bool(feat_cond), "ssl_dim": int(ssl_dim)}


def create_model_and_diffusion(**flags: Any) -> tuple[UNetModel, SpacedDiffusion]:
    """Build the UNet and the diffusion from flags: any of `MODEL_FLAGS` (the rest take their
    defaults, see `model_and_diffusion_defaults`) plus `feat_cond` (condition the UNet on a
    representation of width `ssl_dim`, default 2048); `G_shared` and `pretrained` are accepted for
    the original's signature and have no effect."""
    flags = complete_model_flags(flags)
    # Validate the cheap diffusion flags first so a typo never waits for a large model to build.
    check_diffusion_flags(**{k: flags[k] for k in ("diffusion_steps", "noise_schedule", "timestep_respacing")})
    model = create_model(**{k: v for k, v in flags.items()
                            if k in EXTRA_MODEL_KWARGS or MODEL_FLAGS[k].part == "model" or k == "learn_sigma"})
    diffusion = create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{k: v for k, v in flags.items()
           if k in MODEL_FLAGS and MODEL_FLAGS[k].part == "diffusion" and k != "diffusion_steps"},
    )
    return model, diffusion


def _keyword_signature() -> inspect.Signature:
    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
              for k, v in {**model_and_diffusion_defaults(), **EXTRA_MODEL_KWARGS}.items()]
    return inspect.Signature(params, return_annotation="tuple[UNetModel, SpacedDiffusion]")


# help(), IDEs and inspect see every keyword with its default, read from the declaration above.
create_model_and_diffusion.__signature__ = _keyword_signature()  # type: ignore[attr-defined]


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | tuple[float, ...] = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    feat_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    G_shared: bool = False,
    ssl_dim: int = 2048,
    pretrained: bool = False,
    norm_style: str = "gn",
    shared_dim: int = 128,
    feat_drop_prob: float = 0.0,
) -> UNetModel:
    """Build the UNet from flags, after checking them (`ValueError` naming the bad flag).

    The original's signature and defaults (which differ from `model_and_diffusion_defaults`).
    """
    mult = check_model_flags(**locals())  # every argument above, by name
    attention_ds = tuple(image_size // res for res in _parse_ints(attention_resolutions, "attention_resolutions"))
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        feat_cond=feat_cond,
        ssl_dim=ssl_dim,
        norm_style=norm_style,
        shared_dim=shared_dim,
        feat_drop_prob=feat_drop_prob,
        G_shared=G_shared,
        pretrained=pretrained,
    )


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
    feat_cond: bool = False,
) -> SpacedDiffusion:
    """Build the diffusion: schedule, mean/variance parameterisation, loss and respacing.

    :param feat_cond: accepted for the original's signature; the diffusion does not depend on it.
    """
    del feat_cond
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# --------------------------------------------------------------------------- flag checks


def check_diffusion_flags(*, diffusion_steps: int, noise_schedule: str, timestep_respacing: str) -> None:
    """Raise `ValueError` naming the flag if the diffusion flags cannot work together."""
    if int(diffusion_steps) < 1:
        raise UsageError(f"`diffusion_steps` must be a positive integer, got {diffusion_steps}")
    if noise_schedule not in gd.BETA_SCHEDULES:
        raise UsageError(
            f"unknown `noise_schedule` {noise_schedule!r}: choose one of {', '.join(gd.BETA_SCHEDULES)}"
        )
    try:
        gd.get_named_beta_schedule(noise_schedule, int(diffusion_steps))
    except ValueError as err:
        raise UsageError(f"`diffusion_steps` / `noise_schedule`: {err}") from None
    if timestep_respacing:
        try:
            space_timesteps(diffusion_steps, timestep_respacing)
        except ValueError as err:
            raise UsageError(f"`timestep_respacing` {timestep_respacing!r}: {err}") from None


def check_model_flags(**flags: Any) -> tuple[float, ...]:
    """Check the UNet flags (any of `MODEL_FLAGS`, `feat_cond`, `ssl_dim`; the rest take their
    defaults) before building anything; return the channel multipliers.

    Raises `UsageError` (a `ValueError`) whose message names the offending flag and says what would work.
    """
    f = complete_model_flags(flags)
    image_size, num_channels, channel_mult = f["image_size"], f["num_channels"], f["channel_mult"]
    num_res_blocks, dropout, feat_cond, ssl_dim = f["num_res_blocks"], f["dropout"], f["feat_cond"], f["ssl_dim"]
    norm_style, shared_dim, feat_drop_prob = f["norm_style"], f["shared_dim"], f["feat_drop_prob"]
    attention_resolutions, num_head_channels = f["attention_resolutions"], f["num_head_channels"]
    num_heads, num_heads_upsample = f["num_heads"], f["num_heads_upsample"]
    if image_size < 1:
        raise UsageError(f"`image_size` must be positive, got {image_size}")
    if num_res_blocks < 1:
        raise UsageError(f"`num_res_blocks` must be at least 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"`dropout` must be in [0, 1), got {dropout}")
    if feat_cond and (ssl_dim is None or ssl_dim < 1):
        raise UsageError(f"ssl_dim must be a positive representation width with `feat_cond`, got {ssl_dim}")
    if norm_style not in ("gn", "cbn"):
        raise UsageError(f"unknown `norm_style` {norm_style!r}: use gn (GroupNorm, published) or cbn")
    if norm_style == "cbn" and not feat_cond:
        raise UsageError("`norm_style` cbn conditions the norms on the representation: it needs `feat_cond`")
    if shared_dim < 0:
        raise UsageError(f"`shared_dim` must be >= 0, got {shared_dim}")
    if not 0.0 <= feat_drop_prob < 1.0:
        raise UsageError(f"`feat_drop_prob` must be in [0, 1), got {feat_drop_prob}")
    if feat_drop_prob > 0 and not feat_cond:
        raise UsageError("`feat_drop_prob` drops the representation: it needs `feat_cond`")

    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise UsageError(
                f"unsupported `image_size` {image_size} without `channel_mult`: the defaults cover "
                f"{', '.join(map(str, sorted(DEFAULT_CHANNEL_MULT)))}; for other sizes give "
                "`channel_mult` explicitly (e.g. `channel_mult` 1,2,2 for 32x32)"
            )
        mult = DEFAULT_CHANNEL_MULT[image_size]
    elif isinstance(channel_mult, str):
        try:
            mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError:
            raise UsageError(
                f"`channel_mult` {channel_mult!r} must be comma-separated numbers, e.g. 1,2,2"
            ) from None
    else:
        mult = tuple(channel_mult)
    if not mult or any(m <= 0 for m in mult):
        raise UsageError(f"`channel_mult` {channel_mult!r} must be positive multipliers, e.g. 1,2,2")

    downsampling = 2 ** (len(mult) - 1)
    if image_size % downsampling:
        raise UsageError(
            f"`image_size` {image_size} is not divisible by {downsampling}, the downsampling of "
            f"{len(mult)} levels (`channel_mult` {','.join(map(str, mult))})"
        )

    widths = sorted({int(m * num_channels) for m in mult})
    bad = [w for w in widths if w < 1 or w % NUM_NORM_GROUPS]
    if bad:
        raise UsageError(
            f"`num_channels` {num_channels} with `channel_mult` {','.join(map(str, mult))} gives "
            f"{bad[0]} channels, which GroupNorm({NUM_NORM_GROUPS}) cannot divide: every "
            f"num_channels x channel_mult must be a multiple of {NUM_NORM_GROUPS}"
        )

    resolutions = _parse_ints(attention_resolutions, "attention_resolutions")
    if any(r < 1 for r in resolutions):
        raise UsageError(f"`attention_resolutions` {attention_resolutions!r} must be positive resolutions")
    level_width = {2**level: int(m * num_channels) for level, m in enumerate(mult)}
    for res in resolutions:
        width = level_width.get(image_size // res)
        if width is None:
            continue  # the original silently ignores resolutions the UNet never reaches
        for flag, heads in (("num_heads", num_heads), ("num_heads_upsample", num_heads_upsample)):
            if num_head_channels != -1:
                if num_head_channels < 1 or width % num_head_channels:
                    raise UsageError(
                        f"`num_head_channels` {num_head_channels} does not divide the {width} channels "
                        f"of the attention at resolution {res}"
                    )
            elif heads != -1 and (heads < 1 or width % heads):
                raise UsageError(
                    f"`{flag}` {heads} does not divide the {width} channels of the attention at "
                    f"resolution {res}"
                )
    return mult


def _parse_ints(text: str, flag: str) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    text = str(text).strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"`{flag}` {text!r} must be comma-separated integers, e.g. 32,16,8") from None


# --------------------------------------------------------------------------- argparse helpers


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add `--key value` options for every entry; booleans take yes/no/true/false/1/0."""
    for k, v in default_dict.items():
        v_type: Any = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """The entries of `args` named by `keys`."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v: str | bool) -> bool:
    """Parse a boolean flag value (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
