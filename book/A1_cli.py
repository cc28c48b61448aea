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
    ("training", "the training loop (training_loop, TrainingRun)", "7, 7b, A7", True),
    ("train", "the command edm-lit train and its flags", "7b, A1, A7", False),
    ("generate", "images at scale, one per seed", "8, A6", True),
    ("fid", "Inception features, FID, reference statistics", "8, A6b", True),
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
# `edm_lit.train` is the command (`python -m edm_lit.train`, `edm-lit train`): this section
# parses its flags, Chapter 7b and Appendix A7 run it; `edm_lit.training` is the loop it drives
# (Chapters 7 and 7b).
# The names, meanings and defaults are the official ones (`TRAIN_DEFAULTS`, Chapter 7.1), and
# so is the spelling of booleans: the official tool parses them with click, which takes
# `--cond=1`, `--cond=true`, `--cond=yes`.

# %% tags=["export:train"]
import argparse
import re

from edm_lit import training


def parse_bool(text: str) -> bool:
    """'1/0', 'true/false', 'yes/no', 'on/off' (any case), as click's BOOL.
    Appendix A1."""
    value = str(text).strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError("expected a boolean (1/0, true/false, yes/no), "
                                     f"got {text!r}")


def parse_int_list(text: str) -> list:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; '' -> [] (which build_options refuses for --cres,
    in one line). Appendix A1."""
    values = []
    if not str(text).strip():
        return values
    for part in str(text).split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        try:
            values += (list(range(int(bounds[1]), int(bounds[2]) + 1)) if bounds
                       else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError("expected integers and ranges such as "
                                             f"1,2,5-7, got {text!r}") from None
    return values


# %% [markdown]
# **Check.** Booleans in click's spellings, lists with ranges; anything else is an argparse
# error (usage message, exit status 2).

# %% tags=["hide-input"]
from edm_lit.train import parse_bool, parse_int_list

assert [parse_bool(t) for t in ["1", "True", "yes", "off", "0"]] == [1, 1, 1, 0, 0]
assert parse_int_list("1,2,5-7") == [1, 2, 5, 6, 7] and parse_int_list(" ") == []
for parse, text in [(parse_bool, "maybe"), (parse_int_list, "1,x")]:
    try:
        parse(text)
        raise AssertionError(f"{text!r} must be refused")
    except argparse.ArgumentTypeError as e:
        print(e)

# %% [markdown]
# The parser has the official groups and help texts, and a group of our additions: `--bf16`
# (bfloat16 autocast), `--lr-rampup` (the ramp-up in Mimg, officially fixed at 10), `--grid`
# (images per snapshot grid) and the speed options of Chapter 7b.

# %% tags=["export:train"]
def _flag(kind, meta, text, **more) -> dict:
    return dict(type=kind, metavar=meta, help=text, **more)


# flag -> argparse keywords, per group, in the official order; the defaults are
# TRAIN_DEFAULTS
TRAIN_FLAGS = {
    "main options": {
        "--outdir": dict(required=True, metavar="DIR",
                         help="where to save the results"),
        "--data": dict(required=True, metavar="ZIP|DIR",
                       help="path to the data set, or 'digits' (quick mode)"),
        "--cond": _flag(parse_bool, "BOOL", "train a class-conditional model"),
        "--arch": dict(choices=sorted(training.ARCH_PRESETS),
                       help="network architecture"),
        "--precond": dict(choices=sorted(training.PRECOND_CLASSES),
                          help="preconditioning and loss function")},
    "hyperparameters": {
        "--duration": _flag(float, "MIMG", "training duration"),
        "--batch": _flag(int, "INT", "total batch size"),
        "--batch-gpu": _flag(int, "INT",
                             "limit batch size per GPU (gradient accumulation)"),
        "--cbase": _flag(int, "INT", "channel multiplier [default: varies]"),
        "--cres": _flag(parse_int_list, "LIST",
                        "channels per resolution [default: varies]"),
        "--lr": _flag(float, "FLOAT", "learning rate"),
        "--ema": _flag(float, "MIMG", "EMA half-life"),
        "--dropout": _flag(float, "FLOAT", "dropout probability"),
        "--augment": _flag(float, "FLOAT", "augment probability"),
        "--xflip": _flag(parse_bool, "BOOL", "enable data-set x-flips")},
    "performance": {
        "--fp16": _flag(parse_bool, "BOOL", "mixed-precision training (CUDA)"),
        "--ls": _flag(float, "FLOAT", "loss scaling"),
        "--bench": _flag(parse_bool, "BOOL", "enable cuDNN benchmarking"),
        "--cache": _flag(parse_bool, "BOOL", "cache data set in CPU memory"),
        "--workers": _flag(int, "INT", "DataLoader worker processes")},
    "I/O": {
        "--desc": _flag(str, "STR", "string to include in result dir name"),
        "--nosubdir": dict(action="store_true",
                           help="do not create a subdirectory for results"),
        "--tick": _flag(int, "KIMG", "how often to print progress"),
        "--snap": _flag(int, "TICKS", "how often to save snapshots"),
        "--dump": _flag(int, "TICKS", "how often to dump state"),
        "--seed": _flag(int, "INT", "random seed [default: random]"),
        "--transfer": _flag(str, "PKL|URL", "transfer learning from a network snapshot "
                            "(ours or an official .pkl)"),
        "--resume": _flag(str, "STATE|DIR", "resume from training-state-NNNNNN.json, "
                          "or the latest complete state in a run directory"),
        "--dry-run": dict(action="store_true", help="print training options and exit")},
    "edm_lit additions": {
        "--bf16": _flag(parse_bool, "BOOL", "bfloat16 autocast (CPU or GPU)"),
        "--lr-rampup": _flag(float, "MIMG", "learning-rate ramp-up (official: 10)"),
        "--grid": _flag(int, "INT", "sample-grid images per snapshot, 0 = none"),
        "--channels-last": _flag(parse_bool, "BOOL",
                                 "network and input images in channels_last format"),
        "--compile": _flag(parse_bool, "BOOL", "torch.compile the trained network"),
        "--fused-adam": _flag(parse_bool, "BOOL",
                              "Adam's fused kernel (torch.optim.Adam(fused=True))")},
}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The official train.py's options (same names, meanings, defaults, groups) and
    ours. Appendix A1."""
    for title, flags in TRAIN_FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, options in flags.items():
            name = flag[2:].replace("-", "_")
            if not options.get("required") and options.get("action") is None:
                options = dict(options, default=training.TRAIN_DEFAULTS[name])
            names = ["-n", flag] if flag == "--dry-run" else [flag]
            group.add_argument(*names, **options)
    return parser


