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
# # Lesson 7: leaky-average keys and peek-ahead values
#
# A Memory Mosaic reads a sequence $x_0, x_1, \dots$ and at every position $t$ must predict what comes
# next. Its context memory does that with the associative memory of lesson 6, filled as it reads:
#
# * the **key** $k_t$ describes *where we are*: a summary of the recent past,
#   $\bar k_t = \sum_{s \le t} \lambda^{t-s}\, W_k x_s$ (a **leaky average**);
# * the **value** $v_t$ describes *what came next*: it **peeks ahead**, $v_t \approx W_v x_{t+1}$.
#
# At time $t$ the memory looks for past positions whose situation resembled the present one and
# returns what followed them: $y_t = \sum_{s<t} \operatorname{softmax}_s(k_t\cdot k_s)\, v_s$. This lesson
# builds both features, checks minimosaic's $O(T)$ recurrence against the $T \times T$ matrix form of the
# official code, and shows why the sum stops at $s < t$.

# %%
import time

import numpy as np
from matplotlib.patches import Rectangle

import minimosaic as mm
from minimosaic import memories, ops
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("leaky_kernel", "causal_mask", "memory_weights")

rng = np.random.default_rng(0)

# %% [markdown]
# ## Leaky average: a recurrence and a matrix
#
# The leaky average is a running sum that forgets at rate $\lambda \in [0, 1)$ per step:
#
# $$\bar k_t = x_t + \lambda\, \bar k_{t-1}, \quad \bar k_{-1} = 0
# \qquad\Longleftrightarrow\qquad
# \bar k_t = \sum_{s \le t} \lambda^{t-s} x_s = (M x)_t, \quad M_{ts} = \lambda^{t-s}\,[s \le t].$$
#
# The recurrence costs $O(T)$ per feature; the matrix form costs $O(T^2)$ but is one matrix product.
# `memories.leaky_average(x, decay)` **is** the recurrence: the three lines of the loop below, on whole
# (B, H, hs) slices at a time, with a hand-written backward (next cell). The official PyTorch code
# builds $M$ instead. Each head $h$ has its own $\lambda_h$: shapes are (B, H, T, hs) and (H,).

# %%
def leaky_by_hand(x, decay):
    """The recurrence, one position at a time, in NumPy."""
    out = np.zeros_like(x)
    running = np.zeros_like(x[:, :, 0])
    for t in range(x.shape[2]):
        running = x[:, :, t] + decay[:, None] * running
        out[:, :, t] = running
    return out


def leaky_by_matrix(x, decay):
    """The official code's way, from minimosaic ops (so autograd gives its gradient): kbar = M x with
    M[t, s] = lambda^(t - s) for s <= t, else 0; lambda^n written exp(n log lambda) (lambda > 0)."""
    xp, T = x.xp, x.shape[2]
    t = xp.arange(T, dtype=x.dtype)
    lag = t[:, None] - t[None, :]                                                 # (T, T): t - s
    powers = ops.exp(ops.log(decay).reshape(-1, 1, 1) * xp.maximum(lag, 0))      # (H, T, T)
    return (powers * (lag >= 0).astype(x.dtype)) @ x                             # M x, per head


B, H, T, hs = 2, 3, 40, 4
x_np = rng.standard_normal((B, H, T, hs))
decay_np = np.array([0.05, 0.5, 0.95])
x, decay = mm.Tensor(x_np, requires_grad=True), mm.Tensor(decay_np, requires_grad=True)
kbar = memories.leaky_average(x, decay)
check("leaky_average == the recurrence by hand", kbar, leaky_by_hand(x_np, decay_np), atol=1e-12)
check("leaky_average == T x T matrix M x", kbar, leaky_by_matrix(x, decay), atol=1e-12)

# %% [markdown]
# Their gradients must agree too, for $x$ and for $\lambda$ (the forgetting rate is learned). The
# backward of a leaky average is another leaky average, run backwards in time:
# $a_t = g_t + \lambda a_{t+1}$ is $\partial L/\partial x_t$, and
# $\partial L/\partial\lambda = \sum_{t \ge 1} a_t\cdot\bar k_{t-1}$. That reversed recurrence is
# `leaky_average`'s hand-written backward; the matrix form gets its gradient from autograd.

# %%
g = rng.standard_normal((B, H, T, hs))


