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
# # 5b. Where training pays: the loss floor
#
# Chapter 4 derived the training loss and Chapter 5 built the networks. Here both meet data
# whose ideal denoiser is known in closed form, the image-shaped Gaussian mixture of Chapter
# 1: we measure the loss the ideal denoiser leaves at every noise level, where each
# $p_\text{train}$ of Table 1 spends its samples, and how close a small DDPM++ trained with
# `EDMLoss` gets to that floor (the paper's Fig. 5a, at small scale); then we run the network
# in float16 and bfloat16. The chapter exports nothing. Chapter 6 trains the first network
# on real images.

# %%
import functools
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from myst_nb import glue

from edm_lit.course import IdealF
from edm_lit.framework import VP, GaussianMixture, iddpm_u, toy_image_mixture
from edm_lit.loss import EDMLoss, VELoss, VPLoss
from edm_lit.mode import get_mode
from edm_lit.precond import EDMPrecond

MODE = get_mode()
torch.set_num_threads(1 if MODE.quick else torch.get_num_threads())  # tiny tensors
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
gm = toy_image_mixture(num_components=8, channels=3, resolution=8, std=0.1, seed=0)
sigma_data = gm.data_std  # the data's standard deviation, passed to EDM

# %% [markdown]
# ## 5b.1 Where to train: the loss floor and $p_\text{train}$
#
# > "at very low levels, it is both difficult and irrelevant to discern the vanishingly small
# > noise component, whereas at high levels the training targets are always dissimilar from the
# > correct answer that approaches dataset average." (Sec. 5)
#
# Even a perfect network cannot bring the loss to zero: the best denoiser at each noise level
# is the ideal $D^*(\mathbf{x}; \sigma) = \mathbb{E}[\mathbf{y} \mid \mathbf{y} + \mathbf{n} =
# \mathbf{x}]$ (Chapter 1), which still errs by the posterior spread of $\mathbf{y}$, so the
# weighted loss of Eq. 2 has a **floor**, per pixel and channel ($d$ of them),
#
# $$\mathcal{L}^*(\sigma) = \lambda(\sigma)\, \frac1d\, \mathbb{E}_{\mathbf{y}, \mathbf{n}} \left\| D^*(\mathbf{y} + \mathbf{n}; \sigma) - \mathbf{y} \right\|^2 ,$$
#
# with EDM's $\lambda(\sigma) = (\sigma^2 + \sigma_\text{data}^2)/(\sigma\,\sigma_\text{data})^2$.
# For a single Gaussian,
# $p_\text{data} = \mathcal{N}(\mathbf{0}, s^2\mathbf{I})$, $D^*(\mathbf{x}) = \frac{s^2}{s^2+\sigma^2}\mathbf{x}$
# and $\mathbb{E}\|D^* - \mathbf{y}\|^2 = \frac{s^2\sigma^2}{s^2+\sigma^2}$ per element, so the
# loss floor is $\lambda(\sigma)\frac{s^2\sigma^2}{s^2+\sigma^2}$. We measure it with the exported
# `EDMLoss` itself: with $P_\text{std} = 0$ it trains at the single level
# $\sigma = e^{P_\text{mean}}$, so its mean over many images estimates the floor at that σ.
#
# **Check** — Monte Carlo against the closed form, for $s = 1$ and $\sigma_\text{data} = 0.5$
# (deliberately mismatched). When $s = \sigma_\text{data}$ the floor is exactly 1 at every σ and
# $F^* = 0$: the skip connection alone is the ideal denoiser of a Gaussian with the assumed
# variance, and the network only has to learn what the data adds to it.

# %% tags=["hide-input"]
def loss_floor(net, mixture, sigma, n, sigma_data):
    """Monte Carlo mean of EDMLoss at one sigma (P_std = 0) for the network `net`."""
    loss_fn = EDMLoss(P_mean=math.log(sigma), P_std=0.0, sigma_data=sigma_data)
    return loss_fn(net, mixture.sample(n).float()).mean().item()


n_mc = MODE.pick(quick=4096, full=32768)
ideal_net = EDMPrecond(8, 3, sigma_data=sigma_data,
                       model_type=functools.partial(IdealF, gm, sigma_data))
