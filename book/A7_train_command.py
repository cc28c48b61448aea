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
# # A7. From flags to a run: the training command's engineering
#
# Chapters 7 and 7b derive the training loop and take it to scale; this appendix holds, as
# reference, the machinery between a command line and a running loop, each piece with its
# check:
#
# | section | what | module |
# |---|---|---|
# | A7.1 | from flags to options: the data set, refusals before any work, the network's arguments | `edm_lit.training` |
# | A7.2 | the command on every rank: errors agreed, the run directory claimed, nothing left behind | `edm_lit.train` |
# | A7.3 | the statistics of a tick: timing, memory, the log line | `edm_lit.training` |
# | A7.4 | book helpers: stand-in data, the quick model, comparing models, the loss per σ | `edm_lit.course` |
#
# The flags themselves are parsed in Appendix A1.2, the files written in A3.5–A3.7, the ranks
# joined in A5.

# %% tags=["hide-input"]
import contextlib
import io
import json
import os
import tempfile
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from edm_lit import train as train_command
from edm_lit import training
from edm_lit.course import random_image_folder

WORK = Path(tempfile.mkdtemp(prefix="edm_lit_A7_"))
torch.set_num_threads(1)

# %% [markdown]
# ## A7.1 From flags to options
#
# An options dictionary names the classes to build (`class_name`); `construct` builds them,
# from our modules or `torch.optim` only, and reads a configuration of the official code by
# mapping its module names onto ours. `--data` is a data set ZIP or folder (Chapter 6), or
# `digits`: the quick data set, built once per machine by its local rank 0 into a cache
# (`$EDM_LIT_CACHE`, else `~/.cache/edm_lit`) while the other ranks wait (Appendix A5).
# `build_options` (Chapter 7b.5) refuses, before any network is built and in one line, what
# cannot train: an unknown preset, `--fp16` without CUDA (a dry run only warns), `--fp16` with
# `--bf16`, `--transfer` with `--resume`, a missing `--transfer` file, levels that cannot halve
# the resolution, and (Appendix A1.2) a number out of range. The run's name is the official
# one, `NNNNN-data-cond-arch-precond-gpusW-batchB-dtype[-desc]`.

# %% tags=["export"]
import importlib
import os
import re
from pathlib import Path

import torch

from edm_lit.distributed import agree_on_error, local_rank  # Appendix A5

# An official configuration names the official modules; these are ours.
_OFFICIAL_MODULES = {"training.networks": "edm_lit.precond",
                     "training.loss": "edm_lit.loss",
                     "training.dataset": "edm_lit.data",
                     "training.augment": "edm_lit.augment"}


def construct(class_name: str, **kwargs):
    """`class_name(**kwargs)` for a class of edm_lit or torch.optim; official names map
    to ours. Appendix A7."""
    module, _, name = class_name.rpartition(".")
    module = _OFFICIAL_MODULES.get(module, module)
    if not (module.startswith("edm_lit.") or module == "torch.optim"):
        raise ValueError("class_name must name a class of edm_lit or torch.optim, "
                         f"got {class_name!r}")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{class_name!r} needs the module {e.name}, "
                         "which is not available") from None
    except AttributeError:
        raise ValueError(f"{module} has no class {name!r} "
                         f"(from class_name {class_name!r})") from None
    return cls(**kwargs)


# %% tags=["export"]
def digits_path() -> Path:
    """Where `--data=digits` keeps the quick data set: $EDM_LIT_CACHE (else
    ~/.cache/edm_lit)/digits-8x8.zip. Appendix A7."""
    cache = os.environ.get("EDM_LIT_CACHE") or Path.home() / ".cache" / "edm_lit"
    return Path(cache) / "digits-8x8.zip"


def _build_digits() -> str:
    """--data=digits: written once per machine by its local rank 0 (atomically, Chapter
    6) while the other ranks wait (Appendix A5)."""
    try:
        from edm_lit import data as data_module
    except ModuleNotFoundError:
        raise ValueError("--data=digits needs edm_lit.data (Chapter 6), "
                         "which is not available") from None
    error = None
    if local_rank() == 0:  # one writer per node (each node may have its own cache)
        try:
            data_module.quick_dataset(digits_path())
        except Exception as e:  # reported on every rank below: none waits
            error = (f"--data=digits: cannot build {digits_path()}: "
                     f"{type(e).__name__}: {e}")
    error = agree_on_error(error)  # also the barrier: the others wait for the file
    if error is not None:
        raise ValueError(error)
    return str(digits_path())


