"""Scale benchmark of the feature cache and the data scan, for `scripts/benchmark_scale.py`.

Builds a feature cache of N rows x 2 x D with a stub encoder (seeded random features: the encoder's
cost is not what is measured) as W ranks would, each rank in its own process, one after the other
(every figure is per process: peak memory from /proc/self/status VmHWM less the memory before the
phase, bytes from /proc/self/io). Then appends 1% more rows, loads the cache as each training rank
does (`prepare_feature_cache`, then one pass over the rows `ImageDataset` gives the rank) and lists
a generated folder of empty image files in ImageNet's layout. The file pages a rank's load brings
into memory are counted with mincore(2) after evicting the file (posix_fadvise DONTNEED), so
readahead counts. Prints a table and its extrapolation to ImageNet (1.28M images, 4 nodes x 8 ranks,
2048-d DINO ResNet-50 trunk).

Runs against whichever version of the package is importable: the sharded cache, or the earlier
single-file cache (ranks write parts, rank 0 merges), so the two can be compared:

    python scripts/benchmark_scale.py --rows 100000 --width 2048 --ranks 4 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import time

IMAGENET = {"rows": 1_281_167, "width": 2048, "ranks": 32, "ranks_per_node": 8, "dirs": 1000}


# ------------------------------------------------------------------------------ measuring


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _io() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


class Probe:
    """Peak memory above the start (VmHWM reset through clear_refs), wall time and I/O of a phase."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.rss0, self.io0, self.t0 = _status("VmRSS"), _io(), time.perf_counter()
        self.file0 = _status("RssFile")
        return self

    def __exit__(self, *exc):
        io = _io()
        self.seconds = time.perf_counter() - self.t0
        self.peak = _status("VmHWM") - self.rss0
        self.written = io["wchar"] - self.io0["wchar"]
        self.read = io["rchar"] - self.io0["rchar"]


def evict(path: str) -> None:
    """Drop a file's clean pages from the page cache (no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: str) -> int:
    """Bytes of `path` in the page cache (mincore(2) on a read-only map of it)."""
    size = os.path.getsize(path)
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(_mmap_address(m), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) * page
    finally:
        m.close()


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _mmap_address(m: mmap.mmap) -> int:
    """The address of a (read-only) mmap's memory, through the buffer protocol."""
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes, release.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int], [ctypes.POINTER(_PyBuffer)]
    view = _PyBuffer()
    if get(m, ctypes.byref(view), 0) != 0:
        raise OSError("no buffer")
    try:
        return view.buf
    finally:
        release(ctypes.byref(view))


# ------------------------------------------------------------------------------ the phases


def _names(rows: int, start: int = 0) -> list[str]:
    # ImageNet's layout: 1000 class folders of about 1300 images each
    return [f"n{(i // 1300) % 1000:08d}/n{(i // 1300) % 1000:08d}_{i:08d}.JPEG" for i in range(start, start + rows)]


def _features(rows: int, width: int, seed: int):
    import torch

    return torch.randn(rows, 2, width, generator=torch.Generator().manual_seed(seed))


def _spec():
    from guided_diffusion_rcdm.encoders import EncoderSpec

    return EncoderSpec("resnet18", pretrained=False)


def _sharded():
    from guided_diffusion_rcdm import feature_cache as fc

    return hasattr(fc, "write_shard")


def _write(a, rank: int, ranks: int, start: int, rows: int) -> dict:
    """Rank `rank` of `ranks` encodes its share of `rows` (from row `start`) and writes it."""
    from guided_diffusion_rcdm import feature_cache as fc

    n0, n1 = start + rows * rank // ranks, start + rows * (rank + 1) // ranks
    with Probe() as p:
        feats = _features(n1 - n0, a.width, n0)
        if _sharded():
            entry = fc.write_shard(a.cache, fc.shard_name(a.generation, rank, ranks), _names(n1 - n0, n0), feats)
        else:
            from guided_diffusion_rcdm.hub import atomic_torch_save

            entry = {"file": f"part-{a.generation}-{rank:05d}-of-{ranks:05d}.pt"}
            atomic_torch_save({"paths": _names(n1 - n0, n0), "features": feats, "bad": {}},
                              os.path.join(a.cache, entry["file"]))
        del feats
    return {"entry": entry, "peak": p.peak, "written": p.written, "seconds": p.seconds}


