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
# # Lesson 12: predictive disentanglement (three moons)
#
# Why several small memories rather than one big one? The Memory Mosaics paper answers with a toy
# world. Three moons circle a planet, each with its own period; we observe all three positions at
# every step, $x_t \in \mathbb{R}^6$ (a $(\cos, \sin)$ pair per moon), and must predict $x_{t+1}$. The
# periods change from one sequence to the next, so no weight can store where a moon will be: the
# prediction has to come **from the context**, by a memory recalling "the last time things looked like
# now, what came next?".
#
# * **One head** of dimension 6 keys on all three moons at once. A past moment matches the present only
#   if all three moons were where they are now, which happens once per *joint* period (the least common
#   multiple of the three), far beyond our sequences.
# * **Three heads** of dimension 2 can each follow **one** moon. A moon is back where it was after its
#   own period, a few steps, so each head soon finds an exact match.
#
# Nothing tells the three-head memory to split the moons between its heads; training finds that this
# split makes the predictions better, and does it. The paper calls this **predictive
# disentanglement**: gradient descent on the prediction loss makes each memory specialise in a part of
# the world that can be predicted on its own.

# %%
import time

import numpy as np

import minimosaic as mm
from minimosaic import memories, nn, optim
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("orbits", "error_by_context", "heads_split")

# %% [markdown]
# ## The data
#
# Each moon gets a period drawn from {5, 7, 9, 11, 13} steps (three different ones) and a random
# starting angle. Joint periods are at least $5 \cdot 7 \cdot 9 = 315$ steps; our sequences have 48.

# %%
T = 48
PERIODS = np.array([5.0, 7.0, 9.0, 11.0, 13.0])


def moons(batch, rng):
    """(batch, T, 6): columns (cos, sin) of moon 1, then moon 2, then moon 3."""
    periods = np.stack([rng.choice(PERIODS, 3, replace=False) for _ in range(batch)])   # (B, 3)
    start = rng.uniform(0, 2 * np.pi, (batch, 3))
    angle = 2 * np.pi * np.arange(T)[None, :, None] / periods[:, None, :] + start[:, None, :]  # (B, T, 3)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).reshape(batch, T, 6).astype(np.float32)


x = moons(1, np.random.default_rng(0))
print("first steps of one sequence (moon 1 cos, sin | moon 2 | moon 3):")
print(x[0, :4].round(2))

# %% [markdown]
# One sequence, drawn. On the left each moon on its own orbit (radius 1, 2, 3 for the picture; in the
# data all three are on the unit circle), a dot per step, a square at step 0: each moon visits
# the same few points again and again. On the right the first coordinate of each moon against time:
# three clean rhythms, and the 6 numbers together never repeat within the sequence.

# %%
def moon_period(x, m):
    """The smallest lag after which moon m of the sequence x (T, 6) is back where it was."""
    coords = x[:, 2 * m:2 * m + 2]
    return next(lag for lag in range(1, T) if np.abs(coords[lag:] - coords[:-lag]).max() < 1e-4)


periods = [moon_period(x[0], m) for m in range(3)]
print("periods of the three moons:", periods)
expect("each moon comes back after a period from PERIODS", set(periods) <= set(PERIODS.astype(int))
       and len(set(periods)) == 3, f"periods {periods}")
closest = min(np.abs(x[0, lag:] - x[0, :-lag]).max(axis=1).min() for lag in range(1, T))
expect("all 6 coordinates never come back within T", closest > 0.1,
       f"closest return of all 6 coordinates: {closest:.3f}")

fig, axes = figure(ncols=2, size=(4.6, 4.0))
ax = axes[0, 0]
colors = ["tab:blue", "tab:orange", "tab:green"]
circle = np.linspace(0, 2 * np.pi, 200)
ax.plot(0, 0, "o", color="black", ms=10)
for m in range(3):
    radius, cos_sin = m + 1, x[0, :, 2 * m:2 * m + 2]
    ax.plot(radius * np.cos(circle), radius * np.sin(circle), color="lightgray", lw=1)
    ax.plot(*(radius * cos_sin.T), "o", color=colors[m], ms=5, label=f"moon {m + 1} (period {periods[m]})")
    ax.plot(*(radius * cos_sin[0]), "s", color=colors[m], ms=9, mec="black")
ax.set(title="one sequence: the moons' positions", aspect="equal", xlim=(-3.4, 3.4), ylim=(-3.4, 3.4),
       xticks=[], yticks=[])
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2)
ax = axes[0, 1]
for m in range(3):
    ax.plot(np.arange(T), x[0, :, 2 * m] + 2.5 * (2 - m), ".-", color=colors[m], ms=3, lw=0.8)
ax.set(title="cos(angle) of each moon, shifted apart", xlabel="step t", yticks=[5, 2.5, 0],
       yticklabels=["moon 1", "moon 2", "moon 3"])
