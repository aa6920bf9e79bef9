"""Image decoding and the two crops RCDM needs from every image.

The diffusion model sees an `image_size` crop of the image; the frozen encoder sees a separate
224x224 crop of the same image. Both are scaled to [-1, 1] with `x / 127.5 - 1` (no ImageNet
mean/std): the published models were trained that way. `encoder_input` is the one function that turns
a PIL image or a path into the encoder's input, so no script re-implements the convention.
"""

from __future__ import annotations

import atexit
import json
import math
import multiprocessing.util  # noqa: F401  (registers its exit hook before ours: see _close_open_streams)
import os
import random
import signal
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import blobfile as bf
import numpy as np
import torch
from PIL import Image

from . import dist_util, fileio, logger
from .errors import MissingInputError, UsageError

ENCODER_IMAGE_SIZE = 224
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")

# ImageNet statistics, for encoders trained with them (an opt-in; see `encoder_input`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, str, Path]


# The most pixels an image is decoded at (8192 x 8192): a larger JPEG is decoded at a reduced
# scale (1/2 .. 1/8, which still leaves far more than the 224-pixel crops need); any other larger
# image is refused (`ImageTooLargeError`), and so is a decompression bomb (PIL's limit).
PIXEL_BUDGET = 8192 * 8192


class ImageTooLargeError(OSError):
    """An image file whose size (in pixels) is above `PIXEL_BUDGET`, or a decompression bomb."""


def load_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file (local or blobfile path) into an 8-bit RGB PIL image.

    Grayscale, RGBA (composited on white), palette, CMYK and 16-bit images are converted. Raises the
    decoder's error (`OSError` / `PIL.UnidentifiedImageError`) for a corrupt or non-image file, and
    `ImageTooLargeError` (an `OSError`) for one above `PIXEL_BUDGET` pixels that cannot be decoded at
    a reduced scale, so callers can decide whether to skip it.
    """
    with bf.BlobFile(str(path), "rb") as f:
        try:
            with warnings.catch_warnings():  # the size is checked below, against our own budget
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{path}: {err}") from None
        width, height = image.size
        if width * height > PIXEL_BUDGET and image.format == "JPEG":
            scale = math.ceil(math.sqrt(width * height / PIXEL_BUDGET))
            image.draft("RGB", (max(1, width // scale), max(1, height // scale)))  # decodes at 1/2..1/8
        if image.size[0] * image.size[1] > PIXEL_BUDGET:
            raise ImageTooLargeError(
                f"{path}: {width}x{height} pixels, above the {PIXEL_BUDGET // 10**6}-megapixel budget of the "
                "images this reads; not decoded (shrink the file first)")
        image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: PIL's convert("RGB") clips instead of rescaling, so scale by hand.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _resize_shorter_side(pil_image: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is `size`: box-filter halvings while the image stays at least twice
    the target (better than one bicubic step), then one bicubic resize. Returns an HxWx3 array."""
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    return np.array(pil_image)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and take the centre square, as the original does.

    Returns an `image_size` x `image_size` x 3 uint8 array.
    """
    arr = _resize_shorter_side(pil_image, image_size)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: random.Random | None = None,
) -> np.ndarray:
    """A random square crop covering 80-100% of the shorter side, resized to `image_size`."""
    rng = rng or random
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    arr = _resize_shorter_side(pil_image, rng.randrange(smallest, largest + 1))
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def arr_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array -> 3xHxW float32 tensor in [-1, 1] (`x / 127.5 - 1`)."""
    arr = np.ascontiguousarray(arr).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_rgb_image(image)


def model_input(image: ImageLike, image_size: int) -> torch.Tensor:
    """The diffusion model's view of an image: centre crop at `image_size`, [-1, 1], 3xHxW."""
    return arr_to_tensor(center_crop_arr(_as_pil(image), image_size))


def encoder_input(
    image: ImageLike, size: int = ENCODER_IMAGE_SIZE, normalize: str = "minus_one_one"
) -> torch.Tensor:
    """The encoder's view of an image: centre crop at 224, scaled as the encoder expects, 3xHxW.

    `normalize="minus_one_one"` (the default, what every published RCDM checkpoint was trained with)
    gives `x / 127.5 - 1`; `normalize="imagenet"` applies ImageNet mean/std to `x / 255` instead.
    """
    return normalize_for_encoder(arr_to_tensor(center_crop_arr(_as_pil(image), size)), normalize)


MEAN_STD_PREFIX = "mean="


