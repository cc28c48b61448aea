"""Train the quick-mode model of Chapters 7-9 with Chapter 7's loop and write it to book/results/.

    python tools/make_quick_model.py                  # writes book/results/quick_digits.json (+ weights, meta)
    python tools/make_quick_model.py --out /tmp/q     # elsewhere

The model is exactly `edm_lit.course.train_quick(run_dir, seed=0)` (Appendix A7): the tiny DDPM++ of Chapter 7 trained
on the 1,797 UCI handwritten digits (8x8, grey; edm_lit.data, Chapter 6) with the flags QUICK_FLAGS, in one
CPU thread, so the run is deterministic (bitwise) for a given torch build and CPU; another CPU may round
differently. Chapter 7 trains the same run and checks it against the committed one with
`edm_lit.course.compare_models` (denoiser outputs, weights, final loss within REPRODUCTION_TOLERANCE), as
does tests/test_generate.py; Chapters 8 and 9 load the committed file instead of training, so they do not
depend on Chapter 7 having run.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edm_lit.checkpoints import save_network  # noqa: E402
from edm_lit.course import QUICK_FLAGS, train_quick  # noqa: E402

DEFAULT_OUT = ROOT / "book" / "results" / "quick_digits"
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output name: OUT.json, its weights, OUT.meta.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        net = train_quick(run_dir, seed=SEED)
        stats = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines() if line]
    seconds = time.perf_counter() - start
    for old in args.out.parent.glob(args.out.name + "-*.safetensors"):
        old.unlink()  # the previous weights of this name (save_network names weights by their hash)
    save_network(net, args.out)
    meta = dict(trainer="edm_lit.course.train_quick (Chapter 7, Appendix A7)", seed=SEED, flags=QUICK_FLAGS,
                final_loss=stats[-1]["Loss/loss"]["mean"], train_seconds=round(seconds, 1), torch=torch.__version__,
                data="UCI digits 8x8 (edm_lit.data, Chapter 6), scaled to [-1, 1]")
    Path(str(args.out) + ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