def _dataset_kwargs(flags: dict) -> dict:
    """The data set's constructor arguments: --data, --cond, --xflip and --cache."""
    data = flags["data"]
    if data is None:
        raise ValueError("--data is required: a data set ZIP or folder (dataset.json "
                         "for labels), or 'digits'")
    if str(data) == "digits":
        data = _build_digits()
    elif not os.path.exists(data):
        raise ValueError(f"--data: no such data set: {data!r} (expected a ZIP or "
                         "folder made by `edm-lit dataset`)")
    return dict(class_name="edm_lit.data.ImageFolderDataset", path=str(data),
                use_labels=bool(flags["cond"]), xflip=bool(flags["xflip"]),
                cache=bool(flags["cache"]))


# %% tags=["export"]
def _refuse(f: dict, device: torch.device) -> None:
    """One-line ValueError, before any work, for flags that cannot train together."""
    if f["arch"] not in ARCH_PRESETS:
        raise ValueError(f"--arch must be one of {sorted(ARCH_PRESETS)}, "
                         f"got {f['arch']!r}")
    if f["precond"] not in PRECOND_CLASSES:
        raise ValueError(f"--precond must be one of {sorted(PRECOND_CLASSES)}, "
                         f"got {f['precond']!r}")
    _check_flags(f)  # each number on its own: Appendix A1.2
    if f["fp16"] and device.type != "cuda" and not f["dry_run"]:  # a dry run warns
        raise ValueError("--fp16 needs a CUDA GPU (the networks' fp16 path runs on "
                         "CUDA only); on a CPU use --bf16")
    if f["fp16"] and f["bf16"]:
        raise ValueError("--fp16 and --bf16 cannot both be set")
    transfer = f["transfer"]
    if transfer is not None and f["resume"] is not None:
        raise ValueError("--transfer and --resume cannot be specified at the same time")
    if transfer is not None and not re.match(r"https?://", str(transfer)) \
            and not os.path.isfile(transfer):
        raise ValueError(f"--transfer: no such file: {str(transfer)!r}")


def _network_kwargs(f: dict, dataset) -> dict:
    """The options' network_kwargs: the --arch preset, --cbase, --cres, --precond, the
    augmentation's labels, --dropout and --fp16."""
    net = dict(ARCH_PRESETS[f["arch"]])
    if f["cbase"] is not None:
        net["model_channels"] = int(f["cbase"])
    if f["cres"] is not None:
        net["channel_mult"] = [int(m) for m in f["cres"]]
    levels, r = len(net["channel_mult"]), dataset.resolution
    if r % 2 ** (levels - 1):
        raise ValueError(f"--cres: {levels} levels halve the resolution {levels - 1} "
                         f"times, but the data set is {r}x{r} (not divisible by "
                         f"{2 ** (levels - 1)})")
    net["class_name"] = f"edm_lit.precond.{PRECOND_CLASSES[f['precond']][0]}"
    if f["augment"]:
        net["augment_dim"] = AUGMENT_DIM
    net.update(dropout=float(f["dropout"]), use_fp16=bool(f["fp16"]))
    return net


def _run_desc(f: dict, dataset, world_size: int) -> str:
    """The official run name: data-cond-arch-precond-gpusW-batchB-dtype[-desc]."""
    cond = "cond" if f["cond"] else "uncond"
    dtype = "fp16" if f["fp16"] else ("bf16" if f["bf16"] else "fp32")
    desc = (f"{dataset.name}-{cond}-{f['arch']}-{f['precond']}-gpus{world_size}"
            f"-batch{int(f['batch'])}-{dtype}")
    return desc if f["desc"] is None else f"{desc}-{f['desc']}"


