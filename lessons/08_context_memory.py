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
# # Lesson 8: the context memory layer, batched over heads
#
# Lessons 6 and 7 gave us every piece: an associative memory (kernel smoothing = softmax of dot
# products), leaky-average keys, peek-ahead values and the strict mask $s < t$. A **context memory**
# layer puts them behind learned projections and runs several of them side by side, as **heads**:
#
# $$\bar k_t = W_k x_t + \lambda_h \bar k_{t-1}, \qquad k_t = s_h \frac{\bar k_t}{\lVert\bar k_t\rVert}, \qquad
#   v_t = \sigma_h\, \text{normalize}\big((1 - c_h) W_v x_{t+1} + c_h W_v x_t\big),$$
# $$y_t = W_o \Big[\textstyle\sum_{s<t} \operatorname{softmax}_s(k_t\cdot k_s)\, v_s\Big]_{h = 1..H}, \qquad y_0 = 0.$$
#
# The model dimension $C$ is split into $H$ heads of size $h_s = C/H$; each head has its own slice of
# $W_k$ and $W_v$, its own forgetting rate $\lambda_h$, key scale $s_h$ (its bandwidth), value scale
# $\sigma_h$ and peek mix $c_h$. Each head is a separate memory; the heads' outputs are concatenated
# and mixed by $W_o$. We write the layer out by hand, one head at a time, check it against
# `memories.ContextMemory`, which runs all heads in one batched computation, and then check the
# property the whole design rests on: **causality**.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import memories, nn
from _check import check, expect, figure, promise_figures, show

promise_figures("sentence_weights")

rng = np.random.default_rng(0)
B, T, C, H = 2, 10, 16, 4
hs = C // H

nn.manual_seed(0)
# module.to(dtype=...) casts every parameter in place: float64 to compare at full precision
layer = memories.ContextMemory(C, H).to(dtype=np.float64)
for name, param in layer.named_parameters():
    print(f"{name:20s} {str(param.shape):10s}")

# %% [markdown]
# ## The per-head scalars are stored divided by 10
#
# $\lambda_h$, $s_h$ and $\sigma_h$ are kept as `leak_rate`, `log_scale` (logs, so the scales stay
# positive) and stored as value / 10 (`memories.EXP_SCALING`), used as 10 x stored: Adam (lesson 10) moves a
# parameter by about the learning rate per step whatever its gradient, so these few numbers then
# move 10 times faster than the weight matrices. Read them back:

# %%
EXP_SCALING = memories.EXP_SCALING
decay = np.exp(-np.abs(EXP_SCALING * layer.key.leak_rate.data))                  # lambda_h, (H,)
key_scale = np.exp(np.minimum(EXP_SCALING * layer.key.log_scale.data, memories.LOG_SCALE_MAX))  # s_h
value_scale = np.exp(EXP_SCALING * layer.value.log_scale.data)                    # sigma_h
peek = np.clip(layer.value.peek.data, 0, 1)                                # c_h
print("lambda_h", decay.round(3), "| s_h", key_scale.round(3), "| sigma_h", value_scale.round(3),
      "| c_h", peek.round(3))
check("the layer's own decay() gives the same lambda_h", layer.key.decay(), decay)

# %% [markdown]
# ## The layer by hand, one head at a time

# %%
def context_memory_by_hand(x):
    """x (B, T, C) NumPy -> (B, T, C), following the equations above, head by head."""
    Wk, Wv, Wo = layer.key.W_k.weight.data, layer.value.W_v.weight.data, layer.W_o.weight.data
    heads = []
    for h in range(H):
        cols = slice(h * hs, (h + 1) * hs)        # this head's slice of the projections
        raw_k = x @ Wk[:, cols]                   # (B, T, hs)
        kbar = np.zeros_like(raw_k)
        running = np.zeros((B, hs))
        for t in range(T):                        # leaky average
            running = raw_k[:, t] + decay[h] * running
            kbar[:, t] = running
        k = key_scale[h] * kbar / (np.linalg.norm(kbar, axis=-1, keepdims=True) + 1e-10)
        raw_v = x @ Wv[:, cols]                   # (B, T, hs)
        ahead = np.concatenate([raw_v[:, 1:], np.zeros((B, 1, hs))], axis=1)  # W_v x_{t+1}, 0 at the end
        v = (1 - peek[h]) * ahead + peek[h] * raw_v
        v = value_scale[h] * v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10)
        y = np.zeros((B, T, hs))
        for t in range(1, T):                     # y_0 = 0: nothing in memory yet
            scores = np.einsum("bd,bsd->bs", k[:, t], k[:, :t])  # k_t . k_s for s < t
            w = np.exp(scores - scores.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            y[:, t] = np.einsum("bs,bsd->bd", w, v[:, :t])
        heads.append(y)
    return np.concatenate(heads, axis=-1) @ Wo    # heads side by side, then mixed by W_o


x_np = rng.standard_normal((B, T, C))
check("ContextMemory == by hand, head by head", layer(mm.Tensor(x_np)), context_memory_by_hand(x_np),
      atol=1e-10)

# %% [markdown]
# ## Batched over heads
#
# The hand version loops over heads. The layer instead reshapes the projected $(B, T, C)$ activations
# to $(B, H, T, h_s)$ (`memories.split_heads`: a reshape and a transpose, no copy of the maths), so that
# one batched matrix product computes all heads' scores at once: $(B, H, T, h_s) \times (B, H, h_s, T)
# \to (B, H, T, T)$. `merge_heads` undoes it. Same numbers, a few large array operations instead of
# many small ones, which is what makes NumPy, and even more a GPU, fast.

# %%
projected = mm.Tensor(x_np @ layer.key.W_k.weight.data)               # (B, T, C)
per_head = memories.split_heads(projected, H)                           # (B, H, T, hs)
print("split_heads:", projected.shape, "->", per_head.shape)
check("split_heads: head 2 is columns 8..11", per_head.numpy()[:, 2], projected.numpy()[:, :, 8:12])
check("merge_heads undoes split_heads", memories.merge_heads(per_head).numpy().reshape(B, T, C), projected)

# %% [markdown]
# ## Causality
#
# At position $t$ the layer may use $x_0..x_t$ and nothing later; otherwise it would see the future
# during training and be useless when generating. Two independent checks:
#
# 1. **perturb** the input at position $t_0$: outputs before $t_0$ must not move;
# 2. **differentiate** each output $y_t$ with `backward()`: $\partial y_t / \partial x_s$ must be zero for
#    every $s > t$. The matrix of which outputs depend on which inputs must be lower-triangular.

# %%
t0 = 6
x_moved = x_np.copy()
x_moved[:, t0] += rng.standard_normal((B, C))
before, after = layer(mm.Tensor(x_np)).numpy(), layer(mm.Tensor(x_moved)).numpy()
check(f"outputs before t = {t0} unchanged", after[:, :t0], before[:, :t0], atol=0)
expect(f"output at t = {t0} does change", np.abs(after[:, t0] - before[:, t0]).max() > 1e-6,
       f"max change {np.abs(after[:, t0] - before[:, t0]).max():.3g}")

depends = np.zeros((T, T), dtype=int)
for t in range(T):
    x = mm.Tensor(x_np.copy(), requires_grad=True)
    layer(x)[:, t].sum().backward()
    depends[t] = np.abs(x.grad).sum(axis=(0, 2)) > 0
layer.zero_grad()
print("output t (rows) depends on input s (columns):\n", depends)
allowed = np.tril(np.ones((T, T)))
allowed[0] = 0  # y_0 = W_o 0: the memory is still empty
check("dependencies are lower triangular (s <= t)", depends, allowed)

# %% [markdown]
# Output 0 depends on nothing: the memory is still empty. Output $t$ depends on input $t$ even though
# the memory only uses pairs $s < t$: the key $k_t$ is built from $x_t$, and the value $v_{t-1}$ peeks
# at $x_t$. Both are legitimately known at time $t$.
#
# ## The gradient of the whole layer
#
# Every parameter gets a gradient through leaky averages, normalisations, the fused attention and
# three projections; a gradient check in random directions covers all of them at once (lesson 3).

# %%
x = mm.Tensor(rng.standard_normal((1, 7, C)), requires_grad=True)
params = layer.parameters()
expect("gradcheck ContextMemory: input and all 7 parameters",
       mm.gradcheck(lambda x, *p: layer(x), [x, *params], mode="random", directions=8,
                    names=["x"] + [n for n, _ in layer.named_parameters()]))

# %% [markdown]
# ## Looking inside
#
# `kernel_weights(x)` returns the memory's weights $\operatorname{softmax}_s(k_t\cdot k_s)$, shape
# (B, H, T, T): for each head, each position $t$ (row) and each past position $s$ (column). Row 0
# is empty, every other row sums to one, and the diagonal and everything above it is zero.

# %%
weights = layer.kernel_weights(mm.Tensor(x_np))
print("head 0, first sequence:\n", weights[0, 0].round(2))
check("rows t >= 1 sum to 1", weights[:, :, 1:].sum(axis=-1), np.ones((B, H, T - 1)))
check("nothing on or above the diagonal", np.triu(weights), np.zeros_like(weights), atol=0)

# %% [markdown]
# ### On a sentence
#
# Numbers are easier to read on words. We give each distinct word of a sentence a fixed random vector
# of size $C$ (a stand-in for the embedding table that lesson 11 learns) and draw each head's weights
# with the words as labels: row = the word at time $t$, column = an earlier word $s$ whose pair it may
# read. The layer is still untrained, its projections random, so what shows comes from the structure
# alone. Look at the head with the shortest memory (smallest $\lambda_h$): its key is essentially the
# current word, so each repeated word looks back at its earlier occurrences, and the last "the" splits
# its weight evenly over the three earlier ones (and reads what followed each: cat, mat, dog). In the
# heads that remember longer, a key also carries the words before it, so the same word in different
# contexts no longer looks the same and the three "the"s get different weights (here head 0 prefers
# the "the" of "sat on the", which was followed by "mat"). We check both, and the mask, on the weights
# before drawing.

# %%
sentence = "the cat sat on the mat and then the dog sat on the cat".split()
vocabulary = sorted(set(sentence))
ids = np.array([vocabulary.index(word) for word in sentence])
embedding = np.random.default_rng(1).standard_normal((len(vocabulary), C))  # one vector per word
read = layer.kernel_weights(mm.Tensor(embedding[ids][None]))[0]               # (H, T, T)
T_s = len(sentence)
check("sentence: rows t >= 1 sum to 1", read[:, 1:].sum(axis=-1), np.ones((H, T_s - 1)))
check("sentence: zero on and above the diagonal", np.triu(read), np.zeros_like(read), atol=0)
shortest, longest = int(np.argmin(decay)), int(np.argmax(decay))
repeated = [t for t in range(1, T_s) if ids[t] in ids[:t]]
expect(f"head {shortest} (lambda {decay[shortest]:.3f}): a repeated word looks back at itself",
       all(ids[read[shortest, t].argmax()] == ids[t] for t in repeated),
       f"rows {repeated}: each largest weight is on an earlier occurrence of the same word")
last_the = T_s - 2
earlier_the = [t for t in range(last_the) if sentence[t] == "the"]
on_the = {h: read[h, last_the, earlier_the] for h in (shortest, longest)}
expect(f"head {shortest}: the last 'the' weighs the earlier ones equally", np.ptp(on_the[shortest]) < 0.01,
       f"weights on positions {earlier_the}: {on_the[shortest].round(3)}")
expect(f"head {longest} (lambda {decay[longest]:.3f}): the context tells them apart",
       np.ptp(on_the[longest]) > 0.1, f"weights on positions {earlier_the}: {on_the[longest].round(3)}")

fig, axes = figure(ncols=2, nrows=2, size=(4.4, 4.2))
for h, ax in enumerate(axes.flat):
    image = ax.imshow(read[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"head {h}: $\\lambda_h$ = {decay[h]:.3f}", fontsize=10)
    ax.set_xticks(range(T_s), sentence, rotation=90, fontsize=8)
    ax.set_yticks(range(T_s), sentence, fontsize=8)
    ax.set_xlabel("earlier word s (its pair)")
    ax.set_ylabel("word at time t")
fig.colorbar(image, ax=axes, shrink=0.6, label="weight $w_{ts}$")
show(fig, "sentence_weights")

# %% [markdown]
# ## Reading a sequence in pieces
#
# When generating text, the model reads one token at a time. Recomputing everything for each new token
# would cost $O(T^2)$ per token; instead the layer can keep a `state`: the running leaky sum, the stored
# keys and the values completed so far. Feeding the sequence in two pieces must give the same outputs
# as feeding it whole.

# %%
state = {}
first = layer(mm.Tensor(x_np[:, :4]), state)
second = layer(mm.Tensor(x_np[:, 4:]), state)
print("state holds:", {name: array.shape for name, array in state.items()})
check("two pieces with a state == one whole pass", np.concatenate([first.numpy(), second.numpy()], axis=1),
      before, atol=1e-12)

# %% [markdown]
# ## Exercises
#
# 1. Set every head's `leak_rate` to a large value (so $\lambda_h \approx 0$): the keys then see only the
#    current token. Which entries of the dependency matrix survive, and why does $t - 1$ still appear?
# 2. Replace the strict mask by $s \le t$ in `context_memory_by_hand` and redo the causality check.
#    Which check fails, and what does that mean for training?
# 3. Count the parameters of a `ContextMemory(C, H)` as a function of $C$ and $H$. Which ones depend on
#    $H$?
# 4. Feed the sequence one token at a time with a `state` and check you get the same outputs again.
