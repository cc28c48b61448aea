"""Bad inputs against the `edm-lit` command line, each classified: the table of issue 15, for any source tree.

    python benchmarks/bad_input_survey.py [--tree DIR] [--only SURFACE ...] [--out FILE] [--timeout 60]

Each case builds its input in a fresh folder, runs `python -m edm_lit.cli ...` from --tree (default: this
checkout) in a subprocess, and is classified by what a user sees:

- `one-line error`: a non-zero exit with one line on stderr (progress bars and warnings aside), no traceback;
- `correct`: exit 0 and the written result checked right (pixels, labels, paths, files kept);
- `traceback`, `hang` (killed after --timeout seconds), `silent wrong` (exit 0, wrong result),
  `data loss` (a file of an earlier run or of the input lost or replaced), `other` (e.g. several lines).

Cases that must be refused count as `correct` only if they are refused; cases with one right answer count
as `one-line error` if refused. Writes a JSON list of {surface, case, outcome, detail} and prints the table.
This is a measurement, not a test: the tests in tests/ pin each case.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = []


def case(surface, expect="error"):
    """Register a case `fn(w, run)`; `expect`: 'error' (must be refused), 'ok' (one right result) or
    'either' (a right result, or a refusal in one line)."""
    def register(fn):
        CASES.append((surface, fn.__name__, expect, fn))
        return fn
    return register


class Wrong(Exception):
    """A run that exited 0 with a wrong result ('silent wrong') or lost data ('data loss')."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind


# ── inputs ──

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(path: Path, array=None, mode=None, bits=None, header_size=None):
    """A PNG with Pillow, or (header_size) a valid-looking file whose header declares a huge image."""
    import PIL.Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if header_size is not None:
        w, h = header_size
        body = zlib.compress(b"\x00" * 64)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                         + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b""))
        return path
    image = PIL.Image.fromarray(array) if mode is None else PIL.Image.fromarray(array).convert(mode)
    if bits == 16:
        image = PIL.Image.fromarray(array.astype(np.uint16))
    image.save(path)
    return path


