# ---
# jupyter:
#   edm_lit:
#     export: training
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
# # 7. The training loop
#
# Chapter 4 gave the loss of one batch, Chapter 5 the networks, Chapter 6 the data and its
# augmentation. What is left is the machinery that turns them into a trained model over days on
# many GPUs — and that still trains a small model on a laptop in minutes. The paper's training
# recipe (App. F.2, Table 7) is ordinary: Adam, a linear learning-rate ramp-up, an exponential
# moving average (EMA) of the weights with a half-life counted in images, dropout, the
# non-leaking augmentation, and, for ImageNet, fp16 with loss scaling. The interesting part is
# making the loop *exact*: the same images, the same noise and the same weights whether the run
# goes through in one piece, is killed and resumed, or is spread over several processes.
#
# The chapter exports `edm_lit.training` (the loop, its schedules, its files) and
# `edm_lit.train`, the command `python -m edm_lit.train` / `edm-lit train`, which accepts the
# flags of the official `train.py` with the same names, meanings and defaults.
#
# | section | what |
# |---|---|
# | 7.1 | the official flags, presets and the resolved configuration (`training_options.json`) |
# | 7.2 | the order of the data: one global stream, sharded over ranks, resumable anywhere |
# | 7.3 | the schedules: learning-rate ramp-up and EMA half-life |
# | 7.4 | one optimiser step: accumulation, loss scaling, the nan/inf guard, precision |
# | 7.5 | files that survive `kill -9`, and the training state |
# | 7.6 | statistics in the official layout |
# | 7.7 | the loop, on one CPU or on `torchrun` |
# | 7.8 | the command line |
# | 7.9 | a real training run on the digits, its loss per σ and what EMA does |

# %% tags=["export"]
import contextlib
import copy
import hashlib
import importlib
import json
import math
import numbers
import os
import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edm_lit.distributed import agree_on_error, gather, init_distributed, local_rank  # Appendix A5

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from edm_lit.mode import get_mode

MODE = get_mode().require("training the paper's network", needs=("data", "kimg"))
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
if MODE.quick:
    torch.set_num_threads(1)  # this chapter's tensors are tiny: more CPU threads only add synchronisation

# %% [markdown]
# ## 7.1 From flags to one configuration
#
# The official `train.py` turns its flags into one nested dictionary that it prints on
# `--dry-run`, stores as `training_options.json` in the run directory, and hands, unchanged, to
# the loop as keyword arguments. We keep that structure key for key, so that a user can compare
# our resolved configuration with an official one line by line. The classes it names are ours
# (`edm_lit.precond.EDMPrecond`, ...); a configuration that names the official ones
# (`training.networks.EDMPrecond`, ...) is read too, mapped onto ours.
#
# The architecture presets are facts of the paper (App. F.2): DDPM++ and NCSN++ differ in four
# switches of `SongUNet`, ADM is `DhariwalUNet`. We add one preset of our own, `ddpmpp-tiny`:
# the same DDPM++ blocks, two levels of 16 and 32 channels and one block per level — the quick-mode
# network. Quick mode is not a separate code path: it is this preset and the digits data set
# (`--data=digits`, Chapter 6) on the same loop.