def leaky_grads(op):
    """d/dx and d/dlambda of sum(op(x, decay) * g)."""
    x.grad = decay.grad = None
    (op(x, decay) * g).sum().backward()
    return x.grad.copy(), decay.grad.copy()


recurrence, matrix = leaky_grads(memories.leaky_average), leaky_grads(leaky_by_matrix)
check("recurrence vs matrix: d/dx", recurrence[0], matrix[0], atol=1e-10)
check("recurrence vs matrix: d/dlambda", recurrence[1], matrix[1], atol=1e-9)
small = [mm.Tensor(rng.standard_normal((1, 2, 37, 3)), requires_grad=True),
         mm.Tensor(np.array([0.3, 0.8]), requires_grad=True)]
expect("gradcheck leaky_average (x, lambda)", mm.gradcheck(memories.leaky_average, small, names=["x", "lambda"]))

# %% [markdown]
# The recurrence is the cheapest in arithmetic ($O(T d)$ against the matrix's $O(T^2 d)$), but it is $T$
# small steps issued one by one from Python. Time both:

# %%
T_long = 256 if QUICK else 1024
xl = mm.Tensor(rng.standard_normal((4, 4, T_long, 32)).astype(np.float32))
dl = mm.Tensor(np.array([0.1, 0.5, 0.9, 0.99], np.float32))
for name, op in (("recurrence (the core)", memories.leaky_average), ("T x T matrix", leaky_by_matrix)):
    start = time.perf_counter()
    op(xl, dl)
    print(f"{name:26s} T = {T_long}: {1e3 * (time.perf_counter() - start):7.1f} ms")

# %% [markdown]
# The optional fast layer (`minimosaic.fast`, lesson 14) gets the best of both: a **chunked scan**, a
# small $M$ inside chunks of 16 positions (one batched product) and the recurrence only across chunks,
# tested to give the recurrence's values and gradients. This lesson stays on the plain core.

# %% [markdown]
# ## What a leaky key remembers
#
# Feed one-hot tokens. With $\lambda = 0$ the key is the current token only; with $\lambda > 0$ the
# previous token is still there with weight $\lambda$, the one before with $\lambda^2$, and so on. So
# the key of position $t$ tells "the current token, then the one before, ...": the *context*. Two
# positions get similar keys when their recent histories agree.

# %%
tokens = np.array([2, 0, 1, 3])
onehot = np.eye(4)[tokens][None, None]  # (1, 1, T, 4)
for lam in (0.0, 0.5):
    kbar = memories.leaky_average(mm.Tensor(onehot), mm.Tensor(np.array([lam]))).numpy()[0, 0]
    print(f"lambda = {lam}: key at the last position = {kbar[-1].round(3)}  (tokens {tokens.tolist()})")
check("lambda = 0.5 key: 1 x current, 0.5 x previous, ...", kbar[-1], [0.25, 0.5, 0.125, 1.0])  # tokens 0, 1, 2, 3

# %% [markdown]
# How much of the past a key holds is the kernel $\lambda^{t-s}$: the weight of the input $t - s$ steps
# back. We read it off `leaky_average` itself, as its response to a single 1 at $s = 0$ (an impulse),
# one head per $\lambda$. Look at how fast each curve falls: $\lambda = 0.3$ has forgotten almost
# everything after 3 steps, $\lambda = 0.95$ still holds a third after 20. The total weight
# $\sum_{n \ge 0} \lambda^n = 1/(1 - \lambda)$ is how many steps a key "remembers". On a log scale
# (right) each curve is a straight line of slope $\log\lambda$: the decay is geometric, each step
# multiplies by $\lambda$. That is what we check, on the numbers, before drawing.

# %%
lambdas = np.array([0.3, 0.6, 0.85, 0.95])
lag = np.arange(61)
impulse = np.zeros((1, len(lambdas), len(lag), 1))
impulse[:, :, 0] = 1.0                                     # x_0 = 1, every later x_t = 0
response = memories.leaky_average(mm.Tensor(impulse), mm.Tensor(lambdas)).numpy()[0, :, :, 0]  # (heads, T)
check("the response to an impulse is lambda^(t - s)", response, lambdas[:, None] ** lag, atol=1e-12)
check("geometric: each step multiplies by lambda", response[:, 1:] / response[:, :-1],
      np.broadcast_to(lambdas[:, None], (len(lambdas), len(lag) - 1)), atol=1e-12)
