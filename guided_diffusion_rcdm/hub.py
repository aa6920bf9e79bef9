"""Checkpoint files in and out: download, cache, mirror, checksum, safe load, save with metadata.

This is the only module that reads or writes checkpoint files. Downloads go to the torch.hub cache
(`$TORCH_HOME/hub/checkpoints/<file name in the URL>`, so a file placed there by hand is used with
no network), are written to a temporary name and renamed only once complete and checked against
their SHA-256 when it is known, and can be redirected to a local mirror (a directory or a base URL)
with `RCDM_MIRROR`; `RCDM_DOWNLOAD_TIMEOUT` sets the network timeout (60 s). Every load is
`weights_only`: upstream training checkpoints are accepted with a small allow-list
(argparse.Namespace and numpy scalars, which they carry next to the weights) and anything else that
would run code while unpickling is refused. The project's own checkpoints record the flags they were
made with, so a mismatch can say which flags to use.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blobfile as bf
import numpy as np
import torch
from tqdm import tqdm

from .errors import MissingInputError, UserError
from . import fileio, logger

CHECKPOINT_FORMAT = "rcdm-checkpoint-v1"
MIRROR_ENV = "RCDM_MIRROR"
TIMEOUT_ENV = "RCDM_DOWNLOAD_TIMEOUT"
SHA256_ENV_PREFIX = "RCDM_SHA256_"  # + the file's name: pins its digest (see `pinned_sha256`)
SHA256SUMS_ENV = "RCDM_SHA256SUMS"  # digest files in `sha256sum` format

# SHA-256 of every published file the project downloads, keyed by URL. None = not recorded yet
# (nobody with network access has hashed it); fill in as they are verified, and `download` then
# refuses any other content. torchvision files carry a hash prefix in their name (see
# `expected_sha256`), which is checked when no full digest is recorded.
PUBLISHED_SHA256: dict[str, str | None] = {
    "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
    "dino_resnet50_pretrain_full_checkpoint.pth": None,
    "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth": None,
    "https://dl.fbaipublicfiles.com/vissl/model_zoo/"
    "simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/"
    "model_final_checkpoint_phase999.torch": None,
    "https://dl.fbaipublicfiles.com/vissl/model_zoo/barlow_twins/"
    "barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch": None,
    "https://dl.fbaipublicfiles.com/vicreg/resnet50_fullckpt.pth": None,
    # The Vision Transformers (vit_encoders.VIT_ENCODERS): backbone files, and the training
    # checkpoints that also hold the projector heads.
    **{
        f"https://dl.fbaipublicfiles.com/dino/{folder}/{folder}{suffix}.pth": None
        for folder in ("dino_deitsmall16_pretrain", "dino_deitsmall8_pretrain",
                       "dino_vitbase16_pretrain", "dino_vitbase8_pretrain")
        for suffix in ("", "_full_checkpoint")
    },
    **{
        f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth":
        None for size in "sblg" for reg in ("", "_reg4")
    },
    **{f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}.pth": None
       for size in ("base", "large", "huge")},
    **{f"https://dl.fbaipublicfiles.com/moco-v3/vit-{size}-300ep/vit-{size}-300ep.pth.tar": None
       for size in "sb"},
    **{
        f"https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vit{size}_16/"
        f"{name}.pth": None
        for size in "sbl" for name in ("checkpoint_teacher", "checkpoint")
    },
    # guided-diffusion's ImageNet release (foundations.FOUNDATIONS, for --init_from).
    **{f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}": None
       for name in ("64x64_diffusion.pt", "128x128_diffusion.pt", "256x256_diffusion.pt",
                    "256x256_diffusion_uncond.pt", "512x512_diffusion.pt")},
    **{
        f"https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_{name}.pt": None
        for name in (
            "simclr_trunk", "simclr_head", "barlow_trunk", "barlow_head", "vicreg_trunk",
            "vicreg_head", "dino_trunk", "dino_head", "supervised",
        )
    },
}

_TORCHVISION_HASH = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched (network, mirror, truncated transfer)."""


class ChecksumError(DownloadError):
    """A file's SHA-256 is not the recorded one."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read (corrupt, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects whose unpickling could run code; refused."""


class CheckpointMismatchError(UserError, ValueError):
    """A state dict does not fit the model (missing / unexpected keys, other shapes)."""


