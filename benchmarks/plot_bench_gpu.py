"""Draw book/results/bench_gpu.json (written by bench_gpu.py): images/s and achieved TFLOP/s against the peak.

    python benchmarks/plot_bench_gpu.py [--json book/results/bench_gpu.json] [--out book/results/bench_gpu.png]

One bar per training row, ours and official side by side: images/s on the left, achieved TFLOP/s as a fraction of
the GPU's dense peak for the row's precision on the right (fp32 rows against the fp32 peak without TF32, fp16/bf16
rows against the tensor-core peak, both recorded in the JSON), and one bar per generation row (images/s at 35 NFE).
Refuses a JSON that was measured without a GPU (`--smoke` runs) unless --allow-cpu is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def label(row: dict) -> str:
    return f"{row['impl']} {row['precision']}" + "".join(f" +{o}" for o in row.get("options", []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=ROOT / "book" / "results" / "bench_gpu.json")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "results" / "bench_gpu.png")
    ap.add_argument("--allow-cpu", action="store_true", help="draw a --smoke run (for checking this script)")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    if not data.get("gpu") and not args.allow_cpu:
        print(f"{args.json}: measured without a GPU (gpu: null); nothing to draw", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("images_per_s")]
    gens = [g for g in data.get("generate", []) if g.get("images_per_s")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * max(len(rows), len(gens), 4) + 1.5),
                             gridspec_kw={"width_ratios": [3, 3, 2]})
    names = [label(r) for r in rows]
    colours = ["C1" if r["impl"] == "official" else "C0" for r in rows]
    axes[0].barh(names, [r["images_per_s"] for r in rows], color=colours)
    axes[0].set_xlabel("training images / s (batch 512, whole loop)")
    axes[0].invert_yaxis()
    axes[1].barh(names, [100 * (r.get("fraction_of_peak") or 0) for r in rows], color=colours)
    axes[1].set_xlabel("achieved TFLOP/s, % of the dense peak of the row's precision")
    axes[1].invert_yaxis()
    axes[1].set_yticks([])
    axes[2].barh([f"{g['impl']} {g['precision']}" for g in gens], [g["images_per_s"] for g in gens],
                 color=["C1" if g["impl"] == "official" else "C0" for g in gens])
    axes[2].set_xlabel("generation images / s (35 NFE, PNGs)")
    axes[2].invert_yaxis()
    fig.suptitle(f"{data.get('gpu') or 'CPU (smoke run, not a result)'}, torch {data['torch']}: "
                 f"edm_lit (blue) and the official code (orange)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
