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
# # Lesson 3: gradient checking, and why float64
#
# Every op in minimosaic comes with a hand-written backward. A wrong backward does not crash: the model
# still trains, just worse, and nothing tells you why. So every backward gets **checked against finite
# differences** (lesson 1), automatically. This lesson shows how that check works, why it must run in
# float64, and watches it catch a bug.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import ops
from minimosaic.tensor import make_result
from _check import check, expect, figure, promise_figures, show

promise_figures("finite_difference_error_by_dtype", "backward_vs_finite_differences")

# %% [markdown]
# ## Finite differences in float32 and float64
#
# The central difference $\frac{f(x+h) - f(x-h)}{2h}$ has truncation error $O(h^2)$ and rounding error
# about $\epsilon |f| / h$, where $\epsilon$ is the spacing of floating-point numbers near 1:

# %%
for dtype in (np.float32, np.float64):
    print(f"{np.dtype(dtype).name}: machine epsilon {np.finfo(dtype).eps:.2e}, "
          f"~{np.finfo(dtype).precision} significant digits")

# %% [markdown]
# Take $f(x) = \sum_i x_i \tanh(x_i)$, whose gradient is $\tanh x_i + x_i (1 - \tanh^2 x_i)$, and look
# at the error of the central difference along one coordinate for many $h$, in both precisions.

# %%
x64 = np.random.default_rng(0).standard_normal(10)
exact = np.tanh(x64[0]) + x64[0] * (1 - np.tanh(x64[0]) ** 2)


def f_np(x):
    return (x * np.tanh(x)).sum()


best = {}
print(f"{'h':>8s} {'float32 error':>14s} {'float64 error':>14s}")
for k in range(1, 9):
    h = 10.0**-k
    row = []
    for dtype in (np.float32, np.float64):
        x = x64.astype(dtype)
        up, down = x.copy(), x.copy()
        up[0] += dtype(h)
        down[0] -= dtype(h)
        numeric = (f_np(up) - f_np(down)) / (up[0] - down[0])  # divide by the step actually taken
        err = abs(float(numeric) - exact)
        row.append(err)
        best[dtype] = min(best.get(dtype, np.inf), err)
    print(f"{h:8.0e} {row[0]:14.3e} {row[1]:14.3e}")
print(f"best float32 error {best[np.float32]:.1e}, best float64 error {best[np.float64]:.1e}")

# %% [markdown]
# In float32 the best we can do is a few correct digits, and at the $h = 10^{-6}$ that a gradient
# check typically uses, the numerical derivative is mostly rounding noise. A check in float32 would
# either pass wrong gradients (loose tolerance) or fail right ones (tight tolerance). In float64 we
# keep about ten digits at $h = 10^{-6}$, so a tolerance of $10^{-5}$ is both safe and sharp. That is
# why minimosaic's models run in float32 but **every gradient check runs in float64**, and why every
# op must work in both.

# %%
expect("float64 finite differences beat float32 by 1000x", best[np.float64] * 1e3 < best[np.float32],
       f"{best[np.float64]:.1e} vs {best[np.float32]:.1e}")

# %% [markdown]
# The same experiment over a finer sweep of $h$, drawn. Both curves are lesson 1's V, with the
# rounding arm pushed up and to the right in float32 by its $\epsilon$, $5 \times 10^8$ times larger.
# Look at the dotted line, the $h = 10^{-6}$ that `gradcheck` uses: float64 sits near the bottom of its
# V, off by about $10^{-9}$; float32 is on its rounding arm, wrong in the first or second digit.
#
# To the left of about $5 \times 10^{-7}$, float32's relative error is 1 or more: $x_0 \pm h$ changes
# $f$ by less than the spacing of float32 numbers near $f(x) \approx 4$ ($4.8 \times 10^{-7}$), so the
# two sums differ by 0 or by a whole spacing, and the "derivative" comes out 0 (as here) or far too
# big. Below $10^{-8}$, about half the spacing of float32 numbers near $x_0 \approx 0.13$, $x_0 \pm h$
# itself rounds back to $x_0$, the step taken is 0, and there is no point to draw.

# %%
sweep = np.logspace(-10, -1, 37)  # 4 points per decade
relative_error = {np.float32: [], np.float64: []}
for h in sweep:
    for dtype in (np.float32, np.float64):
        up, down = x64.astype(dtype), x64.astype(dtype)
        up[0] += dtype(h)
        down[0] -= dtype(h)
        taken = up[0] - down[0]  # 0 when x0 +- h rounds back to x0
        numeric = (f_np(up) - f_np(down)) / taken if taken else np.nan
        relative_error[dtype].append(abs(float(numeric) - exact) / abs(exact))
