"""The feature cache, the data scan and resume at scale: shards written per rank (2 and 3 real
processes over gloo), appends that leave old shards untouched, damaged caches reported in one line,
rank 0 alone listing the data folder, and the peak memory of building, appending and resuming
(measured in a subprocess)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cache_stub import SPEC, StubEncoder
from _train_photos import make_photo_dir
from guided_diffusion_rcdm import feature_cache as fc
from guided_diffusion_rcdm import hub
from guided_diffusion_rcdm.cli import cache as cache_cli
from guided_diffusion_rcdm.image_datasets import LISTING_FILE, contiguous_share, find_images, scan_images
from helpers_hub import free_port

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_cache_dist_worker.py"
NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera")
SCANS = []
sys.addaudithook(lambda event, args: SCANS.append(args[0]) if event == "os.scandir" else None)


class Payload:
    """Anything but tensors and plain data: what a pickle could run code with."""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_", "PMI_", "OMPI_"))]:
        env.pop(key)
    return env



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"), names=NAMES, short_side=40)


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory):
    """One process's cache and, from real 2- and 3-process runs, each rank's results."""
    root = tmp_path_factory.mktemp("built")
    files = find_images(photos)
    single = str(root / "single")
    fc.prepare_feature_cache(single, photos, files[:-2], SPEC, StubEncoder, num_workers=0, progress=False)
    kept, feats = fc.prepare_feature_cache(single, photos, files, SPEC, StubEncoder, num_workers=0, progress=False)
    procs = {}
    for world in (2, 3):
        out, port = root / f"world{world}", free_port()
        out.mkdir()
        for rank in range(world):
            env = dict(_env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs[world, rank] = subprocess.Popen(
                [sys.executable, str(WORKER), photos, str(out / "cache"), str(out)], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {k: p.communicate(timeout=240)[0] for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
    ranks = {w: [torch.load(root / f"world{w}" / f"rank{r}.pt", weights_only=True) for r in range(w)] for w in (2, 3)}
    return {"root": root, "files": files, "single": single, "kept": kept,
            "feats": torch.stack([feats[i, f] for i in range(len(kept)) for f in (0, 1)]), "ranks": ranks}


def test_a_cache_built_by_2_or_3_processes_equals_one_process_and_appends_leave_old_shards_as_they_were(built):
    assert built["kept"] == built["files"] and len(built["files"]) == len(NAMES)
    for world, ranks in built["ranks"].items():
        for r in ranks:
            assert r["kept"] == built["kept"]
            torch.testing.assert_close(r["feats"], built["feats"], rtol=0, atol=0)
            # one shard per rank and build; the append wrote new ones and left the old bytes alone
            assert len(r["before"]) == world and all(r["after"][n] == d for n, d in r["before"].items())
        new = sorted(set(ranks[0]["after"]) - set(ranks[0]["before"]))
        # the 2 new images: one each for the 2 ranks whose contiguous share of them is not empty
        assert new == [fc.shard_name(1, k, world) for k in range(world) if len(range(*contiguous_share(2, k, world)))]
        assert len(new) == 2
        index = json.loads((built["root"] / f"world{world}" / "cache" / fc.INDEX_FILE).read_text())
        assert index["rows"] == len(NAMES) and index["dtype"] == "fp32" and index["encoder"]["width"] == 48
        assert [s["file"] for s in index["shards"]] == sorted(ranks[0]["before"]) + new


def test_only_rank_0_lists_the_data_folder_and_every_rank_gets_the_same_list(built):
    for ranks in built["ranks"].values():
        assert ranks[0]["scans"] >= 1 and all(r["scans"] == 0 for r in ranks[1:])
        assert all(r["files"] == built["files"] for r in ranks)


def test_a_requeued_job_reuses_the_listing_until_a_folder_changes(photos, tmp_path):
    first = scan_images(photos, index_dir=str(tmp_path))
    first.save(str(tmp_path))
    assert (tmp_path / LISTING_FILE).is_file() and first.scanned
    SCANS.clear()
    again = scan_images(photos, index_dir=str(tmp_path))
    assert again.files == first.files and not again.scanned and SCANS == []  # a stat per folder, no listing
    sub = Path(photos) / "sub" / "new"
    sub.mkdir()
    try:
        changed = scan_images(photos, index_dir=str(tmp_path))
        assert changed.scanned and changed.files == first.files and SCANS
    finally:
        sub.rmdir()


def test_a_dangling_link_in_the_data_folder_is_skipped_with_a_warning(photos, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(photos, folder)
    os.symlink(tmp_path / "gone.jpg", folder / "sub" / "ghost.jpg")
    files = find_images(str(folder))
    assert len(files) == len(NAMES) and not any("ghost" in f for f in files)
    out = capsys.readouterr()
    assert "ghost.jpg" in out.out + out.err and "does not exist" in out.out + out.err


def _shard(cache: Path) -> Path:
    return sorted(cache.glob("shard-*.pt"))[0]


def _rewrite_shard(cache: Path, **changes) -> None:
    path = _shard(cache)
    obj = {k: v.clone() for k, v in torch.load(path, weights_only=True).items() if torch.is_tensor(v)}
    torch.save({"format": fc.SHARD_FORMAT, **obj, **changes}, path)


def _edit_index(cache: Path, edit) -> None:
    index = json.loads((cache / fc.INDEX_FILE).read_text())
    edit(index)
    (cache / fc.INDEX_FILE).write_text(json.dumps(index))


DAMAGES = {
    "missing shard": (lambda c: _shard(c).unlink(), "is missing"),
    "text shard": (lambda c: _shard(c).write_text("features, honest\n"), "truncated or corrupt"),
    "truncated shard": (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:700]), "truncated or corrupt"),
    "wrong shape": (lambda c: _rewrite_shard(c, features=torch.zeros(5, 3, 48)), "expected [rows x 2 x width]"),
    "fewer rows": (lambda c: _rewrite_shard(c, features=torch.zeros(4, 2, 48)), "records 5"),
    "width": (lambda c: _edit_index(c, lambda i: i["encoder"].update(width=47)), "records width 47"),
    "NaN": (lambda c: _rewrite_shard(c, features=torch.full((5, 2, 48), float("nan"))), "NaN"),
    "pickle payload": (lambda c: torch.save({"format": fc.SHARD_FORMAT, "x": Payload()}, _shard(c)), "Python code"),
    "index not JSON": (lambda c: (c / fc.INDEX_FILE).write_text("{rows: 5"), "not valid JSON"),
    "old file as text": (lambda c: [p.unlink() for p in c.iterdir()] and (c / fc.CACHE_FILE).write_text("x"),
                         "truncated or corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_one_line_naming_the_file(damage, built, photos, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(built["single"], cache)
    shard = _shard(cache)
    spoil, expected = DAMAGES[damage]
    spoil(cache)
    named = cache / fc.INDEX_FILE if "JSON" in damage else cache / fc.CACHE_FILE if "old" in damage else shard
    status = cache_cli.main(["--data_dir", photos, "--feat_cache", str(cache), "--type_model", "resnet18",
                             "--pretrained_encoder", "False", "--num_workers", "0"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0] and str(named) in lines[0], lines[0]


def test_a_dtype_is_recorded_and_another_one_refused(built, photos, tmp_path, capsys):
    cache = str(tmp_path / "half")
    kept, feats = fc.prepare_feature_cache(cache, photos, built["files"], SPEC, StubEncoder, num_workers=0,
                                           progress=False, dtype="bf16")
    assert feats[0, 0].dtype == torch.bfloat16 and fc.read_index(cache)["dtype"] == "bf16"
    torch.testing.assert_close(feats[0, 0].float(), built["feats"][0], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="stores its features in bf16.*pass `dtype` bf16"):
        fc.prepare_feature_cache(cache, photos, built["files"], SPEC, StubEncoder, num_workers=0, progress=False)


def test_an_old_single_file_cache_is_read_and_extended_with_a_shard(built, photos, tmp_path):
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    whole = fc.load_cache(built["single"])
    n = len(whole["paths"]) - 1
    torch.save({"format": fc.CACHE_FORMAT, "encoder": whole["encoder"], "paths": whole["paths"][:n],
                "features": whole["features"][:n].clone(), "bad": {}}, old_dir / fc.CACHE_FILE)
    before = (old_dir / fc.CACHE_FILE).read_bytes()
    kept, feats = fc.prepare_feature_cache(str(old_dir), photos, built["files"][:n], SPEC, StubEncoder,
                                           num_workers=0, progress=False)
    assert len(kept) == n and not (old_dir / fc.INDEX_FILE).exists()  # read as it is
    kept, feats = fc.prepare_feature_cache(str(old_dir), photos, built["files"], SPEC, StubEncoder,
                                           num_workers=0, progress=False)
    index = fc.read_index(str(old_dir))
    assert [s["file"] for s in index["shards"]] == [fc.CACHE_FILE, fc.shard_name(1, 0, 1)]
    assert (old_dir / fc.CACHE_FILE).read_bytes() == before
    assert torch.equal(torch.stack([feats[i, f] for i in range(len(kept)) for f in (0, 1)]), built["feats"])
    assert torch.equal(feats.gather(1), built["feats"][1::2])  # rows from both files, in the data's order


MEMORY = r"""
import json, sys, torch
from guided_diffusion_rcdm import feature_cache as fc
from _cache_stub import SPEC

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

