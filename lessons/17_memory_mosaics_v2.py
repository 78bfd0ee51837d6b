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
# # Lesson 17: Memory Mosaics v2 (adaptive bandwidth, gated keys, three levels of memory)
#
# *Memory Mosaics at scale* (Zhang & Bottou, [arXiv 2507.03285](https://arxiv.org/abs/2507.03285))
# trains Memory Mosaics at the size of large language models and changes three things in the
# architecture (its section 3). minimosaic has each of them as an option of the model, off by default
# (so the default model stays the 2024 one of lessons 7-11). The exact forms below are our reading of
# the paper; `docs/memory-mosaics.md` lists each choice we made where we could not check it:
#
# | change | what it does | option |
# |---|---|---|
# | adaptive bandwidth (3.1) | the kernel narrows as the memory fills: $\beta(n) = \beta_1 n^{\alpha} + \beta_0$ | `adaptive_bandwidth`, `--adaptive-bandwidth` |
# | gated keys (3.2) | the leaky average's forgetting depends on the input: $\bar k_t = g_t \tilde k_t + \lambda_t \bar k_{t-1}$ | `gated_keys`, `--gated-keys` |
# | three-level memory (3.3) | short-term (recent pairs), long-term (all but the recent), persistent | `memory_levels=3`, `--memory-levels 3` |
#
# For each one we first see *why* (with NumPy only), then build it by hand and check it against the
# library, as in the earlier lessons.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import memories, nn
from minimosaic.models import ModelConfig, build_model
from minimosaic.tensor import no_grad
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("bandwidth_schedule", "gates_over_a_sequence", "which_level_answered")
rng = np.random.default_rng(0)
E = memories.EXP_SCALING

# %% [markdown]
# ## 1. Adaptive bandwidth: more pairs, narrower kernel
#
# Lesson 5 smoothed a noisy sine with the Gaussian kernel $e^{-\beta (x - x_i)^2}$ and found that the
# best $\beta$ balances bias (a wide kernel blurs the curve) against variance (a narrow one averages
# too few noisy points). The balance moves with the number $n$ of stored points: with more points, a
# narrower kernel still averages enough of them. Kernel-regression theory says the best bandwidth
# $h \propto n^{-1/5}$ in one dimension, so $\beta = 1/(2h^2) \propto n^{2/5}$.
#
# A context memory's number of pairs grows with every token (it holds $n_t = t$ pairs at position $t$),
# yet the 2024 model uses one $\beta$ per head (the key scale, $\beta = s_h^2 / 2$) for every $t$.
# Let us measure the best $\beta$ for a few $n$ by leave-one-out error, as in lesson 5.

# %%
def leave_one_out_error(x, y, beta):
    """Mean squared error of predicting each y_i from all the other points."""
    d = (x[:, None] - x[None, :]) ** 2
    np.fill_diagonal(d, np.inf)                                   # leave point i out
    w = np.exp(-beta * (d - d.min(axis=1, keepdims=True)))        # shifted: no row underflows to 0
    return np.mean((w @ y / w.sum(axis=1) - y) ** 2)


sizes = [16, 64, 256] if QUICK else [16, 32, 64, 128, 256, 512]
betas = np.geomspace(0.5, 500, 60)
best = []
for n in sizes:
    errors = np.zeros_like(betas)
    for draw in range(4):  # a few noisy data sets per size, to average out the luck of one draw
        x = rng.uniform(0, 2 * np.pi, n)
        y = np.sin(x) + 0.3 * rng.standard_normal(n)
        errors += [leave_one_out_error(x, y, b) for b in betas]
    best.append(betas[errors.argmin()])
    print(f"n = {n:4d}: best beta {best[-1]:8.1f}")
expect("the best beta grows with the number of stored points", best[-1] > 2 * best[0],
       f"{best[0]:.1f} at n = {sizes[0]} -> {best[-1]:.1f} at n = {sizes[-1]}")

