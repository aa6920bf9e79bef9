from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).parent / "reference"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR
