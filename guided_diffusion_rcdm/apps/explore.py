"""`rcdm explore`: look at a representation interactively, in the browser.

A local web app (Gradio, `pip install 'guided-diffusion-rcdm[app]'`) on one RCDM, started on
127.0.0.1:7860 by default. Its tabs are the library's visualisations, each with the settings that
made it and a download button:

- *Samples*: K samples from an image's representation (sampler, steps, seed, guidance scale);
- *Interpolation*: samples along the linear / spherical path between two images' representations,
  all from shared noise, with a slider over the path;
- *Manipulation*: the dimensions shared by an image's nearest neighbours in a folder, zeroed or
  transplanted from another image (the manipulation script's method);
- *Fidelity*: for the images on screen, each sample's rank of its own conditioning image among
  them, against the shuffled-conditioning control (`metrics.representation_fidelity`).

Every picture comes from the `RCDM` module's methods (`encode`, `sample`, `sample_shared_noise`
through `interpolate` / `manipulate`); the app has no sampling or encoding code of its own. The
model and encoder load once; the representations of the image set (`--images`, else the
quickstart's held-out photos) are computed once. Sampling runs in a queue, one job at a time per
model (the others see their position), with a progress bar over the sampler's steps. Uploads and
outputs stay in the app's own temporary folder, deleted on exit; nothing is sent anywhere (no
analytics, no share link).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import metrics
from ..cli import sampling as su
from ..cli.flags import Flag, Parser, add_flags
from ..cli.policy import flag_message, run_main
from ..errors import UsageError, UserError
from ..image_datasets import IMAGE_EXTENSIONS, find_images, load_rgb_image, model_input
from ..RCDM import RCDM
from ..representation_ops import INTERPOLATIONS
from ..samplers import SAMPLERS
from . import quickstart

MIN_SIDE = 16  # smaller uploads are refused: the encoder would see one blown-up pixel block
MAX_SAMPLES = 16
MAX_FIDELITY_IMAGES = 16
MAX_POINTS = 16
EXTRA = "app"  # setup.py's extra that installs gradio
NO_NETWORK_ENV = {"GRADIO_ANALYTICS_ENABLED": "False"}  # no usage statistics, no version check
# System fonts: the default theme would fetch its fonts from the internet.
FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")

EXPLORE_FLAGS = (
    Flag("images", "", help="folder of images to pick from and to search neighbours in (default: the "
                            "quickstart's held-out photos)"),
    Flag("host", "127.0.0.1", help="address to serve on (127.0.0.1: this machine only)"),
    Flag("port", 7860, int, "port to serve on (0: a free one)"),
    Flag("benchmark", 0, int, "instead of serving: time N clicks of 'sample' (4 samples) through the app's own "
                              "API and print the figures"),
)


# ----------------------------------------------------------------------------- inputs


def import_gradio():
    """gradio, imported with everything that would reach the network switched off; a missing
    gradio is a one-line `UsageError` naming the extra."""
    for key, value in NO_NETWORK_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio as gr
    except ImportError:
        raise UsageError(f"the app needs gradio: pip install 'guided-diffusion-rcdm[{EXTRA}]'") from None
    return gr


def read_image(path: str | Path, name: str | None = None) -> Image.Image:
    """An uploaded or picked file as an RGB image, or a `UsageError` saying why it cannot be used:
    not an image, smaller than `MIN_SIDE` pixels, or over PIL's decompression-bomb limit."""
    name = name or Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = load_rgb_image(str(path))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = "too many pixels"
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the header alone: its size
            try:
                with Image.open(path) as im:
                    size = f"{im.size[0]}x{im.size[1]} pixels"
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        raise UsageError(f"{name}: {size} is more than this app decodes ({Image.MAX_IMAGE_PIXELS} pixels, "
                         "PIL's decompression-bomb limit); upload a smaller image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"{name} is not an image this app can read ({type(err).__name__}); upload a "
                         f"{', '.join(IMAGE_EXTENSIONS[:4])}, ... file") from None
    if min(image.size) < MIN_SIDE:
        raise UsageError(f"{name}: {image.size[0]}x{image.size[1]} pixels is too small to say anything; the "
                         f"encoder sees {MIN_SIDE} pixels or more a side: upload a larger image")
    return image


