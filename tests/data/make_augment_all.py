"""Make tests/data/augment_all.pt: reference outputs of the official AugmentPipe for settings beyond the
paper's (every blit, every geometric and colour transformation, grey and non-square images).

Usage: python tests/data/make_augment_all.py /path/to/official/edm  (a checkout of NVlabs/edm)

Runs the official code as a black box; nothing of it is copied here. CPU, one thread.
"""
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from training.augment import AugmentPipe as OfficialPipe  # noqa: E402

GEOMETRIC = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
CASES = [
    ("all_geometric_p07", dict(p=0.7, **GEOMETRIC), (8, 3, 16, 16), 1),
    ("all_color_p1", dict(p=1, **COLOR), (8, 3, 16, 16), 2),
    ("everything_grey_p05", dict(p=0.5, **GEOMETRIC, **COLOR), (8, 1, 16, 16), 3),
    ("non_square_custom_p1", dict(p=1, xflip=1, translate_int=1, translate_int_max=0.25, scale=1, scale_std=0.3,
                                  rotate_frac=1, rotate_frac_max=0.25, aniso=1, aniso_std=0.3,
                                  aniso_rotate_prob=0.8, translate_frac=1, translate_frac_std=0.05,
                                  hue=1, hue_max=0.5), (4, 3, 12, 20), 4),
]

cases = []
gen = torch.Generator().manual_seed(123)
for name, kwargs, shape, seed in CASES:
    images = torch.rand(shape, generator=gen) * 2 - 1
    torch.manual_seed(seed)
    out, labels = OfficialPipe(**kwargs)(images)
    cases.append({"name": name, "augment_kwargs": kwargs, "images": images, "torch_manual_seed": seed,
                  "out": out, "labels": labels})
meta = {"torch_version": str(torch.__version__), "device": "cpu", "torch_num_threads": 1}
torch.save({"cases": cases, "meta": meta}, "tests/data/augment_all.pt")
print("wrote tests/data/augment_all.pt:", ", ".join(f"{c['name']} labels {tuple(c['labels'].shape)}" for c in cases))