def folder_of_digits(root: Path, n=12, size=8):
    rng = np.random.default_rng(0)
    for i in range(n):
        png(root / str(i % 2) / f"{i:03d}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def cifar(path: Path, data, labels, member_is_dir=False):
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            name = f"cifar-10-batches-py/data_batch_{b}"
            info = tarfile.TarInfo(name)
            if member_is_dir and b == 1:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            blob = pickle.dumps({"data": data, "labels": labels}, protocol=2)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def quick_network():
    return str(ROOT / "book" / "results" / "quick_digits.json")


# official_layout_pickle moved from edm_lit.checkpoints to edm_lit.course; the survey also runs older trees
LAYOUT_PICKLE = ("try:\n    from edm_lit.course import official_layout_pickle\n"
                 "except ImportError:\n    from edm_lit.checkpoints import official_layout_pickle")


def altered_network(w: Path, tree: Path, how: str) -> str:
    """The quick model with NaN weights ('nan') or only its inner U-Net pickled ('inner')."""
    code = (f"import sys, torch; sys.path.insert(0, {str(tree)!r})\n"
            "from edm_lit.checkpoints import load_network, save_network\n"
            f"{LAYOUT_PICKLE}\n"
            f"net = load_network({quick_network()!r})\n"
            f"if {how!r} == 'nan':\n"
            "    [p.data.fill_(float('nan')) for p in net.parameters()]\n"
            f"    save_network(net, {str(w / 'nan')!r})\n"
            "else:\n"
            f"    open({str(w / 'inner.pkl')!r}, 'wb').write(official_layout_pickle({{'ema': net.model}}))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return str(w / "nan.json") if how == "nan" else str(w / "inner.pkl")


def digits_zip(w: Path, run) -> str:
    dest = w / "digits.zip"
    if not dest.exists():
        run(["dataset", "--source=digits", f"--dest={dest}"], check=True)
    return str(dest)


TRAIN = ["train", "--arch=ddpmpp-tiny", "--batch=16", "--duration=0.00004", "--tick=1", "--snap=1", "--dump=1",
         "--augment=0", "--dropout=0", "--grid=0", "--seed=0"]


# ── edm-lit dataset ──

@case("dataset", "ok")
def png_16bit_grey(w, run):
    png(w / "src" / "a.png", np.full((8, 8), 1000, np.uint16), bits=16)
    png(w / "src" / "b.png", np.full((8, 8), 65535, np.uint16), bits=16)
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out'}"])
    values = sorted(int(np.asarray(__import__("PIL.Image").Image.open(p)).max()) for p in (w / "out").rglob("*.png"))
    if values[-1] != 255 or values[0] not in (3, 4):
        raise Wrong("silent wrong", f"16-bit 1000 and 65535 became {values}")


@case("dataset", "ok")
def png_palette(w, run):
    import PIL.Image

    (w / "src").mkdir()
    image = PIL.Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    image.save(w / "src" / "a.png")
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out'}"])
    pixel = np.asarray(PIL.Image.open(next((w / "out").rglob("*.png"))).convert("RGB"))[0, 0].tolist()
    if pixel != [200, 10, 30]:
        raise Wrong("silent wrong", f"palette colour (200, 10, 30) written as {pixel}")


@case("dataset", "ok")
def png_1bit(w, run):
    import PIL.Image

    (w / "src").mkdir()
    PIL.Image.fromarray(np.eye(8, dtype=bool)).convert("1").save(w / "src" / "a.png")
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out'}"])
    values = np.unique(np.asarray(PIL.Image.open(next((w / "out").rglob("*.png"))))).tolist()
    if values != [0, 255]:
        raise Wrong("silent wrong", f"1-bit image written with values {values}")


@case("dataset")
def cifar_float_pixels(w, run):
    cifar(w / "c.tar.gz", np.full((4, 3072), 0.5, np.float64), [0, 1, 2, 3])
    run(["dataset", f"--source={w / 'c.tar.gz'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def cifar_pixels_above_255(w, run):
    cifar(w / "c.tar.gz", np.full((4, 3072), 300, np.int64), [0, 1, 2, 3])
    run(["dataset", f"--source={w / 'c.tar.gz'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def cifar_negative_label(w, run):
    cifar(w / "c.tar.gz", np.zeros((4, 3072), np.uint8), [0, -1, 2, 3])
    run(["dataset", f"--source={w / 'c.tar.gz'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def cifar_labels_short(w, run):
    cifar(w / "c.tar.gz", np.zeros((4, 3072), np.uint8), [0, 1])
    run(["dataset", f"--source={w / 'c.tar.gz'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def cifar_member_is_directory(w, run):
    cifar(w / "c.tar.gz", np.zeros((4, 3072), np.uint8), [0, 1, 2, 3], member_is_dir=True)
    run(["dataset", f"--source={w / 'c.tar.gz'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def png_header_100000_squared(w, run):
    folder_of_digits(w / "src")
    png(w / "src" / "0" / "bomb.png", header_size=(100_000, 100_000))
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def fifo_in_folder(w, run):
    folder_of_digits(w / "src")
    os.mkfifo(w / "src" / "0" / "pipe.png")
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def dest_in_proc(w, run):
    run(["dataset", "--source=digits", "--dest=/proc/edm_lit_survey.zip"])


@case("dataset")
def dest_below_a_file(w, run):
    (w / "file").write_text("")
    run(["dataset", "--source=digits", f"--dest={w / 'file' / 'out.zip'}"])


@case("dataset")
def resolution_20_digits(w, run):
    run(["dataset", "--source=digits", f"--dest={w / 'o.zip'}", "--resolution=" + "9" * 20 + "x8"])


@case("dataset")
def resolution_65536_squared(w, run):
    run(["dataset", "--source=digits", f"--dest={w / 'o.zip'}", "--resolution=65536x65536", "--max-images=1"])


@case("dataset")
def resolution_1x1(w, run):
    run(["dataset", "--source=digits", f"--dest={w / 'o.zip'}", "--resolution=1x1"])


def as_in_a_terminal():
    """In the command's process: Ctrl-C (SIGINT) acts as in a terminal. A survey started in the background
    (`cmd &` in a script) runs with SIGINT ignored, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_partial(w: Path, proc, limit=60):
    """Until the converter has started writing (a new hidden or partial file beside --dest)."""
    end = time.time() + limit
    while time.time() < end and proc.poll() is None:
        if any(p.name.startswith(".") or "partial" in p.name for p in w.iterdir()):
            time.sleep(0.05)
            return
        time.sleep(0.01)


@case("dataset", "ok")
def killed_then_rerun(w, run):
    """SIGKILL mid-write, then a second run to the same place: no partial file of the dead run may remain."""
    folder_of_digits(w / "src", n=3000, size=32)
    proc = run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"], start=True)
    wait_for_partial(w, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])
    leftovers = [p.name for p in w.iterdir() if p.name.startswith(".") or "partial" in p.name]
    if leftovers:
        raise Wrong("data loss", f"left behind after SIGKILL and a later run: {leftovers}")


@case("dataset", "ok")
def interrupted_with_sigint(w, run):
    folder_of_digits(w / "src", n=3000, size=32)
    proc = run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"], start=True)
    wait_for_partial(w, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    left = [p.name for p in w.iterdir() if p.name != "src"]
    if "Traceback" in err:
        raise Wrong("traceback", "SIGINT printed a traceback")
    if left or len([x for x in err.splitlines() if x.strip() and "%" not in x]) != 1:
        raise Wrong("silent wrong", f"after SIGINT: files {left}, stderr {err.strip()[-200:]!r}")


@case("dataset", "ok")
def two_runs_one_dest(w, run):
    folder_of_digits(w / "src", n=5000, size=32)
    procs = [run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"], start=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    wrote = sum("wrote" in out for _, out in results)
    if wrote != 1:
        raise Wrong("data loss", f"{wrote} of 2 concurrent runs reported writing the same --dest")


@case("dataset")
def zip_with_a_duplicate_member(w, run):
    import warnings
    import zipfile

    png(w / "one.png", np.zeros((8, 8), np.uint8))
    with zipfile.ZipFile(w / "src.zip", "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        z.write(w / "one.png", "a.png")
        z.writestr("a.png", (w / "one.png").read_bytes())
    run(["dataset", f"--source={w / 'src.zip'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def labels_json_with_a_huge_class(w, run):
    folder_of_digits(w / "src", n=2)
    names = sorted(str(p.relative_to(w / "src")) for p in (w / "src").rglob("*.png"))
    (w / "src" / "dataset.json").write_text(json.dumps({"labels": [[n, 10**30] for n in names]}))
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def labels_json_nested_deeply(w, run):
    folder_of_digits(w / "src", n=2)
    (w / "src" / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def broken_link_in_folder(w, run):
    folder_of_digits(w / "src")
    (w / "src" / "0" / "gone.png").symlink_to(w / "nowhere.png")
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


@case("dataset")
def link_loop_in_folder(w, run):
    folder_of_digits(w / "src")
    (w / "src" / "0" / "loop").symlink_to(w / "src")
    run(["dataset", f"--source={w / 'src'}", f"--dest={w / 'out.zip'}"])


# ── edm-lit train ──

@case("train", "ok")
def two_runs_one_outdir(w, run):
    data = digits_zip(w, run)
    procs = [run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={data}", f"--seed={s}"], start=True) for s in (1, 2)]
    for p in procs:
        p.wait(timeout=300)
    dirs = sorted(p.name for p in (w / "runs").iterdir())
    seeds = sorted(json.loads((w / "runs" / d / "training_options.json").read_text())["seed"] for d in dirs)
    if len(dirs) != 2 or seeds != [1, 2]:
        raise Wrong("data loss", f"two concurrent runs: run dirs {dirs}, seeds recorded {seeds}")


@case("train")
def nosubdir_into_a_run(w, run):
    data = digits_zip(w, run)
    run(TRAIN + [f"--outdir={w / 'run'}", f"--data={data}", "--nosubdir", "--duration=0.0001"], check=True)
    before = (w / "run" / "stats.jsonl").read_text()
    run(TRAIN + [f"--outdir={w / 'run'}", f"--data={data}", "--nosubdir", "--seed=5"])
    if (w / "run" / "stats.jsonl").read_text() != before:
        raise Wrong("data loss", "stats.jsonl of the earlier run was overwritten")


@case("train")
def outdir_in_proc(w, run):
    run(TRAIN + ["--outdir=/proc/edm_lit_survey", f"--data={digits_zip(w, run)}"])


@case("train")
def outdir_is_a_file(w, run):
    (w / "file").write_text("")
    run(TRAIN + [f"--outdir={w / 'file'}", f"--data={digits_zip(w, run)}"])


def _state_run(w, run):
    data = digits_zip(w, run)
    run(TRAIN + [f"--outdir={w / 'run'}", f"--data={data}", "--nosubdir", "--duration=0.00008"], check=True)
    states = sorted((w / "run").glob("training-state-*.json"))
    return data, states


@case("train")
def state_header_missing_keys(w, run):
    data, states = _state_run(w, run)
    header = json.loads(states[-1].read_text())
    del header["tensors_sha256"]
    states[-1].write_text(json.dumps(header))
    run(TRAIN + [f"--outdir={w / 'again'}", f"--data={data}", f"--resume={states[-1]}"])


@case("train")
def state_header_tensors_5(w, run):
    data, states = _state_run(w, run)
    header = json.loads(states[-1].read_text())
    header["tensors"] = 5
    states[-1].write_text(json.dumps(header))
    run(TRAIN + [f"--outdir={w / 'again'}", f"--data={data}", f"--resume={states[-1]}"])


@case("train", "ok")
def resume_dir_past_a_crafted_newer_state(w, run):
    data, states = _state_run(w, run)
    newer = w / "run" / "training-state-999999.json"
    newer.write_text(json.dumps({"format": "edm_lit-training-state", "tensors": 5}))
    run(TRAIN + [f"--outdir={w / 'again'}", f"--data={data}", f"--resume={w / 'run'}", "--duration=0.0001"])


for _flag, _value in [("duration", "inf"), ("ema", "inf"), ("lr-rampup", "inf"), ("ema", "nan"),
                      ("lr-rampup", "nan"), ("cbase", "0"), ("cbase", "-4"), ("seed", "1" * 23), ("lr", "inf"),
                      ("lr", "nan")]:
    def _flag_case(w, run, flag=_flag, value=_value):
        run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", f"--{flag}={value}"])
    _flag_case.__name__ = f"flag_{_flag.replace('-', '_')}_{'digits23' if len(_value) > 20 else _value}"
    case("train")(_flag_case)


@case("train")
def data_with_a_bomb_header(w, run):
    folder_of_digits(w / "src")
    png(w / "src" / "0" / "bomb.png", header_size=(100_000, 100_000))
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={w / 'src'}"])


@case("train")
def data_with_a_fifo(w, run):
    folder_of_digits(w / "src")
    os.mkfifo(w / "src" / "0" / "pipe.png")
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={w / 'src'}"])


@case("train")
def transfer_of_a_nan_network(w, run):
    net = altered_network(w, run.tree, "nan")
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", f"--transfer={net}", "--arch=ddpmpp-tiny",
                 "--cond=0"])
    snapshots = list((w / "runs").rglob("network-snapshot-*.json")) if (w / "runs").exists() else []
    if snapshots:
        raise Wrong("silent wrong", f"a NaN network was trained on and saved: {snapshots[0].name}")


@case("train")
def desc_leaving_outdir(w, run):
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", "--desc=../../escaped"])
    if list(w.glob("escaped*")) or list(w.parent.glob("*escaped*")):
        raise Wrong("silent wrong", "a run directory was created outside --outdir")


@case("train")
def grid_negative(w, run):
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", "--grid=-1"])


@case("train")
def cres_with_a_zero(w, run):
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", "--cres=1,0"])


@case("train")
def tick_zero(w, run):
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", "--tick=0"])


@case("train", "ok")
def batch_gpu_larger_than_batch(w, run):
    run(TRAIN + [f"--outdir={w / 'runs'}", f"--data={digits_zip(w, run)}", "--batch-gpu=64"])
    if not list((w / "runs").rglob("network-snapshot-*.json")):
        raise Wrong("silent wrong", "no snapshot written")


# ── edm-lit generate ──

@case("generate", "ok")
def seeds_0_to_10_to_12(w, run):
    """A huge seed range is iterated lazily: the first images appear at once (then the run is stopped)."""
    proc = run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}",
                "--seeds=0-999999999999"], start=True)
    end = time.time() + 60
    while time.time() < end and proc.poll() is None and not list(w.glob("out/**/*.png")):
        time.sleep(0.1)
    started = bool(list(w.glob("out/**/*.png")))
    proc.kill()
    _, err = proc.communicate()
    if "Traceback" in err:
        raise Wrong("traceback", err.strip().splitlines()[-1][:200])
    if not started:
        raise Wrong("hang", "no image within 60 s")


@case("generate")
def seeds_malformed(w, run):
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=1-2-3"])
    if "invalid parse_seeds value" in run.last_err:
        raise Wrong("other", "generic argparse message")


@case("generate")
def inner_network_saved(w, run):
    run(["generate", f"--network={altered_network(w, run.tree, 'inner')}", f"--outdir={w / 'out'}", "--seeds=0-3"])


@case("generate")
def outdir_is_a_file(w, run):
    (w / "file").write_text("")
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'file'}", "--seeds=0-3"])


@case("generate")
def npz_in_proc(w, run):
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=0-3",
         "--npz=/proc/edm_lit_survey.npz"])
    if list((w / "out").glob("*.png")) if (w / "out").exists() else []:
        raise Wrong("silent wrong", "images were generated before the --npz output was found unwritable")


@case("generate")
def nan_network(w, run):
    run(["generate", f"--network={altered_network(w, run.tree, 'nan')}", f"--outdir={w / 'out'}", "--seeds=0-3"])
    if run.last_rc == 0:
        raise Wrong("silent wrong", "PNGs written from a NaN network")


@case("generate", "either")
def npz_named_as_a_folder(w, run):
    (w / "dir").mkdir()
    out = run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=0-1",
               f"--npz={w / 'dir'}"])
    written = [p for p in w.rglob("*.npz")]
    if written and not any(str(p) in out for p in written):
        raise Wrong("silent wrong", f"wrote {[str(p) for p in written]} but reported otherwise")


@case("generate")
def class_out_of_range(w, run):
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=0-3", "--class=3"])


@case("generate")
def sigma_min_above_sigma_max(w, run):
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=0-3",
         "--sigma_min=10", "--sigma_max=1"])
    if list(w.glob("out/*.png")):
        raise Wrong("silent wrong", "images written")


@case("generate")
def fp16_and_bf16_together(w, run):
    run(["generate", f"--network={quick_network()}", f"--outdir={w / 'out'}", "--seeds=0-3", "--fp16=1",
         "--bf16=1"])


# ── edm-lit fid ──

def stats_npz(w: Path, run, mu=None, sigma=None, name="r.npz"):
    """A digits-detector reference made by `fid ref`, with mu and/or sigma replaced (other entries kept)."""
    made = w / "made.npz"
    if not made.exists():
        run(["fid", "ref", f"--data={digits_zip(w, run)}", f"--dest={made}", "--detector=digits"], check=True)
    entries = dict(np.load(made, allow_pickle=False))
    entries.update({k: v for k, v in [("mu", mu), ("sigma", sigma)] if v is not None})
    np.savez(w / name, **entries)
    return w / name


def _calc(w, run, ref, extra=()):
    from PIL import Image
    (w / "imgs").mkdir(exist_ok=True)
    for i in range(20):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(w / "imgs" / f"{i}.png")
    return run(["fid", "calc", f"--images={w / 'imgs'}", f"--ref={ref}", "--num=20", "--detector=digits", *extra])


@case("fid")
def calc_batch_0(w, run):
    _calc(w, run, stats_npz(w, run), extra=["--batch=0"])


@case("fid")
def ref_truncated(w, run):
    blob = stats_npz(w, run).read_bytes()
    (w / "r.npz").write_bytes(blob[: len(blob) // 2])
    _calc(w, run, w / "r.npz")


@case("fid")
def ref_is_an_npy(w, run):
    np.save(w / "r.npy", np.zeros(4))
    os.rename(w / "r.npy", w / "r.npz")
    _calc(w, run, w / "r.npz")


@case("fid")
def ref_declares_huge_sigma(w, run):
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1)))
    header["shape"] = (200_000, 200_000)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(w / "r.npz", "w") as z:
        z.writestr("sigma.npy", buffer.getvalue())
        z.writestr("mu.npy", (lambda b: (np.save(b, np.zeros(200_000)), b.getvalue())[1])(io.BytesIO()))
    _calc(w, run, w / "r.npz")


for _what, _mu, _sigma in [("nonsymmetric", np.zeros(64), np.eye(64) + np.triu(np.ones((64, 64)), 1)),
                           ("complex", np.zeros(64, complex), np.eye(64, dtype=complex)),
                           ("boolean", np.zeros(64, bool), np.eye(64, dtype=bool)),
                           ("not_psd", np.zeros(64), -np.eye(64))]:
    def _stats_case(w, run, mu=_mu, sigma=_sigma, what=_what):
        _calc(w, run, stats_npz(w, run, mu, sigma))
        if what == "not_psd" and run.last_rc and "r.npz" not in run.last_err:
            raise Wrong("other", "the error does not name the file")
    _stats_case.__name__ = f"ref_{_what}"
    case("fid")(_stats_case)


@case("fid")
def ref_dest_in_proc(w, run):
    run(["fid", "ref", f"--data={digits_zip(w, run)}", "--dest=/proc/edm_lit_survey.npz", "--detector=digits"])


@case("fid", "ok")
def ref_dest_without_extension(w, run):
    out = run(["fid", "ref", f"--data={digits_zip(w, run)}", f"--dest={w / 'noext'}", "--detector=digits"])
    written = list(w.glob("noext*"))
    if not written or not all(str(p) in out for p in written):
        raise Wrong("silent wrong", f"wrote {[p.name for p in written]}, reported: {out.strip()[-200:]!r}")


@case("fid")
def ref_folder_with_a_fifo(w, run):
    folder_of_digits(w / "src")
    os.mkfifo(w / "src" / "0" / "pipe.png")
    run(["fid", "ref", f"--data={w / 'src'}", f"--dest={w / 'r.npz'}", "--detector=digits"])


@case("fid")
def calc_image_with_a_bomb_header(w, run):
    folder_of_digits(w / "imgs", n=20)
    png(w / "imgs" / "0" / "bomb.png", header_size=(100_000, 100_000))
    ref = stats_npz(w, run)
    run(["fid", "calc", f"--images={w / 'imgs'}", f"--ref={ref}", "--detector=digits", "--num=20"])


@case("fid")
def ref_of_another_feature_size(w, run):
    _calc(w, run, stats_npz(w, run, np.zeros(32), np.eye(32)))


@case("fid")
def calc_on_an_empty_folder(w, run):
    (w / "empty").mkdir()
    run(["fid", "calc", f"--images={w / 'empty'}", f"--ref={stats_npz(w, run)}", "--detector=digits"])


# ── edm-lit convert ──

@case("convert", "ok")
def convert_into_a_directory(w, run):
    (w / "dir").mkdir()
    code = (f"import sys; sys.path.insert(0, {str(run.tree)!r})\n"
            "from edm_lit.checkpoints import load_network\n"
            f"{LAYOUT_PICKLE}\n"
            f"net = load_network({quick_network()!r})\n"
            f"open({str(w / 'snap.pkl')!r}, 'wb').write(official_layout_pickle({{'ema': net}}))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    run(["convert", str(w / "snap.pkl"), str(w / "dir")])
    if not list((w / "dir").glob("*.json")):
        raise Wrong("silent wrong", f"wrote {sorted(p.name for p in w.iterdir())} instead of into dir/")


# ── running and classifying ──

class Runner:
    def __init__(self, tree: Path, w: Path, timeout: float):
        self.tree, self.w, self.timeout = tree, w, timeout
        self.env = {**os.environ, "PYTHONPATH": str(tree), "EDM_LIT_CACHE": str(w.parent / "cache"),
                    "OMP_NUM_THREADS": "1"}
        self.last_rc, self.last_err, self.outcome = None, "", None

    def __call__(self, args, check=False, start=False):
        cmd = [sys.executable, "-m", "edm_lit.cli", *args]
        if start:
            return subprocess.Popen(cmd, env=self.env, cwd=self.w, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=as_in_a_terminal)
        run = subprocess.run(cmd, env=self.env, cwd=self.w, capture_output=True, text=True, timeout=self.timeout,
                             preexec_fn=as_in_a_terminal)
        if check and run.returncode:
            raise RuntimeError(f"setup failed: {' '.join(args)}: {run.stderr[-500:]}")
        if not check:
            self.last_rc, self.last_err = run.returncode, run.stderr
        return run.stdout


def error_lines(err: str) -> list:
    lines = [x.strip() for x in err.replace("\r", "\n").splitlines()]
    return [x for x in lines if x and "it/s" not in x and "s/it" not in x and "%|" not in x and "Warning" not in x]


def classify(surface, name, expect, fn, tree: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"survey_{name}_") as tmp:
        w = Path(tmp) / "w"
        w.mkdir()
        run = Runner(tree, w, timeout)
        try:
            fn(w, run)
        except subprocess.TimeoutExpired:
            return {"outcome": "hang", "detail": f"killed after {timeout:.0f} s"}
        except Wrong as e:
            return {"outcome": e.kind, "detail": str(e)}
        except RuntimeError as e:
            return {"outcome": "setup failed", "detail": str(e)}
        err = run.last_err
        if "Traceback" in err:
            return {"outcome": "traceback", "detail": err.strip().splitlines()[-1][:200]}
        if run.last_rc is None:
            return {"outcome": "correct", "detail": ""}
        lines = error_lines(err)
        if run.last_rc == 2 and lines and lines[0].startswith("usage:") and ": error: " in lines[-1]:
            lines = lines[-1:]  # argparse: the usage, then one line saying what is wrong
        if run.last_rc == 0:
            if expect == "error":
                return {"outcome": "silent wrong", "detail": "accepted (exit 0)"}
            return {"outcome": "correct", "detail": ""}
        if len(lines) == 1:
            refused = "one-line error" if expect in ("error", "either") else "refused (one line)"
            return {"outcome": refused, "detail": lines[0][:200]}
        return {"outcome": "other", "detail": f"exit {run.last_rc}, {len(lines)} lines: {' | '.join(lines)[:200]}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree whose edm_lit is run (default: this one)")
    ap.add_argument("--only", nargs="*", help="surfaces (dataset, train, generate, fid, convert) or case names")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for surface, name, expect, fn in CASES:
        if args.only and surface not in args.only and name not in args.only:
            continue
        start = time.time()
        result = classify(surface, name, expect, fn, args.tree.resolve(), args.timeout)
        rows.append({"surface": surface, "case": name, **result, "seconds": round(time.time() - start, 1)})
        print(f"{surface:9s} {name:40s} {result['outcome']:18s} {result['detail'][:90]}", flush=True)
    table = Counter((r["surface"], r["outcome"]) for r in rows)
    outcomes = sorted({r["outcome"] for r in rows})
    print("\n| surface | cases | " + " | ".join(outcomes) + " |")
    print("|---|---|" + "---|" * len(outcomes))
    for surface in dict.fromkeys(r["surface"] for r in rows):
        cells = [str(table[(surface, o)]) for o in outcomes]
        print(f"| {surface} | {sum(table[(surface, o)] for o in outcomes)} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
