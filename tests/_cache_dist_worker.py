"""One rank of a real multi-process feature-cache build (gloo over 127.0.0.1, started by the tests).

argv: DATA_DIR CACHE_DIR OUT. Lists the data folder (counting os.scandir calls with an audit hook),
builds the cache from all images but the last two, then appends those two, and writes what it saw
to OUT/rank<r>.pt: the scan count, the list, the SHA-256 of every shard after each build, the rows.
"""

import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_rcdm import dist_util, logger  # noqa: E402
from guided_diffusion_rcdm.feature_cache import prepare_feature_cache  # noqa: E402
from guided_diffusion_rcdm.image_datasets import scan_images  # noqa: E402
from _cache_stub import SPEC, StubEncoder  # noqa: E402

SCANS = []
sys.addaudithook(lambda event, args: SCANS.append(args) if event == "os.scandir" else None)


def shard_digests(cache: str) -> dict:
    return {n: hashlib.sha256(open(os.path.join(cache, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(cache)) if n.startswith("shard-")}


def main(data_dir: str, cache: str, out: str) -> None:
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=out, format_strs="log")
    files = scan_images(data_dir).files
    scans = len(SCANS)
    first, feats = prepare_feature_cache(cache, data_dir, files[:-2], SPEC, StubEncoder, batch_size=2,
                                         num_workers=0, progress=False)
    dist_util.barrier()
    before = shard_digests(cache)
    dist_util.barrier()
    kept, feats = prepare_feature_cache(cache, data_dir, files, SPEC, StubEncoder, batch_size=2, num_workers=0,
                                        progress=False)
    torch.save({"scans": scans, "files": files, "kept": kept, "before": before, "after": shard_digests(cache),
                "feats": torch.stack([feats[i, f] for i in range(len(kept)) for f in (0, 1)])},
               os.path.join(out, f"rank{rank}.pt"))
    dist_util.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:4])
