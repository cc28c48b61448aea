"""Generation at the paper's scale (issues 13 and 14): the caller's network is never changed, half
precision stays within a measured bound of float32, PNG writing overlaps sampling without changing a byte,
the .npz is streamed."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lit.checkpoints import load_network
from edm_lit.generate import (PerSeedRandom, PngWriter, generate, image_path, module_device, sample_seeds,
                              with_precision, write_images_npz)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_net():
    """Chapter 7's committed quick model: a small *trained* network, where rounding errors mean something."""
    return load_network(ROOT / "book" / "results" / "quick_digits.json")


def test_generate_leaves_the_callers_module_untouched(parity_net, tmp_path):
    """c97c66b moved the caller's module to the sampling device, set eval() and requires_grad_(False)."""
    caller = copy.deepcopy(parity_net).train().requires_grad_(True)
    before = {k: v.clone() for k, v in caller.state_dict().items()}
    generate(caller, tmp_path / "a", seeds="0-2", progress=False, num_steps=2, device="cpu")
    assert caller.training and all(p.requires_grad for p in caller.parameters())
    assert all(p.device.type == "cpu" for p in caller.parameters())
    assert all(torch.equal(before[k], v) for k, v in caller.state_dict().items())
    # the images are those of the network in eval mode, as if the caller had passed that
    expected = sample_seeds(parity_net, [0, 1, 2], num_steps=2)
    import PIL.Image
    got = np.stack([np.asarray(PIL.Image.open(image_path(tmp_path / "a", s))) for s in range(3)])
    assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("precision, seeds, mean_bound, max_bound", [
    ("bf16", 100, 0.25, 6),  # measured on the quick model (500 seeds, this CPU): mean 0.14, max 4 levels
    ("fp16", 12, 0.1, 2),  # measured (500 seeds): mean 0.03, max 1 level; float16 is slow on a CPU
])
def test_half_precision_images_stay_within_the_stated_bound(quick_net, precision, seeds, mean_bound, max_bound):
    exact = sample_seeds(quick_net, range(seeds)).int()
    half = sample_seeds(with_precision(quick_net, **{precision: True}), range(seeds)).int()
    gap = (half - exact).abs().float()
    print(precision, gap.mean().item(), gap.max().item())
    assert 0 < gap.mean() < mean_bound and gap.max() <= max_bound  # > 0: it really ran in half precision
    assert quick_net.model.enc["8x8_conv"].weight.dtype == torch.float32  # the wrapper changed nothing
    assert module_device(with_precision(quick_net, **{precision: True})) == module_device(quick_net)


def test_png_bytes_do_not_depend_on_writer_threads(quick_net, tmp_path):
    for writers in (0, 3):
        generate(quick_net, tmp_path / str(writers), seeds="0-19", max_batch_size=7, progress=False,
                 num_steps=3, writers=writers)
    for seed in range(20):
        one, three = (Path(image_path(tmp_path / w, seed)).read_bytes() for w in ("0", "3"))
        assert one == three
    assert not list(tmp_path.rglob("*.tmp"))


def test_npz_is_streamed_in_the_savez_layout_and_written_all_or_nothing(quick_net, tmp_path):
    generate(quick_net, tmp_path / "out", seeds=[5, -1, 1000], subdirs=True, npz=tmp_path / "all",
             progress=False, num_steps=2)
    with np.load(tmp_path / "all.npz") as z:
        assert sorted(z.files) == ["images", "seeds"] and z["seeds"].tolist() == [5, -1, 1000]
        assert np.array_equal(z["images"], sample_seeds(quick_net, [5, -1, 1000], num_steps=2).numpy())
    Path(image_path(tmp_path / "out", 1000, True)).unlink()  # a missing PNG: the .npz cannot be completed
    with pytest.raises(FileNotFoundError):
        write_images_npz(tmp_path / "again.npz", tmp_path / "out", [5, -1, 1000], subdirs=True)
    assert not (tmp_path / "again.npz").exists() and not list(tmp_path.glob(".again.npz*"))


def test_writer_bounds_the_images_waiting(tmp_path):
    image = torch.zeros(4, 4, 1, dtype=torch.uint8)
    with PngWriter(threads=2, max_pending=3) as writer:
        for seed in range(10):
            writer.submit(image, image_path(tmp_path, seed))
            assert len(writer.pending) <= 3
    assert len(list(tmp_path.glob("*.png"))) == 10


def test_random_numbers_can_be_drawn_on_another_device_than_the_network(quick_net):
    """Chapter 9 on a GPU draws the CPU's numbers (`generator_device="cpu"`) to see the noise of a CPU run."""
    moved = PerSeedRandom([3, 4]).randn([2, 5], device="meta")  # drawn on the generators' device, then moved
    assert moved.device.type == "meta" and moved.shape == (2, 5)
    here = sample_seeds(quick_net, [7, 8], num_steps=3)
    assert torch.equal(here, sample_seeds(quick_net, [7, 8], num_steps=3, generator_device="cpu"))
