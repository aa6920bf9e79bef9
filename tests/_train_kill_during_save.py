"""Run scripts/image_train.py, but SIGKILL the process half-way through writing model<STEP>.pt.

`RCDM_TEST_KILL_AT_SAVE=STEP python tests/_train_kill_during_save.py <image_train flags>`: the
real training and the real atomic save run; when the model file of step STEP is being written,
half its bytes reach the disk and the process kills itself with SIGKILL, as a crash or an OOM kill
would, leaving whatever a real crash at that moment leaves.
"""

import io
import os
import runpy
import signal
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
sys.argv = [os.path.join(REPO, "scripts", "image_train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
