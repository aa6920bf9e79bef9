"""The benchmark script runs end to end (smoke mode) and reports every figure against the baseline."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNet forward" in proc.stdout and "speedup_vs_baseline" in proc.stdout
    report = json.loads(out.read_text())
    variants = {row["variant"] for row in report["forward"]}
    assert {"baseline", "fp32", "bf16+sdpa+cl"} <= variants
    (auto,) = [v for v in variants if v.startswith("auto=")]  # what --precision auto picks here
    assert auto.split("=")[1].split("+")[0] in ("fp32", "bf16")
    assert "CPU: " in proc.stdout and "ATen kernels" in proc.stdout  # the CPU's features
    assert report["cpu_features"]["capability"]
    baseline = [r for r in report["forward"] if r["variant"] == "baseline"]
    assert all(r["speedup_vs_baseline"] == 1.0 for r in baseline)
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in report["forward"])
    samplers = {r["sampler"] for r in report["sampling"]}
    assert samplers == {"ddpm-100", "dpm++-20"}
    assert all(r["s_per_image"] > 0 for r in report["sampling"])
    assert all(r["images_per_s"] > 0 for r in report["training"])
    assert report["peak_memory_mb"] > 0
    # utilisation is the forward's FLOP/s over the device's measured peak in its precision
    assert report["peak_tflops"]["fp32"] > 0 and report["peak_tflops"]["bf16"] > 0
    for row in report["forward"]:
        name = row["variant"].removeprefix("auto=")
        peak = report["peak_tflops"][name.split("+")[0] if name != "baseline" else "fp32"]
        assert abs(row["utilisation"] - row["achieved_tflops"] / peak) < 1e-9
    assert "a forward at 100% of the peak would be" in proc.stdout