check("total weight = (1 - lambda^T) / (1 - lambda)", response.sum(axis=1),
      (1 - lambdas ** len(lag)) / (1 - lambdas), atol=1e-12)

fig, axes = figure(ncols=2, size=(4.6, 3.6))
for lam, r in zip(lambdas, response):
    for ax in axes[0]:
        ax.plot(lag, r, "o-", ms=2.5, lw=1, label=f"$\\lambda$ = {lam:g}: total weight {1 / (1 - lam):.3g}")
axes[0, 0].set_xlim(-1, 30)
axes[0, 1].set_yscale("log")
axes[0, 1].set_ylim(1e-6, 2)
for ax, scale in zip(axes[0], ("linear", "log")):
    ax.set_xlabel("lag t - s (steps back)")
    ax.set_ylabel(f"weight $\\lambda^{{t-s}}$ ({scale} scale)")
    ax.grid(alpha=0.3)
axes[0, 0].set_title("the leaky-average kernel")
axes[0, 1].set_title("log scale: straight lines, geometric decay")
axes[0, 0].legend(fontsize=8)
show(fig, "leaky_kernel")

# %% [markdown]
# In the model the key is then **normalised** to a unit vector and multiplied by a learned scale $s$
# (lesson 6: $s^2/2$ is the kernel's $\beta$): `memories.normalize(x)` $= x / (\lVert x\rVert + 10^{-10})$.

# %%
z = mm.Tensor(rng.standard_normal((3, 5)), requires_grad=True)
check("normalize == x / |x|", memories.normalize(z), z.data / np.linalg.norm(z.data, axis=-1, keepdims=True))
expect("gradcheck normalize", mm.gradcheck(memories.normalize, [z]))

# %% [markdown]
# ## Peek-ahead values
#
# The value stored at position $t$ is what came *next*, mixed with a bit of the present by a learned
# $c_h$ per head (initialised in $[0, 1]$ and then free, as in the official code):
#
# $$v_t = (1 - c)\, \tilde v_{t+1} + c\, \tilde v_t, \qquad \tilde v_t = W_v x_t, \quad \tilde v_T = 0.$$
#
# The last position's value is incomplete: $x_T$ has not been read yet. `memories.peek_ahead` does it in
# one pass with a hand-written backward; written from ops it is `(1 - c) shift(v, -1) + c v` (`ops.shift`
# by $-1$ peeks one step ahead, with a zero at the end), and both must give the same values and gradients.

# %%
vt_np = rng.standard_normal((B, H, T, hs))
c_np = np.array([0.0, 0.3, 1.2])  # c is not clipped: 1.2 weighs the present more than 1
vt, c = mm.Tensor(vt_np, requires_grad=True), mm.Tensor(c_np, requires_grad=True)
by_hand = c_np[:, None, None] * vt_np
by_hand[:, :, :-1] += (1 - c_np[:, None, None]) * vt_np[:, :, 1:]
check("peek_ahead == (1-c) v[t+1] + c v[t] by hand", memories.peek_ahead(vt, c), by_hand, atol=1e-12)


def peek_by_ops(v, c):
    """(1 - c) v_{t+1} + c v_t from ops, so autograd gives its gradient."""
    c = c.reshape(-1, 1, 1)                                                      # (H, 1, 1)
    return (1 - c) * ops.shift(v, -1, axis=-2) + c * v


g = np.random.default_rng(1).standard_normal((B, H, T, hs))  # weights of the loss sum(out * g)
grads = []
for op in (memories.peek_ahead, peek_by_ops):
    vt.grad = c.grad = None
    out = op(vt, c)
    (out * g).sum().backward()
    grads.append((out.numpy(), vt.grad.copy(), c.grad.copy()))
for name, ours, by_ops in zip(["values", "d/dv", "d/dc"], *grads):
    check(f"peek_ahead == (1-c) shift(v, -1) + c v: {name}", ours, by_ops, atol=1e-12)
small = [mm.Tensor(rng.standard_normal((1, 2, 6, 3)), requires_grad=True),
         mm.Tensor(np.array([0.2, 0.7]), requires_grad=True)]
