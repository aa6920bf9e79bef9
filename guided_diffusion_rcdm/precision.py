"""Compute precision and speed options shared by training, sampling and the benchmark.

Mixed precision is `torch.autocast` around the model call (bf16 on CPU and GPU, fp16 on GPU); the
model's output is handed back in float32 so the diffusion's arithmetic stays in full precision.
fp32 is the original's exact path. Channels-last memory format and `torch.compile` are opt-in.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")


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
        return "no GPU is available here; use --device cpu"
    if device.index is not None and device.index >= gpu_count:
        return f"this machine has {gpu_count} GPU(s): cuda:0 to cuda:{gpu_count - 1}"
    return None


def resolve_precision(precision: str | None, use_fp16: bool = False, device=None) -> str:
    """The compute precision: `precision` if given, else fp16 for `use_fp16` on GPU (bf16 on CPU,
    where fp16 autocast is slow), else fp32."""
    device = torch.device(device) if device is not None else default_device()
    if precision:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        return precision
    if use_fp16:
        return "fp16" if device.type == "cuda" else "bf16"
    return "fp32"


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on the device's type; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    device_type = device if isinstance(device, str) else torch.device(device).type
    return torch.autocast(device_type=torch.device(device_type).type, dtype=dtype)


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


def prepare_model(
    model: nn.Module,
    *,
    precision: str = "fp32",
    device=None,
    channels_last: bool = False,
    compile: bool = False,
    freeze: bool = False,
) -> nn.Module:
    """Wrap a model for fast evaluation: optional channels-last weights, `torch.compile`, autocast.

    The returned module is called exactly like `model`; with the defaults it is `model` itself.
    `freeze` (with `compile`) lets the compiler fold the weights into the graph for calls made
    without gradients (pre-packed convolution weights, no per-call casts): for sampling only,
    since later changes to the weights are not seen by the compiled graph.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, options={"freezing": True} if freeze else None)
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


def add_precision_args(parser, *, default_precision: str = "fp32") -> None:
    """Add `--precision`, `--channels_last`, `--compile` and `--tf32` to an argparse parser."""
    parser.add_argument(
        "--precision",
        default=default_precision,
        choices=PRECISIONS,
        help="compute precision of the UNet: fp32 (exact, the original's), bf16 (CPU or GPU) or fp16 (GPU)",
    )
    parser.add_argument(
        "--channels_last",
        action="store_true",
        help="run convolutions in channels-last memory format (faster with bf16/fp16)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the UNet with torch.compile (slow first call)"
    )
    add_tf32_arg(parser)


def add_tf32_arg(parser) -> None:
    """Add `--tf32` (see `set_fp32_math`)."""
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="on NVIDIA GPUs, run float32 convolutions and matrix products in TensorFloat-32 (fast, "
        "about 1e-3 relative error); without it they are exact float32",
    )