def _file_path(upload: Any) -> str | None:
    """The path gradio gives for a File input (a str, or an object with `.name` / `path`)."""
    if upload is None or upload == "":
        return None
    if isinstance(upload, (list, tuple)):
        return _file_path(upload[0]) if upload else None
    if isinstance(upload, dict):
        return upload.get("path") or upload.get("name")
    return str(getattr(upload, "name", upload))


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_image_folder(model_path: str | None, tmp: Path) -> tuple[str, str]:
    """`(folder, where it comes from)` for the image set when `--images` is not given: the held-out
    views next to a quickstart model, else scikit-image's photos (the quickstart's), written into
    the app's temporary folder, else none."""
    if model_path:
        held = Path(model_path).resolve().parent.parent / "data" / "heldout"
        if held.is_dir() and any(held.iterdir()):
            return str(held), "the quickstart's held-out photos"
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return "", "none (pass --images DIR, or upload)"
    folder = tmp / "photos"
    folder.mkdir(exist_ok=True)
    for photo in quickstart.PHOTOS:
        image = quickstart.load_photo(photo.name)
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image.crop((left, top, left + side, top + side)).resize(
            (quickstart.VIEW_SIZE, quickstart.VIEW_SIZE), Image.BICUBIC).save(folder / f"{photo.name}.png")
    return str(folder), "scikit-image's photographs (the quickstart's)"


# ----------------------------------------------------------------------------- the app's state


def encoder_sentence(rcdm: RCDM) -> tuple[str, bool]:
    """`(sentence, trained)`: the encoder and its weights, as the quickstart's report says it."""
    spec = rcdm.encoder_spec
    text = f"{spec.describe()}; record: {json.dumps(rcdm.encoder_info, sort_keys=True)}"
    if not spec.pretrained:
        text += (". UNTRAINED weights (fixed-seed random): the samples show how much of this random "
                 "representation RCDM keeps, not what a self-supervised representation knows.")
    return text, bool(spec.pretrained)


