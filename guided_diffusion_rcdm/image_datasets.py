"""Image decoding and the two crops RCDM needs from every image.

The diffusion model sees an `image_size` crop of the image; the frozen encoder sees a separate
224x224 crop of the same image. Both are scaled to [-1, 1] with `x / 127.5 - 1` (no ImageNet
mean/std): the published models were trained that way. `encoder_input` is the one function that turns
a PIL image or a path into the encoder's input, so no script re-implements the convention.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Union

import blobfile as bf
import numpy as np
import torch
from PIL import Image

ENCODER_IMAGE_SIZE = 224
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")

# ImageNet statistics, for encoders trained with them (an opt-in; see `encoder_input`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, str, Path]


def load_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file (local or blobfile path) into an 8-bit RGB PIL image.

    Grayscale, RGBA (composited on white), palette, CMYK and 16-bit images are converted. Raises the
    decoder's error (`OSError` / `PIL.UnidentifiedImageError`) for a corrupt or non-image file, so
    callers can decide whether to skip it.
    """
    with bf.BlobFile(str(path), "rb") as f:
        image = Image.open(f)
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


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and take the centre square, as the original does.

    Large images are first halved with a box filter while that keeps them at least twice the target
    size (better downsampling than one bicubic step). Returns an HxWx3 uint8 array.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
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
    target = rng.randrange(smallest, largest + 1)
    while min(*pil_image.size) >= 2 * target:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = target / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
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


def normalize_for_encoder(x: torch.Tensor, normalize: str = "minus_one_one") -> torch.Tensor:
    """Re-scale images already in [-1, 1] (any shape ...x3xHxW) to the encoder's convention."""
    if normalize == "minus_one_one":
        return x
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return ((x + 1) / 2 - mean) / std
    raise ValueError(
        f"unknown encoder normalisation {normalize!r}: use 'minus_one_one' (the published "
        "checkpoints) or 'imagenet'"
    )