def _random_seed(device) -> int:
    """A fresh random seed, the same on every rank (broadcast from rank 0)."""
    seed = torch.randint(1 << 31, size=[], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(seed, src=0)
    return int(seed)


# %% [markdown]
# **Check** — `construct` builds an official class name as ours and refuses a foreign module;
# each combination above is refused in one line naming the flag; the digits' cache follows
# `$EDM_LIT_CACHE`; the run's name is the official one.

# %% tags=["hide-input"]
from edm_lit.training import build_options, construct, digits_path

net = construct("training.networks.EDMPrecond", img_resolution=8, img_channels=1,
                **training.ARCH_PRESETS["ddpmpp-tiny"])
assert type(net).__module__ == "edm_lit.precond"
folder = random_image_folder(WORK / "cifar10-32x32", n=4)
refused = {"os.system": lambda: construct("os.system"),
           "--fp16 on a CPU": lambda: build_options(dict(data=str(folder), fp16=True),
                                                    device="cpu"),
           "--fp16 and --bf16": lambda: build_options(
               dict(data=str(folder), fp16=True, bf16=True, dry_run=True),
               device="cpu"),
           "--transfer and --resume": lambda: build_options(
               dict(data=str(folder), transfer="a.pkl", resume="b"), device="cpu"),
           "three levels at 6x6": lambda: build_options(dict(
               data=str(random_image_folder(WORK / "six", n=2, resolution=6)),
               cres=[1, 1, 1]), device="cpu")}
for case, attempt in refused.items():
    try:
        attempt()
        raise AssertionError(f"{case} must be refused")
    except ValueError as e:
        print(f"{case:24s} -> {e}")
        assert "\n" not in str(e)
with mock.patch.dict(os.environ, {"EDM_LIT_CACHE": str(WORK / "cache")}):
    assert digits_path() == WORK / "cache" / "digits-8x8.zip"
options = build_options(dict(data=str(folder), outdir=str(WORK / "runs"), cond=True,
                             batch=64, seed=0), device="cpu")
print(Path(options["run_dir"]).name)
expected = "00000-cifar10-32x32-cond-ddpmpp-edm-gpus1-batch64-fp32"
assert Path(options["run_dir"]).name == expected

# %% [markdown]
# ## A7.2 The command on every rank
#
# `run_train` is what `python -m edm_lit.train` and `edm-lit train` run, the same on every rank
# of a `torchrun` job. It resolves the flags (printing the configuration as the official tool
# does, and stopping there on `--dry-run`), claims the run directory (Appendix A3.5: rank 0,
# before anything is built, so that an output that cannot be written fails at once), builds the
# run (loading `--resume` or `--transfer`), writes `training_options.json` and trains, with
# `log.txt` for people. Each step that can fail shares its error with every rank
# (`agree_on_error`, Appendix A5) before going on: all ranks exit together with status 1 and
# one line, none waits for the others forever. A run that fails while being built leaves no
# directory behind. Running out of memory (GPU or CPU), while building or training, is one
# line naming `--batch-gpu`, the flag that helps; the snapshots and states already written
# stay. The module ends here, with the lines that make `python -m edm_lit.train`
# run `main` (Chapter 7b).

# %% tags=["export:train"]
import argparse
import json
import sys

import torch


def device_warning(options: dict, device) -> str:
    """Why this configuration cannot train on `device` (--dry-run prints it), or None.
    Appendix A7."""
    kind = torch.device(device).type
    if options["network_kwargs"].get("use_fp16") and kind != "cuda":
        return (f"--fp16 needs a CUDA GPU and this machine trains on {kind}: the "
                "configuration above is valid, but a run of it here is refused (on a "
                "CPU use --bf16)")
    return None


def out_of_memory(e: BaseException, split: tuple, device) -> str | None:
    """The one line for an allocation that failed (a GPU's or the CPU's), naming the
    flag that helps; None for any other error. `split` is (images per round, rounds).
    Appendix A7."""
    cpu = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or cpu):
        return None
    per_round, rounds = split
    rounds = f"{rounds} rounds" if rounds > 1 else "1 round"
    return (f"out of {torch.device(device).type} memory with {per_round} images per "
            f"round ({rounds} per step): use a smaller --batch-gpu (the batch stays "
            "--batch, the rounds add up)")


