# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 15: mixed precision from scratch
#
# A float16 number takes half the memory of a float32 and, on a GPU's tensor cores, its products run many
# times faster. But float16 is coarse and short: 11 significant bits, and nothing above 65504. Training
# in it naively loses small gradients to zero. This lesson measures float16's range and spacing, makes
# a gradient underflow, rescues it with **loss scaling** by hand, and then checks minimosaic's policy
# (`minimosaic.precision`): products in float16, softmax, layer norm and the loss in float32, float32
# master weights, and a loss scale that adapts itself. Everything here runs on the CPU (NumPy has float16).

# %%
import numpy as np

from minimosaic import nn, optim, precision
from minimosaic import train as trainer
from minimosaic.models import ModelConfig, build_model
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("float16_spacing")

# %% [markdown]
# ## Range and spacing
#
# Between two powers of two, a float16 has 1024 evenly spaced values, so the gap between neighbours
# grows with the number: $\text{spacing}(x) \approx 2^{-10} x$. Below $2^{-14} \approx 6.1 \cdot 10^{-5}$
# the numbers are *subnormal*: the gap stops shrinking, and below $2^{-24} \approx 6 \cdot 10^{-8}$ there
# is only 0. Above 65504 there is only infinity.

# %%
f16, f32 = np.finfo(np.float16), np.finfo(np.float32)
print(f"float16: max {f16.max}, smallest normal {f16.tiny}, smallest subnormal {f16.smallest_subnormal}, "
      f"eps {f16.eps}")
print(f"float32: max {f32.max:.3g}, smallest normal {f32.tiny:.3g}, eps {f32.eps:.3g}")
check("float16's largest number", float(f16.max), 65504.0)
expect("1 + eps/2 rounds back to 1 in float16", np.float16(1) + np.float16(f16.eps / 2) == np.float16(1))
expect("1e-8 is 0 in float16", np.float16(1e-8) == 0)
with np.errstate(over="ignore"):
    expect("70000 overflows float16", np.isinf(np.float16(70000)))

x = np.logspace(-9, 5, 400)
with np.errstate(over="ignore"):  # past 65504 float16 has no numbers: no gap to draw
    spacing16 = np.array([float(np.spacing(np.float16(v))) if np.isfinite(np.float16(v)) else np.nan for v in x])
spacing32 = np.array([float(np.spacing(np.float32(v))) for v in x])
normal = x >= f16.tiny
ratio = np.log2(spacing16[normal & (x < 6e4)] / x[normal & (x < 6e4)])
expect("float16's gap is 2^-11 to 2^-10 of the number in its normal range",
       bool(np.all((ratio >= -11) & (ratio <= -10))), f"log2(gap / x) in [{ratio.min():.2f}, {ratio.max():.2f}]")
expect("below the smallest normal the gap stops shrinking", np.all(spacing16[x < float(f16.tiny)] ==
                                                                   float(f16.smallest_subnormal)))

fig, axes = figure(size=(6.5, 3.8))
ax = axes[0, 0]
ax.loglog(x, spacing16, label="float16")
ax.loglog(x, spacing32, label="float32")
ax.axvspan(x[0], float(f16.tiny), color="0.9", label="float16 subnormal (and 0 below 6e-8)")
ax.axvline(float(f16.max), color="r", ls=":", label="float16 max 65504")
ax.set(xlabel="number x", ylabel="gap to the next number", title="float16 is coarse and short")
ax.legend(fontsize=7)
show(fig, "float16_spacing")

# %% [markdown]
# ## A gradient that underflows, and loss scaling by hand
#
# Gradients of a trained model are often tiny. Take $L = \sum_i w_i x_i$ with $x_i = 10^{-8}$: the
# gradient $dL/dw = x$ computed in float16 is exactly zero (and one of $5 \cdot 10^{-6}$ keeps only a few
# bits, as a subnormal). Multiply the loss by $S = 2^{16}$ before the
# backward pass: every gradient is multiplied by $S$ too (the chain rule is linear), lands in float16's
# range, and dividing by $S$ *in float32* afterwards gives it back.

# %%
small = np.full(5, 1e-8)
lost = (small.astype(np.float16) * np.float16(1.0))               # dL/dw in float16
scaled = (small * 2.0 ** 16).astype(np.float16).astype(np.float32) / np.float32(2.0 ** 16)
print("float16 gradient:", lost, "| scaled, then unscaled in float32:", scaled)
expect("the float16 gradient underflowed to zero", np.all(lost == 0))
check("loss scaling keeps it", scaled, small, rtol=2e-3)