expect("gradcheck peek_ahead (v, c)", mm.gradcheck(memories.peek_ahead, small, names=["v", "c"]))

# %% [markdown]
# ## Why the present is masked out
#
# Put the pieces together on token sequences, with one-hot features so that we can read the output
# as a guess of the next token: keys = scaled unit leaky averages of the tokens, values =
# peek-ahead with $c = 0$, so $v_s$ **is** the one-hot of $x_{s+1}$. The guess at $t$ is the
# token with the largest entry of $y_t = \sum_s w_{ts} v_s$.
#
# Now suppose we let position $t$ use its own pair, $s \le t$. Its own value $v_t$ is the one-hot of
# $x_{t+1}$, **the very token it must predict**, and its own key matches itself best of all
# ($k_t\cdot k_t = s^2$ is the largest possible dot product). So the memory simply reads off the answer.
# On **pure noise**, where no honest predictor can beat chance ($1/V$), it scores 100%: a leak,
# exactly like letting an example vote for itself in lesson 5. With $s < t$ it scores chance on noise,
# as it must, and it still learns real structure: on a sequence that repeats, it predicts well.

# %%
V, T = 8, 64


def keys_and_values(tokens, scale=4.0, lam=0.5):
    onehot = mm.Tensor(np.eye(V)[tokens][None, None])                              # (1, 1, T, V)
    keys = memories.normalize(memories.leaky_average(onehot, mm.Tensor(np.array([lam])))) * scale
    values = memories.peek_ahead(onehot, mm.Tensor(np.array([0.0])))                # v_t = onehot(x_{t+1})
    return keys, values


def next_token_accuracy(tokens, include_present, scale=4.0, lam=0.5):
    keys, values = keys_and_values(tokens, scale, lam)
    mask = memories.causal_mask(np, T, 0, include_present=include_present)
    y = memories.softmax_attention(keys, keys, values, mask=mask).numpy()[0, 0]    # (T, V)
    guesses = y.argmax(axis=1)[1:-1]  # t = 0 has no past; the last target is unknown
    return float((guesses == tokens[2:]).mean())