# ----------------------------------------------------------------------------- downloads


def hub_cache_dir() -> Path:
    """`$TORCH_HOME/hub/checkpoints`, the directory torch.hub caches downloaded weights in."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_sha256(url: str) -> str | None:
    """The recorded digest of a published URL, or the hash prefix in a torchvision file name."""
    known = PUBLISHED_SHA256.get(url)
    if known:
        return known
    parts = urllib.parse.urlparse(url)
    if parts.netloc == "download.pytorch.org":
        match = _TORCHVISION_HASH.search(os.path.basename(parts.path))
        if match:
            return match.group(1)
    return None


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(actual: str, expected: str | None, what: str, fix: str) -> None:
    # `expected` may be a prefix (torchvision names carry the first 8+ hex digits).
    if expected and not actual.startswith(expected.lower()):
        raise ChecksumError(
            f"checksum mismatch for {what}: SHA-256 {actual}, expected "
            f"{expected.lower()}{'...' if len(expected) < 64 else ''}. {fix}"
        )


def _mirror_candidates(url: str, mirror: str, file_name: str) -> list[str]:
    """Where a mirror may hold `url`: by file name first, then under the URL's path."""
    path = urllib.parse.urlparse(url).path.lstrip("/")
    names = list(dict.fromkeys([file_name, os.path.basename(path), path]))
    if mirror.startswith("file://"):
        mirror = urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)
    if "://" in mirror:
        return [mirror.rstrip("/") + "/" + urllib.parse.quote(n) for n in names]
    return [os.path.join(os.path.expanduser(mirror), n) for n in names]


def _failure_message(url: str, cache_path: Path, reason: str, tried: list[str]) -> str:
    tried_text = "".join(f"\n  tried: {t}" for t in tried)
    text = (
        f"could not download {url}: {reason}{tried_text}\n"
        f"To work offline, put the file by hand at {cache_path} (it is then used with no "
        f"network), or set {MIRROR_ENV} to a directory or base URL holding "
        f"'{cache_path.name}' (e.g. {MIRROR_ENV}=/shared/weights or "
        f"{MIRROR_ENV}=http://host/weights); {MIRROR_ENV} redirects every download."
    )
    url_name = os.path.basename(urllib.parse.urlparse(url).path)
    if url_name != cache_path.name and (cache_path.parent / url_name).is_file():
        text += (
            f"\n{cache_path.parent / url_name} is there, but several published files share the name "
            f"'{url_name}': rename it to {cache_path.name}, or move it into a folder "
            f"{cache_path.parent / _url_folder(url) / url_name}."
        )
    return text


def _url_folder(url: str) -> str:
    """The folder a URL's file sits in on its server (`.../vits_16/checkpoint_teacher.pth` -> `vits_16`)."""
    return os.path.basename(os.path.dirname(urllib.parse.urlparse(url).path))


def hand_placed_names(url: str, file_name: str | None = None, also: tuple[str, ...] = ()) -> list[str]:
    """Where in the download cache (relative paths) a copy of `url` is used without the network:
    its cache name first; where that is not the URL's own name (several published files share it,
    such as iBOT's `checkpoint_teacher.pth`), also the authors' name inside a folder named like the
    URL's (`vits_16/checkpoint_teacher.pth`) or one of `also` (e.g. the model's name)."""
    url_name = os.path.basename(urllib.parse.urlparse(url).path)
    name = file_name or url_name
    names = [name]
    if name != url_name:
        names += [f"{_url_folder(url)}/{url_name}", *also]
    return list(dict.fromkeys(names))


