"""Compute precision and speed options shared by training, sampling and the benchmark.

Mixed precision is `torch.autocast` around the model call (bf16 on CPU and GPU, fp16 on GPU); the
model's output is handed back in float32 so the diffusion's arithmetic stays in full precision.
fp32 is the original's exact path. Channels-last memory format and `torch.compile` are opt-in.

`auto` picks what is fastest on this device, by measuring rather than assuming: CPUs differ by
10x both ways (bf16 is several times faster than fp32 with AMX, about 12x *slower* where it is
emulated on AVX2-only processors). On a CPU, bf16 is chosen only where the processor runs it
natively and a micro-benchmark of a channels-last 3x3 convolution confirms it is faster; the same
measurement decides channels-last and the fused attention kernel in fp32. The timings are cached
per machine (`speed_cache_path`). On CUDA: bf16 where supported, else fp16.
"""

from __future__ import annotations

import contextlib
import math
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fileio, logger
from .errors import UsageError
from .unet import AttentionBlock  # the model's own attention code, timed by the micro-benchmark

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto",) + PRECISIONS
# Overrides where the measured speed choices are cached (a folder).
SPEED_CACHE_ENV = "RCDM_CACHE_DIR"
# How much faster a choice must measure before it is taken: bf16 costs accuracy, so it must win
# clearly; a layout or kernel only needs to beat the timing noise.
BF16_MIN_SPEEDUP = 1.2
KERNEL_MIN_SPEEDUP = 1.1


def default_device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_problem(device: torch.device, gpu_count: int | None = None) -> str | None:
    """Why `device` cannot be used on this machine (None: it can); `gpu_count` defaults to the
    number of GPUs visible."""
    if device.type != "cuda":
        return None
    gpu_count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if gpu_count == 0:
        return "no GPU is available here; use `device` cpu"
    if device.index is not None and device.index >= gpu_count:
        return f"this machine has {gpu_count} GPU(s): cuda:0 to cuda:{gpu_count - 1}"
    return None


def resolve_precision(precision: str | None, use_fp16: bool = False, device=None) -> str:
    """The compute precision: `precision` if given (`auto`: see `auto_speed`), else fp16 for
    `use_fp16` on GPU (bf16 on CPU, where fp16 autocast is slow), else fp32.

    bf16 on a CPU that emulates it runs, with a warning (once) that quotes the measured slowdown.
    """
    device = torch.device(device) if device is not None else default_device()
    if precision == "auto":
        return auto_speed(device).precision
    if precision:
        if precision not in PRECISIONS:
            raise UsageError(
                f"unknown `precision` {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}"
            )
        chosen = precision
    elif use_fp16:
        chosen = "fp16" if device.type == "cuda" else "bf16"
    else:
        chosen = "fp32"
    if chosen == "bf16" and device.type == "cpu":
        _warn_if_bf16_is_slow()
    return chosen


# ----------------------------------------------------------------------------- auto


@dataclass(frozen=True)
class SpeedChoice:
    """What to run the UNet with: precision, memory format and attention kernel.

    `fused_attention`: True forces the fused kernel; None keeps the model's default (fused in
    bf16/fp16, the original's arithmetic in fp32). `reason`: one line saying why.
    """

    precision: str
    channels_last: bool = False
    fused_attention: bool | None = None
    reason: str = ""


