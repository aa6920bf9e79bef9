"""scripts/gpu_check.sh: without a GPU it says so and succeeds; its table and its isolation of checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU is visible here" in proc.stdout
    assert not (tmp_path / "r.json").exists()


def test_each_check_runs_apart_and_the_table_reports_it(tmp_path):
    # --device cpu runs the real checks on the CPU; parity is the fast one. An unknown name is refused.
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--only", "parity,benchmark", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["check"]: r for r in json.loads(out.read_text())["results"]}
    assert results["parity"]["result"] == "pass" and "TF32 off: model" in results["parity"]["detail"]
    assert results["benchmark"]["detail"].startswith("skipped")
    table = proc.stdout[proc.stdout.index("\ncheck ") + 1:]
    assert table.splitlines()[0].split() == ["check", "result", "seconds", "detail"]
    assert sum(line.startswith(("parity", "benchmark")) for line in table.splitlines()) == 2
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
                          "--only", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown --only nope" in bad.stderr
