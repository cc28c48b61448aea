# ---
# jupyter:
#   edm_lit:
#     export: generate
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
# # A6. Generation and FID at scale: the engineering
#
# Chapter 8 derives what an FID is and why an image must depend on its seed alone. Between
# those ideas and 50,000 images written by 8 GPUs lies engineering that a reader of the
# chapter need not hold in mind, and that a user of `edm-lit generate` and `edm-lit fid`
# relies on. It is gathered here and in Appendix A6b, as reference, each piece with its
# check. This appendix holds the generation half, all of it in `edm_lit.generate`: seeds
# as the official flag writes them, never expanded (A6.1); batches, and the share of each
# `torchrun` process (A6.2); the caller's network, never changed, and half precision
# (A6.3); file names, PNG writer threads and the streamed `.npz` (A6.4); and `generate`,
# the driver behind `edm-lit generate` (A6.5). Appendix A6b holds the FID half: the
# Inception-v3 port, its weights file, reference files and image sets. The command-line
# parsing of both commands is Appendix A1.3; the file primitives (`write_png`,
# `write_atomic`, `check_writable`) are Appendix A3; the process group is Appendix A5.

# %%
import copy
import hashlib
import io
import math
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from myst_nb import glue

torch.set_num_threads(1)  # small tensors: one thread is fastest
WORK = Path(tempfile.mkdtemp(prefix="edm_lit_A6_"))
PRECOND = torch.load(Path("data") / "precond_edm.pt", weights_only=True)

# %% [markdown]
# ## A6.1 Seeds, never expanded
#
# Seeds are given as the official flag writes them, `--seeds=0-49999` or `1,2,5-10`. A
# single seed may be negative (`--seeds=-1`, which the official parser accepts too); every
# seed is taken modulo $2^{32}$ when its generator is seeded (Chapter 8.1), so seed $-1$
# draws what seed $2^{32} - 1$ draws. The official script turns the list into an `int64`
# tensor, so a seed must lie in $[-2^{63}, 2^{63})$; we refuse others when the flag is
# read. We never expand the ranges into a list: `Seeds` keeps them as Python `range`s, so
# `--seeds=0-999999999999` costs no memory (and runs until stopped, as asked).

# %% tags=["export"]
import bisect
import collections.abc
import itertools
import re

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INT = re.compile(r"^[+-]?\d+$")
_INT64 = range(-(1 << 63), 1 << 63)  # the official parser's seeds are an int64 tensor


def _check_int64(part):
    ascending = isinstance(part, range) and part.step > 0
    low, high = (part[0], part[-1]) if ascending else (min(part), max(part))
    for seed in (low, high):  # min() of a huge range would iterate it
        if seed not in _INT64:
            raise ValueError(f"seeds must lie in [-2**63, 2**63) (int64, as the "
                             f"official parser), got {seed}")


