from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
BOOK_DATA = Path(__file__).parents[1] / "book" / "data"  # reference files the chapters read as well

# The unit tests use small tensors: one thread is as fast and immune to OpenMP spinning on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def parity():
    """Load a reference file of the official implementation (plain tensors; never executes code)."""
    def load(name):
        path = DATA / name if (DATA / name).exists() else BOOK_DATA / name
        return torch.load(path, weights_only=True)
    return load


@pytest.fixture(scope="session")
def ref(parity):
    """precond_edm.pt: the official small EDMPrecond(SongUNet), its weights, inputs and outputs."""
    return parity("precond_edm.pt")


@pytest.fixture(scope="session")
def parity_net(parity):
    """The official small EDMPrecond(SongUNet) of precond_edm.pt with its weights, in eval mode, no grad."""
    from edm_lit.precond import EDMPrecond
    ref = parity("precond_edm.pt")
    net = EDMPrecond(**ref["kwargs"])
    net.load_state_dict(ref["state_dict"])
    return net.eval().requires_grad_(False)
