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
    """Images in [-1, 1], [N, C, H, W] -> one uint8 [H', W', C] grid of `columns`
    columns, `gap` pixels of value `fill` between neighbours; empty cells are `fill`.
    Appendix A3."""
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

# %% [markdown]
# ## A3.5 Claiming a run directory
#
# Chapter 7b's command writes a run into a directory of its own. Two runs started together
# with the same `--outdir` must not both take `00000-…`, and `--nosubdir` must not write into
# a directory that holds another run (its later training states would stay, and a `--resume`
# of it would continue the wrong run). So the command *claims* the run directory before
# building anything: an exclusive `mkdir` of the next free number under a lock on `--outdir`
# (on a collision, the next number), or, with `--nosubdir`, a directory that is empty or is
# the one `--resume` continues; then `log.txt`, created exclusively. A place that cannot be
# written (a file, a read-only disk, `/proc`) fails here, in one line, before any work; a run
# that fails later while being built leaves nothing behind (`release_run_dir`). These
# functions are part of `edm_lit.training`.

# %% tags=["export:training"]
import contextlib
import os
import re
from pathlib import Path


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """An exclusive flock on `directory` while claiming in it (POSIX; elsewhere the
    exclusive mkdir alone)."""
    try:
        import fcntl
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pick_run_dir(outdir, desc: str, nosubdir: bool) -> str:
    """OUTDIR (--nosubdir) or OUTDIR/NNNNN-desc with the next free number."""
    if nosubdir:
        return str(outdir)
    found = Path(outdir).iterdir() if Path(outdir).is_dir() else []
    numbers = [int(m.group()) for p in found
               if p.is_dir() and (m := re.match(r"\d+", p.name))]
    return str(Path(outdir) / f"{max(numbers, default=-1) + 1:05d}-{desc}")


def _claim_number(outdir: Path, desc: str, created: list) -> Path:
    """OUTDIR/NNNNN-desc with the number free at the moment of an exclusive mkdir."""
    with _dir_lock(outdir):
        for _ in range(1000):
            run_dir = Path(_pick_run_dir(outdir, desc, False))
            with contextlib.suppress(FileExistsError):
                run_dir.mkdir()
                created.append(run_dir)
                return run_dir
    raise ValueError(f"--outdir: could not claim a new run directory in {outdir}")