class Seeds(collections.abc.Sequence):
    """An ordered list of seeds held as ranges, never expanded; a slice is a Seeds too.
    Appendix A6.1."""

    def __init__(self, parts=()):
        parts = [p if isinstance(p, range) else tuple(int(s) for s in p) for p in parts]
        self.parts = [p for p in parts if len(p)]
        for part in self.parts:
            _check_int64(part)
        lengths = (len(p) for p in self.parts)
        self.starts = list(itertools.accumulate(lengths, initial=0))

    def __len__(self):
        return self.starts[-1]

    def __iter__(self):
        return itertools.chain.from_iterable(self.parts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                return Seeds([[self[i] for i in range(lo, hi, step)]])
            pieces = zip(self.parts, self.starts)
            return Seeds(p[max(lo - s, 0):max(hi - s, 0)] for p, s in pieces)
        index = index + len(self) if index < 0 else index
        if not 0 <= index < len(self):
            raise IndexError(f"seed index {index} out of range for {len(self)} seeds")
        k = bisect.bisect_right(self.starts, index) - 1
        return self.parts[k][index - self.starts[k]]

    def __eq__(self, other):
        if not isinstance(other, collections.abc.Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self):
        def text(p):
            if isinstance(p, range):
                return f"{p.start}-{p.stop - 1}"
            return ",".join(map(str, p))
        return "Seeds(" + ",".join(text(p) for p in self.parts) + ")"


# %% tags=["export"]
def _seed_part(part, text):
    match = _RANGE.match(part)
    if match:
        lo, hi = int(match.group(1)), int(match.group(2))
        if hi < lo:
            raise ValueError(f"seeds: the range {part!r} is empty (its end is below "
                             f"its start)")
        return range(lo, hi + 1)
    if _INT.match(part):
        return (int(part),)  # negative too, as the official int(p); drawn modulo 2**32
    what = ("an empty entry" if not part else
            f"{part!r} is neither an integer nor a range A-B of non-negative integers")
    raise ValueError(f"seeds: {what} in {text!r}; write e.g. 0-49999 or 1,2,5-10")


def parse_seeds(text):
    """'0-3,7' -> Seeds 0, 1, 2, 3, 7: the official --seeds syntax (comma-separated
    integers, which may be negative, and inclusive ranges of non-negative integers),
    each within int64. A list, tuple or range is taken as is. Appendix A6.1."""
    if isinstance(text, Seeds):
        return text
    if isinstance(text, (list, tuple, range)):
        return Seeds([text])
    return Seeds(_seed_part(part.strip(), str(text)) for part in str(text).split(","))


# %% [markdown]
# **Check** — the official syntax, negative seeds, refusals that say what is wrong, and a
# trillion seeds that cost nothing until they are drawn.

# %% tags=["hide-input"]
assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7] and parse_seeds("-1,+2") == [-1, 2]
huge = parse_seeds("0-999999999999")
assert len(huge) == 10**12 and huge[-1] == 10**12 - 1 and list(huge[5:8]) == [5, 6, 7]
for bad in ["3-1", "1,,2", "1.5", f"0,{1 << 63}"]:
    try:
        parse_seeds(bad)
        raise AssertionError(f"{bad!r} must be refused")
    except ValueError as e:
        print(f"{bad!r}: {e}")

# %% [markdown]
# ## A6.2 Batches and processes
#
# The seeds are cut into batches of at most `--batch` images, with a number of batches that
# is a multiple of the number of processes: under `torchrun`, process $r$ of $W$ takes
# batches $r, r+W, r+2W, \dots$, and every process runs the same number of batches (so
# that collective operations stay in step; a process may get an empty batch). The cut is
# that of `numpy.array_split` — the first batches hold one seed more — computed for each
# batch when it is needed. Since an image depends only on its seed (Chapter 8.1), how the
# seeds are cut changes no image.

# %% tags=["export"]
class _SeedBatches(collections.abc.Sequence):
    """Batch i of process `rank`: a list of seeds, computed on demand."""

    def __init__(self, seeds, num_batches, world_size, rank):
        self.seeds, self.ids = seeds, range(rank, num_batches, world_size)
        self.size, self.longer = divmod(len(seeds), num_batches)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        b = self.ids[i]
        start = b * self.size + min(b, self.longer)  # the first `longer` hold one more
        return list(self.seeds[start:start + self.size + (b < self.longer)])