show(fig, "orbits")

# %% [markdown]
# ## The model: one context memory, nothing else
#
# `memories.ContextMemory(6, H)` from lesson 8, fed the observations directly, predicts the next one:
# its output at $t$ is compared with $x_{t+1}$ (mean squared error). Position 0 has an empty memory, so
# we score from position 1. Both variants have the same weight matrices ($W_k, W_v, W_o$, each $6 \times
# 6$); only the split into heads differs. Training uses AdamW with warmup and cosine (lesson 10). We
# keep a copy of the key projection $W_k$ every 10 steps, to watch it change later.

# %%
def train(n_head, steps, lr=0.03, batch=32, seed=0):
    nn.manual_seed(seed)
    memory = memories.ContextMemory(6, n_head)
    optimizer = optim.AdamW(optim.weight_decay_groups(memory.named_parameters(), 0.0), lr=lr)
    schedule = optim.CosineSchedule(lr, lr / 10, warmup_steps=20, total_steps=steps)
    rng = np.random.default_rng(1)
    W_k_history = {}                                                # step -> a copy of W_k
    for step in range(steps):
        if step % 10 == 0:
            W_k_history[step] = memory.key.W_k.weight.data.copy()
        x = moons(batch, rng)
        prediction = memory(mm.Tensor(x[:, :-1]))                   # (B, T-1, 6): a guess of x[:, 1:]
        loss = ((prediction[:, 1:] - x[:, 2:]) ** 2).mean()
        loss.backward()
        optimizer.step(lr=schedule(step))
        optimizer.zero_grad()
    W_k_history[steps] = memory.key.W_k.weight.data.copy()
    return memory, loss.item(), W_k_history


def error_by_position(memory, x):
    """Squared error of the predicted next position, summed over the 6 coordinates: (T-1,)."""
    with mm.no_grad():
        return ((memory(mm.Tensor(x[:, :-1])).numpy() - x[:, 1:]) ** 2).sum(axis=-1).mean(axis=0)


steps = 400 if QUICK else 800
start = time.perf_counter()
one_head, loss_1, _ = train(n_head=1, steps=steps)
three_heads, loss_3, history = train(n_head=3, steps=steps)
print(f"trained both in {time.perf_counter() - start:.1f} s; final training loss: "
      f"1 head {loss_1:.4f}, 3 heads {loss_3:.4f}")

# %% [markdown]
# ## Prediction error against context length
#
# On fresh sequences: the error at position $t$ (how much of the sequence the memory has seen). For
# scale, the error of always predicting "no motion" ($\hat x_{t+1} = x_t$) is printed too.

# %%
x_test = moons(256, np.random.default_rng(99))
err_1, err_3 = error_by_position(one_head, x_test), error_by_position(three_heads, x_test)
no_motion = ((x_test[:, 1:] - x_test[:, :-1]) ** 2).sum(axis=-1).mean()
print(f"'no motion' baseline: {no_motion:.3f}")
print("positions   1 head   3 heads")
for lo, hi in [(1, 5), (5, 9), (9, 14), (14, 24), (24, 36), (36, T - 1)]:
    print(f"{lo:3d}..{hi - 1:3d} {err_1[lo:hi].mean():8.3f} {err_3[lo:hi].mean():9.3f}")
late_1, late_3 = err_1[14:].mean(), err_3[14:].mean()
expect("after the longest period, 3 heads beat 1 head by 2x", late_3 < 0.5 * late_1,
       f"{late_3:.3f} vs {late_1:.3f}")

# %% [markdown]
# The same errors, position by position, on a log scale. Look at where the two curves cross: the
# shaded band holds the moons' periods (5 to 13 steps), and it is while the context grows through it
# that the three heads' error falls by a factor of ten or more, as one moon after another has been
# seen once around. The single head's curve never comes down.

# %%
early_3 = err_3[1:5].mean()
expect("3 heads: the error falls 10x once periods are seen", late_3 < 0.1 * early_3,
       f"positions 1..4: {early_3:.3f}, positions 14..{T - 2}: {late_3:.3f}")
expect("... the 1 head's does not", late_1 > 0.5 * err_1[1:5].mean(),
       f"positions 1..4: {err_1[1:5].mean():.3f}, positions 14..{T - 2}: {late_1:.3f}")

fig, axes = figure(size=(6.0, 3.8))
ax = axes[0, 0]
positions = np.arange(1, T - 1)
ax.axvspan(PERIODS.min(), PERIODS.max(), color="gray", alpha=0.15, label="the moons' periods")
ax.semilogy(positions, err_1[1:], ".-", color="tab:red", ms=3, label="1 head of dimension 6")
ax.semilogy(positions, err_3[1:], ".-", color="tab:blue", ms=3, label="3 heads of dimension 2")
ax.axhline(no_motion, color="gray", ls="--", lw=0.8, label="'no motion' baseline")
ax.set(title="prediction error against context length", xlabel="position t (steps seen: t + 1)",
       ylabel="squared error of the next position")
