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

import minimosaic as mm
from minimosaic import memories, ops
from _check import QUICK, check, expect

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


def next_token_accuracy(tokens, include_present, scale=4.0, lam=0.5):
    onehot = mm.Tensor(np.eye(V)[tokens][None, None])                              # (1, 1, T, V)
    keys = memories.normalize(memories.leaky_average(onehot, mm.Tensor(np.array([lam])))) * scale
    values = memories.peek_ahead(onehot, mm.Tensor(np.array([0.0])))                # v_t = onehot(x_{t+1})
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