def seed_batches(seeds, max_batch_size=64, world_size=1, rank=0):
    """The batches of seeds that process `rank` of `world_size` generates (possibly some
    empty). Appendix A6.2."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_round = max_batch_size * world_size
    num_batches = max(1, -(-len(seeds) // per_round)) * world_size
    return _SeedBatches(seeds, num_batches, world_size, rank)


# %% [markdown]
# **Check** — every seed once, in batches of at most the maximum, the same number of
# batches per process, and the last batch of a trillion seeds computed without the others.

# %% tags=["hide-input"]
for world in (1, 2, 3):
    shares = [seed_batches(range(23), 4, world, r) for r in range(world)]
    assert sorted(s for share in shares for b in share for s in b) == list(range(23))
    assert len({len(share) for share in shares}) == 1
    assert max(len(b) for share in shares for b in share) <= 4
assert list(seed_batches(range(10), 2, world_size=3, rank=1)) == [[2, 3], [8]]
assert seed_batches(huge, 64)[-1] == list(range(10**12 - 64, 10**12))
print("process 1 of 3, 10 seeds, batches of 2:", list(seed_batches(range(10), 2, 3, 1)))

# %% [markdown]
# ## A6.3 The caller's network, and half precision
#
# `generate` and `sample_seeds` never change a network they are given. A module is
# sampled where it is; only if it must run on another `device`, or is in training mode
# (dropout on), is a *copy* moved and put in eval mode — the caller's module keeps its
# device, mode and `requires_grad`. A network that `generate` loads itself (a path or a
# URL, through `edm_lit.checkpoints.load_network`, Appendix A2) goes to `device`, by
# default the GPU of this process. An object without the denoiser interface — an inner
# U-Net saved without its preconditioner — is refused in one line.

# %% tags=["export"]
import copy
import os

import torch

from edm_lit.checkpoints import load_network

_DENOISER_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "sigma_min",
                        "sigma_max", "round_sigma")


def check_denoiser(net, name="network"):
    """Refuse in one line an object without the denoiser interface. Appendix A6.3."""
    missing = [a for a in _DENOISER_ATTRIBUTES if not hasattr(net, a)]
    if missing or not callable(net):
        raise ValueError(
            f"{name}: a {type(net).__name__} is not a denoiser D(x, sigma, "
            f"class_labels): it lacks {', '.join(missing) or '__call__'}; load or save "
            f"the preconditioner around it (e.g. EDMPrecond, what `edm-lit train` "
            f"saves), not the inner network")
    return net


def module_device(net, default=None):
    """The device of a module's first parameter or buffer; `default` without tensors.
    Appendix A6.3."""
    while isinstance(getattr(net, "__dict__", {}).get("net"), torch.nn.Module):
        net = net.net  # a wrapper such as the half-precision one below
    if not isinstance(net, torch.nn.Module):
        return default
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    return default if first is None else first.device


def place_network(network, device=None, default_device="cpu"):
    """(net, device) ready to sample: a path or URL is loaded onto `device` (default
    `default_device`); a module is used where it is, or a copy is moved (and put in eval
    mode) when it must run elsewhere or is training. Appendix A6.3."""
    if isinstance(network, (str, os.PathLike)):
        device = torch.device(default_device if device is None else device)
        net = check_denoiser(load_network(network), str(network))
        if isinstance(net, torch.nn.Module):
            net = net.to(device).eval().requires_grad_(False)
        return net, device
    check_denoiser(network)
    here = module_device(network)
    device = torch.device(device) if device is not None else (
        here or torch.device(default_device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    moved = here is not None and here != device
    if isinstance(network, torch.nn.Module) and (moved or network.training):
        network = copy.deepcopy(network).to(device).eval().requires_grad_(False)
    return network, device


# %% [markdown]
# `--fp16=1` or `--bf16=1` evaluate the network under `torch.autocast` with float16 or
# bfloat16 (the convolutions and matrix products; normalisations and the preconditioner's
# output stay float32), the flags that `edm-lit train` uses for the same choice. The
# sampler itself stays float64. A wrapper passes every attribute of the denoiser through.

# %% tags=["export"]
_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _Autocast:
    """A denoiser called under torch.autocast(dtype)."""

    def __init__(self, net, dtype):
        self.net, self.dtype = net, dtype

    def __getattr__(self, name):  # img_resolution, sigma_min, round_sigma, ...
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x, sigma, class_labels, **kwargs)


def with_precision(net, fp16=False, bf16=False):
    """`net`, or `net` under float16 / bfloat16 autocast (--fp16 / --bf16).
    Appendix A6.3."""
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 cannot both be set")
    if not (fp16 or bf16):
        return net
    return _Autocast(net, _PRECISIONS["fp16" if fp16 else "bf16"])


# %% [markdown]
# **Check** — a module in training mode with gradients on is sampled as a copy: the
# caller's module keeps its mode, its gradients and its device, and its images are those of
# the same network in eval mode; an inner network alone is refused. Then what half precision costs, measured on Chapter 7's
# committed quick model (a small *trained* network, where rounding means something): the
# same seeds in float32 and in bfloat16, compared in 8-bit levels. float16 is emulated on a
# CPU and too slow to run here; `tests/test_generate_speed.py` measures it on a few seeds.

# %%
from edm_lit.generate import sample_seeds
from edm_lit.precond import EDMPrecond

net = EDMPrecond(**PRECOND["kwargs"])
net.load_state_dict(PRECOND["state_dict"])
net = net.eval().requires_grad_(False)  # the small network of the parity tests
caller = copy.deepcopy(net).train().requires_grad_(True)  # training mode, gradients on
placed, device = place_network(caller)
assert placed is not caller and not placed.training
assert caller.training and all(p.requires_grad for p in caller.parameters())
assert module_device(caller) == device  # untouched, and where it was
assert torch.equal(sample_seeds(placed, [0, 1], num_steps=2),
                   sample_seeds(net, [0, 1], num_steps=2))
try:
    check_denoiser(net.model, "inner.json")  # the U-Net without its preconditioner
    raise AssertionError("must refuse")
except ValueError as e:
    print("ValueError:", e)

quick_net = load_network(Path("results") / "quick_digits.json")
exact = sample_seeds(quick_net, range(100)).int()
t0 = time.perf_counter()
half = sample_seeds(with_precision(quick_net, bf16=True), range(100)).int()
gap = (half - exact).abs()
t_bf16 = time.perf_counter() - t0
bf16_mean, bf16_max = gap.float().mean().item(), int(gap.max())
glue("bf16_mean", bf16_mean, display=False)
glue("bf16_max", bf16_max, display=False)
print(f"bfloat16 vs float32, 100 images: mean |difference| {bf16_mean:.3f} levels, max "
      f"{bf16_max} levels, {100 * (gap > 0).float().mean():.1f} % of values differ "
      f"({t_bf16:.1f} s)")
assert 0.05 < bf16_mean < 0.3 and 1 <= bf16_max <= 6  # measured: about 0.14 and 3

# %%
import matplotlib.pyplot as plt

counts = torch.bincount(gap.flatten(), minlength=bf16_max + 1).double()
fig, ax = plt.subplots(figsize=(5, 2.4))
ax.bar(range(len(counts)), (counts / counts.sum()).tolist(), color="C0")
ax.set_yscale("log")
ax.set_xlabel("|bfloat16 − float32| in 8-bit levels")
ax.set_ylabel("fraction of pixel values")
ax.set_title("the same 100 seeds, quick model", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# With the network in bfloat16 (8 bits of mantissa) the quick model's images move by
# {glue:text}`bf16_mean:.2f` levels on average and by at most {glue:text}`bf16_max` levels
# out of 255. A full-size network is deeper; its bound has to be measured on a GPU
# (`benchmarks/bench_generate.py --gap` compares its images with the float32 path).
# float16 keeps 11 bits of mantissa but has a small range: a network whose activations
# overflow it gives NaN, which `sample_seeds` refuses rather than writing black images.
#
# ## A6.4 Files: names, checks before the work, writer threads, the `.npz`
#
# `generate` writes `{seed:06d}.png` (with `subdirs`, into a folder per thousand seeds:
# `000000/`, `001000/`, …, the official layout) and optionally one `.npz` of all images in
# seed order (`images` uint8 $[N, H, W, C]$ and `seeds`). Three rules for a long run.
# **Outputs are checked before the work**: an `--outdir` that is a file, an `--npz` that
# cannot be written, fail in one line before the network is even loaded. **Nothing
# half-written carries a final name**: each PNG goes through `write_png` (Appendix A3), and
# the `.npz` is streamed into a temporary file — never held in memory — and renamed at the
# end. **PNG encoding overlaps sampling**: a few writer threads (PIL and zlib release the
# GIL) encode while the next batch samples; at most `max_pending` images wait, the order of
# the writes does not matter (one file per seed), and a writer's error is raised in the
# caller's thread.

# %% tags=["export"]
import collections
import concurrent.futures
import secrets
import zipfile

import numpy as np

from edm_lit.files import check_writable, write_png  # Appendix A3


def image_path(outdir, seed, subdirs=False):
    """OUTDIR/{seed:06d}.png, or with `subdirs` OUTDIR/{thousand:06d}/{seed:06d}.png.
    Appendix A6.4."""
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


class PngWriter:
    """write_png on `threads` background threads (0: in the caller's thread); at most
    `max_pending` images wait; the first error is raised in the caller's thread; on
    leaving (also after an error) every image handed over is written. Appendix A6.4."""

    def __init__(self, threads=4, max_pending=1024):
        pool = concurrent.futures.ThreadPoolExecutor
        self.pool = pool(threads) if threads > 0 else None
        self.pending, self.max_pending = collections.deque(), max_pending

    def submit(self, image, path):
        if self.pool is None:
            return write_png(path, image)
        self.pending.append(self.pool.submit(write_png, path, image))
        while self.pending and (len(self.pending) > self.max_pending
                                or self.pending[0].done()):
            self.pending.popleft().result()  # raises a writer's error here

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):  # finish every image, also after an error
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        failed = [f.exception() for f in self.pending if f.exception() is not None]
        self.pending.clear()
        if failed and kind is None:
            raise failed[0]


# %% tags=["export"]
def npz_path(path):
    """The file np.savez writes for `path`: '.npz' appended unless the name ends with
    it. Appendix A6.4."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


def _npz_output(path, flag):
    """The .npz an output flag names, refused now if it is a folder or unwritable."""
    if not os.fspath(path) or os.path.isdir(path):
        what = "a folder" if os.fspath(path) else "empty"
        raise ValueError(f"{flag}={os.fspath(path)} is {what}; give the name of an "
                         f".npz file to write")
    return check_writable(npz_path(path), flag)


def _npy_header(f, dtype, shape):
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)