class Explorer:
    """One loaded model, its image set's cached representations and the app's temporary folder.

    Every method that samples is called one at a time (the queue's concurrency limit), so the
    global random state seeded for a call is that call's alone.
    """

    def __init__(self, rcdm: RCDM, model_label: str, images: str = "", images_origin: str = "",
                 tmp: Path | None = None, sampler: str = "ddim", steps: int = 25, seed: int = 0):
        self.tmp = tmp or Path(tempfile.mkdtemp(prefix="rcdm-explore-"))
        self.outputs = self.tmp / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.default_sampler, self.default_steps, self.default_seed = sampler, steps, seed
        self._count = 0
        self._neighbours: dict[tuple, torch.Tensor] = {}
        self.images_folder, self.images_origin = images, images_origin or images
        self.image_paths: list[str] = find_images(images, flag="--images") if images else []
        self._set_model(rcdm, model_label)

    # ---------------------------------------------------------------- the model

    def _set_model(self, rcdm: RCDM, label: str) -> None:
        """Use `rcdm`; the image set is encoded once here (unreadable files are left out)."""
        feats, kept = torch.empty(0), []
        if self.image_paths:
            feats, kept, skipped = rcdm.encode_files(self.image_paths, progress=False)
            for path, reason in skipped:
                print(f"  skipped {path}: {reason}", flush=True)
        self.rcdm, self.model_label = rcdm, label
        self.features = {p: feats[i] for i, p in enumerate(kept)}
        # shown by their path in the folder: two files of one name in subfolders stay apart
        self.names = {os.path.relpath(p, self.images_folder): p for p in kept}
        self._neighbours = {}

    def load_model(self, path: str, device: str | None = None, precision: str | None = None) -> None:
        """Switch to the checkpoint at `path`; on failure the current model stays."""
        if not path or not path.strip():
            raise UsageError("give the path of a checkpoint to load")
        rcdm = RCDM.from_checkpoint(path.strip(), device=device or self.rcdm.sampling.device or None,
                                    precision=precision or self.rcdm.sampling.precision or None,
                                    sampler=self.default_sampler, steps=self.default_steps, progress=True)
        self._set_model(rcdm, path.strip())

    def model_markdown(self) -> str:
        r = self.rcdm
        sentence, trained = encoder_sentence(r)
        flag = "" if trained else "⚠️ "
        guidance = "yes" if getattr(r.rcdm_model, "supports_guidance", False) else "no (trained without --feat_drop_prob)"
        return (f"**Model:** `{self.model_label}`: {r.image_size}x{r.image_size} samples, representation "
                f"{r.ssl_dim}-d, guidance: {guidance}, device {r.device}, precision {r.precision}.  \n"
                f"{flag}**Encoder:** {sentence}  \n"
                f"**Images to pick from:** {len(self.names)} from {self.images_origin or 'none'}.")

    # ---------------------------------------------------------------- inputs

    def conditioning(self, pick: str | None, upload: Any, which: str = "image") -> tuple[torch.Tensor, torch.Tensor, str]:
        """`(1 x D representation, 3 x S x S image as the model sees it, name)` of the uploaded
        file when there is one, else of the picked image of the set (its cached representation)."""
        path = _file_path(upload)
        if path:
            name = Path(path).name
            image = read_image(path, name)
            return self.rcdm.encode(image), model_input(image, self.rcdm.image_size), name
        if pick and pick in self.names:
            full = self.names[pick]
            return (self.features[full].unsqueeze(0), model_input(load_rgb_image(full), self.rcdm.image_size), pick)
        raise UsageError(f"no {which}: upload one or pick one of the set")

    def neighbour_features(self, folder: str) -> torch.Tensor:
        """The representations of a folder's images (recursively), computed once per folder content."""
        folder = (folder or "").strip()
        files = find_images(folder, flag="neighbour folder")
        key = (os.path.abspath(folder), tuple((f, os.path.getmtime(f)) for f in files))
        if key not in self._neighbours:
            cached = [self.features[f] for f in files if f in self.features]
            if len(cached) == len(files):
                feats = torch.stack(cached)
            else:
                feats, kept, _ = self.rcdm.encode_files(files, progress=False)
                if not kept:
                    raise UsageError(f"neighbour folder {folder!r}: none of its {len(files)} files is an image "
                                     "this app can read")
            self._neighbours = {key: feats}  # one folder cached at a time
        return self._neighbours[key]

    # ---------------------------------------------------------------- outputs

    def _configure(self, sampler: str, steps: int, guidance_scale: float | None) -> dict:
        self.rcdm.configure_sampling(sampler=sampler, steps=int(steps),
                                     guidance_scale=1.0 if guidance_scale in (None, "") else float(guidance_scale))
        return {"model": self.model_label, "sampler": sampler, "steps": int(steps),
                "guidance_scale": float(self.rcdm.sampling.guidance_scale)}

    def _save(self, kind: str, rows: Sequence[torch.Tensor], settings: dict) -> str:
        """A PNG grid of `rows` and its settings (PNG text chunk and a JSON next to it); its path."""
        self._count += 1
        path = self.outputs / f"{kind}_{self._count:04d}.png"
        su.save_grid(list(rows), str(path))
        (path.with_suffix(".json")).write_text(json.dumps(settings, indent=2))
        return str(path)

    @staticmethod
    def _pil(images: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in su.to_uint8(images.reshape(-1, *images.shape[-3:]))]

    # ---------------------------------------------------------------- the tabs

    def samples(self, pick, upload, num_samples, sampler, steps, seed, guidance_scale):
        """K samples of one image's representation: `(the image as the model sees it, gallery of
        the samples, grid file, settings)`."""
        k = int(num_samples)
        if not 1 <= k <= MAX_SAMPLES:
            raise UsageError(f"number of samples: 1 to {MAX_SAMPLES}, got {k}")
        feat, image, name = self.conditioning(pick, upload)
        settings = {"tab": "samples", "image": name, "num_samples": k, "seed": int(seed),
                    **self._configure(sampler, steps, guidance_scale)}
        su.seed_everything(int(seed))
        out = self.rcdm.sample(feat.expand(k, -1), progress=True).cpu()
        gallery = [(im, f"sample {i + 1}") for i, im in enumerate(self._pil(out))]
        return self._pil(image)[0], gallery, self._save("samples", [su.row(image, out)], settings), settings

    def interpolate(self, pick_a, upload_a, pick_b, upload_b, methods, num_points, sampler, steps, seed):
        """Samples along the path between two representations, one shared noise: `(gallery, the
        images per point for the slider, grid file, settings)`."""
        methods = [m for m in INTERPOLATIONS if m in (methods or [])]
        if not methods:
            raise UsageError(f"choose at least one path: {' or '.join(INTERPOLATIONS)}")
        points = int(num_points)
        if not 2 <= points <= MAX_POINTS:
            raise UsageError(f"points on the path: 2 to {MAX_POINTS} (both ends included), got {points}")
        fa, ia, na = self.conditioning(pick_a, upload_a, "first image")
        fb, ib, nb = self.conditioning(pick_b, upload_b, "second image")
        settings = {"tab": "interpolation", "from": na, "to": nb, "methods": methods, "points": points,
                    "seed": int(seed), **self._configure(sampler, steps, 1.0)}
        su.seed_everything(int(seed))
        res = self.rcdm.interpolate(fa, fb, num_points=points, methods=methods, num_samples=1, progress=True)
        rows = res["samples"][:, :, 0].cpu()  # M x P x 3 x S x S
        gallery = [(im, f"{m} α={a:.2f}") for m, r in zip(methods, rows)
                   for im, a in zip(self._pil(r), res["alphas"])]
        by_point = [[(gallery[mi * points + p][0], f"{m} α={res['alphas'][p]:.2f}") for mi, m in enumerate(methods)]
                    for p in range(points)]
        grid = self._save("interpolation", [su.row(ia, r, last=ib) for r in rows], settings)
        return gallery, by_point, grid, settings

    def manipulate(self, pick_s, upload_s, pick_t, upload_t, folder, n_neighbors, n_common, num_samples,
                   sampler, steps, seed):
        """Zero / transplant the source's neighbourhood's shared dimensions: `(gallery, grid file,
        settings with the dimensions)`."""
        k = int(num_samples)
        if not 1 <= k <= MAX_SAMPLES:
            raise UsageError(f"number of samples: 1 to {MAX_SAMPLES}, got {k}")
        fs, i_s, ns = self.conditioning(pick_s, upload_s, "source image")
        ft, i_t, nt = self.conditioning(pick_t, upload_t, "target image")
        hood = self.neighbour_features(folder)
        n_neighbors, n_common = int(n_neighbors), int(n_common)
        if n_neighbors < 1:
            raise UsageError(f"number of neighbours: at least 1, got {n_neighbors}")
        if not 0 <= n_common < n_neighbors:
            raise UsageError(f"shared in more than N of the neighbours: N from 0 to {n_neighbors - 1}, got {n_common}")
        settings = {"tab": "manipulation", "source": ns, "target": nt, "neighbour_folder": folder.strip(),
                    "n_neighbors": n_neighbors, "n_common": n_common, "num_samples": k, "seed": int(seed),
                    **self._configure(sampler, steps, 1.0)}
        su.seed_everything(int(seed))
        res = self.rcdm.manipulate(fs, ft, hood, n_neighbors=n_neighbors, n_common=n_common, num_samples=k,
                                   progress=True)
        settings["shared_dims"] = int(len(res["dims"]))
        settings["ssl_dim"] = int(self.rcdm.ssl_dim)
        samples = res["samples"].cpu()  # 3 x K x 3 x S x S
        labels = ("original", "zeroed", f"transplanted from {nt}")
        gallery = [(im, f"{label} {j + 1}") for label, r in zip(labels, samples) for j, im in enumerate(self._pil(r))]
        grid = self._save("manipulation", [su.row(img, r) for img, r in zip((i_s, i_s, i_t), samples)], settings)
        return gallery, grid, settings

    def fidelity(self, picks, num_samples, sampler, steps, seed):
        """Samples of each picked image, then each sample's rank of its own image among the picked
        ones, against the shuffled control: `(grid image, per-image rows, score rows, grid file, settings)`."""
        picks = [p for p in (picks or []) if p in self.names]
        if len(picks) < 2:
            raise UsageError("pick at least 2 images: a rank among 1 image is always 1")
        if len(picks) > MAX_FIDELITY_IMAGES:
            raise UsageError(f"pick at most {MAX_FIDELITY_IMAGES} images")
        k = int(num_samples)
        if not 1 <= k <= MAX_SAMPLES:
            raise UsageError(f"samples per image: 1 to {MAX_SAMPLES}, got {k}")
        feats = torch.stack([self.features[self.names[p]] for p in picks])
        images = [model_input(load_rgb_image(self.names[p]), self.rcdm.image_size) for p in picks]
        settings = {"tab": "fidelity", "images": picks, "samples_per_image": k, "seed": int(seed),
                    **self._configure(sampler, steps, 1.0)}
        su.seed_everything(int(seed))
        flat = self.rcdm.sample(feats.repeat_interleave(k, dim=0), progress=True)
        sample_feats = self.rcdm.encode(flat).cpu().view(len(picks), k, -1)
        result = metrics.representation_fidelity(sample_feats, feats.cpu(), num_shuffles=100, seed=int(seed))
        samples = flat.cpu().view(len(picks), k, *flat.shape[1:])
        rows = [su.row(img, s) for img, s in zip(images, samples)]
        grid = self._save("fidelity", rows, {**settings, "scores": result.as_dict()})
        per_image = [[p, round(r, 2)] for p, r in zip(picks, result.model.per_condition_rank)]
        m, sh, ch = result.model, result.shuffled, result.chance
        scores = [[name, round(getattr(m, key), 3), round(getattr(sh, key), 3), round(ch[key], 3)]
                  for name, key in (("mean rank (lower is better)", "mean_rank"), ("top-1", "top1"),
                                    ("top-5", "top5"), ("MRR", "mrr"))]
        settings["summary"] = result.summary()
        return Image.open(grid).copy(), per_image, scores, grid, settings

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the page


