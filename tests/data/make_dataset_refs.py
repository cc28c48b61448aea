"""Make the data-set reference files of tests/test_data.py by running the official EDM tools.

    python tests/data/make_dataset_refs.py --official /path/to/NVlabs/edm [--out tests/data]

Writes, into --out:
- dataset_sources.zip  the source images (seeded random RGB PNGs, made here): `square/{ant,bee,cat}/NN.png` (16x16)
                       and `rect/NN.png` (28x20, WxH);
- dataset_official.zip what the official `dataset_tool.py` writes from `square/` (labels from the sub-folders);
- dataset_tool_refs.pt the names, pixels and labels of the official tool's output for several conversions;
- dataset_refs.pt      what the official `training.dataset.ImageFolderDataset` returns on dataset_official.zip
                       for several constructor arguments (the script checks that the official class returns the
                       same on the files unpacked to a folder `dataset_official/`, so one reference serves both).

The official code is only run (as a subprocess, or imported from --official), never copied.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 8
RECT_COUNT = 10

# name -> (source folder, extra dataset_tool.py flags)
TOOL_CASES = {
    "square": ("square", []),
    "square_8x8_max10": ("square", ["--resolution=8x8", "--max-images=10"]),
    "rect_center_crop": ("rect", ["--transform=center-crop", "--resolution=16x16"]),
    "rect_center_crop_wide": ("rect", ["--transform=center-crop-wide", "--resolution=16x8"]),
    "square_zip_json": ("square.zip", []),
}

# name -> ImageFolderDataset keyword arguments
READER_CASES = {
    "plain": {},
    "labels": dict(use_labels=True),
    "labels_xflip": dict(use_labels=True, xflip=True),
    "labels_max10_seed3": dict(use_labels=True, max_size=10, random_seed=3),
    "max10_bigseed_xflip": dict(max_size=10, random_seed=12345678901, xflip=True),
    "resolution16_cache": dict(resolution=16, cache=True, use_labels=True),
}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def make_sources(root: Path) -> dict:
    """Random images (seed 0) as files under root; returns {member name: bytes} for the sources ZIP."""
    rng = np.random.default_rng(0)
    members = {}
    for k, cls in enumerate(CLASSES):
        for i in range(PER_CLASS):
            members[f"square/{cls}/{i:02d}.png"] = png(rng.integers(0, 256, [16, 16, 3], dtype=np.uint8))
    for i in range(RECT_COUNT):
        members[f"rect/{i:02d}.png"] = png(rng.integers(0, 256, [20, 28, 3], dtype=np.uint8))
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    # a ZIP source with its own dataset.json (labels i mod 4), written into the square/ image names
    names = sorted(n[len("square/"):] for n in members if n.startswith("square/"))
    with zipfile.ZipFile(root / "square.zip", "w") as z:
        for i, name in enumerate(names):
            z.writestr(name, members["square/" + name])
        z.writestr("dataset.json", json.dumps({"labels": [[name, i % 4] for i, name in enumerate(names)]}))
    return members


def read_output(path: Path) -> dict:
    """Names, pixels [N, H, W, C] and labels of a data-set ZIP."""
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        images = []
        for n in names:
            with z.open(n) as f:
                pixels = np.array(PIL.Image.open(f))
            images.append(pixels if pixels.ndim == 3 else pixels[:, :, None])
        labels = json.loads(z.read("dataset.json"))["labels"]
    return dict(names=names, images=torch.from_numpy(np.stack(images)),
                labels=None if labels is None else torch.tensor([pair[1] for pair in labels]),
                label_names=None if labels is None else [pair[0] for pair in labels])


def reader_reference(dataset_cls, path: Path, kwargs: dict) -> dict:
    ds = dataset_cls(str(path), **kwargs)
    items = [ds[i] for i in range(len(ds))]
    details = [ds.get_details(i) for i in range(len(ds))]
    return dict(length=len(ds), name=ds.name, image_shape=list(ds.image_shape), resolution=ds.resolution,
                label_shape=list(ds.label_shape), label_dim=ds.label_dim, has_labels=ds.has_labels,
                images=torch.from_numpy(np.stack([im for im, _ in items])),
                labels=torch.from_numpy(np.stack([lab for _, lab in items])),
                raw_idx=torch.tensor([d.raw_idx for d in details]),
                xflip=torch.tensor([d.xflip for d in details]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of NVlabs/edm")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    official = args.official.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        members = make_sources(tmp)
        with zipfile.ZipFile(args.out / "dataset_sources.zip", "w") as z:
            for name, data in sorted(members.items()):
                z.writestr(name, data)
            z.write(tmp / "square.zip", "square.zip")
        tool_refs = {}
        for case, (source, flags) in TOOL_CASES.items():
            dest = tmp / f"out_{case}.zip"
            subprocess.run([sys.executable, str(official / "dataset_tool.py"), f"--source={tmp / source}",
                            f"--dest={dest}", *flags], check=True, cwd=official, capture_output=True)
            tool_refs[case] = read_output(dest)
        torch.save(tool_refs, args.out / "dataset_tool_refs.pt")
        archive = args.out / "dataset_official.zip"
        archive.write_bytes((tmp / "out_square.zip").read_bytes())
        folder = tmp / "unpacked" / "dataset_official"
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
        sys.path.insert(0, str(official))
        from training.dataset import ImageFolderDataset  # the official class, run for reference outputs

        reader_refs = {}
        for case, kwargs in READER_CASES.items():
            reader_refs[case] = reader_reference(ImageFolderDataset, archive, kwargs)
            unpacked = reader_reference(ImageFolderDataset, folder, kwargs)  # the same files in a folder
            for key, value in unpacked.items():
                same = torch.equal(value, reader_refs[case][key]) if torch.is_tensor(value) else value == reader_refs[case][key]
                assert same, f"official reader: folder and ZIP differ in {case}/{key}"
        torch.save(reader_refs, args.out / "dataset_refs.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
