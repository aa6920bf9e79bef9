"""Defaults, factories and argparse helpers: the public entry points to build RCDM models.

`model_and_diffusion_defaults()` lists every model/diffusion flag with the original's default;
`create_model_and_diffusion(**defaults, feat_cond=True, ssl_dim=2048, G_shared=False)` builds the
UNet and the (respaced) diffusion. Flags are checked before anything heavy is built, and a bad
combination fails with a message that names the flag.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from . import gaussian_diffusion as gd
from .config import FRACTION, MODEL_FLAGS, NON_NEGATIVE, OFF_OR_POSITIVE, POSITIVE, ModelConfig, ModelFlag, Range  # noqa: F401
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

# Keywords `create_model_and_diffusion` takes besides MODEL_FLAGS: the conditioning (ModelConfig's
# defaults) and the original's no-op switches.
EXTRA_MODEL_KWARGS: dict[str, Any] = {"feat_cond": ModelConfig.feat_cond, "ssl_dim": ModelConfig.ssl_dim,
                                      "G_shared": False, "pretrained": False}


def diffusion_defaults() -> dict[str, Any]:  # the original's name: its users may import it
    return {k: f.default for k, f in MODEL_FLAGS.items() if f.part == "diffusion"}


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Defaults of every model and diffusion flag (the original's names and values)."""
    return ModelConfig().flags()


def complete_model_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """`flags` over the defaults of MODEL_FLAGS and EXTRA_MODEL_KWARGS; a name that is neither is a
    `TypeError`, as for a function's unknown keyword."""
    unknown = sorted(set(flags) - set(MODEL_FLAGS) - set(EXTRA_MODEL_KWARGS))
    if unknown:
        raise TypeError(f"create_model_and_diffusion() got unexpected keyword argument(s): {', '.join(unknown)}")
    return {**model_and_diffusion_defaults(), **EXTRA_MODEL_KWARGS, **flags}


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
    """The original's helper (its users may call it): `--key value` options for every entry;
    booleans take yes/no/true/false/1/0. The commands declare their flags in `cli.flags`."""
    for k, v in default_dict.items():
        parser.add_argument(f"--{k}", default=v, type=str2bool if isinstance(v, bool) else (str if v is None else type(v)))


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
