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
# chapter that builds something a user runs at scale (converting checkpoints, training,
# generating, computing FID) adds a subcommand here, and each subcommand is a thin wrapper
# around a function of the package, so anything the command line does can also be done from
# Python:
#
# | command | does |
# |---|---|
# | `edm-lit info` | prints the package version, the run mode and device (Chapter 0), and the modules |
# | `edm-lit dataset --source=SRC --dest=DEST` | converts an image folder, a ZIP of images, `cifar-10-python.tar.gz` or `digits` into the official data-set layout (Chapter 6, `edm_lit.data.convert_dataset`) |
# | `edm-lit train --outdir=DIR --data=DATA ...` | trains with the official `train.py`'s flags, on one CPU, one GPU or many under `torchrun` (Chapters 7 and 7b; §A1.2) |
# | `edm-lit generate --network=… --outdir=… --seeds=…` | one PNG per seed with the official `generate.py`'s flags (Chapter 8; §A1.3) |
# | `edm-lit fid ref …`, `edm-lit fid calc …` | Inception-v3 reference statistics and FID, the official flags and `.npz` layout (Chapter 8; §A1.3) |
# | `edm-lit convert IN OUT` | reads an official snapshot (a `.pkl` path or URL) *without running code stored in it* and writes its `ema` network in our format (Appendices A2 and A2b) |
#
# ## A1.1 `edm-lit`: one entry point
#
# The entry point builds one `argparse` parser with a subparser per command; the commands of
# Chapters 7 and 8 register their own flags (§A1.2, §A1.3). Its `--help` ends with the
# package map: each module, what it holds and where the book derives it. The modules marked
# `*` are not library API (`import edm_lit` does not offer their names): the command line,
# the mode switch of the notebooks, and `edm_lit.course`, the helpers the chapters share.
# README.md shows the same table, and a test keeps the two equal. One pair of names needs a
# sentence: `edm_lit.train` is the command `edm-lit train` (also `python -m edm_lit.train`),
# and the loop it runs is `edm_lit.training`.

# %% tags=["export"]
import argparse
import pkgutil
import sys

import torch

import edm_lit
from edm_lit.mode import FULL_ENV, get_mode

_PACKAGE_MAP = [  # module, what it holds, chapter or appendix, library API?
    ("framework", "sigma(t), s(t), the ODE; exact mixture denoisers", "1", True),
    ("samplers", "edm_sampler (Algorithms 1, 2), ablation_sampler", "2, 3", True),
    ("precond", "VP, VE, iDDPM and EDM preconditioning (Table 1)", "4", True),
    ("loss", "VPLoss, VELoss, EDMLoss", "4", True),
    ("networks", "SongUNet (DDPM++, NCSN++), DhariwalUNet (ADM)", "5", True),
    ("data", "data sets (ZIP or folder), the digits, checks", "6, A4", True),
    ("augment", "AugmentPipe: non-leaking augmentation", "6b", True),
    ("training", "the training loop (training_loop, TrainingRun)", "7, 7b", True),
    ("train", "the command edm-lit train and its flags", "7b, A1", False),
    ("generate", "images at scale, one per seed", "8, A6", True),
    ("fid", "Inception features, FID, reference statistics", "8, A6", True),
    ("checkpoints", "official .pkl read as data; our safetensors format", "A2, A2b",
     True),
    ("files", "atomic files, the PNG writer, image grids", "A3", True),
    ("distributed", "torchrun set-up, agreeing on errors", "A5", True),
    ("cli", "the edm-lit command (the console script)", "A1", False),
    ("mode", "the quick or full mode of the notebooks", "0", False),
    ("course", "helpers the chapters share", "many", False),
]
_DESCRIPTION = """\
EDM (Karras et al., NeurIPS 2022) from the literate book edm_lit: build data
sets, train, generate images, compute FID, convert official snapshots. Each
command wraps a function of the package; `edm-lit COMMAND --help` shows its
flags."""
_TRAIN_NOTE = """\
`edm-lit train` is the module edm_lit.train (also `python -m edm_lit.train`,
e.g. under torchrun): the command and its flags. The training loop it runs is
the module edm_lit.training (Chapter 7)."""


def _package_map() -> str:
    """The package map of `edm-lit --help`, within 80 columns."""
    rows = [f"  {m + ('' if api else '*'):<13} {what:<50}  {book}"
            for m, what, book, api in _PACKAGE_MAP]
    head = ("package map: import edm_lit.MODULE (* not library API: `import edm_lit`\n"
            "does not offer its names); book: the chapter or appendix that derives it")
    columns = f"  {'module':<13} {'what':<50}  book"
    return "\n".join([head, "", columns, *rows, "", _TRAIN_NOTE])

# %% [markdown]
# The three commands of this appendix: `info`, `convert` (Appendix A2b) and `dataset`
# (Chapter 6). A failure is one line `edm-lit COMMAND: error: ...` and exit status 1.

# %% tags=["export"]
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
            value = getattr(mode, field)
            print(f"  {var}: {value if value is not None else '(not set)'}")
        if mode.missing(needs=()):
            print("  no CUDA GPU is visible: chapters that need one run their quick "
                  "version")
    print("modules: " + ", ".join(modules))
    return 0


