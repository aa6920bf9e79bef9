"""Moved to `guided_diffusion_rcdm.encoders.vits`; this name stays importable, the same module."""

import sys

from .encoders import vits

sys.modules[__name__] = vits
