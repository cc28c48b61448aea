# ---
# jupyter:
#   edm_lit:
#     export: distributed
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: edm_lit
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A5. Several processes: `torchrun` plumbing
#
# The paper trains on 8 GPUs (CIFAR-10, FFHQ, AFHQv2) and on 32 (ImageNet), one process per
# GPU, and generates its 50,000 FID images the same way. Chapter 7's loop and Chapter 8's
# generation run unchanged in one process or many; what differs is gathered here: how a
# process learns its place, how an error on one process reaches all of them, and how
# objects are exchanged. Launch with PyTorch's `torchrun`, which starts the processes and
# tells each its place through environment variables:
#
# ```bash
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --data=cifar10-32x32.zip ...
# torchrun --standalone --nproc_per_node=8 -m edm_lit.cli generate --seeds=0-49999 ...
# ```

# %%
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

# %% [markdown]
# ## A5.1 A process's place
#
# `torchrun` sets `WORLD_SIZE` (processes in all), `RANK` (this one's number) and
# `LOCAL_RANK` (its number on its machine, which picks its GPU). `init_distributed` reads them,
# joins the process group — NCCL between GPUs, Gloo between CPU processes — and returns
# `(rank, world_size, device)`. Without `torchrun` it is one process, rank 0 of 1, and
# nothing is initialised.

# %% tags=["export"]
import os

import torch


def init_distributed() -> tuple:
    """(rank, world size, device): join torchrun's process group (NCCL on CUDA, Gloo on
    CPU), or one process without it; the device is this process's GPU (LOCAL_RANK) or
    the CPU. Appendix A5."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    return 0, 1, device


def local_rank() -> int:
    """This process's number on its machine (torchrun's LOCAL_RANK; else the rank, else
    0). Appendix A5."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# %% [markdown]
# ## A5.2 Every process learns every error
#
# A process that stops on an error while the others wait in a collective operation hangs the
# whole job. So before any collective step, every process contributes its error message (or
# `None`) and all of them act on the first one: `agree_on_error` is itself a collective, and
# doubles as a barrier. `gather` collects one picklable object per process, in rank order —
# the training state stores every rank's random generators this way.

# %% tags=["export"]
def gather(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (a collective); [obj] alone.
    Appendix A5."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def agree_on_error(error):
    """Every process's error message (or None) -> the first one of any process, on all
    of them (a collective, so also a barrier); the error itself without
    torch.distributed. Appendix A5."""
    if not torch.distributed.is_initialized():
        return error
    errors = gather(error, torch.distributed.get_world_size())
    return next((e for e in errors if e is not None), None)


# %% [markdown]
# **Check — two processes.** Below, two CPU processes join a Gloo group through the same
# environment variables `torchrun` would set (hiding any GPU, so that Gloo is used). Rank 1 meets an error that rank 0 does not:
# both must return the same message, and `gather` must hand both the same list.

# %%
RANK_SCRIPT = """
import sys, torch
from edm_lit.distributed import agree_on_error, gather, init_distributed, local_rank
rank, world_size, device = init_distributed()
error = agree_on_error("rank 1: no space left on the device" if rank == 1 else None)
objects = gather({"rank": rank, "local": local_rank()}, world_size)
torch.save({"error": error, "objects": objects, "world_size": world_size}, sys.argv[1])
torch.distributed.destroy_process_group()
"""
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
out_dir = Path(tempfile.mkdtemp(prefix="edm_lit_A5_"))
def environment(rank):
    return {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "CUDA_VISIBLE_DEVICES": ""}


ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT,
                           str(out_dir / f"rank{r}.pt")], env=environment(r))
         for r in range(2)]
assert [p.wait(timeout=120) for p in ranks] == [0, 0]
results = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]
for r, res in enumerate(results):
    print(f"rank {r}: error {res['error']!r}, gathered {res['objects']}")
assert all(res["error"] == "rank 1: no space left on the device" for res in results)
expected = [{"rank": 0, "local": 0}, {"rank": 1, "local": 1}]
assert all(res["objects"] == expected for res in results)
assert all(res["world_size"] == 2 for res in results)

# %%
from edm_lit.distributed import agree_on_error, gather, init_distributed

assert init_distributed()[:2] == (0, 1) and not torch.distributed.is_initialized()
assert agree_on_error("alone") == "alone" and gather(7, 1) == [7]

# %% [markdown]
# ## A5.3 Who does what
#
# With the place known, the work is split without talking: training gives process `r` of `W`
# the positions `r, r + W, r + 2W, ...` of one seeded stream of images (Chapter 7.2), so the
# global batch is the same for any `W`; generation gives each process every `W`-th batch of
# seeds (Chapter 8.1), so each image depends on its seed alone. Only rank 0 writes files;
# every rank reads. The picture shows the first 24 images of the stream for `W = 1, 2, 4`.

# %%
from edm_lit.training import ShardedStream

fig, axes = plt.subplots(3, 1, figsize=(7, 2.6), sharex=True)
for ax, world in zip(axes, [1, 2, 4]):
    owner = np.zeros(24, int)
    for r in range(world):
        stream = iter(ShardedStream(1000, rank=r, world_size=world, seed=0))
        for step in range(24 // world):
            next(stream)
            owner[step * world + r] = r
    ax.imshow(owner[None], cmap="tab10", vmin=0, vmax=9, aspect="auto")
    ax.set_yticks([0], [f"W = {world}"])
    for position in range(24):
        ax.text(position, 0, str(owner[position]), ha="center", va="center",
                color="white", fontsize=8)
axes[-1].set_xlabel("position in the global stream of images "
                    "(number: the process that loads it)")
fig.tight_layout()
plt.show()
# position 0 is the same image for every W
firsts = {next(iter(ShardedStream(1000, rank=0, world_size=w, seed=0)))
          for w in (1, 2, 4)}
assert len(firsts) == 1

# %% [markdown]
# ## What this appendix exported
#
# `edm_lit.distributed`: `init_distributed`, `local_rank`, `agree_on_error` and `gather`, used by
# Chapter 7's training loop and Chapter 8's generation and FID.