def _open_log(run_dir: Path, in_place: bool, created: list):
    """log.txt, created exclusively (appended to when a run continues in place)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if in_place else os.O_EXCL)
    try:
        log = os.fdopen(os.open(run_dir / "log.txt", flags, 0o666), "a")
    except FileExistsError:
        raise ValueError(f"--outdir: another run has just claimed {run_dir}") from None
    if not in_place:
        created.append(run_dir / "log.txt")
    return log


# %% tags=["export:training"]
def claim_run_dir(planned, nosubdir: bool, resume=None) -> tuple:
    """Create and claim the run directory build_options planned: (run_dir, log.txt,
    created). Appendix A3.

    Without --nosubdir, OUTDIR/NNNNN-desc with the number free at the moment of the
    exclusive mkdir; with it, OUTDIR itself, which must be empty unless `resume`
    continues the run inside it. One-line ValueError if it cannot be written or is
    taken; release_run_dir(created) undoes the claim.
    """
    planned, created = Path(planned), []
    outdir = planned if nosubdir else planned.parent
    resumed = None if resume is None else Path(resume)
    if resumed is not None and not resumed.is_dir():
        resumed = resumed.parent
    continued = resumed is not None and resumed.resolve() == outdir.resolve()
    in_place = nosubdir and continued
    try:
        if outdir.exists() and not outdir.is_dir():
            raise ValueError(f"--outdir: {outdir} is a file, not a directory")
        created += [d for d in reversed([outdir, *outdir.parents]) if not d.exists()]
        outdir.mkdir(parents=True, exist_ok=True)
        if not nosubdir:
            run_dir = _claim_number(outdir, planned.name.split("-", 1)[1], created)
        elif in_place or not any(outdir.iterdir()):
            run_dir = outdir
        else:
            raise ValueError(f"--nosubdir: {outdir} is not empty (it may hold another "
                             "run): choose an empty --outdir, or continue the run in "
                             f"it with --resume={outdir}")
        return run_dir, _open_log(run_dir, in_place, created), created
    except (ValueError, OSError) as e:
        release_run_dir(created)
        if isinstance(e, ValueError):
            raise
        reason = e.strerror or e
        raise ValueError(f"--outdir: cannot write to {outdir}: {reason}") from None


def release_run_dir(created) -> None:
    """Undo claim_run_dir for a run that failed before its work: remove what it created,
    where still empty. Appendix A3."""
    for path in reversed([Path(p) for p in created]):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()


# %% [markdown]
# **Check.** Eight claims made at once take eight different numbers; `--nosubdir` refuses a
# directory that holds something, unless the run continues in it; a claim that cannot be
# written is one line and leaves nothing; `release_run_dir` removes what a claim created.

# %% tags=["hide-input"]
from concurrent.futures import ThreadPoolExecutor

from edm_lit.training import claim_run_dir, release_run_dir

runs = WORK / "runs"
with ThreadPoolExecutor(8) as pool:
    claims = list(pool.map(lambda _: claim_run_dir(runs / "00000-d", False), range(8)))
for _, log, _ in claims:
    log.close()
assert sorted(d.name for d, _, _ in claims) == [f"{i:05d}-d" for i in range(8)]
taken = claims[0][0]
for resume in [None, taken]:
    try:
        run_dir, log, _ = claim_run_dir(taken, nosubdir=True, resume=resume)
        log.close()
        print(f"--nosubdir into a run's directory, --resume={resume}: claimed")
    except ValueError as e:
        print(f"--nosubdir into a run's directory, --resume={resume}: {e}")
        assert resume is None and "not empty" in str(e)
(WORK / "x.png").write_bytes(b"")
for bad in [Path(f"/proc/edm-lit-{os.getpid()}/00000-x"), WORK / "x.png" / "00000-x"]:
    try:
        claim_run_dir(bad, nosubdir=False)
        raise AssertionError(f"{bad} must be refused")
    except ValueError as e:
        print(e)
assert not (WORK / "x.png").is_dir()
fresh = WORK / "fresh" / "deeper"
_, log, created = claim_run_dir(fresh / "00000-desc", False)
log.close()
release_run_dir(created)
assert not (WORK / "fresh").exists()

# %% [markdown]
# ## A3.6 An append-only statistics file
#
# The training loop writes one line of statistics per tick to `stats.jsonl`. Rewriting the
# whole file at every tick (atomically, as in §A3.1) would cost more at the end of a long run
# than at its start; so the file is *appended* to, a line at a time, and each line is
# `fsync`ed. A kill leaves complete lines and at most a partial last one. A run resumed in its
# own directory keeps the complete lines up to the progress of its training state, writes them
# once more atomically together with its first new line, and appends from then on: the file
# reads as if the run had never stopped. Every line is strict JSON: a non-finite value (a
# diverged loss) is written as `null`.

# %% tags=["export"]
def append_durable(path, data: bytes) -> None:
    """Append `data` to `path` and return once the disk holds it (`fsync`): a kill loses
    at most the piece being written. Appendix A3."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# %% tags=["export:training"]
import json
import math
from pathlib import Path


