"""edm_lit.data (Chapter 6): a ZIP data set read by DataLoader worker processes (issue 14).

A worker made by `fork` inherits the parent's open archive, and with it one file position shared
by both processes; the store must open the archive again in every new process.
"""
import multiprocessing

import numpy as np
import pytest
import torch

from edm_lit.data import ImageFolderDataset, Source, write_dataset
from edm_lit.training import make_loader

N_IMAGES = 64


@pytest.fixture(scope="module")
def zip_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, [N_IMAGES, 32, 32, 3], dtype=np.uint8)  # 3 kB PNGs: several a buffer
    items = ((i, images[i], int(i % 5)) for i in range(N_IMAGES))
    dest = tmp_path_factory.mktemp("zip") / "set.zip"
    return write_dataset(Source(N_IMAGES, items, True), dest, progress=False)


def _child_reads(ds, conn):
    """In the forked child: read items 1, 2, ... one at a time, when told to, and report each."""
    try:
        for i in range(1, N_IMAGES // 2):
            conn.recv()
            image, _ = ds[i]
            conn.send(image.tobytes())
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
        conn.send(f"{type(e).__name__}: {e}")


def test_forked_reader_does_not_share_the_parents_file_position(zip_path):
    """Deterministic: parent and forked child read in turns from an archive the parent opened."""
    ds = ImageFolderDataset(zip_path, use_labels=True)
    expected = [ds[i][0].tobytes() for i in range(N_IMAGES)]  # also opens the archive in the parent
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_child_reads, args=(ds, child_end))
    child.start()
    try:
        for i in range(1, N_IMAGES // 2):
            assert ds[N_IMAGES - i][0].tobytes() == expected[N_IMAGES - i]  # the parent reads too
            parent_end.send("go")
            got = parent_end.recv()
            assert got == expected[i], got if isinstance(got, str) else f"item {i}: wrong pixels"
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _batches(loader, count):
    return [tuple(tensor.clone() for tensor in next(loader)) for _ in range(count)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_same_batches_with_0_1_2_4_workers(zip_path):
    """Chapter 7's loader (fork workers on Linux): the batches of 0 workers with any number."""
    ds = ImageFolderDataset(zip_path, use_labels=True)
    ds[0]  # the parent has opened the archive before the workers start
    runs = {}
    for workers in (0, 1, 2, 4):
        loader = make_loader(ds, batch_gpu=8, rank=0, world_size=1, seed=3, start_nimg=0,
                             num_workers=workers)
        runs[workers] = _batches(loader, 3 * N_IMAGES // 8)  # three passes over the data
        del loader
    reference = runs[0]
    assert torch.unique(torch.cat([labels for _, labels in reference]).argmax(1)).numel() == 5
    for workers, batches in runs.items():
        for (images, labels), (ref_images, ref_labels) in zip(batches, reference):
            assert torch.equal(images, ref_images), f"{workers} workers"
            assert torch.equal(labels, ref_labels), f"{workers} workers"


def test_spawned_worker_reads_the_archive(zip_path):
    ds = ImageFolderDataset(zip_path, use_labels=True)
    ds[0]
    order = list(range(N_IMAGES - 1, -1, -1))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=order, num_workers=1,
                                         multiprocessing_context="spawn")
    images = torch.cat([batch for batch, _ in loader])
    assert torch.equal(images, torch.stack([torch.from_numpy(ds[i][0]) for i in order]))