def phase_build(a) -> dict:
    """Every rank writes its share (one after the other, each measured alone), then rank 0 records
    the build: the index (sharded) or the merge into one file (earlier)."""
    from guided_diffusion_rcdm import feature_cache as fc

    writes = [_write(a, r, a.ranks, a.start, a.rows) for r in range(a.ranks)]
    entries = [w.pop("entry") for w in writes]
    with Probe() as p:
        if _sharded():
            fc.commit_shards(a.cache, fc.read_index(a.cache), entries, {}, _spec().to_dict(), "fp32", "fp32")
        else:
            from guided_diffusion_rcdm.hub import safe_torch_load

            names = [os.path.join(a.cache, e["file"]) for e in entries]
            fc._merge_and_save(a.cache, fc.load_cache(a.cache), [safe_torch_load(n) for n in names],
                               _spec().to_dict(), "fp32")
            for n in names:
                os.remove(n)
    return {"rank_peak": max(w["peak"] for w in writes), "commit_peak": p.peak,
            "written": sum(w["written"] for w in writes) + p.written,
            "seconds": sum(w["seconds"] for w in writes) + p.seconds}


def _cache_files(cache: str) -> list[str]:
    return sorted(os.path.join(cache, n) for n in os.listdir(cache) if n.endswith(".pt"))


def phase_load(a) -> dict:
    """Rank `a.rank` of `a.ranks` starts training from the cache and reads each of its rows once."""
    from guided_diffusion_rcdm import dist_util
    from guided_diffusion_rcdm import feature_cache as fc
    from guided_diffusion_rcdm.image_datasets import ImageDataset

    # one process stands for rank a.rank: what the process group would say
    dist_util.get_rank, dist_util.get_world_size = (lambda: a.rank), (lambda: a.ranks)
    root = "/data/imagenet/train"
    paths = [f"{root}/{n}" for n in _names(a.rows)]
    for f in _cache_files(a.cache):
        evict(f)
    with Probe() as p:
        kept, table = fc.prepare_feature_cache(a.cache, root, paths, _spec(), progress=False)
        t_prepare = time.perf_counter() - p.t0
        local = ImageDataset(32, kept, shard=a.rank, num_shards=a.ranks, features=table).local_features
        total = 0.0
        for i in range(len(local)):
            total += float(local[i, 0][0])
        mapped = _status("RssFile")
    resident = sum(resident_bytes(f) for f in _cache_files(a.cache))
    return {"peak": p.peak, "seconds": p.seconds, "prepare_seconds": t_prepare, "rows": len(local),
            "read": p.read, "resident": resident, "held": p.peak - max(0, mapped - p.file0)}


MARK = b"rcdm-scale-benchmark-mark"


def _mark(label: str) -> None:
    """A write(2) that strace shows, so the listing's system calls can be told from the rest."""
    with open(os.devnull, "wb", buffering=0) as f:
        f.write(MARK + label.encode())


def phase_scan(a) -> dict:
    """List a generated folder as the training command does (run under strace, which counts the
    file-system calls between the marks)."""
    from guided_diffusion_rcdm import image_datasets

    _mark("first")
    with Probe() as p:
        files = image_datasets.find_images(a.data)
    _mark("end")
    first = {"seconds": p.seconds, "files": len(files)}
    reuse = None
    if hasattr(image_datasets, "scan_images"):
        image_datasets.scan_images(a.data, index_dir=a.cache).save(a.cache)
        _mark("reuse")
        with Probe() as p:
            again = image_datasets.scan_images(a.data, index_dir=a.cache)
        _mark("end")
        assert again.files == files and not again.scanned
        reuse = {"seconds": p.seconds}
    return {"first": first, "reuse": reuse}


def _count_calls(trace: str) -> dict:
    """File-system calls between each start mark and the next end mark of an strace log."""
    counts, current = {}, None
    with open(trace, errors="replace") as f:
        for line in f:
            if MARK.decode() in line:
                label = line.split(MARK.decode(), 1)[1].split('"', 1)[0]
                current = None if label == "end" else label
                if current:
                    counts[current] = 0
            elif current and not line.startswith(("write(", "+++", "---")) and "(" in line:
                counts[current] += 1
    return counts