# %% [markdown]
# Scale too far and the large gradients overflow instead. So the scale is **dynamic**: start high; when a
# step's gradients contain inf or nan, skip that step and halve the scale; after a run of good steps,
# double it. `precision.LossScaler` is those few lines.

# %%
p = nn.Parameter(np.ones(2, np.float32))
scaler = precision.LossScaler(scale=2.0 ** 16, growth_interval=2)
for grad in ([np.inf, 1.0], [2.0 ** 16, 0.0], [2.0 ** 15, 0.0], [1.0, 1.0]):
    p.grad = np.array(grad, np.float32)
    finite = scaler.unscale([p])
    scaler.update(finite)
    print(f"gradient {grad}: finite {finite!s:5}, scale now {scaler.scale:g}")
expect("the overflow was skipped and the scale halved, then doubled after 2 good steps",
       scaler.skipped_steps == 1 and scaler.scale == 2.0 ** 16)

# %% [markdown]
# ## The library's policy
#
# Inside `precision.autocast("fp16")`, `ops.matmul` casts its float32 operands down to float16, while
# `ops.softmax`, `ops.layer_norm`, `memories.normalize`, the leaky average and `ops.cross_entropy` cast
# float16 inputs *up*: sums of many small terms (a softmax's normaliser, a variance, the loss) keep
# float32's precision. The parameters stay float32 ("master weights"); the casts are ops, so their
# gradients arrive in float32 and AdamW updates float32 numbers.

# %%
nn.manual_seed(0)
config = ModelConfig(vocab_size=17, n_layer=1, n_head=2, n_embd=16, block_size=12, pmem_size=12)
model = build_model(config)
ids = np.random.default_rng(0).integers(0, 17, (4, 13))
with precision.autocast("fp16"):
    loss16 = model.loss(ids[:, :-1], ids[:, 1:])
loss16.backward()
grads16 = {name: p.grad.copy() for name, p in model.named_parameters()}
model.zero_grad()
loss32 = model.loss(ids[:, :-1], ids[:, 1:])
loss32.backward()
expect("the loss is float32 and every gradient reaches a float32 parameter",
       loss16.dtype == np.float32 and all(g.dtype == np.float32 for g in grads16.values()))
check("float16 loss == float32 loss (to float16 rounding)", loss16.item(), loss32.item(), rtol=5e-3)
worst = max(np.abs(grads16[n] - p.grad).max() / (np.abs(p.grad).max() + 1e-12) for n, p in model.named_parameters())
expect("every gradient within 5% of float32 (relative to its largest entry)", worst < 0.05, f"worst {worst:.3f}")

# %% [markdown]
# The trainer puts it together: `minimosaic train --precision fp16` (or `TrainConfig(precision="fp16")`)
# scales the loss, skips and halves on overflow, saves the scaler's state in the checkpoint (so a resumed
# run continues exactly), and logs the scale. On the CPU float16 is *slower* (NumPy has no float16 BLAS);
# the point of this lesson is the arithmetic. The speed belongs to a GPU's tensor cores.

# %%
steps = 10 if QUICK else 40
opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=3e-3)
scaler = precision.LossScaler()
history = []
for step in range(steps):
    loss, norm = trainer.training_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 3e-3, grad_clip=1.0,
                                       precision="fp16", scaler=scaler)
    history.append(float(loss))
print(f"float16 training: loss {history[0]:.3f} -> {history[-1]:.3f}, loss scale {scaler.scale:g}, "
      f"{scaler.skipped_steps} step(s) skipped")
expect("float16 training lowers the loss", history[-1] < history[0] - 0.2, f"{history[0]:.3f} -> {history[-1]:.3f}")
expect("the parameters are still float32", all(p.dtype == np.float32 for p in model.parameters()))

# %% [markdown]
# ## Exercises
#
# 1. Train the toy model above with `precision="fp16"` but no scaler. How many gradients are exactly zero
#    after the first backward pass, compared with the scaled run?
# 2. Start the scaler at $2^{24}$. How many steps are skipped before training proceeds, and why is that
#    cheap?
# 3. bfloat16 keeps float32's exponent (range up to $3 \cdot 10^{38}$) with only 8 significant bits. Which
#    of this lesson's problems would it solve, and which would it make worse?