# %% [markdown]
# v2 schedules the bandwidth on the number of pairs, with three learned numbers per head:
#
# $$\beta_h(n) = \beta_{1,h}\, n^{\alpha_h} + \beta_{0,h}, \qquad \beta_0, \beta_1 > 0,\ \alpha \in (0, 1).$$
#
# In minimosaic (`memories.AdaptiveBandwidth`) $\beta_0 = e^{10 \ell_0}$, $\beta_1 = e^{10 \ell_1}$ (stored
# divided by 10, like every per-head scalar) and $\alpha = \operatorname{sigmoid}(a)$. The keys are then
# of unit norm (the bandwidth no longer hides in their scale) and, because $|k_t - k_s|^2 = 2 - 2 k_t\cdot
# k_s$, the Gaussian kernel is the softmax of $2\beta(n_t)\, k_t \cdot k_s$: each query's scores are
# multiplied by its own $2\beta(n_t)$, where $n_t$ is the number of pairs query $t$ may read.

# %%
H = 2
bandwidth = memories.AdaptiveBandwidth(H).to(dtype=np.float64)
bandwidth.log_beta0.data = np.array([0.05, -0.1])
bandwidth.log_beta1.data = np.array([-0.05, 0.1])
bandwidth.alpha_logit.data = np.array([-0.4, 0.8])
n = np.arange(0, 200)
beta0, beta1 = np.exp(E * bandwidth.log_beta0.data), np.exp(E * bandwidth.log_beta1.data)
alpha = 1 / (1 + np.exp(-bandwidth.alpha_logit.data))
by_hand = beta1[:, None] * np.maximum(n, 1)[None, :] ** alpha[:, None] + beta0[:, None]   # (H, n)
check("beta1 n^alpha + beta0 == AdaptiveBandwidth", bandwidth(n).data[..., 0], by_hand, atol=1e-12)

# the measured best betas against a power law: a straight line in log-log coordinates
a_fit, log_c = np.polyfit(np.log(sizes), np.log(best), 1)
print(f"best beta ~ {np.exp(log_c):.2f} n^{a_fit:.2f}  (theory for one dimension: exponent 2/5)")

fig, axes = figure(2)
ax = axes[0, 0]
ax.loglog(sizes, best, "o", label="best beta (leave-one-out)")
grid = np.geomspace(sizes[0], sizes[-1], 100)
ax.loglog(grid, np.exp(log_c) * grid ** a_fit, "-", label=f"{np.exp(log_c):.2f} n^{a_fit:.2f}")
ax.set(xlabel="stored points n", ylabel="beta", title="noisy sine: the best kernel narrows")
ax.legend(fontsize=8)
ax = axes[0, 1]
for h in range(H):
    ax.plot(n[1:], by_hand[h, 1:], label=f"head {h}: alpha {alpha[h]:.2f}")
ax.axhline(np.e ** 2 / 2, color="gray", ls=":", label="2024 init: s^2/2, whatever n")
ax.set(xlabel="pairs stored n", ylabel="beta(n)", title="AdaptiveBandwidth: beta1 n^alpha + beta0")
ax.legend(fontsize=8)
show(fig, "bandwidth_schedule")

# %% [markdown]
# Now the context memory with the adaptive bandwidth, by hand: unit keys, and row $t$ is the
# Nadaraya-Watson estimate of lesson 5 with its own $\beta(n_t)$, $n_t = t$ (pairs $s < t$).

# %%
B, T, C = 2, 7, 8
hs = C // H
nn.manual_seed(0)
memory = memories.ContextMemory(C, H, adaptive_bandwidth=True).to(dtype=np.float64)
memory.bandwidth.alpha_logit.data = np.array([-0.4, 0.8])
x_np = rng.standard_normal((B, T, C))
k = memory.key(mm.Tensor(x_np)).data                                     # (B, H, T, hs), unit norm
v = memory.value(mm.Tensor(x_np)).data
beta = memory.bandwidths(T)                                               # (H, T)
y = np.zeros((B, H, T, hs))
for h in range(H):
    for t in range(1, T):  # y_0 = 0: nothing stored yet
        w = np.exp(-beta[h, t] * ((k[:, h, t:t + 1] - k[:, h, :t]) ** 2).sum(-1))   # (B, t)
        y[:, h, t] = (w[..., None] * v[:, h, :t]).sum(1) / w.sum(1, keepdims=True)