def local_copy(url: str, file_name: str | None = None, also: tuple[str, ...] = ()) -> Path | None:
    """The file `download(url, file_name=..., also=...)` would use without contacting any server:
    in the download cache (see `hand_placed_names`) or in a directory `RCDM_MIRROR`; None when
    there is none (not checked: its digest, which `download` checks)."""
    cache = hub_cache_dir()
    for rel in hand_placed_names(url, file_name, also):
        if (cache / rel).is_file():
            return cache / rel
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        candidates = _mirror_candidates(url, mirror, file_name or os.path.basename(urllib.parse.urlparse(url).path))
        if "://" not in candidates[0]:
            return next((Path(c) for c in candidates if os.path.isfile(c)), None)
    return None


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a download of `url` can start now: the server it would contact (the `RCDM_MIRROR`
    URL when one is set, through the proxy the environment names if any) accepts a connection
    within `timeout` seconds, name lookup included. A directory mirror is no server: False."""
    import socket
    import threading

    mirror = os.environ.get(MIRROR_ENV, "").strip()
    target = _mirror_candidates(url, mirror, "x")[0] if mirror else url
    parts = urllib.parse.urlparse(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    # In a thread: name lookup has no timeout of its own and can hang for long offline.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def sha256_env_name(file_name: str) -> str:
    """`RCDM_SHA256_<NAME>`: the variable that pins the digest of `file_name` (its stem, upper case,
    other characters as `_`; e.g. `rcdm_ema_dino_trunk.pt` -> `RCDM_SHA256_RCDM_EMA_DINO_TRUNK`)."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return SHA256_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", stem).upper()


def _digest_files() -> list[Path]:
    files = [Path(p) for p in os.environ.get(SHA256SUMS_ENV, "").split(os.pathsep) if p.strip()]
    return files + [hub_cache_dir() / "SHA256SUMS"]


def pinned_sha256(file_name: str) -> tuple[str | None, str]:
    """A digest the user pinned for `file_name`, and where: `RCDM_SHA256_<NAME>`, else a line
    `<sha256>  <file name>` (the `sha256sum` format) in a file listed in `RCDM_SHA256SUMS` or in
    `$TORCH_HOME/hub/checkpoints/SHA256SUMS`."""
    var = sha256_env_name(file_name)
    if os.environ.get(var, "").strip():
        return os.environ[var].strip().lower(), var
    for digest_file in _digest_files():
        if not digest_file.is_file():
            continue
        for line in digest_file.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and os.path.basename(parts[1].lstrip("*")) == file_name:
                return parts[0].lower(), str(digest_file)
    return None, ""


def _expected(url: str, name: str, sha256: str | None) -> tuple[str | None, str]:
    if sha256:
        return sha256.lower(), "the digest given"
    pinned, where = pinned_sha256(name)
    if pinned:
        return pinned, where
    published = expected_sha256(url)
    return (published.lower(), "the published digest") if published else (None, "")


def _digest_cache_path() -> Path:
    return hub_cache_dir().parent / "rcdm_sha256_cache.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so a large cached file is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    book_path = _digest_cache_path()
    try:
        book = json.loads(book_path.read_text())
    except (OSError, ValueError):
        book = {}
    entry = book.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_of(path)
    book[key] = {"stamp": stamp, "sha256": digest}
    try:
        fileio.atomic_write_text(str(book_path), json.dumps(book))
    except OSError:
        pass  # a read-only TORCH_HOME only costs hashing again next time
    return digest


def _announce(path: Path, name: str, digest: str, expected: str | None, where: str) -> None:
    size = path.stat().st_size
    if expected:
        status = f"matches {where}"
    else:
        status = (f"no published digest to check it against; to pin this file, set "
                  f"{sha256_env_name(name)}={digest}")
    logger.console(f"weights {path} (sha256 {digest}, {size} bytes): {status}")


def check_loadable(path: Path) -> None:
    """A downloaded file must load as a checkpoint (safely) before it may enter the cache."""
    if str(path).endswith(".safetensors") or _looks_like_safetensors(str(path)):
        _load_safetensors(str(path), "cpu")
    else:
        safe_torch_load(path)