def _read_png(outdir, seed, subdirs):
    import PIL.Image

    image = np.asarray(PIL.Image.open(image_path(outdir, seed, subdirs)))
    return image[:, :, None] if image.ndim == 2 else image


def _write_npz_members(z, outdir, seeds, subdirs, shape):
    with z.open("images.npy", "w", force_zip64=True) as f:
        _npy_header(f, np.uint8, (len(seeds), *shape))
        for seed in seeds:
            image = _read_png(outdir, seed, subdirs)
            if image.shape != shape:
                where = image_path(outdir, seed, subdirs)
                raise ValueError(f"{where}: shape {image.shape} differs from {shape}")
            f.write(image.tobytes())
    with z.open("seeds.npy", "w", force_zip64=True) as f:
        _npy_header(f, np.int64, (len(seeds),))
        for start in range(0, len(seeds), 1 << 20):
            chunk = list(seeds[start:start + (1 << 20)])
            f.write(np.asarray(chunk, dtype=np.int64).tobytes())


def write_images_npz(path, outdir, seeds, subdirs=False):
    """The PNGs of `seeds`, in order, streamed into an .npz laid out as np.savez does
    ('images' uint8 [N, H, W, C], 'seeds' int64 [N]): never all in memory; a temporary
    name, then renamed. Appendix A6.4."""
    shape = _read_png(outdir, seeds[0], subdirs).shape
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            _write_npz_members(z, outdir, seeds, subdirs, shape)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# %% [markdown]
# **Check** — the bytes on disk do not depend on the number of writer threads; at most
# `max_pending` images wait; a writer's error (a PNG whose folder cannot exist) reaches the
# caller after the other images are written; the streamed `.npz` reads back with
# `numpy.load` as if `np.savez` had written it, and a missing PNG leaves no `.npz` and no
# temporary file behind.