def _in_page(gr, fn: Callable) -> Callable:
    """`fn` with a user's mistake shown in the page (gr.Error), the server serving on."""

    params = list(inspect.signature(fn).parameters.values())

    def wrapped(*args, **kwargs):
        kwargs.pop("progress", None)
        try:
            return fn(*args[:len(params)], **kwargs)
        except (UserError, ValueError) as err:
            raise gr.Error(flag_message(" ".join(str(err).split())) or type(err).__name__) from None

    # The API's parameter names are `fn`'s; the progress bar follows the library's tqdm bars.
    progress = inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=gr.Progress(track_tqdm=True))
    wrapped.__signature__ = inspect.Signature([*params, progress])
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def build_app(explorer: Explorer):
    """The Gradio Blocks of the app (not launched). API names: samples, interpolate, manipulate,
    fidelity, load_model."""
    gr = import_gradio()
    ex = explorer
    names = list(ex.names)
    first = names[0] if names else None
    second = names[1] if len(names) > 1 else first
    guidance = bool(getattr(ex.rcdm.rcdm_model, "supports_guidance", False))
    queue = dict(concurrency_limit=1, concurrency_id="model")  # one sampling job at a time per model

    def picker(label: str, value: str | None, elem_id: str):
        with gr.Group():
            pick = gr.Dropdown(names, value=value, label=f"{label}: pick one of the set", allow_custom_value=False)
            upload = gr.File(label="... or upload one (wins over the pick)", file_types=["image"], type="filepath",
                             height=90, elem_id=f"{elem_id}-upload")
        return pick, upload

    def sampling_controls(default_steps: int):
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value=ex.default_sampler, label="sampler")
            steps = gr.Slider(1, 250, value=default_steps, step=1, label="steps (model calls)")
            seed = gr.Number(ex.default_seed, precision=0, label="seed")
        return sampler, steps, seed

    with gr.Blocks(title="RCDM explore", analytics_enabled=False) as app:
        gr.Markdown("# RCDM explore\nSample images from the representation a frozen encoder gives an image: what "
                    "the samples share, the representation keeps.")
        info = gr.Markdown(ex.model_markdown())
        with gr.Tab("Samples"):
            with gr.Row():
                with gr.Column(scale=1):
                    s_pick, s_upload = picker("image", first, "samples")
                    s_k = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples (K)")
                    s_sampler, s_steps, s_seed = sampling_controls(ex.default_steps)
                    s_guid = gr.Slider(0.0, 5.0, value=1.0, step=0.25, interactive=guidance,
                                       label="guidance scale" + ("" if guidance else
                                                                 " (this model was trained without a null representation)"))
                    s_go = gr.Button("Sample", variant="primary", elem_id="sample-button")
                with gr.Column(scale=2):
                    s_image = gr.Image(label="the image, as the model sees it", format="png", height=140,
                                       width=140, interactive=False, elem_id="samples-image")
                    s_out = gr.Gallery(label="samples", columns=8, height="auto", format="png", elem_id="samples-gallery",
                                       object_fit="contain")
                    s_file = gr.File(label="download (PNG grid: the image, then its samples)")
                    s_set = gr.JSON(label="settings")
            s_go.click(_in_page(gr, ex.samples), [s_pick, s_upload, s_k, s_sampler, s_steps, s_seed, s_guid],
                       [s_image, s_out, s_file, s_set], api_name="samples", **queue)
        with gr.Tab("Interpolation"):
            with gr.Row():
                with gr.Column(scale=1):
                    i_pick_a, i_up_a = picker("from", first, "from")
                    i_pick_b, i_up_b = picker("to", second, "to")
                    i_methods = gr.CheckboxGroup(list(INTERPOLATIONS), value=list(INTERPOLATIONS), label="path")
                    i_points = gr.Slider(2, MAX_POINTS, value=8, step=1, label="points (both ends included)")
                    i_sampler, i_steps, i_seed = sampling_controls(ex.default_steps)
                    i_go = gr.Button("Interpolate", variant="primary", elem_id="interpolate-button")
                with gr.Column(scale=2):
                    i_out = gr.Gallery(label="samples along the path (shared noise)", columns=8, height="auto",
                                       format="png", object_fit="contain", elem_id="interpolation-gallery")
                    i_slider = gr.Slider(0, 7, value=0, step=1, label="position on the path (point)")
                    i_point = gr.Gallery(label="at this point", columns=2, height=220, format="png",
                                         object_fit="contain")
                    i_file = gr.File(label="download (PNG grid: one row per path, the two images at the ends)")
                    i_set = gr.JSON(label="settings")
            i_state = gr.State([])

            def run_interpolation(pick_a, upload_a, pick_b, upload_b, methods, num_points, sampler, steps, seed):
                gallery, by_point, grid, settings = ex.interpolate(pick_a, upload_a, pick_b, upload_b, methods,
                                                                   num_points, sampler, steps, seed)
                return (gallery, by_point,
                        gr.Slider(0, len(by_point) - 1, value=0, step=1), by_point[0], grid, settings)

            run_interpolation.__doc__ = ex.interpolate.__doc__
            i_go.click(_in_page(gr, run_interpolation),
                       [i_pick_a, i_up_a, i_pick_b, i_up_b, i_methods, i_points, i_sampler, i_steps, i_seed],
                       [i_out, i_state, i_slider, i_point, i_file, i_set], api_name="interpolate", **queue)
            i_slider.change(lambda p, st: st[int(p)] if st and int(p) < len(st) else [], [i_slider, i_state],
                            i_point, api_name=False, queue=False)
        with gr.Tab("Manipulation"):
            with gr.Row():
                with gr.Column(scale=1):
                    m_pick_s, m_up_s = picker("source", first, "source")
                    m_pick_t, m_up_t = picker("target (values transplanted)", second, "target")
                    m_folder = gr.Textbox(ex.images_folder, label="neighbour folder (images, searched recursively)")
                    n = max(1, len(names))
                    m_nn = gr.Slider(1, 50, value=min(20, n), step=1, label="neighbours")
                    m_nc = gr.Slider(0, 49, value=min(n - 1, round(0.7 * n), 14), step=1,
                                     label="shared: non-zero in more than this many neighbours")
                    m_k = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples per row")
                    m_sampler, m_steps, m_seed = sampling_controls(ex.default_steps)
                    m_go = gr.Button("Manipulate", variant="primary", elem_id="manipulate-button")
                with gr.Column(scale=2):
                    m_out = gr.Gallery(label="rows: original, shared dimensions zeroed, transplanted", columns=4,
                                       height="auto", format="png", object_fit="contain", elem_id="manipulation-gallery")
                    m_file = gr.File(label="download (PNG grid)")
                    m_set = gr.JSON(label="settings")
            m_go.click(_in_page(gr, ex.manipulate),
                       [m_pick_s, m_up_s, m_pick_t, m_up_t, m_folder, m_nn, m_nc, m_k, m_sampler, m_steps, m_seed],
                       [m_out, m_file, m_set], api_name="manipulate", **queue)
        with gr.Tab("Fidelity"):
            with gr.Row():
                with gr.Column(scale=1):
                    f_picks = gr.Dropdown(names, value=names[:8], multiselect=True, label="images on screen")
                    f_k = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples per image")
                    f_sampler, f_steps, f_seed = sampling_controls(ex.default_steps)
                    f_go = gr.Button("Sample and score", variant="primary", elem_id="fidelity-button")
                    gr.Markdown("Each sample is encoded and its own image ranked among the images on screen "
                                "(cosine similarity; rank 1: its own is the closest). *Shuffled*: the same samples "
                                "against randomly permuted images (100 permutations), the chance level measured.")
                with gr.Column(scale=2):
                    f_grid = gr.Image(label="rows: the image, then its samples", format="png", elem_id="fidelity-grid")
                    f_scores = gr.Dataframe(headers=["score", "model", "shuffled control", "chance"], label="scores")
                    f_ranks = gr.Dataframe(headers=["image", "mean rank of its samples"], label="per image")
                    f_file = gr.File(label="download (PNG grid; scores in the JSON next to it)")
                    f_set = gr.JSON(label="settings")
            f_go.click(_in_page(gr, ex.fidelity), [f_picks, f_k, f_sampler, f_steps, f_seed],
                       [f_grid, f_ranks, f_scores, f_file, f_set], api_name="fidelity", **queue)
        with gr.Accordion("Model", open=False):
            with gr.Row():
                path = gr.Textbox(label="checkpoint to load (the current one stays if it does not load)", scale=4)
                load = gr.Button("Load", scale=1)

            def load_model(checkpoint):
                ex.load_model(checkpoint)
                return ex.model_markdown(), f"loaded {checkpoint.strip()}"

            status = gr.Markdown()
            load.click(_in_page(gr, load_model), [path], [info, status], api_name="load_model", **queue)
    return app


