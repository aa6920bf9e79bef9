"""Shared fixtures of the sampling tests: real photographs on disk and a tiny self-describing checkpoint.

The checkpoint is a freshly initialised tiny UNet whose zero-initialised layers (the output layer
and every residual branch's last convolution) get small random weights, so that its samples
depend on the representation, as a trained model's do. It records its flags and a
`resnet18` encoder with random weights (`pretrained: False`), so everything runs offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import _train_photos
from guided_diffusion_rcdm.config import MODEL_FLAGS, ModelConfig
from _train_photos import PHOTOS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# The "tiny" preset's flags that differ from the defaults (what a command line gives).
TINY_FLAGS = {k: v for k, v in ModelConfig.preset("tiny").flags().items() if v != MODEL_FLAGS[k].default}
TINY_ARGV = ["--timestep_respacing", "5"]
ENCODER = {"type_model": "resnet18", "use_head": False, "normalize": "minus_one_one", "pretrained": False}
SSL_DIM = 512  # resnet18's pooled features


def photo(name: str, short_side: int = 64) -> Image.Image:
    return _train_photos.photo(name, short_side).convert("RGB")


def write_photos(folder, names=PHOTOS, short_side: int = 64) -> list[str]:
    """Save the photos as JPEG and PNG files (alternating) and return their paths, in name order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / f"{i:02d}_{name}.{'png' if i % 2 else 'jpg'}"
        photo(name, short_side).save(path)
        paths.append(str(path))
    return paths


def make_tiny_checkpoint(path, seed: int = 0, encoder: dict | None = None, **extra_flags) -> str:
    """Write a tiny RCDM checkpoint with its meta (flags and encoder) and return its path."""
    from guided_diffusion_rcdm import hub
    from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = {**model_and_diffusion_defaults(), **TINY_FLAGS, **extra_flags}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, _ = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=SSL_DIM)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(0.0, 0.05)
    meta = {
        "model_flags": {**flags, "feat_cond": True, "ssl_dim": SSL_DIM},
        "encoder": dict(encoder or ENCODER),
        "step": 0,
    }
    hub.save_checkpoint(str(path), model.state_dict(), meta=meta)
    return str(path)


def run_script(name: str, *argv, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `scripts/NAME` in a fresh interpreter, offline, and return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("RCDM_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, argv)],
        # Run from the temp folder: a script's default --out_dir "." must never write into the repo.
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def grid_cells(path, rows: int, cols: int, size: int, padding: int = 2) -> np.ndarray:
    """Cut a grid image written by `cli.sampling.save_grid` into its cells: rows x cols x S x S x 3."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert arr.shape == (rows * (size + padding) + padding, cols * (size + padding) + padding, 3), arr.shape
    cells = np.empty((rows, cols, size, size, 3), dtype=np.int16)
    for r in range(rows):
        for c in range(cols):
            top, left = padding + r * (size + padding), padding + c * (size + padding)
            cells[r, c] = arr[top : top + size, left : left + size]
    return cells
