"""Run every chapter on this machine's GPU and record the result: book/results/gpu_notebooks.json.

Quick mode: each chapter under nbval (`pytest --nbval-lax book/NN.ipynb`), several at once. Full mode
(`--full-data`): Chapters 3 and 6-9 executed with EDM_LIT_MODE=full on the given data set; a chapter that fell back
to its quick version (a `full mode: ... running the quick version` line) is recorded as such, not as full.

    python tools/gpu_notebooks.py [--jobs 8] [--timeout 900] [--chapters 07_training ...]
        [--full-data DATA.zip --kimg 20 [--inception W.pth] [--pretrained NET]] [--out FILE]

Without --pretrained, the full-mode chapters sample a network trained here first with `edm-lit train` for
--kimg (the GPU machine may not reach NVIDIA's server). Each result is written as soon as it is known, so
a run cut short still leaves what it measured. Executed full-mode notebooks go to --work for inspection.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
FULL_CHAPTERS = ["03_stochastic", "06_data", "06b_augment", "07_training", "07b_at_scale",
                 "08_evaluation", "09_reproduction"]
FALLBACK = "running the quick version"


def chapter_names() -> list:
    return sorted(p.stem for p in BOOK.glob("[0-9A-Z]*.ipynb"))


class Record:
    """The JSON file, rewritten atomically after every result."""

    def __init__(self, path: Path, full_inputs: dict | None):
        import torch

        self.path = path
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        self.data = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "commit": commit + ("+changes" if dirty else ""),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "chapters": {}}
        if full_inputs is not None:
            self.data["full"] = {"inputs": full_inputs, "chapters": {}}
        self.write()

    def put(self, where: dict, name: str, entry: dict) -> None:
        where[name] = entry
        self.write()
        print(f"{name}: {entry}", flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def quick_chapter(name: str, timeout: int, env: dict) -> dict:
    """One chapter under nbval in quick mode: pass/fail, seconds, and the failing cells' first lines."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--nbval-lax",
           "--nbval-current-env", f"--nbval-cell-timeout={timeout}", "-q", "-x", f"book/{name}.ipynb"]
    start = time.time()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env={**env, "EDM_LIT_MODE": "quick"}, capture_output=True, text=True,
                             timeout=timeout)
        status, tail = ("pass" if run.returncode == 0 else "fail"), run.stdout[-1500:]
    except subprocess.TimeoutExpired:
        status, tail = "fail", f"timed out after {timeout} s"
    entry = {"status": status, "seconds": round(time.time() - start, 1), "mode": "quick"}
    if status != "pass":
        entry["output_tail"] = tail
    return entry


def full_chapter(name: str, timeout: int, env: dict, work: Path) -> dict:
    """One chapter executed in full mode (nbclient); 'quick' if it fell back, with its reasons."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(BOOK / f"{name}.ipynb", as_version=4)
    saved = dict(os.environ)
    os.environ.update(env)
    start, status, error = time.time(), "pass", None
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(BOOK)}}).execute()
    except Exception as e:  # a failing cell: recorded, the run goes on
        status, error = "fail", f"{type(e).__name__}: {str(e)[-1500:]}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seconds = round(time.time() - start, 1)
    work.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, work / f"{name}.full.ipynb")
    texts = [out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    fallbacks = [line for text in texts for line in text.splitlines() if FALLBACK in line]
    entry = {"status": status, "seconds": seconds, "mode": "quick" if fallbacks else "full"}
    if fallbacks:
        entry["fell_back"] = fallbacks
    if error:
        entry["error"] = error
    return entry


def train_network(data: str, kimg: float, work: Path, env: dict) -> str:
    """A snapshot for the full-mode chapters to sample: `edm-lit train` on `data` for `kimg`."""
    outdir = work / "pretrained"
    cmd = [sys.executable, "-m", "edm_lit.train", f"--outdir={outdir}", f"--data={data}", "--arch=ddpmpp",
           f"--duration={kimg / 1000}", "--tick=1", "--snap=1000", "--dump=1000", "--seed=0"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return str(sorted(outdir.glob("*/network-snapshot-*.json"))[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BOOK / "results" / "gpu_notebooks.json")
    ap.add_argument("--chapters", nargs="*", default=None, help="notebook names without .ipynb (default: all)")
    ap.add_argument("--jobs", type=int, default=8, help="quick-mode chapters run at once")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per chapter")
    ap.add_argument("--full-data", help="a data set for full mode (Chapters 6-9); none: quick mode only")
    ap.add_argument("--kimg", type=float, default=20.0, help="full mode's training budget (EDM_LIT_KIMG)")
    ap.add_argument("--inception", help="Inception weights for full mode (EDM_LIT_INCEPTION)")
    ap.add_argument("--pretrained", help="network for full mode (EDM_LIT_PRETRAINED); default: trained here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edm_lit_gpu_notebooks"))
    args = ap.parse_args(argv)
    names = args.chapters or chapter_names()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    full_inputs = None
    if args.full_data:
        full_inputs = {"EDM_LIT_DATA": str(Path(args.full_data).resolve()), "EDM_LIT_KIMG": str(args.kimg)}
        if args.inception:
            full_inputs["EDM_LIT_INCEPTION"] = str(Path(args.inception).resolve())
    record = Record(args.out, full_inputs)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(quick_chapter, n, args.timeout, env): n for n in names}
        for future in concurrent.futures.as_completed(futures):
            record.put(record.data["chapters"], futures[future], future.result())

    if full_inputs is not None:
        pretrained = args.pretrained or train_network(full_inputs["EDM_LIT_DATA"], args.kimg, args.work, env)
        full_inputs["EDM_LIT_PRETRAINED"] = pretrained
        record.write()
        full_env = {**env, **full_inputs, "EDM_LIT_MODE": "full"}
        for name in [n for n in FULL_CHAPTERS if n in names]:
            record.put(record.data["full"]["chapters"], name, full_chapter(name, args.timeout, full_env, args.work))
    failed = [n for n, e in record.data["chapters"].items() if e["status"] != "pass"]
    failed += [n for n, e in record.data.get("full", {}).get("chapters", {}).items() if e["status"] != "pass"]
    print(f"{len(failed)} failed: {failed}" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