# %% tags=["export"]
# --arch presets: SongUNet / DhariwalUNet arguments (paper App. F.2), plus our CPU-sized 'ddpmpp-tiny'.
_DDPMPP = {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
           "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1]}
ARCH_PRESETS = {
    "ddpmpp": {**_DDPMPP, "model_channels": 128, "channel_mult": [2, 2, 2]},
    "ncsnpp": {"model_type": "SongUNet", "embedding_type": "fourier", "encoder_type": "residual",
               "decoder_type": "standard", "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1],
               "model_channels": 128, "channel_mult": [2, 2, 2]},
    "adm": {"model_type": "DhariwalUNet", "model_channels": 192, "channel_mult": [1, 2, 3, 4]},
    "ddpmpp-tiny": {**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                    "attn_resolutions": [4]},
}
# --precond: (preconditioner, loss) of Table 1's columns (Chapter 4).
PRECOND_CLASSES = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"), "edm": ("EDMPrecond", "EDMLoss")}
# The official train.py's flags and defaults (MIMG = millions of images, KIMG = thousands).
TRAIN_DEFAULTS = dict(
    outdir=None, data=None, cond=False, arch="ddpmpp", precond="edm", duration=200.0, batch=512, batch_gpu=None,
    cbase=None, cres=None, lr=10e-4, ema=0.5, dropout=0.13, augment=0.12, xflip=False, fp16=False, ls=1.0,
    bench=True, cache=True, workers=1, desc=None, nosubdir=False, tick=50, snap=50, dump=500, seed=None,
    transfer=None, resume=None, dry_run=False,
    # ours: bf16 autocast, the ramp-up length (official: a fixed 10 Mimg), snapshot sample grid size
    bf16=False, lr_rampup=10.0, grid=64,
    # ours, for speed (§7.8)
    channels_last=False, compile=False, fused_adam=False,
)
# Ranges of the numeric flags: (low, high, low excluded); every value must also be finite.
FLOAT_RANGES = {"duration": (0, None, True), "lr": (0, None, True), "ls": (0, None, True),
                "ema": (0, None, False), "lr_rampup": (0, None, False), "dropout": (0, 1, False),
                "augment": (0, 1, False)}
# (low, high); None = no value given is allowed for batch_gpu, cbase and seed. The official loop
# seeds numpy with the seed modulo 2^31, and draws its random seeds below 2^31.
INT_RANGES = {"batch": (1, None), "batch_gpu": (1, None), "cbase": (1, None), "tick": (1, None),
              "snap": (1, None), "dump": (1, None), "workers": (1, None), "seed": (0, 2**31 - 1),
              "grid": (0, 1024)}
# The augmentations the paper enables, each with probability --augment (Chapter 6).
AUGMENT_SWITCHES = {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1, "translate_frac": 1}
AUGMENT_DIM = 9
# An official configuration names its classes by the official module; these are ours.
_OFFICIAL_MODULES = {"training.networks": "edm_lit.precond", "training.loss": "edm_lit.loss",
                     "training.dataset": "edm_lit.data", "training.augment": "edm_lit.augment"}


def construct(class_name: str, **kwargs):
    """Build `class_name(**kwargs)` for a class of edm_lit (or torch.optim); official names map to ours. Chapter 7."""
    module, _, name = class_name.rpartition(".")
    module = _OFFICIAL_MODULES.get(module, module)
    if not (module.startswith("edm_lit.") or module == "torch.optim"):
        raise ValueError(f"class_name must name a class of edm_lit or torch.optim, got {class_name!r}")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{class_name!r} needs the module {e.name}, which is not available") from None
    except AttributeError:
        raise ValueError(f"{module} has no class {name!r} (from class_name {class_name!r})") from None
    return cls(**kwargs)


# %% [markdown]
# `build_options` is the resolution step. It takes the flags (as a dictionary; the command line
# of §7.8 only parses them), opens the data set once to learn its name, resolution and size, and
# refuses early — before any network is built — what cannot work: a missing data set,
# `--cond` on unlabelled data, `--fp16` without a GPU, `--transfer` together with `--resume`, a
# global batch that the ranks and `--batch-gpu` cannot split evenly, a resume point that does not
# exist. The defaults are those of the official `train.py`: CIFAR-10's recipe is the default
# command.

# %% tags=["export"]
def split_batch(batch_size: int, world_size: int, batch_gpu=None) -> tuple:
    """(per-rank batch of one round, accumulation rounds) so that batch = per_round * rounds * ranks. Chapter 7."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"need batch >= 1 and world size >= 1, got batch={batch_size}, world size={world_size}")
    if batch_size % world_size:
        raise ValueError(f"--batch={batch_size} is not divisible by the number of ranks ({world_size})")
    per_rank = batch_size // world_size
    per_round = per_rank if batch_gpu is None else min(int(batch_gpu), per_rank)
    if per_round < 1 or per_rank % per_round:
        raise ValueError(f"--batch={batch_size} is not divisible by ranks x --batch-gpu = {world_size} x {batch_gpu}: "
                         f"each rank gets {per_rank} images per step, which must be a multiple of --batch-gpu")
    return per_round, per_rank // per_round


def digits_path() -> Path:
    """Where `--data=digits` keeps the quick data set: $EDM_LIT_CACHE (else ~/.cache/edm_lit)/digits-8x8.zip."""
    return Path(os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit") / "digits-8x8.zip"


def _dataset_kwargs(flags: dict) -> dict:
    """The data set's constructor arguments; '--data=digits' is built (once, in the cache) by edm_lit.data (Chapter 6)."""
    data = flags["data"]
    if data is None:
        raise ValueError("--data is required: a data set ZIP or folder (dataset.json for labels), or 'digits'")
    if str(data) == "digits":
        try:
            from edm_lit import data as data_module
        except ModuleNotFoundError:
            raise ValueError("--data=digits needs edm_lit.data (Chapter 6), which is not available") from None
        error = None
        if local_rank() == 0:  # one writer per node (each node may have its own cache); the write is atomic
            try:
                data_module.quick_dataset(digits_path())
            except Exception as e:  # reported on every rank below, so that none waits for the others
                error = f"--data=digits: cannot build {digits_path()}: {type(e).__name__}: {e}"
        error = agree_on_error(error)  # also the barrier: the other ranks wait until the file exists
        if error is not None:
            raise ValueError(error)
        data = str(digits_path())
    elif not os.path.exists(data):
        raise ValueError(f"--data: no such data set: {data!r} (expected a ZIP or folder made by `edm-lit dataset`)")
    return dict(class_name="edm_lit.data.ImageFolderDataset", path=str(data), use_labels=bool(flags["cond"]),
                xflip=bool(flags["xflip"]), cache=bool(flags["cache"]))


def build_options(flags: dict, world_size: int = 1, device=None) -> dict:
    """Resolve train flags (names and defaults of the official train.py) into the training options. Chapter 7.

    Returns the nested dict the official tool writes to training_options.json (same keys), ready for
    `training_loop(**options)`. Raises ValueError, before any work, for inputs that cannot train.
    """
    unknown = set(flags) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown train options {sorted(unknown)}")
    f = {**TRAIN_DEFAULTS, **flags}
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if f["arch"] not in ARCH_PRESETS:
        raise ValueError(f"--arch must be one of {sorted(ARCH_PRESETS)}, got {f['arch']!r}")
    if f["precond"] not in PRECOND_CLASSES:
        raise ValueError(f"--precond must be one of {sorted(PRECOND_CLASSES)}, got {f['precond']!r}")
    check_flags(f)
    if f["fp16"] and device.type != "cuda" and not f["dry_run"]:  # a dry run warns (device_warning)
        raise ValueError("--fp16 needs a CUDA GPU (the networks' fp16 path runs on CUDA only); on a CPU use --bf16")
    if f["fp16"] and f["bf16"]:
        raise ValueError("--fp16 and --bf16 cannot both be set")
    if f["transfer"] is not None and f["resume"] is not None:
        raise ValueError("--transfer and --resume cannot be specified at the same time")
    if f["transfer"] is not None and not re.match(r"https?://", str(f["transfer"])) \
            and not os.path.isfile(f["transfer"]):
        raise ValueError(f"--transfer: no such file: {str(f['transfer'])!r}")
    split_batch(int(f["batch"]), world_size, f["batch_gpu"])
    resume_state = find_training_state(f["resume"]) if f["resume"] is not None else None

    c = {}
    c["dataset_kwargs"] = _dataset_kwargs(f)
    dataset = construct(**c["dataset_kwargs"])  # opened once: name, resolution, size, labels
    if f["cond"] and not dataset.has_labels:
        raise ValueError("--cond=True requires labels specified in dataset.json")
    c["dataset_kwargs"].update(resolution=int(dataset.resolution), max_size=len(dataset))
    c["data_loader_kwargs"] = dict(pin_memory=True, num_workers=int(f["workers"]), prefetch_factor=2)
    precond_name, loss_name = PRECOND_CLASSES[f["precond"]]
    net = dict(ARCH_PRESETS[f["arch"]])
    if f["cbase"] is not None:
        net["model_channels"] = int(f["cbase"])
    if f["cres"] is not None:
        net["channel_mult"] = [int(m) for m in f["cres"]]
    levels = len(net["channel_mult"])
    if dataset.resolution % 2 ** (levels - 1):
        raise ValueError(f"--cres: {levels} levels halve the resolution {levels - 1} times, but the "
                         f"data set is {dataset.resolution}x{dataset.resolution} (not divisible by "
                         f"{2 ** (levels - 1)})")
    c["network_kwargs"] = {**net, "class_name": f"edm_lit.precond.{precond_name}"}
    c["loss_kwargs"] = {"class_name": f"edm_lit.loss.{loss_name}"}
    c["optimizer_kwargs"] = {"class_name": "torch.optim.Adam", "lr": float(f["lr"]), "betas": [0.9, 0.999], "eps": 1e-8}
    if f["augment"]:
        c["augment_kwargs"] = {"class_name": "edm_lit.augment.AugmentPipe", "p": float(f["augment"]), **AUGMENT_SWITCHES}
        c["network_kwargs"]["augment_dim"] = AUGMENT_DIM
    c["network_kwargs"].update(dropout=float(f["dropout"]), use_fp16=bool(f["fp16"]))
    c["total_kimg"] = max(int(f["duration"] * 1000), 1)
    c["ema_halflife_kimg"] = int(f["ema"] * 1000)
    c["batch_size"], c["batch_gpu"] = int(f["batch"]), f["batch_gpu"]
    c["loss_scaling"], c["cudnn_benchmark"] = float(f["ls"]), bool(f["bench"])
    c["kimg_per_tick"], c["snapshot_ticks"], c["state_dump_ticks"] = int(f["tick"]), int(f["snap"]), int(f["dump"])
    seed = f["seed"] if f["seed"] is not None else _state_seed(resume_state)  # a resume keeps its seed
    c["seed"] = int(seed) if seed is not None else random_seed(device)
    if f["transfer"] is not None:
        c["resume_pkl"] = str(f["transfer"])
        c["ema_rampup_ratio"] = None  # fine-tuning: the EMA keeps its full half-life from the start
    elif resume_state is not None:
        c["resume_kimg"] = resume_state[1] // 1000
        c["resume_state_dump"] = str(resume_state[0])
    # ours, beyond the official options
    c["lr_rampup_kimg"] = int(f["lr_rampup"] * 1000)
    c["autocast_dtype"] = "bfloat16" if f["bf16"] else None
    c["grid_images"] = int(f["grid"])
    c["channels_last"], c["torch_compile"] = bool(f["channels_last"]), bool(f["compile"])
    if f["fused_adam"]:
        c["optimizer_kwargs"]["fused"] = True

    cond = "cond" if f["cond"] else "uncond"
    dtype = "fp16" if f["fp16"] else ("bf16" if f["bf16"] else "fp32")
    desc = f"{dataset.name}-{cond}-{f['arch']}-{f['precond']}-gpus{world_size}-batch{c['batch_size']}-{dtype}"
    if f["desc"] is not None:
        desc += f"-{f['desc']}"
    c["run_dir"] = _pick_run_dir(f["outdir"], desc, f["nosubdir"]) if f["outdir"] is not None else None
    return c


def random_seed(device) -> int:
    """A fresh random seed, the same on every rank (broadcast from rank 0). Chapter 7."""
    seed = torch.randint(1 << 31, size=[], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(seed, src=0)
    return int(seed)


def _pick_run_dir(outdir, desc: str, nosubdir: bool) -> str:
    """OUTDIR (--nosubdir) or OUTDIR/NNNNN-desc with the next free number (claim_run_dir claims it)."""
    if nosubdir:
        return str(outdir)
    numbers = [int(m.group()) for p in (Path(outdir).iterdir() if Path(outdir).is_dir() else [])
               if p.is_dir() and (m := re.match(r"\d+", p.name))]
    return str(Path(outdir) / f"{max(numbers, default=-1) + 1:05d}-{desc}")


# %% tags=["export"]
def _state_seed(resume_state):
    """The seed of the run a training state continues (the data order depends on it), or None."""
    if resume_state is None:
        return None
    seed = json.loads(Path(resume_state[0]).read_text())["options"].get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31 else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(f: dict) -> None:
    """One-line ValueError naming a flag that cannot train: not a number, not finite, out of range."""
    for name, (low, high, open_low) in FLOAT_RANGES.items():
        value = f[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
        if value < low or (open_low and value == low) or (high is not None and value > high):
            bounds = ("(" if open_low else "[") + f"{low}, " + ("inf)" if high is None else f"{high}]")
            raise ValueError(f"{_flag(name)} must be in {bounds}, got {value}")
    for name, (low, high) in INT_RANGES.items():
        value = f[name]
        if value is None and name in ("batch_gpu", "cbase", "seed"):
            continue
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not integer or not low <= value <= (value if high is None else high):
            raise ValueError(f"{_flag(name)} must be an integer in [{low}, {high or 'inf'}], "
                             f"got {value!r}")
    cres = f["cres"]
    if cres is not None and (not isinstance(cres, (list, tuple)) or not cres or not all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in cres)):
        raise ValueError(f"--cres must be a non-empty list of integers >= 1 (1,2,2,2), got {cres!r}")
    if f["desc"] is not None and any(c in str(f["desc"]) for c in "/\\\0"):
        raise ValueError(f"--desc is part of a directory name: no '/', '\\' or NUL, got {f['desc']!r}")


def device_warning(options: dict, device) -> str:
    """Why this configuration cannot train on `device` (--dry-run only prints it), or None. Chapter 7."""
    kind = torch.device(device).type
    if options["network_kwargs"].get("use_fp16") and kind != "cuda":
        return (f"--fp16 needs a CUDA GPU and this machine trains on {kind}: the configuration above is "
                "valid, but a run of it here is refused (on a CPU use --bf16)")
    return None


# %% [markdown]
# **Claiming the run directory.** Two runs started together with the same `--outdir` must not both
# take `00000-…`, and `--nosubdir` must not write into a directory that holds another run (its later
# training states would stay, and a `--resume` of it would continue the wrong run). So the command
# *claims* the run directory before building anything: an exclusive `mkdir` of the next number under
# a lock on `--outdir` (on a collision, the next number), or, with `--nosubdir`, a directory that is
# empty or is the one `--resume` continues; then `log.txt` created exclusively. A place that cannot
# be written (a file, a read-only disk, `/proc`) fails here, in one line, before any work; a run
# that fails later while being built leaves nothing behind.

# %% tags=["export"]
@contextlib.contextmanager
def _dir_lock(directory: Path):
    """An exclusive flock on `directory` while claiming in it (POSIX; elsewhere the mkdir alone)."""
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


def _resumed_dir(resume):
    path = Path(resume)
    return (path if path.is_dir() else path.parent).resolve()


def claim_run_dir(planned, nosubdir: bool, resume=None) -> tuple:
    """Create and claim the run directory build_options planned: (run_dir, log.txt, created). Chapter 7.

    Without --nosubdir, OUTDIR/NNNNN-desc with the number free at the moment of the exclusive mkdir;
    with it, OUTDIR itself, which must be empty unless `resume` continues the run inside it. One-line
    ValueError if it cannot be written or is taken; release_run_dir(created) undoes the claim.
    """
    planned, created = Path(planned), []
    outdir = planned if nosubdir else planned.parent
    in_place = nosubdir and resume is not None and _resumed_dir(resume) == outdir.resolve()
    try:
        if outdir.exists() and not outdir.is_dir():
            raise ValueError(f"--outdir: {outdir} is a file, not a directory")
        created += [d for d in reversed([outdir, *outdir.parents]) if not d.exists()]
        outdir.mkdir(parents=True, exist_ok=True)
        if nosubdir:
            run_dir = outdir
            if not in_place and any(outdir.iterdir()):
                raise ValueError(f"--nosubdir: {outdir} is not empty (it may hold another run): choose "
                                 f"an empty --outdir, or continue the run in it with --resume={outdir}")
        else:
            desc = planned.name.split("-", 1)[1]
            with _dir_lock(outdir):
                for _ in range(1000):
                    run_dir = Path(_pick_run_dir(outdir, desc, False))
                    with contextlib.suppress(FileExistsError):
                        run_dir.mkdir()
                        created.append(run_dir)
                        break
                else:
                    raise ValueError(f"--outdir: could not claim a new run directory in {outdir}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if in_place else os.O_EXCL)
        try:
            log = os.fdopen(os.open(run_dir / "log.txt", flags, 0o666), "a")
        except FileExistsError:
            raise ValueError(f"--outdir: another run has just claimed {run_dir}") from None
        if not in_place:
            created.append(run_dir / "log.txt")
        return run_dir, log, created
    except (ValueError, OSError) as e:
        release_run_dir(created)
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"--outdir: cannot write to {outdir}: {e.strerror or e}") from None


def release_run_dir(created) -> None:
    """Undo claim_run_dir for a run that failed before its work: remove what it created, if empty."""
    for path in reversed([Path(p) for p in created]):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()


# %% [markdown]
# The configuration of the paper's class-conditional CIFAR-10 run, as `--dry-run` prints it,
# needs a data set to open; a few random images in the official folder format stand in for
# CIFAR-10 here (the sizes it records are the only thing that depends on it). **Check** — the
# keys are the official ones, and the values are those of the paper's Table 7 (batch 512,
# learning rate $10^{-3}$, 200 Mimg, EMA half-life 0.5 Mimg, dropout 0.13, augmentation 0.12).

# %%
import json
import tempfile
from pathlib import Path

from PIL import Image

from edm_lit.training import build_options


def tiny_image_folder(root, n=16, resolution=32, channels=3, classes=10, seed=0):
    """n random PNG images and labels in the official folder layout (dataset.json)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(resolution, resolution, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(root / f"img{i:05d}.png")
        labels.append([f"img{i:05d}.png", int(i % classes)])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


scratch = Path(tempfile.mkdtemp(prefix="ch7-"))
fake_cifar = tiny_image_folder(scratch / "cifar10-32x32")
options = build_options(dict(outdir=str(scratch / "runs"), data=str(fake_cifar), cond=True, arch="ddpmpp", seed=0),
                        device="cpu")
print(json.dumps({k: v for k, v in options.items() if k.endswith("_kwargs")}, indent=1)[:1200], "...")
official_keys = {"dataset_kwargs", "data_loader_kwargs", "network_kwargs", "loss_kwargs", "optimizer_kwargs",
                 "augment_kwargs", "total_kimg", "ema_halflife_kimg", "batch_size", "batch_gpu", "loss_scaling",
                 "cudnn_benchmark", "kimg_per_tick", "snapshot_ticks", "state_dump_ticks", "seed", "run_dir"}
assert official_keys <= set(options)
assert (options["batch_size"], options["total_kimg"], options["ema_halflife_kimg"]) == (512, 200_000, 500)
assert options["optimizer_kwargs"]["lr"] == 1e-3 and options["network_kwargs"]["dropout"] == 0.13
assert options["augment_kwargs"]["p"] == 0.12 and options["network_kwargs"]["augment_dim"] == 9
print("extra keys (ours):", sorted(set(options) - official_keys))

# %% [markdown]
# ## 7.2 The order of the data
#
# Every rank must see different images, the ranks together must see the same images as one
# process with the same global batch, and a resumed run must continue at the image where the
# killed one stopped. One construction gives all three. All ranks agree on one **global stream**
# of data-set indices: epoch $e$ is a permutation drawn from a generator seeded with
# $(\text{seed}, e)$, and the stream is the concatenation of the epochs. Position $p$ of the stream
# goes to rank $p \bmod W$ (as in the official loop, the ranks interleave). A step of global batch
# $B$ consumes positions $[\,n, n + B)$ where $n$ is the number of images trained so far — so the
# loader's position *is* the training progress, and resuming at $n$ needs no saved loader state.
# Each rank draws its batch in rounds of `batch_gpu` images (gradient accumulation, §7.4).

# %% tags=["export"]
class ShardedStream(torch.utils.data.Sampler):
    """Data-set indices of one rank: positions p = start + rank, + world_size, ... of a seeded global stream. Chapter 7.

    Epoch e of the global stream is a permutation of range(size) seeded by (seed, e) (or the identity
    when shuffle is False); `start` (a multiple of world_size) is the number of images already trained.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0, shuffle=True):
        if size < 1 or not 0 <= rank < world_size or start < 0 or start % world_size:
            raise ValueError(f"need size >= 1, 0 <= rank < world_size, start a multiple of world_size >= 0; got "
                             f"size={size}, rank={rank}, world_size={world_size}, start={start}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.start, self.shuffle = int(seed), int(start), bool(shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self):
        position, epoch, order = self.start + self.rank, -1, None
        while True:
            e, i = divmod(position, self.size)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield int(order[i])
            position += self.world_size


def make_loader(dataset, batch_gpu: int, rank: int, world_size: int, seed: int, start_nimg: int,
                num_workers: int = 1, pin_memory: bool = False, prefetch_factor: int = 2):
    """An endless iterator of (uint8 images [N,C,H,W], float32 labels [N,L]) batches from position start_nimg. Chapter 7."""
    sampler = ShardedStream(len(dataset), rank, world_size, seed, start_nimg)
    extra = dict(prefetch_factor=prefetch_factor, persistent_workers=True) if num_workers > 0 else {}
    # a private generator: creating the loader must not consume the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, generator=torch.Generator(), **extra)
    return iter(loader)


# %% [markdown]
# **Check** — two ranks together take exactly the positions one rank takes, in the same steps;
# a stream started at position $n$ continues the uninterrupted one; every epoch visits every
# image once.

# %%
from edm_lit.training import ShardedStream


def take(stream, k):
    it = iter(stream)
    return [next(it) for _ in range(k)]


one = take(ShardedStream(10, seed=3), 30)
two = [take(ShardedStream(10, rank=r, world_size=2, seed=3), 15) for r in range(2)]
assert [x for pair in zip(*two) for x in pair] == one
assert take(ShardedStream(10, seed=3, start=12), 18) == one[12:]
assert all(sorted(one[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))
print("global stream:", one[:12], "...\nrank 0:", two[0][:6], " rank 1:", two[1][:6])

# %% [markdown]
# ## 7.3 The schedules: learning-rate ramp-up and EMA
#
# **Learning rate.** The official loop ramps the learning rate linearly from 0 to its value over
# the first `lr_rampup_kimg` = 10 Mimg, then holds it constant — there is no decay; the EMA does
# what a decay would do. The rate of a step is computed from the images seen *before* it, so the
# very first step has rate 0: it only initialises Adam's moment estimates.
#
# **EMA.** After each step the averaged weights move towards the trained ones,
# $\theta_\text{ema} \leftarrow \beta\,\theta_\text{ema} + (1-\beta)\,\theta$. The paper specifies the
# average by its **half-life in images**, $h$ (`--ema`, 0.5 Mimg for CIFAR-10): after $h$ images the
# weight of an old update has halved. With $B$ images per step,
#
# $$\beta = 0.5^{B / h}, \qquad h = \min\!\left(h_\text{target},\; r \cdot n\right),$$
#
# where the ramp-up ratio $r = 0.05$ limits the half-life to 5 % of the images $n$ seen so far —
# early in training a long average would mostly remember the random initialisation. A half-life in
# images makes the EMA independent of the batch size: halving $B$ doubles the steps, and
# $\beta^2$ at half the batch equals $\beta$ at the full one.

# %% tags=["export"]
def learning_rate(base_lr: float, cur_nimg: int, lr_rampup_kimg: float) -> float:
    """The learning rate of a step taken after cur_nimg images: linear ramp-up over lr_rampup_kimg, then flat. Chapter 7."""
    ramp = cur_nimg / max(lr_rampup_kimg * 1000, 1e-8)
    return base_lr * min(ramp, 1.0)


def ema_beta(batch_size: int, cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio=0.05) -> float:
    """EMA decay per step: half-life min(ema_halflife_kimg * 1000, ema_rampup_ratio * cur_nimg) images. Chapter 7."""
    halflife = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife = min(halflife, ema_rampup_ratio * cur_nimg)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """theta_ema <- beta theta_ema + (1 - beta) theta for every parameter. Chapter 7."""
    for p_avg, p in zip(ema.parameters(), net.parameters()):
        p_avg.copy_(p.detach().lerp(p_avg, beta))


# %% [markdown]
# **Check** — the EMA's half-life: one weight that jumps from 0 to 1 and stays there reaches
# ½ in the EMA after $h$ images, whatever the batch size; the ramp-up caps the half-life at 5 %
# of the progress; the learning rate is 0 at the start and reaches its value at the end of the
# ramp-up.

# %%
from edm_lit.training import ema_beta, learning_rate, update_ema

for batch in [16, 100, 500]:
    h_kimg, nimg, w_ema = 100, 10**9, 0.0  # progress far past the ramp-up
    for _ in range(100_000 // batch):
        w_ema = ema_beta(batch, nimg, h_kimg) * w_ema + (1 - ema_beta(batch, nimg, h_kimg)) * 1.0
    print(f"batch {batch:3d}: EMA of a unit step after one half-life = {w_ema:.4f}")
    assert abs(w_ema - 0.5) < 1e-9
assert abs(ema_beta(512, 1_000_000, 500) - 0.5 ** (512 / 50_000)) < 1e-15  # capped at 5 % of 1 Mimg
assert ema_beta(512, 0, 500) == 0.0  # the first step copies the network
assert learning_rate(1e-3, 0, 10_000) == 0 and learning_rate(1e-3, 5_000_000, 10_000) == 5e-4
assert learning_rate(1e-3, 20_000_000, 10_000) == 1e-3
lin, avg = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
before = avg.weight.clone()
update_ema(avg, lin, 0.75)
assert torch.allclose(avg.weight, 0.75 * before + 0.25 * lin.weight)

# %%
nimg = np.linspace(0, 200e6, 400)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot(nimg / 1e6, [learning_rate(1e-3, n, 10_000) for n in nimg])
ax1.set(xlabel="training progress (Mimg)", ylabel="learning rate", title="lr ramp-up (CIFAR-10 recipe)")
halflife = [-512 / math.log2(ema_beta(512, n, 500)) if n else 0 for n in nimg]
ax2.plot(nimg / 1e6, np.array(halflife) / 1e6)
ax2.set(xlabel="training progress (Mimg)", ylabel="EMA half-life (Mimg)", title="EMA half-life with ramp-up ratio 0.05")
plt.tight_layout()

# %% [markdown]
# ## 7.4 One optimiser step
#
# A step trains on `--batch` images in total. Each of the $W$ ranks gets $B/W$ of them and, when
# they do not fit in memory at once, processes them in rounds of `--batch-gpu`, adding up the
# gradients (**gradient accumulation**). Each round's loss is the per-element loss of Chapter 4
# summed over pixels and divided by the rank's $B/W$; DistributedDataParallel averages the
# gradients over the ranks, so the step sees the mean over all $B$ images — exactly what one
# process with the whole batch would compute. Only the last round synchronises (`no_sync` for the
# others), so accumulation costs no extra communication.
#
# **Loss scaling** (`--ls`, 100 for ImageNet in fp16) multiplies the loss, and therefore every
# gradient, by a constant, so that small fp16 gradients do not underflow. The official loop
# never divides it out again: Adam normalises each gradient by its running RMS, so a constant
# factor cancels (up to Adam's $\epsilon$). The **nan/inf guard** replaces NaN gradient entries by 0
# and ±inf by $\pm 10^5$ before the update, so one overflowing batch cannot destroy the weights.
#
# **Precision.** `--fp16` sets the networks' `use_fp16` (Chapter 5: the U-Net runs in fp16 on
# CUDA, the weights and Adam stay fp32). `--bf16`, our addition, runs the forward pass under
# bfloat16 autocast, on a GPU or a CPU; bfloat16 has fp32's exponent range, so it needs no loss
# scaling. **Dropout** (`--dropout`) lives in the network's blocks and is active because the
# trained network is in training mode; the EMA copy is in eval mode.

# %% tags=["export"]
class SigmaProbe:
    """Calls `net` and keeps the sigma it was called with (to sort the loss by noise level). Chapter 7."""

    def __init__(self, net):
        self.net, self.sigma = net, None

    def __call__(self, x, sigma, *args, **kwargs):
        self.sigma = sigma.detach()
        return self.net(x, sigma, *args, **kwargs)


def accumulate_gradients(ddp_net, loss_fn, rounds, loss_scaling: float, per_rank_batch: int,
                         augment_pipe=None, autocast_dtype=None, on_loss=None) -> None:
    """Backpropagate sum(loss) * loss_scaling / per_rank_batch for each (images, labels) round. Chapter 7.

    `rounds` holds images in [-1, 1] and labels on the device; DistributedDataParallel synchronises only
    in the last round. `on_loss(loss, sigma)` sees each round's per-element loss and its sigma [N,1,1,1].
    """
    probe = SigmaProbe(ddp_net)
    for k, (images, labels) in enumerate(rounds):
        last = k == len(rounds) - 1
        sync = contextlib.nullcontext() if (last or not hasattr(ddp_net, "no_sync")) else ddp_net.no_sync()
        cast = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
        with sync:
            with cast:
                loss = loss_fn(net=probe, images=images, labels=labels, augment_pipe=augment_pipe)
            loss = loss.float()
            if on_loss is not None:
                on_loss(loss.detach(), probe.sigma)
            loss.sum().mul(loss_scaling / per_rank_batch).backward()


def sanitize_gradients(params) -> None:
    """Replace NaN gradient entries by 0 and +-inf by +-1e5, in place (the official guard). Chapter 7."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


# %% [markdown]
# **Check** — accumulation: four rounds of 8 images give the gradient of one round of 32 (to
# float32 rounding), with a loss whose randomness is fixed so that both see the same σ and noise;
# a constant loss scale leaves Adam's update unchanged while the gradients are far above
# $\epsilon$ (here gradients of about $10^{-3}$ and the default $\epsilon = 10^{-8}$), and changes it when they are
# not (the same with $\epsilon = 10^{-3}$); the guard
# clears NaN and clamps infinities.

# %%
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond
from edm_lit.training import accumulate_gradients, sanitize_gradients


def small_net(seed=0):
    torch.manual_seed(seed)
    return EDMPrecond(8, 1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[4], dropout=0.0)


class FixedDraws(EDMLoss):
    """EDMLoss whose sigma and noise depend only on the image (a test device, not for training)."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        g = torch.Generator().manual_seed(int(images.sum().item() * 1000) % (1 << 31))
        sigma = (torch.randn(images.shape[0], 1, 1, 1, generator=g) * self.P_std + self.P_mean).exp()
        n = torch.randn(images.shape, generator=g) * sigma
        return self.weight(sigma) * (net(images + n, sigma, labels) - images) ** 2


class PerImage(FixedDraws):
    def __call__(self, net, images, labels=None, augment_pipe=None):  # one image at a time: draws per image
        return torch.cat([super(PerImage, self).__call__(net, im[None], None) for im in images])


images = torch.rand(32, 1, 8, 8) * 2 - 1
grads = []
for rounds in [[(images, None)], [(images[i:i + 8], None) for i in range(0, 32, 8)]]:
    net = small_net()
    accumulate_gradients(net, PerImage(), rounds, loss_scaling=1.0, per_rank_batch=32)
    grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
rel = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
print(f"one round of 32 vs four rounds of 8: relative gradient difference {rel:.1e}")
assert rel < 1e-5

def adam_updates(ls, eps, n_steps=5):
    """Adam on a float64 toy problem whose gradients (about 1e-3) are scaled by `ls`."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, 50, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=1e-3, eps=eps)
    targets = torch.linspace(0, 2, 50, dtype=torch.float64)
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        (1e-3 * (w - targets).square().sum() * ls).backward()
        opt.step()
    return w.detach() - torch.linspace(-1, 1, 50, dtype=torch.float64)


for eps in [1e-8, 1e-3]:
    u1, u100 = adam_updates(1.0, eps), adam_updates(100.0, eps)
    rel = ((u1 - u100).norm() / u1.norm()).item()
    print(f"Adam eps={eps:g}: 5 steps with --ls=1 vs --ls=100, relative difference of the updates {rel:.1e}")
    assert rel < 1e-4 if eps == 1e-8 else rel > 1e-2
p = torch.nn.Parameter(torch.zeros(4))
p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
sanitize_gradients([p])
assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]

# %% [markdown]
# ## 7.5 Files that survive `kill -9`
#
# A run of days will be interrupted: a preempted node, an out-of-memory kill, a power cut. Two
# rules make that harmless.
#
# 1. **Every file appears complete or not at all.** It is written to a temporary name in the same
#    directory, flushed to the disk (`fsync`), then renamed over its final name; a rename within one
#    file system is atomic, so a reader (or the resume logic) never sees half a file. A run killed while
#    writing leaves its temporary file behind; the next start in that directory removes such files
#    (`remove_stale_temp_files`).
# 2. **The state is everything the future depends on.** The training state holds the trained
#    network, the EMA, Adam's moments and step counts, the progress (images, ticks), the random
#    number generators of every rank (torch CPU and CUDA, numpy, Python) — and nothing else is
#    needed: the data order is a function of the progress (§7.2), the loss scale is a constant of
#    the configuration.
#
# The state is a `training-state-NNNNNN.safetensors` file with every tensor (no pickle: loading it
# runs no code) and a `training-state-NNNNNN.json` with the rest and the SHA-256 of the tensors,
# written second: a state is complete when its JSON exists and the hash matches. Network
# snapshots use the format of Appendix A2 (`network-snapshot-NNNNNN.json` + `.safetensors`, loaded by
# `edm_lit.checkpoints.load_network`); `NNNNNN` is the progress in kimg, as in the official names.
# Each snapshot comes with a grid of samples from the EMA (`samples-NNNNNN.png`, 18 Heun steps of
# Chapter 3), drawn from a fixed noise with a private generator, so that making it does not change
# the training's random stream.

# %% tags=["export"]
from edm_lit.files import (fsync_dir, image_grid, png_bytes,  # Appendix A3
                           remove_stale_temp_files, write_atomic)

STATE_FORMAT = "edm_lit-training-state"
STATE_VERSION = 1


# %% [markdown]
# The training state is a flat dictionary of tensors — `net.*`, `ema.*`, Adam's `optimizer.I.NAME`
# and each rank's generator states `rng.R.torch` / `rng.R.cuda` — and a JSON header for everything
# that is not a tensor. `load_training_state` checks, before touching the network, that the state was
# made by the same architecture (the `network_config` of Appendix A2) and raises a `ValueError` that
# names the difference otherwise.

# %% tags=["export"]
def _json_safe(value):
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
    """(tensors, json) of every random generator this process draws from: torch (and CUDA), numpy, Python."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": _json_safe(random.getstate())}
    return tensors, info


def restore_rng(tensors: dict, info: dict, device) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def state_path(run_dir, kimg: int) -> Path:
    """run_dir/training-state-{kimg:06d}.json (the header; its tensors sit beside it in .safetensors)."""
    return Path(run_dir) / f"training-state-{kimg:06d}.json"


def save_training_state(path, *, net, ema, optimizer, progress: dict, options: dict, rng: list) -> Path:
    """Write the training state atomically: PATH.safetensors (tensors), then PATH.json (header, hash). Chapter 7.

    `rng` is one (tensors, json) pair per rank (`capture_rng`); `progress` holds cur_nimg and cur_tick.
    """
    from safetensors.torch import save as safetensors_bytes

    from edm_lit.checkpoints import network_config

    header_path = Path(path).with_suffix(".json")
    tensors_path = header_path.with_suffix(".safetensors")
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = optimizer.state_dict()
    opt_scalars = {}
    for index, entry in opt_state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                opt_scalars[f"{index}.{name}"] = value
    for rank, (rng_tensors, _) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rng_tensors.items()})
    data = safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    write_atomic(tensors_path, data)
    header = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **progress,
              "world_size": len(rng), "network": _json_safe(network_config(net)),
              "optimizer_param_groups": _json_safe(opt_state["param_groups"]), "optimizer_scalars": opt_scalars,
              "rng": [info for _, info in rng], "options": _json_safe(options),
              "tensors": tensors_path.name, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    return write_atomic(header_path, (json.dumps(header, indent=1) + "\n").encode())


def read_training_state(path) -> tuple:
    """(header dict, tensors dict) of a complete training state; ValueError if missing, truncated or altered."""
    from safetensors.torch import load as safetensors_load

    header_path = Path(path).with_suffix(".json")
    try:
        header = json.loads(header_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no training state at {header_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{header_path} is not a complete training state: {e}") from None
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
        raise ValueError(f"{tensors_path} does not match the SHA-256 in {header_path} (truncated or replaced)")
    try:
        return header, safetensors_load(data)
    except Exception as e:  # the library's own validation of the file
        raise ValueError(f"{tensors_path} is not a readable safetensors file: {e}") from None


# The header's entries and their JSON types: anything else is not a state this code wrote.
STATE_HEADER = {"cur_nimg": int, "cur_tick": int, "world_size": int, "network": dict,
                "optimizer_param_groups": list, "optimizer_scalars": dict, "rng": list, "options": dict,
                "tensors": str, "tensors_sha256": str}


def _check_header(header: dict, header_path) -> None:
    for key, kind in STATE_HEADER.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ValueError(f"{header_path} is not a valid training state: {key!r} must be a JSON "
                             f"{kind.__name__}, got {str(header.get(key))[:40]!r}")
    name, progress = header["tensors"], min(header["cur_nimg"], header["cur_tick"])
    if progress < 0 or len(header["rng"]) != header["world_size"] or Path(name).name != name \
            or not name.endswith(".safetensors"):
        raise ValueError(f"{header_path} is not a valid training state (negative progress, rng entries "
                         "not matching world_size, or tensors not a bare .safetensors name)")


def find_training_state(path) -> tuple:
    """(header path, cur_nimg) of a training state given by file, or the latest complete one in a run directory."""
    path = Path(path)
    if path.is_dir():
        numbered = [(int(m[1]), p) for p in path.glob("training-state-*.json")
                    if (m := re.fullmatch(r"training-state-(\d+)\.json", p.name))]
        for _, candidate in sorted(numbered, reverse=True):  # by number: names grow past 999,999 kimg
            try:
                header, _ = read_training_state(candidate)
            except ValueError:
                continue  # incomplete (the run was killed while writing it) or not a state of ours
            return candidate, header["cur_nimg"]
        raise ValueError(f"--resume: {path} holds no complete training-state-*.json")
    if not re.fullmatch(r"training-state-\d+\.(json|safetensors)", path.name):
        raise ValueError(f"--resume must be a run directory or a training-state-NNNNNN.json of a previous run, got {path}")
    header, _ = read_training_state(path)
    return path.with_suffix(".json"), int(header["cur_nimg"])


def _match_layouts(optimizer) -> None:
    """Give each loaded optimizer tensor its parameter's memory layout (channels_last), as in a fresh run:
    a fused kernel walks both in memory order."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_training_state(path, *, net, ema, optimizer, rank: int, world_size: int, device) -> dict:
    """Restore net, EMA, optimizer and this rank's RNG from a training state; returns its header. Chapter 7."""
    from edm_lit.checkpoints import network_config

    header, tensors = read_training_state(path)
    ours = _json_safe(network_config(net))
    if header["network"] != ours:
        theirs = header["network"]
        kwargs = theirs.get("init_kwargs") if isinstance(theirs.get("init_kwargs"), dict) else {}
        diff = sorted(k for k in set(ours["init_kwargs"]) | set(kwargs)
                      if ours["init_kwargs"].get(k) != kwargs.get(k))
        raise ValueError(f"--resume: {path} was trained with a different network ({theirs.get('class_name')} vs "
                         f"{ours['class_name']}; differing arguments: {diff})")
    try:  # a state that passed the checks above but does not fit: one line, not a traceback
        for prefix, module in [("net.", net), ("ema.", ema)]:
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
        opt_state = {"state": {}, "param_groups": header["optimizer_param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                opt_state["state"].setdefault(int(index), {})[name] = value
        for key, value in header["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            opt_state["state"].setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(opt_state)
        _match_layouts(optimizer)
        if header["world_size"] == world_size:
            rank_tensors = {k.split(".", 2)[2]: v for k, v in tensors.items()
                            if k.startswith(f"rng.{rank}.")}
            restore_rng(rank_tensors, header["rng"][rank], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise ValueError(f"--resume: {path} cannot be restored "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    return header


# %% [markdown]
# ## 7.6 Statistics in the official layout
#
# Every `--tick` kimg the loop writes one line to `stats.jsonl`. The official layout is kept: each
# statistic is a name such as `Loss/loss` or `Timing/sec_per_kimg` mapped to `{"num", "mean",
# "std"}` over the tick and over all ranks (`Loss/loss` over every pixel of every image), plus a
# `timestamp`, so a script that plots official runs plots ours. We add the loss per σ bucket
# (`Loss/sigma_LO_HI`, per image), which §7.9 compares with the floor. The collector keeps the
# count, sum and sum of squares of each statistic on the device — the σ buckets in one preallocated
# table, filled with `index_add_` at the rows `torch.bucketize` finds, so that no step waits for the
# GPU; at the tick these are summed over the ranks (one `all_reduce`) and turned into means and
# standard deviations. Every line is strict JSON: a non-finite value (a diverged loss) is written as
# `null`, and a statistic that cannot be measured (the process's memory, without `psutil`) is left
# out.

# %% tags=["export"]
SIGMA_BUCKETS = (0.002, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0)  # edges of the Loss/sigma_LO_HI statistics


class Stats:
    """Running count, sum and sum of squares per statistic; reduced over ranks at each tick. Chapter 7.

    Nothing here waits for the device: the moments stay on it until `collect` (once per tick).
    """

    def __init__(self, device):
        self.device, self.moments = torch.device(device), {}
        self.bucket_rows = {f"Loss/sigma_{lo:g}_{hi:g}": i + 1 for i, (lo, hi) in
                            enumerate(zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]))}
        # row 0: below the first edge, row len(SIGMA_BUCKETS): at or above the last (not reported)
        self.buckets = torch.zeros(len(SIGMA_BUCKETS) + 1, 3, dtype=torch.float64, device=self.device)
        self.edges = {}  # the bucket edges in each dtype sigma comes in, on the device (made once)

    def add(self, name: str, values) -> None:
        values = torch.as_tensor(values).detach().to(self.device, torch.float64).flatten()
        m = self.moments.setdefault(name, torch.zeros(3, dtype=torch.float64, device=self.device))
        m += torch.stack([values.new_full([], values.numel()), values.sum(), values.square().sum()])

    def add_loss(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """Loss/loss over all elements, and the per-image mean loss under its sigma bucket [lo, hi)."""
        self.add("Loss/loss", loss)
        per_image = loss.detach().mean(dim=(1, 2, 3)).to(self.device, torch.float64)
        sigma = sigma.detach().flatten().to(self.device)
        if sigma.dtype not in self.edges:
            self.edges[sigma.dtype] = torch.tensor(SIGMA_BUCKETS, dtype=sigma.dtype, device=self.device)
        row = torch.bucketize(sigma, self.edges[sigma.dtype], right=True)  # e[row-1] <= sigma < e[row]
        values = torch.stack([torch.ones_like(per_image), per_image, per_image.square()], dim=1)
        self.buckets.index_add_(0, row, values)

    def collect(self, names_everywhere) -> dict:
        """{name: {num, mean, std}} over all ranks since the last call (same `names_everywhere` on every rank)."""
        names = sorted(names_everywhere)
        zero = torch.zeros(3, dtype=torch.float64, device=self.device)

        def moments(name):
            m = self.moments.get(name, zero)
            return m + self.buckets[self.bucket_rows[name]] if name in self.bucket_rows else m
        table = torch.stack([moments(n) for n in names]) if names else zero.new_zeros(0, 3)
        if torch.distributed.is_initialized() and names:
            torch.distributed.all_reduce(table)
        self.moments = {}
        self.buckets.zero_()
        out = {}
        for name, (num, total, squares) in zip(names, table.tolist()):
            if num > 0:
                mean = total / num
                out[name] = {"num": num, "mean": mean, "std": math.sqrt(max(squares / num - mean**2, 0.0))}
        return out


def stat_names() -> list:
    """Every statistic a rank may report during a tick (all ranks reduce the same list)."""
    return ["Loss/loss"] + [f"Loss/sigma_{lo:g}_{hi:g}" for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])]


def scalar_stat(value: float) -> dict:
    """A value reported once (by rank 0), in the {num, mean, std} layout."""
    return {"num": 1.0, "mean": float(value), "std": 0.0}


# %% [markdown]
# **Check** — the reduction gives the mean and standard deviation of all values reported,
# and every σ lands in at most one bucket.

# %%
from edm_lit.training import Stats

stats = Stats(torch.device("cpu"))
values = torch.randn(1000)
stats.add("Loss/loss", values[:300])
stats.add("Loss/loss", values[300:])
row = stats.collect(["Loss/loss"])["Loss/loss"]
assert row["num"] == 1000 and abs(row["mean"] - values.double().mean()) < 1e-12
assert abs(row["std"] - values.double().std(unbiased=False)) < 1e-9
stats.add_loss(torch.ones(4, 1, 2, 2), torch.tensor([0.01, 0.5, 0.5, 50.0]).reshape(4, 1, 1, 1))
print({k: v["num"] for k, v in stats.collect(stat_names()).items()})
g = torch.Generator().manual_seed(0)  # against the buckets' definition, by boolean masks
sigma, loss = (torch.randn(256, generator=g) * 2 - 1).exp(), torch.rand(256, 1, 2, 2, generator=g)
stats.add_loss(loss, sigma.reshape(-1, 1, 1, 1))
got = stats.collect(stat_names())
for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
    inside, row = (sigma >= lo) & (sigma < hi), got[f"Loss/sigma_{lo:g}_{hi:g}"]
    assert row["num"] == inside.sum()
    assert abs(row["mean"] - loss.mean((1, 2, 3))[inside].double().mean()) < 1e-12

# %% [markdown]
# ## 7.7 The loop
#
# `TrainingRun` puts the pieces together. Its constructor builds the data stream, the network
# (with the data set's resolution, channels and label dimension), its EMA copy, Adam and the
# augmentation, and, when asked, restores a training state or transfers weights; `run()` then
# repeats *step, maintenance* until the duration is reached. The maintenance happens at the
# first step and then every `--tick` kimg: statistics to `stats.jsonl` and the progress bar,
# every `--snap` ticks a network snapshot and a sample grid, every `--dump` ticks a training
# state (and always at the end).
#
# **Seeds.** Rank $r$ of $W$ seeds numpy with $(\text{seed} \cdot W + r) \bmod 2^{31}$ and torch
# with a number drawn from that numpy generator, as the official loop does: every rank draws
# different σ, noise, augmentations and dropout masks, and the run is reproducible. (Python's `random`,
# which the loop never draws from, gets numpy's seed too: every generator in the state is then a function
# of the seed.) The initial
# weights are drawn from the seed alone (the official loop draws them from rank 0's generator,
# which depends on the number of ranks), so that a run on one process and on several start alike.
#
# **Several processes.** Under `torchrun` (the environment names `WORLD_SIZE`), `init_distributed`
# joins the process group — NCCL on CUDA (one GPU per local rank), Gloo on a CPU — and the network
# is wrapped in `DistributedDataParallel`. Only rank 0 writes files; all ranks take part in the
# reductions and in gathering the generator states for the training state. The command shares an
# error of any rank with all of them before going on (`agree_on_error`: the run directory exists, the
# `--transfer` source does not fit), so all ranks exit together instead of one waiting for the others
# forever; `--data=digits` is built once per node, by its local rank 0, while the others wait.
#
# **Crash order.** At a tick, one line is appended to `stats.jsonl` (written, then `fsync`ed; the
# file is never rewritten, so a tick costs as much at the end of a long run as at its start), then
# the snapshot, then the state. A kill leaves complete lines (at most a partial last one, from a
# kill inside the write). A run resumed in its own directory keeps the lines up to its state,
# rewriting that prefix once, atomically, then appends: the file reads as if the run had never
# stopped.
#
# **Divergence.** The nan/inf guard absorbs a batch whose loss overflows. It cannot absorb weights
# that are no longer finite (too large a learning rate, a broken network), and it hides a loss that is
# never finite any more (it zeroes every gradient): either way the run would train on, learning
# nothing. So each step counts, on the device, its finite losses and the progress of the first
# non-finite one (no host sync), and each tick checks, *before* writing anything, that the weights
# are finite and that some loss of the tick was (for ticks of several steps): if not, the run stops
# with `TrainingDiverged` (the command exits 1), and the snapshots and states on disk are the last
# good ones.

# %% tags=["export"]
class TrainingDiverged(RuntimeError):
    """The weights became non-finite: the run stopped before writing the tick (exit 1). Chapter 7."""


def seed_rank(seed: int, rank: int, world_size: int) -> None:
    """numpy from (seed * world_size + rank) mod 2^31, torch from numpy's first draw (official per-rank seeds).

    Python's `random` (which the loop does not draw from) gets the same seed, so that every generator the
    training state records is a function of the seed."""
    np.random.seed((seed * world_size + rank) % (1 << 31))
    random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))


def _memory_gb():
    """Resident memory of this process in GiB, or None without psutil (the statistic is then left out)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _finite_or_null(value):
    """Non-finite floats -> None, so that every stats.jsonl line is strict JSON (no NaN, no Infinity)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# %% tags=["export"]
class TrainingRun:
    """The paper's training loop over one configuration (`build_options`): one CPU, one GPU or torchrun. Chapter 7.

    Construct, then `run()`. Only rank 0 writes to run_dir (None: write nothing). `log` receives
    status lines; `progress_bar` shows tqdm's bar (kimg, sec/kimg, ETA) on rank 0.
    """

    def __init__(self, run_dir=".", dataset_kwargs=None, data_loader_kwargs=None, network_kwargs=None,
                 loss_kwargs=None, optimizer_kwargs=None, augment_kwargs=None, seed=0, batch_size=512,
                 batch_gpu=None, total_kimg=200000, ema_halflife_kimg=500, ema_rampup_ratio=0.05,
                 lr_rampup_kimg=10000, loss_scaling=1, kimg_per_tick=50, snapshot_ticks=50, state_dump_ticks=500,
                 resume_pkl=None, resume_state_dump=None, resume_kimg=0, cudnn_benchmark=True, device=None,
                 autocast_dtype=None, grid_images=64, grid_steps=18, log=None, progress_bar=False,
                 loss_fn=None, dataset=None, channels_last=False, torch_compile=False):
        if device is None:
            self.rank, self.world_size, device = init_distributed()
        else:
            self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.device = device = torch.device(device)
        if network_kwargs.get("use_fp16") and device.type != "cuda":
            raise ValueError("use_fp16 (--fp16) needs a CUDA device")
        self.run_dir = Path(run_dir) if (run_dir is not None and self.rank == 0) else None
        self.log = log if self.rank == 0 else None
        self.progress_bar = progress_bar and self.rank == 0
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.batch_gpu, self.rounds = split_batch(self.batch_size, self.world_size, batch_gpu)
        self.per_rank_batch = self.batch_gpu * self.rounds
        self.total_nimg = int(total_kimg) * 1000
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.lr_rampup_kimg, self.loss_scaling = lr_rampup_kimg, float(loss_scaling)
        self.kimg_per_tick, self.snapshot_ticks, self.state_dump_ticks = kimg_per_tick, snapshot_ticks, state_dump_ticks
        self.autocast_dtype = getattr(torch, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype
        self.grid_images, self.grid_steps = int(grid_images), int(grid_steps)
        self.options = dict(run_dir=None if run_dir is None else str(run_dir), dataset_kwargs=dataset_kwargs,
                            network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, optimizer_kwargs=optimizer_kwargs,
                            augment_kwargs=augment_kwargs, seed=seed, batch_size=batch_size, batch_gpu=batch_gpu,
                            total_kimg=total_kimg, ema_halflife_kimg=ema_halflife_kimg,
                            ema_rampup_ratio=ema_rampup_ratio, lr_rampup_kimg=lr_rampup_kimg,
                            loss_scaling=loss_scaling, channels_last=channels_last,
                            torch_compile=torch_compile)
        self.channels_last = bool(channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
            torch.backends.cudnn.allow_tf32 = False  # the paper trains in true fp32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        seed_rank(self.seed, self.rank, self.world_size)

        # data, network, EMA, loss, optimizer, augmentation
        self.dataset = dataset if dataset is not None else construct(**dataset_kwargs)
        self.loader_kwargs = dict(data_loader_kwargs or {})
        if device.type != "cuda":
            self.loader_kwargs["pin_memory"] = False
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only, not on the ranks
            torch.manual_seed(self.seed)
            self.net = construct(**network_kwargs, img_resolution=self.dataset.resolution,
                                 img_channels=self.dataset.num_channels, label_dim=self.dataset.label_dim)
        self.net.train().requires_grad_(True).to(device)
        if self.channels_last:  # the 4-D weights; the images follow in _next_rounds
            self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.loss_fn = loss_fn if loss_fn is not None else construct(**(loss_kwargs or {"class_name": "edm_lit.loss.EDMLoss"}))
        optimizer_kwargs = dict(optimizer_kwargs or {"class_name": "torch.optim.Adam", "lr": 1e-3})
        self.base_lr = float(optimizer_kwargs["lr"])
        self.optimizer = construct(params=self.net.parameters(), **optimizer_kwargs)
        self.augment_pipe = construct(**augment_kwargs) if augment_kwargs else None
        self.ddp = self.net
        if self.world_size > 1:
            # DDP warns at every backward when a gradient's memory layout differs from its bucket's (harmless:
            # it copies); one line per step per rank would drown the log
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if torch_compile:
            self.net.compile()  # in place, after the EMA copy: the state_dict keeps its names

        self.cur_nimg, self.cur_tick = int(resume_kimg) * 1000, 0
        self.stats_lines = []  # the lines a resumed run keeps; None once stats.jsonl is (re)started
        self.last_snapshot = None
        if resume_pkl is not None:
            self._transfer(resume_pkl)
        if resume_state_dump is not None:
            header = load_training_state(resume_state_dump, net=self.net, ema=self.ema, optimizer=self.optimizer,
                                         rank=self.rank, world_size=self.world_size, device=device)
            self.cur_nimg, self.cur_tick = int(header["cur_nimg"]), int(header["cur_tick"])
            self.exact_resume = header["world_size"] == self.world_size
            if not self.exact_resume:  # the generators of a different number of ranks cannot be mapped
                seed_rank(self.seed + self.cur_nimg, self.rank, self.world_size)
            self._keep_stats_until(Path(resume_state_dump).parent)
        self.tick_start_nimg = self.cur_nimg
        self.stats = Stats(device)
        # on the device: the progress at the first non-finite loss (-1: none yet), finite rounds this tick
        self.first_nonfinite = torch.full([], -1, dtype=torch.int64, device=device)
        self.finite_rounds = torch.zeros([], dtype=torch.int64, device=device)
        self.batches = make_loader(self.dataset, self.batch_gpu, self.rank, self.world_size, self.seed, self.cur_nimg,
                                   **self.loader_kwargs)
        self.grid_latents = None

    def _transfer(self, source) -> None:
        """Start from the weights of a snapshot (ours or an official .pkl, loaded safely): net and EMA."""
        from edm_lit.checkpoints import load_network

        src = load_network(source)
        theirs, ours = src.state_dict(), self.net.state_dict()
        bad = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
        if bad or not set(theirs) & set(ours):
            raise ValueError(f"--transfer: {source} does not fit this network (mismatched tensors: {bad[:5]})")
        broken = [k for k, v in theirs.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(f"--transfer: {source} holds non-finite weights (NaN/inf in {broken[:3]})")
        common = {k: v for k, v in theirs.items() if k in ours}
        self.net.load_state_dict(common, strict=False)
        self.ema.load_state_dict(common, strict=False)

    def _keep_stats_until(self, source_dir: Path) -> None:
        """Resuming into the run's own directory: keep the statistics lines up to the resumed progress."""
        if self.run_dir is None or Path(source_dir).resolve() != self.run_dir.resolve():
            return
        path = self.run_dir / "stats.jsonl"
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row["Progress/kimg"]["mean"] * 1000 > self.cur_nimg + 0.5:
                    break
                self.stats_lines.append(line)

    # one step
    def _next_rounds(self) -> list:
        rounds = []
        for _ in range(self.rounds):
            images, labels = next(self.batches)  # uint8 (a quarter of float32), converted on the device
            images = images.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rounds.append((images, labels.to(self.device, non_blocking=True)))
        return rounds

    def _on_loss(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """Statistics of a round's loss, and the progress of the first non-finite one (on the device)."""
        self.stats.add_loss(loss, sigma)
        finite = torch.isfinite(loss).all()
        self.finite_rounds += finite
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~finite, self.cur_nimg,
                                           self.first_nonfinite)

    def step(self) -> None:
        """One optimiser step on `batch_size` images (all ranks, all rounds), then the EMA update."""
        self.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(self.ddp, self.loss_fn, self._next_rounds(), self.loss_scaling, self.per_rank_batch,
                             self.augment_pipe, self.autocast_dtype, on_loss=self._on_loss)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.base_lr, self.cur_nimg, self.lr_rampup_kimg)
        sanitize_gradients(self.net.parameters())
        self.optimizer.step()
        beta = ema_beta(self.batch_size, self.cur_nimg, self.ema_halflife_kimg, self.ema_rampup_ratio)
        update_ema(self.ema, self.net, beta)
        self.cur_nimg += self.batch_size

    # maintenance
    def _tick_due(self, done: bool) -> bool:
        return done or self.cur_tick == 0 or self.cur_nimg >= self.tick_start_nimg + self.kimg_per_tick * 1000

    def sample_grid(self) -> torch.Tensor:
        """EMA samples from fixed noise and labels (18 Heun steps, Chapter 3), with a private generator."""
        from edm_lit.samplers import edm_sampler

        net, n = self.ema, self.grid_images
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        shape = [n, net.img_channels, net.img_resolution, net.img_resolution]
        latents = torch.randn(shape, generator=g, device=self.device, dtype=torch.float64)
        labels = None
        if net.label_dim:
            labels = torch.eye(net.label_dim, device=self.device)[torch.arange(n, device=self.device) % net.label_dim]
        with torch.no_grad():
            return edm_sampler(net, latents, labels, num_steps=self.grid_steps,
                               randn_like=lambda x: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype))

    def _write_stats(self, row: dict) -> None:
        """Append one line to stats.jsonl; a process's first line starts the file anew (atomically)."""
        line = json.dumps(_finite_or_null(row), allow_nan=False) + "\n"
        if self.stats_lines is not None:  # the kept lines of a resumed run (or none) and this one
            kept = "".join(k + "\n" for k in self.stats_lines)
            write_atomic(self.run_dir / "stats.jsonl", (kept + line).encode())
            self.stats_lines = None
            return
        with open(self.run_dir / "stats.jsonl", "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def check_finite(self) -> None:
        """Raise TrainingDiverged if the weights are no longer finite, or no loss of a tick of several
        steps was (then the guard keeps zeroing every gradient). One host sync, at each tick."""
        params = [p for module in (self.net, self.ema) for p in module.parameters()]
        broken = torch.stack([torch.isfinite(p).all() for p in params]).all().logical_not()
        status = torch.stack([broken.to(torch.int64), self.finite_rounds])
        if torch.distributed.is_initialized():  # any rank's broken weights, any rank's finite loss
            torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
        broken, finite_rounds, first = torch.cat([status, self.first_nonfinite[None]]).tolist()
        self.finite_rounds.zero_()
        steps = (self.cur_nimg - self.tick_start_nimg) // self.batch_size
        if not broken and (finite_rounds > 0 or steps < 2):
            return
        what = ("the weights are no longer finite" if broken else
                f"no loss of the last {steps} steps was finite (the guard zeroes every gradient)")
        loss = f"; the first non-finite loss was at kimg {first / 1e3:g}" if first >= 0 else ""
        last = f" (last snapshot: {self.last_snapshot})" if self.last_snapshot else ""
        raise TrainingDiverged(
            f"training diverged at kimg {self.cur_nimg / 1e3:g}: {what}{loss}. Stopped before writing "
            f"this tick, so the files on disk are from before it{last}. Lower --lr, or check the "
            "--transfer network")

    def _snapshot(self, kimg: int) -> None:
        from edm_lit.checkpoints import save_network

        stem = self.run_dir / f"network-snapshot-{kimg:06d}"
        for path in save_network(self.ema, stem):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self.run_dir)
        self.last_snapshot = stem.name + ".json"
        if self.grid_images > 0:
            images = self.sample_grid()
            columns = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
            write_atomic(self.run_dir / f"samples-{kimg:06d}.png", png_bytes(image_grid(images, columns)))

    def maintenance(self, done: bool, timing: dict) -> dict:
        """The tick: finiteness check, statistics, log line, snapshot, state dump. Returns the row."""
        self.check_finite()  # before anything is written
        now = time.time()
        row = self.stats.collect(stat_names())
        tick_sec = now - timing["tick_start"]
        fields = {"Progress/tick": self.cur_tick, "Progress/kimg": self.cur_nimg / 1e3,
                  "Timing/total_sec": now - timing["start"], "Timing/sec_per_tick": tick_sec,
                  "Timing/sec_per_kimg": tick_sec / max(self.cur_nimg - self.tick_start_nimg, 1) * 1e3,
                  "Timing/maintenance_sec": timing["maintenance"]}
        if (memory := _memory_gb()) is not None:
            fields["Resources/cpu_mem_gb"] = memory
        if self.device.type == "cuda":
            fields["Resources/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            fields["Resources/peak_gpu_mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats()
        row.update({k: scalar_stat(v) for k, v in fields.items()})
        row["timestamp"] = now
        kimg = self.cur_nimg // 1000
        if self.log is not None:
            loss = row.get("Loss/loss", {}).get("mean", float("nan"))
            self.log(f"tick {self.cur_tick:<5d} kimg {self.cur_nimg / 1e3:<9.1f} loss {loss:<8.4f} "
                     f"sec/tick {tick_sec:<7.1f} sec/kimg {fields['Timing/sec_per_kimg']:<7.2f} "
                     f"maintenance {timing['maintenance']:<6.1f} cpumem {fields.get('Resources/cpu_mem_gb', float('nan')):<6.2f}")
        if self.run_dir is not None:
            self._write_stats(row)
            if self.snapshot_ticks and (done or self.cur_tick % self.snapshot_ticks == 0):
                self._snapshot(kimg)
        dump = self.state_dump_ticks and (done or self.cur_tick % self.state_dump_ticks == 0) and self.cur_tick != 0
        if dump:
            rng = gather(capture_rng(self.device), self.world_size)  # every rank takes part
            if self.run_dir is not None:
                save_training_state(state_path(self.run_dir, kimg), net=self.net, ema=self.ema,
                                    optimizer=self.optimizer, options=self.options, rng=rng,
                                    progress={"cur_nimg": self.cur_nimg, "cur_tick": self.cur_tick + 1})
        return row

    def run(self) -> torch.nn.Module:
        """Train until total_kimg; returns the EMA network."""
        from tqdm import tqdm

        if self.run_dir is not None and self.run_dir.is_dir():
            remove_stale_temp_files(self.run_dir)  # left by a run killed while writing
        start = time.time()
        timing = {"start": start, "tick_start": start, "maintenance": 0.0}
        last_nimg = -(-self.total_nimg // self.batch_size) * self.batch_size  # progress after the final step
        bar = tqdm(total=last_nimg, initial=self.cur_nimg, unit="kimg", unit_scale=1e-3, disable=not self.progress_bar,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed} elapsed, ETA {remaining}{postfix}]")
        done = self.cur_nimg >= self.total_nimg
        with contextlib.closing(bar):
            while not done:
                self.step()
                bar.update(self.batch_size)
                done = self.cur_nimg >= self.total_nimg
                if not self._tick_due(done):
                    continue
                tick_end = time.time()
                row = self.maintenance(done, timing)
                bar.set_postfix_str(f"{row['Timing/sec_per_kimg']['mean']:.2f} sec/kimg")
                self.cur_tick += 1
                self.tick_start_nimg = self.cur_nimg
                timing["tick_start"] = time.time()
                timing["maintenance"] = timing["tick_start"] - tick_end
        return self.ema


def training_loop(**options) -> torch.nn.Module:
    """Run `TrainingRun(**options)` (the keyword arguments of training_options.json); returns the EMA. Chapter 7."""
    return TrainingRun(**options).run()


# %% [markdown]
# A first run, small enough for a cell: a stand-in data set of 64 random 8×8 greyscale images in
# the official interface (`dataset[i]` is a uint8 CHW image and a float32 label), the tiny
# network, 2 kimg. **Check** — the files of a run appear: statistics with one line per tick, a
# snapshot that `load_network` reads back equal to the EMA, a sample grid, a complete state.

# %%
from edm_lit.checkpoints import load_network
from edm_lit.training import TrainingRun, read_training_state


class RandomImages(torch.utils.data.Dataset):
    """n random uint8 images [C, R, R], no labels: the official data-set interface, nothing more."""

    def __init__(self, n=64, channels=1, resolution=8, seed=0):
        self.images = np.random.default_rng(seed).integers(0, 256, (n, channels, resolution, resolution), dtype=np.uint8)
        self.name, self.resolution, self.num_channels, self.label_dim, self.has_labels = "random", resolution, channels, 0, False

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].copy(), np.zeros([0], dtype=np.float32)


first_run = scratch / "first-run"
tiny = dict(ARCH_PRESETS["ddpmpp-tiny"], class_name="edm_lit.precond.EDMPrecond", dropout=0.0, use_fp16=False)
inodes = []  # stats.jsonl at each tick: the same file, appended to


def log(line):
    print(line)
    if (first_run / "stats.jsonl").exists():
        inodes.append((first_run / "stats.jsonl").stat().st_ino)


run = TrainingRun(run_dir=first_run, dataset=RandomImages(), network_kwargs=tiny, batch_size=32, total_kimg=2,
                  kimg_per_tick=1, snapshot_ticks=1, state_dump_ticks=2, lr_rampup_kimg=0, ema_halflife_kimg=0.5,
                  grid_images=16, grid_steps=6, device=MODE.device, log=log,
                  data_loader_kwargs=dict(num_workers=0))
ema = run.run()
assert len(inodes) == 2 and {(first_run / "stats.jsonl").stat().st_ino} == set(inodes)
print(sorted(p.name for p in first_run.iterdir()))
lines = (first_run / "stats.jsonl").read_text().splitlines()
assert len(lines) == 3 and {"Loss/loss", "Progress/kimg", "Timing/sec_per_kimg", "timestamp"} <= set(json.loads(lines[-1]))
snap = load_network(first_run / "network-snapshot-000002.json")
assert all(torch.equal(a, b.cpu()) for a, b in zip(snap.state_dict().values(),
                                                   ema.state_dict().values()))
header, tensors = read_training_state(first_run / "training-state-000002.json")
assert header["cur_nimg"] == 2016 and (first_run / "samples-000002.png").read_bytes()[:4] == b"\x89PNG"

# %% [markdown]
# **Check** — divergence: with a loss that is never finite the guard zeroes every gradient, and the run
# stops at the first tick of several steps, before writing it: only the snapshot of tick 0 is on disk.

# %%
from edm_lit.training import TrainingDiverged


class NeverFinite(EDMLoss):
    def __call__(self, net, images, labels=None, augment_pipe=None):
        return super().__call__(net, images, labels, augment_pipe) * float("nan")


diverging = TrainingRun(run_dir=scratch / "diverging", dataset=RandomImages(), network_kwargs=tiny,
                        loss_fn=NeverFinite(), batch_size=32, total_kimg=1, kimg_per_tick=0.25, grid_images=0,
                        device=MODE.device, data_loader_kwargs=dict(num_workers=0))
try:
    diverging.run()
    raise AssertionError("the run did not stop")
except TrainingDiverged as e:
    print(e)
assert [p.name for p in (scratch / "diverging").glob("*.json")] == ["network-snapshot-000000.json"]

# %% [markdown]
# ## 7.8 The command line
#
# `python -m edm_lit.train` (and `edm-lit train`, Appendix A1) takes the official flags — the same
# names, meanings and defaults, booleans written `--cond=1` as there — plus four of ours: `--bf16`
# (bfloat16 autocast), `--lr-rampup` (the ramp-up in Mimg, officially fixed at 10), `--grid` (images
# in each snapshot's sample grid, 0 for none), and `--data=digits` for the quick data set of
# Chapter 6. `--resume` takes a `training-state-NNNNNN.json` or a run directory (its latest complete state);
# without `--seed` it keeps the seed of the run it continues (the data order depends on it). The
# same command runs on one CPU, one GPU, or under `torchrun` on many. The paper's runs, unchanged —
# CIFAR-10 class-conditional DDPM++ on 8 GPUs; FFHQ and AFHQv2 64×64 (unconditional); ImageNet 64×64
# with ADM on 32 GPUs over 4 nodes through torchrun's rendezvous; and the quick-mode run of §7.9 on
# a CPU:
#
# ```bash
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --outdir=training-runs \
#     --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --outdir=training-runs \
#     --data=datasets/ffhq-64x64.zip --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15
# torchrun --standalone --nproc_per_node=8 -m edm_lit.train --outdir=training-runs \
#     --data=datasets/afhqv2-64x64.zip --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15
# torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m edm_lit.train \
#     --outdir=training-runs --data=datasets/imagenet-64x64.zip --cond=1 --arch=adm --duration=2500 \
#     --batch=4096 --batch-gpu=32 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 --fp16=1 --ls=100 --tick=200
# python -m edm_lit.train --outdir=runs --data=digits --arch=ddpmpp-tiny --duration=0.03 --batch=64 --lr=2e-3 \
#     --lr-rampup=0.001 --ema=0.002 --dropout=0 --augment=0 --tick=5 --snap=3 --dump=6 --seed=0
# ```

# %% tags=["export:train"]
"""`python -m edm_lit.train` / `edm-lit train`: the official train.py's flags on edm_lit's loop (Chapter 7)."""
import argparse
import json
import re
import sys
from pathlib import Path

from edm_lit import distributed, training


def parse_bool(text: str) -> bool:
    """'1/0', 'true/false', 'yes/no', 'on/off' (any case), as click's BOOL."""
    value = str(text).strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false, yes/no), got {text!r}")


def parse_int_list(text: str) -> list:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; '' -> [] (which build_options refuses for --cres, in one line)."""
    values = []
    if not str(text).strip():
        return values
    for part in str(text).split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        try:
            values += list(range(int(bounds[1]), int(bounds[2]) + 1)) if bounds else [int(part)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers and ranges such as 1,2,5-7, got {text!r}") from None
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The official train.py's options (same names, meanings, defaults) and ours. Chapter 7."""
    d = training.TRAIN_DEFAULTS
    main = parser.add_argument_group("main options")
    main.add_argument("--outdir", required=True, metavar="DIR", help="where to save the results")
    main.add_argument("--data", required=True, metavar="ZIP|DIR", help="path to the data set, or 'digits' (quick mode)")
    main.add_argument("--cond", type=parse_bool, default=d["cond"], metavar="BOOL", help="train a class-conditional model")
    main.add_argument("--arch", choices=sorted(training.ARCH_PRESETS), default=d["arch"], help="network architecture")
    main.add_argument("--precond", choices=sorted(training.PRECOND_CLASSES), default=d["precond"],
                      help="preconditioning and loss function")
    hyper = parser.add_argument_group("hyperparameters")
    hyper.add_argument("--duration", type=float, default=d["duration"], metavar="MIMG", help="training duration")
    hyper.add_argument("--batch", type=int, default=d["batch"], metavar="INT", help="total batch size")
    hyper.add_argument("--batch-gpu", type=int, default=d["batch_gpu"], metavar="INT",
                       help="limit batch size per GPU (gradient accumulation)")
    hyper.add_argument("--cbase", type=int, default=d["cbase"], metavar="INT", help="channel multiplier [default: varies]")
    hyper.add_argument("--cres", type=parse_int_list, default=d["cres"], metavar="LIST",
                       help="channels per resolution [default: varies]")
    hyper.add_argument("--lr", type=float, default=d["lr"], metavar="FLOAT", help="learning rate")
    hyper.add_argument("--ema", type=float, default=d["ema"], metavar="MIMG", help="EMA half-life")
    hyper.add_argument("--dropout", type=float, default=d["dropout"], metavar="FLOAT", help="dropout probability")
    hyper.add_argument("--augment", type=float, default=d["augment"], metavar="FLOAT", help="augment probability")
    hyper.add_argument("--xflip", type=parse_bool, default=d["xflip"], metavar="BOOL", help="enable data-set x-flips")
    perf = parser.add_argument_group("performance")
    perf.add_argument("--fp16", type=parse_bool, default=d["fp16"], metavar="BOOL", help="mixed-precision training (CUDA)")
    perf.add_argument("--ls", type=float, default=d["ls"], metavar="FLOAT", help="loss scaling")
    perf.add_argument("--bench", type=parse_bool, default=d["bench"], metavar="BOOL", help="enable cuDNN benchmarking")
    perf.add_argument("--cache", type=parse_bool, default=d["cache"], metavar="BOOL", help="cache data set in CPU memory")
    perf.add_argument("--workers", type=int, default=d["workers"], metavar="INT",
                      help="DataLoader worker processes")
    io = parser.add_argument_group("I/O")
    io.add_argument("--desc", default=d["desc"], metavar="STR", help="string to include in result dir name")
    io.add_argument("--nosubdir", action="store_true", help="do not create a subdirectory for results")
    io.add_argument("--tick", type=int, default=d["tick"], metavar="KIMG", help="how often to print progress")
    io.add_argument("--snap", type=int, default=d["snap"], metavar="TICKS", help="how often to save snapshots")
    io.add_argument("--dump", type=int, default=d["dump"], metavar="TICKS", help="how often to dump state")
    io.add_argument("--seed", type=int, default=d["seed"], metavar="INT", help="random seed [default: random]")
    io.add_argument("--transfer", default=d["transfer"], metavar="PKL|URL",
                    help="transfer learning from a network snapshot (ours or an official .pkl)")
    io.add_argument("--resume", default=d["resume"], metavar="STATE|DIR",
                    help="resume from training-state-NNNNNN.json, or the latest complete state in a run directory")
    io.add_argument("-n", "--dry-run", action="store_true", help="print training options and exit")
    ours = parser.add_argument_group("edm_lit additions")
    ours.add_argument("--bf16", type=parse_bool, default=d["bf16"], metavar="BOOL", help="bfloat16 autocast (CPU or GPU)")
    ours.add_argument("--lr-rampup", type=float, default=d["lr_rampup"], metavar="MIMG",
                      help="learning-rate ramp-up (official: 10)")
    ours.add_argument("--grid", type=int, default=d["grid"], metavar="INT", help="sample-grid images per snapshot, 0 = none")
    ours.add_argument("--channels-last", type=parse_bool, default=d["channels_last"], metavar="BOOL",
                      help="network and input images in channels_last memory format")
    ours.add_argument("--compile", type=parse_bool, default=d["compile"], metavar="BOOL",
                      help="torch.compile the trained network")
    ours.add_argument("--fused-adam", type=parse_bool, default=d["fused_adam"], metavar="BOOL",
                      help="Adam's fused kernel (torch.optim.Adam(fused=True))")
    return parser


def run_train(args: argparse.Namespace, out=None) -> int:
    """Resolve, print, and (unless --dry-run) train. Returns an exit status, the same on every rank. Chapter 7."""
    out = sys.stdout if out is None else out
    flags = {k: v for k, v in vars(args).items() if k in training.TRAIN_DEFAULTS}
    rank, world_size, device = distributed.init_distributed()
    try:
        return _train(args, flags, out, rank, world_size, device)
    finally:
        if torch_distributed_ready():
            import torch
            torch.distributed.destroy_process_group()


def _train(args, flags: dict, out, rank: int, world_size: int, device) -> int:
    def failed(error) -> bool:  # every rank learns every rank's error: all stop together, none waits
        error = distributed.agree_on_error(error)
        if error is not None and rank == 0:
            print(f"edm-lit train: error: {error}", file=sys.stderr)
        return error is not None

    options, error = None, None
    try:
        options = training.build_options(flags, world_size=world_size, device=device)
    except ValueError as e:
        error = str(e)
    if failed(error):
        return 1
    say = (lambda *a: print(*a, file=out, flush=True)) if rank == 0 else (lambda *a: None)
    net = options["network_kwargs"]
    say("Training options:\n" + json.dumps(options, indent=2) + "\n")
    for label, value in [("Output directory", options["run_dir"]), ("Dataset path", options["dataset_kwargs"]["path"]),
                         ("Class-conditional", options["dataset_kwargs"]["use_labels"]),
                         ("Network architecture", flags["arch"]), ("Preconditioning & loss", flags["precond"]),
                         ("Number of ranks", world_size), ("Batch size", options["batch_size"]),
                         ("Mixed-precision", net["use_fp16"] or options["autocast_dtype"] or False)]:
        say(f"{label + ':':<25}{value}")
    if args.dry_run:
        warning = training.device_warning(options, device)
        if warning is not None and rank == 0:
            print(f"edm-lit train: warning: {warning}", file=sys.stderr)
        say("Dry run; exiting.")
        return 0
    run_dir, log_file, created, error = None, None, [], None
    if rank == 0:  # claim the run directory before building anything (also a test that it is writable)
        try:
            claim = training.claim_run_dir(options["run_dir"], args.nosubdir, flags["resume"])
            run_dir, log_file, created = claim
            options["run_dir"] = str(run_dir)
        except ValueError as e:
            error = str(e)
    if failed(error):
        return 1
    trainer, error = None, None
    try:  # builds everything and loads --resume/--transfer; writes nothing yet
        trainer = training.TrainingRun(**options, device=device, progress_bar=rank == 0)
    except ValueError as e:
        error = str(e)
    if failed(error):
        if log_file is not None:
            log_file.close()
            training.release_run_dir(created)
        return 1
    try:
        if rank == 0:
            text = json.dumps(options, indent=2) + "\n"
            training.write_atomic(run_dir / "training_options.json", text.encode())

            def log(line):  # log.txt: a human log, appended (the one non-atomic file)
                print(line, file=out, flush=True)
                log_file.write(line + "\n")
                log_file.flush()
            trainer.log = log
        trainer.run()
    except training.TrainingDiverged as e:  # raised on every rank at the same tick
        if rank == 0:
            print(f"edm-lit train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if log_file is not None:
            log_file.close()
    return 0


def torch_distributed_ready() -> bool:
    import torch
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def to_argv(flags: dict) -> list:
    """Flags as a dict (build_options' names) -> the command line giving them: ['--batch=32', ...]."""
    def text(value):
        if isinstance(value, bool):
            return "1" if value else "0"
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    argv = []
    for name, value in flags.items():
        switch = name in ("nosubdir", "dry_run")  # flags without a value
        if name not in training.TRAIN_DEFAULTS or value is None or (switch and not value):
            continue
        flag = "--" + name.replace("_", "-")
        argv.append(flag if switch else f"{flag}={text(value)}")
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edm_lit.train",
                                     description="Train an EDM diffusion model (the official train.py's flags).")
    return add_train_arguments(parser)


def main(argv=None) -> int:
    """Entry point of `python -m edm_lit.train`. Chapter 7."""
    return run_train(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__" and __spec__ is not None and __spec__.name == "edm_lit.train":  # python -m edm_lit.train
    sys.exit(main())

# %% [markdown]
# **Speed.** Three more flags of ours; each keeps the exact resume and the snapshots' layout.
# `--fused-adam=1`: Adam's fused kernel (`torch.optim.Adam(fused=True)`), one kernel for the whole
# update — the same formula, other rounding (a resumed run gives Adam's moments the parameters'
# memory layout back: the fused kernel walks both in memory order). `--channels-last=1`: network and
# images in channels-last memory format, which GPU convolutions prefer; the noise is then drawn in
# that layout, so such a run is not bitwise the one without the flag. `--compile=1`: `torch.compile`
# of the trained network, fused kernels after a compilation at the start. Without any flag the
# images travel as uint8 (a quarter of the bytes of float32), from pinned memory and asynchronously,
# and are converted on the device. What the flags buy on a GPU is not measured here (no GPU was
# available to this book's build); `benchmarks/bench_training.py` measures it, one row per flag.
#
# **Check** — `--dry-run` with the paper's CIFAR-10 flags prints the official configuration and
# writes nothing; the bad inputs are refused with one line before any work: a missing data set, a
# batch the ranks and `--batch-gpu` cannot split, `--transfer` with `--resume`, non-finite or absurd
# numbers.

# %%
import contextlib
import io

from edm_lit import train as train_cli

buffer = io.StringIO()
runs = scratch / "runs"
status = train_cli.run_train(train_cli.build_parser().parse_args(
    ["--outdir", str(runs), f"--data={fake_cifar}", "--cond=1", "--arch=ddpmpp", "--seed=0", "--dry-run"]), out=buffer)
printed = buffer.getvalue()
print(printed[-420:])
assert status == 0 and '"batch_size": 512' in printed and "Dry run; exiting." in printed and not runs.exists()
bad_inputs = {"missing data set": [f"--data={scratch}/no-such.zip"],
              "batch vs --batch-gpu": [f"--data={fake_cifar}", "--batch=512", "--batch-gpu=48"],
              "--transfer with --resume": [f"--data={fake_cifar}", "--transfer=a.pkl",
                                           f"--resume={first_run}"],
              "--lr=inf": [f"--data={fake_cifar}", "--lr=inf"],
              "--cbase=0": [f"--data={fake_cifar}", "--cbase=0"],
              "--seed of 23 digits": [f"--data={fake_cifar}", f"--seed={10**22}"]}
for case, flags in bad_inputs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = train_cli.main(["--outdir", str(runs), "--dry-run", *flags])
    print(f"{case:26s} -> exit {status}: {err.getvalue().strip()}")
    assert status == 1 and err.getvalue().startswith("edm-lit train: error:")
    assert err.getvalue().count("\n") == 1

# %% [markdown]
# **Check** — `--fp16` depends on the device this chapter runs on. Without CUDA, `--dry-run` still
# prints the configuration (a login node may prepare a GPU run; the official tool does not check at
# all) and adds a one-line warning, while a real run is refused in one line before any work. With
# CUDA, the flag is accepted.

# %%
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    status = train_cli.main(["--outdir", str(runs), f"--data={fake_cifar}", "--fp16=1", "--dry-run"])
print(f"--fp16=1 --dry-run on {MODE.device.type}: exit {status}; "
      f"{err.getvalue().strip() or 'no warning'}")
warned = "warning: --fp16 needs a CUDA GPU" in err.getvalue()
assert status == 0 and warned == (MODE.device.type != "cuda")
if MODE.device.type == "cuda":
    fp16_options = build_options(dict(data=str(fake_cifar), fp16=True, seed=0), device=MODE.device)
    assert fp16_options["network_kwargs"]["use_fp16"]
else:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = train_cli.main(["--outdir", str(runs), f"--data={fake_cifar}", "--fp16=1"])
    print(f"--fp16=1 on {MODE.device.type}, a real run: exit {status}: {err.getvalue().strip()}")
    assert status == 1 and err.getvalue().count("\n") == 1 and not runs.exists()

# %% [markdown]
# ## 7.9 A real run: the digits on a CPU
#
# Quick mode trains the tiny DDPM++ on the 1,797 UCI digits (8×8, grey; Chapter 6) with the EDM
# preconditioning and loss, through the command line's own code path. `train_quick` is that run as a
# function: a fixed seed, fixed flags, and a run directory; if the directory already holds the final
# snapshot, it loads it instead of training again (Chapters 8 and 9 use the same model). It trains
# in one thread: the result is then reproducible bit for bit (§7.5) whatever the machine's thread
# count (which would change the order of floating-point sums), for a given torch build and CPU.

# %% tags=["export"]
QUICK_FLAGS = dict(data="digits", arch="ddpmpp-tiny", cond=False, duration=0.03, batch=64, lr=2e-3, lr_rampup=0.001,
                   ema=0.002, dropout=0.0, augment=0.0, tick=5, snap=3, dump=6, workers=1, grid=64)


def train_quick(run_dir, seed: int = 0, log=None, device="cpu", **overrides) -> torch.nn.Module:
    """Train (or load, if done before) the book's quick-mode model: tiny DDPM++ on the digits. Chapter 7.

    Equivalent to `python -m edm_lit.train --outdir=RUN_DIR --nosubdir --seed=SEED` with QUICK_FLAGS
    (+ overrides) under OMP_NUM_THREADS=1; returns the EMA network of the final snapshot, in eval mode.
    The model is defined by a CPU run in one torch thread, bitwise reproducible for a given torch build
    and CPU (the committed model, book/results/quick_digits); another `device` gives a close one.
    """
    from edm_lit.checkpoints import load_network

    flags = {**QUICK_FLAGS, **overrides, "outdir": str(run_dir), "nosubdir": True, "seed": int(seed)}
    final = Path(run_dir) / f"network-snapshot-{max(int(flags['duration'] * 1000), 1):06d}.json"
    if not final.exists():
        options = build_options(flags, device=device)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(run_dir) / "training_options.json", (json.dumps(options, indent=2) + "\n").encode())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same rounding, hence the same model, on every machine
        try:
            TrainingRun(**options, device=torch.device(device), log=log).run()
        finally:
            torch.set_num_threads(threads)
    return load_network(final)


# How close a rerun of the quick model must be to the committed one (measured drift across CPUs is ~10x smaller).
REPRODUCTION_TOLERANCE = {"outputs": 2e-4, "weights": 3e-3, "final_loss": 1e-5}


@torch.no_grad()
def compare_models(a: torch.nn.Module, b: torch.nn.Module, sigmas=(0.01, 0.1, 0.5, 1.0, 5.0, 50.0), n: int = 64,
                   seed: int = 0) -> dict:
    """How far denoiser `a` is from the reference `b`: relative L2 differences of weights and outputs. Chapter 7.

    Returns {"weights": |w_a - w_b| / |w_b| over all floating-point tensors together, "worst_tensor": the largest
    such ratio of a single tensor (name, value), "outputs": {sigma: |D_a(x; sigma) - D_b(x; sigma)| / |D_b(x; sigma)|}}
    on n fixed inputs x ~ N(0, (sigma_data^2 + sigma^2) I) per sigma (one-hot labels cycling if conditional).
    """
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sb):
        raise ValueError("compare_models: the two networks have different tensors (not the same architecture)")
    keys = [k for k in sb if sb[k].is_floating_point()]
    per_tensor = {k: ((sa[k].double() - sb[k].double()).norm() / sb[k].double().norm().clamp_min(1e-30)).item()
                  for k in keys}
    total = math.sqrt(sum((sa[k].double() - sb[k].double()).square().sum().item() for k in keys)
                      / sum(sb[k].double().square().sum().item() for k in keys))
    g = torch.Generator().manual_seed(seed)
    shape = [n, b.img_channels, b.img_resolution, b.img_resolution]
    device = next(b.parameters()).device
    labels = (torch.eye(b.label_dim)[torch.arange(n) % b.label_dim].to(device) if b.label_dim else None)
    outputs = {}
    for sigma in sigmas:
        scale = math.sqrt(getattr(b, "sigma_data", 0.5) ** 2 + sigma**2)
        x = (torch.randn(shape, generator=g) * scale).to(device)
        s = torch.full([n], float(sigma), device=device)
        da, db = a(x, s, labels).double(), b(x, s, labels).double()
        outputs[float(sigma)] = ((da - db).norm() / db.norm()).item()
    worst = max(per_tensor.items(), key=lambda kv: kv[1])
    return {"weights": total, "worst_tensor": worst, "outputs": outputs}


# %%
from edm_lit.training import QUICK_FLAGS, train_quick

quick_dir = scratch / "quick"
start = time.perf_counter()
ema_net = train_quick(quick_dir, seed=0, log=print)
train_seconds = time.perf_counter() - start
rows = [json.loads(line) for line in (quick_dir / "stats.jsonl").read_text().splitlines()]
print(f"trained {rows[-1]['Progress/kimg']['mean']:.1f} kimg in {train_seconds:.0f} s "
      f"({rows[-1]['Progress/kimg']['mean'] * 1000 / train_seconds:.0f} images/s); "
      f"{sum(p.numel() for p in ema_net.parameters()):,} parameters")

# %% [markdown]
# Chapters 8 and 9 evaluate this very model. So that they need not train it (and do not depend on this
# chapter having run), it is committed as `book/results/quick_digits.json` + weights, written by
# `tools/make_quick_model.py`, which calls `train_quick(run_dir, seed=0)` as above.
#
# **Check** — the run we just made is the committed model. One thread makes the run deterministic for a
# torch build and CPU (two runs on one machine agree bit for bit: `tests/test_training.py` checks it), so on
# the machine that made the file the rerun is bit-identical. Another CPU may take other vector kernels
# (other instruction sets, other summation orders), and thousands of Adam steps carry such last-bit
# differences along: a few small tensors, such as a bias whose entries are all near zero, can then differ
# by per cent, while the network computes the same function. So `compare_models` (which
# `tests/test_generate.py` calls too) measures what matters — the denoiser's outputs on fixed inputs at six
# σ from 0.01 to 50, all weights as one vector, and the final training loss — and
# `REPRODUCTION_TOLERANCE` allows relative L2 differences of 2·10⁻⁴, 3·10⁻³ and 10⁻⁵ for them. That is
# room for rounding, not for a different training: the network of the same run *before* the EMA (the
# training state's `net.*`) lies far outside.

# %%
from edm_lit.checkpoints import load_network
from edm_lit.training import REPRODUCTION_TOLERANCE, compare_models

committed_net = load_network(Path("results") / "quick_digits.json")
committed_meta = json.loads((Path("results") / "quick_digits.meta.json").read_text())
diff = compare_models(ema_net, committed_net)
loss_diff = abs(rows[-1]["Loss/loss"]["mean"] - committed_meta["final_loss"]) / committed_meta["final_loss"]
print("this run vs the committed model, relative L2 differences:")
print("  denoiser outputs at sigma " + ", ".join(f"{s:g}: {v:.1e}" for s, v in diff["outputs"].items()))
print(f"  all weights {diff['weights']:.1e} (largest for one tensor: {diff['worst_tensor'][1]:.1e}, "
      f"{diff['worst_tensor'][0]})")
print(f"  final training loss {loss_diff:.1e}")
assert max(diff["outputs"].values()) <= REPRODUCTION_TOLERANCE["outputs"]
assert diff["weights"] <= REPRODUCTION_TOLERANCE["weights"]
assert loss_diff <= REPRODUCTION_TOLERANCE["final_loss"]

raw_net = copy.deepcopy(ema_net)
_, state = read_training_state(quick_dir / "training-state-000030.json")
raw_net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
raw_diff = compare_models(raw_net, committed_net)
print(f"the same run's network before averaging: outputs {max(raw_diff['outputs'].values()):.1e}, "
      f"weights {raw_diff['weights']:.1e}")
assert max(raw_diff["outputs"].values()) > 10 * REPRODUCTION_TOLERANCE["outputs"]
assert raw_diff["weights"] > 3 * REPRODUCTION_TOLERANCE["weights"]

# %% [markdown]
# **At full size.** In full mode (`EDM_LIT_MODE=full`, `EDM_LIT_DATA`, `EDM_LIT_KIMG`, a GPU) the
# chapter also trains the paper's network for the data set's resolution — `paper_recipe`: CIFAR-10's
# DDPM++ recipe at 32×32, the FFHQ/AFHQv2 one at 64×64, class-conditional when the data set has
# labels — for `EDM_LIT_KIMG` thousand images, through the command's own code
# (`edm_lit.train.main`), into `training-runs/`. The figure after it shows that run's files; in
# quick mode, the digits run's.

# %% tags=["export"]
def paper_recipe(resolution: int, labelled: bool) -> dict:
    """The paper's train flags for data of this resolution (App. F.2, Table 7): DDPM++, EDM. Chapter 7.

    32x32: the CIFAR-10 recipe (the official defaults); 64x64: the FFHQ/AFHQv2 recipe (multipliers
    1,2,2,2, batch 256, lr 2e-4, dropout 0.05, augment 0.15). Class-conditional when labelled.
    """
    common = dict(arch="ddpmpp", precond="edm", cond=bool(labelled), ema=0.5, lr_rampup=10.0)
    if resolution == 32:
        return dict(common, batch=512, lr=1e-3, dropout=0.13, augment=0.12)
    if resolution == 64:
        return dict(common, cres=[1, 2, 2, 2], batch=256, lr=2e-4, dropout=0.05, augment=0.15)
    raise ValueError(f"no paper recipe for {resolution}x{resolution} images: the paper trains DDPM++ "
                     "at 32x32 (CIFAR-10) and 64x64 (FFHQ, AFHQv2)")


def full_size_flags(data, kimg: float, seed: int = 0) -> dict:
    """Chapter 7's full-mode run: paper_recipe for `data`'s resolution and labels, for `kimg` kimg."""
    kwargs = _dataset_kwargs(dict(TRAIN_DEFAULTS, data=data, cond=True, cache=False))  # labels, if any
    dataset = construct(**kwargs)
    duration = kimg / 1000
    while int(duration * 1000) < int(kimg):  # 1.001 * 1000 = 1000.99...: not a kimg short
        duration = math.nextafter(duration, math.inf)
    tick = max(1, int(kimg) // 10)  # about ten ticks; snapshots and grids at the start, middle and end
    return dict(paper_recipe(dataset.resolution, dataset.has_labels), data=str(data), duration=duration,
                tick=tick, snap=max(1, int(kimg) // tick // 2), dump=10, seed=int(seed))


# %%
shown_dir = quick_dir
if MODE.full:
    from edm_lit import train as train_cli
    from edm_lit.training import full_size_flags

    full_flags = full_size_flags(MODE.data, MODE.kimg)
    print("full-size run:", json.dumps(full_flags))
    outdir = Path("training-runs")
    assert train_cli.main(["--outdir", str(outdir), *train_cli.to_argv(full_flags)]) == 0
    runs = [p for p in outdir.iterdir() if p.is_dir() and p.name[:5].isdigit()]
    shown_dir = max(runs, key=lambda p: int(p.name[:5]))  # the run just made

# %% [markdown]
# **Samples and loss per σ, from the run's files.** The snapshots' grids: EMA samples from the same
# fixed noise, 18 Heun steps (Chapter 3), at the start, halfway and at the end of the run; and the
# training loss of each σ bucket over the run (`stats.jsonl`). For the digits, how close the samples
# are to the data is measured below.

# %%
from PIL import Image

from edm_lit.training import SIGMA_BUCKETS

shown_rows = [json.loads(line) for line in (shown_dir / "stats.jsonl").read_text().splitlines()]
grids = sorted(shown_dir.glob("samples-*.png"), key=lambda path: int(path.stem.split("-")[1]))
fig, axes = plt.subplots(1, 4, figsize=(15, 4))
for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
    points = [(r["Progress/kimg"]["mean"], r[f"Loss/sigma_{lo:g}_{hi:g}"]["mean"]) for r in shown_rows
              if r.get(f"Loss/sigma_{lo:g}_{hi:g}", {}).get("mean") is not None]
    axes[0].plot(*zip(*points), "o-", ms=2, label=f"σ in [{lo:g}, {hi:g})")
axes[0].set(xlabel="training progress (kimg)", ylabel="λ(σ) · loss per pixel", yscale="log",
            title="training loss per σ bucket")
axes[0].legend(fontsize=6)
for ax, path in zip(axes[1:], [grids[0], grids[len(grids) // 2], grids[-1]]):
    ax.imshow(np.array(Image.open(path)), cmap="gray", vmin=0, vmax=255)
    ax.set(title=f"EMA samples at {int(path.stem.split('-')[1])} kimg", xticks=[], yticks=[])
plt.tight_layout()
assert len(grids) >= 2 and all(r["Loss/loss"]["mean"] is not None for r in shown_rows)  # all finite
if MODE.full:  # the run went the whole way (its loss depends on the reader's data and budget)
    assert shown_rows[-1]["Progress/kimg"]["mean"] >= int(MODE.kimg)
else:  # the digits run of this chapter learns: its loss falls by half
    assert shown_rows[-1]["Loss/loss"]["mean"] < 0.5 * shown_rows[0]["Loss/loss"]["mean"]

# %% [markdown]
# **Loss per σ against the floor.** The training statistics carry the loss per σ bucket. For a
# *finite* training set the ideal denoiser is known exactly (Chapter 1: the posterior mean over the
# training images, `GaussianMixture.from_data`), so each bucket has an exact **floor** — Chapter 4's
# idea, here for the digits. At small σ that floor is 0 to many digits (the noisy image identifies its
# training image exactly: pure memorisation), a level no network that *generalises* reaches; at large σ
# it approaches the loss of predicting the data mean. `loss_per_bucket` evaluates any denoiser the way the
# statistics bucket the training loss: in each bucket, σ drawn from $p_\text{train}$ restricted to the
# bucket, the weighted loss of Eq. 8 per pixel — with fixed draws, the same for every denoiser. We evaluate
# the EMA network, the floor, and the best *linear* denoiser (a Gaussian fitted to the data), the level a
# network reaches by learning only the data's mean and covariance.

# %% tags=["export"]
@torch.no_grad()
def loss_per_bucket(denoise, data: torch.Tensor, n: int = 512, seed: int = 1, P_mean: float = -1.2,
                    P_std: float = 1.2, sigma_data: float = 0.5) -> np.ndarray:
    """Weighted loss (Eq. 8) per pixel of `denoise` on `data` in each SIGMA_BUCKETS bucket, as Loss/sigma_*. Chapter 7.

    Per bucket [lo, hi): n images y of `data` ([N, C, H, W] in [-1, 1]), sigma from p_train (ln sigma ~
    N(P_mean, P_std^2)) restricted to the bucket, x = y + sigma * noise; returns the mean over images and
    pixels of lambda(sigma) (D(x; sigma) - y)^2. The draws depend on `seed` only, so denoisers compare pairwise.
    `denoise(x, sigma)` receives float64 x [n, C, H, W] and sigma [n, 1, 1, 1].
    """
    g = torch.Generator().manual_seed(seed)
    data = data.double()
    out = []
    for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
        cdf_lo, cdf_hi = (torch.special.ndtr(torch.tensor((math.log(v) - P_mean) / P_std, dtype=torch.float64))
                          for v in (lo, hi))
        u = cdf_lo + (cdf_hi - cdf_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        sigma = (P_mean + P_std * torch.special.ndtri(u)).exp().clamp(lo, hi).reshape(n, 1, 1, 1)
        y = data[torch.randint(len(data), (n,), generator=g)]
        x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        out.append((weight * (denoise(x, sigma).double() - y).square()).mean().item())
    return np.array(out)


# %%
from myst_nb import glue

from edm_lit.data import ImageFolderDataset
from edm_lit.framework import GaussianMixture
from edm_lit.training import SIGMA_BUCKETS, digits_path, loss_per_bucket

digits = ImageFolderDataset(digits_path())
data = torch.from_numpy(np.stack([digits[i][0] for i in range(len(digits))])).double() / 127.5 - 1
finite = GaussianMixture.from_data(data)
flat = data.flatten(1)
mean, cov = flat.mean(0), torch.cov(flat.T)
eigvals, eigvecs = torch.linalg.eigh(cov)
eigvals = eigvals.clamp_min(0)


def linear_denoiser(x, sigma):  # E[y | x] for y ~ N(mean, cov): the best linear denoiser
    z = (x.flatten(1) - mean) @ eigvecs
    return (mean + z * eigvals / (eigvals + sigma.flatten(1) ** 2) @ eigvecs.T).reshape(x.shape)


net_loss = loss_per_bucket(lambda x, s: ema_net(x.float(), s.float().flatten()), data)
floor_loss = loss_per_bucket(finite.denoise, data)
linear_loss = loss_per_bucket(linear_denoiser, data)
buckets = [f"[{lo:g}, {hi:g})" for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])]
print("sigma bucket   EMA network   floor (ideal, finite data)   best linear   network / floor")
for name, a, f, lin in zip(buckets, net_loss, floor_loss, linear_loss):
    print(f"{name:12s}   {a:11.4f}   {f:26.2e}   {lin:11.4f}   {a / f if f > 0.01 else float('nan'):15.3g}")

# %% [markdown]
# The three buckets below σ = 0.3 have a floor of about 0 for any plotting purpose (it is printed above), so a
# ratio to it says nothing; the figure shows their training loss as it is (left), and for the other four
# buckets the training loss divided by the floor (middle). Both are the loss of the *trained* network on
# its training batches, averaged over the σ that fell into the bucket during each tick, against the floor
# for σ from the same distribution. On the right, after training, the EMA network, the best linear
# denoiser and the floor on the same fixed draws, per bucket.

# %%
bucket_names = [f"Loss/sigma_{lo:g}_{hi:g}" for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])]
kimg = [r["Progress/kimg"]["mean"] for r in rows]
has_floor = floor_loss > 0.01  # below, the floor is ~0: a ratio to it means nothing
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
for i, name in enumerate(bucket_names):
    curve = np.array([r[name]["mean"] if name in r else np.nan for r in rows])
    ax = ax2 if has_floor[i] else ax1
    ax.plot(kimg, curve / floor_loss[i] if has_floor[i] else curve, "o-", ms=3, color=f"C{i}", label=f"σ in {buckets[i]}")
ax1.set(xlabel="training progress (kimg)", ylabel="λ(σ) · loss per pixel", ylim=(0, None),
        title="training loss, buckets with floor ≈ 0")
ax2.axhline(1, color="k", ls=":", lw=1)
ax2.set(xlabel="training progress (kimg)", ylabel="training loss / floor", yscale="log", ylim=(0.8, 50),
        title="training loss relative to the floor")
x_mid = np.array([math.sqrt(lo * hi) for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])])
ax3.plot(x_mid, net_loss, "o-", label="EMA network")
ax3.plot(x_mid, linear_loss, "s--", label="best linear denoiser (Gaussian fit)")
ax3.plot(x_mid, floor_loss, "k:", marker=".", label="floor: ideal denoiser of the finite data")
ax3.set(xscale="log", ylim=(0, None), xlabel="σ bucket (plotted at its geometric middle)",
        ylabel="λ(σ) · loss per pixel", title="after training, per bucket (cf. Fig. 5a)")
for ax in (ax1, ax2, ax3):
    ax.legend(fontsize=7)
plt.tight_layout()

# %%
ratio = net_loss / np.where(has_floor, floor_loss, np.nan)
vs_linear = net_loss / linear_loss
for name, value in [("ratio_03", ratio[3]), ("ratio_1", ratio[4]), ("ratio_3", ratio[5]), ("ratio_10", ratio[6]),
                    ("lin_03", vs_linear[3]), ("lin_1", vs_linear[4]), ("small_net_min", net_loss[:3].min()),
                    ("small_floor_max", floor_loss[:3].max())]:
    glue(name, float(value), display=False)
print(f"network / floor per bucket: {np.round(ratio, 3)}; network / best linear: {np.round(vs_linear, 3)}")

# %% [markdown]
# **Check** — where the model is near the floor and where it is not, after 30 kimg:
#
# - σ ≥ 3: within a few per cent of the floor (network / floor = {glue:text}`ratio_3:.3f` in [3, 10) and
#   {glue:text}`ratio_10:.3f` in [10, 80)); there the answer is close to the data mean, and the best linear
#   denoiser is as good;
# - σ in [1, 3): {glue:text}`ratio_1:.2f` times the floor, about as good as the best linear denoiser
#   ({glue:text}`lin_1:.3f` of its loss): room for longer training;
# - σ in [0.3, 1): clearly better than the best linear denoiser ({glue:text}`lin_03:.2f` of its loss) — here a
#   denoiser must know what digits look like, not only their mean and covariance — but
#   {glue:text}`ratio_03:.1f` times the floor, which is low because at these σ the ideal denoiser of 1,797
#   images can still largely tell which training image was noised;
# - σ < 0.3: the floor is at most {glue:text}`small_floor_max:.1e` (memorisation), the network's loss at least
#   {glue:text}`small_net_min:.2f`: it has not learned the training set by heart.

# %%
assert np.all(ratio[5:] < 1.1) and 1.0 < ratio[4] < 1.3 and ratio[3] > 3
assert vs_linear[3] < 0.85 and vs_linear[4] < 1.05
assert not has_floor[:3].any() and has_floor[3:].all() and net_loss[:3].min() > 0.2

# %% [markdown]
# **What the EMA does.** Adam at a constant learning rate leaves the weights jittering around a
# good solution; the average over the last half-life (here at most 5 % of the 30 kimg) sits closer
# to its centre. We measure it on the samples: 512 images from the same noise through the EMA
# and through the raw trained network (the training state's `net.*`), and the Fréchet distance of
# their pixel statistics (mean and covariance of the 64 pixels) to those of the data — FID's
# formula (Chapter 8) on pixels instead of Inception features; 0 means identical first and second
# moments.

# %%
from edm_lit.samplers import edm_sampler


def frechet(a, b):
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def sample(net, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn([n, 1, 8, 8], generator=g, dtype=torch.float64)
    with torch.no_grad():
        x = edm_sampler(net, latents, randn_like=lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype))
    return x.clip(-1, 1).flatten(1)


fd = {name: frechet(sample(net), flat) for name, net in [("EMA", ema_net), ("raw", raw_net)]}
fd_half = frechet(flat[::2], flat[1::2])
print(f"pixel Fréchet distance to the digits: EMA {fd['EMA']:.3f}, raw network {fd['raw']:.3f} "
      f"(two halves of the data set: {fd_half:.3f})")
assert fd["EMA"] < fd["raw"]

# %% [markdown]
# ## Summary
#
# Exported to `edm_lit.training` (and `edm_lit.train`, the command):
#
# - `build_options`: the official `train.py`'s flags, presets and defaults → the options of
#   `training_options.json`, with early, one-line errors; `construct` for the classes it names;
# - `ShardedStream`, `make_loader`: one seeded global stream of images, interleaved over ranks,
#   resumable at any progress;
# - `learning_rate`, `ema_beta`, `update_ema`: the ramp-up and the EMA half-life in images;
# - `accumulate_gradients`, `sanitize_gradients`: rounds, loss scaling, DDP synchronisation, the
#   nan/inf guard, bf16 autocast;
# - `write_atomic`, `save_training_state`, `load_training_state`, `find_training_state`,
#   `remove_stale_temp_files`: crash-safe files and the complete state (safetensors + JSON) for exact resume;
# - `Stats`: the official statistics layout plus the loss per σ bucket;
# - `TrainingRun`, `training_loop`, `init_distributed`, `agree_on_error`: the loop on one CPU, one GPU or
#   torchrun;
# - `train_quick`: the quick-mode model of Chapters 7–9; `compare_models` and `REPRODUCTION_TOLERANCE`: how
#   a rerun is compared with the committed model; `loss_per_bucket`: any denoiser's loss per σ bucket;
# - `claim_run_dir`: the run directory, claimed before any work; `check_flags`: one-line errors for
#   absurd flags; `TrainingDiverged`: the stop when the weights are no longer finite;
#   `paper_recipe`, `full_size_flags`: the paper's recipe for a data set's resolution (full mode).
#
# What is guaranteed and tested (`tests/test_training.py`): a run killed with SIGKILL and resumed
# from its directory ends with **bitwise** the same network, EMA, optimizer state, generator states,
# snapshots, sample grids and statistics lines as an uninterrupted one (CPU, fixed seed), also with
# each speed flag (`tests/test_training_speed.py`), and leaves no temporary file; `--transfer`
# starts from the source's weights and refuses another architecture; two ranks with Gloo match one
# process with the same global batch to float32 rounding after several steps (with a loss whose
# noise depends only on the image, so that both see the same draws); the schedules follow their
# formulas; bad input and races fail in one line before any work, and a diverging run stops with its
# last good files (`tests/test_training_bad_input.py`); a step reads no tensor on the host; the
# committed quick model is near the floor where this chapter says it is. Throughput:
# `benchmarks/bench_training.py`.
#
# ## Exercises
#
# 1. Train the quick model with `ema=0` (no averaging) and compare the Fréchet distance of its
#    samples. Then try a half-life of 20 kimg: what goes wrong in a 30 kimg run?
# 2. Resume a quick run with `--batch=128`. Which guarantee of §7.5 still holds, and which not?
# 3. Why does the official loop compute the learning rate and β from the images seen *before*
#    the step, and what does that mean for the very first step?
#
# :::{dropdown} Answers
# 1. Without the EMA the samples come from the last, jittering weights: the distance grows. With a
#    20 kimg half-life the ramp-up caps it at 5 % of the progress anyway (1.5 kimg at 30 kimg); without
#    the cap (`ema_rampup_ratio=None`) the average would still remember the first, untrained weights.
# 2. The weights, EMA and Adam state load, and the data stream continues at the same image, but the
#    steps now group the images differently, so the result differs from any uninterrupted run; the
#    EMA's half-life, counted in images, is unchanged.
# 3. Both depend on the progress n at the start of the step; at n = 0 the rate is 0 (Adam only
#    initialises its moments) and β = 0 (the EMA starts as a copy of the network).
# :::
