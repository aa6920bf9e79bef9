"""Representation-Conditioned Diffusion Models (RCDM).

A diffusion UNet that generates images from the representation a frozen self-supervised encoder
gives an image (Bordes, Balestriero & Vincent, TMLR 2022).

    from guided_diffusion_rcdm import RCDM, ModelConfig, SamplingConfig, EncoderSpec, train, sample_images

- `RCDM.from_checkpoint(path, sampler="dpm++", steps=20)` / `RCDM.from_pretrained("dino")`: a model
  ready to sample, interpolate and manipulate representations;
- `ModelConfig` (UNet and diffusion settings, presets), `SamplingConfig` (how samples are drawn);
- `EncoderSpec`: the frozen encoder (published, torchvision, timm:, hf:, open_clip:, py:, a file);
- `train(data_dir, out_dir, model=..., encoder=...)`: train or resume an RCDM;
- `sample_images(model, diffusion, shape, sampler=..., steps=...)`: the samplers over any UNet.

The original's modules keep their paths (`guided_diffusion_rcdm.RCDM`, `script_util`,
`get_ssl_models`, ...).
"""

__version__ = "0.1.0"

from .config import ModelConfig, SamplingConfig
from .encoders import EncoderSpec
from .RCDM import RCDM
from .samplers import sample_images
from .training import train

# `guided_diffusion_rcdm.RCDM` is the class now (above); the original's spelling
# `guided_diffusion_rcdm.RCDM.RCDM(args)` keeps working through this alias.
RCDM.RCDM = RCDM

__all__ = ["RCDM", "ModelConfig", "SamplingConfig", "EncoderSpec", "train", "sample_images", "__version__"]