ax.legend(fontsize=8)
show(fig, "error_by_context")

# %% [markdown]
# Before any moon has completed a turn (positions below 5) there is nothing to recall. The three-head
# memory, built to recall exact matches, does badly there; the single head has learned a blurrier,
# more hedged answer that is better at first. Once the context covers the moons' periods, the three
# heads find exact matches and their error collapses, while the single head never sees all three
# moons back in place at once and gets no better (a little worse, as more half-matching moments pile
# up in its memory).
#
# ## Did the heads split the moons?
#
# Look at the key projection $W_k$ (input rows, output columns) in $2 \times 2$ blocks: block (moon $m$,
# head $h$) measures how much head $h$'s key reads moon $m$. If each head follows one moon, each column
# of the table has one large entry.

# %%
def moon_head_table(W_k, n_head):
    hs = 6 // n_head
    W = np.abs(W_k)                                                # (6 inputs, 6 outputs)
    return W.reshape(3, 2, n_head, hs).sum(axis=(1, 3))            # (moons, heads)


table = moon_head_table(three_heads.key.W_k.weight.data, 3)
print("|W_k| by (moon, head):\n", table.round(2))
share = table.max(axis=0) / table.sum(axis=0)  # per head: the weight on its main moon
print("share of each head's key weight on its main moon:", share.round(3))
print("each head's main moon:", table.argmax(axis=0) + 1)
expect("each head reads mostly one moon", share.min() > 0.8, f"min share {share.min():.3f}")
expect("... and the three heads read three different moons", len(set(table.argmax(axis=0))) == 3,
       f"main moons {(table.argmax(axis=0) + 1).tolist()}")

# %% [markdown]
# How the split came about. Each small table is the moon-by-head table at one moment of training,
# every column divided by its sum (the share of a head's key weight on each moon), heads reordered by
# the moon they end up following. At the start every head reads a mix of all three moons; over the
# first couple of hundred steps each column empties but for one entry, and the table becomes a
# permutation matrix: one moon per head, one head per moon. On the right, each head's share on its
# final moon, step by step.

# %%
shares = {step: moon_head_table(W, 3) / moon_head_table(W, 3).sum(axis=0) for step, W in history.items()}
order = np.argsort(table.argmax(axis=0))                          # head following moon 1, 2, 3
final = shares[steps][:, order]
check("final shares (moon x head): a permutation matrix", final, np.eye(3), atol=0.2)
start_share = shares[0].max(axis=0)
expect("... which they were not at the start", start_share.max() < 0.6,
       f"largest share at step 0: {start_share.max():.3f}")

snapshots = [0, 50, 100, 150, steps]
fig, axes = figure(ncols=len(snapshots) + 1, size=(2.5, 2.8))
for ax, step in zip(axes[0], snapshots):
    image = ax.imshow(shares[step][:, order], cmap="Blues", vmin=0, vmax=1)
    for m in range(3):
        for h in range(3):
            value = shares[step][m, order[h]]
            ax.text(h, m, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.6 else "black")
    ax.set(title=f"step {step}", xticks=range(3), xticklabels=[f"h{order[h]}" for h in range(3)],
           yticks=range(3), yticklabels=["moon 1", "moon 2", "moon 3"], xlabel="head")
ax = axes[0, -1]
recorded = sorted(shares)
for m in range(3):  # head order[m] follows moon m
    ax.plot(recorded, [shares[s][m, order[m]] for s in recorded], label=f"h{order[m]} on moon {m + 1}")
ax.set(title="share on its final moon", xlabel="step", ylim=(0, 1.02))
ax.legend(fontsize=8)
show(fig, "heads_split")

# %% [markdown]
# The single head has no such choice: its one key must read all six coordinates.

# %%
print("1 head, |W_k| by moon:", moon_head_table(one_head.key.W_k.weight.data, 1)[:, 0].round(2))

# %% [markdown]
# ## Exercises
#
# 1. Train with 2 heads of dimension 3 (use 6 = 2 x 3). Which moons share a head, and how does its error
#    compare?
# 2. Look at the learned forgetting rates (`three_heads.key.decay()`) and key scales
#    (`three_heads.key.scale()`). Why can the leaky average stay on for a rotating moon without harm?
#    (Hint: the leaky average of $e^{i\omega t}$ is $e^{i\omega t}$ times a constant.)
# 3. Use periods {4, 6, 8, 12} instead, whose joint periods are short (e.g. 24). Does the one-head
#    memory catch up at the end of the sequence?
# 4. Replace the moons by three independent *random walks*. Is there anything to disentangle? What do
#    the heads learn?
