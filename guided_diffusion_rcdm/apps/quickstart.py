"""The offline quickstart: the whole RCDM loop on real photographs, on a CPU, in a few minutes.

`python scripts/quickstart.py` needs no network and no downloaded weights. It takes the public-domain
and CC0 photographs that ship with scikit-image, cuts training views (random crops) from most of
them, encodes every view once with a frozen ResNet-50 (published weights when a published file is
in the torch.hub cache or `RCDM_MIRROR`, or DINO's, downloaded once when the network answers;
otherwise a fixed-seed UNTRAINED one, said plainly), trains
a small RCDM for a time budget with the package's `TrainLoop`, then, through the package's `RCDM`
module, samples from the representations of held-out views (the whole photos, which training never
saw as such, and two photos it never saw at all), interpolates between two of them, edits one
(the paper's shared-dimension manipulation), and scores the samples' representation fidelity
against a shuffled-conditioning control (and FID / IS when the Inception weights are on disk).
Everything lands in `--out_dir`, with an `index.html` report. A second run with the same settings
reuses the trained model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path
from string import Template
from typing import Any

# Set before torch loads its OpenMP runtime, which reads it once: waiting OpenMP threads sleep
# instead of spinning. On a 2-core machine busy with other work, the spinning threads took the CPU
# from the working one and a training step took 10-25x longer. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .. import fileio, foundations, hub, logger, metrics
from ..cli import sampling as su
from ..cli.flags import Flag, Parser, add_flags
from ..cli.policy import run_main
from ..errors import UsageError
from ..feature_cache import load_cache, prepare_feature_cache
from ..encoders import EncoderSpec, encode_images, encode_views
from ..encoders.adapters import source_of
from ..get_ssl_models import ENCODER_NAMES, fetch_weights, weights_file, weights_on_disk
from ..image_datasets import encoder_input, model_input, to_rgb
from ..precision import default_device, fastest_thread_count, resolve_precision, resolve_speed
from ..RCDM import RCDM
from ..representation_ops import INTERPOLATIONS
from ..config import ModelConfig, Range
from ..train_util import TrainLoop
from ..training import train as train_rcdm

REPORT = "index.html"
REPORT_TEMPLATE = "quickstart_report.html"  # shipped as package data
SETTINGS_VERSION = 1
MARKER = "quickstart_model.json"  # written once training finished: names the checkpoint to sample from


# ----------------------------------------------------------------------------- the photographs


@dataclass(frozen=True)
class Photo:
    name: str  # the skimage.data function
    title: str
    credit: str
    licence: str


# Real photographs shipped inside scikit-image (skimage/data), with the credit and licence their
# docstrings state. Synthetic images (colorwheel, logo, ...) and those without a stated licence
# are left out.
PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "Astronaut Eileen Collins", "NASA", "public domain"),
    Photo("chelsea", "Chelsea the cat", "Stefan van der Walt", "CC0"),
    Photo("coffee", "Coffee cup", "Rachel Michetti (Pikolo Espresso Bar)", "CC0"),
    Photo("hubble_deep_field", "Hubble eXtreme Deep Field", "NASA", "public domain"),
    Photo("immunohistochemistry", "Immunohistochemical staining", "CMMI", "no known copyright restrictions"),
    Photo("retina", "Human retina", "Mikael Häggström (Wikimedia Commons)", "CC0"),
    Photo("camera", "Man with a camera", "Lav Varshney", "CC0"),
    Photo("coins", "Greek coins from Pompeii", "Brooklyn Museum", "no known copyright restrictions"),
    Photo("text", "Text on a wall", "Wikipedia (File:Corner.png)", "public domain"),
    Photo("grass", "Grass", "linolafett (DeviantArt)", "CC0"),
    Photo("gravel", "Gravel", "CC0Textures", "CC0"),
    Photo("brick", "Brick wall", "CC0Textures", "CC0"),
    Photo("cell", "Cell floating in saline", "Paul Müller et al.", "CC0"),
    Photo("microaneurysms", "Retina with microaneurysms", "Andreas Maier (HRF database)", "CC0"),
    Photo("rocket", "DSCOVR launch on Falcon 9", "SpaceX", "public domain"),
    Photo("clock", "Motion-blurred clock", "Stefan van der Walt", "public domain"),
)
UNSEEN_PHOTOS = ("rocket", "clock")  # never trained on, not even a crop
INTERPOLATION_PAIR = ("astronaut", "coffee")
MANIPULATION_PAIR = ("chelsea", "astronaut")  # (source, target)
VIEW_SIZE = 224  # every view is written at the encoder's resolution
CROP_SCALES = (0.45, 0.9)  # training crops cover this fraction of the photo's shorter side


def load_photo(name: str) -> Image.Image:
    """A scikit-image photograph as an RGB PIL image (grayscale ones converted)."""
    try:
        import skimage.data
    except ImportError:
        raise UsageError(
            "the quickstart's photographs ship with scikit-image: pip install scikit-image "
            "(or pip install 'guided-diffusion-rcdm[quickstart]')"
        ) from None

    return to_rgb(Image.fromarray(np.asarray(getattr(skimage.data, name)())))


def crop_view(image: Image.Image, box: tuple[int, int, int]) -> Image.Image:
    """The square `box` (left, top, side) of `image`, resized to VIEW_SIZE x VIEW_SIZE."""
    left, top, side = box
    return image.crop((left, top, left + side, top + side)).resize((VIEW_SIZE, VIEW_SIZE), Image.BICUBIC)


def view_boxes(crops_per_photo: int, seed: int):
    """For each photo: `(photo, image, training boxes, held-out box)`. Training boxes are
    `crops_per_photo` random squares (CROP_SCALES of the shorter side; none for UNSEEN_PHOTOS),
    the held-out box the centre square; a box is (left, top, side). The same seed, the same boxes."""
    rng = random.Random(seed)
    for photo in PHOTOS:
        image = load_photo(photo.name)
        w, h = image.size
        short = min(w, h)
        boxes = []
        if photo.name not in UNSEEN_PHOTOS:
            for _ in range(crops_per_photo):
                side = max(16, round(short * rng.uniform(*CROP_SCALES)))
                boxes.append((rng.randrange(w - side + 1), rng.randrange(h - side + 1), side))
        yield photo, image, boxes, ((w - short) // 2, (h - short) // 2, short)


def prepare_views(data_dir: Path, crops_per_photo: int, seed: int) -> tuple[list[str], list[dict]]:
    """Write the training crops and the held-out views as 224x224 PNG files.

    Training: `crops_per_photo` random square crops (45-90% of the shorter side) of every photo but
    `UNSEEN_PHOTOS`. Held out: the centre square of every photo (the whole photo, never a training
    crop, which are smaller) including the unseen ones. File names encode the crop box, so a file
    of a given name always has the same content (the feature cache relies on it).
    """
    train_dir, held_dir = data_dir / "train", data_dir / "heldout"
    for folder in (data_dir, train_dir, held_dir):  # a planted link there would send the files elsewhere
        fileio.make_folder(str(folder))
    train, held = [], []
    for photo, image, boxes, centre in view_boxes(crops_per_photo, seed):
        for i, (left, top, side) in enumerate(boxes):
            path = train_dir / f"{photo.name}_{i:02d}_x{left}_y{top}_s{side}.png"
            if not path.exists():
                fileio.save_image(crop_view(image, (left, top, side)), str(path))
            train.append(str(path))
        path = held_dir / f"{photo.name}.png"
        if not path.exists():
            fileio.save_image(crop_view(image, centre), str(path))
        held.append({"name": photo.name, "path": str(path), "unseen_photo": photo.name in UNSEEN_PHOTOS})
    return train, held


# ----------------------------------------------------------------------------- the encoder


PROBE_TIMEOUT_S = 3.0  # how long `--encoder_weights auto` waits to learn whether the network answers


def choose_encoder(type_model: str, weights: str) -> tuple[EncoderSpec, str]:
    """`(encoder, sentence for the user)`: which encoder the quickstart uses, and why.

    `type_model="auto"` tries the published ResNet-50s (dino, simclr, barlow, vicreg, supervised)
    in that order. `weights="auto"`: published weights already on disk (download cache or a
    directory `RCDM_MIRROR`); else, when the network (or a URL `RCDM_MIRROR`) answers within
    `PROBE_TIMEOUT_S`, the published file of dino (or of the encoder named) is downloaded once
    (progress bar, verified like every download); else the fixed-seed untrained network, said
    plainly. "published" insists (downloading if need be); "untrained" never looks.
    """

    candidates = list(ENCODER_NAMES) if type_model == "auto" else [type_model]
    fallback = "dino" if type_model == "auto" else type_model
    if os.path.isfile(type_model):
        return EncoderSpec(type_model), f"the encoder in the local file {type_model}"
    if source_of(type_model):  # timm:, hf:, open_clip:, py: the library finds (or refuses) its weights
        if weights == "untrained":
            return EncoderSpec(type_model, pretrained=False), f"{type_model} with untrained (random) weights"
        if weights not in ("auto", "published"):
            return EncoderSpec(type_model, weights=weights), f"{type_model} with the weights in {weights}"
        return EncoderSpec(type_model), f"{type_model} with its library's trained weights"
    if weights not in ("auto", "published", "untrained"):
        raise UsageError(f"--encoder_weights {weights}: a weights file is for a timm: or open_clip: "
                         "--type_model; otherwise use auto, published or untrained")

    def published(name: str) -> tuple[EncoderSpec, str] | None:
        try:
            path = fetch_weights(name)
        except hub.DownloadError as err:
            if weights == "published":
                raise
            print(f"  (published {name} weights not usable: {str(err).splitlines()[0]})", flush=True)
            return None
        what = f"a ResNet-50 trained with {name}" if name in ENCODER_NAMES else f"the {name} encoder"
        return EncoderSpec(name), f"{what} (published weights, {path})"

    if weights != "untrained":
        for name in candidates:
            if weights_file(name) is None:
                raise UsageError(f"--type_model {name}: not a published encoder, torchvision model or file")
            if weights == "auto" and weights_on_disk(name) is None:
                continue
            chosen = published(name)
            if chosen:
                return chosen
    source = weights_file(fallback)
    if weights == "auto" and hub.reachable(source[0], timeout=PROBE_TIMEOUT_S):
        print(f"  no published weights on disk; the network answers: downloading {fallback}'s published "
              f"file once into {hub.hub_cache_dir()} ({source[0]})", flush=True)
        chosen = published(fallback)
        if chosen:
            return chosen
    where = f"{hub.hub_cache_dir()}" + (f" or {hub.MIRROR_ENV}" if os.environ.get(hub.MIRROR_ENV) else "")
    reason = ("--encoder_weights untrained" if weights == "untrained"
              else f"no published weights were found in {where}")
    hint = f" Put {source[1]} there (from {source[0]}) to use the trained one." if source else ""
    return EncoderSpec(fallback, pretrained=False), (
        f"an UNTRAINED {fallback} network (fixed-seed random weights) because {reason}. The samples and "
        f"scores show how much of this random representation RCDM keeps, not what a self-supervised "
        f"representation knows.{hint}"
    )


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    out_dir: str
    minutes: float
    train_steps: int
    image_size: int
    num_channels: int
    num_res_blocks: int
    batch_size: int
    lr: float
    ema_rate: str
    predict_xstart: bool
    crops_per_photo: int
    samples_per_image: int
    sampler: str
    sampling_steps: int
    interpolation_points: int
    type_model: str
    encoder_weights: str
    precision: str
    encoder_precision: str
    inception_path: str
    download_inception: bool
    retrain: bool
    seed: int
    progress: bool
    norm_style: str = "gn"
    feat_drop_prob: float = 0.0
    guidance_scale: float = 1.0
    init_from: str = ""

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset("quickstart", image_size=self.image_size, num_channels=self.num_channels,
                                  num_res_blocks=self.num_res_blocks, predict_xstart=self.predict_xstart,
                                  norm_style=self.norm_style, feat_drop_prob=self.feat_drop_prob)

    def model_flags(self) -> dict:
        return self.model_config().flags()


# The quickstart's own flags; the others are the declared ones (`cli.flags`) with its defaults.
QUICKSTART_FLAGS = (
    Flag("minutes", 5.0, float, "training time budget (the run takes ~2 min more)", range=Range(0, 100000)),
    Flag("train_steps", 0, int, "train exactly this many steps instead of --minutes", range=Range(0)),
    Flag("crops_per_photo", 10, int, "training crops cut from each photograph", range=Range(1, 1000)),
    Flag("samples_per_image", 4, int, "samples drawn from each held-out view", range=Range(1, 1000)),
    Flag("interpolation_points", 8, int, "points of the interpolation, both ends included", range=Range(2, 1000)),
    Flag("encoder_weights", "auto", str, "auto: published weights on disk, else downloaded when the network "
                                         "answers (once), else untrained; published; untrained; or, for a "
                                         "timm: or open_clip: --type_model, a weights file"),
    Flag("retrain", False, bool, "train again even if a trained model exists (the previous one is kept under "
                                 "another name)"),
)


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog or "quickstart.py", description="Train a small RCDM on real photographs and write a "
               "browsable report, offline, on a CPU.")
    add_flags(p, "out_dir", "image_size", "num_channels", "num_res_blocks", "batch_size", "lr", "ema_rate",
              "norm_style", "feat_drop_prob", "guidance_scale", "predict_xstart", "sampler", "steps", "type_model",
              "precision", "encoder_precision", "inception_path", "download_inception", "seed", "progress", "init_from",
              defaults={"out_dir": "quickstart_out", "image_size": 32, "num_channels": 32, "num_res_blocks": 1,
                        "batch_size": 16, "lr": 1e-3, "ema_rate": "0.99", "predict_xstart": True,
                        "sampler": "ddim", "steps": 25, "type_model": "auto", "precision": "auto",
                        "encoder_precision": "auto", "download_inception": False},
              helps={"out_dir": "folder for everything, report included",
                     "image_size": "resolution of the RCDM: 32 or 64",
                     "batch_size": "images per step (measured: 16 keeps the conditioning better than 8 or 4 in the same minutes, even with fewer steps)",
                     "ema_rate": "EMA rate of the weights sampled from",
                     "predict_xstart": "the UNet predicts the clean image (learns the conditional mean fast; "
                                       "False: it predicts the noise, as the published models)",
                     "type_model": "encoder: auto (the first published ResNet-50 on disk, else dino), dino, simclr, "
                                   "barlow, vicreg, supervised, a torchvision name or a checkpoint file",
                     "init_from": "start training from a UNet checkpoint of the quickstart's architecture (e.g. "
                                  "an unconditional one, or another encoder's quickstart model: its ssl_emb is "
                                  "made anew); see docs/training.md",
                     "inception_path": "FID Inception weights file (FID/IS are skipped without one unless it is in "
                                       "the torch.hub cache or --download_inception)"},
              choices={"image_size": (32, 64), "precision": ("auto", "fp32", "bf16"),
                       "encoder_precision": ("auto", "fp32", "bf16")})
    for flag in QUICKSTART_FLAGS:
        flag.add_to(p)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {**vars(args), "sampling_steps": args.steps}
    s = Settings(**{k: given[k] for k in Settings.__dataclass_fields__})
    checks = [
        (s.minutes > 0 or s.train_steps > 0, "--minutes must be positive (or give --train_steps)"),
        (s.train_steps >= 0, "--train_steps must be 0 (use --minutes) or positive"),
        (s.num_channels > 0 and s.num_channels % 32 == 0, "--num_channels must be a multiple of 32"),
        (s.num_res_blocks >= 1, "--num_res_blocks must be at least 1"),
        (s.batch_size >= 1, "--batch_size must be at least 1"),
        (s.crops_per_photo >= 1, "--crops_per_photo must be at least 1"),
        (s.samples_per_image >= 1, "--samples_per_image must be at least 1"),
        (s.sampling_steps >= 1, "--steps must be at least 1"),
        (s.interpolation_points >= 2, "--interpolation_points must be at least 2 (both ends)"),
        (0 <= s.feat_drop_prob < 1, "--feat_drop_prob must be in [0, 1)"),
        (s.guidance_scale == 1 or s.feat_drop_prob > 0,
         "--guidance_scale needs a model trained with --feat_drop_prob > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    su.check_out_dir(s.out_dir)  # a folder that cannot be created or written: before any work
    if s.init_from:  # a foundation that cannot be read or does not fit: before any work
        weights = foundations.load_foundation(s.init_from, progress=s.progress)
        foundations.check_fits(weights, lambda: s.model_config().build()[0])
    return s


def training_key(s: Settings, encoder: dict, train_files: Sequence[str]) -> str:
    """What decides the trained weights: a model is reused only when all of it is the same."""

    decided_by = {
        "version": SETTINGS_VERSION, "model": s.model_flags(), "encoder": encoder,
        "files": [os.path.basename(f) for f in train_files], "budget": [s.minutes, s.train_steps],
        "train": [s.batch_size, s.lr, s.ema_rate, resolve_precision(s.precision), s.seed],
    }
    if s.init_from:  # the foundation's content, not its name
        decided_by["init_from"] = hub.file_sha256(s.init_from) if os.path.isfile(s.init_from) else s.init_from
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- training


def train(s: Settings, run_dir: Path, train_files: list[str], features, encoder: dict) -> dict:
    """Train (or resume) in `run_dir` with the package's `train`; returns the marker record naming
    the EMA checkpoint."""

    device = default_device()
    speed = resolve_speed(s.precision, device=device, channels_last=_bf16_on_cpu(s.precision, device))

    def on_start(loop: TrainLoop) -> None:
        if device.type == "cpu":
            _choose_threads(loop, s, int(features.shape[-1]), device, speed.channels_last)
        if loop.step:
            print(f"  resuming the unfinished training in {run_dir} at step {loop.step}", flush=True)

    # Every 10 steps, or ~10 points for a short --train_steps run, so the loss curve has points.
    log_interval = 10 if not s.train_steps or s.train_steps >= 100 else max(1, s.train_steps // 10)
    run = train_rcdm(
        str(Path(train_files[0]).parent), str(run_dir), model=s.model_config(), encoder=encoder,
        image_paths=train_files, features=features, batch_size=s.batch_size, lr=s.lr, ema_rate=s.ema_rate,
        log_interval=log_interval, save_interval=500, precision=s.precision, channels_last=speed.channels_last,
        max_steps=s.train_steps, max_minutes=0.0 if s.train_steps else s.minutes, random_flip=True, num_workers=0,
        seed=s.seed, progress=s.progress, init_from=s.init_from or None, log_formats="log,csv",
        train_meta={"data": "scikit-image photographs (quickstart)"}, on_start=on_start,
    )
    record = {"checkpoint": os.path.basename(run.checkpoint), "steps": run.step, "steps_this_run": run.steps_this_run,
              "seconds": round(run.seconds, 1),
              "images_per_second": round(run.steps_this_run * s.batch_size / max(run.seconds, 1e-9), 2)}
    logger.reset()
    return record


def _choose_threads(loop: TrainLoop, s: Settings, ssl_dim: int, device: torch.device,
                    channels_last: bool) -> None:
    """Train on the CPU thread count that runs this model's steps fastest here and now (measured:
    the quickstart's tiny UNet is mostly per-operation overhead, where one thread can beat two)."""

    x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    feat = torch.randn(s.batch_size, ssl_dim, device=device)
    t = torch.arange(s.batch_size, device=device) * (loop.diffusion.num_timesteps // s.batch_size)

    def forward_backward() -> None:
        loss = loop.diffusion.training_losses(loop.forward_model, x, t, model_kwargs={"feat": feat})["loss"]
        loss.mean().backward()

    with torch.random.fork_rng(devices=[]):  # the probe's noise must not shift training's random stream
        threads, seconds = fastest_thread_count(forward_backward)
    loop.model.zero_grad(set_to_none=True)
    timings = ", ".join(f"{n} thread{'s' if n > 1 else ''} {1000 * sec:.0f} ms" for n, sec in seconds.items())
    print(f"  training on {threads} CPU thread{'s' if threads > 1 else ''} (a step's forward and backward: "
          f"{timings})", flush=True)


# ----------------------------------------------------------------------------- report pieces


def loss_curve_svg(csv_path: Path, out: Path, width: int = 640, height: int = 260) -> dict:
    """Plot `loss` against `step` from the logger's progress.csv as a small SVG file."""

    steps, losses = [], []
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    steps.append(float(row["step"]))
                    losses.append(float(row["loss"]))
                except (KeyError, TypeError, ValueError):
                    continue
    pad_l, pad_r, pad_t, pad_b = 56, 16, 16, 36
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    if len(steps) >= 1:
        x0, x1 = min(steps), max(steps)
        y0, y1 = min(losses), max(losses)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def xy(x: float, y: float) -> str:
            return f"{pad_l + (x - x0) / (x1 - x0) * w:.1f},{pad_t + h - (y - y0) / (y1 - y0) * h:.1f}"

        points = " ".join(xy(x, y) for x, y in zip(steps, losses))
        parts.append(f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{points}"/>')
        for frac in (0, 0.5, 1):
            yv = y0 + frac * (y1 - y0)
            ty = pad_t + h - frac * h
            parts.append(f'<text x="{pad_l - 6}" y="{ty + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
            xv = x0 + frac * (x1 - x0)
            parts.append(f'<text x="{pad_l + frac * w:.1f}" y="{pad_t + h + 16}" text-anchor="middle">{xv:.0f}</text>')
        parts.append(f'<text x="{pad_l + w / 2}" y="{height - 4}" text-anchor="middle">training step</text>')
        parts.append(f'<text x="14" y="{pad_t + h / 2}" transform="rotate(-90 14 {pad_t + h / 2})" '
                     f'text-anchor="middle">loss (MSE)</text>')
    else:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no logged steps</text>')
    parts.append("</svg>")
    fileio.atomic_write_text(str(out), "\n".join(parts))
    return {"points": len(steps), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def contact_sheet(files: Sequence[str], out: Path, size: int = 48, per_row: int = 20) -> None:
    """Thumbnails of the training views in one JPEG (so the report shows what the model saw)."""
    rows = (len(files) + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * (size + 2), rows * (size + 2)), "white")
    for i, f in enumerate(files):
        with Image.open(f) as im:
            sheet.paste(im.convert("RGB").resize((size, size), Image.BICUBIC),
                        ((i % per_row) * (size + 2), (i // per_row) * (size + 2)))
    fileio.save_image(sheet, str(out), quality=90)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table_rows(rows: Iterable[Sequence[Any]], header: bool = False) -> str:
    """`<tr>` lines of escaped cells; with `header` the first cell of each row is a `<th>`."""
    lines = []
    for row in rows:
        cells = [html.escape(str(c)) for c in row]
        first = f"<th>{cells[0]}</th>" if header else f"<td>{cells[0]}</td>"
        lines.append("<tr>" + first + "".join(f"<td>{c}</td>" for c in cells[1:]) + "</tr>")
    return "\n".join(lines)


def report_template() -> Template:
    """The report's page, `quickstart_report.html` shipped next to this module (`$name` fields)."""
    return Template(resources.files(__package__).joinpath(REPORT_TEMPLATE).read_text(encoding="utf-8"))


def write_report(out_dir: Path, r: dict) -> Path:
    """`index.html`: images are files next to it (referenced by relative name), nothing inlined."""
    fid = r["fidelity"]
    m, sh, ch, ceil = fid["model"], fid["shuffled"], fid["chance"], r["ceiling"]
    score_rows = [(name, _fmt(m[k], d), _fmt(sh[k], d), _fmt(ch[k], d), _fmt(ceil[k], d))
                  for name, k, d in (("mean rank (lower is better)", "mean_rank", 2), ("top-1 accuracy", "top1", 3),
                                     ("top-5 accuracy", "top5", 3), ("mean reciprocal rank (MRR)", "mrr", 3))]
    per_image_rows = [(i + 1, h["name"] + (" (photo never trained on)" if h["unseen_photo"] else ""), f"{rank:.2f}")
                      for i, (h, rank) in enumerate(zip(r["heldout"], m["per_condition_rank"]))]
    f = r["fid_is"]
    if f.get("fid") is not None:
        fid_is = (f"FID {f['fid']:.2f} of the {f['num_samples']} held-out samples against the "
                  f"{f['num_reference']} training views at {r['settings']['image_size']}x"
                  f"{r['settings']['image_size']}; Inception Score {f['inception_score']:.2f} \u00b1 "
                  f"{f['inception_score_std']:.2f}. With so few images FID is strongly biased upwards: "
                  f"compare it only with runs of the same size. Weights: {f['inception_weights']}.")
    else:
        fid_is = f"FID and IS were not computed: {f['skipped']}"
    s, t, manip = r["settings"], r["training"], r["manipulation"]
    credit_rows = [(p.title, f"skimage.data.{p.name}()", p.credit, p.licence,
                    "held out entirely" if p.name in UNSEEN_PHOTOS else "training crops + held-out whole photo")
                   for p in PHOTOS]
    text = {  # plain text, escaped below
        "version": r["version"], "finished": r["finished"], "encoder_sentence": r["encoder_sentence"],
        "verdict": r["verdict"], "samples_per_condition": fid["samples_per_condition"],
        "num_conditions": fid["num_conditions"], "metric": fid["metric"], "num_shuffles": fid["num_shuffles"],
        "size": s["image_size"], "fid_is": fid_is, "samples_per_image": s["samples_per_image"],
        "sampler": s["sampler"], "sampling_steps": s["sampling_steps"], "num_unseen": len(UNSEEN_PHOTOS),
        "samples_npz": out_dir / "samples.npz", "interpolation_from": INTERPOLATION_PAIR[0],
        "interpolation_to": INTERPOLATION_PAIR[1], "interpolation_points": s["interpolation_points"],
        "n_neighbors": manip["n_neighbors"], "manipulation_source": MANIPULATION_PAIR[0],
        "num_dims": manip["num_dims"], "ssl_dim": manip["ssl_dim"], "n_common": manip["n_common"],
        "manipulation_target": MANIPULATION_PAIR[1], "train_steps": t["steps"], "batch_size": s["batch_size"],
        "images_per_second": t["images_per_second"], "this_run": "" if t.get("reused") else ", this run",
        "train_time": "reused from an earlier run" if t.get("reused") else f"{t['seconds']:.0f} s",
        "first_loss": _fmt(r["loss"]["first_loss"]), "last_loss": _fmt(r["loss"]["last_loss"]),
        "checkpoint_path": t["checkpoint_path"], "num_train": r["num_train"], "command": r["command"],
        "python_version": platform.python_version(), "torch_version": torch.__version__, "device": r["device"],
        "cpu_count": os.cpu_count(),
    }
    fields = {k: html.escape(str(v)) for k, v in text.items()}
    fields.update(
        encoder_class="ok" if r["encoder"]["pretrained"] else "warn",
        score_rows=_table_rows(score_rows, header=True),
        per_image_rows=_table_rows(per_image_rows),
        settings_rows=_table_rows(s.items(), header=True),
        timing_rows=_table_rows(((k, f"{v:.1f} s") for k, v in r["timings"].items()), header=True),
        credit_rows=_table_rows(credit_rows),
    )
    path = out_dir / REPORT
    fileio.atomic_write_text(str(path), report_template().substitute(fields))
    return path


# ----------------------------------------------------------------------------- the run


class Stages:
    """Numbered progress lines with timings."""

    def __init__(self, total: int):
        self.total, self.n, self.timings, self._t = total, 0, {}, None
        self._name = None

    def start(self, name: str, text: str) -> None:
        self.stop()
        self.n += 1
        self._name, self._t = name, time.monotonic()
        print(f"[{self.n}/{self.total}] {text}", flush=True)

    def stop(self) -> None:
        if self._name is not None:
            self.timings[self._name] = time.monotonic() - self._t
            self._name = None


def _fidelity_verdict(fid: dict) -> str:
    m, sh, ch = fid["model"], fid["shuffled"], fid["chance"]
    ratio = m["mrr"] / ch["mrr"]
    if m["mrr"] > sh["mrr"] + 0.1 and ratio > 1.5:
        head = "The samples keep their conditioning representation clearly better than chance"
    elif m["mrr"] > sh["mrr"]:
        head = "The samples keep their conditioning representation a little better than chance"
    else:
        head = "The samples do NOT keep their conditioning representation better than chance (train longer)"
    return (f"{head}: MRR {m['mrr']:.3f} vs {sh['mrr']:.3f} for shuffled conditioning (chance {ch['mrr']:.3f}, "
            f"{ratio:.1f}x); mean rank {m['mean_rank']:.2f} vs {sh['mean_rank']:.2f} among "
            f"{fid['num_conditions']}; top-1 {m['top1']:.2f} vs {sh['top1']:.2f}.")


def _bf16_on_cpu(precision: str, device: torch.device) -> bool:
    """An explicit bf16 on a CPU runs channels-last (faster bf16 convolutions); auto decides itself."""
    return device.type == "cpu" and precision == "bf16"


# What each stage may take of the default run (about 9 minutes: 5 of training and these), in
# seconds. A machine too slow for them gets less work, said on the console, rather than a run of
# half an hour. --train_steps runs (exact, for comparisons) are never scaled.
ENCODING_SHARE_S = 75.0
SAMPLING_SHARE_S = 100.0
MIN_CROPS_PER_PHOTO = 3
MIN_SAMPLES_PER_IMAGE = 2


def _seconds_per_call(fn: Callable[[], Any], reps: int = 2) -> float:
    """The best of `reps` timed calls after a first (warm-up) call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.monotonic()
        fn()
        best = min(best, time.monotonic() - start)
    return best


def fit_encoding_budget(s: Settings, train_files: list[str], todo: int, seconds_per_view: float) -> list[str]:
    """The training views to encode within `ENCODING_SHARE_S`: all of them when they fit, else the
    first crops of every photo (at least `MIN_CROPS_PER_PHOTO`), said plainly."""
    estimate = todo * seconds_per_view
    if s.train_steps or estimate <= ENCODING_SHARE_S:
        return train_files
    crops = max(MIN_CROPS_PER_PHOTO, int(s.crops_per_photo * ENCODING_SHARE_S / estimate))
    if crops >= s.crops_per_photo:
        return train_files
    kept = [f for f in train_files if int(Path(f).name.rsplit("_", 4)[-4]) < crops]
    print(f"  encoding {todo} views would take ~{estimate:.0f} s on this machine, more than its "
          f"{ENCODING_SHARE_S:.0f} s share of the run: using {crops} crops per photo instead of "
          f"{s.crops_per_photo} ({len(kept)} views; --crops_per_photo with --train_steps runs them all)",
          flush=True)
    return kept


def fit_sampling_budget(s: Settings, seconds_per_step: float, num_conditions: int) -> int:
    """Samples per held-out view within `SAMPLING_SHARE_S` (at least `MIN_SAMPLES_PER_IMAGE`).

    `seconds_per_step`: one UNet forward at the batch of `s.samples_per_image` samples of every view.
    The interpolation and manipulation grids cost about half as much again.
    """
    estimate = 1.5 * seconds_per_step * s.sampling_steps
    if s.train_steps or estimate <= SAMPLING_SHARE_S:
        return s.samples_per_image
    k = max(MIN_SAMPLES_PER_IMAGE, int(s.samples_per_image * SAMPLING_SHARE_S / estimate))
    if k < s.samples_per_image:
        print(f"  sampling {s.samples_per_image} images of each of {num_conditions} views would take "
              f"~{estimate:.0f} s on this machine, more than its {SAMPLING_SHARE_S:.0f} s share of the run: "
              f"{k} per view instead", flush=True)
    return min(k, s.samples_per_image)


def run(s: Settings, command: str) -> dict:
    """The whole quickstart; returns what the report shows (also written to scores.json)."""

    wall = time.monotonic()
    out = Path(s.out_dir)
    stages = Stages(8)
    device = default_device()

    # The encoder is chosen first: with --encoder_weights published and no file, nothing else is done.
    stages.start("encoder", "encoder: choosing the frozen encoder")
    encoder_spec, sentence = choose_encoder(s.type_model, s.encoder_weights)
    print(f"  encoder: {sentence}", flush=True)

    stages.start("photos", "photographs: cutting training crops and held-out views from scikit-image's photos")
    out.mkdir(parents=True, exist_ok=True)
    train_files, heldout = prepare_views(out / "data", s.crops_per_photo, s.seed)
    print(f"  {len(train_files)} training views of {len(PHOTOS) - len(UNSEEN_PHOTOS)} photos, "
          f"{len(heldout)} held-out views ({len(UNSEEN_PHOTOS)} of photos never trained on)", flush=True)

    stages.start("features", "features: encoding the training views once (cached for later runs)")

    built = []

    def make_encoder():
        if not built:
            built.append(encoder_spec.build(device))
        return built[0]

    # Precision and kernels are measured once for the whole run (`--precision auto`), said in one line.
    unet_speed = resolve_speed(s.precision, device=device, channels_last=_bf16_on_cpu(s.precision, device))
    encoder_precision = resolve_precision(s.encoder_precision, device=device)
    print(f"  precision: UNet {unet_speed.precision}"
          f"{', channels-last' if unet_speed.channels_last else ''}, encoder {encoder_precision}", flush=True)
    fileio.make_folder(str(out / "features"))  # refuses a planted link
    cached = load_cache(str(out / "features"))
    known = set(cached["paths"]) | set(cached["bad"]) if cached else set()
    todo = sum(1 for f in train_files if Path(f).name not in known)
    if todo and not s.train_steps:
        # Encoding a couple of views first tells how long all of them would take here.
        views = torch.stack([encoder_input(f, size=encoder_spec.input_size, normalize=encoder_spec.input_normalize)
                             for f in train_files[:2]])
        views = torch.cat([views, views.flip(-1)]).to(device)  # each view is encoded mirrored too
        per_view = _seconds_per_call(lambda: encode_views(make_encoder(), views, encoder_precision)) / 2
        train_files = fit_encoding_budget(s, train_files, todo, per_view)
    logger.configure(dir=str(out / "features"), format_strs="log")
    train_files, features = prepare_feature_cache(
        str(out / "features"), str(out / "data" / "train"), train_files, encoder_spec, make_encoder,
        batch_size=16, num_workers=0, precision=encoder_precision, progress=s.progress,
    )
    logger.reset()

    stages.start("training", "training: a small RCDM on the cached representations")
    encoder_info = encoder_spec.with_width(features.shape[-1]).to_dict()
    key = training_key(s, encoder_info, train_files)
    run_dir = out / f"model_{key}"
    if run_dir.is_symlink():  # a planted link would send the checkpoints elsewhere
        fileio.make_folder(str(run_dir))
    marker = run_dir / MARKER
    record = None
    if marker.is_file() and not s.retrain:
        record = json.loads(marker.read_text())
        if (run_dir / record["checkpoint"]).is_file():
            record["reused"] = True
            print(f"  reusing the model trained earlier with these settings: {run_dir / record['checkpoint']} "
                  f"({record['steps']} steps; pass --retrain to train again)", flush=True)
        else:
            record = None
    if record is None:
        if s.retrain and run_dir.exists():
            kept = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(kept)
            print(f"  --retrain: the previous model is kept in {kept}", flush=True)
        budget = f"{s.train_steps} steps" if s.train_steps else f"{s.minutes:g} minute(s)"
        print(f"  training for {budget} on {device} ({unet_speed.precision}), batch {s.batch_size}, "
              f"{s.image_size}x{s.image_size}; checkpoints in {run_dir}", flush=True)
        record = train(s, run_dir, train_files, features, encoder_info)
        record["reused"] = False
        fileio.atomic_write_text(str(marker), json.dumps(record, indent=2))
        print(f"  trained {record['steps_this_run']} steps in {record['seconds']:.0f} s "
              f"({record['images_per_second']} images/s)", flush=True)
    ckpt = run_dir / record["checkpoint"]
    record["checkpoint_path"] = str(ckpt)

    stages.start("sampling", "sampling: from the representations of the held-out views")

    rcdm = RCDM.from_checkpoint(ckpt, sampler=s.sampler, steps=s.sampling_steps, guidance_scale=s.guidance_scale,
                                device=str(device), precision=s.precision or None, progress=s.progress,
                                channels_last=_bf16_on_cpu(s.precision, device))
    su.seed_everything(s.seed)
    held_paths = [h["path"] for h in heldout]
    feats = rcdm.encode(held_paths)
    images = torch.stack([model_input(p, s.image_size) for p in held_paths])
    k = s.samples_per_image
    if not s.train_steps:
        unet = rcdm._model_for_sampling()
        batch = len(held_paths) * k
        x = torch.randn(batch, 3, s.image_size, s.image_size, device=rcdm.device)
        t = torch.full((batch,), 500, device=rcdm.device)
        with torch.no_grad():
            step_s = _seconds_per_call(lambda: unet(x, t, feat=feats.repeat_interleave(k, dim=0)), reps=1)
        k = fit_sampling_budget(s, step_s, len(held_paths))
        su.seed_everything(s.seed)
    flat = rcdm.sample(feats.repeat_interleave(k, dim=0))
    samples = flat.view(len(held_paths), k, *flat.shape[1:]).cpu()
    su.save_grid([su.row(images[i], samples[i]) for i in range(len(held_paths))], str(out / "samples.jpeg"))
    samples_u8 = su.to_uint8(samples)
    meta = su.run_metadata(rcdm, s.seed)
    su.save_npz(str(out / "samples.npz"), samples=samples_u8, features=feats, images=su.to_uint8(images),
                paths=held_paths, **meta)

    stages.start("visualise", "interpolation and manipulation")
    idx = {h["name"]: i for i, h in enumerate(heldout)}
    a, b = (idx[n] for n in INTERPOLATION_PAIR)
    inter = rcdm.interpolate(feats[a], feats[b], s.interpolation_points, methods=INTERPOLATIONS)
    inter_rows = inter["samples"][:, :, 0].cpu()
    su.save_grid([su.row(images[a], r, last=images[b]) for r in inter_rows], str(out / "interpolation.jpeg"))
    src, tgt = (idx[n] for n in MANIPULATION_PAIR)
    # The neighbourhood is searched among the training views' cached (unflipped) representations.
    neighbor_feats = features.gather(0).float().to(rcdm.device)
    n_neighbors = min(20, len(neighbor_feats))  # the original's 20, fewer in tiny runs
    n_common = min(n_neighbors - 1, round(0.7 * n_neighbors))  # the original's 14 of 20
    man = rcdm.manipulate(feats[src], feats[tgt], neighbor_feats, n_neighbors=n_neighbors, n_common=n_common,
                          num_samples=k)
    su.save_grid([su.row(img, r) for img, r in zip((images[src], images[src], images[tgt]), man["samples"].cpu())],
                 str(out / "manipulation.jpeg"))
    manipulation = {"n_neighbors": n_neighbors, "n_common": n_common, "num_dims": int(len(man["dims"])),
                    "ssl_dim": int(rcdm.ssl_dim)}

    stages.start("scoring", "scoring: representation fidelity vs a shuffled control; FID/IS if possible")
    sample_feats = encode_images(rcdm.ssl_model, samples_u8.reshape(-1, *samples_u8.shape[2:]),
                                 progress=s.progress, desc="encoding samples").features
    fidelity = metrics.representation_fidelity(sample_feats.view(len(held_paths), k, -1), feats.cpu(),
                                               num_shuffles=100, seed=s.seed)
    ceiling_feats = encode_images(rcdm.ssl_model, su.to_uint8(images)).features
    ceiling = metrics.representation_fidelity(ceiling_feats, feats.cpu(), num_shuffles=1).model
    print(fidelity.summary(), flush=True)
    fid_is = _fid_is(s, samples_u8, out / "data" / "train", device)

    stages.start("report", "report: index.html")
    loss = loss_curve_svg(run_dir / "progress.csv", out / "loss_curve.svg")
    contact_sheet(train_files, out / "training_views.jpeg")
    stages.stop()
    result = {
        "version": _package_version(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "settings": asdict(s),
        "device": str(device),
        "encoder": encoder_info,
        "encoder_sentence": sentence,
        "num_train": len(train_files),
        "heldout": heldout,
        "training": record,
        "loss": loss,
        "fidelity": fidelity.as_dict(),
        "ceiling": asdict(ceiling),
        "verdict": _fidelity_verdict(fidelity.as_dict()),
        "fid_is": fid_is,
        "manipulation": manipulation,
        "timings": {**stages.timings, "total": time.monotonic() - wall},
    }
    report = write_report(out, result)
    fileio.atomic_write_text(str(out / "scores.json"), json.dumps(result, indent=2, default=str))
    print(result["verdict"], flush=True)
    print(f"done in {result['timings']['total']:.0f} s. Open the report: {report.resolve().as_uri()}", flush=True)
    print("Explore the model in your browser (pip install 'guided-diffusion-rcdm[app]'): "
          + shlex.join(["rcdm", "explore", "--model_path", str(ckpt), "--images", str(out / "data" / "heldout")]),
          flush=True)
    return result


def latest_model(out_dir: str | Path = "quickstart_out") -> Path | None:
    """The checkpoint of the newest finished quickstart training under `out_dir`, or None."""
    found = []
    for marker in Path(out_dir).glob(f"model_*/{MARKER}"):
        try:
            ckpt = marker.parent / json.loads(marker.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ckpt.is_file():
            found.append((marker.stat().st_mtime, ckpt))
    return max(found)[1] if found else None


def _fid_is(s: Settings, samples_u8: np.ndarray, ref: Path, device: torch.device) -> dict:
    try:
        net = metrics.load_inception(s.inception_path or None, download=s.download_inception, device=device)
    except metrics.InceptionWeightsMissing as err:
        print(f"  FID/IS skipped: {err}", flush=True)
        return {"skipped": str(err)}
    scores = metrics.fid_and_is(samples_u8.reshape(-1, *samples_u8.shape[2:]), str(ref), net,
                                progress=s.progress)
    print(f"  FID {scores.fid:.2f}, IS {scores.inception_score:.2f} (few images: biased, for comparison "
          "between runs of the same size only)", flush=True)
    return scores.as_dict()


def _package_version() -> str:
    try:
        return metadata.version("guided-diffusion-rcdm")
    except Exception:
        return "unknown"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm quickstart` / scripts/quickstart.py: the exit status (2: a mistake, said in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_argparser(prog)
    args = parser.parse_args(argv)
    command = shlex.join([*(prog.split() if prog else ["python", "scripts/quickstart.py"]), *argv])
    return run_main(lambda: run(settings_from_args(args), command), parser.prog, parser)