# ----------------------------------------------------------------------------- serving


class Server:
    """The app served on `host:port` in this process (a thread); `close()` stops it and deletes
    the app's temporary folder (also done at exit)."""

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 7860):
        gr = import_gradio()
        self.explorer = explorer
        self._env = os.environ.get("GRADIO_TEMP_DIR")
        uploads = explorer.tmp / "uploads"
        uploads.mkdir(exist_ok=True)
        os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # uploads and gradio's copies stay in our folder
        self.app = build_app(explorer)
        self.app.queue(default_concurrency_limit=1)
        theme = gr.themes.Default(font=list(FONTS), font_mono=list(MONO_FONTS))
        try:
            self.app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                            inbrowser=False, quiet=True, show_error=True, theme=theme, ssr_mode=False,
                            mcp_server=False, enable_monitoring=False)
        except OSError as err:
            self.close()
            raise UsageError(f"--port {port}: cannot serve on {host}:{port} ({err}); choose another port "
                             "(--port 0: a free one)") from None
        self.url = f"http://{host}:{self.app.server_port}/"
        atexit.register(self.close)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.app.close()
        if self._env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self._env
        self.explorer.close()


def open_explorer(model_path: str = "", type_model: str = "", use_head: bool = False, images: str = "",
                  device: str | None = None, precision: str | None = None, sampler: str = "ddim",
                  steps: int = 25, seed: int = 0) -> Explorer:
    """The app's state: the model (the checkpoint, the published `type_model`, else the quickstart's
    latest) loaded once and the image set encoded once. A model that does not load: `UserError`."""
    tmp = Path(tempfile.mkdtemp(prefix="rcdm-explore-"))
    try:
        if images:
            find_images(images, flag="--images")  # a missing or empty folder fails before the model loads
        kwargs = dict(device=device or None, precision=precision or None, sampler=sampler, steps=steps, progress=True)
        if model_path:
            rcdm, label = RCDM.from_checkpoint(model_path, **kwargs), model_path
        elif type_model:
            rcdm = RCDM.from_pretrained(type_model, use_head=use_head, **kwargs)
            label = f"published {type_model} ({'head' if use_head else 'trunk'})"
        else:
            latest = quickstart.latest_model()
            if latest is None:
                raise UsageError("no model: pass --model_path CHECKPOINT or --type_model NAME (a published one), "
                                 "or run the quickstart first (python scripts/quickstart.py), whose latest model "
                                 "is the default")
            model_path = str(latest)
            rcdm, label = RCDM.from_checkpoint(model_path, **kwargs), model_path
        origin = images
        if not images:
            images, origin = default_image_folder(model_path, tmp)
        return Explorer(rcdm, label, images, origin, tmp=tmp, sampler=sampler, steps=steps, seed=seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def benchmark(server: Server, clicks: int, num_samples: int = 4) -> dict[str, float]:
    """Time `clicks` clicks of the Samples tab's button through the app's own API (gradio_client):
    a picked image (representation cached) and an uploaded one (decoded and encoded on the click).
    Returns and prints the median and best seconds of each (after one warm-up click)."""
    from gradio_client import Client, handle_file

    ex = server.explorer
    if not ex.names:
        raise UsageError("--benchmark needs images to pick from: pass --images DIR")
    pick = next(iter(ex.names))
    client = Client(server.url, verbose=False, download_files=str(ex.tmp / "client"))
    args = dict(num_samples=num_samples, sampler=ex.default_sampler, steps=ex.default_steps, seed=0, guidance_scale=1.0)
    results = {}
    for label, inputs in (("picked image", dict(pick=pick, upload=None)),
                          ("uploaded image", dict(pick=None, upload=handle_file(ex.names[pick])))):
        times = []
        for i in range(clicks + 1):
            start = time.perf_counter()
            client.predict(**inputs, **args, api_name="/samples")
            if i:  # the first click warms up
                times.append(time.perf_counter() - start)
        results[label] = {"median_s": statistics.median(times), "best_s": min(times)}
        print(f"click to {num_samples} samples ({label}, {ex.default_sampler} {ex.default_steps} steps, "
              f"{ex.rcdm.image_size}x{ex.rcdm.image_size}): median {statistics.median(times):.2f} s, best "
              f"{min(times):.2f} s over {clicks} clicks", flush=True)
    return results


def create_argparser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog or "rcdm explore", description=__doc__)
    add_flags(p, "model_path", "type_model", "use_head", "device", "precision", "sampler", "steps", "seed",
              defaults={"type_model": "", "sampler": "ddim", "steps": 25},
              helps={"model_path": "RCDM checkpoint (default: the quickstart's latest model in ./quickstart_out)",
                     "type_model": "a published RCDM instead of a checkpoint: dino, simclr, barlow, vicreg, "
                                   "supervised (downloaded once)",
                     "sampler": "the page's default sampler: ddpm, ddim or dpm++",
                     "steps": "the page's default number of sampler steps",
                     "seed": "the page's default seed: the same seed gives the same samples"})
    for flag in EXPLORE_FLAGS:
        flag.add_to(p)
    return p


