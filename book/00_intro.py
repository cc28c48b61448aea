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
# Each chapter follows the same rhythm: *why* (one or two sentences), *the paper* (the
# equation with its number), *derivation* (only the steps you need), *code* (short, named
# after the paper's symbols), *check* (an `assert` that the property holds — if it ever stops
# holding, the test suite fails), and *look* (a figure). Chapters end with a summary of what
# was exported and a few exercises; their answers are folded away.
#
# Code cells come in two kinds. **Exported** cells are library code: they go verbatim into a
# module of `edm_lit`, and the generated file names the chapter and section they came from.
# All other cells are exploration — plots, sweeps, checks — and import the exported functions
# rather than defining them again. Later chapters import what earlier chapters exported, never
# the other way round.

# %% [markdown]
# ## The map: chapters and modules
#
# | chapter | derives | module |
# |---|---|---|
# | 0 intro | how to read and run the book; the quick/full switch | `edm_lit.mode` |
# | 1 framework | σ(t), s(t), the probability-flow ODE (Eq. 1, 4), denoiser ↔ score (Eq. 3), Table 1 as schedule objects, ground-truth denoisers | `edm_lit.framework` |
# | 2 deterministic sampling | Euler vs Heun (Alg. 1), the time steps (Eq. 5), the original samplers re-expressed | `edm_lit.samplers` |
# | 3 stochastic sampling | Alg. 2: churn, S_tmin/S_tmax, S_noise | `edm_lit.samplers` |
# | 4 preconditioning & loss | c_skip, c_out, c_in, c_noise, λ(σ), p_train | `edm_lit.precond`, `edm_lit.loss` |
# | 5 networks | DDPM++/NCSN++ and ADM; a first training | `edm_lit.networks` |
# | 6 data & augmentation | the official data-set format, a real quick-mode data set, non-leaking augmentation | `edm_lit.data`, `edm_lit.augment` |
# | 7 training | the paper's loop: EMA, mixed precision, DDP, snapshots and exact resume; `edm-lit train` | `edm_lit.training`, `edm_lit.train` |
# | 8 evaluation | generation at scale, FID | `edm_lit.generate`, `edm_lit.fid` |
# | 9 reproduction | the paper's tables beside ours | (reads `book/results/`) |
# | A1 command line | `edm-lit` and its subcommands | `edm_lit.cli` |
# | A2 checkpoints | official snapshots loaded without running their code; our safetensors format | `edm_lit.checkpoints` |
#
# Chapters are added in this order; the table of contents lists those written so far. The
# cell below lists the modules the package has *now* (it reads the package, so the list is as
# current as the build) and checks that every one of them is on this map.

# %%
import pkgutil
import re

import edm_lit

MAP = {"mode", "framework", "samplers", "precond", "loss", "networks", "checkpoints", "augment",
       "data", "training", "train", "generate", "fid", "cli"}
present = {m.name for m in pkgutil.iter_modules(edm_lit.__path__)}
print(f"modules exported so far ({len(present)} of {len(MAP)}):", ", ".join(sorted(present)))
assert present <= MAP, f"modules missing from the map: {present - MAP}"
assert {"mode", "framework", "samplers"} <= present  # the chapters that the next ones build on

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

# %%
import ast
import sys
import tomllib
from pathlib import Path

from myst_nb import glue

ROOT = Path(edm_lit.__file__).resolve().parents[1]
declared = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0] for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
PLANNED = {}  # dependency -> the chapter that will use it, for one declared ahead of its use (none now)
IMPORT_NAME = {"pillow": "PIL"}  # distributions imported under another name
OPTIONAL = {"sklearn": "scikit-learn: the quick-mode digits, Chapter 6 (the `notebooks` extra)",
            "psutil": "psutil: memory in the training statistics, when installed"}  # imported lazily, with a fallback
users, imported = {IMPORT_NAME.get(d, d): [] for d in declared}, set()
for path in sorted((ROOT / "edm_lit").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        imported |= {n.split(".")[0] for n in names}
        for top in {n.split(".")[0] for n in names} & set(users):
            users[top].append(path.stem)
third_party = imported - set(sys.stdlib_module_names) - {"edm_lit"} - set(OPTIONAL)
assert third_party <= set(users), f"imported but not declared in pyproject.toml: {third_party - set(users)}"
for dep, mods in users.items():
    print(f"{dep:12s} imported by: {', '.join(sorted(set(mods))) or '(none yet: ' + PLANNED.get(dep, '?') + ')'}")
    assert mods or dep in PLANNED, f"{dep} is declared but no module uses it"
nbtools_lines = len((ROOT / "tools" / "nbtools.py").read_text().splitlines())
glue("dependencies", ", ".join(declared[:-1]) + f" and {declared[-1]}", display=False)
glue("nbtools_lines", str(nbtools_lines), display=False)
ahead = [d for d in users if not users[d]]
print("optional, imported only where needed:", "; ".join(OPTIONAL.values()))
glue("planned_note", " ".join(f"{d} is declared ahead of its use ({PLANNED[d]}): no module imports it yet." for d in ahead)
     or "Every one of them is imported by some module.", display=False)

# %% [markdown]
# ## Quick and full mode
#
# Every chapter reads one switch, the environment variable `EDM_LIT_MODE`, through one
# function, and picks its sizes from it:
#
# - **quick** (the default): small data, small networks, few steps — every notebook runs end
#   to end in minutes on two CPU cores, with no download. Quick is smaller, not fake: the same
#   code paths run, and where a small run can show less, the chapter says so.
# - **full** (`EDM_LIT_MODE=full`, needs a CUDA GPU): the paper's data sets (given by path) and
#   network sizes.
#
# The device is chosen in the same place — a GPU when one is visible, even in quick mode —
# so no notebook ever tests for a GPU itself.

# %% tags=["export"]
import os
from dataclasses import dataclass

import torch

MODE_ENV = "EDM_LIT_MODE"
MODES = ("quick", "full")


@dataclass(frozen=True)
class Mode:
    """How big to run: 'quick' (CPU-sized, the default) or 'full' (paper-sized, GPU). Chapter 0."""

    name: str
    device: torch.device

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, quick, full):
        """Return `quick` in quick mode and `full` in full mode."""
        return quick if self.quick else full


def get_mode(environ=None) -> Mode:
    """Read the one switch, `EDM_LIT_MODE` ('quick' when unset), and choose the device. Chapter 0."""
    environ = os.environ if environ is None else environ
    name = environ.get(MODE_ENV, "quick").strip().lower() or "quick"
    if name not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {name!r}")
    has_cuda = torch.cuda.is_available()
    if name == "full" and not has_cuda:
        raise RuntimeError(f"{MODE_ENV}=full needs a CUDA GPU and none is visible; unset it for quick mode")
    return Mode(name, torch.device("cuda" if has_cuda else "cpu"))


# %% [markdown]
# A chapter starts with `MODE = get_mode()` and then asks `MODE.pick(quick=..., full=...)`:

# %%
from edm_lit.mode import get_mode

MODE = get_mode()
print(f"mode: {MODE.name}, device: {MODE.device.type}")
num_images = MODE.pick(quick=1_000, full=50_000)
assert get_mode({}).name == "quick" and get_mode({"EDM_LIT_MODE": "Quick "}).quick
try:
    get_mode({"EDM_LIT_MODE": "fast"})
except ValueError as e:
    print("a typo is refused:", e)
else:
    raise AssertionError("an unknown mode must be refused")

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
# `.full`, `.pick(quick, full)`).
