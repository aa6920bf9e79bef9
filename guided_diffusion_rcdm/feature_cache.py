"""Encode a dataset once with the frozen encoder, then train from the cached representations.

The cache is a folder holding `features.pt`: for every readable image (path relative to the data
directory) the representation of its centre crop at the encoder's input size and of the mirrored
crop (training flips images, so both are needed), plus the encoder that made them (its
`EncoderSpec` record) and the precision it ran in.
Training with `--feat_cache DIR` loads it (memory-mapped) and never builds the encoder; images
added to the data directory since are encoded and appended; a cache made by another encoder or in
another encoder precision is refused (caches from before the precision was recorded were fp32).

As a separate command (any launcher: torchrun, SLURM, mpiexec share the work by rank):

    rcdm cache --data_dir DATA --type_model dino --feat_cache DIR
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import blobfile as bf
import torch

from . import dist_util, logger
from .encoders import EncoderSpec, encode_images
from .errors import UsageError
from .hub import atomic_torch_save, safe_torch_load
from .precision import resolve_precision

CACHE_FORMAT = "rcdm-feature-cache-v1"
CACHE_FILE = "features.pt"


def cache_path(cache_dir: str) -> str:
    return bf.join(cache_dir, CACHE_FILE)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def load_cache(cache_dir: str) -> Optional[dict]:
    """The cache in `cache_dir`, or None if there is none (memory-mapped when local)."""
    path = cache_path(cache_dir)
    if not bf.exists(path):
        return None
    if "://" in path:
        cache = safe_torch_load(path)
    else:
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT:
        raise UsageError(f"{path} is not a feature cache ({CACHE_FORMAT}); pass another --feat_cache")
    return cache


def prepare_feature_cache(
    cache_dir: str,
    data_dir: str,
    image_paths: list,
    encoder: EncoderSpec | Mapping,
    make_encoder: Callable[[], torch.nn.Module] | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[list, torch.Tensor]:
    """Make sure `cache_dir` holds the representations of every image in `image_paths`.

    Encodes only the images not cached yet (shared between ranks; the encoder, described by
    `encoder` (an `EncoderSpec` or its record), is built only then, by `make_encoder` if given) and
    returns `(paths, features)`: the readable images, in order, and their features (a
    `FeatureTable`, N x 2 x D). `precision` is the encoder's (`auto`: see `resolve_precision`); it
    is part of what identifies the cache. Every rank must call it.
    """
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.from_dict(encoder)
    make_encoder = make_encoder or (lambda: spec.build(dist_util.dev()))
    precision = resolve_precision(precision, device=dist_util.dev())
    cache = load_cache(cache_dir)
    if cache is not None and EncoderSpec.from_dict(cache["encoder"]) != spec:
        raise UsageError(
            f"feature cache {cache_path(cache_dir)} was made with encoder "
            f"{EncoderSpec.from_dict(cache['encoder']).describe()}, not {spec.describe()}: pass "
            "another --feat_cache folder (or delete this one)"
        )
    if cache is not None and cache.get("encoder_precision", "fp32") != precision:
        cached = cache.get("encoder_precision", "fp32")
        raise UsageError(
            f"feature cache {cache_path(cache_dir)} holds {cached} representations, but this run "
            f"encodes in {precision}: pass --encoder_precision {cached} to reuse it, or another "
            "--feat_cache folder"
        )
    rel = [_relative(p, data_dir) for p in image_paths]
    known = set() if cache is None else set(cache["paths"]) | set(cache["bad"])
    todo = [i for i, r in enumerate(rel) if r not in known]
    if todo:
        if rank == 0:
            logger.log(f"feature cache {cache_dir}: encoding {len(todo)} image(s) with {spec.describe()}")
        mine = todo[rank::world]
        part = {"paths": [], "features": None, "bad": {}}
        if mine:
            # input scaling and size from the spec, whatever make_encoder built
            done = encode_images(
                make_encoder(), [image_paths[i] for i in mine], batch_size=batch_size,
                precision=precision, device=dist_util.dev(), input_normalize=spec.input_normalize,
                input_size=spec.input_size, mirrored=True, num_workers=num_workers,
                progress=progress and dist_util.is_main_process(), warn=logger.warn,
            )
            part = {
                "paths": [rel[mine[k]] for k in done.kept],
                "features": done.features if done.kept else None,
                "bad": {rel[mine[k]]: r for k, r in done.skipped.items()},
            }
        record = spec.to_dict()
        if world == 1:
            _merge_and_save(cache_dir, cache, [part], record, precision)
        else:  # every rank writes its share; rank 0 merges them (no rank holds them all twice)

            names = [bf.join(cache_dir, f"part-{r:05d}-of-{world:05d}.pt") for r in range(world)]
            atomic_torch_save(part, names[rank])
            dist_util.barrier()
            if rank == 0:
                _merge_and_save(cache_dir, cache, [safe_torch_load(n) for n in names], record, precision)
                for n in names:
                    bf.remove(n)
        dist_util.barrier()
        cache = load_cache(cache_dir)
    index = {p: i for i, p in enumerate(cache["paths"])}
    keep = [i for i, r in enumerate(rel) if r in index]
    if not keep:
        raise UsageError(f"none of the images in {data_dir!r} could be decoded (see the warnings)")
    if len(cache["bad"]) and rank == 0:
        logger.warn(f"feature cache: {len(cache['bad'])} unreadable image(s) left out of training")
    rows = torch.tensor([index[rel[i]] for i in keep], dtype=torch.long)
    return [image_paths[i] for i in keep], FeatureTable(cache["features"], rows)


class FeatureTable:
    """Rows `rows` of a (memory-mapped) [N x 2 x D] feature tensor, without copying it.

    `table[a:b:c]` is another table; `table[i, flip]` the [D] representation of image i.
    """

    def __init__(self, features: torch.Tensor, rows: torch.Tensor):
        self.features, self.rows = features, rows

    @property
    def shape(self) -> tuple:
        return (len(self.rows),) + tuple(self.features.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return FeatureTable(self.features, self.rows[key])
        i, flip = key
        return self.features[int(self.rows[i]), flip]


def _merge_and_save(cache_dir: str, old: Optional[dict], parts: list, encoder_record: dict,
                    precision: str) -> None:
    paths = list(old["paths"]) if old else []
    chunks = [old["features"]] if old and len(old["paths"]) else []
    bad = dict(old["bad"]) if old else {}
    for part in parts:
        paths += part["paths"]
        if part["features"] is not None:
            chunks.append(part["features"])
        bad.update(part["bad"])
    features = torch.cat([c.clone() for c in chunks]) if chunks else torch.zeros(0, 2, 0)
    if len(features):
        encoder_record = {**encoder_record, "width": int(features.shape[-1])}
    bf.makedirs(cache_dir)
    atomic_torch_save(
        {"format": CACHE_FORMAT, "encoder": encoder_record, "encoder_precision": precision, "paths": paths,
         "features": features, "bad": bad},
        cache_path(cache_dir),
    )
    logger.log(f"feature cache {cache_path(cache_dir)}: {len(paths)} images, {len(bad)} unreadable")
