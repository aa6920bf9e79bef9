"""Rank-0 logging: messages to stdout and `log.txt`, logged terms to `progress.csv`.

The API is the original's (`configure`, `log`, `logkv`, `logkv_mean`, `dumpkvs`, `get_dir`, ...).
Only rank 0 writes anything; other ranks keep their values so that `dumpkvs()`, called by every
rank at the same step, averages each term over all ranks (weighted by how often each rank logged
it). Warnings from other ranks go to their stderr, tagged with the rank, so a bad file in rank 3's
shard is still reported. Files are appended to, never truncated, so a resumed run keeps its history.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import sys
import tempfile
from collections import defaultdict
from typing import Optional

from . import dist_util, fileio

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class _Text:
    """Human-readable output: messages as lines, key/value dumps as a small table."""

    def __init__(self, stream, own: bool):
        self.stream, self.own = stream, own

    def write_message(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def write_kvs(self, kvs: dict) -> None:
        if not kvs:
            return
        rows = [(k[:40], _fmt(v)) for k, v in sorted(kvs.items(), key=lambda kv: kv[0].lower())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        self.write_message("\n".join(lines))

    def close(self) -> None:
        if self.own:
            self.stream.close()


class _CSV:
    """`progress.csv`: one row per dump; a new key extends the header (older rows get blanks)."""

    def __init__(self, path: str):
        self.path = path
        self.keys: list[str] = []
        fileio.refuse_symlink(path)  # its rows would be read from, and appended to, elsewhere
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                self.keys = next(csv.reader(f), [])

    def write_kvs(self, kvs: dict) -> None:
        new = sorted(k for k in kvs if k not in self.keys)
        if new:
            self._rewrite_with(self.keys + new)
        with fileio.open_append(self.path, newline="") as f:
            csv.writer(f).writerow(["" if kvs.get(k) is None else kvs[k] for k in self.keys])

    def _rows(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.reader(f))[1:]

    def drop_rows_after(self, key: str, value: int) -> int:
        """Remove the rows whose `key` exceeds `value` (steps a resumed run will log again)."""
        if key not in self.keys:
            return 0
        i = self.keys.index(key)
        rows = self._rows()
        keep = [r for r in rows if not (len(r) > i and r[i].lstrip("-").isdigit() and int(r[i]) > value)]
        if len(keep) < len(rows):
            self._rewrite_with(self.keys, keep)
        return len(rows) - len(keep)

    def _rewrite_with(self, keys: list[str], rows: list | None = None) -> None:
        rows = self._rows() if rows is None else rows

        def write(f) -> None:
            w = csv.writer(f)
            w.writerow(keys)
            for row in rows:
                w.writerow(row + [""] * (len(keys) - len(row)))

        fileio.atomic_write(self.path, write, text=True)
        self.keys = keys

    def close(self) -> None:
        pass


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class Logger:
    CURRENT: Optional["Logger"] = None

    def __init__(self, dir: Optional[str], outputs: list, rank: int):
        self.dir = dir
        self.outputs = outputs
        self.rank = rank
        self.level = INFO
        self.name2val: dict = defaultdict(float)
        self.name2cnt: dict = defaultdict(int)

    # key/values -------------------------------------------------------------------------
    def logkv(self, key, val) -> None:
        self.name2val[key] = val
        self.name2cnt[key] = 1

    def logkv_mean(self, key, val, count: int = 1) -> None:
        """Fold `val`, the mean of `count` values, into the running mean of `key`."""
        val = float(val)
        n = self.name2cnt[key]
        self.name2val[key] = self.name2val[key] * n / (n + count) + val * count / (n + count)
        self.name2cnt[key] = n + count

    def dumpkvs(self) -> dict:
        local = {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()}
        gathered = dist_util.all_gather_objects(local)
        out = _weighted_mean(gathered) if len(gathered) > 1 else {k: v for k, (v, _) in local.items()}
        if self.rank == 0:
            for o in self.outputs:
                o.write_kvs(out)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    # messages ---------------------------------------------------------------------------
    def log(self, *args, level: int = INFO) -> None:
        if level < self.level:
            return
        text = " ".join(map(str, args))
        if self.rank == 0:
            for o in self.outputs:
                if isinstance(o, _Text):
                    o.write_message(text)
        elif level >= WARN:
            sys.stderr.write(f"[rank {self.rank}] {text}\n")
            sys.stderr.flush()

    def close(self) -> None:
        for o in self.outputs:
            o.close()


def _weighted_mean(dicts: list) -> dict:
    sums, counts, other = defaultdict(float), defaultdict(float), {}
    for d in dicts:
        for k, (v, n) in d.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                other.setdefault(k, v)
                continue
            sums[k] += fv * n
            counts[k] += n
    out = {k: sums[k] / counts[k] for k in sums}
    for k, v in other.items():
        out.setdefault(k, v)
    # integer-valued terms (step, samples) stay integers in the files
    for d in dicts[:1]:
        for k, (v, _) in d.items():
            if isinstance(v, int) and k in out and math.isclose(out[k], v):
                out[k] = v
    return out


# ------------------------------------------------------------------------------------ API


def configure(dir: Optional[str] = None, format_strs=None, comm=None, log_suffix: str = "") -> Logger:
    """Start logging into `dir` (default `$OPENAI_LOGDIR`, else a new temporary folder).

    `format_strs` is a list (or comma-separated string) among 'stdout', 'log', 'csv'; the default
    is all three. `comm` is accepted for compatibility and ignored (ranks talk through
    torch.distributed).
    """
    del comm
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
    rank = dist_util.get_rank()
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("rcdm-%Y-%m-%d-%H-%M-%S-%f")
        )
    dir = os.path.expanduser(str(dir))
    if format_strs is None:
        format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv")
    if isinstance(format_strs, str):
        format_strs = format_strs.split(",")
    outputs = []
    if rank == 0:
        os.makedirs(dir, exist_ok=True)
        for fmt in filter(None, format_strs):
            if fmt == "stdout":
                outputs.append(_Text(sys.stdout, own=False))
            elif fmt == "log":
                outputs.append(_Text(fileio.open_append(os.path.join(dir, f"log{log_suffix}.txt")), own=True))
            elif fmt == "csv":
                outputs.append(_CSV(os.path.join(dir, f"progress{log_suffix}.csv")))
            else:
                raise ValueError(f"unknown log format {fmt!r}: use stdout, log or csv")
    Logger.CURRENT = Logger(dir, outputs, rank)
    log(f"Logging to {dir}")
    return Logger.CURRENT


def get_current() -> Logger:
    if Logger.CURRENT is None:
        configure(format_strs="stdout")
    return Logger.CURRENT


def logkv(key, val) -> None:
    get_current().logkv(key, val)


def logkv_mean(key, val, count: int = 1) -> None:
    get_current().logkv_mean(key, val, count)


def logkvs(d: dict) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> dict:
    """Write this step's terms (averaged over ranks). Every rank must call it."""
    return get_current().dumpkvs()


def drop_rows_after(key: str, value: int) -> int:
    """Remove `progress.csv` rows whose `key` exceeds `value`: a resumed run logs those steps again."""
    return sum(o.drop_rows_after(key, value) for o in get_current().outputs if isinstance(o, _CSV))


def getkvs() -> dict:
    return get_current().name2val


def log(*args, level: int = INFO) -> None:
    get_current().log(*args, level=level)


def console(message: str) -> None:
    """One line for the user: into the run's log when one is configured, else on stderr (a library
    call opens no log folder)."""
    if Logger.CURRENT is not None:
        log(message)
    else:
        print(message, file=sys.stderr, flush=True)


def debug(*args) -> None:
    log(*args, level=DEBUG)


def info(*args) -> None:
    log(*args, level=INFO)


def warn(*args) -> None:
    log(*args, level=WARN)


def error(*args) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    get_current().level = level


def get_dir() -> Optional[str]:
    return get_current().dir


def reset() -> None:
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
    Logger.CURRENT = None


record_tabular = logkv
dump_tabular = dumpkvs
