"""`--precision auto`: the decision from CPU features and micro-benchmark timings, its cache, the
one-line log, the warning for bf16 where it is slow, and agreement with a direct timing."""

import json
import time
import warnings

import pytest
import torch

from guided_diffusion_rcdm import logger
from guided_diffusion_rcdm import precision as P
from guided_diffusion_rcdm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

AMX = P.CpuFeatures("Xeon", "AVX512", avx2=True, avx512=True, avx512_bf16=True, amx=True)
AVX512_BF16 = P.CpuFeatures("EPYC 9004", "AVX512", avx2=True, avx512=True, avx512_bf16=True)
AVX2_ONLY = P.CpuFeatures("EPYC 7002", "AVX2", avx2=True)
AMX_LIMITED_TO_AVX2 = P.CpuFeatures("Xeon", "AVX2", avx2=True, avx512=True, avx512_bf16=True, amx=True)


def timings(conv_fp32=2e-3, conv_bf16=2e-3, block_nchw=3e-3, block_cl=3e-3, attn=3e-3, attn_fused=3e-3):
    return {"conv_fp32_nchw": conv_fp32, "conv_fp32_cl": conv_fp32, "conv_bf16_cl": conv_bf16,
            "block_fp32_nchw": block_nchw, "block_fp32_cl": block_cl,
            "attention_fp32": attn, "attention_fp32_fused": attn_fused}


@pytest.mark.parametrize("features, measured, precision, channels_last, fused, words", [
    (AMX, timings(conv_bf16=0.3e-3), "bf16", True, None, "6.7x faster"),
    (AVX512_BF16, timings(conv_bf16=1e-3), "bf16", True, None, "2.0x faster"),
    # native, but not faster by enough to pay bf16's rounding
    (AVX512_BF16, timings(conv_bf16=1.9e-3), "fp32", False, None, "only 1.05x"),
    # emulated: never bf16, whatever a noisy timing says
    (AVX2_ONLY, timings(conv_bf16=24e-3), "fp32", False, None, "emulated on this CPU (AVX2; ATen kernels AVX2): 12.0x slower"),
    (AVX2_ONLY, timings(conv_bf16=0.5e-3), "fp32", False, None, "emulated"),
    (AMX_LIMITED_TO_AVX2, timings(conv_bf16=0.5e-3), "fp32", False, None, "ATen kernels AVX2"),
    # fp32 kernels: channels-last and the fused attention kernel where they measure faster
    (AVX2_ONLY, timings(conv_bf16=24e-3, block_cl=2e-3), "fp32", True, None, "channels-last on (1.50x)"),
    (AVX2_ONLY, timings(conv_bf16=24e-3, attn_fused=2e-3), "fp32", False, True, "fused attention on (1.50x)"),
    (AVX2_ONLY, timings(conv_bf16=24e-3, block_cl=2.9e-3, attn_fused=2.9e-3), "fp32", False, None,
     "channels-last off (1.03x), fused attention off (1.03x)"),
])
def test_cpu_decision(features, measured, precision, channels_last, fused, words):
    choice = P.decide_cpu(features, measured)
    assert (choice.precision, choice.channels_last, choice.fused_attention) == (precision, channels_last, fused)
    assert words in choice.reason


def test_cuda_decision():
    assert P.decide_cuda(True, "NVIDIA H100").precision == "bf16"
    v100 = P.decide_cuda(False, "Tesla V100")
    assert v100.precision == "fp16" and "loss scaling" in v100.reason and not v100.channels_last


@pytest.fixture
def fresh_process_state(monkeypatch, tmp_path):
    """A cache folder of the test's own and no decision made yet in this process."""
    monkeypatch.setenv(P.SPEED_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(P, "_AUTO", {})
    monkeypatch.setattr(P, "_CPU_MEASUREMENT", {})
    monkeypatch.setattr(P, "_WARNED_BF16", False)
    monkeypatch.setattr(logger.Logger, "CURRENT", None)  # an earlier test's log would take the line
    return tmp_path / "speed.json"


def _store(path, measured):
    """Put `measured` in the cache file as this machine's timings."""
    key = P._machine_key(P.cpu_features())
    path.write_text(json.dumps({key: {"timings": measured}}))


def test_auto_measures_once_caches_per_machine_and_logs_one_line(fresh_process_state, capsys, monkeypatch):
    path = fresh_process_state
    start = time.perf_counter()
    choice = P.auto_speed("cpu")
    assert time.perf_counter() - start < 5  # well under a second on an idle machine; this one is shared
    assert P.auto_speed("cpu") is choice  # once per process
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"precision auto -> {choice.precision} (")
    saved = json.loads(path.read_text())
    (key,) = saved
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    assert P.cpu_features().model in key and set(saved[key]["timings"]) == set(P.KERNEL_TIMINGS)

    # a later process reads the cached timings instead of measuring
    monkeypatch.setattr(P, "_AUTO", {})
    monkeypatch.setattr(P, "_CPU_MEASUREMENT", {})
    _store(path, timings(conv_bf16=24e-3, block_cl=2e-3, attn_fused=2e-3))
    again = P.auto_speed("cpu")
    assert (again.precision, again.channels_last, again.fused_attention) == ("fp32", True, True)
    assert "cached in" in capsys.readouterr().err

    # another thread count is another machine as far as timings go
    threads = torch.get_num_threads()
    monkeypatch.setattr(P, "_CPU_MEASUREMENT", {})
    torch.set_num_threads(threads + 1)
    try:
        assert not P.cpu_kernel_timings().cached
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(path.read_text())) == 2