@dataclass(frozen=True)
class CpuFeatures:
    """What a CPU offers for bf16, as torch sees it.

    `capability` is the instruction set ATen's kernels dispatch to ("AVX2", "AVX512", ...; lowered
    by `ATEN_CPU_CAPABILITY`); the flags are the processor's.
    """

    model: str = ""
    capability: str = ""
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx: bool = False

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX) that ATen's kernels may use."""
        return (self.avx512_bf16 or self.amx) and self.capability not in ("DEFAULT", "AVX2", "")

    def describe(self) -> str:
        """E.g. "AVX2, AVX512, AVX512-BF16, AMX; ATen kernels AVX512"."""
        flags = [name for name, on in (("AVX2", self.avx2), ("AVX512", self.avx512),
                                       ("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if on]
        return f"{', '.join(flags) or 'no AVX2/AVX512/AVX512-BF16/AMX'}; ATen kernels {self.capability}"


def cpu_features() -> CpuFeatures:
    """This CPU's model name and bf16-relevant features (torch's CPU capability queries)."""
    cpu = torch.cpu

    def flag(name: str) -> bool:
        query = getattr(cpu, name, None)
        return bool(query()) if query is not None else False

    return CpuFeatures(
        model=_cpu_model_name(),
        capability=torch.backends.cpu.get_cpu_capability(),
        avx2=flag("_is_avx2_supported"),
        avx512=flag("_is_avx512_supported"),
        avx512_bf16=flag("_is_avx512_bf16_supported"),
        amx=flag("_is_amx_tile_supported"),
    )


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The micro-benchmark: what dominates the UNet, at a size that takes a few milliseconds in fp32.
# conv_*: one 3x3 convolution, 128 channels at 32x32; block_*: GroupNorm, SiLU, the same
# convolution (half a ResBlock); attention_*: an attention block (128 channels, 4 heads, 16x16
# tokens) with the original's einsum arithmetic or the fused kernel.
KERNEL_TIMINGS = ("conv_fp32_nchw", "conv_fp32_cl", "conv_bf16_cl", "block_fp32_nchw", "block_fp32_cl",
                  "attention_fp32", "attention_fp32_fused")


def measure_cpu_kernels(seconds: float = 0.25, min_rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each `KERNEL_TIMINGS` operation on this CPU, on one thread: the best of
    rounds in which every operation runs once, for about `seconds` (at least `min_rounds` rounds).

    One thread and interleaved rounds because the ratios are what decide, they are a property of
    the core, and a busy machine disturbs a single thread least and all operations alike.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 32, 32, generator=gen)
    w = torch.randn(128, 128, 3, 3, generator=gen) * 0.03
    bias, gamma, beta = torch.zeros(128), torch.ones(128), torch.zeros(128)
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    x_bf, w_bf, bias_bf = x_cl.bfloat16(), w_cl.bfloat16(), bias.bfloat16()
    attention = AttentionBlock(128, num_heads=4).eval()
    tokens = torch.randn(2, 128, 16, 16, generator=gen)

    def block(x, w):
        return F.conv2d(F.silu(F.group_norm(x, 32, gamma, beta)), w, bias, padding=1)

    def attend(fused: bool):
        attention.attention.fused = fused
        return attention(tokens)

    ops: dict[str, Callable[[], torch.Tensor]] = {
        "conv_fp32_nchw": lambda: F.conv2d(x, w, bias, padding=1),
        "conv_fp32_cl": lambda: F.conv2d(x_cl, w_cl, bias, padding=1),
        "conv_bf16_cl": lambda: F.conv2d(x_bf, w_bf, bias_bf, padding=1),
        "block_fp32_nchw": lambda: block(x, w),
        "block_fp32_cl": lambda: block(x_cl, w_cl),
        "attention_fp32": lambda: attend(False),
        "attention_fp32_fused": lambda: attend(True),
    }
    best = dict.fromkeys(ops, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for op in ops.values():  # first calls pick and pack kernels
                op()
            deadline = time.perf_counter() + seconds
            rounds = 0
            while rounds < min_rounds or time.perf_counter() < deadline:
                for name, op in ops.items():
                    start = time.perf_counter()
                    op()
                    best[name] = min(best[name], time.perf_counter() - start)
                rounds += 1
    finally:
        torch.set_num_threads(threads)
    return best


def decide_cpu(features: CpuFeatures, timings: dict[str, float]) -> SpeedChoice:
    """The CPU choice from its features and `measure_cpu_kernels` timings (pure: no measuring)."""
    fp32_conv = min(timings["conv_fp32_nchw"], timings["conv_fp32_cl"])
    bf16_speedup = fp32_conv / timings["conv_bf16_cl"]
    if features.native_bf16 and bf16_speedup >= BF16_MIN_SPEEDUP:
        return SpeedChoice(
            "bf16", channels_last=True,
            reason=f"native bf16 ({features.describe()}): {bf16_speedup:.1f}x faster than fp32 "
            "on a channels-last 3x3 convolution; channels-last",
        )
    if not features.native_bf16:
        why = f"bf16 is emulated on this CPU ({features.describe()}): {1 / bf16_speedup:.1f}x slower"
    else:
        why = f"bf16 is native but measured only {bf16_speedup:.2f}x fp32 on a 3x3 convolution"
    cl_speedup = timings["block_fp32_nchw"] / timings["block_fp32_cl"]
    fused_speedup = timings["attention_fp32"] / timings["attention_fp32_fused"]
    channels_last = cl_speedup >= KERNEL_MIN_SPEEDUP
    fused = fused_speedup >= KERNEL_MIN_SPEEDUP
    kernels = (f"channels-last {'on' if channels_last else 'off'} ({cl_speedup:.2f}x), "
               f"fused attention {'on' if fused else 'off'} ({fused_speedup:.2f}x)")
    return SpeedChoice("fp32", channels_last=channels_last, fused_attention=True if fused else None,
                       reason=f"{why}; {kernels}")


def decide_cuda(bf16_supported: bool, name: str = "this GPU") -> SpeedChoice:
    """bf16 where the GPU supports it, else fp16 (trained with loss scaling). Channels-last stays
    off: CUDA's GroupNorm has no channels-last kernel in eager mode."""
    if bf16_supported:
        return SpeedChoice("bf16", reason=f"{name} supports bf16")
    return SpeedChoice("fp16", reason=f"{name} has no fast bf16: fp16 (loss scaling in training)")


def speed_cache_path() -> Path:
    """The file caching measured speed choices: in `$RCDM_CACHE_DIR`, else the user's cache
    folder (`$XDG_CACHE_HOME` or ~/.cache, under guided_diffusion_rcdm/)."""
    folder = os.environ.get(SPEED_CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "guided_diffusion_rcdm")
    return Path(folder) / "speed.json"


def _machine_key(features: CpuFeatures) -> str:
    """What the timings depend on: the CPU, torch, the thread count and the instruction-set limits
    set in the environment (the same CPU measures differently under them)."""
    limits = ",".join(f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                      if os.environ.get(v))
    return (f"{features.model} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"ATen {features.capability}" + (f" | {limits}" if limits else ""))


@dataclass
class _CpuMeasurement:
    features: CpuFeatures
    timings: dict[str, float]
    cached: bool
    seconds: float = 0.0
    path: Path = field(default_factory=speed_cache_path)


_CPU_MEASUREMENT: dict[str, _CpuMeasurement] = {}


def _saved_timings(entry: Any) -> dict[str, float] | None:
    """The timings of a speed-cache entry when every one is a positive finite number; else None
    (the entry is measured again and rewritten)."""
    timings = entry.get("timings") if isinstance(entry, dict) else None
    if not isinstance(timings, dict):
        return None
    values = {k: timings.get(k) for k in KERNEL_TIMINGS}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in values.values()):
        return None
    return {k: float(v) for k, v in values.items()}


def cpu_kernel_timings() -> _CpuMeasurement:
    """This machine's `measure_cpu_kernels` timings: from the cache file when it has this
    machine's (`_machine_key`), else measured (well under a second) and saved there. Once per
    process."""
    features = cpu_features()
    key = _machine_key(features)
    if key in _CPU_MEASUREMENT:
        return _CPU_MEASUREMENT[key]
    path = speed_cache_path()
    try:  # never blocks (a FIFO) nor reads without end (a link to /dev/zero): see read_small_json
        saved = fileio.read_small_json(str(path))
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    cached = _saved_timings(saved.get(key))
    if cached is not None:
        result = _CpuMeasurement(features, cached, True, path=path)
    else:
        start = time.perf_counter()
        timings = measure_cpu_kernels()
        result = _CpuMeasurement(features, timings, False, time.perf_counter() - start, path)
        saved = saved if isinstance(saved, dict) else {}
        saved[key] = {"timings": timings, "features": asdict(features), "measured": time.strftime("%Y-%m-%d")}
        try:
            fileio.atomic_write_text(str(path), json.dumps(saved, indent=1, sort_keys=True))
        except OSError:
            pass  # an unwritable cache only costs measuring again next time
    _CPU_MEASUREMENT[key] = result
    return result


_AUTO: dict[str, SpeedChoice] = {}


def auto_speed(device=None) -> SpeedChoice:
    """The fastest safe precision and kernels on `device` (default: `default_device()`), decided
    once per process and logged in one line with the reason."""
    device = torch.device(device) if device is not None else default_device()
    key = str(device)
    if key in _AUTO:
        return _AUTO[key]
    if device.type == "cuda":
        choice = decide_cuda(torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device))
        note = ""
    elif device.type == "cpu":
        measured = cpu_kernel_timings()
        choice = decide_cpu(measured.features, measured.timings)
        note = (f" [timings cached in {measured.path}]" if measured.cached
                else f" [measured in {measured.seconds:.2f} s]")
    else:
        choice = SpeedChoice("fp32", reason=f"no measured choice for {device.type}")
        note = ""
    _AUTO[key] = choice
    logger.console(f"precision auto -> {choice.precision} ({choice.reason}){note}")
    return choice


_WARNED_BF16 = False


def _warn_if_bf16_is_slow() -> None:
    """Once per process: warn when bf16 on this CPU is emulated or measured slower than fp32."""
    global _WARNED_BF16
    if _WARNED_BF16:
        return
    _WARNED_BF16 = True
    measured = cpu_kernel_timings()
    timings, features = measured.timings, measured.features
    slowdown = timings["conv_bf16_cl"] / min(timings["conv_fp32_nchw"], timings["conv_fp32_cl"])
    if features.native_bf16 and slowdown < 1:
        return
    what = "emulated" if not features.native_bf16 else "native but not faster"
    warnings.warn(
        f"--precision bf16: bf16 is {what} on this CPU ({features.describe()}); a 3x3 convolution "
        f"measured {slowdown:.1f}x slower than fp32. --precision auto picks the fastest precision "
        "for this machine",
        stacklevel=3,
    )


def resolve_speed(precision: str | None, use_fp16: bool = False, device=None,
                  channels_last: bool = False) -> SpeedChoice:
    """Precision and kernels: `auto` -> `auto_speed` (channels-last also on when asked for);
    otherwise `resolve_precision` with the given channels-last and the model's default attention."""
    if precision == "auto":
        choice = auto_speed(device)
        return replace(choice, channels_last=channels_last or choice.channels_last)
    return SpeedChoice(resolve_precision(precision, use_fp16, device), channels_last=channels_last)


def set_fused_attention(model: nn.Module, fused: bool | None) -> None:
    """Force the UNet's fused attention kernel on/off (None: its default); through DDP or
    compile wrappers, and a no-op for models without attention switches."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if fused is not None and hasattr(inner, "set_fused_attention"):
        inner.set_fused_attention(fused)


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on the device's type; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    device_type = device if isinstance(device, str) else torch.device(device).type
    return torch.autocast(device_type=torch.device(device_type).type, dtype=dtype)


def fastest_thread_count(work: Callable[[], object], candidates: Sequence[int] | None = None,
                         repeats: int = 3) -> tuple[int, dict[int, float]]:
    """Run `work` (one unit of the real job, e.g. a training step's forward and backward) at each
    CPU thread count in `candidates` (default: torch's current count and 1), leave torch on the
    fastest and return it with the median seconds of each.

    Small models are mostly per-operation overhead: there one thread can beat two, and a second
    thread that waits for a core taken by another process makes every step several times slower.
    Which is faster depends on the machine and its load, so it is measured, not assumed.
    """
    current = torch.get_num_threads()
    candidates = sorted({current, 1} if candidates is None else set(candidates), reverse=True)
    seconds: dict[int, float] = {}
    for n in candidates:
        torch.set_num_threads(n)
        work()  # warm-up: first calls allocate and pick kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        seconds[n] = sorted(times)[len(times) // 2]
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds


class AutocastModel(nn.Module):
    """Runs the wrapped model under autocast and returns its output in float32.

    Keyword arguments pass through, so it stands in for the UNet in every diffusion call.
    """

    def __init__(self, model: nn.Module, precision: str, device):
        super().__init__()
        self.inner = model
        self.precision = precision
        self.device_type = torch.device(device).type

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with autocast(self.precision, self.device_type):
            out = self.inner(*args, **kwargs)
        return out.float()

    def reuse_weight_casts(self) -> contextlib.AbstractContextManager:
        """A context in which calls share one low-precision copy of the weights.

        Autocast keeps its casts of the weights for as long as an autocast region is open, so a
        whole sampling loop run inside this context casts them once instead of at every step
        (about 10% of a 128x128 bf16 forward at batch 1 on a CPU). Only while the weights are fixed.
        """
        return autocast(self.precision, self.device_type)


class BatchDynamic(nn.Module):
    """Calls a compiled model with the batch dimension of every input marked dynamic.

    Without the mark, torch.compile specialises its graph to the first batch size and recompiles
    at the next one (a training step's last, smaller microbatch; guidance's doubled batch; another
    sampling batch size), and again when it then turns dynamic. With it, the first call compiles a
    graph for every batch size above 1 (a batch of 1 is always specialised: a second graph at most).
    """

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.inner = compiled

    def forward(self, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if torch.is_tensor(value) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return self.inner(*args, **kwargs)


def prepare_model(
    model: nn.Module,
    *,
    precision: str = "fp32",
    device=None,
    channels_last: bool = False,
    compile: bool | str | Callable = False,
    freeze: bool = False,
) -> nn.Module:
    """Wrap a model for fast evaluation: optional channels-last weights, `torch.compile`, autocast.

    The returned module is called exactly like `model`; with the defaults it is `model` itself.
    `precision="auto"` also applies the measured channels-last and attention-kernel choices
    (`auto_speed`). `compile`: True for torch.compile's default backend, or a backend (name or
    callable); the compiled graph takes any batch size (see `BatchDynamic`). `freeze` (with
    `compile`) lets the compiler fold the weights into the graph for calls made without gradients
    (pre-packed convolution weights, no per-call casts): for sampling only, since later changes to
    the weights are not seen by the compiled graph.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if precision == "auto":
        choice = resolve_speed(precision, device=device, channels_last=channels_last)
        precision, channels_last = choice.precision, choice.channels_last
        set_fused_attention(model, choice.fused_attention)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        backend = "inductor" if compile is True else compile
        options = {"freezing": True} if freeze and backend == "inductor" else None
        model = BatchDynamic(torch.compile(model, backend=backend, options=options))
    if precision != "fp32":
        model = AutocastModel(model, precision, device)
    return model


def set_fp32_math(tf32: bool = False, *, fixed_shapes: bool | None = None) -> None:
    """How float32 matrix products and convolutions run on NVIDIA GPUs, for this process.

    `tf32=False` (exact): both in full float32, the arithmetic of the CPU and of the fp32 parity
    tests. `tf32=True`: both in TensorFloat-32 (10-bit mantissa inputs, float32 accumulation), the
    behaviour of the PyTorch versions the original was written with, several times faster on
    Ampere and newer. Left alone, PyTorch runs convolutions in TF32 and matrix products in float32:
    neither exact nor fast. `fixed_shapes=True` lets cuDNN time its algorithms for each new input
    shape and keep the fastest (training, where the shapes repeat); None leaves it as it is.
    No effect on the CPU.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    if fixed_shapes is not None:
        torch.backends.cudnn.benchmark = bool(fixed_shapes)


def fp32_math_mode() -> str:
    """"tf32", "exact" or "mixed" (PyTorch's default: TF32 convolutions, float32 matrix products)."""
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return "tf32" if matmul and conv else "exact" if not (matmul or conv) else "mixed"


@contextlib.contextmanager
def exact_fp32_math():
    """A block in which float32 convolutions and matrix products are exact (for FID features)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_fp32_math(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


