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
from _check import QUICK, expect

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
# ## The model: one context memory, nothing else
#
# `memories.ContextMemory(6, H)` from lesson 8, fed the observations directly, predicts the next one:
# its output at $t$ is compared with $x_{t+1}$ (mean squared error). Position 0 has an empty memory, so
# we score from position 1. Both variants have the same weight matrices ($W_k, W_v, W_o$, each $6 \times
# 6$); only the split into heads differs. Training uses AdamW with warmup and cosine (lesson 10).

# %%
def train(n_head, steps, lr=0.03, batch=32, seed=0):
    nn.manual_seed(seed)
    memory = memories.ContextMemory(6, n_head)
    optimizer = optim.AdamW(optim.weight_decay_groups(memory.named_parameters(), 0.0), lr=lr)
    schedule = optim.CosineSchedule(lr, lr / 10, warmup_steps=20, total_steps=steps)
    rng = np.random.default_rng(1)
    for step in range(steps):
        x = moons(batch, rng)
        prediction = memory(mm.Tensor(x[:, :-1]))                   # (B, T-1, 6): a guess of x[:, 1:]
        loss = ((prediction[:, 1:] - x[:, 2:]) ** 2).mean()
        loss.backward()
        optimizer.step(lr=schedule(step))
        optimizer.zero_grad()
    return memory, loss.item()


def error_by_position(memory, x):
    """Squared error of the predicted next position, summed over the 6 coordinates: (T-1,)."""
    with mm.no_grad():
        return ((memory(mm.Tensor(x[:, :-1])).numpy() - x[:, 1:]) ** 2).sum(axis=-1).mean(axis=0)


steps = 400 if QUICK else 800
start = time.perf_counter()
one_head, loss_1 = train(n_head=1, steps=steps)
three_heads, loss_3 = train(n_head=3, steps=steps)
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
def moon_head_table(memory, n_head):
    hs = 6 // n_head
    W = np.abs(memory.key.W_k.weight.data)                         # (6 inputs, 6 outputs)
    return W.reshape(3, 2, n_head, hs).sum(axis=(1, 3))            # (moons, heads)


table = moon_head_table(three_heads, 3)
print("|W_k| by (moon, head):\n", table.round(2))
share = table.max(axis=0) / table.sum(axis=0)  # per head: the weight on its main moon
print("share of each head's key weight on its main moon:", share.round(3))
print("each head's main moon:", table.argmax(axis=0) + 1)
expect("each head reads mostly one moon", share.min() > 0.8, f"min share {share.min():.3f}")
expect("... and the three heads read three different moons", len(set(table.argmax(axis=0))) == 3,
       f"main moons {(table.argmax(axis=0) + 1).tolist()}")

# %% [markdown]
# The single head has no such choice: its one key must read all six coordinates.

# %%
print("1 head, |W_k| by moon:", moon_head_table(one_head, 1)[:, 0].round(2))

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