rel32, rel64 = np.array(relative_error[np.float32]), np.array(relative_error[np.float64])
at_gradcheck_eps = int(np.argmin(np.abs(sweep - 1e-6)))
bottom32, bottom64 = (np.median(np.sort(rel[~np.isnan(rel)])[:5]) for rel in (rel32, rel64))
expect("float32's V bottoms out 1000x above float64's", 1e3 * bottom64 < bottom32,
       f"median of the 5 lowest errors: {bottom32:.1e} vs {bottom64:.1e}")
expect("at h = 1e-6: float64 off by < 1e-7, float32 by > 1%",
       rel64[at_gradcheck_eps] < 1e-7 and rel32[at_gradcheck_eps] > 1e-2,
       f"float64 {rel64[at_gradcheck_eps]:.1e}, float32 {rel32[at_gradcheck_eps]:.1e}")
below_spacing = (sweep >= 1e-8) & (sweep < 4e-7)
expect("float32, 1e-8 <= h < 4e-7: off by 100% or more", bool(np.all(rel32[below_spacing] >= 1 - 1e-6)),
       f"smallest relative error there {rel32[below_spacing].min():.2f}")

# %%
fig, axes = figure(size=(6.4, 4.2))
ax = axes[0, 0]
ax.loglog(sweep, rel32, "o-", ms=3, label="float32")
ax.loglog(sweep, rel64, "o-", ms=3, label="float64")
ax.axvline(1e-6, color="gray", ls=":", label="h = 1e-6, as in gradcheck")
ax.set_xlabel("step h")
ax.set_ylabel("relative error of the central difference")
ax.set_title(r"Central difference of $f(x) = \Sigma_i\, x_i \tanh x_i$ along $x_0$")
ax.legend(loc="center left", bbox_to_anchor=(0.0, 0.62), fontsize=8)
show(fig, "finite_difference_error_by_dtype")

# %% [markdown]
# ## `minimosaic.gradcheck`
#
# For a function `fn(*inputs)` returning a tensor of any shape, `gradcheck` checks the scalar
# $L = \sum \text{fn}(\text{inputs}) \odot R$ with a fixed random $R$ (so every output element
# matters, with a different weight), and compares `backward()`'s gradient with central differences:
#
# * `mode='full'`: perturb every element of every input (two forward passes each: for small inputs);
# * `mode='random'`: perturb along a few random unit directions $u$ over all inputs at once and compare
#   the directional derivative $\nabla L \cdot u$ (for big inputs).
#
# It passes when $|\text{expected} - \text{got}| \le \text{atol} + \text{rtol}\,|\text{expected}|$ everywhere,
# and refuses non-float64 inputs.
#
# Besides a small network, we check two ops the course needs later, with many-to-many backwards that are
# easy to get wrong: the **softmax** $\operatorname{softmax}(z)_i = e^{z_i} / \sum_j e^{z_j}$ over the last
# axis (lesson 4 studies it), and **layer norm**, $\text{LN}(x) = w \odot (x - \bar x)/\sqrt{\operatorname{var}(x)
# + 10^{-5}} + b$ over the last axis, which keeps activations at a steady scale in the models of lesson 11.

# %%
rng = np.random.default_rng(1)


def rand64(*shape):
    return mm.Tensor(rng.standard_normal(shape), requires_grad=True)


A, B = rand64(3, 4), rand64(4, 2)
expect("gradcheck: tanh(A @ B)", mm.gradcheck(lambda a, b: (a @ b).tanh(), [A, B], names=["A", "B"]),
       "every element of A and B")
logits = rand64(2, 5)
expect("gradcheck: softmax", mm.gradcheck(lambda z: z.softmax(axis=-1), [logits]), "every element")
x, w, b = rand64(4, 6), rand64(6), rand64(6)
expect("gradcheck: layer_norm", mm.gradcheck(ops.layer_norm, [x, w, b], names=["x", "weight", "bias"]),
       "x, weight, bias")
big = rand64(64, 64)
expect("gradcheck: (big @ big.T).mean(), random mode",
       mm.gradcheck(lambda m: (m @ m.T).mean(axis=0), [big], mode="random", directions=6),
       "6 random directions over 4096 numbers")

try:
    mm.gradcheck(lambda z: z.tanh(), [mm.Tensor(np.ones(3, np.float32), requires_grad=True)])
    refused = False
except TypeError as error:
    refused = True
    print("float32 input refused:", error)
expect("gradcheck refuses float32", refused)

# %% [markdown]
# ## Writing an op, and catching a wrong backward
#
# Let us add an op of our own, the **softplus** $s(a) = \log(1 + e^a)$, a smooth relu. Its derivative
# is $s'(a) = \frac{e^a}{1 + e^a} = \sigma(a)$, the sigmoid. Like every op in `minimosaic/ops.py`, it
# computes its output from the raw array and hands `make_result` a backward that maps the output
# gradient `g` to the input's gradient, $g \odot s'(a)$.
#
# (`np.logaddexp(0, a)` computes $\log(e^0 + e^a)$ without overflowing for large $a$. A real op would
# take `xp = a.xp` to run on GPUs too; see lesson 14.)