def download(
    url: str,
    *,
    sha256: str | None = None,
    file_name: str | None = None,
    progress: bool = True,
    verify=check_loadable,
    also: tuple[str, ...] = (),
) -> Path:
    """Return a local path to the file at `url`, downloading it into the torch.hub cache if needed.

    The expected SHA-256 (full digest or a prefix of at least 8 hex digits) is `sha256`, else the
    one pinned with `RCDM_SHA256_<NAME>` or a `SHA256SUMS` file (see `pinned_sha256`), else the
    published one (`expected_sha256`); when known it is verified on every use. A download must also
    pass `verify(path)` (default: it loads as a checkpoint; callers check the expected model's
    keys and shapes, see `fits`) before it is renamed into the cache, so a failed or wrong file
    (e.g. another architecture under the published name) never lands there. With `RCDM_MIRROR`
    set, the URL is never contacted: a directory mirror's file is used in place (after the same
    check), a URL mirror's file is downloaded into the cache. The console says which file was used and its digest. A
    file placed by hand in the cache is found under its cache name or, where that differs from the
    URL's, under the authors' name in a folder (`hand_placed_names`; `also` adds folders).
    """
    name = file_name or os.path.basename(urllib.parse.urlparse(url).path)
    expected, where = _expected(url, name, sha256)
    cache_path = hub_cache_dir() / name
    for rel in hand_placed_names(url, name, also):
        placed = hub_cache_dir() / rel
        if not placed.is_file():
            continue
        digest = file_sha256(placed)
        _check_digest(
            digest, expected, str(placed),
            f"It does not match {where}. Delete it so that it is downloaded again, or replace it "
            "with the published file.",
        )
        _announce(placed, name, digest, expected, where)
        return placed

    mirror = os.environ.get(MIRROR_ENV, "").strip()
    sources = _mirror_candidates(url, mirror, name) if mirror else [url]
    if mirror and "://" not in sources[0]:
        for candidate in sources:
            if os.path.isfile(candidate):
                # used in place, never copied: checked like a download before it is used (and
                # before its digest is remembered, so a refused file leaves nothing behind)
                _run_verify(verify, Path(candidate), candidate, Path(candidate).name,
                            "it was not used and nothing was cached")
                digest = file_sha256(candidate)
                _check_digest(
                    digest, expected, candidate,
                    f"The mirror {mirror} holds another file than the one {where} names.",
                )
                _announce(Path(candidate), name, digest, expected, where)
                return Path(candidate)
        raise DownloadError(
            _failure_message(url, cache_path, f"not found in the {MIRROR_ENV} directory", sources)
        )

    errors = []
    for source in sources:
        try:
            digest = _fetch(source, cache_path, expected, progress, verify)
            _announce(cache_path, name, digest, expected, where)
            return cache_path
        except ChecksumError:
            raise
        except urllib.error.HTTPError as err:
            errors.append(f"{source}: HTTP {err.code} {err.reason}")
            if err.code != 404:
                break
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as err:
            errors.append(f"{source}: {getattr(err, 'reason', None) or err}")
            break  # the host itself failed: no point trying the next path on it
    raise DownloadError(_failure_message(url, cache_path, "; ".join(errors), []))


def _fetch(source: str, dest: Path, expected: str | None, progress: bool, verify=None) -> str:
    """Stream `source` to a temporary file next to `dest`; rename it only once it is verified
    (size, digest, `verify`). Returns its SHA-256."""
    timeout = float(os.environ.get(TIMEOUT_ENV, "60"))
    request = urllib.request.Request(source, headers={"User-Agent": "guided-diffusion-rcdm"})
    digest = hashlib.sha256()

    def download(out) -> None:
        received = 0
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            bar = _progress_bar(total, dest.name) if progress else None
            try:
                while chunk := resp.read(1 << 20):
                    try:
                        out.write(chunk)
                    except OSError as err:
                        if fileio.is_disk_full(err):
                            raise fileio.disk_full_error(str(dest), total) from None
                        raise
                    digest.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise DownloadError(f"transfer cut short ({received} of {total} bytes)")
        if received == 0:
            raise DownloadError("the server sent an empty file")

    def check(tmp: str) -> None:
        _check_digest(
            digest.hexdigest(), expected, source,
            "The download was discarded; if the mirror is right, the recorded checksum is not.",
        )
        _run_verify(verify, Path(tmp), source, dest.name, "it was discarded and nothing was cached")

    fileio.atomic_write(str(dest), download, check=check)
    return digest.hexdigest()


def _run_verify(verify, path: Path, shown: str, name: str, outcome: str) -> None:
    """`verify(path)` (None: no check); a file it refuses raises one line naming `shown` (the URL
    or mirror file it came from), the reason (e.g. the first tensor of another shape) and `outcome`."""
    if verify is None:
        return
    try:
        verify(path)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{str(err).replace(str(path), shown)} {outcome[0].upper()}{outcome[1:]}.") from None
    except (CheckpointError, CheckpointMismatchError, ValueError, KeyError) as err:
        reason = str(err).replace(str(path), name).splitlines()[0]
        raise DownloadError(f"{shown} is not the expected checkpoint ({reason}); {outcome}") from None


