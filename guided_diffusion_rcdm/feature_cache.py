"""Encode a dataset once with the frozen encoder, then train from the cached representations.

A cache is a folder of shards and a small index:

    index.json                      format, encoder record (`EncoderSpec`, with its width), encoder
                                    precision, storage dtype, rows, and per shard: file, rows, bytes,
                                    SHA-256 of its paths; the unreadable images and why
    shard-GGGG-RRRRR-of-WWWWW.pt    what rank R of W wrote in build G: `features` [n x 2 x D] (the
                                    representation of the centre crop at the encoder's input size
                                    and of the mirrored crop: training flips images), `paths` (the
                                    images' paths relative to the data folder, UTF-8, one uint8
                                    tensor) and `offsets` [n + 1] (where each path starts)

Every rank writes its own shard and nothing is merged, so no process ever holds more than its share.
Adding images to the data folder writes one new build of shards and leaves the old files as
they were. Shards are `torch.save` files, read with `torch.load(mmap=True, weights_only=True)`: the
project's checkpoint format and loader, no extra dependency, tensors memory-mapped (a rank reads
only the pages of the rows it uses; the processes of a node share them in the page cache).

Training with `--feat_cache DIR` never builds the encoder when the cache covers the data; each rank
reads a contiguous range of rows (see `image_datasets.contiguous_share`). When the cache's paths are
the data folder's images in order (checked per shard by SHA-256, without reading the paths), the rows
are found without any per-path table. A cache made by another encoder, in another encoder precision
or stored in another dtype is refused. The single-file caches of earlier versions (`features.pt`)
are still read, and extended with new shards when images are added.

As a separate command (any launcher: torchrun, SLURM, mpiexec share the work by rank):

    rcdm cache --data_dir DATA --type_model dino --feat_cache DIR [--feat_cache_dtype bf16]
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import blobfile as bf
import torch

from . import dist_util, fileio, logger
from .encoders import EncoderSpec, encode_images
from .errors import UsageError
from .hub import CheckpointError, atomic_torch_save, safe_torch_load
from .image_datasets import contiguous_share
from .precision import resolve_precision

CACHE_FORMAT = "rcdm-feature-cache-v1"  # the single-file cache of earlier versions (still read)
INDEX_FORMAT = "rcdm-feature-cache-v2"
SHARD_FORMAT = "rcdm-feature-shard-v2"
CACHE_FILE = "features.pt"
INDEX_FILE = "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CHECK_ELEMENTS = 1 << 22  # values checked for NaN at a time (a 4 MB mask, whatever the width)


def cache_path(cache_dir: str) -> str:
    """The single-file cache of earlier versions."""
    return bf.join(cache_dir, CACHE_FILE)


def index_path(cache_dir: str) -> str:
    return bf.join(cache_dir, INDEX_FILE)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _bad(path: str, problem: str) -> UsageError:
    return UsageError(f"feature cache {path}: {problem}; delete the cache folder (or pass another `cache_dir`) "
                      "and build it again")


# ------------------------------------------------------------------------------ paths as bytes


def paths_digest(paths: Sequence[str]) -> str:
    """SHA-256 of `paths` (NUL-separated UTF-8): what the index records per shard."""
    return hashlib.sha256("\0".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


def encode_paths(paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`paths` as one uint8 tensor of their UTF-8 bytes and int64 `offsets` [len(paths) + 1]."""
    blobs = [p.encode("utf-8", "surrogateescape") for p in paths]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    if blobs:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs], dtype=torch.int64), 0)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offsets[-1] else torch.zeros(0, dtype=torch.uint8)
    return data, offsets


