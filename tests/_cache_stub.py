"""A stub encoder for the feature-cache tests: deterministic, per image, no weights to download."""

import torch

from guided_diffusion_rcdm.encoders import EncoderSpec

SPEC = EncoderSpec("resnet18", pretrained=False)  # the record the cache keeps; the stub does the encoding


class StubEncoder(torch.nn.Module):
    """[B x 3 x H x W] -> [B x 48]: the 4 x 4 average of each channel (the same whatever the batch)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so encode_images finds a device

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) + self.anchor