def _agreed_failure(error, rank: int) -> bool:
    """Every rank learns every rank's error (rank 0 prints it): all stop together."""
    error = distributed.agree_on_error(error)
    if error is not None and rank == 0:
        print(f"edm-lit train: error: {error}", file=sys.stderr)
    return error is not None


def _announce(options: dict, flags: dict, world_size: int, say) -> None:
    """The configuration, as the official train.py prints it."""
    net = options["network_kwargs"]
    say("Training options:\n" + json.dumps(options, indent=2) + "\n")
    for label, value in [("Output directory", options["run_dir"]),
                         ("Dataset path", options["dataset_kwargs"]["path"]),
                         ("Class-conditional", options["dataset_kwargs"]["use_labels"]),
                         ("Network architecture", flags["arch"]),
                         ("Preconditioning & loss", flags["precond"]),
                         ("Number of ranks", world_size),
                         ("Batch size", options["batch_size"]),
                         ("Mixed-precision",
                          net["use_fp16"] or options["autocast_dtype"] or False)]:
        say(f"{label + ':':<25}{value}")


# %% tags=["export:train"]
def run_train(args: argparse.Namespace, out=None) -> int:
    """Resolve, print, and (unless --dry-run) train. Returns an exit status, the same on
    every rank. Appendix A7."""
    out = sys.stdout if out is None else out
    flags = {k: v for k, v in vars(args).items() if k in training.TRAIN_DEFAULTS}
    rank, world_size, device = distributed.init_distributed()
    try:
        options, error = None, None
        try:
            options = training.build_options(flags, world_size=world_size,
                                             device=device)
        except ValueError as e:
            error = str(e)
        if _agreed_failure(error, rank):
            return 1
        say = ((lambda *a: print(*a, file=out, flush=True)) if rank == 0
               else (lambda *a: None))
        _announce(options, flags, world_size, say)
        if args.dry_run:
            warning = device_warning(options, device)
            if warning is not None and rank == 0:
                print(f"edm-lit train: warning: {warning}", file=sys.stderr)
            say("Dry run; exiting.")
            return 0
        return _claim_build_train(args, flags, options, out, (rank, world_size),
                                  device)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# %% tags=["export:train"]
def _claim_build_train(args, flags: dict, options: dict, out, ranks: tuple,
                       device) -> int:
    rank, world_size = ranks
    run_dir, log_file, created, error = None, None, [], None
    if rank == 0:  # claim before building anything (a test that it can be written)
        try:
            run_dir, log_file, created = training.claim_run_dir(
                options["run_dir"], args.nosubdir, flags["resume"])
            options["run_dir"] = str(run_dir)
        except ValueError as e:
            error = str(e)
    if _agreed_failure(error, rank):
        return 1
    trainer, error = None, None
    split = training.split_batch(options["batch_size"], world_size,
                                 options["batch_gpu"])
    try:  # builds everything and loads --resume/--transfer; writes nothing yet
        trainer = training.TrainingRun(**options, device=device, progress_bar=rank == 0)
    except ValueError as e:
        error = str(e)
    except (RuntimeError, MemoryError) as e:
        error = out_of_memory(e, split, device)
        if error is None:
            raise
    if _agreed_failure(error, rank):
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
    except (RuntimeError, MemoryError) as e:  # this rank's; torchrun stops the others
        error = out_of_memory(e, split, device)
        if error is None:
            raise
        where = f" (rank {rank})" if world_size > 1 else ""
        print(f"edm-lit train: error{where}: {error}", file=sys.stderr)
        return 1
    finally:
        if log_file is not None:
            log_file.close()
    return 0


# The last lines of edm_lit.train: `python -m edm_lit.train` runs main() (Chapter 7b); a
# notebook, whose __spec__ is None, does not.
if __name__ == "__main__" and __spec__ is not None and __spec__.name == "edm_lit.train":
    sys.exit(main())

# %% [markdown]
# **Check** — a run through the command writes its directory (the log, the statistics, the
# options it ran with, the snapshot); a run that cannot be built — a `--transfer` network of
# another width — fails in one line and leaves no directory behind.

# %% tags=["hide-input"]
from edm_lit.checkpoints import save_network
from edm_lit.precond import EDMPrecond

