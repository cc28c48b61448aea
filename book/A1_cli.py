# ---
# jupyter:
#   edm_lit:
#     export: cli
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
# # A1. The command line
#
# Installing the package (`pip install .`) puts one command on your path, `edm-lit`. Each
# chapter that builds something a user runs at scale — converting checkpoints, training,
# generating, computing FID — adds a subcommand here, and each subcommand is a thin wrapper
# around a function of the package, so anything the command line does can also be done from
# Python. So far:
#
# | command | does |
# |---|---|
# | `edm-lit info` | prints the package version, the run mode and device (Chapter 0), and the modules |
# | `edm-lit train --outdir=DIR --data=DATA ...` | trains a model with the official `train.py`'s flags, one CPU, one GPU or many under `torchrun` (Chapter 7, `edm_lit.train`) |
# | `edm-lit convert IN OUT` | reads an official snapshot `IN` (a `.pkl` path or URL) *without running code stored in it* and writes its `ema` network in our format, `OUT.json` + `OUT-<hash>.safetensors` (Appendix A2, `edm_lit.checkpoints.convert`); any failure is one line `edm-lit convert: error: ...` and exit status 1 |
# | `edm-lit dataset --source=SRC --dest=DEST` | converts an image folder, a ZIP of images, `cifar-10-python.tar.gz` or `digits` into the official data-set layout (a ZIP or folder of PNGs + `dataset.json`), optionally resized or cropped (`--resolution=WxH`, `--transform`, `--max-images`), written atomically (Chapter 6, `edm_lit.data.convert_dataset`) |
# | `edm-lit generate --network=… --outdir=… --seeds=…` | one PNG per seed with the official `generate.py` flags; an image depends only on its seed (Chapter 8, `edm_lit.generate.generate`) |
# | `edm-lit fid ref --data=… --dest=…`, `edm-lit fid calc --images=… --ref=…` | Inception-v3 reference statistics and FID, official flags and `.npz` layout (Chapter 8, `edm_lit.fid`) |
#
# ## A1.1 `edm-lit`: one entry point
#
# The entry point builds one `argparse` parser with a subparser per command; the commands of
# Chapters 7 and 8 register their own flags (§A1.2, §A1.3).

# %% tags=["export"]
import argparse
import pkgutil
import sys

import torch

import edm_lit
from edm_lit.mode import FULL_ENV, get_mode


def _info(args) -> int:
    try:
        mode = get_mode()
    except ValueError as e:  # a bad EDM_LIT_* variable: one line
        print(f"edm-lit info: error: {e}", file=sys.stderr)
        return 1
    modules = sorted(m.name for m in pkgutil.iter_modules(edm_lit.__path__))
    print(f"edm_lit {edm_lit.__version__} (torch {torch.__version__})")
    print(f"mode: {mode.name}, device: {mode.device}")
    if mode.full:
        for field, var in FULL_ENV.items():
            print(f"  {var}: {getattr(mode, field) if getattr(mode, field) is not None else '(not set)'}")
        if mode.missing(needs=()):
            print("  no CUDA GPU is visible: chapters that need one run their quick version")
    print("modules: " + ", ".join(modules))
    return 0


def _convert(args) -> int:
    from edm_lit.checkpoints import CheckpointError, convert  # imported here: `edm-lit info` stays light

    try:
        config_path, weights_path = convert(args.src, args.dst)
    except (CheckpointError, OSError) as e:  # a refused or unreadable input, or an output that cannot be written
        reason = " ".join(str(e).split()) if isinstance(e, CheckpointError) else f"cannot write {args.dst}: {e}"
        print(f"edm-lit convert: error: {reason}", file=sys.stderr)  # one line, no traceback
        return 1
    print(f"wrote {config_path} and {weights_path}")
    return 0