for s in [1.0, 0.5]:
    gauss = GaussianMixture(torch.zeros(1, 3, 8, 8, dtype=torch.float64), stds=s)
    net_g = EDMPrecond(8, 3, sigma_data=0.5,
                       model_type=functools.partial(IdealF, gauss, 0.5))
    for sigma in [0.01, 0.3, 3.0, 50.0]:
        sigma32 = float(torch.tensor(math.log(sigma)).exp())  # as EDMLoss draws it
        lam = (sigma32**2 + 0.25) / (sigma32 * 0.5) ** 2
        closed = lam * s**2 * sigma32**2 / (s**2 + sigma32**2)
        mc = loss_floor(net_g, gauss, sigma, n_mc, 0.5)
        print(f"s={s}, sigma={sigma:<5}: Monte Carlo {mc:.4f}, exact {closed:.4f}")
        assert abs(mc / closed - 1) < 0.01
    if s == 0.5:
        noise_labels = torch.tensor([-1.0, 0.0, 0.5, 1.0])
        assert net_g.model(torch.randn(4, 3, 8, 8), noise_labels).abs().max() < 1e-5

# %% [markdown]
# On the image mixture the floor tells us where training can make progress at all (paper
# Fig. 5a). At very small σ it is 1: the noise is far smaller than the data's own spread, the
# target is essentially the unit noise, and nothing about it can be predicted. At very large σ
# it is nearly 1 again: the input is almost pure noise and the best guess of the image is close
# to the data mean. Only in between can a network reduce the loss below 1, and that is where
# the paper's log-normal $p_\text{train}$ puts its samples (Fig. 5a; the paper tuned
# $P_\text{mean}$, $P_\text{std}$ on real images, whose floor has its own shape). VE spreads its
# training uniformly in $\ln\sigma$ over a much wider range, and VP spends most of it at large σ.

# %% tags=["hide-input"]
n_floor = MODE.pick(quick=25, full=60)
floor_sigmas = torch.logspace(math.log10(0.002), math.log10(80), n_floor,
                              dtype=torch.float64)