gray = random_image_folder(WORK / "gray", n=16, resolution=8, channels=1, classes=0)
flags = ["--arch=ddpmpp-tiny", "--cbase=8", "--batch=16", "--duration=0.001",
         "--tick=1", "--augment=0", "--dropout=0", "--grid=4", "--seed=1",
         "--workers=1", f"--data={gray}"]
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = train_command.main([f"--outdir={WORK / 'ok'}", *flags])
(run_dir,) = (WORK / "ok").iterdir()
print(status, sorted(p.name for p in run_dir.iterdir() if p.suffix != ".safetensors"))
assert status == 0 and (run_dir / "network-snapshot-000001.json").exists()
assert json.loads((run_dir / "training_options.json").read_text())["seed"] == 1
wide = EDMPrecond(8, 1, **{**training.ARCH_PRESETS["ddpmpp-tiny"],
                           "model_channels": 16})
save_network(wide, WORK / "wide")
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    status = train_command.main([f"--outdir={WORK / 'failed'}",
                                 f"--transfer={WORK / 'wide.json'}", *flags])
print(err.getvalue().strip())
assert status == 1 and err.getvalue().count("\n") == 1
assert not (WORK / "failed").exists()

# %% [markdown]
# **Check** — a run whose step runs out of memory (here the step raises what PyTorch's CPU
# allocator raises; a GPU's `torch.OutOfMemoryError` is handled alike, `tests/`) ends in one
# line naming `--batch-gpu`, status 1, its first snapshot kept; any other error in the step
# is not dressed up as one.


# %% tags=["hide-input"]
def failing_step(error):
    def step(self):  # the first step trains (tick 0 writes a snapshot), the next fails
        if self.cur_nimg > 0:
            raise error
        real_step(self)
    return step


real_step, lines, statuses = training.TrainingRun.step, {}, {}
for name, error in [("oom", RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                          "you tried to allocate 2147483648 bytes.")),
                    ("bug", RuntimeError("a bug, not a lack of memory"))]:
    training.TrainingRun.step = failing_step(error)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = train_command.main([f"--outdir={WORK / name}", *flags])
    except RuntimeError as e:
        status = f"raised {type(e).__name__}: {e}"
    finally:
        training.TrainingRun.step = real_step
    last = [line.rsplit("\r", 1)[-1] for line in err.getvalue().splitlines()]
    lines[name] = [line for line in last if line.strip() and " kimg [" not in line]
    statuses[name] = status
    print(name, status, lines[name])
(oom_dir,) = (WORK / "oom").iterdir()
assert statuses["oom"] == 1 and len(lines["oom"]) == 1
assert "--batch-gpu" in lines["oom"][0]
assert (oom_dir / "network-snapshot-000000.json").exists()
assert statuses["bug"] == "raised RuntimeError: a bug, not a lack of memory"

# %% [markdown]
# ## A7.3 The statistics of a tick
#
# Each tick's row has the losses collected by `Stats` (Chapter 7.5) and, reported once by rank
# 0 in the same `{"num", "mean", "std"}` layout, the progress, the timing (seconds per tick and
# per kimg, the time spent in the previous maintenance), the process's memory (with `psutil`;
# left out without it) and, on CUDA, the peak GPU memory since the last tick. The log line
# shows the same numbers as the official loop's.

# %% tags=["export"]
import math
import time


