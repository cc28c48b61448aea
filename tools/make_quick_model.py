"""Train the quick-mode model that Chapters 8 and 9 evaluate, and write it to book/results/.

    python tools/make_quick_model.py                  # writes book/results/quick_digits.{json,safetensors,meta.json}
    python tools/make_quick_model.py --out /tmp/q     # elsewhere (the test compares that with the committed file)

The model: EDMPrecond around a small DDPM++-style SongUNet, unconditional, trained with EDMLoss (Sec. 5:
P_mean -1.2, P_std 1.2, sigma_data 0.5) on the 1,797 UCI handwritten digits (8x8, grey; edm_lit.data,
Chapter 6), Adam, an exponential moving average of the weights, batch 128, one CPU thread, seeded: the
run is deterministic on one machine, so the test can rerun it and compare.

Stop-gap: this is a plain loop over edm_lit.precond / edm_lit.loss, not edm_lit.training (Chapter 7),
which did not exist yet when this file was written; it makes the same kind of model on the same data.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edm_lit.checkpoints import save_network  # noqa: E402
from edm_lit.data import digits_source  # noqa: E402
from edm_lit.loss import EDMLoss  # noqa: E402
from edm_lit.precond import EDMPrecond  # noqa: E402

NETWORK = dict(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=32,
               channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=0.0)
TRAINING = dict(steps=600, batch=128, lr=2e-3, ema_decay=0.995, seed=0, lr_rampup_steps=50)
DEFAULT_OUT = ROOT / "book" / "results" / "quick_digits"


def digits_tensor() -> torch.Tensor:
    """The digits as float32 [N, 1, 8, 8] in [-1, 1]."""
    source = digits_source()
    images = np.stack([np.asarray(image) for _, image, _ in source.items])
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1).reshape(-1, 1, 8, 8)


def train(steps, batch, lr, ema_decay, seed, lr_rampup_steps):
    torch.manual_seed(seed)
    data = digits_tensor()
    net = EDMPrecond(**NETWORK).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), [batch], generator=gen)
        loss = loss_fn(net, data[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / lr_rampup_steps)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
    return ema, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output name (writes OUT.json, OUT.safetensors, OUT.meta.json)")
    parser.add_argument("--steps", type=int, default=TRAINING["steps"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = dict(TRAINING, steps=args.steps)
    t0 = time.perf_counter()
    ema, losses = train(**settings)
    seconds = time.perf_counter() - t0
    save_network(ema, args.out)
    meta = dict(settings, network=NETWORK, data="UCI digits 8x8 (edm_lit.data.digits_source), scaled to [-1, 1]",
                loss_first_50=float(np.mean(losses[:50])), loss_last_50=float(np.mean(losses[-50:])),
                train_seconds=round(seconds, 1), torch=torch.__version__, trainer="tools/make_quick_model.py (stop-gap loop)")
    Path(str(args.out) + ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
