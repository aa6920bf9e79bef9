"""What the sampling commands share: their flags, the model and encoder they build, their inputs
and their output files (a grid image and an `.npz`).

`create_argparser` gives every flag of the original sampling scripts (old command lines keep
working; `--no_shared`, `--G_shared`, `--submitit`, `--local_rank`, `--dist_url` are accepted and
have no effect) plus the new ones (`--sampler`, `--steps`, `--seed`, `--device`, `--precision`,
`--pretrained_encoder`, ...). A checkpoint that records its flags decides the architecture, and
its recorded encoder is used unless `--type_model` says otherwise (`loading.load_components`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Sequence
from typing import Any

import blobfile as bf
import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .. import fileio, logger
from ..fileio import check_out_dir, save_npz  # noqa: F401 (the commands use them)
from ..errors import UsageError
from ..image_datasets import ImageTooLargeError, find_images, load_rgb_image, model_input
from ..loading import Components, check_model_path, resolve_device  # noqa: F401 (the commands use them)
from ..representation_ops import faiss_available
from ..run_control import seed_everything  # noqa: F401 (the commands seed with it)
from ..script_util import MODEL_FLAGS
from .flags import ENCODER_FLAGS, ORIGINAL_NO_EFFECT, SPEED_FLAGS, Parser, add_flags

# The flags of every sampling command, in --help's order.
SAMPLING_FLAGS = ("name", "out_dir", "data_dir", "model_path", "num_images", "batch_size", *ENCODER_FLAGS,
                  "clip_denoised", "use_ddim", "dist", "feat_cond")
NEW_SAMPLING_FLAGS = ("sampler", "steps", "eta", "guidance_scale", "seed", "device", "progress", *SPEED_FLAGS)


# ----------------------------------------------------------------------------- flags


def create_argparser(description: str | None = None, name: str = "samples",
                     prog: str | None = None) -> argparse.ArgumentParser:
    """The shared parser; each command adds its own inputs (image paths, `--n_common`, ...)."""
    parser = Parser(prog=prog, description=description)
    add_flags(parser, *SAMPLING_FLAGS, defaults={"name": name}, helps={
        "out_dir": "folder for the grid, the .npz and log.txt",
        "batch_size": "samples per conditioning image",
        "type_model": "encoder (default: the checkpoint's, else dino): dino, simclr, barlow, vicreg, "
                      "supervised, a torchvision model name or a checkpoint file",
        "feat_cond": "accepted for the original's command lines (sampling is always conditioned)",
    })
    add_flags(parser.add_argument_group("model (a checkpoint that records its flags needs none of them)"),
              *MODEL_FLAGS)
    add_flags(parser.add_argument_group("beyond the original"), *NEW_SAMPLING_FLAGS)
    add_flags(parser.add_argument_group("the original's, no effect"), *ORIGINAL_NO_EFFECT)
    return parser


# ----------------------------------------------------------------------------- model and encoder


def check_image_file(path: str, flag: str) -> str:
    """Fail early, naming the flag, when an input image path is unset or missing."""
    if not path or path == ".":
        raise UsageError(f"{flag} is required: pass the path of an image file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; pass the path of one image file")
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
    """The images under `folder` (recursively, sorted), or a user error naming `flag`."""
    return find_images(folder, flag=flag)


@contextlib.contextmanager
def writing_outputs(args: argparse.Namespace):
    """The part of a command that writes: opens its log in --out_dir, and puts the outputs in place
    together at the end; if it fails (a full disk, Ctrl-C), nothing it created is left, its log
    and --out_dir (if it made it) included (`fileio.whole_run_or_nothing`)."""
    with fileio.whole_run_or_nothing(args.out_dir, on_failure=logger.reset, appends=("log.txt",)):
        logger.configure(dir=args.out_dir, format_strs="stdout,log")
        yield


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


def output_paths(args: argparse.Namespace) -> tuple[str, str]:
    """`(grid, npz)` paths: `OUT_DIR/NAME.jpeg` (the original's) and `OUT_DIR/NAME.npz`."""
    base = os.path.join(args.out_dir, args.name)
    return base + ".jpeg", base + ".npz"


def run_metadata(rcdm, seed: int) -> dict[str, Any]:
    """Scalars saved in every `.npz`, so a file says how it was made."""
    return dict(
        seed=seed,
        sampler=rcdm.sampler,
        guidance_scale=float(rcdm.sampling.guidance_scale),
        steps=-1 if rcdm.sampling.steps is None else rcdm.sampling.steps,
        timestep_respacing=str(rcdm.model_flags["timestep_respacing"]),
        **rcdm.encoder_spec.sample_file_fields(),
        precision=rcdm.precision,
        model_path=rcdm.model_path,
    )


def describe(rcdm) -> str:
    """One log line: what is sampled, how and where."""
    return (
        f"RCDM {rcdm.image_size}x{rcdm.image_size}, encoder {rcdm.encoder_spec.describe()}, sampler {rcdm.sampler} "
        f"({rcdm.sampling.steps or rcdm.diffusion.num_timesteps} steps), {rcdm.precision} on {rcdm.device}"
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
        except ImageTooLargeError as err:
            raise UsageError(f"{flag} {folder}: {err}; remove it or shrink it") from None
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
    dists = stack([rcdm.representation_distance(s, f) for s, f in zip(samples, feats)])
    for i, d in enumerate(dists):
        logger.log(f"representation distance of row {i}'s samples to their target: "
                   + " ".join(f"{v:.1f}" for v in d.tolist()))
    return {"ssl_distances": dists}

