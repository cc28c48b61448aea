from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def parity():
    """Load a reference file of the official implementation (plain tensors; never executes code)."""
    def load(name):
        return torch.load(DATA / name, weights_only=True)
    return load