def expect_fit(builder, state_dict: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """`builder()` built on the meta device (no memory, no time), after checking that `state_dict`
    has exactly its keys and shapes; else a one-line `CheckpointMismatchError` "`what` does not
    fit: ..." naming the first tensor of another shape (file and model shapes) or missing key."""
    with torch.device("meta"):
        module = builder()
    problem = fit_problem(module, state_dict)
    if problem:
        raise CheckpointMismatchError(f"{what} does not fit: {problem}")
    return module


def fits(builder, what: str):
    """A `download(verify=...)` check: the file is a checkpoint whose state dict (see
    `load_checkpoint`) has exactly the keys and shapes of the module `builder()` makes (e.g. the
    published model's architecture), checked before the file enters the cache."""
    def verify(path) -> None:
        expect_fit(builder, load_checkpoint(path, mmap=True)[0], what)
    return verify


def _progress_bar(total: int | None, name: str):
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


# ----------------------------------------------------------------------------- safe loading


def _upstream_safe_globals() -> list:
    """Non-tensor objects that upstream training checkpoints hold next to their weights.

    DINO stores its argparse arguments; VISSL and others store numpy scalars (which need
    `numpy.dtype` and the dtype classes to rebuild). None of these run code when rebuilt.
    """
    allowed: list = [argparse.Namespace]
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    # Files written with numpy 1.x name the reconstructor numpy.core.multiarray.scalar.
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, n) for n in dir(dtypes)
            if n.endswith("DType") and isinstance(getattr(dtypes, n), type)
        ]
    return allowed


def _describe_unpickling_error(err: Exception) -> str | None:
    """The refused global if `err` is weights_only refusing code, else None (a corrupt file)."""
    text = str(err)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    # Random bytes read as opcodes ("Unsupported operand 60") are corruption, not code.
    match = re.search(r"[^\n]*(unrecognized function|Unsupported class|blocked)[^\n]*", text)
    return match.group(0).strip() if match else None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def safe_torch_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False,
                    what: str = "checkpoint") -> Any:
    """`torch.load(..., weights_only=True)` with the upstream allow-list and clear errors.

    `mmap=True` maps a local file's tensors instead of reading them (`torch.load(mmap=True)`:
    pages are read when touched, and memory stays the page cache's, shared by the processes of a
    node); files in the old non-zip format and remote files are read as usual. `what` names the
    file in error messages ("checkpoint", "feature cache shard", ...).
    """
    path = str(path)
    try:
        with torch.serialization.safe_globals(_upstream_safe_globals()):
            if fileio.is_remote(path):
                with bf.BlobFile(path, "rb") as f:
                    return torch.load(io.BytesIO(f.read()), map_location=map_location,
                                      weights_only=True)
            if mmap and _is_zip(path):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise MissingInputError(f"no {what} file at {path}") from None
    except pickle.UnpicklingError as err:
        refused = _describe_unpickling_error(err)
        if refused:
            raise UnsafeCheckpointError(
                f"refused to load {path}: besides weights it holds Python code to run while "
                f"unpickling ({refused}), which could do anything on this machine. Only tensors "
                "and plain data are loaded (weights_only=True). Use a file that holds only "
                "weights (a state dict, or the project's own or safetensors checkpoints)."
            ) from None
        raise CheckpointError(_corrupt_message(path, err, what)) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as err:
        raise CheckpointError(_corrupt_message(path, err, what)) from None


def _corrupt_message(path: str, err: Exception, what: str = "checkpoint") -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # torch's first sentence says what failed; its next ones suggest weights_only=False (unsafe)
    reason = reason.split(". ")[0].rstrip(".")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    size_text = f" ({size} bytes)" if size is not None else ""
    where = hub_cache_dir()
    hint = (
        " It is in the download cache: delete it so that it is downloaded again."
        if Path(path).resolve().parent == where.resolve() else ""
    )
    return (
        f"cannot read {what} {path}{size_text}: the file is truncated or corrupt "
        f"({reason}).{hint}"
    )