cache, rows, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out, index = {}, None
for build in (0, 1):  # the build, then an append of as many rows
    reset_peak()
    base = status("VmRSS")
    feats = torch.randn(rows, 2, width)
    paths = [f"n{build:02d}{i % 1000:03d}/img_{i:08d}.JPEG" for i in range(rows)]
    entry = fc.write_shard(cache, fc.shard_name(build, 0, 1), paths, feats)
    index = fc.commit_shards(cache, index, [entry], {}, SPEC.to_dict(), "fp32", "fp32")
    out[build] = {"peak": status("VmHWM") - base, "shard": entry["bytes"]}
    del feats, paths
print(json.dumps(out))
"""


def test_building_and_appending_peak_under_1_2x_the_largest_shard(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / "cache"), "25000", "640"],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for build in result.values():
        assert build["shard"] > 120e6 and build["peak"] < 1.2 * build["shard"], result


RESUME = r"""
import json, sys
from guided_diffusion_rcdm.train_util import find_resume_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
found = find_resume_checkpoint(sys.argv[1], ["0.9999"])
total = float(found["model"][0]["w"].sum()) + float(found["ema"]["0.9999"]["w"].sum())
total += sum(float(t.sum()) for s in found["opt"]["optimizer"]["state"].values() for t in s.values())
print(json.dumps({"step": found["step"], "peak": status("VmHWM") - base}))
"""


def test_resume_past_an_incomplete_newest_checkpoint_peaks_at_one_checkpoints_size(tmp_path):
    from guided_diffusion_rcdm.train_util import TRAIN_STATE_FORMAT, checkpoint_paths

    w = torch.randn(4_000_000)
    sizes = {}
    for step, complete in ((2, True), (3, False)):  # step 3 was cut off before its EMA file
        paths = checkpoint_paths(str(tmp_path), step, ["0.9999"])
        state = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": w + 1, "exp_avg_sq": w * w}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
        hub.atomic_torch_save({"format": TRAIN_STATE_FORMAT, "step": step, "optimizer": state}, paths["opt"])
        hub.save_checkpoint(paths["model"], {"w": w}, meta={"step": step})
        if complete:
            hub.save_checkpoint(paths["ema"]["0.9999"], {"w": w - 1}, meta={"step": step})
        sizes[step] = sum(os.path.getsize(p) for p in [paths["model"], paths["opt"], *paths["ema"].values()]
                          if os.path.exists(p))
    proc = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and result["peak"] < 1.15 * sizes[2], (result, sizes)