def test_prepare_model_auto_applies_the_measured_kernels(fresh_process_state):
    _store(fresh_process_state, timings(conv_bf16=24e-3, block_cl=2e-3, attn_fused=2e-3))
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), "image_size": 16, "num_channels": 32,
                                             "num_res_blocks": 1, "channel_mult": "1,2",
                                             "attention_resolutions": "8"},
                                          feat_cond=True, ssl_dim=8)
    runner = P.prepare_model(model, precision="auto", device="cpu")
    assert runner is model  # fp32: no autocast wrapper
    weight = model.input_blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    switches = [m.fused for m in model.modules() if hasattr(m, "fused")]
    assert switches and all(fused is True for fused in switches)
    assert P.resolve_precision("auto", device="cpu") == "fp32"


def test_explicit_bf16_on_a_slow_cpu_warns_once_with_the_slowdown(fresh_process_state):
    # bf16 measured 3x slower than fp32 on this machine (whatever its features)
    _store(fresh_process_state, timings(conv_bf16=6e-3))
    with pytest.warns(UserWarning, match=r"3\.0x slower than fp32\. --precision auto picks"):
        assert P.resolve_precision("bf16", device="cpu") == "bf16"  # it still runs in bf16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.resolve_precision("bf16", device="cpu")
        P.resolve_precision("", use_fp16=True, device="cpu")  # the original flag's bf16 on CPU too


def test_explicit_bf16_on_a_fast_cpu_does_not_warn(fresh_process_state):
    if not P.cpu_features().native_bf16:
        pytest.skip("bf16 is emulated on this CPU: there is no fast bf16 to stay quiet about")
    _store(fresh_process_state, timings(conv_bf16=0.5e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("bf16", device="cpu") == "bf16"


def test_the_real_micro_benchmark_agrees_with_a_direct_timing():
    """Measured on this machine: the decision from `measure_cpu_kernels` is the precision that a
    direct timing of a small UNet forward finds faster (both on one thread, as the micro-benchmark,
    so that other work on the machine disturbs them least)."""
    features = P.cpu_features()
    choice = P.decide_cpu(features, P.measure_cpu_kernels())
    flags = {**model_and_diffusion_defaults(), "image_size": 32, "num_channels": 64, "num_res_blocks": 1,
             "channel_mult": "1,2", "attention_resolutions": "16", "learn_sigma": True}
    model, _ = create_model_and_diffusion(**flags, feat_cond=True, ssl_dim=16)
    model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t, feat = torch.tensor([10, 500]), torch.randn(2, 16)
    bf16 = P.prepare_model(model, precision="bf16", device="cpu")

    def best(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            fp32_s = best(lambda: model(x, t, feat=feat))
        with torch.no_grad(), bf16.reuse_weight_casts():  # the weights cast once, as when sampling
            bf16_s = best(lambda: bf16(x, t, feat=feat))
    finally:
        torch.set_num_threads(threads)
    speedup = fp32_s / bf16_s
    if 1 / 1.5 < speedup < 1.5:
        pytest.skip(f"bf16 and fp32 are too close to call on this machine ({speedup:.2f}x)")
    expected = "bf16" if features.native_bf16 and speedup >= 1.5 else "fp32"
    assert choice.precision == expected, (choice.reason, f"direct timing: bf16 {speedup:.2f}x fp32")


@pytest.mark.parametrize("slow_at", [2, 1])
def test_the_thread_count_is_the_one_that_ran_the_work_fastest(slow_at):
    """The work is slow at one thread count: that count loses, torch is left on the other, and the
    returned timings are the ones measured at each count."""
    before = torch.get_num_threads()
    calls = []

    def work():
        calls.append(torch.get_num_threads())
        time.sleep(0.03 if torch.get_num_threads() == slow_at else 0.001)

    try:
        best, seconds = P.fastest_thread_count(work, candidates=(2, 1), repeats=3)
        assert best == (1 if slow_at == 2 else 2) and torch.get_num_threads() == best
        assert set(seconds) == {1, 2} and seconds[slow_at] > 0.02 > seconds[best]
        assert calls.count(1) == calls.count(2) == 4  # a warm-up and three timed runs each
    finally:
        torch.set_num_threads(before)