by_hand = y.transpose(0, 2, 1, 3).reshape(B, T, C) @ memory.W_o.weight.data
check("|k_t| == 1 with the adaptive bandwidth", np.linalg.norm(k, axis=-1), np.ones((B, H, T)), atol=1e-9)
check("ContextMemory(adaptive) == Gaussian kernel by hand", memory(mm.Tensor(x_np)), by_hand, atol=1e-10)
xt = mm.Tensor(rng.standard_normal((1, 5, C)), requires_grad=True)
expect("gradcheck: input, beta0, beta1, alpha and the rest",
       mm.gradcheck(lambda x, *p: memory(x), [xt, *memory.parameters()], mode="random", directions=8))

# %% [markdown]
# ## 2. Gated, time-variant keys
#
# The 2024 key is a leaky average with one forgetting rate per head, the same at every step:
# $\bar k_t = \tilde k_t + \lambda_h \bar k_{t-1}$. v2 lets the input decide, at every step, how much of
# the new token to write ($g_t$) and how much of the past to keep ($\lambda_t$), as gated recurrent
# networks and state-space models do, but only to *build keys*: the memory still stores every pair.
# We read the paper's gate as one number per head and position:
#
# $$\bar k_t = g_t\, \tilde k_t + \lambda_t\, \bar k_{t-1}, \qquad g_t = e^{w_{g,h} \cdot x_t}, \qquad
#   \lambda_t = e^{-|b_h + w_{\lambda,h} \cdot x_t|},$$
#
# with $b_h$ the 2024 leak rate, now the gate's bias. The weights start at zero, so a fresh model's
# keys are exactly the 2024 ones, and training can move away from them. The recurrence is still O(T):
# `memories.gated_leaky_average` runs it forward, and its backward runs the same recurrence backwards
# in time, $a_t = \partial L/\partial \bar k_t + \lambda_{t+1} a_{t+1}$, from which
# $\partial L/\partial \tilde k_t = g_t a_t$, $\partial L/\partial g_t = a_t\cdot\tilde k_t$ and
# $\partial L/\partial \lambda_t = a_t \cdot \bar k_{t-1}$.
#
# A gate can do what one fixed $\lambda_h$ cannot: forget at a boundary. Give each character a vector,
# and give $w_\lambda$ a large component along the vector of "." : $\lambda_t \approx 0$ at each ".",
# so the key of a full stop drops the sentence before it, and the next sentence's keys start afresh. (The gates below are set by hand, not trained.)

# %%
text = "the cat sat. a dog ran. the end."
chars = sorted(set(text))
embed = {c: rng.standard_normal(C) for c in chars}
stop = embed["."] / np.linalg.norm(embed["."])
embed = {c: (3 * stop if c == "." else e - (e @ stop) * stop) for c, e in embed.items()}  # "." on its own axis
xs = np.stack([embed[c] for c in text])[None]                             # (1, T, C)
nn.manual_seed(1)
key = memories.KeyExtractor(C, H, gated=True).to(dtype=np.float64)
ungated = memories.KeyExtractor(C, H).to(dtype=np.float64)
ungated.W_k.weight.data = key.W_k.weight.data.copy()
check("zero gate weights: the 2024 leaky key", key(mm.Tensor(xs)), ungated(mm.Tensor(xs)), atol=1e-12)
key.W_gate.weight.data = 0.3 * rng.standard_normal((C, H))
key.W_decay.weight.data = 0.05 * rng.standard_normal((C, H))
key.leak_rate.data[0] = 0.01                                   # head 0: b = 0.1, a long memory (lambda ~ 0.9) ...
key.W_decay.weight.data[:, 0] += 3 * stop                                     # ... that resets at "."

# by hand, one head at a time
b = E * key.leak_rate.data
g = np.exp(xs[0] @ key.W_gate.weight.data)                                # (T, H)
lam = np.exp(-np.abs(xs[0] @ key.W_decay.weight.data + b))                 # (T, H)
raw = xs[0] @ key.W_k.weight.data                                          # (T, C)
keys_by_hand = np.zeros((H, len(text), hs))
for h in range(H):
    kbar = np.zeros(hs)
    for t in range(len(text)):
        kbar = g[t, h] * raw[t, h * hs:(h + 1) * hs] + lam[t, h] * kbar
        keys_by_hand[h, t] = kbar / (np.linalg.norm(kbar) + 1e-10) * np.exp(E * key.log_scale.data[h])
gate, decay = key.gates(mm.Tensor(xs))
check("gates g_t, lambda_t == by hand", np.stack([gate.data[0], decay.data[0]]), np.stack([g.T, lam.T]),
      atol=1e-12)