noise = rng.integers(0, V, T)
pattern = np.tile(rng.permutation(V)[:5], T // 5 + 1)[:T]
leaky = next_token_accuracy(noise, include_present=True)
honest = next_token_accuracy(noise, include_present=False)
learned = next_token_accuracy(pattern, include_present=False)
print(f"chance level: {1 / V:.3f}")
print(f"pure noise, s <= t (present included): {leaky:.3f}")
print(f"pure noise, s <  t (present masked):   {honest:.3f}")
print(f"a repeating pattern, s < t:            {learned:.3f}")
expect("including s = t 'predicts' noise: the target leaked", leaky > 0.95, f"{leaky:.3f}")
expect("masking s = t: noise stays unpredictable", honest < 0.4, f"{honest:.3f}")
expect("masking s = t: real structure is still found", learned > 0.85, f"{learned:.3f}")

# %% [markdown]
# ### The mask, drawn
#
# Row $t$ is the query at time $t$, column $s$ a stored pair; 1 = may use; the present, $s = t$, is
# framed in red. Left, $s \le t$: the diagonal is in, so every query may read its own value, the
# answer. Right, $s < t$, the mask a context memory uses: zero on and above the diagonal, and row 0 is
# empty (nothing is stored yet).

# %%
T_small = 8
with_present = memories.causal_mask(np, T_small, 0, include_present=True).astype(int)
without_present = memories.causal_mask(np, T_small, 0, include_present=False).astype(int)
check("s < t: zero on and above the diagonal", np.triu(without_present), np.zeros((T_small, T_small)), atol=0)
check("s < t: one strictly below it", np.tril(without_present, -1), np.tri(T_small, k=-1), atol=0)
check("s <= t is s < t plus the diagonal", with_present, without_present + np.eye(T_small), atol=0)

fig, axes = figure(ncols=2, size=(3.6, 3.6))
for ax, mask, title in zip(axes[0], (with_present, without_present),
                           ("s <= t: the present leaks", "s < t: the context memory's mask")):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, interpolation="nearest")
    for t in range(T_small):
        for s_ in range(T_small):
            ax.text(s_, t, mask[t, s_], ha="center", va="center", fontsize=8,
                    color="white" if mask[t, s_] else "0.4")
        ax.add_patch(Rectangle((t - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="tab:red", lw=1.5))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("stored pair s")
    ax.set_ylabel("query t")
    ax.set_xticks(range(T_small))
    ax.set_yticks(range(T_small))
show(fig, "causal_mask")

# %% [markdown]
# ### What the memory does with it
#
# The weights $w_{ts}$ of the three runs above, one heat map each. Look at the first: on noise with the
# present included, the weight sits on the diagonal, each position reading its own pair, which holds
# the next token; that is the near-100% "accuracy". In the middle, the same noise with $s < t$: the weight
# is scattered over the past, with nothing to find. On the right, the repeating pattern: stripes 5, 10,
# 15, ... steps back, the earlier places where the recent tokens were the same (the weight is shared
# among them, so the stripes fade as the pattern repeats). We check these
# three facts on the weights, and that they are the weights the memory used.

# %%
weights = {}
for name, tokens, include_present in (("noise, s <= t", noise, True), ("noise, s < t", noise, False),
                                      ("pattern, s < t", pattern, False)):
    keys, values = keys_and_values(tokens)
    mask = memories.causal_mask(np, T, 0, include_present=include_present)
    w = memories.attention_weights(keys.data, keys.data, mask)[0, 0]                 # (T, T)
    check(f"{name}: the weights give the memory's output", w @ values.numpy()[0, 0],
          memories.softmax_attention(keys, keys, values, mask=mask).numpy()[0, 0], atol=1e-12)
    first = 0 if include_present else 1                                             # s < t: row 0 is empty
    check(f"{name}: rows sum to 1", w.sum(axis=1)[first:], np.ones(T - first))
    weights[name] = w
t = np.arange(T)
leak = weights["noise, s <= t"]
expect("noise, s <= t: each row's largest weight is its own pair", np.all(leak.argmax(axis=1) == t),
       f"mean weight on the diagonal {np.diag(leak).mean():.3f}")
check("noise, s < t: zero on and above the diagonal", np.triu(weights["noise, s < t"]), np.zeros((T, T)),
      atol=0)
same_context = ((t[:, None] - t[None, :]) % 5 == 0) & (t[:, None] > t[None, :])  # 5, 10, ... steps back
on_stripes = (weights["pattern, s < t"] * same_context).sum(axis=1)[5:]
expect("pattern: the weight sits 5, 10, ... steps back", on_stripes.min() > 0.9,
       f"smallest row total on the stripes {on_stripes.min():.4f} (t >= 5)")

fig, axes = figure(ncols=3, size=(3.6, 3.8))
for ax, (name, w) in zip(axes[0], weights.items()):
    image = ax.imshow(w, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("stored pair s")
axes[0, 0].set_ylabel("query t")
fig.colorbar(image, ax=axes[0, :], shrink=0.8, label="weight $w_{ts}$")
show(fig, "memory_weights")

# %% [markdown]
# In a trained model the leak is worse than a wrong number: training would reward copying $v_t$
# instead of learning anything, and the model would be useless at generation time, where $x_{t+1}$
# does not exist yet. The strict mask $s < t$ works because $v_{t-1}$ contains $x_t$, which *is*
# known at time $t$: the newest pair a memory may use is the one that just completed.
#
# ## Exercises
#
# 1. In `next_token_accuracy` set `lam = 0` and use a pattern in which a token is followed by different
#    tokens in different places (e.g. `0 1 0 2 0 1 0 2 ...`). Why does accuracy drop, and why does
#    `lam = 0.5` fix it?
# 2. With the present included, lower `scale` from 4 to 0.5. Does the leak disappear? Why not entirely?
# 3. Write the leaky average of a (T,) signal with `np.convolve` and compare. What is the kernel?
# 4. Show that $\partial \bar k_t / \partial \lambda = \sum_{s<t} (t-s) \lambda^{t-s-1} x_s$ and check it
#    against the gradient that `leaky_average` returns for one position.
# 5. `leaky_by_matrix` takes $\log\lambda$: what goes wrong at $\lambda = 0$, and how would you build $M$
#    without it? Then read `chunked_scan` in `minimosaic/fast/ops.py`: which chunk size makes it the
#    plain recurrence, and which the $T \times T$ matrix? Time a few sizes in between.
