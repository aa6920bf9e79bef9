"""What the three sampling scripts share: flags, building the model and encoder, inputs and outputs.

`create_argparser` gives every flag of the original sampling scripts (old command lines keep
working; `--no_shared`, `--G_shared`, `--submitit`, `--local_rank`, `--dist_url` are accepted and
have no effect) plus the new ones (`--sampler`, `--steps`, `--seed`, `--device`, `--precision`,
`--pretrained_encoder`, ...). `load_components` builds the frozen encoder, the UNet and the
diffusion from the flags and the checkpoint: a checkpoint that records its flags (the project's
own, or a published one through `published_meta`) decides the architecture, and its recorded
encoder is used unless `--type_model` says otherwise. `run_cli` turns bad input into a one-line
message and a non-zero exit instead of a traceback. Grids and `.npz` files are written here too.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import fileio, hub, loading
from .loading import SAMPLING_TIME_FLAGS, Components, UsageError, check_model_path, resolve_device  # noqa: F401
from .RCDM import component_kwargs, explicit_settings
from .image_datasets import find_images, load_rgb_image, model_input
from .precision import add_precision_args
from .samplers import SAMPLERS
from .script_util import (
    add_dict_to_argparser,
    model_and_diffusion_defaults,
    str2bool,
)

DEBUG_ENV = "RCDM_DEBUG"  # set to 1 to get full tracebacks instead of one-line errors


# ----------------------------------------------------------------------------- flags


def sampling_defaults() -> dict[str, Any]:
    """Defaults of the flags every sampling script of the original takes (and the model flags)."""
    defaults = dict(
        data_dir="",
        clip_denoised=True,
        num_images=1,
        batch_size=16,
        use_ddim=False,
        model_path="",
        # accepted so the original's command lines keep working; they change nothing here
        submitit=False,
        local_rank=0,
        dist_url="env://",
        G_shared=False,
    )
    defaults.update(model_and_diffusion_defaults())
    return defaults


def create_argparser(description: str | None = None, name: str = "samples") -> argparse.ArgumentParser:
    """The shared parser; each script adds its own inputs (image paths, `--n_common`, ...)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default=name, help="file name (without extension) of the outputs")
    parser.add_argument("--out_dir", default=".", help="folder for the grid, the .npz and log.txt")
    parser.add_argument("--no_shared", action="store_false", default=True,
                        help="accepted for the original's command lines (no effect)")
    parser.add_argument("--feat_cond", action="store_true", default=False,
                        help="accepted for the original's command lines (sampling is always conditioned)")
    parser.add_argument("--dist", action="store_true", default=False,
                        help="also report the representation distance between each sample and its target")
    parser.add_argument("--use_head", action="store_true", default=False,
                        help="use the encoder's projector/head output instead of the trunk's")
    parser.add_argument("--type_model", default="dino",
                        help="encoder: dino, simclr, barlow, vicreg, supervised, a torchvision model "
                             "name or a checkpoint path (default: the checkpoint's, else dino)")
    add_dict_to_argparser(parser, sampling_defaults())
    new = parser.add_argument_group("beyond the original")
    new.add_argument("--sampler", default=None, choices=SAMPLERS,
                     help="ddpm, ddim or dpm++ (default: ddim with --use_ddim True, else ddpm)")
    new.add_argument("--steps", type=int, default=None,
                     help="number of sampling steps (default: the --timestep_respacing steps)")
    new.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic)")
    new.add_argument("--guidance_scale", type=float, default=1.0,
                     help="representation guidance (1: none; needs a model trained with --feat_drop_prob > 0)")
    new.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    new.add_argument("--device", default="", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    new.add_argument("--progress", type=str2bool, default=True, help="tqdm bar over the diffusion steps")
    new.add_argument("--pretrained_encoder", type=str2bool, default=True,
                     help="False: the encoder with fixed-seed random weights, no download (tests, offline)")
    new.add_argument("--encoder_normalize", default=None, choices=("minus_one_one", "imagenet"),
                     help="encoder input scaling (default: the checkpoint's, else the encoder's own: "
                          "minus_one_one for the published encoders, imagenet for torchvision models)")
    add_precision_args(new, default_precision="")
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations the command line sets explicitly (whatever their value)."""
    # Re-parse with every default suppressed: only what argv names ends up in the namespace.
    # Parser options are set on a throwaway copy of the default values, then restored.
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return frozenset(vars(given))


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` and remember which flags were given (`args.explicit`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    return args


def complete_args(args: argparse.Namespace | dict | None = None, **overrides) -> argparse.Namespace:
    """A full namespace from a partial one (e.g. the original's argparse namespace, or a dict).

    Flags it does not have take the defaults. Which flags count as given: `args.explicit` when
    present, else those whose value differs from the default (a value equal to the default cannot
    be told apart, and then the checkpoint's recorded value is the better choice anyway).
    """
    base = vars(create_argparser().parse_args([]))
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    given.update(overrides)
    explicit = given.pop("explicit", None)
    merged = {**base, **given}
    if explicit is None:
        explicit = {k for k, v in given.items() if k not in base or base[k] != v}
    ns = argparse.Namespace(**merged)
    ns.explicit = frozenset(explicit)
    return ns


def sampler_name(args: argparse.Namespace) -> str:
    """`--sampler`, else the original's choice: DDIM with `--use_ddim`, DDPM otherwise."""
    return args.sampler or ("ddim" if args.use_ddim else "ddpm")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and GPUs), numpy and random, so the same seed gives the same samples."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------- model and encoder


def check_image_file(path: str, flag: str) -> str:
    """Fail early, naming the flag, when an input image path is unset or missing."""
    if not path or path == ".":
        raise UsageError(f"{flag} is required: pass the path of an image file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; pass the path of one image file")
    import blobfile as bf

    if not bf.exists(path):
        raise UsageError(f"{flag} {path}: no such file; pass the path of an existing image")
    return path


def load_image_views(path: str, rcdm, flag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(model view 3xSxS, encoder view 3xExE)` of an image file, both in [-1, 1] (`rcdm.encode`
    scales the encoder's), or an error naming `flag`."""
    check_image_file(path, flag)
    try:
        image = load_rgb_image(path)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot be read as an image ({err})") from None
    return model_input(image, rcdm.image_size), model_input(image, rcdm.encoder_spec.input_size)


def list_folder_images(folder: str, flag: str) -> list[str]:
    """The images under `folder` (recursively, sorted), or a usage error naming `flag`."""
    try:
        return find_images(folder, flag=flag)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def load_components(args: argparse.Namespace) -> Components:
    """Build the frozen encoder, the UNet (weights loaded, eval mode) and the diffusion from the
    flags (`loading.load_components`; without `--model_path`, the published checkpoint)."""
    return loading.load_components(**component_kwargs(*explicit_settings(args)))


# ----------------------------------------------------------------------------- outputs


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (... x 3 x H x W) -> uint8 arrays (... x H x W x 3), as the original saves them."""
    arr = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return arr.movedim(-3, -1).numpy()


def save_grid(rows: Sequence[torch.Tensor], path: str, padding: int = 2) -> str:
    """Write rows of [-1, 1] images (each R x 3 x H x W, same R) as one JPEG/PNG grid.

    Unlike the original (which min-max stretched every image separately), the colours are written
    as sampled.
    """
    from torchvision.utils import make_grid
    from PIL import Image

    ncols = rows[0].shape[0]
    if any(r.shape[0] != ncols for r in rows):
        raise ValueError("every row of a grid needs the same number of images")
    images = torch.cat([r.detach().float().cpu() for r in rows])
    grid = make_grid((images + 1) / 2, nrow=ncols, padding=padding, pad_value=1.0)
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    # 4:4:4 chroma: the default 4:2:0 subsampling smears small samples.
    options = {"quality": 95, "subsampling": 0} if path.lower().endswith((".jpg", ".jpeg")) else {}
    fileio.save_image(Image.fromarray(arr), path, **options)
    return path


def save_npz(path: str, **arrays: Any) -> str:
    """`np.savez` written to a temporary name and renamed (`fileio.atomic_write`), so a crash
    never leaves half a file and a symbolic link at `path` is replaced, not followed."""
    plain = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
             for k, v in arrays.items()}
    fileio.atomic_write(path, lambda f: np.savez(f, **plain))
    return path


def output_paths(args: argparse.Namespace) -> tuple[str, str]:
    """`(grid, npz)` paths: `OUT_DIR/NAME.jpeg` (the original's) and `OUT_DIR/NAME.npz`."""
    base = os.path.join(args.out_dir, args.name)
    return base + ".jpeg", base + ".npz"


def run_metadata(args: argparse.Namespace, rcdm) -> dict[str, Any]:
    """Scalars saved in every `.npz`, so a file says how it was made."""
    return dict(
        seed=args.seed,
        sampler=rcdm.sampler,
        guidance_scale=float(args.guidance_scale),
        steps=-1 if args.steps is None else args.steps,
        timestep_respacing=str(args.timestep_respacing),
        **rcdm.encoder_spec.sample_file_fields(),
        precision=rcdm.precision,
        model_path=args.model_path,
    )


def describe(rcdm) -> str:
    """One log line: what is sampled, how and where."""
    return (
        f"RCDM {rcdm.image_size}x{rcdm.image_size}, encoder {rcdm.encoder_spec.describe()}, sampler {rcdm.sampler} "
        f"({rcdm.args.steps or rcdm.diffusion.num_timesteps} steps), {rcdm.precision} on {rcdm.device}"
    )


def row(first: torch.Tensor, samples: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """One grid row: a conditioning image (3 x S x S), its samples (B x 3 x S x S), optionally a last image."""
    parts = [first.unsqueeze(0).to(samples.device), samples]
    if last is not None:
        parts.append(last.unsqueeze(0).to(samples.device))
    return torch.cat(parts)


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach().cpu() for t in tensors])


def check_counts(args: argparse.Namespace, **flags: str) -> None:
    """Each named count (attribute -> flag) must be at least 1."""
    for attr, flag in flags.items():
        value = getattr(args, attr)
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")


def check_enough_images(paths: Sequence[str], wanted: int, flag: str, folder_flag: str, folder: str) -> None:
    if wanted > len(paths):
        raise UsageError(
            f"{flag} {wanted} is larger than the {len(paths)} image(s) in {folder_flag} {folder}: "
            f"lower {flag} or add images"
        )


def require_faiss(what: str) -> None:
    """An error naming `what` when faiss is not installed (the exact torch search needs nothing)."""
    from .representation_ops import faiss_available

    if not faiss_available():
        raise UsageError(
            f"{what} needs faiss: pip install faiss-cpu (or guided-diffusion-rcdm[faiss]), or use "
            "--knn_backend torch (exact, no extra package)"
        )


def load_folder_views(paths: Sequence[str], wanted: int, rcdm, flag: str,
                      folder: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `wanted` readable images of `paths`: `(model views, encoder views, their paths)`,
    views in [-1, 1] (`rcdm.encode` scales the encoder's).

    Unreadable files are skipped with a warning naming them; too few readable ones is an error.
    """
    model_views, encoder_views, used = [], [], []
    for path in paths:
        if len(used) == wanted:
            break
        try:
            image = load_rgb_image(path)
        except OSError as err:
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            continue
        model_views.append(model_input(image, rcdm.image_size))
        encoder_views.append(model_input(image, rcdm.encoder_spec.input_size))
        used.append(str(path))
    if len(used) < wanted:
        raise UsageError(
            f"{flag} {folder}: only {len(used)} readable image(s) of {len(paths)}, {wanted} needed; "
            "fix or remove the unreadable files, or ask for fewer images"
        )
    return torch.stack(model_views), torch.stack(encoder_views), used


def distances_if_asked(args: argparse.Namespace, rcdm, samples: Sequence[torch.Tensor] | torch.Tensor,
                       feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """With `--dist`: `{"ssl_distances": G x B}`, the squared representation distance between each
    sample and the representation it was drawn from (logged too); else `{}`."""
    if not args.dist:
        return {}
    from . import logger

    dists = stack([rcdm.representation_distance(s, f) for s, f in zip(samples, feats)])
    for i, d in enumerate(dists):
        logger.log(f"representation distance of row {i}'s samples to their target: "
                   + " ".join(f"{v:.1f}" for v in d.tolist()))
    return {"ssl_distances": dists}


# ----------------------------------------------------------------------------- command line


# Errors that mean "the input is wrong", reported without a traceback. Anything else is a bug and
# keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ValueError,
    FileNotFoundError,
    hub.DownloadError,
    hub.CheckpointError,
    hub.CheckpointMismatchError,
    fileio.UnsafePathError,  # an output name is a planted symbolic link
    fileio.DiskFullError,
    PermissionError,  # an output folder that cannot be written
)


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
            argv: Iterable[str] | None = None) -> Any:
    """Parse the command line and run `main`; bad input exits with status 2 and one message."""
    args = parse_args(parser, None if argv is None else list(argv))
    try:
        return main(args)
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n(set {DEBUG_ENV}=1 for the traceback)\n")
