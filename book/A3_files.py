# ---
# jupyter:
#   edm_lit:
#     export: files
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
# # A3. Files that survive `kill -9`
#
# A training run of days will be interrupted: a preempted node, an out-of-memory kill, a
# power cut. A generation of 50,000 images may fill the disk half way. Whatever stops a
# process, what it wrote must be either complete or absent, and an output that cannot be
# written must be refused before hours of work, not after. This appendix holds the few
# primitives that make that true; Chapters 6–8 and Appendix A2 write every file through them.
#
# | file | written by | how |
# |---|---|---|
# | snapshots, training states, configs, reference statistics | `write_atomic` | temporary name, `fsync`, rename, `fsync` of the folder |
# | data sets (Chapter 6) | their own temporary file, claimed without replacing | see §6.3 |
# | generated PNGs (Chapter 8), sample grids (Chapter 7) | `write_png` | temporary name, rename (no `fsync`: cheap to redo) |
# | `stats.jsonl` (Chapter 7) | appended a line at a time, each `fsync`ed | a kill loses at most the line being written |
# | `log.txt` (Chapter 7) | appended, for people | may end in half a line |

# %%
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from myst_nb import glue

WORK = Path(tempfile.mkdtemp(prefix="edm_lit_A3_"))

# %% [markdown]
# ## A3.1 All or nothing: a temporary name, then a rename
#
# POSIX promises that `rename` within one file system replaces the target in one step: a
# reader sees the old file or the new one, never a mixture. So a file is written under a
# temporary name in the same folder, flushed to the disk (`fsync`), and renamed over its
# final name; the rename itself becomes durable when the folder is `fsync`ed. The temporary
# name starts with a dot and ends in eight hex digits and `.tmp`, so that a later run can
# recognise the leftovers of a killed one (§A3.2).

# %% tags=["export"]
import os
import re
import secrets
from pathlib import Path