def _convert(args) -> int:
    from edm_lit.checkpoints import CheckpointError, convert  # `info` stays light

    try:
        config_path, weights_path = convert(args.src, args.dst)
    except (CheckpointError, OSError) as e:  # a refused input, or an unwritable output
        reason = " ".join(str(e).split()) if isinstance(e, CheckpointError) \
            else f"cannot write {args.dst}: {e}"
        print(f"edm-lit convert: error: {reason}", file=sys.stderr)  # one line
        return 1
    print(f"wrote {config_path} and {weights_path}")
    return 0


def _dataset(args) -> int:
    from edm_lit.data import DatasetError, convert_dataset  # `info` stays light

    try:
        dest = convert_dataset(args.source, args.dest, args.resolution, args.transform,
                               args.max_images)
    except (DatasetError, ValueError, ImportError, OSError) as e:
        print(f"edm-lit dataset: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: convert_dataset has removed its temporary file
        print(f"edm-lit dataset: interrupted; nothing was written to {args.dest}",
              file=sys.stderr)
        return 130
    print(f"wrote {dest}")
    return 0

# %% [markdown]
# The parser, and the entry point of the console script.

# %% tags=["export"]
def build_parser() -> argparse.ArgumentParser:
    """The `edm-lit` argument parser with one subparser per subcommand. Appendix A1."""
    parser = argparse.ArgumentParser(
        prog="edm-lit", description=_DESCRIPTION, epilog=_package_map(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"edm_lit {edm_lit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="print version, run mode, device and modules"
                   ).set_defaults(func=_info)
    conv = sub.add_parser(
        "convert", help="convert an official .pkl snapshot (path or URL) to our format",
        description="Load the 'ema' network of an official EDM snapshot safely (no "
                    "code stored in the file is run) and write it as OUT.json + "
                    "OUT-<hash>.safetensors.")
    conv.add_argument("src", metavar="IN", help="official snapshot: a .pkl path or URL")
    conv.add_argument("dst", metavar="OUT", help="output name, or an existing folder")
    conv.set_defaults(func=_convert)
    data = sub.add_parser(
        "dataset", help="convert images to the official data-set layout",
        description="Convert SRC (an image folder, a ZIP of images, "
                    "cifar-10-python.tar.gz, or 'digits') into DEST (.zip or folder), "
                    "as the official dataset_tool.py does.")
    data.add_argument("--source", required=True, metavar="PATH",
                      help="input folder, .zip, .tar.gz, or 'digits'")
    data.add_argument("--dest", required=True, metavar="PATH",
                      help="output .zip or folder (must not exist)")
    data.add_argument("--resolution", metavar="WxH", help="output size, e.g. 32x32")
    data.add_argument("--transform", choices=["center-crop", "center-crop-wide"],
                      help="crop mode")
    data.add_argument("--max-images", type=int, metavar="N", help="at most N images")
    data.set_defaults(func=_dataset)
    from edm_lit import train as train_module  # the official train.py's flags (§A1.2)
    train = sub.add_parser(
        "train", help="train a model (the official train.py's flags; torchrun for "
                      "several GPUs)",
        description="Train an EDM diffusion model on one CPU, one GPU or, under "
                    "torchrun, many.")
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


if __name__ == "__main__" and sys.argv[0].endswith("cli.py"):  # python -m edm_lit.cli
    sys.exit(main())

# %% [markdown]
# **Check.** The commands run; an unknown subcommand is refused with argparse's usage
# message (exit status 2), not a traceback; `convert` on a file that is not an official
# snapshot (here a pickle that would call `os.system`, and a missing file) fails with exit
# status 1, a one-line reason and no output files. The help fits 80 columns, and its map
# names every module of the package once, marking exactly those whose names
# `import edm_lit` does not offer.

# %% tags=["hide-input"]
import contextlib
import io
import os
import pickle
import tempfile
from pathlib import Path

assert main(["info"]) == 0
err, exit_code = io.StringIO(), None
try:
    with contextlib.redirect_stderr(err):
        main(["tran"])
except SystemExit as e:
    exit_code = e.code
print(err.getvalue().strip().splitlines()[-1])
assert exit_code == 2 and "invalid choice: 'tran'" in err.getvalue()
with tempfile.TemporaryDirectory() as tmp:
    hostile = Path(tmp) / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(os.system))
    for source in [hostile, Path(tmp) / "missing.pkl"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["convert", str(source), str(Path(tmp) / "out")]) == 1
        print(err.getvalue().strip().replace(tmp, "…"))
    assert not list(Path(tmp).glob("out*"))
os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal's width
text = build_parser().format_help()
print(text)
assert max(len(line) for line in text.splitlines()) <= 80
mapped = {m: api for m, _, _, api in _PACKAGE_MAP}
assert sorted(mapped) == sorted(edm_lit._MODULES) and len(mapped) == len(_PACKAGE_MAP)
offered = set(edm_lit._API.values())  # the modules whose names `import edm_lit` offers
assert {m for m, api in mapped.items() if api} == offered

# %% [markdown]
# ## A1.2 `edm-lit train`
#
# The flags of the official `train.py`, their checks, and the conversion back to a command line.

# %% [markdown]
# ## A1.3 `edm-lit generate` and `edm-lit fid`
#
# The flags of the official `generate.py` and `fid.py`, and the functions they call.