check("gated keys == by hand", key(mm.Tensor(xs)).data[0], keys_by_hand, atol=1e-10)
ends = [t for t, c in enumerate(text) if c == "."]
others = [t for t, c in enumerate(text) if c != "."]
expect("head 0 keeps its past, except at every '.'", np.all(lam[ends, 0] < 0.01) and np.all(lam[others, 0] > 0.5),
       f"lambda at '.': {np.round(lam[ends, 0], 4)}, elsewhere >= {lam[others, 0].min():.2f}")

# the O(T) scan against the T x T matrix M[t, s] = g_s prod_{r=s+1..t} lambda_r, and its gradient
Tn = len(text)
M = np.zeros((H, Tn, Tn))
for h in range(H):
    for t in range(Tn):
        for s in range(t + 1):
            M[h, t, s] = g[s, h] * np.prod(lam[s + 1:t + 1, h])
raw_heads = raw.reshape(Tn, H, hs).transpose(1, 0, 2)[None]                # (1, H, T, hs)
check("gated scan == T x T matrix", memories.gated_leaky_average(mm.Tensor(raw_heads), gate, decay),
      (M @ raw_heads[0])[None], atol=1e-10)
inputs = [mm.Tensor(rng.standard_normal((1, 2, 6, 3)), requires_grad=True),
          mm.Tensor(rng.uniform(0.5, 2, (1, 2, 6)), requires_grad=True),
          mm.Tensor(rng.uniform(0.1, 0.9, (1, 2, 6)), requires_grad=True)]
expect("gradcheck gated_leaky_average (x, gate, decay)", mm.gradcheck(memories.gated_leaky_average, inputs))

fig, axes = figure(1, 2, size=(9.0, 2.6))
for row, (values, name) in enumerate(((g, "write gate g_t"), (lam, "decay lambda_t"))):
    ax = axes[row, 0]
    for h in range(H):
        ax.plot(values[:, h], marker=".", label=f"head {h}")
    ax.set_xticks(range(Tn), [repr(c)[1:-1] for c in text], fontsize=7)
    ax.set(ylabel=name)
    ax.legend(fontsize=8, loc="upper right")
axes[0, 0].set_title("gates of an (untrained) gated key extractor over a sentence; head 0 resets at '.'")
show(fig, "gates_over_a_sequence")

# %% [markdown]
# ## 3. Three levels of memory
#
# A context memory serves two kinds of questions: what just happened (the last few tokens) and what
# happened long ago (a name met pages earlier). v2 gives each its own memory. Per block there are now
# three associative memories:
#
# * a **short-term** memory that holds only the pairs of the last $w$ positions: $t - w \le s < t$
#   (`short_window`, `--short-window`);
# * a **long-term** memory that holds everything except the $m$ most recent pairs: $s < t - m$
#   (`long_skip`, `--long-skip`);
# * the **persistent** memory of lesson 9 (pairs learned over the whole training set).
#
# With $w \ge m$ the two context memories together see the whole past (minimosaic refuses $w < m$,
# which would leave pairs in neither). Both read the same $\mathrm{LN}(x)$ and their answers are added:
# $x \leftarrow x + \mathrm{Long}(\mathrm{LN}(x)) + \mathrm{Short}(\mathrm{LN}(x))$, then
# $x \leftarrow x + \mathrm{Persistent}(\mathrm{LN}(x))$. Without positional embeddings the short-term
# memory is what lets the model attend by *recency*; the long-term one can't fall back on the last
# tokens and must retrieve by content. Here are the masks by hand against `memories.memory_mask`.

# %%
T, w, m = 12, 4, 3
t_, s_ = np.arange(T)[:, None], np.arange(T)[None, :]
short_by_hand, long_by_hand = (s_ < t_) & (s_ >= t_ - w), s_ < t_ - m
check("short-term mask: t - w <= s < t", memories.memory_mask(np, T, 0, window=w), short_by_hand)
check("long-term mask: s < t - m", memories.memory_mask(np, T, 0, skip=m), long_by_hand)
check("long-term mask with m = 0: the 2024 mask", memories.memory_mask(np, T, 0),
      memories.causal_mask(np, T, 0, include_present=False))

