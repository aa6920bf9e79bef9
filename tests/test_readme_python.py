"""The README's Python examples, run as written in a fresh interpreter.

The folder they run in holds what the examples name: photographs (scikit-image's), a tiny
self-describing checkpoint at `checkpoints/ema_0.9999_200000.pt` (random resnet18 encoder, so no
download), and an `RCDM_MIRROR` directory with a published-layout DINO encoder and DINO-head RCDM
file (random weights), which `from_pretrained` and the training example read instead of the network.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from _sampling_helpers import REPO, make_tiny_checkpoint, photo
from helpers_hub import write_rcdm_file, write_upstream_file


def python_examples() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_examples_run_as_written(tmp_path):
    blocks = python_examples()
    assert len(blocks) >= 4 and any("RCDM.from_checkpoint" in b for b in blocks)
    assert any("train(" in b for b in blocks) and any("RCDM.from_pretrained" in b for b in blocks)
    assert any("from guided_diffusion_rcdm import RCDM" in b for b in blocks)

    photos = tmp_path / "photos"
    photos.mkdir()
    photo("chelsea").save(photos / "cat.jpg")
    photo("coffee").save(photos / "coffee.png")
    photo("astronaut").save(photos / "astronaut.jpg")
    (tmp_path / "checkpoints").mkdir()
    make_tiny_checkpoint(tmp_path / "checkpoints" / "ema_0.9999_200000.pt")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_upstream_file("dino", mirror)
    write_rcdm_file(mirror / "rcdm_ema_dino_head.pt", "dino_head")

    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RCDM_MIRROR": str(mirror),
           "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=float(os.environ.get("README_TIMEOUT", 600)))
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 2 images x 4 samples of 32x32, in a 4-wide grid (2 px padding)
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.size == (4 * 34 + 2, 2 * 34 + 2)
    assert "torch.Size([1, 5, 1, 3, 32, 32]) torch.Size([3, 2, 3, 32, 32])" in proc.stdout
    assert "128 256 dino" in proc.stdout  # the published DINO-head model and its 256-d head
    assert (tmp_path / "runs" / "photos" / "ema_0.9999_000003.pt").is_file()
    assert "3 runs/photos/ema_0.9999_000003.pt" in proc.stdout