def decode_paths(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw = data.numpy().tobytes()
    bounds = offsets.tolist()
    return [raw[a:b].decode("utf-8", "surrogateescape") for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------------------ reading


def _read_json(path: str) -> dict:
    try:
        with bf.BlobFile(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(path, f"the index is not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise _bad(path, f"not a feature cache index ({INDEX_FORMAT})")
    return index


def _write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=1)
    if fileio.is_remote(path):
        with bf.BlobFile(path, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        fileio.atomic_write_text(path, text)


def _load_file(path: str, what: str) -> dict:
    try:
        obj = safe_torch_load(path, mmap=True, what=what)
    except CheckpointError as err:
        raise UsageError(f"{err}; delete the cache folder (or pass another `cache_dir`) and build it again") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"holds a {type(obj).__name__}, not a feature cache")
    return obj


def _legacy_index(cache_dir: str) -> Optional[dict]:
    """The single-file cache of earlier versions as an index with one shard (None: there is none)."""
    path = cache_path(cache_dir)
    if not bf.exists(path):
        return None
    old = _load_file(path, "feature cache")
    if old.get("format") != CACHE_FORMAT:
        raise UsageError(f"{path} is not a feature cache ({CACHE_FORMAT}); pass another `cache_dir`")
    features, paths = old.get("features"), old.get("paths")
    if not torch.is_tensor(features) or not isinstance(paths, list):
        raise _bad(path, "no features tensor or path list")
    return {
        "format": INDEX_FORMAT, "encoder": old["encoder"], "encoder_precision": old.get("encoder_precision", "fp32"),
        "dtype": "fp32", "rows": len(paths), "generation": 0, "bad": dict(old.get("bad") or {}),
        "shards": [{"file": CACHE_FILE, "rows": len(paths), "legacy": True, "paths_sha256": paths_digest(paths)}]
        if len(paths) else [],
    }


def read_index(cache_dir: str) -> Optional[dict]:
    """The cache's index (an earlier single-file cache: as an index of one shard), or None."""
    path = index_path(cache_dir)
    if bf.exists(path):
        return _read_json(path)
    return _legacy_index(cache_dir)


class Shard:
    """One shard of a cache, memory-mapped: `features` [rows x 2 x D]; `paths()` decodes its paths."""

    def __init__(self, cache_dir: str, entry: Mapping, index: Mapping):
        self.path = bf.join(cache_dir, entry["file"])
        if not bf.exists(self.path):
            raise _bad(self.path, f"this shard ({entry['rows']} rows) listed in {INDEX_FILE} is missing")
        obj = _load_file(self.path, "feature cache shard")
        legacy = bool(entry.get("legacy"))
        if not legacy and obj.get("format") != SHARD_FORMAT:
            raise _bad(self.path, f"not a feature cache shard ({SHARD_FORMAT})")
        feats = obj.get("features")
        if not torch.is_tensor(feats) or feats.dim() != 3 or feats.shape[1] != 2:
            shape = tuple(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
            raise _bad(self.path, f"features of shape {shape}, expected [rows x 2 x width]")
        rows, width = int(entry["rows"]), (index.get("encoder") or {}).get("width")
        if feats.shape[0] != rows:
            raise _bad(self.path, f"{feats.shape[0]} rows, but {INDEX_FILE} records {rows} (truncated or replaced)")
        if width is not None and feats.shape[2] != int(width):
            raise _bad(self.path, f"features {feats.shape[2]} wide, but the cache records width {width}")
        if feats.dtype != DTYPES[index.get("dtype", "fp32")]:
            raise _bad(self.path, f"features in {feats.dtype}, but the cache records {index.get('dtype', 'fp32')}")
        self.features = feats
        if legacy:
            self._paths = obj.get("paths")
        else:
            data, offsets = obj.get("paths"), obj.get("offsets")
            if (not torch.is_tensor(data) or not torch.is_tensor(offsets) or offsets.shape != (rows + 1,)
                    or int(offsets[-1]) != data.numel()):
                raise _bad(self.path, "its paths do not match its rows")
            self._data, self._offsets, self._paths = data, offsets, None

    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = decode_paths(self._data, self._offsets)
        return self._paths


def open_shards(cache_dir: str, index: Mapping) -> list[Shard]:
    return [Shard(cache_dir, entry, index) for entry in index["shards"]]


def load_cache(cache_dir: str) -> Optional[dict]:
    """The whole cache, or None if there is none: `{"encoder", "encoder_precision", "dtype", "paths",
    "features" [N x 2 x D, all shards concatenated: for small caches], "bad"}`."""
    index = read_index(cache_dir)
    if index is None:
        return None
    shards = open_shards(cache_dir, index)
    width = int((index.get("encoder") or {}).get("width") or 0)
    features = (torch.cat([s.features for s in shards]) if shards
                else torch.zeros(0, 2, width, dtype=DTYPES[index.get("dtype", "fp32")]))
    return {"encoder": index["encoder"], "encoder_precision": index.get("encoder_precision", "fp32"),
            "dtype": index.get("dtype", "fp32"), "paths": [p for s in shards for p in s.paths()],
            "features": features, "bad": dict(index.get("bad") or {})}


# ------------------------------------------------------------------------------ writing


def shard_name(generation: int, rank: int, world: int) -> str:
    return f"shard-{generation:04d}-{rank:05d}-of-{world:05d}.pt"


def write_shard(cache_dir: str, name: str, paths: Sequence[str], features: torch.Tensor, dtype: str = "fp32") -> dict:
    """Save one shard (`features` [n x 2 x D] of `paths`, stored in `dtype`) and return its index entry."""
    if features.dim() != 3 or features.shape[0] != len(paths) or features.shape[1] != 2:
        raise ValueError(f"features of shape {tuple(features.shape)} for {len(paths)} paths; expected [n x 2 x D]")
    features = features.to("cpu", DTYPES[dtype])  # no copy when already so
    data, offsets = encode_paths(paths)
    path = bf.join(cache_dir, name)
    atomic_torch_save({"format": SHARD_FORMAT, "features": features, "paths": data, "offsets": offsets}, path)
    return {"file": name, "rows": len(paths), "width": int(features.shape[-1]), "paths_sha256": paths_digest(paths),
            "bytes": int(bf.stat(path).size)}


def commit_shards(cache_dir: str, old: Optional[dict], entries: Sequence[dict], bad: Mapping[str, str],
                  encoder_record: Mapping, precision: str, dtype: str) -> dict:
    """Write the index: `old`'s shards (if any), then `entries` (in rank order); returns it."""
    shards = list(old["shards"]) if old else []
    widths = {e.pop("width") for e in (dict(e) for e in entries) if e["rows"]}
    record = dict(encoder_record)
    if old and (old.get("encoder") or {}).get("width"):
        widths.add(int(old["encoder"]["width"]))
    if len(widths) > 1:
        raise RuntimeError(f"the shards of this build have different widths {sorted(widths)}")
    if widths:
        record["width"] = widths.pop()
    shards += [{k: v for k, v in e.items() if k != "width"} for e in entries if e["rows"]]
    index = {"format": INDEX_FORMAT, "encoder": record, "encoder_precision": precision, "dtype": dtype,
             "rows": sum(int(s["rows"]) for s in shards), "generation": (old or {}).get("generation", -1) + 1,
             "shards": shards, "bad": {**dict((old or {}).get("bad") or {}), **dict(bad)}}
    bf.makedirs(cache_dir)
    _write_json(index_path(cache_dir), index)
    return index


# ------------------------------------------------------------------------------ the table


class FeatureTable:
    """Rows `rows` of the concatenated (memory-mapped) [N x 2 x D] shard tensors, without copying them.

    `table[a:b:c]` is another table; `table[i, flip]` the [D] representation of image i.
    """

    def __init__(self, shards: Sequence[torch.Tensor] | torch.Tensor, rows: torch.Tensor):
        self.shards = [shards] if torch.is_tensor(shards) else list(shards)
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + len(s))
        self.rows = rows
        self.width = int(self.shards[0].shape[-1]) if self.shards else 0

    @property
    def shape(self) -> tuple:
        return (len(self.rows), 2, self.width)

    def __len__(self) -> int:
        return len(self.rows)

    def locate(self, row: int) -> tuple[int, int]:
        """(shard, row in it) of global row `row`."""
        k = bisect.bisect_right(self.starts, row) - 1
        return k, row - self.starts[k]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return FeatureTable(self.shards, self.rows[key])
        i, flip = key
        k, r = self.locate(int(self.rows[i]))
        return self.shards[k][r, flip]

    def gather(self, flip: int = 0) -> torch.Tensor:
        """All rows' representations of one view (0: unflipped, 1: mirrored), as one [len x D] tensor
        (a copy: for the small tables that fit in memory)."""
        out = torch.empty(len(self.rows), self.width, dtype=self.shards[0].dtype if self.shards else torch.float32)
        for k, shard in enumerate(self.shards):
            inside = (self.rows >= self.starts[k]) & (self.rows < self.starts[k + 1])
            out[inside] = shard[self.rows[inside] - self.starts[k], flip]
        return out

    def check_finite(self, names: Sequence[str] = ()) -> None:
        """UsageError naming the shard if the rows of this table hold NaN or infinite values; reads
        only the span of each shard these rows fall in, a bounded number of rows at a time."""
        if not len(self.rows):
            return
        for k, shard in enumerate(self.shards):
            lo, hi = self.starts[k], self.starts[k + 1]
            inside = self.rows[(self.rows >= lo) & (self.rows < hi)]
            if not len(inside):
                continue
            first, last = int(inside.min()) - lo, int(inside.max()) - lo + 1
            step = max(1, _CHECK_ELEMENTS // max(1, shard[0].numel()))
            for a in range(first, last, step):
                block = shard[a : min(last, a + step)]
                if not bool(torch.isfinite(block).all()):
                    bad_row = a + int((~torch.isfinite(block)).flatten(1).any(1).nonzero()[0])
                    where = names[k] if k < len(names) else f"shard {k}"
                    raise _bad(where, f"row {bad_row} holds NaN or infinite features")


# ------------------------------------------------------------------------------ the entry point


def _check_identity(where: str, index: Mapping, spec: EncoderSpec, precision: str, dtype: str) -> None:
    if EncoderSpec.from_dict(index["encoder"]) != spec:
        raise UsageError(
            f"feature cache {where} was made with encoder {EncoderSpec.from_dict(index['encoder']).describe()}, "
            f"not {spec.describe()}: pass another `cache_dir` folder (or delete this one)"
        )
    cached = index.get("encoder_precision", "fp32")
    if cached != precision:
        raise UsageError(
            f"feature cache {where} holds {cached} representations, but this run encodes in {precision}: "
            f"pass `encoder_precision` {cached} to reuse it, or another `cache_dir` folder"
        )
    stored = index.get("dtype", "fp32")
    if stored != dtype:
        raise UsageError(
            f"feature cache {where} stores its features in {stored}, not {dtype}: pass `dtype` "
            f"{stored} to reuse it, or another `cache_dir` folder"
        )


def _matches_in_order(index: Mapping, kept_rel: Sequence[str]) -> bool:
    """Whether the cache's rows are exactly `kept_rel`, in order (per-shard SHA-256, no path table)."""
    if int(index.get("rows", -1)) != len(kept_rel):
        return False
    at = 0
    for entry in index["shards"]:
        n = int(entry["rows"])
        if entry.get("paths_sha256") != paths_digest(kept_rel[at : at + n]):
            return False
        at += n
    return True


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
    dtype: str = "fp32",
    progress: bool = True,
) -> tuple[list, FeatureTable]:
    """Make sure `cache_dir` holds the representations of every image in `image_paths`.

    Encodes only the images not cached yet (each rank a contiguous share, written as its own shard;
    the encoder, described by `encoder` (an `EncoderSpec` or its record), is built only then, by
    `make_encoder` if given) and returns `(paths, features)`: the readable images, in order, and
    their features (a `FeatureTable`, N x 2 x D, in `dtype`: fp32, bf16 or fp16). `precision` is
    the encoder's (`auto`: see `resolve_precision`); it and `dtype` are part of what identifies the
    cache. Every rank must call it; each checks the rows of its share for NaN.
    """
    if dtype not in DTYPES:
        raise UsageError(f"`dtype` {dtype!r}: use one of {', '.join(DTYPES)}")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.from_dict(encoder)
    make_encoder = make_encoder or (lambda: spec.build(dist_util.dev()))
    precision = resolve_precision(precision, device=dist_util.dev())
    index = read_index(cache_dir)
    if index is not None:
        _check_identity(cache_dir, index, spec, precision, dtype)
    rel = [_relative(p, data_dir) for p in image_paths]
    bad = dict(index["bad"]) if index else {}
    kept = [i for i, r in enumerate(rel) if r not in bad] if bad else list(range(len(rel)))
    kept_rel = [rel[i] for i in kept] if bad else rel
    rows = None
    if index is not None and _matches_in_order(index, kept_rel):
        rows, todo = torch.arange(len(kept), dtype=torch.int64), []
    else:  # images added or removed since: a table of the cached paths finds the rows
        shards = open_shards(cache_dir, index) if index else []
        known = {p: r for r, p in enumerate(p for s in shards for p in s.paths())}
        todo = [i for i, r in enumerate(rel) if r not in known and r not in bad]
    if todo:
        if rank == 0:
            logger.log(f"feature cache {cache_dir}: encoding {len(todo)} image(s) with {spec.describe()}")
        start, stop = contiguous_share(len(todo), rank, world)
        mine = todo[start:stop]
        entry, my_bad = {"rows": 0}, {}
        if mine:
            # input scaling and size from the spec, whatever make_encoder built
            done = encode_images(
                make_encoder(), [image_paths[i] for i in mine], batch_size=batch_size,
                precision=precision, device=dist_util.dev(), input_normalize=spec.input_normalize,
                input_size=spec.input_size, mirrored=True, num_workers=num_workers,
                progress=progress and dist_util.is_main_process(), warn=logger.warn,
            )
            my_bad = {rel[mine[k]]: r for k, r in done.skipped.items()}
            if done.kept:
                generation = (index or {}).get("generation", -1) + 1
                entry = write_shard(cache_dir, shard_name(generation, rank, world),
                                    [rel[mine[k]] for k in done.kept], done.features, dtype)
            del done
        gathered = dist_util.all_gather_objects((entry, my_bad))
        if rank == 0:
            new_bad = {k: v for _, b in gathered for k, v in b.items()}
            index = commit_shards(cache_dir, index, [e for e, _ in gathered], new_bad, spec.to_dict(),
                                  precision, dtype)
            logger.log(f"feature cache {index_path(cache_dir)}: {index['rows']} images in "
                       f"{len(index['shards'])} shard(s), {len(index['bad'])} unreadable")
        dist_util.barrier()
        return prepare_feature_cache(cache_dir, data_dir, image_paths, spec, make_encoder, batch_size=batch_size,
                                     num_workers=num_workers, precision=precision, dtype=dtype, progress=progress)
    if rows is None:
        keep = [i for i, r in enumerate(rel) if r in known]
        rows = torch.tensor([known[rel[i]] for i in keep], dtype=torch.int64)
        kept = keep
        del known
    else:
        shards = open_shards(cache_dir, index)
    if not len(kept):
        raise UsageError(f"none of the images in {data_dir!r} could be decoded (see the warnings)")
    if bad and rank == 0:
        logger.warn(f"feature cache: {len(bad)} unreadable image(s) left out of training")
    table = FeatureTable([s.features for s in shards], rows)
    start, stop = contiguous_share(len(kept), rank, world)
    table[start:stop].check_finite([s.path for s in shards])
    return [image_paths[i] for i in kept], table