# %% tags=["hide-input"]
pngs = sample_seeds(quick_net, range(64), num_steps=4)
written = {}
for threads in (0, 4):
    folder = WORK / f"writers{threads}"
    with PngWriter(threads) as writer:
        for seed, image in enumerate(pngs):
            writer.submit(image, image_path(folder, seed, subdirs=True))
    paths = [Path(image_path(folder, s, subdirs=True)) for s in range(64)]
    written[threads] = [path.read_bytes() for path in paths]
assert written[0] == written[4]
with PngWriter(threads=2, max_pending=3) as writer:  # at most 3 images wait
    for seed, image in enumerate(pngs):
        writer.submit(image, image_path(WORK / "bounded", seed))
        assert len(writer.pending) <= 3
(WORK / "blocker").write_text("")
try:
    with PngWriter(threads=2) as writer:
        writer.submit(pngs[0], WORK / "ok.png")
        writer.submit(pngs[1], WORK / "blocker" / "x.png")  # its folder cannot exist
    raise AssertionError("the writer's error must reach the caller")
except OSError as e:
    print(f"{type(e).__name__} from a writer thread: {e}".replace(str(WORK), "WORK"))
assert (WORK / "ok.png").is_file()
write_images_npz(WORK / "all.npz", WORK / "writers4", range(64), subdirs=True)
with np.load(WORK / "all.npz") as z:
    assert z["images"].shape == (64, 8, 8, 1) and z["seeds"].tolist() == list(range(64))
    assert np.array_equal(z["images"], pngs.numpy())