def normalization_name(mean, std) -> str:
    """The input scaling for a library's per-channel `mean` and `std` (of images in [0, 1]):
    "minus_one_one" for 0.5/0.5, "imagenet" for ImageNet's, else `mean=R,G,B;std=R,G,B` (exact
    float values, so the record rebuilds the same scaling)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    if len(mean) != 3 or len(std) != 3:
        raise UsageError(f"an encoder's mean/std must give 3 channels, not {mean} / {std}")
    if all(abs(m - 0.5) < 1e-7 for m in mean) and all(abs(s - 0.5) < 1e-7 for s in std):
        return "minus_one_one"
    if all(abs(a - b) < 1e-7 for a, b in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD)):
        return "imagenet"
    return f"{MEAN_STD_PREFIX}{','.join(map(repr, mean))};std={','.join(map(repr, std))}"


def parse_normalization(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of a scaling name (`normalization_name`); None for "minus_one_one"; a
    one-line `UsageError` for anything else."""
    if normalize == "minus_one_one":
        return None
    if normalize == "imagenet":
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    try:
        mean_part, std_part = normalize.split(";")
        if not (mean_part.startswith(MEAN_STD_PREFIX) and std_part.startswith("std=")):
            raise ValueError
        mean = tuple(float(v) for v in mean_part[len(MEAN_STD_PREFIX):].split(","))
        std = tuple(float(v) for v in std_part[len("std="):].split(","))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"unknown encoder normalisation {normalize!r}: use 'minus_one_one' (the published "
            "checkpoints), 'imagenet', or 'mean=R,G,B;std=R,G,B' (of images in [0, 1])"
        ) from None
    return mean, std


