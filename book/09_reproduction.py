# ---
# jupyter:
#   edm_lit:
#     export: null
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
# # 9. The paper's claims at small scale
#
# The paper's evidence is a handful of figures and one table of FIDs measured on 50,000 images of
# networks that took days on 8–32 GPUs to train. This chapter re-runs the *experiments* behind those
# figures on the quick-mode model of Chapter 8 — a small EDM network trained for two minutes on the
# 8×8 handwritten digits — with the digits FID of §8.7 as the measure. What can transfer from CIFAR-10
# to digits is the **shape** of each result (which curve lies below which, where a curve flattens),
# not its numbers. At the end, the paper's headline numbers stand beside what this book measured:
# on a CPU, none of them; the table gives the exact command that measures each one on a GPU.
#
# Everything here is computed by this chapter's own code, from committed inputs only: the quick model
# `book/results/quick_digits.json` (made by `tools/make_quick_model.py`, which a test reruns) and the
# digits that ship with scikit-learn.

# %%
import json
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from myst_nb import glue

from edm_lit.checkpoints import load_network
from edm_lit.data import digits_source
from edm_lit.fid import feature_statistics_of, frechet_distance, train_digit_features
from edm_lit.generate import sample_seeds
from edm_lit.loss import EDMLoss
from edm_lit.mode import get_mode
from edm_lit.precond import EDMPrecond

MODE = get_mode()
torch.set_num_threads(2)
RESULTS = Path("results")
net = load_network(RESULTS / "quick_digits.json").to(MODE.device)
meta = json.loads((RESULTS / "quick_digits.meta.json").read_text())
items = list(digits_source().items)
digit_images = torch.from_numpy(np.stack([np.asarray(image) for _, image, _ in items]))[:, None]
digit_labels = torch.tensor([label for _, _, label in items])
classifier = train_digit_features(digit_images, digit_labels)  # the digits-FID features of §8.7
mu_ref, sigma_ref = feature_statistics_of(classifier.features(digit_images))
N = MODE.pick(quick=400, full=10_000)  # images per FID
BATCH = MODE.pick(quick=400, full=2_000)


def digits_fid(seeds=range(N), **sampler_kwargs):
    """Digits FID of the quick model's images for `seeds` with the given sampler settings."""
    seeds = list(seeds)
    feats = []
    for start in range(0, len(seeds), BATCH):
        images = sample_seeds(net, seeds[start:start + BATCH], device=MODE.device, **sampler_kwargs)
        feats.append(classifier.features(images.permute(0, 3, 1, 2)))
    mu, sigma = feature_statistics_of(torch.cat(feats))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


order = torch.randperm(len(digit_images), generator=torch.Generator().manual_seed(0))[:N]
real_floor = frechet_distance(*feature_statistics_of(classifier.features(digit_images[order])), mu_ref, sigma_ref)
glue("n_images", N, display=False)
glue("real_floor", real_floor, display=False)
print(f"quick model: {meta['steps']} training steps of batch {meta['batch']} ({meta['trainer']}); "
      f"digits FID on N = {N} images; {N} real digits score {real_floor:.4f}")