# %%
def softplus(a):
    """z = log(1 + e^a).   dz/da = sigmoid(a)."""
    sig = 1 / (1 + np.exp(-a.data))
    return make_result(np.logaddexp(0, a.data), (a,), lambda g: (g * sig,))


def softplus_wrong(a):
    """The same forward, with a classic slip in the backward: the chain-rule factor g is forgotten."""
    sig = 1 / (1 + np.exp(-a.data))
    return make_result(np.logaddexp(0, a.data), (a,), lambda g: (sig,))


a = rand64(2, 3)
check("softplus forward vs log(1 + e^a)", softplus(a), np.log1p(np.exp(a.data)))
expect("gradcheck passes the right backward", mm.gradcheck(softplus, [a], names=["a"]))

try:
    mm.gradcheck(softplus_wrong, [a], names=["a"])
    caught = False
except mm.GradcheckError as error:
    caught = True
    print("caught:", error)
expect("gradcheck catches the forgotten g", caught)

# %% [markdown]
# Here is what gradcheck compares, drawn for a bigger input, $a$ of shape (6, 8): for each of its 48
# elements, the central difference of $L = \sum \text{softplus}(a) \odot R$ (across) against the
# gradient `backward()` gives (up). A right backward puts every point on the diagonal. The wrong one
# returns $\sigma(a)$ whatever $R$ is, so its points lie in a flat band between 0 and 1, far from the
# diagonal wherever $R$ is not close to 1.

# %%
a_big = np.random.default_rng(2).standard_normal((6, 8))
weights = np.random.default_rng(3).standard_normal(a_big.shape)  # gradcheck's fixed random R


def weighted_loss(op, data):
    return float((op(mm.Tensor(data)).data * weights).sum())


def backward_gradient(op, data):
    leaf = mm.Tensor(data.copy(), requires_grad=True)
    (op(leaf) * mm.Tensor(weights)).sum().backward()
    return leaf.grad


central = np.zeros_like(a_big)
for index in np.ndindex(a_big.shape):
    up, down = a_big.copy(), a_big.copy()
    up[index] += 1e-6
    down[index] -= 1e-6
    central[index] = (weighted_loss(softplus, up) - weighted_loss(softplus, down)) / 2e-6
right, wrong = backward_gradient(softplus, a_big), backward_gradient(softplus_wrong, a_big)
check("right backward vs central differences, 48 elements", right, central, atol=1e-5, rtol=1e-3)
expect("the wrong backward misses by far more than that", np.abs(wrong - central).max() > 0.5,
       f"largest miss {np.abs(wrong - central).max():.2f}")

# %%
fig, axes = figure(size=(5.0, 4.4))
ax = axes[0, 0]
ax.plot(central.ravel(), wrong.ravel(), "x", color="tab:red", label="wrong backward (forgets g)")
ax.plot(central.ravel(), right.ravel(), "o", mfc="none", color="tab:blue", label="right backward")
span = np.array([central.min(), central.max()])
ax.plot(span, span, color="gray", lw=0.8, label="diagonal: backward = finite differences")
ax.set_xlabel("central difference of L")
ax.set_ylabel("gradient from backward()")
ax.set_title("softplus: each point is one element of a")
ax.legend(fontsize=8)
show(fig, "backward_vs_finite_differences")

# %% [markdown]
# Note why the wrong backward is caught: if we had checked $L = \sum \text{softplus}(a)$, the incoming
# gradient would be all ones, and forgetting to multiply by `g` would be invisible. The random weights
# $R$ in gradcheck's $L = \sum f \odot R$ make `g` random, so a backward that ignores it cannot pass.

# %%
a_sum_check = mm.Tensor(a.data.copy(), requires_grad=True)
softplus_wrong(a_sum_check).sum().backward()
check("with g = 1 the wrong backward looks right", a_sum_check.grad, 1 / (1 + np.exp(-a.data)))

# %% [markdown]
# ## Exercises
#
# 1. Gradcheck `ops.relu` on inputs drawn from a standard normal, then on inputs containing 0.0 exactly
#    or within $10^{-7}$ of 0. Why can the check fail at a kink even though the backward is fine?
# 2. Make `softplus` backend-agnostic (`xp = a.xp`, `xp.logaddexp`, `xp.exp`) and gradcheck it on a
#    (5, 7) input in `mode='random'`.
# 3. Write an op `cube(a)` with backward `3 a^2 g`, then break it in three ways (drop the 3, use `a`
#    instead of `a^2`, return the gradient transposed for a square input) and see which ones
#    gradcheck catches and with what message.
# 4. Read `minimosaic/gradcheck.py`: it evaluates the loss as a Python float. What would go wrong if the
#    perturbation `eps` were added to an integer array?