Path(image_path(WORK / "writers4", 63, True)).unlink()
try:
    write_images_npz(WORK / "again.npz", WORK / "writers4", range(64), subdirs=True)
    raise AssertionError("a missing PNG must fail")
except FileNotFoundError:
    assert not list(WORK.glob("*again*"))  # neither the .npz nor its temporary file

# %% [markdown]
# ## A6.5 `generate`: the driver
#
# `generate` checks its outputs and arguments, learns its place among the processes
# (`init_distributed`, Appendix A5), places the network, and then, batch after batch of its
# share, samples (`sample_seeds`, Chapter 8.1) and hands the images to the writers. Rank 0
# shows the progress bar and writes the `.npz` once every process has finished.

# %% tags=["export"]
from edm_lit.distributed import init_distributed  # Appendix A5


def _check_arguments(seeds, sampler_kwargs, class_idx, label_dim):
    if not len(seeds):
        raise ValueError("seeds must name at least one seed")
    lo, hi = sampler_kwargs.get("sigma_min"), sampler_kwargs.get("sigma_max")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"--sigma_min ({lo}) must be below --sigma_max ({hi})")
    if class_idx is not None and label_dim is not None:
        if not label_dim:
            raise ValueError(f"class_idx={class_idx} (--class) was given but the "
                             f"network is unconditional")
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(f"class_idx (--class) must be in [0, {label_dim}), got "
                             f"{class_idx}")