PHASES = {"build": phase_build, "load": phase_load, "scan": phase_scan}


def _run(phase: str, trace: str = "", **kwargs) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--phase", phase]
    for k, v in kwargs.items():
        argv += [f"--{k}", str(v)]
    if trace:  # every file-system call (stat, open, directory reads), and the marks
        argv = ["strace", "-qq", "-o", trace, "-e", "trace=%file,%stat,getdents64,write"] + argv
    out = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_folder(path: str, files: int, dirs: int) -> None:
    """`files` empty .JPEG files in `dirs` class folders (the data scan reads names, not pixels)."""
    for d in range(dirs):
        sub = os.path.join(path, f"n{d:08d}")
        os.makedirs(sub, exist_ok=True)
        for i in range(d, files, dirs):
            open(os.path.join(sub, f"n{d:08d}_{i:08d}.JPEG"), "wb").close()


# ------------------------------------------------------------------------------ the report


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def measure(a) -> dict:
    cache = os.path.join(a.work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache)
    result = {"rows": a.rows, "width": a.width, "ranks": a.ranks, "sharded": _sharded()}
    common = dict(cache=cache, width=a.width, ranks=a.ranks)
    data_bytes = a.rows * 2 * a.width * 4
    build = _run("build", rows=a.rows, generation=0, **common)
    result["build"] = {**build, "features": data_bytes, "largest_share": data_bytes / a.ranks}
    loads = [_run("load", rows=a.rows, rank=r, **common) for r in (0, a.ranks - 1)]
    result["load"] = {"peak": max(x["peak"] for x in loads), "seconds": max(x["seconds"] for x in loads),
                      "prepare_seconds": max(x["prepare_seconds"] for x in loads),
                      "resident": max(x["resident"] for x in loads), "needed": data_bytes / a.ranks,
                      "held": max(x["held"] for x in loads),
                      "file_bytes": sum(os.path.getsize(f) for f in _cache_files(cache))}
    extra = max(1, a.rows // 100)
    add = _run("build", rows=extra, start=a.rows, generation=1, cache=cache, width=a.width, ranks=1)
    result["append"] = {"rows": extra, "peak": max(add["rank_peak"], add["commit_peak"]),
                        "written": add["written"], "seconds": add["seconds"]}
    shutil.rmtree(cache)
    if a.scan_files:
        data = os.path.join(a.work, "data")
        if not os.path.isdir(data):
            make_folder(data, a.scan_files, a.scan_dirs)
        os.makedirs(cache, exist_ok=True)
        trace = os.path.join(a.work, "scan.strace") if shutil.which("strace") else ""
        scan = _run("scan", data=data, cache=cache)  # the times: without strace
        calls = {}
        if trace:
            _run("scan", trace=trace, data=data, cache=cache)
            calls = _count_calls(trace)
        scan["first"]["calls"] = calls.get("first")
        if scan["reuse"]:
            scan["reuse"]["calls"] = calls.get("reuse")
        if trace:
            os.remove(trace)
        result["scan"] = {**scan, "dirs": a.scan_dirs}
        shutil.rmtree(cache)
    return result


def extrapolate(r: dict) -> dict:
    """The ImageNet figures, scaled from the measured ratios (marked as such in the table)."""
    n, d, w, per_node = IMAGENET["rows"], IMAGENET["width"], IMAGENET["ranks"], IMAGENET["ranks_per_node"]
    total = n * 2 * d * 4
    b, ld = r["build"], r["load"]
    # build: a rank's peak scales with its share; rank 0's merge (earlier) with the whole cache
    build_peak = max(b["rank_peak"] / b["largest_share"] * total / w, b["commit_peak"] / b["features"] * total)
    # load: what a rank holds besides the mapped file (paths, tables) scales with the rows; the page
    # cache of a node holds what its ranks' reads brought in, at the measured read amplification
    anon_per_rank = max(0.0, ld["held"]) / r["rows"] * n
    amplification = ld["resident"] / ld["needed"]
    node_pages = min(total, amplification * total / w * per_node)
    out = {"total": total, "rank0_build_peak": build_peak, "append_written": r["append"]["written"] / b["features"] * total,
           "per_rank_memory": anon_per_rank, "node_memory": anon_per_rank * per_node + node_pages,
           "node_read": node_pages, "prepare_seconds": ld["prepare_seconds"] / r["rows"] * n}
    if "scan" in r:
        # calls scale with the files (the earlier listing: a stat each; now: directory reads); every
        # rank lists the folder in the earlier version, rank 0 alone now; a requeue: a stat per folder
        s = r["scan"]
        per_start = (1 if r["sharded"] else w) * s["first"]["calls"] / s["first"]["files"] * n
        out["scan_calls_per_start"] = per_start
        out["scan_calls_requeue"] = (s["reuse"]["calls"] / (s["dirs"] + 1) * (IMAGENET["dirs"] + 1)
                                     if s["reuse"] else per_start)
        out["scan_seconds"] = s["first"]["seconds"] / s["first"]["files"] * n
    return out


def report(r: dict) -> str:
    b, ap, ld = r["build"], r["append"], r["load"]
    kind = "sharded cache" if r["sharded"] else "single-file cache (earlier)"
    lines = [f"{kind}: {r['rows']} rows x 2 x {r['width']} fp32 ({_gb(b['features'])}), {r['ranks']} ranks",
             f"  build   peak of a writing rank {_gb(b['rank_peak'])} ({b['rank_peak'] / b['largest_share']:.2f}x its share), "
             f"rank 0 after the writes {_gb(b['commit_peak'])} ({b['commit_peak'] / b['features']:.2f}x the features); "
             f"written {_gb(b['written'])}; {b['seconds']:.1f} s",
             f"  append  {ap['rows']} rows (1%): written {_gb(ap['written'])}, peak {_gb(ap['peak'])}, {ap['seconds']:.1f} s",
             f"  load    per rank: peak {_gb(ld['peak'])} ({_gb(ld['held'])} besides mapped cache pages), prepare {ld['prepare_seconds']:.2f} s, one pass {ld['seconds']:.1f} s; "
             f"file pages brought in {_gb(ld['resident'])} for the {_gb(ld['needed'])} it reads "
             f"({ld['resident'] / ld['needed']:.1f}x)"]
    if "scan" in r:
        s = r["scan"]
        lines.append(f"  scan    {s['first']['files']} files in {s['dirs']} folders: {s['first']['seconds']:.2f} s, "
                     f"{s['first']['calls']} file-system calls per scanning rank" + (f"; requeue with the saved listing {s['reuse']['seconds']:.2f} s, "
                                                   f"{s['reuse']['calls']} calls" if s["reuse"] else ""))
    e = extrapolate(r)
    lines += ["  ImageNet (extrapolated: 1.28M images, 2 x 2048 fp32 = "
              f"{_gb(e['total'])}, 32 ranks on 4 nodes):",
              f"    rank 0 peak while building {_gb(e['rank0_build_peak'])}; appending 1% writes {_gb(e['append_written'])}",
              f"    per rank at load {_gb(e['per_rank_memory'])} besides the page cache, prepare {e['prepare_seconds']:.1f} s; "
              f"per node {_gb(e['node_memory'])}; cache bytes read per node {_gb(e['node_read'])}"]
    if "scan_calls_per_start" in e:
        lines.append(f"    data scan: {e['scan_calls_per_start']:.3g} file-system calls per start "
                     f"({e['scan_seconds']:.0f} s), {e['scan_calls_requeue']:.0f} per requeue with an unchanged folder")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows of the cache (images)")
    p.add_argument("--width", type=int, default=2048, help="representation width D")
    p.add_argument("--ranks", type=int, default=4, help="ranks W that build and read it")
    p.add_argument("--scan_files", type=int, default=0, help="files of the generated folder to list (0: no scan)")
    p.add_argument("--scan_dirs", type=int, default=100, help="class folders of the generated folder")
    p.add_argument("--work", default="scale-benchmark", help="scratch folder (the cache is deleted afterwards)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--report", default="", help="print the table of figures written earlier with --json")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    for k in ("rank", "start", "generation"):
        p.add_argument(f"--{k}", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return 0
    if a.report:
        with open(a.report) as f:
            print(report(json.load(f)))
        return 0
    os.makedirs(a.work, exist_ok=True)
    result = measure(a)
    print(report(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result, "imagenet": extrapolate(result)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