@contextlib.contextmanager
def _cleanup_on_termination():
    """`kill` and a closed terminal end the app as Ctrl-C does: its temporary folder deleted."""
    stops = (signal.SIGTERM, signal.SIGHUP)
    before = {stop: signal.getsignal(stop) for stop in stops}
    for stop in stops:
        signal.signal(stop, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)


def run(args: argparse.Namespace) -> None:
    if threading.current_thread() is threading.main_thread():
        with _cleanup_on_termination():
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> None:
    import_gradio()  # before any model loads: a missing gradio is said at once
    if args.benchmark < 0:
        raise UsageError(f"--benchmark {args.benchmark}: a number of clicks, 1 or more (0: serve)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: choose a port from 1 to 65535 (0: a free one)")
    explorer = open_explorer(args.model_path, args.type_model, bool(args.use_head), args.images, args.device,
                             args.precision, args.sampler, args.steps, args.seed)
    port = args.port if not args.benchmark else _free_port(args.host)
    server = Server(explorer, args.host, port or _free_port(args.host))
    try:
        if args.benchmark:
            benchmark(server, args.benchmark)
            return
        print(f"RCDM explore: {server.url} (Ctrl-C stops it; uploads are deleted on exit)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        server.close()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`rcdm explore`: the exit status (2: a mistake, said in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_argparser(prog)
    args = parser.parse_args(argv)
    return run_main(lambda: run(args), parser.prog, parser)