def generate(network, outdir, seeds="0-63", subdirs=False, class_idx=None,
             max_batch_size=64, npz=None, device=None, progress=True, fp16=False,
             bf16=False, writers=4, **sampler_kwargs):
    """One PNG per seed into `outdir` (and optionally an .npz); returns the number
    written. `network`: a denoiser (never changed) or a path / URL. `sampler_kwargs`:
    those of `edm_sampler`, or of `ablation_sampler` when an ablation option is given.
    Appendix A6.5."""
    from tqdm import tqdm  # a text bar on stderr, as the official scripts

    seeds = parse_seeds(seeds)
    _check_arguments(seeds, sampler_kwargs, None, None)
    check_writable(outdir, "--outdir", folder=True)
    npz = None if npz is None else _npz_output(npz, "--npz")
    rank, world_size, auto_device = init_distributed()
    net, device = place_network(network, device, auto_device)
    _check_arguments(seeds, sampler_kwargs, class_idx, int(net.label_dim or 0))
    net = with_precision(net, fp16, bf16)
    batches = seed_batches(seeds, max_batch_size, world_size, rank)
    written = 0
    with PngWriter(writers) as writer:
        for batch in tqdm(batches, unit="batch", disable=not progress or rank != 0):
            if not batch:
                continue
            images = sample_seeds(net, batch, class_idx, device, **sampler_kwargs)
            for seed, image in zip(batch, images):
                writer.submit(image, image_path(outdir, seed, subdirs))
            written += len(batch)
    if world_size > 1:
        torch.distributed.barrier()
    if npz is not None and rank == 0:
        write_images_npz(npz, outdir, seeds, subdirs)
    return written


# %% [markdown]
# **Check** — on the small network saved to disk, `generate` writes the official file
# names, one folder per thousand seeds, and an `.npz` equal to `sample_seeds`; the images
# do not depend on `--batch` (this appendix runs on the CPU: bit for bit, Chapter 8.1).
# What a user can get wrong fails before anything is written: a missing network file, an
# `--outdir` that is a file, a network whose output is NaN (a damaged checkpoint).

# %%
from edm_lit.checkpoints import CheckpointError, save_network
from edm_lit.generate import generate

save_network(net, WORK / "tiny")
kwargs = dict(progress=False, num_steps=4)
n = generate(str(WORK / "tiny.json"), WORK / "a", seeds="998-1001", subdirs=True,
             max_batch_size=3, npz=WORK / "a.npz", **kwargs)
generate(net, WORK / "b", seeds=[998, 999, 1000, 1001], max_batch_size=1, **kwargs)
files = sorted(str(p.relative_to(WORK / "a")) for p in (WORK / "a").rglob("*.png"))
print(files)
assert n == 4 and files == ["000000/000998.png", "000000/000999.png",
                            "001000/001000.png", "001000/001001.png"]
with np.load(WORK / "a.npz") as z:
    stored = z["images"].astype(int)
direct = sample_seeds(net, [998, 999, 1000, 1001], num_steps=4).numpy()
one_by_one = np.stack([_read_png(WORK / "b", s, False) for s in range(998, 1002)])
assert np.array_equal(stored, direct) and np.array_equal(stored, one_by_one)  # on a CPU
nan_net = copy.deepcopy(net)
nan_net.model.dec["16x16_aux_conv"].weight.data.fill_(math.nan)  # a damaged checkpoint
(WORK / "file").write_text("")
missing = str(WORK / "missing.pkl")
for bad in [lambda: generate(missing, WORK / "c", seeds="0", **kwargs),
            lambda: generate(net, WORK / "file", seeds="0", **kwargs),
            lambda: generate(nan_net, WORK / "d", seeds="0-3", **kwargs)]:
    try:
        bad()
        raise AssertionError("must fail")
    except (CheckpointError, ValueError) as e:
        print(f"{type(e).__name__}: {str(e).replace(str(WORK), 'WORK')}")
assert not list((WORK / "d").rglob("*.png"))  # nothing written from the NaN network

# %% [markdown]
# ## What this appendix exported
#
# To `edm_lit.generate`: `Seeds` and `parse_seeds` (A6.1), `seed_batches` (A6.2),
# `check_denoiser`, `module_device`, `place_network` and `with_precision` (A6.3),
# `image_path`, `PngWriter`, `npz_path` and `write_images_npz` (A6.4), and `generate`
# (A6.5); the rest is private (names starting with `_`). The FID half of the engineering
# — the Inception-v3 port, its weights file, reference files and image sets — is
# Appendix A6b.
