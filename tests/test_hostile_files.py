"""State files a user does not control cannot hang a run, exhaust memory or crash it.

`train.lock` as a FIFO, a link to /dev/zero, a folder, a dangling link or JSON of the wrong type,
and the speed cache (`speed.json`) as a FIFO, a link to /dev/zero, strings or dicts for timings,
NaN or deep nesting: all in one real process under a time limit (subprocess timeout) and a memory
limit (RLIMIT_AS), which a blocking or endless read would break.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

from _sampling_helpers import REPO

MEMORY_LIMIT = 6 * 1024**3  # address space: torch's import needs ~2-3 GB; reading /dev/zero would pass it

DRIVER = textwrap.dedent(r"""
    import json, os, sys
    from guided_diffusion_rcdm import fileio, precision
    from guided_diffusion_rcdm.cli import train

    root = sys.argv[1]
    photos = sys.argv[2]
    results = {}

    def plant(path, kind):
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "zero":
            os.symlink("/dev/zero", path)
        elif kind == "folder":
            os.mkdir(path)
        elif kind == "dangling":
            os.symlink(os.path.join(root, "nowhere"), path)
        else:
            with open(path, "w") as f:
                f.write(kind)

    # train.lock: through the real command, which fails at the lock (before any model is built)
    for kind in ("fifo", "zero", "folder", "dangling"):
        out = os.path.join(root, "lock_" + str(len(results)))
        os.mkdir(out)
        plant(os.path.join(out, "train.lock"), kind)
        status = train.main(["--data_dir", photos, "--out_dir", out, "--type_model", "resnet18",
                             "--pretrained_encoder", "False", "--max_steps", "1", "--image_size", "32",
                             "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                             "--attention_resolutions", "", "--num_workers", "0", "--diffusion_steps", "50",
                             "--progress", "False"], "rcdm train")
        results["lock " + kind] = status
        print("LOCK-DONE", kind, status, file=sys.stderr, flush=True)

    # JSON of the wrong type: the lock the command takes (`fileio.acquire_run_lock`) takes it over
    for kind in ("[1, 2]", '"text"', '{"pid": "abc", "host": 3}'):
        out = os.path.join(root, "lock_" + str(len(results)))
        os.mkdir(out)
        plant(os.path.join(out, "train.lock"), kind)
        lock = fileio.acquire_run_lock(out, warn=lambda m: print("WARNING:", m, file=sys.stderr))
        results["lock " + kind] = 0 if json.load(open(lock.path))["pid"] == os.getpid() else 1
        lock.release()

    # speed.json: ignored and rewritten
    for kind in ("fifo", "zero", "nested", "dicts"):  # each measures the kernels again (~1 s)
        cache = os.path.join(root, "speed_" + kind)
        os.mkdir(cache)
        os.environ["RCDM_CACHE_DIR"] = cache
        path = os.path.join(cache, "speed.json")
        key = precision._machine_key(precision.cpu_features())
        content = {"nested": "[" * 100000 + "]" * 100000,
                   "strings": json.dumps({key: {"timings": {k: "fast" for k in precision.KERNEL_TIMINGS}}}),
                   "dicts": json.dumps({key: {"timings": {k: {"a": 1} for k in precision.KERNEL_TIMINGS}}}),
                   "nan": json.dumps({key: {"timings": {k: float("nan") for k in precision.KERNEL_TIMINGS}}})}
        plant(path, content.get(kind, kind))
        precision._CPU_MEASUREMENT.clear()
        m = precision.cpu_kernel_timings()
        rewritten = kind == "folder" or json.loads(open(path).read())[key]["timings"] == m.timings
        results["speed " + kind] = [m.cached, rewritten]
    print(json.dumps(results))
""")


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_hostile_state_files_neither_hang_nor_exhaust_memory(tmp_path):
    from _sampling_helpers import write_photos

    photos = write_photos(tmp_path / "photos", ("astronaut", "coffee"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RCDM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), os.path.dirname(photos[0])],
                          capture_output=True, text=True, env=env, timeout=120, preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rcdm train: error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # a FIFO, a link or a folder: one line naming what the lock is, status 2
    for kind, words in (("fifo", "a FIFO"), ("zero", "a symbolic link to /dev/zero"), ("folder", "a folder"),
                        ("dangling", "a symbolic link to")):
        assert results["lock " + kind] == 2, (kind, proc.stderr[-2000:])
        assert any("train.lock is " + words in line for line in errors), (kind, errors)
    # JSON of the wrong type: taken over with a warning (an unreadable lock)
    for kind in ("[1, 2]", '"text"', '{"pid": "abc", "host": 3}'):
        assert results["lock " + kind] == 0, (kind, proc.stderr[-2000:])
    assert proc.stderr.count("(unreadable lock) is no longer running") >= 3, proc.stderr[-3000:]
    # the speed cache: measured again (not cached) and rewritten
    for kind in ("fifo", "zero", "nested", "dicts"):
        assert results["speed " + kind] == [False, True], (kind, results)


def test_the_quickstart_refuses_folder_links_planted_at_its_folder_names(tmp_path):
    import pytest

    from guided_diffusion_rcdm import fileio
    from guided_diffusion_rcdm.apps import quickstart

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "qs"
    out.mkdir()
    (out / "data").symlink_to(elsewhere)
    with pytest.raises(fileio.UnsafePathError, match="data is a symbolic link"):
        quickstart.prepare_views(out / "data", 1, 0)
    (out / "data").unlink()
    (out / "data").mkdir()
    (out / "data" / "train").symlink_to(elsewhere)
    with pytest.raises(fileio.UnsafePathError, match="train is a symbolic link"):
        quickstart.prepare_views(out / "data", 1, 0)
    assert not any(elsewhere.iterdir())  # nothing was written through the links