def _memory_gb():
    """Resident memory of this process in GiB; None without psutil (left out then)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _gpu_memory(device) -> dict:
    """Peak GPU memory since the last tick, in GiB (nothing on a CPU)."""
    if device.type != "cuda":
        return {}
    gib = 2**30
    peak = {"Resources/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / gib,
            "Resources/peak_gpu_mem_reserved_gb":
                torch.cuda.max_memory_reserved(device) / gib}
    torch.cuda.reset_peak_memory_stats()
    return peak


def _tick_row(run, timing: dict) -> dict:
    """The tick's statistics in the official layout: the losses over all ranks, and
    the progress, timing and memory of rank 0."""
    now = time.time()
    row = run.stats.collect(stat_names())
    tick_sec = now - timing["tick_start"]
    images = max(run.cur_nimg - run.tick_start_nimg, 1)
    fields = {"Progress/tick": run.cur_tick, "Progress/kimg": run.cur_nimg / 1e3,
              "Timing/total_sec": now - timing["start"],
              "Timing/sec_per_tick": tick_sec,
              "Timing/sec_per_kimg": tick_sec / images * 1e3,
              "Timing/maintenance_sec": timing["maintenance"]}
    if (memory := _memory_gb()) is not None:
        fields["Resources/cpu_mem_gb"] = memory
    fields.update(_gpu_memory(run.device))
    for name, value in fields.items():  # reported once, by rank 0
        row[name] = {"num": 1.0, "mean": float(value), "std": 0.0}
    row["timestamp"] = now
    return row


def _log_line(run, row: dict) -> str:
    """The tick's status line, as the official loop prints it."""
    mean = {k: v["mean"] for k, v in row.items() if isinstance(v, dict)}
    memory = mean.get("Resources/cpu_mem_gb", math.nan)
    return (f"tick {run.cur_tick:<5d} kimg {run.cur_nimg / 1e3:<9.1f} "
            f"loss {mean.get('Loss/loss', math.nan):<8.4f} "
            f"sec/tick {mean['Timing/sec_per_tick']:<7.1f} "
            f"sec/kimg {mean['Timing/sec_per_kimg']:<7.2f} "
            f"maintenance {mean['Timing/maintenance_sec']:<6.1f} cpumem {memory:<6.2f}")


# %% [markdown]
# **Check** — a row of a tick of 512 images that took 2 seconds: the losses, progress and
# seconds per kimg, every entry in the official layout, and the log line.

# %% tags=["hide-input"]
from edm_lit.training import Stats, _log_line, _tick_row

stats = Stats("cpu")
stats.add("Loss/loss", torch.tensor([0.5, 0.7]))
run = types.SimpleNamespace(stats=stats, cur_tick=3, cur_nimg=1536,
                            tick_start_nimg=1024, device=torch.device("cpu"))
now = time.time()
row = _tick_row(run, {"start": now - 10, "tick_start": now - 2, "maintenance": 0.25})
print(_log_line(run, row))
assert abs(row["Loss/loss"]["mean"] - 0.6) < 1e-6
assert row["Progress/kimg"]["mean"] == 1.536
assert abs(row["Timing/sec_per_kimg"]["mean"] - 2 / 0.512) < 0.1
assert all(set(v) == {"num", "mean", "std"} for k, v in row.items() if k != "timestamp")

# %% [markdown]
# ## A7.4 Book helpers: stand-in data, the quick model, its measures
#
# The chapters share a few helpers that a user of the package does not need; they live in
# `edm_lit.course`. Random images in the official folder layout and in memory stand in for a
# data set where only the sizes matter. `train_quick` is the quick-mode model of Chapters 7–9:
# the command's code path with `QUICK_FLAGS` (the command line of Chapter 7b.5's last example)
# in one torch thread, bitwise reproducible for a torch build and CPU; it loads the final
# snapshot instead if its directory holds one. `tools/make_quick_model.py` commits it to
# `book/results/quick_digits`.
#
# On another CPU (other vector kernels, other summation orders) the thousands of Adam steps
# carry last-bit differences along: a bias whose entries are near zero can differ by per cent
# while the network computes the same function. So `compare_models` measures what matters —
# the denoiser's outputs on fixed inputs at six σ from 0.01 to 50, all weights as one vector —
# and `REPRODUCTION_TOLERANCE` allows relative differences of 2·10⁻⁴, 3·10⁻³ and (the final
# loss) 10⁻⁵: room for rounding, not for another training. `loss_per_bucket` measures any
# denoiser's loss in the σ buckets of the training statistics (Chapter 7.5), on fixed draws.

# %% tags=["export:course"]
import json
import math
from pathlib import Path

import numpy as np
import torch


class RandomImageSet(torch.utils.data.Dataset):
    """n random uint8 images [C, R, R] without labels, in memory, behind the official
    data-set interface. Appendix A7."""

    def __init__(self, n=64, channels=1, resolution=8, seed=0):
        rng = np.random.default_rng(seed)
        shape = (n, channels, resolution, resolution)
        self.images = rng.integers(0, 256, shape, dtype=np.uint8)
        self.name, self.resolution, self.num_channels = "random", resolution, channels
        self.label_dim, self.has_labels = 0, False

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].copy(), np.zeros([0], dtype=np.float32)


