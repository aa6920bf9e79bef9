import os
from pathlib import Path

# The suite runs on the CPU even on a machine with GPUs (its tolerances and its gloo process groups
# are the CPU's); the processes it starts inherit this. scripts/gpu_check.sh runs the GPU checks.
if not os.environ.get("RCDM_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One CPU thread per process, here and in the processes the tests start (set before torch loads its
# OpenMP runtime, which reads it once). The tests' tensors are too small to share between threads,
# and OpenMP's waiting threads spin: on a machine whose cores are busy with other work, a second
# thread made a training step ~20x slower (10 s instead of 0.5 s). OMP_NUM_THREADS set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from guided_diffusion_rcdm import logger  # noqa: E402

REFERENCE_DIR = Path(__file__).parent / "reference"


@pytest.fixture(scope="session", autouse=True)
def _private_speed_cache(tmp_path_factory):
    """Measured speed choices (`--precision auto`) go to a folder of the test run's, not the
    user's cache; the processes the tests start inherit it."""
    os.environ["RCDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("speed_cache"))
    yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_log_left_open():
    """A test that trains in-process configures the run's log; closed after it, so a later test's
    console lines go to stderr as they would in a fresh process, whatever the test order."""
    yield
    logger.reset()


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR
