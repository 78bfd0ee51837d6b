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
# # Lesson 6: associative memories
#
# A Python `dict` retrieves a value only for the exact key. An **associative memory** retrieves by
# *similarity*: ask with a key that is close to a stored one and you get (mostly) its value back; ask
# with something in between and you get a blend. It is the kernel smoother of lesson 5, with vectors
# as keys and values: store pairs $(k_i, v_i)$, answer a query $q$ with
#
# $$f(q) = \sum_i \frac{e^{-\beta\lVert q - k_i\rVert^2}}{\sum_j e^{-\beta\lVert q - k_j\rVert^2}}\, v_i .$$
#
# Memory Mosaics are built from such memories. This lesson shows how well one stores and retrieves,
# how $\beta$ trades blur for precision, and why, with keys of fixed length, the Gaussian kernel is
# exactly the **softmax attention** everyone uses.

# %%

import numpy as np

import minimosaic as mm
from minimosaic import memories, ops
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("recall_weights")

rng = np.random.default_rng(0)
d = 16


def unit(a):
    """Rows scaled to length 1."""
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

# %% [markdown]
# ## Store, then retrieve with noisy keys
#
# We store $n$ random unit keys with random unit values, then query with *noisy copies* of the keys.
# Retrieval succeeds when the answer is closer to the right value than to any other stored value.

# %%
def retrieval(n, beta, noise=0.6):
    keys, values = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((n, d)))
    queries = unit(keys + noise * rng.standard_normal((n, d)) / np.sqrt(d))
    out = memories.kernel_smoothing(mm.Tensor(queries), mm.Tensor(keys), mm.Tensor(values), beta).numpy()
    recall = float(((out @ values.T).argmax(axis=1) == np.arange(n)).mean())
    return recall, float(np.linalg.norm(out, axis=1).mean())


sizes = [16, 128] if QUICK else [16, 128, 1024]
results = {}
print("  pairs   beta   recall   |answer|")
for n in sizes:
    for beta in [0.5, 2.0, 8.0, 32.0]:
        results[n, beta] = retrieval(n, beta)
        print(f"{n:7d} {beta:6.1f} {results[n, beta][0]:8.3f} {results[n, beta][1]:10.3f}")

# %% [markdown]
# Read the table along $\beta$ (the inverse squared bandwidth):
#
# * small $\beta$: every stored pair gets similar weight, the answer is a **blur**, nearly the average of
#   all values (its length shrinks towards $1/\sqrt{n}$) and recall is near chance;
# * large $\beta$: the nearest key takes almost all the weight, the answer is that key's value
#   (length near 1), recall near 100%.
#
# And along $n$: the more pairs are stored, the more crowded the key space, and the larger $\beta$ must
# be to tell neighbours apart. Memory Mosaics learn $\beta$ per memory (lesson 5's gradient descent).

# %%
expect("a sharp memory recalls 16 pairs", results[16, 32.0][0] == 1.0, f"recall {results[16, 32.0][0]:.3f}")
expect("a blurred memory returns the average", results[16, 0.5][1] < 0.5, f"|answer| {results[16, 0.5][1]:.3f}")
expect("more pairs need a larger beta", results[128, 2.0][0] < results[16, 2.0][0],
       f"recall at beta 2: {results[128, 2.0][0]:.3f} (128 pairs) vs {results[16, 2.0][0]:.3f} (16)")

# %% [markdown]
# ## The weights behind the table
#
# Look at the weights themselves, $w_{qi}$ for 16 stored pairs, one row per query and one column per
# stored key; query $q$ is a noisy copy of key $q$, so the right answer lies on the diagonal. At small
# $\beta$ every row is a pale smear (a blur of all values); as $\beta$ grows the weight gathers on the
# diagonal until each query reads exactly one pair. Every row is a softmax, so it sums to 1 at every
# $\beta$: sharpening only moves weight, it never adds any. We check that, that these weights are the
# ones `kernel_smoothing` uses, and what the picture shows at both ends, before drawing.

# %%
rng_fig = np.random.default_rng(1)  # its own generator: the same picture in quick mode
n_fig, betas = 16, [0.5, 2.0, 4.0, 16.0]
keys = unit(rng_fig.standard_normal((n_fig, d)))
values = unit(rng_fig.standard_normal((n_fig, d)))
queries = unit(keys + 0.6 * rng_fig.standard_normal((n_fig, d)) / np.sqrt(d))


def recall_weights(queries, keys, beta):
    """w[q, i] = exp(-beta |q - k_i|^2) / sum_j exp(-beta |q - k_j|^2), in NumPy."""
    logits = -beta * ((queries[:, None] - keys[None]) ** 2).sum(axis=-1)        # (Q, n)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


recall = {beta: recall_weights(queries, keys, beta) for beta in betas}
for beta, w in recall.items():
    check(f"beta {beta:4.1f}: every row of weights sums to 1", w.sum(axis=1), np.ones(n_fig))
    check(f"beta {beta:4.1f}: weights @ values == kernel_smoothing", w @ values,
          memories.kernel_smoothing(mm.Tensor(queries), mm.Tensor(keys), mm.Tensor(values), beta), atol=1e-12)
on_key = {beta: np.diag(w) for beta, w in recall.items()}
print("weight on the matching key, mean over queries:",
      {beta: round(float(m.mean()), 3) for beta, m in on_key.items()})
expect("small beta: a blur, no weight above 1/2", recall[betas[0]].max() < 0.5,
       f"largest weight {recall[betas[0]].max():.3f} (uniform: {1 / n_fig:.3f})")
expect("large beta: each query reads its own key", on_key[betas[-1]].min() > 0.95,
       f"smallest weight on the matching key {on_key[betas[-1]].min():.4f}")
means = [m.mean() for m in on_key.values()]
expect("the weight on the matching key grows with beta", np.all(np.diff(means) > 0),
       " < ".join(f"{m:.3f}" for m in means))

fig, axes = figure(ncols=len(betas), size=(3.4, 3.6))
for ax, (beta, w) in zip(axes[0], recall.items()):
    image = ax.imshow(w, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"$\\beta$ = {beta:g}\nmean weight on the right key: {on_key[beta].mean():.2f}", fontsize=10)
    ax.set_xlabel("stored key i")
    ax.set_xticks(range(0, n_fig, 5))
    ax.set_yticks(range(0, n_fig, 5))
axes[0, 0].set_ylabel("query (a noisy copy of key q)")
fig.colorbar(image, ax=axes[0, :], shrink=0.8, label="recall weight $w_{qi}$")
show(fig, "recall_weights")

# %% [markdown]
# ## The Gaussian kernel is a softmax of dot products
#
# Expand the squared distance: $\lVert q - k_i\rVert^2 = \lVert q\rVert^2 - 2\,q\cdot k_i + \lVert k_i\rVert^2$.
# The $\lVert q\rVert^2$ term is the same for every $i$ and cancels in the normalisation. If all keys
# have the **same length**, $\lVert k_i\rVert^2$ cancels too, and
#
# $$w_i = \operatorname{softmax}_i\!\left(2\beta\, q\cdot k_i\right):$$
#
# dot-product attention with scale $2\beta$. Memory Mosaics make every key a unit vector times a learned
# length $s$, so $q\cdot k_i = s^2\, u\cdot u_i$: the learned key scale **is** the bandwidth
# ($\beta = s^2/2$). `memories.softmax_attention(q, k, v, scale=...)` computes
# $\operatorname{softmax}(\text{scale}\; q k^\top)\, v$.

# %%
n, beta = 50, 3.0
keys, values = unit(rng.standard_normal((n, d))), rng.standard_normal((n, 5))
queries = unit(rng.standard_normal((7, d)))
q, k, v = mm.Tensor(queries), mm.Tensor(keys), mm.Tensor(values)
gaussian = memories.kernel_smoothing(q, k, v, beta)
check("Gaussian kernel == softmax(2 beta q.k), unit keys", gaussian,
      memories.softmax_attention(q, k, v, scale=2 * beta), atol=1e-12)

scaled = mm.Tensor(keys * rng.uniform(0.5, 2.0, (n, 1)))  # keys of different lengths
difference = np.abs(memories.kernel_smoothing(q, scaled, v, beta).numpy()
                    - memories.softmax_attention(q, scaled, v, scale=2 * beta).numpy()).max()
expect("... but not when key lengths differ", difference > 1e-3, f"max difference {difference:.3f}")

# %% [markdown]
# With unequal lengths the Gaussian form penalises long keys ($-\beta\lVert k_i\rVert^2$) while the dot
# product *favours* them. Normalising the keys removes the question.
#
# ## The op is the maths
#
# `memories.softmax_attention` is written exactly as the formula reads: `ops.softmax(scale q @ k.T,
# mask)`, then (while training with dropout) `ops.dropout`, then `@ v`. It has no backward of its own:
# autograd chains the backwards of those three ops (lessons 2-4). Nothing is hidden: to see it,
# we write the same maths once more, inline, from even smaller pieces (lesson 4's
# softmax: subtract the row max, exponentiate, divide by the row sum), and compare values and all three
# gradients. Both must also pass a gradient check (lesson 3).

# %%
def attention_by_hand(q, k, v, scale):
    """softmax(scale q k^T) v from primitive ops, lesson 4's softmax written out."""
    scores = (q @ ops.swapaxes(k, -1, -2)) * scale                               # (..., Tq, Tk)
    e = ops.exp(scores - scores.max(axis=-1, keepdims=True).data)  # minus a constant: no overflow
    return (e / e.sum(axis=-1, keepdims=True)) @ v


def fresh(*shape):
    return mm.Tensor(rng.standard_normal(shape), requires_grad=True)


def value_and_grads(op, inputs, g):
    """op(*inputs), and the gradients of sum(op * g) with respect to every input."""
    for t in inputs:
        t.grad = None
    out = op(*inputs)
    (out * g).sum().backward()
    return [out.numpy()] + [t.grad.copy() for t in inputs]


qa, ka, va = fresh(2, 6, 4), fresh(2, 9, 4), fresh(2, 9, 3)
g = rng.standard_normal((2, 6, 3))
core = value_and_grads(lambda a, b, c: memories.softmax_attention(a, b, c, scale=0.7), (qa, ka, va), g)
inline = value_and_grads(lambda a, b, c: attention_by_hand(a, b, c, 0.7), (qa, ka, va), g)
for name, ours, by_hand in zip(["output", "dq", "dk", "dv"], core, inline):
    check(f"softmax_attention == the maths inline: {name}", ours, by_hand, atol=1e-12)
expect("gradcheck softmax_attention",
       mm.gradcheck(lambda a, b, c: memories.softmax_attention(a, b, c, scale=0.7), [qa, ka, va],
                    names=["q", "k", "v"]))

# %% [markdown]
# Written this way, attention stores the whole $(T_q, T_k)$ weight matrix and the graph of its
# softmax, and its elementwise passes run on one core. That is the price of reading the maths as it
# is. Speed lives in a separate, optional layer, `minimosaic.fast`, which this course keeps out of the
# way until lesson 14: `softmax_attention` is marked `@replaceable`, and when the fast layer is on
# (the CLI and the trainer turn it on) a flash-style tiled version with the same values and gradients
# runs instead. `memories.softmax_attention.plain` is always the code you just checked.

# %% [markdown]
# ## Masks: which pairs a query may use
#
# A memory that reads a sequence should only use pairs that exist *so far*. `memories.causal_mask(xp,
# queries, past, include_present)` builds that mask (True = may use): query $t$ may use keys at
# positions $s \le t$, or $s < t$ without the present. Lesson 7 explains why the Memory Mosaic's context
# memory leaves the present out.

# %%
with_present = memories.causal_mask(np, 5, 0, include_present=True)
without_present = memories.causal_mask(np, 5, 0, include_present=False)
print("s <= t:\n", with_present.astype(int), "\ns < t:\n", without_present.astype(int))
check("s <= t is the lower triangle", with_present, np.tril(np.ones((5, 5))))
check("s < t is the strict lower triangle", without_present, np.tril(np.ones((5, 5)), -1))

x5 = fresh(5, 4)
masked = memories.softmax_attention(x5, x5, x5, mask=without_present).numpy()
check("a query with no usable key returns 0 (t = 0)", masked[0], np.zeros(4))
weights = memories.attention_weights(x5.data, x5.data, without_present)
check("the other rows of weights sum to 1", weights[1:].sum(axis=1), np.ones(4))

# %% [markdown]
# ## Exercises
#
# 1. Store $n = 64$ pairs in $d = 4$ and in $d = 64$ dimensions. How does recall at a fixed $\beta$
#    depend on $d$? (Random unit vectors are nearly orthogonal in high dimension.)
# 2. Query with the *average* of two stored keys. What comes out for small and for large $\beta$?
# 3. Show that $\operatorname{softmax}(2\beta\, q\cdot k)$ does not change if you add the same vector
#    to every key... or does it? Compare with the Gaussian form.
# 4. Time `softmax_attention` forward + backward for $(8, 256, 32)$ inputs with and without a causal
#    mask, in `fast.enabled(False)` and `fast.enabled(True)`. The fast layer's version never stores the
#    $(T, T)$ weights: what does its backward compute again instead, and why is that still a win? (Read
#    `_tiled_attention` in `minimosaic/fast/ops.py`.)
