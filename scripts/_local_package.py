"""Lets `python scripts/NAME.py` run from a clone that was not installed with `pip install -e .`.

Python puts this folder on the import path when it runs a script in it; this puts the clone's
package folder there too, first, so a script always runs the package it ships with. The scripts'
one shared way to find the package; installed, the `rcdm` command needs none of it.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(ROOT, "guided_diffusion_rcdm")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)