def _looks_like_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    if fileio.is_remote(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _load_safetensors(path: str, map_location: Any) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            f"{path} is a safetensors file: pip install safetensors "
            "(or guided-diffusion-rcdm[safetensors])"
        ) from None
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(path, framework="pt", device=device) as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except FileNotFoundError:
        raise MissingInputError(f"no checkpoint file at {path}") from None
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(_corrupt_message(path, err)) from None
    meta = json.loads(header["meta"]) if "meta" in header else {}
    return state_dict, meta


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> tuple[dict, dict]:
    """Load a model checkpoint as `(state_dict, meta)`, never running code from the file.

    `mmap=True` maps a local torch file's tensors instead of reading them (see `safe_torch_load`).
    Accepts the project's own files (`save_checkpoint`, torch or safetensors), plain state dicts
    such as the published RCDM checkpoints (`meta == {}`), and `{"state_dict": ...}` wrappers.
    A state dict saved from a DistributedDataParallel model loses its `module.` prefix.
    """
    path = str(path)
    if _looks_like_safetensors(path):
        state_dict, meta = _load_safetensors(path, map_location)
    else:
        obj = safe_torch_load(path, map_location, mmap=mmap)
        fmt = obj.get("format") if isinstance(obj, Mapping) else None
        if isinstance(fmt, str) and fmt.startswith("rcdm-checkpoint-") and fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} is a {fmt} file; this version reads {CHECKPOINT_FORMAT}: upgrade "
                "guided-diffusion-rcdm"
            )
        if fmt == CHECKPOINT_FORMAT:
            state_dict, meta = obj["state_dict"], dict(obj.get("meta") or {})
        elif _is_state_dict(obj):
            state_dict, meta = obj, {}
        elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
            state_dict, meta = obj["state_dict"], {}
        else:
            keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(
                f"{path} does not hold a model state dict (found {keys}); expected a dict of "
                "tensors or a file written by guided_diffusion_rcdm.hub.save_checkpoint"
            )
    state_dict = dict(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, meta


# ----------------------------------------------------------------------------- saving


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` that never leaves a truncated `path`: temp file, fsync, rename.

    Remote blobfile paths (gs://, az://) are written in one upload, which object stores publish
    only once complete.
    """
    path = str(path)
    if fileio.is_remote(path):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with bf.BlobFile(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    fileio.atomic_write(path, lambda f: torch.save(obj, f))


def _plain_meta(meta: dict | None) -> dict:
    # A JSON round trip guarantees `meta` loads back under weights_only and fits safetensors.
    try:
        return json.loads(json.dumps(meta or {}))
    except TypeError as err:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {err}") from None


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], *,
                    meta: dict | None = None) -> None:
    """Save a model the way the project reads it back: weights plus `meta` (flags, encoder, step).

    A path ending in `.safetensors` gives a safetensors file with `meta` JSON-encoded in its
    header; anything else a torch file `{"format", "state_dict", "meta"}`. Written atomically.
    """
    path = str(path)
    meta = _plain_meta(meta)
    if not path.endswith(".safetensors"):
        atomic_torch_save(
            {"format": CHECKPOINT_FORMAT, "state_dict": dict(state_dict), "meta": meta}, path
        )
        return
    try:
        from safetensors.torch import save as st_save
    except ImportError:
        raise ImportError(
            "saving .safetensors needs: pip install safetensors "
            "(or guided-diffusion-rcdm[safetensors])"
        ) from None
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().contiguous()
        # safetensors refuses tensors that share memory (tied weights): give each its own copy.
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ptr in seen:
            value = value.clone()
        seen.add(ptr)
        tensors[key] = value.cpu()
    header = {"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta)}
    payload = st_save(tensors, metadata=header)
    if fileio.is_remote(path):
        with bf.BlobFile(path, "wb") as f:
            f.write(payload)
        return
    fileio.atomic_write(path, lambda f: f.write(payload))


# ----------------------------------------------------------------------------- checked loading


def format_flags(flags: Mapping[str, Any]) -> str:
    """`{"image_size": 64, ...}` -> `--image_size 64 ...`, the way the scripts take them."""
    return " ".join(f"--{k} {_setting(v)}" for k, v in flags.items())


def format_keywords(flags: Mapping[str, Any]) -> str:
    """`{"image_size": 64, ...}` -> "`image_size` 64 ...", as the library's messages name
    arguments (a command shows them as its flags: `cli.policy.flag_message`)."""
    return " ".join(f"`{k}` {_setting(v)}" for k, v in flags.items())


def _setting(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


# Untrained encoders start from this seed, so two processes build the same "untrained" network.
RANDOM_INIT_SEED = 0


def fit_problem(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """One line on how `state_dict` fails to fit `module` exactly (keys and shapes), or None."""
    expected = {k: _shape(v) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k in expected if k in state_dict and _shape(state_dict[k]) != expected[k]]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: file {_shape(state_dict[k])}, "
                     f"model {expected[k]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts) or None


def build_filled(builder, state_dict: Mapping[str, torch.Tensor] | None, what: str) -> torch.nn.Module:
    """`builder()`'s module holding exactly `state_dict`'s tensors (as fp32), or, without one, its
    own initialisation under `RANDOM_INIT_SEED`.

    With a state dict the module is built on the meta device, so no random initialisation is spent
    on weights about to be replaced and no second copy is held; every key must be there, no other,
    with the same shape, else a one-line `CheckpointMismatchError` starting with `what`.
    """
    if state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return builder()
    module = expect_fit(builder, state_dict, what)
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
                           strict=True, assign=True)
    return module


def load_state_dict_checked(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    meta: dict | None = None,
    strict: bool = True,
    *,
    assign: bool = False,
    shown: int = 5,
) -> None:
    """`model.load_state_dict` that fails with a short, actionable message instead of a key wall.

    Shape mismatches always fail; missing and unexpected keys fail when `strict`. The message gives
    the counts, the first `shown` keys of each kind with their shapes, and the flags the checkpoint
    was saved with when `meta` records them.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, _shape(state_dict[k]), _shape(expected[k]))
        for k in expected
        if k in state_dict and _shape(state_dict[k]) != _shape(expected[k])
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(
            _mismatch_message(expected, state_dict, missing, unexpected, mismatched, meta, shown)
        )
    check_finite(state_dict)
    # Copying into a model built on the meta device would be a silent no-op: take the tensors.
    assign = assign or any(t.is_meta for t in expected.values())
    model.load_state_dict(state_dict, strict=strict, assign=assign)


def check_finite(state_dict: Mapping[str, torch.Tensor], what: str = "the checkpoint") -> None:
    """A one-line `CheckpointMismatchError` "`what` holds NaN or infinite weights ..." when a
    floating-point tensor of `state_dict` is not finite (a diverged run's weights would only give
    NaN images, or train on from them)."""
    broken = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
              and not v.is_meta and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointMismatchError(
            f"{what} holds NaN or infinite weights ({len(broken)} of {len(state_dict)} tensors, "
            f"first: {broken[0]}): it comes from a run that diverged; use an earlier checkpoint")


def _mismatch_message(expected, state_dict, missing, unexpected, mismatched, meta, shown) -> str:
    lines = [
        f"the checkpoint does not fit the model: {len(mismatched)} tensors of another shape, "
        f"{len(missing)} missing from the checkpoint, {len(unexpected)} unexpected "
        f"(checkpoint {len(state_dict)} tensors, model {len(expected)})."
    ]
    for key, got, want in mismatched[:shown]:
        lines.append(f"  shape   {key}: checkpoint {got}, model {want}")
    for key in missing[:shown]:
        lines.append(f"  missing {key}: model {_shape(expected[key])}")
    for key in unexpected[:shown]:
        lines.append(f"  unexpected {key}: checkpoint {_shape(state_dict[key])}")
    ssl = next((m for m in mismatched if m[0] == "ssl_emb.weight"), None)
    if ssl is not None and len(ssl[1]) == 2 and ssl[1][1] != ssl[2][1]:  # the input width differs
        _, got, want = ssl
        lines.append(
            f"The representation size differs (checkpoint ssl_dim {got[1]}, model {want[1]}): "
            "check `type_model` and `use_head`."
        )
    meta = meta or {}
    if meta.get("model_flags"):
        lines.append(f"The checkpoint was saved with {format_keywords(meta['model_flags'])}.")
    if meta.get("encoder"):
        enc = meta["encoder"]
        lines.append(
            f"Its encoder: `type_model` {enc.get('type_model')}"
            f"{' `use_head`' if enc.get('use_head') else ''} (input {enc.get('normalize')})."
        )
    if not meta.get("model_flags"):
        lines.append(
            "The checkpoint does not record its flags: pass the ones it was trained with "
            "(the published 128x128 models need $MODEL_FLAGS_128)."
        )
    return "\n".join(lines)