# %% [markdown]
# A block with three levels, by hand from its parts, against the library's block; then generation:
# the short-term memory's cache keeps only its last $w$ pairs, and cached logits still equal a full pass.

# %%
config = ModelConfig(vocab_size=len(chars), n_layer=2, n_head=H, n_embd=C, block_size=16, pmem_size=12,
                     memory_levels=3, short_window=w, long_skip=m, gated_keys=True, adaptive_bandwidth=True)
nn.manual_seed(2)
model = build_model(config).to(dtype=np.float64)
block = model.blocks[0]
xb = mm.Tensor(rng.standard_normal((1, T, C)))
h1 = block.ln_1(xb)
after_context = xb + block.long_term(h1) + block.short_term(h1)
check("3-level block == x + long + short, then + persistent", block(xb),
      after_context + block.persistent(block.ln_2(after_context)), atol=1e-12)

ids = np.array([chars.index(c) for c in text])
full = model(ids[None]).data[0]
cache = model.new_cache()
with no_grad():
    rows = [model(ids[None, :3], cache).data[0]] + [model(ids[None, t:t + 1], cache).data[0]
                                                     for t in range(3, len(ids))]
check("cached logits == full forward pass (3 levels, gated, adaptive)", np.concatenate(rows), full, atol=1e-10)
kept = cache["blocks"][0]["short_term"]["keys"].shape[2]
expect("the short-term cache holds only its window", kept == w, f"{kept} pairs kept of {len(ids)}")

# %% [markdown]
# `minimosaic explain` says, for each position, which level answered: the share of each memory in the
# size of what the block added to the residual stream, $\lVert y_\ell\rVert / \sum_{\ell'} \lVert y_{\ell'}\rVert$.
# `model.inspect` returns those sizes (`levels`) with each memory's weights. On an untrained model the
# shares show only the structure: at $t = 0$ no context memory holds a pair, so the persistent memory
# answers alone; until $t > m$ the long-term memory is empty.

# %%
found = model.inspect(ids[None])[0]
sizes = np.stack([found["levels"][name][0] for name in ("short_term", "long_term", "persistent")])  # (3, T)
shares = sizes / sizes.sum(axis=0)
expect("at t = 0 only the persistent memory answers", shares[2, 0] > 0.999, f"shares {np.round(shares[:, 0], 3)}")
expect("the long-term memory is silent until t > m", np.all(shares[1, :m + 1] < 1e-12),
       f"long-term shares {np.round(shares[1, :m + 2], 3)}")
weights_long, weights_short = found["long_term"][0, 0], found["short_term"][0, 0]
check("long-term weights live on s < t - m", weights_long * ~memories.memory_mask(np, len(ids), 0, skip=m),
      np.zeros_like(weights_long))

fig, axes = figure(3, 1, size=(3.6, 3.4))
for ax, (title, grid) in zip(axes[0], (("short-term weights (head 0)", weights_short),
                                       ("long-term weights (head 0)", weights_long))):
    ax.imshow(grid, cmap="viridis")
    ax.set(title=title, xlabel="stored pair s", ylabel="query t")
ax = axes[0, 2]
bottom = np.zeros(len(ids))
for share, name in zip(shares, ("short-term", "long-term", "persistent")):
    ax.bar(range(len(ids)), share, bottom=bottom, label=name)
    bottom += share
ax.set(title="which level answered", xlabel="position t", ylabel="share of |output|", ylim=(0, 1))
ax.legend(fontsize=7)
show(fig, "which_level_answered")

# %% [markdown]
# ## Exercises
#
# 1. In the noisy-sine experiment, use two input dimensions (points in the plane). Theory says
#    $\beta \propto n^{2/(d+4)}$: does the fitted exponent come out smaller than in one dimension?
# 2. Set `bandwidth.alpha_logit` very negative ($\alpha \to 0$). What does the adaptive memory become,
#    and which 2024 parameter plays the role of $\beta_1 + \beta_0$?
# 3. Give head 0 of the gated key extractor a large $w_g$ component along the vector of "a": which keys
#    change, and why do the keys of the following tokens change too?
# 4. Train two tiny models on the stories corpus for a few hundred steps, one with
#    `--memory-levels 3 --short-window 16 --long-skip 16`, and run `minimosaic explain` on a sentence
#    that repeats a name: which level answers at the repeated name?
