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
