"""Real photographs from scikit-image, written as small image files for the training tests."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str, short_side: int = 96) -> Image.Image:
    import skimage.data

    image = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    scale = short_side / min(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def make_photo_dir(root, names=PHOTOS, short_side: int = 96, nested: bool = True) -> str:
    """Write each photo as JPEG (or PNG every other file), some in a sub-folder when `nested`."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(names):
        sub = os.path.join(root, "sub") if nested and i % 2 else root
        os.makedirs(sub, exist_ok=True)
        ext = "png" if i % 3 == 2 else "jpg"
        photo(name, short_side).save(os.path.join(sub, f"{name}.{ext}"))
    return root
