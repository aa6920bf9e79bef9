"""Representation-Conditioned Diffusion Models (RCDM).

A diffusion UNet that generates images from the representation a frozen self-supervised encoder
gives an image (Bordes, Balestriero & Vincent, TMLR 2022).
"""

__version__ = "0.1.0"