floor = torch.tensor([loss_floor(ideal_net, gm, float(s), n_mc // 4, sigma_data)
                      for s in floor_sigmas])
print(f"loss floor on the image mixture: {floor[0]:.3f} at sigma={floor_sigmas[0]:.3g},"
      f" minimum {floor.min():.3f} at sigma={floor_sigmas[floor.argmin()]:.3g}, "
      f"{floor[-1]:.3f} at sigma=80")
assert abs(floor[0] - 1) < 0.02 and 0.88 < floor[-1] < 0.96 and floor.min() < 0.12

# %% [markdown]
# The densities of $\ln\sigma$ under each training distribution: EDM's is a normal density by
# construction; VE's is uniform; VP's follows from $t \sim \mathcal{U}(\epsilon_t, 1)$ by a change
# of variables, $p(\ln\sigma) = \frac{\sigma}{(1 - \epsilon_t)\,\dot\sigma(t)}$ with $\dot\sigma$
# from `framework.VP`; iDDPM trains on its $M$ table entries with equal probability.
#
# **Check** — histograms of σ drawn by the exported losses' `draw_sigma` match those densities.

# %% tags=["hide-input"]
n_draw = MODE.pick(quick=200_000, full=2_000_000)
dummy = torch.empty(n_draw, 1, 1, 1)
ln_edges = torch.linspace(math.log(0.002), math.log(200), 61, dtype=torch.float64)
ln_mid = 0.5 * (ln_edges[1:] + ln_edges[:-1])
vp_sched = VP()  # sigma(t) and its derivative in float64


def density_vp(ln_sigma):
    t = vp_sched.sigma_inv(ln_sigma.exp())
    inside = (t >= 1e-5) & (t <= 1)
    slope = vp_sched.sigma_deriv(t.clamp(1e-5, 1))
    return torch.where(inside, ln_sigma.exp() / ((1 - 1e-5) * slope), 0.0)


def density_edm(ln_sigma):
    z = (ln_sigma + 1.2) / 1.2  # P_mean = -1.2, P_std = 1.2
    return torch.exp(-0.5 * z**2) / (1.2 * math.sqrt(2 * math.pi))


def density_ve(ln_sigma):
    inside = (ln_sigma >= math.log(0.02)) & (ln_sigma <= math.log(100))
    return inside.double() / math.log(100 / 0.02)


densities = {"edm": (EDMLoss(), density_edm), "ve": (VELoss(), density_ve),
             "vp": (VPLoss(), density_vp)}
hists = {}
for name, (loss_fn, pdf) in densities.items():
    ln_s = loss_fn.draw_sigma(dummy).double().log().flatten()
    hist = torch.histogram(ln_s, ln_edges).hist / (n_draw * (ln_edges[1] - ln_edges[0]))
    hists[name] = hist
    inside = (pdf(ln_edges[:-1]) > 0) & (pdf(ln_edges[1:]) > 0)  # within the support
    gap = (hist - pdf(ln_mid))[inside].abs().max().item()
    print(f"{name:4s}: max |histogram - density| = {gap:.3f} over {int(inside.sum())} "
          f"bins (peak density {pdf(ln_mid).max():.3f})")
    assert gap < 0.03 * pdf(ln_mid).max() + 0.01

# %% [markdown]
# **Check** — where each $p_\text{train}$ puts its mass relative to the floor. We call the σ
# where the floor is below the midpoint between its minimum and 1 the *useful range*: there, a
# perfect network would remove at least half of the loss that can be removed at all. With the
# same σ draws as the histograms, the share of each distribution inside it, below and above:

# %% tags=["hide-input"]
half = 1 - (1 - floor.min()) / 2
useful = floor_sigmas[floor <= half]
lo, hi = useful.min().item(), useful.max().item()
share = {}
for name, (loss_fn, _) in densities.items():
    drawn = loss_fn.draw_sigma(dummy).double().flatten()
    share[name] = [((drawn >= lo) & (drawn <= hi)).double().mean().item(),
                   (drawn < lo).double().mean().item(),
                   (drawn > hi).double().mean().item()]
    inside, below, above = (100 * v for v in share[name])
    print(f"{name:4s}: {inside:5.1f} % inside [{lo:.3g}, {hi:.3g}], {below:5.1f} % "
          f"below, {above:5.1f} % above")
sigma_at_min = floor_sigmas[floor.argmin()].item()
print(f"floor minimum at sigma = {sigma_at_min:.3g}; EDM's median training sigma "
      f"exp(P_mean) = {math.exp(-1.2):.3g}")
assert lo <= math.exp(-1.2) <= hi  # EDM's median training sigma is in the useful range
assert share["edm"][0] > 1.5 * max(share["ve"][0], share["vp"][0])  # most where it pays
assert share["vp"][2] > 0.5 and share["vp"][2] > share["ve"][2]  # VP: most above it
glue("useful_lo", f"{lo:.2g}", display=False)
glue("useful_hi", f"{hi:.2g}", display=False)
glue("floor_argmin", f"{sigma_at_min:.2g}", display=False)
for name in share:
    glue(f"share_{name}", f"{100 * share[name][0]:.0f}", display=False)
glue("share_vp_above", f"{100 * share['vp'][2]:.0f}", display=False)

# %% [markdown]
# On this mixture the useful range is σ ∈ [{glue:text}`useful_lo`, {glue:text}`useful_hi`]
# (floor minimum at σ ≈ {glue:text}`floor_argmin`). EDM's $p_\text{train}$ puts
# {glue:text}`share_edm` % of its draws there, against {glue:text}`share_ve` % for VE and
# {glue:text}`share_vp` % for VP, which spends {glue:text}`share_vp_above` % above it.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(floor_sigmas, floor, "o-", ms=3, color="C3")
ax1.axhline(1, color="gray", lw=0.8)
ax1.axvspan(lo, hi, color="C2", alpha=0.12, label="useful range")
ax1.set(xscale="log", xlabel="σ", ylabel="λ(σ) E‖D*(y+n; σ) − y‖² per element",
        title="(a) EDM loss of the ideal denoiser, image mixture", ylim=(0, 1.1))
_ = ax1.legend()
for name, (loss_fn, pdf) in densities.items():
    ax2.plot(ln_mid.exp(), pdf(ln_mid), label=f"{name} (formula)")
    ax2.step(ln_mid.exp(), hists[name], where="mid", lw=0.6, color="gray")
u_ln = iddpm_u().double()[:-1].log()
weights = torch.full_like(u_ln, 1 / (len(u_ln) * (ln_edges[1] - ln_edges[0])))
ax2.hist(u_ln.exp().numpy(), bins=ln_edges.exp().numpy(), weights=weights.numpy(),
         histtype="step", label="iddpm (table u; reaches 2·10⁴)")
ax2.set(xscale="log", xlabel="σ", ylabel="density of ln σ",
        title="(b) training distributions p_train (gray: sampled)")
_ = ax2.legend()
plt.tight_layout()

# %% [markdown]
# ## 5b.2 Training against a known floor
#
# > "upon initialization $F_\theta(\cdot) = 0$ and the expected value of the loss at each noise
# > level is $1$" (App. B.6)
#
# How close does a trained denoiser get to the floor? For real images the floor is unknown;
# the paper's Fig. 5a shows the loss per σ of its networks before training (flat at 1, as
# quoted) and after. On the mixture the floor is exact up to Monte Carlo error (§5b.1), so we
# can watch a real training run approach it.
#
# The set-up: the image-shaped mixture of Chapter 1 (eight smooth 3×8×8 "images" with
# per-pixel standard deviation 0.1), `EDMPrecond` around a small DDPM++ (two levels, attention
# at 4×4), Chapter 4's `EDMLoss` with $\sigma_\text{data}$ set to the data's standard
# deviation, and Adam. Quick mode trains briefly on a CPU (the cell prints for how long).

# %%
loss_fn = EDMLoss(sigma_data=sigma_data)
sigma_eval = torch.logspace(-2, math.log10(50), 15, dtype=torch.float64)
n_eval = MODE.pick(quick=512, full=4096)


def loss_per_sigma(net):
    """lambda x mean square error at each sigma of sigma_eval, for `net` and for D*,
    on the same draws of y and n at every call. Also returns the last D and y."""
    gen, ours, ideal = torch.Generator().manual_seed(2), [], []
    net.eval()
    with torch.no_grad():
        for s in sigma_eval:
            y = gm.sample(n_eval, generator=gen)
            x = y + s * torch.randn(y.shape, generator=gen, dtype=torch.float64)
            noise = s.float().expand(n_eval).to(MODE.device)
            D = net(x.float().to(MODE.device), noise).double().cpu()
            ours.append((loss_fn.weight(s) * (D - y).square().mean()).item())
            D_star = gm.denoise(x, s)
            ideal.append((loss_fn.weight(s) * (D_star - y).square().mean()).item())
    return torch.tensor(ours), torch.tensor(ideal), D, y


train_steps, batch, lr = MODE.pick(quick=2000, full=20_000), 64, 3e-3
torch.manual_seed(0)
denoiser = EDMPrecond(img_resolution=8, img_channels=3, sigma_data=sigma_data,
                      model_type="SongUNet", channel_mult=[1, 2], num_blocks=1,
                      model_channels=MODE.pick(quick=16, full=64), attn_resolutions=[4],
                      dropout=0.0).to(MODE.device)
initial = loss_per_sigma(denoiser)[0]  # before any training: Fig. 5a's green curve
optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
data_gen = torch.Generator().manual_seed(1)
history, start = [], time.perf_counter()
denoiser.train()
for step in range(train_steps):
    for group in optimizer.param_groups:  # constant, then a linear decay to 0 over 30 %
        group["lr"] = lr * min(1.0, (train_steps - step) / (0.3 * train_steps))
    y = gm.sample(batch, generator=data_gen).float().to(MODE.device)
    loss = loss_fn(denoiser, y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    history.append(loss.item())
print(f"sigma_data = {sigma_data:.3f}; {train_steps} steps of {batch} images in "
      f"{time.perf_counter() - start:.0f} s; "
      f"{sum(p.numel() for p in denoiser.parameters()):,} parameters")

# %% [markdown]
# ## 5b.3 The loss per noise level
#
# > "Inspecting the per-σ loss after training (blue and orange curves) reveals that a
# > significant reduction is possible only at intermediate noise levels" (Sec. 5)
#
# The loss per σ on fresh data, for the trained network and for $D^*$ on the *same* draws of
# $\mathbf{y}$ and $\mathbf{n}$ (so that most of the Monte Carlo noise cancels in the
# comparison), and the floor averaged over the training distribution of σ, which is what the
# training loss itself approaches.

# %%
trained, floor, D, y = loss_per_sigma(denoiser)
ratio = trained / floor
# at the largest sigma: how far the answer is from the data mean, against its spread
data_mean = (gm.weights.reshape(-1, 1, 1, 1) * gm.means).sum(0)
from_mean = ((D - data_mean).square().mean() / (y - data_mean).square().mean()).item()
gen = torch.Generator().manual_seed(3)  # the floor averaged over p_train
y = gm.sample(16_384, generator=gen)
z = torch.randn(16_384, 1, 1, 1, generator=gen, dtype=torch.float64)
s_train = (loss_fn.P_mean + loss_fn.P_std * z).exp()
x = y + s_train * torch.randn(y.shape, generator=gen, dtype=torch.float64)
D_star = gm.denoise(x, s_train)
floor_train = (loss_fn.weight(s_train) * (D_star - y).square()).mean().item()
for s, i, t, f in zip(sigma_eval, initial, trained, floor):
    print(f"sigma {s:8.3f}   initial {i:.4f}   trained {t:.4f}   floor {f:.4f}   "
          f"trained / floor {t / f:.3f}")

# %%
window = 100
smooth = torch.tensor(history).unfold(0, window, 1).mean(1)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
steps = range(window - 1, len(history))
ax1.plot(steps, smooth, label=f"training loss (mean of {window})")
ax1.axhline(floor_train, color="k", ls="--", label="floor, averaged over p_train(σ)")
ax1.set(xlabel="training step", ylabel="loss per element", yscale="log",
        title="training")
ax2.plot(sigma_eval, initial, "s-", color="C2", ms=3, label="initial network")
ax2.plot(sigma_eval, trained, "o-", label="trained network")
ax2.plot(sigma_eval, floor, "k--", label="floor: ideal denoiser D*")
ax2.axvspan(0.2, 2, color="0.5", alpha=0.12, label="checked range")
u = (sigma_eval.log() - loss_fn.P_mean) / loss_fn.P_std
p_train = torch.exp(-u**2 / 2)  # a normal density of ln sigma, up to its constant
ax2.fill_between(sigma_eval, 0, p_train * floor.max() / p_train.max(), color="C1",
                 alpha=0.15, label="p_train(ln σ), scaled")
ax2.set(xscale="log", xlabel="σ", ylabel="λ(σ) · loss per element",
        title="loss per noise level (cf. paper Fig. 5a)")
_ = ax1.legend(), ax2.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# Before training the loss is close to 1 at every σ (between {glue:text}`init_lo:.3f` and
# {glue:text}`init_hi:.3f`), as App. B.6 derives. After training the network follows the
# floor closely where the task is easy: at small σ, where $D \approx \mathbf{x}$ is nearly
# right, and at large σ, where the noisy image says almost nothing and the best answer is
# close to the data mean. The gap is largest at intermediate σ (here at
# σ = {glue:text}`floor_worst_sigma:.2f`): there the noisy image is still informative, but
# deciding *which* of the eight components it came from requires the network to have learned
# them well: exactly the range the paper identifies as the one where training effort pays.
#
# **Check** — what the run measured, and what is asserted about it:
#
# - the training loss over the last 100 steps is {glue:text}`floor_final_ratio:.3f` times the
#   floor averaged over $p_\text{train}$;
# - for σ in [0.2, 2] the trained loss is at most {glue:text}`floor_mid_excess:.1%` above the
#   floor (asserted below `MARGIN`: 30 % in quick mode, 20 % in full mode);
# - the excess over the floor at its worst is {glue:text}`floor_peak_vs_ends:.1f` times the
#   largest excess at the ends of the range (σ < 0.1 or σ > 10);
# - at σ = 50 the trained network's answer is as far from the data mean as
#   {glue:text}`floor_from_mean:.1%` of the data's own spread about it (mean squares);
# - nowhere is the trained loss below the floor by more than the Monte Carlo error.

# %% tags=["hide-input"]
final = smooth[-1].item()
excess = ratio - 1
ends = (sigma_eval < 0.1) | (sigma_eval > 10)
mid = (sigma_eval >= 0.2) & (sigma_eval <= 2)
worst = sigma_eval[ratio.argmax()].item()
peak_vs_ends = (excess.max() / excess[ends].abs().max()).item()
MARGIN = MODE.pick(quick=0.3, full=0.2)
print(f"initial loss per sigma in [{initial.min():.3f}, {initial.max():.3f}]")
print(f"training loss over the last {window} steps {final:.4f}; floor averaged over "
      f"p_train {floor_train:.4f} (ratio {final / floor_train:.3f})")
print(f"sigma in [0.2, 2]: trained / floor at most {ratio[mid].max():.3f} (allowed "
      f"1 + {MARGIN}); largest gap at sigma = {worst:.2f}, {peak_vs_ends:.1f} times "
      f"the largest at the ends; smallest ratio {ratio.min():.3f}")
print(f"sigma = {sigma_eval[-1]:.0f}: mean square of D - data mean = {from_mean:.1%} "
      "of that of y - data mean")
assert ((initial - 1).abs() < 0.05).all()
assert 0.97 <= final / floor_train <= 1.12
assert (ratio[mid] <= 1 + MARGIN).all()
assert peak_vs_ends >= 3 and 0.2 <= worst <= 5
assert from_mean <= 0.08
assert (ratio >= 0.97).all()
for name, value in [("init_lo", initial.min().item()),
                    ("init_hi", initial.max().item()),
                    ("floor_final_ratio", final / floor_train),
                    ("floor_mid_excess", ratio[mid].max().item() - 1),
                    ("floor_worst_sigma", worst), ("floor_peak_vs_ends", peak_vs_ends),
                    ("floor_from_mean", from_mean)]:
    glue(name, value, display=False)


# %% [markdown]
# ## 5b.4 Precision: float16 and bfloat16
#
# > "we store the trainable parameters as FP32 but cast them to FP16 when evaluating
# > $F_\theta$, except for the embedding and self-attention layers" (App. F.3)
#
# Every layer of Chapter 5 computes in the dtype of its input and casts its weights to it:
# the official `use_fp16` mechanism. The preconditioner (Chapter 4) casts the network input to
# float16 when `use_fp16=True` on a GPU and the layers follow, while the embedding (computed
# from float32 noise labels), the weights, their gradients and the optimiser stay in float32.
# (Attention: the official code computes the product and softmax in float32; ours hands the
# float16 q, k, v to `scaled_dot_product_attention`, whose GPU kernels accumulate in float32.)
# The alternative, `torch.autocast(device_type, dtype=torch.bfloat16)` around the forward
# pass, lets PyTorch choose the precision per operation. The speed-up is a GPU matter; here
# we check that both paths run, on the small DDPM++ with the official weights of Chapter 5's
# parity check, and measure how far each is from float32 as a fraction of the output's scale:
# float16 {glue:text}`err_fp16:.1e`, bfloat16 {glue:text}`err_bf16:.1e`. bfloat16 keeps 8 bits
# of mantissa where float16 keeps 11, so it should be several times further off, and it is;
# and under autocast the gradients still arrive in float32.

# %% tags=["hide-input"]
ref = torch.load(Path("data") / "precond_edm.pt", weights_only=True)
official = EDMPrecond(**ref["kwargs"])
official.load_state_dict(ref["state_dict"], strict=True)
small = official.model.eval()
args = (ref["model_in_x"], ref["model_in_noise_labels"], ref["model_in_class_labels"])
with torch.no_grad():
    out32 = small(*args)
    out16 = small(args[0].half(), *args[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = small(*args)
err16, err_bf16 = [((o.float() - out32).abs().max() / out32.abs().max()).item()
                   for o in (out16, out_bf16)]
print(f"float16 input: output {out16.dtype}, error / max|output| = {err16:.1e}")
print(f"bfloat16 autocast: {out_bf16.dtype}, error / max|output| = {err_bf16:.1e}")
print(f"bfloat16 error / float16 error = {err_bf16 / err16:.1f}")
assert out16.dtype == torch.float16 and out_bf16.dtype == torch.bfloat16
assert err16 < 4e-3 and err_bf16 < 4e-2 and 3 < err_bf16 / err16 < 30
with torch.autocast("cpu", dtype=torch.bfloat16):
    small(*args).float().square().mean().backward()
grads = [p.grad for p in small.parameters() if p.grad is not None]
assert grads and all(g.dtype == torch.float32 for g in grads)
glue("err_fp16", err16, display=False)
glue("err_bf16", err_bf16, display=False)

# %% [markdown]
# ## Summary
#
# On a Gaussian mixture the loss of the ideal denoiser, the floor, is 1 at very small and
# nearly 1 at very large σ, and only in between can training remove loss; EDM's log-normal
# $p_\text{train}$ puts {glue:text}`share_edm` % of its draws in that range, VE and VP far
# fewer. A small DDPM++ (`EDMPrecond` around `SongUNet`) trained with `EDMLoss` starts at
# loss 1 at every σ, as App. B.6 derives, and ends close to the floor, furthest from it at
# the intermediate noise levels. The networks run in float16 (the official `use_fp16`) and
# under bfloat16 autocast, within {glue:text}`err_bf16:.0e` of float32. Chapter 6 trains a
# network on real images; Chapter 7 is the paper's training loop.

# %% tags=["hide-cell"]
# the numbers the answers quote: the median training sigma, and the initial loss at
# sigma = 50 if the network assumes sigma_data = 0.5 on this mixture
gen = torch.Generator().manual_seed(4)
second_moment = gm.sample(200_000, generator=gen).square().mean()
expected = ((0.25 + 50**2 * second_moment / 0.25) / (50**2 + 0.25)).item()
torch.manual_seed(0)
assumed = EDMPrecond(8, 3, sigma_data=0.5, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]).eval()
measured = EDMLoss(P_mean=math.log(50), P_std=0, sigma_data=0.5)(
    assumed, gm.sample(4096).float()).mean().item()
print(f"initial loss at sigma = 50 with sigma_data = 0.5: {measured:.3f} (formula "
      f"{expected:.3f}); median sigma {math.exp(-1.2):.3f} -> {math.exp(1.0):.3f}")
assert abs(measured / expected - 1) < 0.03
for name, value in [("ex_loss_sd05", expected), ("ex_median_edm", math.exp(-1.2)),
                    ("ex_median", math.exp(1.0)), ("ex_sd_toy", sigma_data)]:
    glue(name, value, display=False)

# %% [markdown]
# ## Exercises
#
# 1. What happens to the loss floor of §5b.1 if the data set is finite
#    (`GaussianMixture.from_data`)?
# 2. In §5b.2, train with `P_mean = 1.0` instead of −1.2. Where does the gap to the floor grow?
# 3. The initial loss is 1 at every σ only if `sigma_data` is the data's (here
#    {glue:text}`ex_sd_toy:.3f`). What is it at σ = 50 if the network assumes 0.5?
#
# :::{dropdown} Answers
# 1. Its ideal denoiser returns a training point as σ → 0, with zero error: the floor drops to
#    0 at small σ. A network that reached it would only reproduce its training set (Chapter 1,
#    exercise 2).
# 2. The median of $p_\text{train}$ moves from σ = {glue:text}`ex_median_edm:.2f` to
#    σ = {glue:text}`ex_median:.2f`, so fewer training samples fall at small and intermediate
#    σ: expect the ratio to the floor to grow there and to shrink slightly at large σ. This is
#    the paper's argument for centring $p_\text{train}$ where the loss can be reduced.
# 3. With $F_\theta \approx 0$ the loss is
#    $\big(\sigma_\text{data}^2 + \sigma^2\,\mathbb{E}[y^2]/\sigma_\text{data}^2\big) / (\sigma^2 + \sigma_\text{data}^2)$,
#    which tends to $\mathbb{E}[y^2]/\sigma_\text{data}^2$ at large σ: {glue:text}`ex_loss_sd05:.3f`
#    here (a fresh network measures the same), so the large-σ levels start with a smaller
#    weight than the rest: a wrong $\sigma_\text{data}$ tilts the balance that $\lambda$ set.
# :::