# %% [markdown]
# The numbers are checked one by one before anything is built, in one line that names the flag:
# not a number, not finite, out of range. `build_options` (Chapter 7.1) calls the check, so it
# is part of `edm_lit.training` and holds for a configuration given from Python too.

# %% tags=["export:training"]
import math
import numbers

# Ranges of the numeric flags: (low, high, low excluded); every value must be finite.
_FLOAT_RANGES = {"duration": (0, None, True), "lr": (0, None, True),
                 "ls": (0, None, True), "ema": (0, None, False),
                 "lr_rampup": (0, None, False), "dropout": (0, 1, False),
                 "augment": (0, 1, False)}
# (low, high); None (no value given) is allowed for batch_gpu, cbase and seed. The
# official loop seeds numpy with the seed modulo 2^31 and draws its seeds below 2^31.
_INT_RANGES = {"batch": (1, None), "batch_gpu": (1, None), "cbase": (1, None),
               "tick": (1, None), "snap": (1, None), "dump": (1, None),
               "workers": (1, None), "seed": (0, 2**31 - 1), "grid": (0, 1024)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(f: dict) -> None:
    for name, (low, high, open_low) in _FLOAT_RANGES.items():
        value = f[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
        above = high is not None and value > high
        if value < low or (open_low and value == low) or above:
            bounds = ("(" if open_low else "[") + f"{low}, " + (
                "inf)" if high is None else f"{high}]")
            raise ValueError(f"{_flag(name)} must be in {bounds}, got {value}")
    for name, (low, high) in _INT_RANGES.items():
        value = f[name]
        if value is None and name in ("batch_gpu", "cbase", "seed"):
            continue
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not integer or not low <= value <= (value if high is None else high):
            raise ValueError(f"{_flag(name)} must be an integer in [{low}, "
                             f"{high or 'inf'}], got {value!r}")


def _check_flags(f: dict) -> None:
    """One-line ValueError naming a flag that cannot train."""
    _check_numbers(f)
    cres = f["cres"]
    if cres is not None and (not isinstance(cres, (list, tuple)) or not cres or not all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1
            for m in cres)):
        raise ValueError("--cres must be a non-empty list of integers >= 1 (1,2,2,2), "
                         f"got {cres!r}")
    if f["desc"] is not None and any(c in str(f["desc"]) for c in "/\\\0"):
        raise ValueError("--desc is part of a directory name: no '/', '\\' or NUL, "
                         f"got {f['desc']!r}")


# %% [markdown]
# The way back, `to_argv`, turns flags given as a dictionary (the names of `build_options`)
# into the command line that gives them: Chapter 7b's full mode runs the command this way, and
# a reader can print the command a configuration stands for. `python -m edm_lit.train` parses
# with these flags (`build_parser`, Chapter 7b), and so does the subcommand `edm-lit train` of
# §A1.1, with `add_train_arguments`; both run `run_train` (Appendix A7.2).

# %% tags=["export:train"]
def to_argv(flags: dict) -> list:
    """Flags as a dict (build_options' names) -> the command line giving them:
    ['--batch=32', ...]. Appendix A1."""
    def text(value):
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    argv = []
    for name, value in flags.items():
        switch = name in ("nosubdir", "dry_run")  # flags without a value
        unset = value is None or (switch and not value)
        if name not in training.TRAIN_DEFAULTS or unset:
            continue
        flag = "--" + name.replace("_", "-")
        argv.append(flag if switch else f"{flag}={text(value)}")
    return argv


# %% [markdown]
# **Check.** A configuration goes to the command line and back unchanged; the defaults are the
# official ones; a flag out of range is refused in one line naming it.

# %% tags=["hide-input"]
from edm_lit import train as train_command
from edm_lit.training import TRAIN_DEFAULTS, build_options

flags = dict(data="digits", arch="ddpmpp-tiny", cres=[1, 2], lr=2e-3, xflip=True,
             nosubdir=True, fused_adam=False, seed=3)
argv = train_command.to_argv(flags)
print(" ".join(argv))
parsed = vars(train_command.build_parser().parse_args(["--outdir=runs", *argv]))
assert {k: parsed[k] for k in flags} == flags
defaults = vars(train_command.build_parser().parse_args(["--outdir=o", "--data=d"]))
assert {k: defaults[k] for k in TRAIN_DEFAULTS if k not in ("outdir", "data")} == {
    k: v for k, v in TRAIN_DEFAULTS.items() if k not in ("outdir", "data")}
for bad in [dict(lr=float("inf")), dict(dropout=1.5), dict(seed=-1), dict(cres=[1, 0])]:
    try:
        build_options(dict(data="no-such-data", **bad), device="cpu")
        raise AssertionError(f"{bad} must be refused")
    except ValueError as e:
        print(e)
        assert _flag(next(iter(bad))) in str(e)

# %% [markdown]
# ## A1.3 `edm-lit generate` and `edm-lit fid`
#
# The flags of the official `generate.py` and `fid.py`, with their meanings, and the
# functions they call: `edm_lit.generate.generate` (Chapter 8.1, Appendix A6) and
# `edm_lit.fid.fid_ref` / `fid_calc` (Chapter 8.5). Ours add `--fp16`/`--bf16` and
# `--writers` to `generate` (Appendix A6.3–A6.4) and `--detector`, `--weights` and
# `--allow-detector-mismatch` to `fid` (Chapter 8.4). A value the parser can judge alone
# (a seed list, a batch size, a noise level) is refused by the parser, with exit status 2
# and the flag's name; everything else a user can get wrong (a file that is not there or
# not what it claims, an output that cannot be written, statistics of another feature
# network) ends with exit status 1 and one line `edm-lit generate: error: ...`.

# %% tags=["export:generate"]
import argparse
import math
import sys


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonnegative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _at_least(low):
    """An argparse type: an integer >= `low`, with a message that says so."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            message = f"must be an integer, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return integer


def _seeds_argument(text):
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# %% [markdown]
# `generate` takes the official flags: `--network`, `--outdir`, `--seeds`, `--subdirs`,
# `--class`, `--batch`; the sampler's `--steps`, `--sigma_min`, …, `--S_noise`; and the
# ablation's `--solver`, `--disc`, `--schedule`, `--scaling`, any of which selects the
# `ablation_sampler` (Chapter 2), as in the official script.

# %% tags=["export:generate"]
_SAMPLER_FLAGS = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min",
                 "S_max", "S_noise", "solver", "discretization", "schedule", "scaling")


def _add_sampler_flags(p):
    real = dict(type=_nonnegative, metavar="FLOAT")
    p.add_argument("--steps", dest="num_steps", type=_at_least(1), default=18,
                   metavar="INT", help="sampling steps (18)")
    for bound in ("min", "max"):
        p.add_argument(f"--sigma_{bound}", type=_positive, metavar="FLOAT",
                       help=f"{bound}imum noise level (default: the sampler's)")
    p.add_argument("--rho", type=_positive, default=7.0, metavar="FLOAT",
                   help="time step exponent (7)")
    p.add_argument("--S_churn", default=0.0, help="stochasticity strength (0)", **real)
    p.add_argument("--S_min", default=0.0, help="stochasticity from this sigma (0)",
                   **real)
    p.add_argument("--S_max", default=math.inf, help="stochasticity up to this sigma "
                   "(inf)", **real)
    p.add_argument("--S_noise", type=float, default=1.0, metavar="FLOAT",
                   help="stochastic noise inflation (1)")
    p.add_argument("--solver", choices=["euler", "heun"], help="ablate the ODE solver")
    p.add_argument("--disc", dest="discretization", help="ablate the time steps",
                   choices=["vp", "ve", "iddpm", "edm"])
    p.add_argument("--schedule", choices=["vp", "ve", "linear"],
                   help="ablate the noise schedule sigma(t)")
    p.add_argument("--scaling", choices=["vp", "none"],
                   help="ablate the signal scaling s(t)")


def add_generate_command(subparsers):
    """Register `edm-lit generate` (the official generate.py flags). Appendix A1.3."""
    from edm_lit.train import parse_bool

    p = subparsers.add_parser(
        "generate", help="generate images, one PNG per seed (official flags)",
        description="Generate images with the EDM sampler; an image depends only on "
                    "its seed.")
    p.add_argument("--network", required=True, metavar="PATH|URL",
                   help="official .pkl, our .json/.safetensors, or a URL")
    p.add_argument("--outdir", required=True, metavar="DIR",
                   help="where to write {seed:06d}.png")
    p.add_argument("--seeds", type=_seeds_argument, default="0-63", metavar="LIST",
                   help="e.g. 1,2,5-10 (default 0-63)")
    p.add_argument("--subdirs", action="store_true",
                   help="one subdirectory per 1000 seeds")
    p.add_argument("--class", dest="class_idx", type=_at_least(0), default=None,
                   metavar="INT", help="class label (default: random)")
    p.add_argument("--batch", dest="max_batch_size", type=_at_least(1), default=64,
                   metavar="INT", help="maximum batch size (64)")
    p.add_argument("--npz", default=None, metavar="FILE",
                   help="also write all images, in seed order, to this .npz")
    _add_sampler_flags(p)
    for name, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        p.add_argument(f"--{name}", type=parse_bool, default=False, metavar="BOOL",
                       help=f"network in {dtype} autocast (False)")
    p.add_argument("--writers", type=_at_least(0), default=4, metavar="INT",
                   help="PNG writer threads (4; 0: write in the sampling thread)")
    p.set_defaults(func=run_generate_command)
    return p


def run_generate_command(args):
    """Run `edm-lit generate`: exit status 0, or 1 with one line. Appendix A1.3."""
    from edm_lit.checkpoints import CheckpointError

    sampler_kwargs = {k: getattr(args, k) for k in _SAMPLER_FLAGS}
    batch = args.max_batch_size
    try:
        n = generate(args.network, args.outdir, args.seeds, args.subdirs,
                     args.class_idx, batch, args.npz, fp16=args.fp16, bf16=args.bf16,
                     writers=args.writers, **sampler_kwargs)
    except (CheckpointError, ValueError, OSError) as e:  # OSError: e.g. a full disk
        print(f"edm-lit generate: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print(f"edm-lit generate: error: out of memory at --batch={batch}; use a "
              f"smaller --batch", file=sys.stderr)
        return 1
    also = "" if args.npz is None else f" and {npz_path(args.npz)}"
    print(f"wrote {n} image{'s' * (n != 1)} to {args.outdir}{also}")
    return 0


# %% [markdown]
# `fid ref --data=... --dest=...` writes reference statistics; `fid calc --images=...
# --ref=...` prints the FID with six significant digits, as the official script does;
# `--num` (50,000) and `--seed` choose the images as the official flags do.

# %% tags=["export:fid"]
import sys

from edm_lit.checkpoints import CheckpointError
from edm_lit.data import DatasetError


def _add_fid_flags(q):
    from edm_lit.generate import _at_least

    q.add_argument("--batch", type=_at_least(1), default=64, metavar="INT",
                   help="maximum batch size (64)")
    q.add_argument("--detector", choices=DETECTORS, default="inception",
                   help="feature network: inception (the paper's FID, default) or "
                        "digits (Chapter 8.7: the 8x8 digits classifier, built and "
                        "cached on first use; not comparable with Inception)")
    q.add_argument("--weights", default=None, metavar="PTH",
                   help=f"Inception weights {INCEPTION_FILE} (default: "
                        f"${INCEPTION_ENV} or the cache)")


def add_fid_command(subparsers):
    """Register `edm-lit fid ref|calc` (the official fid.py flags). Appendix A1.3."""
    from edm_lit.generate import _at_least

    p = subparsers.add_parser(
        "fid", help="FID: reference statistics (ref) or the FID of images (calc)",
        description="Frechet Inception Distance with the 2015-12-05 Inception-v3 "
                    "(or, with --detector=digits, the quick-mode digits FID).")
    sub = p.add_subparsers(dest="fid_command", required=True, metavar="ref|calc")
    calc = sub.add_parser("calc", help="FID of images against reference statistics")
    calc.add_argument("--images", required=True, metavar="PATH|ZIP",
                      help="folder, .zip or .npz of images")
    calc.add_argument("--ref", required=True, metavar="NPZ|URL",
                      help="reference statistics (mu, sigma)")
    calc.add_argument("--num", type=_at_least(2), default=50000, metavar="INT",
                      help="number of images to use (50000)")
    calc.add_argument("--seed", type=int, default=0, metavar="INT",
                      help="seed for choosing the images (0)")
    calc.add_argument("--allow-detector-mismatch", action="store_true",
                      help="compare even if another feature network made the "
                           "reference (warns)")
    ref = sub.add_parser("ref", help="reference statistics of a data set (.npz)")
    ref.add_argument("--data", required=True, metavar="PATH|ZIP",
                     help="folder or .zip of the data set's images")
    ref.add_argument("--dest", required=True, metavar="NPZ",
                     help="where to write the statistics ('.npz' appended if missing)")
    for q in (calc, ref):
        _add_fid_flags(q)
    p.set_defaults(func=run_fid_command)
    return p


def run_fid_command(args):
    """Run `edm-lit fid ref|calc`: exit status 0, or 1 with one line. Appendix A1.3."""
    from edm_lit.generate import npz_path

    where = f"edm-lit fid {args.fid_command}"

    def warn(message):
        print(f"{where}: warning: {message}", file=sys.stderr)

    try:
        if args.fid_command == "ref":
            fid_ref(args.data, args.dest, args.batch, weights=args.weights,
                    detector=args.detector)
            print(f"wrote {npz_path(args.dest)}")
        else:
            value = fid_calc(args.images, args.ref, args.num, args.seed, args.batch,
                             weights=args.weights, detector=args.detector, warn=warn,
                             allow_detector_mismatch=args.allow_detector_mismatch)
            print(f"{value:g}")
    except (CheckpointError, DatasetError, ValueError, OSError) as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 1
    return 0


# %% [markdown]
# **Check** — the commands on Chapter 7's committed quick model, as a user runs them:
# `edm-lit dataset` makes the digits data set, `generate` writes 100 images,
# `fid ref --detector=digits` makes a reference that records its detector, and the FID
# that `fid calc` prints equals the one `fid_calc` returns for the same folder, to the six
# digits printed. Then what the parser refuses (exit status 2, naming the flag) and what
# the command refuses (exit status 1, one line): a calc with the Inception detector
# against this digits reference, before any Inception weights are looked for.

# %%
import contextlib
import io
import tempfile
from pathlib import Path

from edm_lit.fid import fid_calc, reference_detector


def run(*argv):
    """`edm-lit ARGV...` in this process: (exit status, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse refuses with exit status 2
            code = e.code
    return code, out.getvalue().strip(), err.getvalue().strip()


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    quick = f"--network={Path('results') / 'quick_digits.json'}"
    data, ref, out = tmp / "digits.zip", tmp / "ref.npz", tmp / "out"
    digits = "--detector=digits"
    assert run("dataset", "--source=digits", f"--dest={data}")[0] == 0
    code, said, _ = run("generate", quick, f"--outdir={out}", "--seeds=0-99")
    assert code == 0 and said == f"wrote 100 images to {out}", said
    assert run("fid", "ref", f"--data={data}", f"--dest={ref}", digits)[0] == 0
    calc = ("fid", "calc", f"--images={out}", f"--ref={ref}", "--num=100")
    code, printed, _ = run(*calc, digits)
    api = fid_calc(out, ref, num=100, detector="digits", progress=False)
    print(f"edm-lit fid calc: {printed}; fid_calc: {api:.6g}")
    assert code == 0 and abs(float(printed) - api) <= 5e-6 * api
    assert reference_detector(ref).startswith("digits:")
    for argv in (["generate", quick, "--outdir=x", "--batch=0"],
                 ["generate", quick, "--outdir=x", "--seeds=5-3"],
                 ["fid", "calc", f"--images={out}", f"--ref={ref}", "--num=1"]):
        code, _, err = run(*argv)
        print(err.splitlines()[-1])
        assert code == 2 and "error: argument --" in err
    code, _, err = run(*calc)  # the default detector, Inception
    print(err.split("; FIDs")[0].replace(str(tmp), "TMP"))
    assert code == 1 and "'digits:" in err and "'inception-pytorch-fid:" in err
