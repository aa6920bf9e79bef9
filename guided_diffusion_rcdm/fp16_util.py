"""Half-precision weights for the UNet torso (the original `use_fp16` flag).

Mixed precision for new work goes through `torch.autocast`; these helpers keep the original meaning
of `use_fp16`: the convolution weights of the input, middle and output blocks stored in float16.
"""

from __future__ import annotations

import torch.nn as nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """Convert a convolution's parameters to float16 (no-op for other layers)."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo `convert_module_to_f16`."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
