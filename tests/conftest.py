import os
from pathlib import Path

# The suite runs on the CPU even on a machine with GPUs (its tolerances and its gloo process groups
# are the CPU's); the processes it starts inherit this. scripts/gpu_check.sh runs the GPU checks.
if not os.environ.get("RCDM_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR
