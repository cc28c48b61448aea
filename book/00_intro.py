# ---
# jupyter:
#   edm_lit:
#     export: mode
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
# # 0. EDM, line by line
#
# > We argue that the theory and practice of diffusion-based generative models are currently
# > unnecessarily convoluted and seek to remedy the situation by presenting a design space that
# > clearly separates the concrete design choices. (Abstract)
#
# Diffusion models turn noise into data by running a differential equation backwards. Many
# papers built such models, each with its own notation, schedules, network wrappers and
# samplers, so it was hard to tell which choice mattered. Karras, Aittala, Aila and Laine,
# *Elucidating the Design Space of Diffusion-Based Generative Models* (NeurIPS 2022,
# [arXiv 2206.00364](https://arxiv.org/abs/2206.00364)) — **EDM** — wrote all of them in one
# framework, separated the choices that are independent of each other (the sampler, the
# network's preconditioning, the training noise distribution), and improved each in turn.
# The result set records at the time (FID 1.79 on CIFAR-10 with 35 network evaluations)
# with plain, short code.
#
# This book derives that framework step by step, and every code cell that defines something
# lasting is exported into the Python package `edm_lit`. You can therefore use this book three
# ways:
#
# 1. **read it** as a course: each section gives the reason, the paper's equation (with its
#    number), the code, a check that the code does what the equation says, and a figure;
# 2. **run it**: on a laptop CPU in *quick mode* (minutes, no downloads) or on a GPU in *full
#    mode* (real data sets and the paper's network sizes);
# 3. **import it**: `import edm_lit` gives you the same functions, tested, without Jupyter.

# %% [markdown]
# ## How to read a chapter
#
# Each numbered section follows the same rhythm: *the paper* (its words, quoted with the
# section they come from, or the equation with its number), *why* and *derivation* (only the
# steps you need), *code* (short, named after the paper's symbols), *check* (an `assert` that
# the property holds — if it ever stops holding, the test suite fails), and *look* (a
# figure). Chapters end with a summary of what was exported and a few exercises; their
# answers are folded away.
#
# Code cells come in two kinds. **Exported** cells are library code: they go verbatim into a
# module of `edm_lit`, and the generated file names the chapter and section they came from.
# All other cells are exploration — plots, sweeps, checks — and import the exported functions
# rather than defining them again. Cells that only hold checks or glue numbers into the text
# are collapsed ("Show code cell source" opens them), so the derivation's own code is what
# you see first; an exported cell is never collapsed. Later chapters import what earlier
# chapters exported, never the other way round. The engineering that a user of the package
# needs but a reader of the derivation does not (files, bad data, several processes, the
# command line) lives in the appendices, written as reference.

# %% [markdown]
# ## The map: chapters and modules
#
# | chapter | derives | module |
# |---|---|---|
# | 0 intro | how to read and run the book; the quick/full switch | `edm_lit.mode` |
# | 1 framework | σ(t), s(t), the probability-flow ODE (Eq. 1, 4), denoiser ↔ score (Eq. 3), Table 1 as schedule objects, ground-truth denoisers | `edm_lit.framework` |
# | 2 deterministic sampling | Euler vs Heun (Alg. 1), the time steps (Eq. 5), the original samplers re-expressed | `edm_lit.samplers` |
# | 3 stochastic sampling | Alg. 2: churn, S_tmin/S_tmax, S_noise; the pretrained network sampled | `edm_lit.samplers` |
# | 4 preconditioning & loss | c_skip, c_out, c_in, c_noise, λ(σ), p_train | `edm_lit.precond`, `edm_lit.loss` |
# | 5 networks | DDPM++/NCSN++ and ADM, built from a table of levels | `edm_lit.networks` |
# | 5b the loss floor | where training pays (Fig. 5a): the floor, p_train, a first training, precision | `edm_lit.course` |
# | 6 data | the official data-set format, a real quick-mode data set with no download, the digits judge | `edm_lit.data` |
# | 6b augmentation | non-leaking augmentation and its labels | `edm_lit.augment` |
# | 7 the training loop | the paper's loop: the optimizer, the learning-rate ramp-up, the EMA | `edm_lit.training` |
# | 7b training at scale | mixed precision, several GPUs, snapshots and exact resume; `edm-lit train` | `edm_lit.training`, `edm_lit.train` |
# | 8 evaluation | generation per seed, FID | `edm_lit.generate`, `edm_lit.fid` |
# | 9 reproduction | the paper's tables beside ours | (reads `book/results/`) |
# | A1 command line | `edm-lit` and its subcommands | `edm_lit.cli` |
# | A2 checkpoints | official snapshots read as data, never run | `edm_lit.checkpoints` |
# | A2b `load_network` | our safetensors format, downloads, what a hostile file can do | `edm_lit.checkpoints` |
# | A3 files | files that survive `kill -9`; outputs checked before the work; the one PNG writer | `edm_lit.files` |
# | A4 bad data | what the data loader refuses, and why | `edm_lit.data` |
# | A5 several processes | `torchrun`: a process's place, shared errors, gathering | `edm_lit.distributed` |
# | A6 generation at scale | seeds, batches, writer threads, the streamed `.npz` | `edm_lit.generate` |
# | A6b FID at scale | the Inception-v3 port and its weights, reference files, detectors | `edm_lit.fid` |
# | A7 the train command | the machinery of `edm-lit train`: options, ranks, the tick's row | `edm_lit.training`, `edm_lit.train` |
# | (all chapters) | helpers the chapters share: quick-mode models, comparisons, numbers for the prose; *not* library API | `edm_lit.course` |
#
# Two modules have similar names and different jobs. `edm_lit.training` is the loop itself
# (Chapters 7 and 7b), functions you call from Python with a network, data and options;
# `edm_lit.train` is the command around it (`edm-lit train`, or `python -m edm_lit.train`
# under `torchrun`), which reads the official `train.py`'s flags, sets up the processes
# (Appendix A5) and calls the loop.
#
# The table of contents lists the chapters written so far. The cell below lists the modules
# the package has *now* (it reads the package, so the list is as current as the build) and
# checks that every one of them is on this map.

# %% tags=["hide-input"]
import pkgutil
import re

import edm_lit

MAP = {"mode", "framework", "samplers", "precond", "loss", "networks", "data",
       "augment", "training", "train", "generate", "fid", "cli", "checkpoints", "files",
       "distributed", "course"}
present = {m.name for m in pkgutil.iter_modules(edm_lit.__path__)}
print(f"modules exported so far ({len(present)} of {len(MAP)}):",
      ", ".join(sorted(present)))
assert present <= MAP, f"modules missing from the map: {present - MAP}"
# the chapters that the next ones build on, and the helpers they share
assert {"mode", "framework", "samplers", "course"} <= present

# %% [markdown]
# ## How the export works
#
# A chapter is a pair of files: `book/NN_topic.py`, a plain-text *percent* script that is the
# reviewed source, and `book/NN_topic.ipynb`, the same cells with their outputs, kept in step by
# [jupytext](https://jupytext.readthedocs.io). A cell goes into the package when it carries the
# cell tag `export` (into the module the chapter names in its header, `edm_lit: {export: ...}`)
# or `export:MODULE` (into `edm_lit/MODULE.py`). In the `.py` source that reads
#
# ```python
# # %% tags=["export"]
# def c_skip(sigma, sigma_data=0.5): ...
# ```
#
# We chose cell tags over nbdev's `#| export` comments because tags are metadata: the rendered
# book shows the code and nothing else. We chose a small exporter (`tools/nbtools.py`,
# {glue:text}`nbtools_lines` lines) over nbdev because nbdev reads only `.ipynb` files (our
# reviewed source is the `.py`), always writes extra files, and has no *check* mode. Ours has
# three commands:
#
# - `python tools/nbtools.py export` writes `edm_lit/` from the chapters;
# - `python tools/nbtools.py check` fails when `edm_lit/` differs from what the chapters export
#   (a hand edit, or a chapter changed without re-exporting) or when a notebook is out of step
#   with its `.py`; the test suite runs it;
# - `python tools/nbtools.py execute [chapter.py ...]` runs chapters and writes their `.ipynb`
#   with outputs.
#
# The package needs only {glue:text}`dependencies` (the `dependencies` of `pyproject.toml`);
# it imports and runs with no Jupyter installed. The cell below reads that list and, for each
# entry, the modules of `edm_lit` that import it. {glue:text}`planned_note`

# %% tags=["hide-input"]
import ast
import sys
import tomllib
from pathlib import Path

from myst_nb import glue

ROOT = Path(edm_lit.__file__).resolve().parents[1]
project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
declared = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0] for d in project["dependencies"]]
# dependency -> the chapter that will use it, if declared ahead of its use (none now)
PLANNED = {}
IMPORT_NAME = {"pillow": "PIL"}  # distributions imported under another name
# imported lazily, with a fallback
OPTIONAL = {
    "sklearn": "scikit-learn: the quick-mode digits, Chapter 6 (the `notebooks` extra)",
    "psutil": "psutil: memory in the training statistics, when installed"}


def imported_names(node):
    """The modules an import statement names (absolute imports only)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


users, imported = {IMPORT_NAME.get(d, d): [] for d in declared}, set()
for path in sorted((ROOT / "edm_lit").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        tops = {n.split(".")[0] for n in imported_names(node)}
        imported |= tops
        for top in tops & set(users):
            users[top].append(path.stem)
third_party = imported - set(sys.stdlib_module_names) - {"edm_lit"} - set(OPTIONAL)
assert third_party <= set(users), \
    f"imported but not declared in pyproject.toml: {third_party - set(users)}"
for dep, mods in users.items():
    who = ", ".join(sorted(set(mods))) or f"(none yet: {PLANNED.get(dep, '?')})"
    print(f"{dep:12s} imported by: {who}")
    assert mods or dep in PLANNED, f"{dep} is declared but no module uses it"
nbtools_lines = len((ROOT / "tools" / "nbtools.py").read_text().splitlines())
glue("dependencies", ", ".join(declared[:-1]) + f" and {declared[-1]}", display=False)
glue("nbtools_lines", str(nbtools_lines), display=False)
ahead = [d for d in users if not users[d]]
print("optional, imported only where needed:", "; ".join(OPTIONAL.values()))
note = " ".join(f"{d} is declared ahead of its use ({PLANNED[d]}): nothing imports it."
                for d in ahead) or "Every one of them is imported by some module."
glue("planned_note", note, display=False)

# %% [markdown]
# ## Quick and full mode
#
# Every chapter reads one switch, the environment variable `EDM_LIT_MODE`, through one
# function, and picks its sizes from it:
#
# - **quick** (the default): small data, small networks, few steps — every notebook runs end
#   to end in minutes on two CPU cores, with no download. Quick is smaller, not fake: the same
#   code paths run, and where a small run can show less, the chapter says so.
# - **full** (`EDM_LIT_MODE=full`): the paper's scale on a CUDA GPU, through the same code as
#   the `edm-lit` command line. Four more variables say what to run on:
#
# | variable | what | used by |
# |---|---|---|
# | `EDM_LIT_DATA` | a data set made by `edm-lit dataset` (ZIP or folder; labelled or not) | Chapters 6, 6b, 7, 7b, 8 |
# | `EDM_LIT_KIMG` | the training budget in thousands of images, your choice (the paper: 200,000) | Chapters 7, 7b |
# | `EDM_LIT_INCEPTION` | the FID feature network's weights (Chapter 8.4 says which file) | Chapters 8, 9 |
# | `EDM_LIT_PRETRAINED` | a pretrained snapshot, path or URL (default: the official CIFAR-10 network) | Chapters 3, 8, 9 |
#
# The device is chosen in the same place — a GPU when one is visible, even in quick mode —
# so no notebook ever tests for a GPU itself. A chapter whose full-size part needs something
# that is missing (a GPU, a variable) says so in one printed line and runs its quick version.

# %% tags=["export"]
import math
import os
from dataclasses import dataclass

import torch

MODE_ENV = "EDM_LIT_MODE"
MODES = ("quick", "full")
# full mode's inputs: Mode field -> environment variable
FULL_ENV = {"data": "EDM_LIT_DATA", "kimg": "EDM_LIT_KIMG",
            "inception": "EDM_LIT_INCEPTION", "pretrained": "EDM_LIT_PRETRAINED"}
# the paper's class-conditional CIFAR-10 network (VP column of Table 2), NVIDIA's copy
PRETRAINED_CIFAR10 = ("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
                      "edm-cifar10-32x32-cond-vp.pkl")


@dataclass(frozen=True)
class Mode:
    """How big to run: 'quick' (CPU-sized, the default) or 'full' (paper-sized, GPU).
    Chapter 0."""

    name: str
    device: torch.device
    data: str | None = None  # $EDM_LIT_DATA
    kimg: float | None = None  # $EDM_LIT_KIMG
    inception: str | None = None  # $EDM_LIT_INCEPTION
    pretrained: str = PRETRAINED_CIFAR10  # $EDM_LIT_PRETRAINED

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, quick, full):
        """Return `quick` in quick mode and `full` in full mode."""
        return quick if self.quick else full

    def missing(self, gpu: bool = True, needs=()) -> list:
        """What a full-size part lacks: 'a CUDA GPU', unset variables of `needs`."""
        lacking = ["a CUDA GPU"] if gpu and self.device.type != "cuda" else []
        return lacking + [FULL_ENV[n] for n in needs if getattr(self, n) is None]

    def require(self, what: str, gpu: bool = True, needs=()) -> "Mode":
        """This mode if `what` can run at full size; else print one line saying why and
        return quick mode."""
        if self.quick:
            return self
        lacking = self.missing(gpu, needs)
        if not lacking:
            return self
        print(f"full mode: {what} needs {' and '.join(lacking)}; "
              "running the quick version")
        return Mode("quick", self.device)


def _full_inputs(environ) -> dict:
    """Full mode's variables, checked: an existing data set path, a finite kimg > 0,
    strings otherwise."""
    values = {}
    for field, var in FULL_ENV.items():
        text = (environ.get(var) or "").strip()
        if not text:
            continue
        if field == "kimg":
            try:
                kimg = float(text)
            except ValueError:
                kimg = math.nan
            if not (math.isfinite(kimg) and kimg > 0):
                raise ValueError(f"{var} must be a number of thousands of images > 0, "
                                 f"got {text!r}")
            values[field] = kimg
        elif field == "data" and not os.path.exists(text):
            raise ValueError(f"{var}: no such data set: {text!r} "
                             "(a ZIP or folder made by `edm-lit dataset`)")
        else:
            values[field] = text
    return values


def get_mode(environ=None) -> Mode:
    """Read the one switch, `EDM_LIT_MODE` ('quick' when unset), its full-mode inputs,
    and the device. Chapter 0."""
    environ = os.environ if environ is None else environ
    name = environ.get(MODE_ENV, "quick").strip().lower() or "quick"
    if name not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {name!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "quick":
        return Mode(name, device)
    return Mode(name, device, **_full_inputs(environ))


# %% [markdown]
# A chapter starts with `MODE = get_mode()` and then asks `MODE.pick(quick=..., full=...)`. A
# chapter whose full-size part needs a GPU or an input asks for it by name,
# `MODE = get_mode().require("training at the paper's size", needs=("data", "kimg"))`, and
# gets quick mode back, with a line saying why, when something is missing:

# %%
from edm_lit.mode import get_mode

MODE = get_mode()
print(f"mode: {MODE.name}, device: {MODE.device.type}")
num_images = MODE.pick(quick=1_000, full=50_000)
full = get_mode({"EDM_LIT_MODE": "full", "EDM_LIT_KIMG": "200"})
fallback = full.require("this example", needs=("data", "kimg"))  # no data set named

# %% [markdown]
# **Check** — an unset or oddly spelled switch is quick mode; a misspelt mode, an infinite
# budget and a data set that does not exist are refused when the switch is read, not hours
# later; and a full mode that lacks an input falls back to quick mode on the same device.

# %% tags=["hide-input"]
assert get_mode({}).name == "quick" and get_mode({"EDM_LIT_MODE": "Quick "}).quick
for bad in [{"EDM_LIT_MODE": "fast"}, {"EDM_LIT_MODE": "full", "EDM_LIT_KIMG": "inf"},
            {"EDM_LIT_MODE": "full", "EDM_LIT_DATA": "/no/such/cifar10-32x32.zip"}]:
    try:
        get_mode(bad)
    except ValueError as e:
        print("refused:", e)
    else:
        raise AssertionError(f"{bad} must be refused")
assert full.full and full.kimg == 200.0 and full.data is None
assert fallback.quick and fallback.device == full.device

# %% [markdown]
# ## Running the book
#
# From a fresh clone, the `README.md` gives two commands: `make book` builds this book
# (it installs what it needs, executes every notebook in quick mode, writes
# `_build/html/index.html`), and `make test` runs the test suite (unit tests, every notebook
# under [nbval](https://nbval.readthedocs.io), the pairing and export checks). To run a
# notebook on a GPU in full mode, start Jupyter with `EDM_LIT_MODE=full jupyter lab` and open
# it; to use the package, `pip install .` and `import edm_lit`.
#
# ## What this chapter exported
#
# `edm_lit.mode`: `get_mode()` and the `Mode` it returns (`.name`, `.device`, `.quick`,
# `.full`, `.pick(quick, full)`, `.require(what, gpu, needs)`, and full mode's inputs `.data`,
# `.kimg`, `.inception`, `.pretrained`).