# write_atomic's temporary names: .NAME.HEX.tmp
TEMP_FILE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def fsync_dir(directory) -> None:
    """Make the renames inside `directory` durable (a no-op where folders cannot be
    opened). Appendix A3."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` all or nothing: a temporary name (mode 0o666 minus the
    umask), then a rename; with `durable`, `fsync` of the file before and of the folder
    after. Appendix A3."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


# %% [markdown]
# **Check.** A write that fails half way — here the rename is made to fail — leaves the old
# file as it was and no temporary file behind.

# %%
from unittest import mock

from edm_lit.files import write_atomic

target = WORK / "state.json"
write_atomic(target, b"old, complete")
with mock.patch("os.replace", side_effect=KeyboardInterrupt):
    try:
        write_atomic(target, b"new, never seen")
    except KeyboardInterrupt:
        pass
assert target.read_bytes() == b"old, complete"
assert sorted(p.name for p in WORK.iterdir()) == ["state.json"]

# %% [markdown]
# An exception is the gentle case: the `except` clause cleans up. `kill -9` runs no clean-up
# at all. Below, a separate process writes a 256 MiB file through `write_atomic` and is
# killed in the middle: the final name is still absent (or still the old file), and the
# temporary file stays behind for the next run to find.

# %%
code = (f"from edm_lit.files import write_atomic\n"
        f"write_atomic({str(WORK / 'big.bin')!r}, bytes(256 << 20))\n")
writer = subprocess.Popen([sys.executable, "-c", code])
deadline = time.time() + 60
def started():
    return any(p.name.startswith(".big.bin.") for p in WORK.iterdir())


while not started() and time.time() < deadline:
    time.sleep(0.005)
writer.send_signal(signal.SIGKILL)
writer.wait()
left = sorted(p.name for p in WORK.iterdir() if p.name != "state.json")
print("after kill -9:", left)
assert not (WORK / "big.bin").exists()
assert len(left) == 1 and left[0].startswith(".big.bin.")

# %% [markdown]
# ## A3.2 What a killed writer leaves
#
# A killed writer leaves one temporary file per file it was writing. Whoever writes into
# that folder next removes them first — `TrainingRun` does it when a run starts or resumes.

# %% tags=["export"]
def remove_stale_temp_files(folder) -> list:
    """Delete the temporary files of `write_atomic` that a killed process left in
    `folder`; returns their paths. Appendix A3."""
    stale = [p for p in Path(folder).iterdir()
             if p.is_file() and TEMP_FILE.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# %%
from edm_lit.files import remove_stale_temp_files

removed = remove_stale_temp_files(WORK)
assert [p.name for p in removed] == left
assert sorted(p.name for p in WORK.iterdir()) == ["state.json"]

# %% [markdown]
# ## A3.3 Refuse an output before the work
#
# An output that cannot be written should be refused before the hours of work that would
# fill it. Permission bits do not tell: as root every `chmod` is ignored, `/proc` refuses
# new files whatever its bits say, and a path under a file cannot exist at all. So
# `check_writable` creates (and removes) a temporary file in the folder where the output
# would go — the nearest existing folder above it — and reports in one line, naming the
# flag, what is wrong.

# %% tags=["export"]
import tempfile


def check_writable(path, flag: str, folder: bool = False) -> str:
    """Refuse now, in one line naming `flag`, an output file (or, with `folder`, an
    output folder) that could not be written; returns its absolute path. Appendix A3."""
    if not os.fspath(path):
        kind = "folder" if folder else "file"
        raise ValueError(f"{flag} is empty: name the {kind} to write")
    path = os.path.abspath(os.fspath(path))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a folder; give the name of a file to write")
    parent = path if folder else os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}={path} cannot be created: {parent} is a file, "
                         "not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".edm_lit-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or e
        message = f"{flag}={path} cannot be written: {parent}: {reason}"
        raise ValueError(message) from None
    return path


# %%
from edm_lit.files import check_writable

(WORK / "a-file").write_text("")
for path, flag in [("/proc/out.npz", "--npz"), (WORK / "a-file" / "out.npz", "--npz"),
                   (WORK, "--npz"), ("", "--dest")]:
    try:
        check_writable(path, flag)
    except ValueError as e:
        print(e)
    else:
        raise AssertionError(f"{path} must be refused")
assert check_writable(WORK / "new" / "deeper" / "out.npz", "--npz").endswith("out.npz")
assert not (WORK / "new").exists()  # the check creates nothing that stays

# %% [markdown]
# ## A3.4 One PNG writer
#
# Every PNG of the package — data sets, sample grids, generated images — is encoded by
# Pillow through `png_bytes` and written by `write_png`. A data set is written with
# `compress_level=0`, as the official `dataset_tool.py` does, so that our ZIPs are byte for
# byte the official ones; generated images use Pillow's default level, as the official
# `generate.py` does.

# %% tags=["export"]
import io

import numpy as np


def png_bytes(image, compress_level=None) -> bytes:
    """uint8 [H, W], [H, W, 1] (grey) or [H, W, 3] (RGB) -> a PNG file's bytes, by
    Pillow. Appendix A3."""
    import PIL.Image

    array = np.asarray(image)
    grey_or_rgb = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    if array.dtype != np.uint8 or not grey_or_rgb:
        raise ValueError("image must be uint8 [H, W], [H, W, 1] or [H, W, 3], "
                         f"got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    options = {} if compress_level is None else {"compress_level": int(compress_level)}
    pixels = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    PIL.Image.fromarray(pixels).save(buffer, format="png", **options)
    return buffer.getvalue()


def write_png(path, image, durable: bool = False) -> Path:
    """`image` as a PNG at `path`, all or nothing (`write_atomic`; no fsync unless
    `durable`). Appendix A3."""
    return write_atomic(path, png_bytes(image), durable=durable)


# %% [markdown]
# Samples are shown and saved as one grid: `image_grid` lays out images in [-1, 1] row by
# row, with `gap` pixels of `fill` between them so that each image reads as one (the
# official snapshots' grids have no gaps; `gap=0` gives that layout).

# %% tags=["export"]
import torch


def image_grid(images, columns: int, gap: int = 0, fill: int = 255) -> np.ndarray:
    """Images in [-1, 1], [N, C, H, W] -> one uint8 [H', W', C] grid of `columns` columns,
    `gap` pixels of value `fill` between neighbours; empty cells are `fill`. Appendix A3."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    pixels = (images.detach().float().cpu() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    grid = torch.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), fill,
                      dtype=torch.uint8)
    for i in range(n):
        top, left = (i // columns) * (h + gap), (i % columns) * (w + gap)
        grid[top:top + h, left:left + w] = pixels[i].permute(1, 2, 0)
    return grid.numpy()


# %% [markdown]
# **Check.** Grey and colour images come back from Pillow as they went in, and anything else
# is refused.

# %%
import PIL.Image

from edm_lit.files import png_bytes, write_png

rng = np.random.default_rng(0)
for shape in [(8, 8), (8, 8, 1), (5, 7, 3)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    back = np.asarray(PIL.Image.open(write_png(WORK / "x.png", image)))
    assert np.array_equal(back, image.reshape(back.shape))
from edm_lit.files import image_grid

tiles = torch.linspace(-1, 1, 5 * 4 * 4).reshape(5, 1, 4, 4)
grid = image_grid(tiles, columns=3, gap=1)
assert grid.shape == (2 * 4 + 1, 3 * 4 + 2, 1) and (grid[4, :, 0] == 255).all()
assert np.array_equal(grid[5:9, 5:9, 0], image_grid(tiles[4:5], 1)[:, :, 0])
for bad in [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8)]:
    try:
        png_bytes(bad)
    except ValueError as e:
        print(e)
    else:
        raise AssertionError("must be refused")

# %% [markdown]
# **Look — what durability costs.** `fsync` returns only when the disk holds the data. For a
# snapshot every few hours that wait is nothing; for 50,000 small PNGs it adds up, and a lost
# PNG is redone by running the same seeds again. That is why `write_png` renames without
# `fsync` unless asked. The time per file on the machine that ran this notebook:

# %%
image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
times = {}
for durable in (False, True):
    start = time.perf_counter()
    for i in range(100):
        write_png(WORK / "grid" / f"{i:03d}.png", image, durable=durable)
    times[durable] = (time.perf_counter() - start) / 100 * 1e3
fig, ax = plt.subplots(figsize=(5, 1.8))
ax.barh(["rename only", "fsync + rename"], [times[False], times[True]],
        color=["C0", "C1"])
ax.set_xlabel("milliseconds per 32×32 PNG (100 files)")
fig.tight_layout()
plt.show()
extra_50k = 50_000 * max(times[True] - times[False], 0) / 1e3
glue("png_fast_ms", f"{times[False]:.2f}", display=False)
glue("png_durable_ms", f"{times[True]:.2f}", display=False)
glue("png_extra_50k", f"{extra_50k:.0f}", display=False)
print(f"rename only {times[False]:.2f} ms, with fsync {times[True]:.2f} ms per file: "
      f"{extra_50k:.0f} s more for 50,000 PNGs")

# %% [markdown]
# Here a PNG takes {glue:text}`png_fast_ms` ms without `fsync` and {glue:text}`png_durable_ms`
# ms with it: {glue:text}`png_extra_50k` s more for the 50,000 images of an FID. On a network
# file system the wait is longer; on a RAM disk there is none.
#
# ## What this appendix exported
#
# `edm_lit.files`: `write_atomic`, `fsync_dir`, `TEMP_FILE` and `remove_stale_temp_files`,
# `check_writable`, `png_bytes`, `write_png` and `image_grid`.