def _dataset(args) -> int:
    from edm_lit.data import DatasetError, convert_dataset  # imported here: `edm-lit info` stays light

    try:
        dest = convert_dataset(args.source, args.dest, args.resolution, args.transform, args.max_images)
    except (DatasetError, ValueError, ImportError, OSError) as e:
        print(f"edm-lit dataset: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: convert_dataset has removed its temporary file
        print(f"edm-lit dataset: interrupted; nothing was written to {args.dest}", file=sys.stderr)
        return 130
    print(f"wrote {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `edm-lit` argument parser with one subparser per subcommand. Appendix A1."""
    parser = argparse.ArgumentParser(prog="edm-lit", description="EDM: build data sets, train, generate images, compute FID, convert official snapshots.")
    parser.add_argument("--version", action="version", version=f"edm_lit {edm_lit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print version, run mode, device and modules")
    info.set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert an official .pkl snapshot (path or URL) to safetensors + JSON",
                          description="Load the 'ema' network of an official EDM snapshot safely (no code stored in "
                                      "the file is run) and write it as OUT.json + OUT-<hash>.safetensors.")
    conv.add_argument("src", metavar="IN", help="official snapshot: a .pkl path or an http(s) URL")
    conv.add_argument("dst", metavar="OUT", help="output name; OUT.json and OUT-<hash>.safetensors are written")
    conv.set_defaults(func=_convert)
    data = sub.add_parser("dataset", help="convert images to the official data-set layout (ZIP or folder of PNGs)",
                          description="Convert SRC (an image folder, a ZIP of images, cifar-10-python.tar.gz, or "
                                      "'digits') into DEST (.zip or folder), as the official dataset_tool.py does.")
    data.add_argument("--source", required=True, metavar="PATH", help="input folder, .zip, .tar.gz, or 'digits'")
    data.add_argument("--dest", required=True, metavar="PATH", help="output .zip or folder (must not exist)")
    data.add_argument("--resolution", metavar="WxH", help="output resolution, e.g. 32x32")
    data.add_argument("--transform", choices=["center-crop", "center-crop-wide"], help="crop mode")
    data.add_argument("--max-images", type=int, metavar="N", help="convert at most N images")
    data.set_defaults(func=_dataset)
    from edm_lit import train as train_module  # Chapter 7: the official train.py's flags
    train = sub.add_parser("train", help="train a model (the official train.py's flags; torchrun for several GPUs)",
                           description="Train an EDM diffusion model on one CPU, one GPU or, under torchrun, many.")
    train_module.add_train_arguments(train).set_defaults(func=train_module.run_train)
    from edm_lit.fid import add_fid_command
    from edm_lit.generate import add_generate_command

    add_generate_command(sub)  # Chapter 8
    add_fid_command(sub)  # Chapter 8
    return parser


def main(argv=None) -> int:
    """Entry point of the `edm-lit` console script. Appendix A1."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__" and sys.argv[0].endswith("cli.py"):  # `python -m edm_lit.cli`, `torchrun -m edm_lit.cli`
    sys.exit(main())


# %% [markdown]
# **Check** — the commands run, and an unknown subcommand is refused with argparse's usage message
# (exit status 2) rather than a traceback. `convert` on a file that is not an official snapshot
# — here a pickle that would call `os.system`, and a missing file — fails with exit status 1, a
# one-line reason and no output files. (Appendix A2 converts a snapshot in the official layout, and
# so do the tests.)

# %%
import contextlib
import io

assert main(["info"]) == 0
err, exit_code = io.StringIO(), None
try:
    with contextlib.redirect_stderr(err):
        main(["tran"])
except SystemExit as e:
    exit_code = e.code
print(err.getvalue().strip().splitlines()[-1])
assert exit_code == 2 and "invalid choice: 'tran'" in err.getvalue()

import os
import pickle
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    hostile = Path(tmp) / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(os.system))
    for source in [hostile, Path(tmp) / "missing.pkl"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["convert", str(source), str(Path(tmp) / "out")]) == 1
        print(err.getvalue().strip())
    assert not list(Path(tmp).glob("out*"))


# %% [markdown]
# ## A1.2 `edm-lit train`
#
# The flags of the official `train.py`, their checks, and the conversion back to a command line.

# %% [markdown]
# ## A1.3 `edm-lit generate` and `edm-lit fid`
#
# The flags of the official `generate.py` and `fid.py`, and the functions they call.
