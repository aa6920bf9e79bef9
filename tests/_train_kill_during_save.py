"""Run the training command (scripts/image_train.py), but SIGKILL the process half-way through writing model<STEP>.pt.

`RCDM_TEST_KILL_AT_SAVE=STEP python tests/_train_kill_during_save.py <image_train flags>`: the
real training and the real atomic save run; when the model file of step STEP is being written,
half its bytes reach the disk and the process kills itself with SIGKILL, as a crash or an OOM kill
would, leaving whatever a real crash at that moment leaves.
"""

import io
import os
import signal
import sys

import torch

from guided_diffusion_rcdm.cli.train import main

STEP = int(os.environ["RCDM_TEST_KILL_AT_SAVE"])
_real_save = torch.save


def _save_then_die(obj, f, *args, **kwargs):
    name = f if isinstance(f, str) else os.readlink(f"/proc/self/fd/{f.fileno()}")
    if f"model{STEP:06d}.pt" in os.path.basename(str(name)):
        buffer = io.BytesIO()
        _real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _save_then_die
# scripts/image_train.py's own code: the `train` command of the command-line layer
sys.exit(main(sys.argv[1:], prog="image_train.py"))