def random_image_folder(root, n=16, resolution=32, channels=3, classes=10,
                        seed=0) -> Path:
    """n random PNG images in the official folder layout, with dataset.json labels when
    classes > 0. Appendix A7."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        shape = (resolution, resolution, channels)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(
            root / f"img{i:05d}.png")
        labels.append([f"img{i:05d}.png", int(i % max(classes, 1))])
    if classes:
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


# %% tags=["export:course"]
QUICK_FLAGS = dict(data="digits", arch="ddpmpp-tiny", cond=False, duration=0.03,
                   batch=64, lr=2e-3, lr_rampup=0.001, ema=0.002, dropout=0.0,
                   augment=0.0, tick=5, snap=3, dump=6, workers=1, grid=64)


def train_quick(run_dir, seed: int = 0, log=None, device="cpu", **overrides):
    """Train (or load, if done before) the book's quick-mode model: the tiny DDPM++ on
    the digits. Appendix A7.

    `python -m edm_lit.train --outdir=RUN_DIR --nosubdir --seed=SEED` with
    QUICK_FLAGS (+ overrides) under OMP_NUM_THREADS=1; returns the EMA network of the
    final snapshot.
    Bitwise reproducible for a torch build and CPU (the committed model,
    book/results/quick_digits); another `device` gives a close one.
    """
    from edm_lit.checkpoints import load_network
    from edm_lit.files import write_atomic
    from edm_lit.training import TrainingRun, build_options

    flags = {**QUICK_FLAGS, **overrides, "outdir": str(run_dir), "nosubdir": True,
             "seed": int(seed)}
    kimg = max(int(flags["duration"] * 1000), 1)
    final = Path(run_dir) / f"network-snapshot-{kimg:06d}.json"
    if not final.exists():
        options = build_options(flags, device=device)
        text = json.dumps(options, indent=2) + "\n"
        write_atomic(Path(run_dir) / "training_options.json", text.encode())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same rounding on every machine
        try:
            TrainingRun(**options, device=torch.device(device), log=log).run()
        finally:
            torch.set_num_threads(threads)
    return load_network(final)


# %% tags=["export:course"]
# How close a rerun of the quick model must be to the committed one (relative L2).
REPRODUCTION_TOLERANCE = {"outputs": 2e-4, "weights": 3e-3, "final_loss": 1e-5}


@torch.no_grad()
def compare_models(a, b, sigmas=(0.01, 0.1, 0.5, 1.0, 5.0, 50.0), n: int = 64,
                   seed: int = 0) -> dict:
    """How far denoiser `a` is from the reference `b`, as relative L2 differences.
    Appendix A7.

    {"weights": over all floating-point tensors together, "worst_tensor": (name, value)
    of the largest single tensor, "outputs": {sigma: |D_a - D_b| / |D_b|}} on n fixed
    inputs x ~ N(0, (sigma_data^2 + sigma^2) I) (one-hot labels cycling if conditional).
    """
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sb):
        raise ValueError("compare_models: the two networks have different tensors "
                         "(not the same architecture)")
    keys = [k for k in sb if sb[k].is_floating_point()]
    diff = {k: (sa[k].double() - sb[k].double()).norm().item() for k in keys}
    size = {k: sb[k].double().norm().item() for k in keys}
    per_tensor = {k: diff[k] / max(size[k], 1e-30) for k in keys}
    moved, scale = sum(d**2 for d in diff.values()), sum(s**2 for s in size.values())
    total = math.sqrt(moved / scale)
    g = torch.Generator().manual_seed(seed)
    device = next(b.parameters()).device
    labels = None
    if b.label_dim:
        labels = torch.eye(b.label_dim)[torch.arange(n) % b.label_dim].to(device)
    outputs = {}
    for sigma in sigmas:
        scale = math.sqrt(getattr(b, "sigma_data", 0.5) ** 2 + sigma**2)
        shape = [n, b.img_channels, b.img_resolution, b.img_resolution]
        x = (torch.randn(shape, generator=g) * scale).to(device)
        s = torch.full([n], float(sigma), device=device)
        da, db = a(x, s, labels).double(), b(x, s, labels).double()
        outputs[float(sigma)] = ((da - db).norm() / db.norm()).item()
    worst = max(per_tensor.items(), key=lambda kv: kv[1])
    return {"weights": total, "worst_tensor": worst, "outputs": outputs}


# %% tags=["export:course"]
@torch.no_grad()
def loss_per_bucket(denoise, data: torch.Tensor, n: int = 512, seed: int = 1,
                    P_mean: float = -1.2, P_std: float = 1.2,
                    sigma_data: float = 0.5) -> np.ndarray:
    """Weighted loss (Eq. 8) per pixel of `denoise` on `data` in each SIGMA_BUCKETS
    bucket, as Loss/sigma_* reports it. Appendix A7.

    Per bucket: n images y of `data` ([N, C, H, W] in [-1, 1]), sigma from p_train (ln
    sigma ~ N(P_mean, P_std^2)) restricted to the bucket, x = y + sigma * noise. The
    draws depend on `seed` only, so denoisers compare pairwise. `denoise(x, sigma)` gets
    float64 x [n, C, H, W] and sigma [n, 1, 1, 1].
    """
    from edm_lit.training import SIGMA_BUCKETS

    g = torch.Generator().manual_seed(seed)
    data = data.double()
    out = []
    for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
        z = torch.tensor([math.log(lo), math.log(hi)], dtype=torch.float64)
        cdf_lo, cdf_hi = torch.special.ndtr((z - P_mean) / P_std)
        u = cdf_lo + (cdf_hi - cdf_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        sigma = (P_mean + P_std * torch.special.ndtri(u)).exp().clamp(lo, hi)
        sigma = sigma.reshape(n, 1, 1, 1)
        y = data[torch.randint(len(data), (n,), generator=g)]
        x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        out.append((weight * (denoise(x, sigma).double() - y).square()).mean().item())
    return np.array(out)


# %% [markdown]
# **Check** — the committed quick model was made with `QUICK_FLAGS`; a network compared with
# itself differs by 0 and with a slightly perturbed copy by about the perturbation, and another
# architecture is refused; the loss per bucket of the data's own ideal denoiser is about 0 at
# small σ and below that of the identity (returning the noisy image), which pays
# $\lambda(\sigma)\sigma^2 = 1 + \sigma^2/\sigma_\text{data}^2$ per pixel: about 1 at the smallest σ.

# %% tags=["hide-input"]
import copy

from edm_lit.course import (QUICK_FLAGS, RandomImageSet, compare_models,
                            loss_per_bucket)
from edm_lit.framework import GaussianMixture

meta = json.loads(Path("results/quick_digits.meta.json").read_text())
assert meta["flags"] == QUICK_FLAGS
a = EDMPrecond(8, 1, **{**training.ARCH_PRESETS["ddpmpp-tiny"], "model_channels": 8})
a, b = a.eval(), copy.deepcopy(a.eval())  # eval: no dropout
with torch.no_grad():
    for p in b.parameters():
        p.mul_(1 + 1e-3)
same, near = compare_models(a, a), compare_models(b, a)
print(f"itself: weights {same['weights']:.1e}; scaled by 1+1e-3: weights "
      f"{near['weights']:.1e}, outputs up to {max(near['outputs'].values()):.1e}")
assert same["weights"] == 0 and max(same["outputs"].values()) == 0
assert abs(near["weights"] - 1e-3) < 1e-6
try:
    compare_models(a, wide)
    raise AssertionError("another architecture must be refused")
except ValueError as e:
    print(e)
data = torch.from_numpy(RandomImageSet(n=32).images).double() / 127.5 - 1
ideal = loss_per_bucket(GaussianMixture.from_data(data).denoise, data, n=128)
identity = loss_per_bucket(lambda x, s: x, data, n=128)
print("ideal:", np.round(ideal, 4), "\nidentity:", np.round(identity, 2))
assert ideal[0] < 1e-6 and abs(identity[0] - 1) < 0.05  # λ(σ)σ² = 1 + σ²/σ_d² -> 1
assert np.all(np.diff(identity) > 0) and np.all(ideal < identity)