def normalize_for_encoder(x: torch.Tensor, normalize: str = "minus_one_one") -> torch.Tensor:
    """Re-scale images already in [-1, 1] (any shape ...x3xHxW) to the encoder's convention
    (`parse_normalization`: [-1, 1] as is, else `((x + 1) / 2 - mean) / std`)."""
    mean_std = parse_normalization(normalize)
    if mean_std is None:
        return x
    mean = torch.tensor(mean_std[0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(mean_std[1], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((x + 1) / 2 - mean) / std


# ----------------------------------------------------------------------------------------------
# Datasets: folders of images -> (model crop, encoder crop, kwargs) batches
# ----------------------------------------------------------------------------------------------


LISTING_FILE = "image_list.json"
LISTING_FORMAT = "rcdm-image-list-v1"


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _scan_local(data_dir: str, warn=None) -> tuple[list[str], dict[str, int]]:
    """Image files under a local `data_dir` (sorted by name in each folder, recursing in place) and
    the modification time (ns) of every folder scanned, keyed by its path relative to `data_dir`.

    One `os.scandir` per folder; the entry types come from the directory listing itself, so only
    folders (their mtime) and symbolic links (their target) cost a `stat`. A link whose target is
    gone, or a folder that cannot be read, is skipped with a warning.
    """
    warn = warn or logger.warn
    files: list[str] = []
    dirs: dict[str, int] = {}

    def walk(folder: str, rel: str) -> None:
        try:
            dirs[rel] = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            warn(f"skipping unreadable folder {folder} ({err.strerror or err})")
            return
        for entry in entries:
            full = os.path.join(folder, entry.name)
            try:
                if _is_image_name(entry.name):
                    if entry.is_symlink() and not entry.is_file():
                        warn(f"skipping {full}: a symbolic link whose target does not exist")
                        continue
                    files.append(full)
                elif entry.is_dir():
                    walk(full, entry.name if not rel else rel + "/" + entry.name)
            except OSError as err:  # a link loop, a permission problem
                warn(f"skipping {full} ({err.strerror or err})")

    walk(data_dir, "")
    return files, dirs


def list_image_files_recursively(data_dir: str) -> list[str]:
    """Every image file under `data_dir` (local or blobfile path), sorted, recursing into folders."""
    if not fileio.is_remote(data_dir):
        return _scan_local(data_dir)[0]
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full = bf.join(data_dir, entry)
        if _is_image_name(entry):
            results.append(full)
        elif bf.isdir(full):
            results.extend(list_image_files_recursively(full))
    return results


_list_image_files_recursively = list_image_files_recursively  # the original's name


class ImageListing:
    """The images of a data folder (`files`) and how they were found (`scanned`: listed now, or
    read from the folder's listing in an output folder because no sub-folder changed since).

    `save(folder)` writes the listing there (rank 0, after a scan) so that a requeued job reads it
    instead of listing the data folder again: it is reused while the data folder's path and the
    modification times of all its sub-folders are unchanged (one `stat` per folder).
    """

    def __init__(self, data_dir: str, files: list[str], dirs: Optional[dict] = None, scanned: bool = True):
        self.data_dir, self.files, self.dirs, self.scanned = data_dir, files, dirs, scanned

    def save(self, folder: str) -> None:
        if not folder or not self.scanned or self.dirs is None or fileio.is_remote(folder):
            return
        if dist_util.get_rank() != 0:
            return
        root = self.data_dir
        record = {"format": LISTING_FORMAT, "data_dir": os.path.abspath(root), "dirs": self.dirs,
                  "files": [_relative_to(f, root) for f in self.files]}
        fileio.atomic_write_text(os.path.join(folder, LISTING_FILE), json.dumps(record))


def _relative_to(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def _read_listing(data_dir: str, folder: Optional[str]) -> Optional[ImageListing]:
    """The listing saved in `folder` if it is of `data_dir` and no sub-folder changed since."""
    if not folder or fileio.is_remote(folder) or fileio.is_remote(data_dir):
        return None
    path = os.path.join(folder, LISTING_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != LISTING_FORMAT or record.get("data_dir") != os.path.abspath(data_dir):
            return None
        for rel, mtime in record["dirs"].items():
            if os.stat(os.path.join(data_dir, rel) if rel else data_dir).st_mtime_ns != mtime:
                return None
        files = [os.path.join(data_dir, rel) for rel in record["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no listing, or one that cannot be used: list the folder
    return ImageListing(data_dir, files, record["dirs"], scanned=False)


def scan_images(data_dir: str, flag: str = "`data_dir`", index_dir: Optional[str] = None) -> ImageListing:
    """The images of `data_dir` (see `find_images`); with a process group, rank 0 alone lists the
    folder (or reads its listing from `index_dir`, see `ImageListing`) and sends the list to the
    others. Every rank must call it; an error on rank 0 is raised on every rank."""
    if dist_util.get_world_size() == 1:
        return _scan_images(data_dir, flag, index_dir)
    outcome = None
    if dist_util.get_rank() == 0:
        try:
            listing = _scan_images(data_dir, flag, index_dir)
            outcome = ("ok", listing.files)
        except Exception as exc:  # every rank raises it, none waits for a list that never comes
            outcome = ("error", exc)
    outcome = dist_util.broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    if dist_util.get_rank() == 0:
        return listing
    return ImageListing(data_dir, outcome[1], None, scanned=False)


def _scan_images(data_dir: str, flag: str, index_dir: Optional[str]) -> ImageListing:
    if not data_dir:
        raise UsageError(f"no folder given: pass {flag} DIR (a folder of images)")
    if not bf.exists(data_dir) or not bf.isdir(data_dir):
        raise MissingInputError(f"{flag} {data_dir!r}: no such folder (it does not exist or is not a directory)")
    listing = _read_listing(data_dir, index_dir)
    if listing is None:
        if fileio.is_remote(data_dir):
            listing = ImageListing(data_dir, list_image_files_recursively(data_dir), None)
        else:
            listing = ImageListing(data_dir, *_scan_local(data_dir))
    if not listing.files:
        raise UsageError(
            f"{flag} {data_dir!r} holds no images (looked recursively for files ending in "
            f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}); put images in it or pass another folder"
        )
    return listing


def find_images(data_dir: str, flag: str = "`data_dir`", shared: bool = False) -> list[str]:
    """List `data_dir`'s images (recursively, sorted), or raise a clear error naming `flag` when it
    is unset, missing or empty. `shared=True` (every rank calls it): rank 0 alone lists the folder
    and the other ranks receive the list (see `scan_images`)."""
    if shared:
        return scan_images(data_dir, flag).files
    return _scan_images(data_dir, flag, None).files


def contiguous_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """`(start, stop)`: rank `rank`'s contiguous range of `n` items split over `world` ranks (sizes
    differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


class ImageDataset(torch.utils.data.Dataset):
    """One shard of a list of image files, as the model's crop and the encoder's crop.

    Item: `(model_view, encoder_view, out_dict)`: `model_view` is 3 x resolution x resolution in
    [-1, 1]; `encoder_view` the 3 x 224 x 224 crop of the same image (same flip) scaled for the
    encoder, or None when `encoder_size` is None (no encoder) or `features` (cached
    representations, N x 2 x D: unflipped and flipped) are given, in which case `out_dict["feat"]`
    holds the image's representation. With
    `random_crop` the two crops are drawn independently, as in the original.

    A file that cannot be decoded is replaced by the next readable one of the shard; the item's
    `out_dict["_skipped"]` lists `(path, reason)` for each file skipped on the way.

    The key is an index, or `(index, item_seed)`: then the flip and random crops are drawn from
    `item_seed` alone, so an item is the same whichever worker loads it and after a resume.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: list,
        classes=None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        encoder_size: int | None = ENCODER_IMAGE_SIZE,
        encoder_normalize: str = "minus_one_one",
        features: torch.Tensor | None = None,
    ):
        super().__init__()
        self.resolution = resolution
        # a contiguous range: the rows of a feature cache this rank reads are contiguous too
        start, stop = contiguous_share(len(image_paths), shard, num_shards)
        self.local_images = list(image_paths[start:stop])
        self.local_classes = None if classes is None else list(classes[start:stop])
        self.local_features = None if features is None else features[start:stop]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.encoder_size = encoder_size
        self.encoder_normalize = encoder_normalize
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.local_images)

    def _crop(self, image: Image.Image, size: int, rng) -> np.ndarray:
        return random_crop_arr(image, size, rng=rng) if self.random_crop else center_crop_arr(image, size)

    def __getitem__(self, key):
        idx, rng = (key[0], random.Random(key[1])) if isinstance(key, tuple) else (key, random)
        skipped = []
        n = len(self.local_images)
        for attempt in range(n):
            i = (idx + attempt) % n
            if i in self._bad:
                continue
            try:
                image = load_rgb_image(self.local_images[i])
                break
            except Exception as exc:  # any decoder failure: skip the file, keep training
                self._bad.add(i)
                skipped.append((self.local_images[i], f"{type(exc).__name__}: {exc}"))
        else:
            raise RuntimeError(
                f"none of the {n} image files of this shard could be decoded (first: "
                f"{self.local_images[0]!r}); check the data directory"
            )
        flip = self.random_flip and rng.random() < 0.5
        arr = self._crop(image, self.resolution, rng)
        if flip:
            arr = arr[:, ::-1]
        out = {"_skipped": skipped}
        if self.local_classes is not None:
            out["y"] = torch.tensor(self.local_classes[i], dtype=torch.int64)
        encoder_view = None
        if self.local_features is not None:
            out["feat"] = self.local_features[i, int(flip)].float()
        elif self.encoder_size:
            big = self._crop(image, self.encoder_size, rng)
            if flip:
                big = big[:, ::-1]
            encoder_view = normalize_for_encoder(arr_to_tensor(big), self.encoder_normalize)
        return arr_to_tensor(arr), encoder_view, out


def collate(samples: list):
    """Stack a list of dataset items; `_skipped` lists are concatenated."""
    images = torch.stack([s[0] for s in samples])
    big = None if samples[0][1] is None else torch.stack([s[1] for s in samples])
    out = {"_skipped": [x for s in samples for x in s[2]["_skipped"]]}
    for key in samples[0][2]:
        if key != "_skipped":
            out[key] = torch.stack([s[2][key] for s in samples])
    return images, big, out


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(2)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


class _InfiniteSampler(torch.utils.data.Sampler):
    """`(index, item_seed)` keys forever, from position `start` on.

    Each pass over the data (epoch) has its own permutation (or the natural order when not
    shuffling) and per-item seeds, drawn from `(seed, epoch)` alone; so the stream can start at
    any position, and a resumed run reads exactly what an uninterrupted one would have.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, start: int = 0):
        self.n, self.shuffle, self.seed, self.start = n, shuffle, seed, start

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        while True:
            g = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            item_seeds = torch.randint(0, 2**62, (self.n,), generator=g)
            for i in range(offset, self.n):
                yield int(order[i]), int(item_seeds[i])
            epoch, offset = epoch + 1, 0


def loader_worker_init(worker_id: int) -> None:
    """`worker_init_fn` of every DataLoader here: a worker ignores SIGINT and SIGTERM.

    A Ctrl-C or a scheduler's SIGTERM reaches the whole process group; the training process handles
    it (finishes the step, saves) and then shuts its workers down itself. A worker that died of the
    signal first would make the main process fail on its next batch instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_num_workers(cpus: int | None = None, processes_here: int | None = None) -> int:
    """Data loading processes per training process: the CPUs it may use, shared with the other
    training processes of this node and less one for itself, between 1 and 8.

    A bf16 UNet on a current GPU eats a few hundred images a second, more than one worker decodes.
    `cpus` defaults to this process's CPU affinity (what SLURM's --cpus-per-task grants),
    `processes_here` to torchrun's LOCAL_WORLD_SIZE when the processes share that affinity.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes_here is None:
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cpus // max(1, processes_here) - 1))


_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    # Loader workers ignore SIGTERM (see loader_worker_init), so multiprocessing's own exit hook,
    # which terminates them with SIGTERM and then joins them, would wait forever for a stream
    # still open at exit (a script's global, a notebook). Exit hooks run last-registered first, so
    # this one, registered after multiprocessing's, asks the workers to stop before it joins them.
    for stream in list(_OPEN_STREAMS):
        stream.close()


class ImageStream:
    """Endless batches `(images, encoder_images_or_None, kwargs)` of one rank's shard.

    `bad_files` maps each skipped file to the reason; every newly skipped file is reported once
    through the logger (rank 0's log, other ranks' stderr). `resume_at(k)` makes the next batch
    the k-th (0-based) of the stream, as when training resumes after k steps. `close()` stops the
    loading processes (also done at exit); the stream starts them again if read after that.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.bad_files: dict[str, str] = {}
        self.sampler = _InfiniteSampler(len(dataset), shuffle, seed)
        self.num_workers = num_workers
        self.loader = self._make_loader()
        self._it = None
        _OPEN_STREAMS.add(self)

    def _make_loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=loader_worker_init,
        )

    def close(self) -> None:
        """Stop the loading processes now (they would otherwise live as long as the stream)."""
        self._it = None
        if self.num_workers > 0:
            # A persistent-worker loader keeps its workers until the loader itself is dropped.
            self.loader = self._make_loader()

    def resume_at(self, batch_index: int) -> None:
        self.sampler.start = batch_index * self.batch_size
        self._it = None  # the next batch starts a fresh pass of the loader from there

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        images, big, kwargs = next(self._it)
        for path, reason in kwargs.pop("_skipped"):
            if path not in self.bad_files:
                self.bad_files[path] = reason

                logger.warn(
                    f"skipping unreadable image {path} ({reason}); "
                    f"{len(self.bad_files)} file(s) skipped so far"
                )
        return images, big, kwargs


def folder_index(paths: Sequence[str]) -> dict[str, int]:
    """The class of each folder holding images: its index among the sorted folders (so ImageNet's
    train folders n01440764 ... n15075141 are its classes 0 ... 999)."""
    return {x: i for i, x in enumerate(sorted({bf.dirname(p) for p in paths}))}


def folder_classes(paths: Sequence[str]) -> list[int]:
    """Each image's class: its folder's index among the sorted folders (`folder_index`)."""
    index = folder_index(paths)
    return [index[bf.dirname(p)] for p in paths]


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    rank=None,
    world_size=None,
    num_workers=1,
    encoder_normalize="minus_one_one",
    features=None,
    image_paths=None,
    seed=0,
    encoder_size=ENCODER_IMAGE_SIZE,
) -> ImageStream:
    """Endless `(images, encoder_images, kwargs)` batches from a folder, sharded by rank.

    Checks the folder at once (missing or empty: an error, before any model is built). Each rank
    reads a contiguous range of the sorted list (`contiguous_share`; defaults from
    `dist_util`), so each rank's batches hold the images (and classes) of its range and the global
    batch is spread over the whole data set; rank 0 alone lists the folder. With
    `class_cond`, `kwargs["y"]` is the index of the image's parent folder. With `features`
    (cached representations aligned with `image_paths`, see `feature_cache`) the encoder crop is
    not made and `kwargs["feat"]` is filled instead; `encoder_size=None` skips it too (no encoder).
    """
    rank = dist_util.get_rank() if rank is None else rank
    world_size = dist_util.get_world_size() if world_size is None else world_size
    all_files = list(image_paths) if image_paths is not None else find_images(data_dir, shared=True)
    if len(all_files) < world_size:
        raise UsageError(
            f"{data_dir!r} holds {len(all_files)} images, fewer than the {world_size} processes "
            "that must each read a share: add images or use fewer processes"
        )
    classes = folder_classes(all_files) if class_cond else None
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=rank,
        num_shards=world_size,
        random_crop=random_crop,
        random_flip=random_flip,
        encoder_size=encoder_size,
        encoder_normalize=encoder_normalize,
        features=features,
    )
    return ImageStream(dataset, batch_size, not deterministic, num_workers, seed + rank)
