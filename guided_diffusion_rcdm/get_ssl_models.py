"""Moved to `guided_diffusion_rcdm.encoders.resnets`; this name stays importable, the same module."""

import sys

from .encoders import resnets

sys.modules[__name__] = resnets