def _finite_or_null(value):
    """Non-finite floats -> None: a line is strict JSON (no NaN, no Infinity)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _stats_line(row: dict) -> str:
    """One statistics row as one line of strict JSON."""
    return json.dumps(_finite_or_null(row), allow_nan=False) + "\n"


def _kept_stats_lines(path, cur_nimg: int) -> list:
    """The lines of stats.jsonl that a run resumed at cur_nimg images keeps: the
    complete lines up to its progress (a torn line, or a later one, ends them)."""
    kept = []
    if not Path(path).exists():
        return kept
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["Progress/kimg"]["mean"] * 1000 > cur_nimg + 0.5:
            break
        kept.append(line)
    return kept


# %% [markdown]
# **Check.** Appending keeps the file (its inode) and adds one line; a non-finite loss becomes
# `null`, which a strict parser accepts; a resume at 2 kimg keeps the lines up to 2 kimg and
# drops a later line and a torn one.

# %% tags=["hide-input"]
from edm_lit.files import append_durable
from edm_lit.training import _kept_stats_lines, _stats_line


def row(kimg, loss):
    return {"Loss/loss": {"mean": loss}, "Progress/kimg": {"mean": kimg}}


stats = WORK / "stats.jsonl"
append_durable(stats, _stats_line(row(1.0, 0.5)).encode())
inode = stats.stat().st_ino
for kimg, loss in [(2.0, float("nan")), (3.0, 0.4)]:
    append_durable(stats, _stats_line(row(kimg, loss)).encode())
append_durable(stats, b'{"Loss/loss": {"mea')  # a kill inside the write
assert stats.stat().st_ino == inode


def strict(name):
    raise ValueError(f"not strict JSON: {name}")


lines = stats.read_text().splitlines()
assert json.loads(lines[1], parse_constant=strict)["Loss/loss"]["mean"] is None
kept = _kept_stats_lines(stats, cur_nimg=2000)
print(f"{len(lines)} lines (the last torn); a resume at 2 kimg keeps {len(kept)}")
assert kept == lines[:2] and _kept_stats_lines(stats, 10_000) == lines[:3]

# %% [markdown]
# ## A3.7 The training state
#
# The state is everything the future of a run depends on: the trained network, the EMA,
# Adam's moments and step counts, the progress (images, ticks), and the random number
# generators of every rank (torch CPU and CUDA, numpy, Python). Nothing else is needed: the
# data order is a function of the progress (§7.2), the loss scale a constant of the
# configuration. It is stored as two files:
#
# - `training-state-NNNNNN.safetensors`: every tensor, in a flat dictionary — `net.*`, `ema.*`,
#   Adam's `optimizer.I.NAME`, each rank's generator states `rng.R.torch` / `rng.R.cuda`. No
#   pickle: loading it runs no code.
# - `training-state-NNNNNN.json`: everything that is not a tensor, the architecture
#   (`network_config` of Appendix A2), the options, and the SHA-256 of the tensors' file.
#
# Both are written with `write_atomic`, the JSON second: a state is complete when its JSON
# exists and the hash matches, so a run killed while writing a state leaves the previous one
# usable. `NNNNNN` is the progress in kimg, as in the official names.

# %% tags=["export:training"]
import random

import numpy as np
import torch

STATE_FORMAT = "edm_lit-training-state"
STATE_VERSION = 1


def _json_safe(value):
    """`value` with numpy scalars as Python numbers, non-finite floats spelled out."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return value


def capture_rng(device) -> tuple:
    """(tensors, json) of every generator this process draws from: torch (and CUDA),
    numpy, Python. Appendix A3."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": _json_safe(random.getstate())}
    return tensors, info


def restore_rng(tensors: dict, info: dict, device) -> None:
    """Inverse of `capture_rng`. Appendix A3."""
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def state_path(run_dir, kimg: int) -> Path:
    """run_dir/training-state-{kimg:06d}.json: the header; its tensors sit beside it in
    .safetensors. Appendix A3."""
    return Path(run_dir) / f"training-state-{kimg:06d}.json"


# %% tags=["export:training"]
import hashlib


def _state_tensors(net, ema, optimizer, rng: list) -> tuple:
    """(every tensor of the state by name, Adam's non-tensor entries by name)."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    scalars = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    for rank, (rng_tensors, _) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rng_tensors.items()})
    return tensors, scalars


def save_training_state(path, *, net, ema, optimizer, progress: dict, options: dict,
                        rng: list) -> Path:
    """Write the training state atomically: PATH.safetensors (tensors), then PATH.json
    (header, hash). Appendix A3.

    `rng` is one (tensors, json) pair per rank (`capture_rng`); `progress` holds
    cur_nimg and cur_tick.
    """
    from safetensors.torch import save as safetensors_bytes

    from edm_lit.checkpoints import network_config

    header_path = Path(path).with_suffix(".json")
    tensors_path = header_path.with_suffix(".safetensors")
    tensors, scalars = _state_tensors(net, ema, optimizer, rng)
    data = safetensors_bytes({k: v.detach().to("cpu").contiguous()
                              for k, v in tensors.items()})
    write_atomic(tensors_path, data)
    header = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **progress,
              "world_size": len(rng), "network": _json_safe(network_config(net)),
              "optimizer_param_groups": _json_safe(
                  optimizer.state_dict()["param_groups"]),
              "optimizer_scalars": scalars, "rng": [info for _, info in rng],
              "options": _json_safe(options), "tensors": tensors_path.name,
              "tensors_sha256": hashlib.sha256(data).hexdigest()}
    return write_atomic(header_path, (json.dumps(header, indent=1) + "\n").encode())


# %% [markdown]
# Reading a state checks everything a file made by someone else could get wrong, before
# any tensor is used: the header's entries and their JSON types, a tensors file that is a bare
# name beside the header, and the hash of its bytes.

# %% tags=["export:training"]
# The header's entries and their JSON types: nothing else is a state this code wrote.
_STATE_HEADER = {"cur_nimg": int, "cur_tick": int, "world_size": int, "network": dict,
                 "optimizer_param_groups": list, "optimizer_scalars": dict, "rng": list,
                 "options": dict, "tensors": str, "tensors_sha256": str}


def _check_header(header: dict, header_path) -> None:
    for key, kind in _STATE_HEADER.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{header_path} is not a valid training state: {key!r} "
                             f"must be a JSON {kind.__name__}, got {str(value)[:40]!r}")
    name, progress = header["tensors"], min(header["cur_nimg"], header["cur_tick"])
    if progress < 0 or len(header["rng"]) != header["world_size"] \
            or Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"{header_path} is not a valid training state (negative "
                         "progress, rng entries not matching world_size, or tensors "
                         "not a bare .safetensors name)")


def read_training_state(path) -> tuple:
    """(header dict, tensors dict) of a complete training state; ValueError if missing,
    truncated or altered. Appendix A3."""
    from safetensors.torch import load as safetensors_load

    header_path = Path(path).with_suffix(".json")
    try:
        header = json.loads(header_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no training state at {header_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{header_path} is not a complete training state: "
                         f"{e}") from None
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise ValueError(f"{header_path} is not an edm_lit training state")
    _check_header(header, header_path)
    tensors_path = header_path.parent / header["tensors"]
    try:
        data = tensors_path.read_bytes()
    except OSError as e:
        raise ValueError(f"{header_path} names {tensors_path}, which cannot be read "
                         f"({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != header["tensors_sha256"]:
        raise ValueError(f"{tensors_path} does not match the SHA-256 in {header_path} "
                         "(truncated or replaced)")
    try:
        return header, safetensors_load(data)
    except Exception as e:  # the library's own validation of the file
        raise ValueError(f"{tensors_path} is not a readable safetensors file: "
                         f"{e}") from None


# %% [markdown]
# **Check.** A state of a small network and Adam after one step reads back tensor for
# tensor; a tensors file cut short, or a header whose tensors file points elsewhere, is
# refused in one line.

# %% tags=["hide-input"]
import torch

from edm_lit.precond import EDMPrecond
from edm_lit.training import (capture_rng, read_training_state, save_training_state,
                              state_path)


def small_state(run_dir, kimg, channels=8):
    torch.manual_seed(0)
    net = EDMPrecond(8, 1, model_type="SongUNet", model_channels=channels,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    ema = EDMPrecond(8, 1, model_type="SongUNet", model_channels=channels,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 1, 8, 8), torch.ones(2)).square().mean().backward()
    opt.step()
    path = save_training_state(state_path(run_dir, kimg), net=net, ema=ema,
                               optimizer=opt, options={},
                               progress={"cur_nimg": kimg * 1000, "cur_tick": 1},
                               rng=[capture_rng(torch.device("cpu"))])
    return path, net, opt


states = WORK / "states"
path, net, opt = small_state(states, 3)
header, tensors = read_training_state(path)
assert all(torch.equal(tensors[f"net.{k}"], v) for k, v in net.state_dict().items())
first = opt.state[next(net.parameters())]
assert torch.equal(tensors["optimizer.0.exp_avg"], first["exp_avg"])
print(f"{len(tensors)} tensors; header: {sorted(header)[:6]} ...")
data = path.with_suffix(".safetensors").read_bytes()
path.with_suffix(".safetensors").write_bytes(data[: len(data) // 2])
for edit in ["truncated", "elsewhere"]:
    if edit == "elsewhere":
        path.with_suffix(".safetensors").write_bytes(data)
        path.write_text(json.dumps({**header, "tensors": "../x.safetensors"}))
    try:
        read_training_state(path)
        raise AssertionError(f"a {edit} state must be refused")
    except ValueError as e:
        print(f"{edit}: {e}")

# %% [markdown]
# `--resume=RUNDIR` takes the latest *complete* state of a run directory. Names are compared
# by number, not as text: past 999,999 kimg (ImageNet's 2,500 Mimg) they grow a digit. A state
# that does not read (killed while writing, or crafted) is skipped. Without `--seed`, a resumed
# run keeps the seed of the run it continues, since the data order depends on it.

# %% tags=["export:training"]
def find_training_state(path) -> tuple:
    """(header path, cur_nimg) of a training state given by file, or the latest complete
    one in a run directory. Appendix A3."""
    path = Path(path)
    if path.is_dir():
        numbered = [(int(m[1]), p) for p in path.glob("training-state-*.json")
                    if (m := re.fullmatch(r"training-state-(\d+)\.json", p.name))]
        for _, candidate in sorted(numbered, reverse=True):
            try:
                header, _ = read_training_state(candidate)
            except ValueError:
                continue  # incomplete (killed while writing it) or not a state of ours
            return candidate, header["cur_nimg"]
        raise ValueError(f"--resume: {path} holds no complete training-state-*.json")
    if not re.fullmatch(r"training-state-\d+\.(json|safetensors)", path.name):
        raise ValueError("--resume must be a run directory or a "
                         f"training-state-NNNNNN.json of a previous run, got {path}")
    header, _ = read_training_state(path)
    return path.with_suffix(".json"), int(header["cur_nimg"])


def _state_seed(resume_state):
    """The seed of the run a training state continues (the data order depends on it),
    or None."""
    if resume_state is None:
        return None
    seed = json.loads(Path(resume_state[0]).read_text())["options"].get("seed")
    valid = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31
    return seed if valid else None


# %% [markdown]
# **Check.** Of states at 999,999 and 1,000,000 kimg the second is the latest; a newer,
# broken one is skipped.

# %% tags=["hide-input"]
from edm_lit.training import find_training_state

latest, _, _ = small_state(states, 1_000_000)
small_state(states, 999_999)
state_path(states, 2_000_000).write_text('{"format": "edm_lit-training-state"')
assert find_training_state(states) == (latest, 1_000_000_000)
print("latest complete state:", find_training_state(states)[0].name)

# %% [markdown]
# Loading a state into a run checks, before touching the network, that it was made by the same
# architecture, and names the arguments that differ otherwise. Adam's moments are given back the
# memory layout of their parameters (a `--channels-last` run's weights are not contiguous), as
# in a fresh run: the fused Adam kernel walks both in memory order. The generators of the ranks
# are restored when the number of ranks is the same (Chapter 7b).

# %% tags=["export:training"]
def _check_network(header: dict, net, path) -> None:
    """ValueError naming the arguments in which the state's network differs."""
    from edm_lit.checkpoints import network_config

    ours, theirs = _json_safe(network_config(net)), header["network"]
    if theirs == ours:
        return
    kwargs = theirs.get("init_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    diff = sorted(k for k in set(ours["init_kwargs"]) | set(kwargs)
                  if ours["init_kwargs"].get(k) != kwargs.get(k))
    raise ValueError(f"--resume: {path} was trained with a different network "
                     f"({theirs.get('class_name')} vs {ours['class_name']}; differing "
                     f"arguments: {diff})")


def _optimizer_state(header: dict, tensors: dict) -> dict:
    """The optimizer's state_dict, put together from the tensors and the header."""
    state = {"state": {}, "param_groups": header["optimizer_param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    for key, value in header["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        state["state"].setdefault(int(index), {})[name] = value
    return state


def _match_layouts(optimizer) -> None:
    """Give each loaded optimizer tensor its parameter's memory layout, as in a fresh
    run (a fused kernel walks both in memory order)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape \
                        and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype)
                    optimizer.state[p][name].copy_(value)


# %% tags=["export:training"]
def load_training_state(path, *, net, ema, optimizer, rank: int, world_size: int,
                        device) -> dict:
    """Restore net, EMA, optimizer and this rank's generators from a training state;
    returns its header. Appendix A3."""
    header, tensors = read_training_state(path)
    _check_network(header, net, path)
    try:  # a state that passed the checks above but does not fit: one line
        for prefix, module in [("net.", net), ("ema.", ema)]:
            state = {k[len(prefix):]: v for k, v in tensors.items()
                     if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
        optimizer.load_state_dict(_optimizer_state(header, tensors))
        _match_layouts(optimizer)
        if header["world_size"] == world_size:
            mine = {k.split(".", 2)[2]: v for k, v in tensors.items()
                    if k.startswith(f"rng.{rank}.")}
            restore_rng(mine, header["rng"][rank], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError,
            AttributeError) as e:
        raise ValueError(f"--resume: {path} cannot be restored "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    return header


# %% [markdown]
# **Check.** A state loads into fresh modules and gives back the weights, Adam's moments and
# the generator (the next random number is the one that followed the save); a state of a wider
# network is refused, naming `model_channels`.

# %% tags=["hide-input"]
import copy

from edm_lit.training import load_training_state

path, net, opt = small_state(WORK / "load", 0)
after_save = torch.rand(3)
_, fresh, _ = small_state(WORK / "other", 0)
fresh_ema, fresh_opt = copy.deepcopy(fresh), torch.optim.Adam(fresh.parameters())
for p in fresh.parameters():
    torch.nn.init.zeros_(p)
load_training_state(path, net=fresh, ema=fresh_ema, optimizer=fresh_opt, rank=0,
                    world_size=1, device=torch.device("cpu"))
assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                             net.state_dict().values()))
assert torch.equal(torch.rand(3), after_save)
wide_path, wide, wide_opt = small_state(WORK / "wide", 0, channels=16)
try:
    load_training_state(wide_path, net=fresh, ema=fresh_ema, optimizer=fresh_opt,
                        rank=0, world_size=1, device=torch.device("cpu"))
    raise AssertionError("another architecture must be refused")
except ValueError as e:
    print(e)
    assert "model_channels" in str(e)

# %% [markdown]
# ## What this appendix exported
#
# `edm_lit.files`: `write_atomic`, `fsync_dir`, `TEMP_FILE` and `remove_stale_temp_files`,
# `check_writable`, `png_bytes`, `write_png` and `image_grid` (§A3.1–A3.4), `append_durable`
# (§A3.6).
#
# `edm_lit.training` (the files of Chapters 7 and 7b's loop): `claim_run_dir` and
# `release_run_dir` (§A3.5); the statistics lines (§A3.6); `STATE_FORMAT`, `STATE_VERSION`,
# `capture_rng`, `restore_rng`, `state_path`, `save_training_state`, `read_training_state`,
# `find_training_state` and `load_training_state` (§A3.7).
