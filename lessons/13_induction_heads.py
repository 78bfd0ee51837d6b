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
# # Lesson 13: induction heads in one layer
#
# "Mr and Mrs Dursley ... Mrs D" -> "ursley". Copying a continuation from earlier in the text is one of
# the most useful things a language model learns: *find where the current token occurred before, and
# predict what followed it*. In transformers this is done by **induction heads**, and it needs **two**
# attention layers: one to write "the previous token was A" into each position, a second to search
# for that. A one-layer transformer cannot do it.
#
# A Memory Mosaic's context memory does it in **one** layer, by construction (lesson 7): its key at $s$
# summarises the tokens up to $s$ (leaky average) and its value at $s$ peeks at token $s + 1$. So
# "find the past position that looks like now and return what came next" is exactly one memory lookup.
# We test this on sequences that repeat a random block.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import nn, optim
from minimosaic.models import ModelConfig, build_model
from _check import QUICK, expect, figure, promise_figures, show

promise_figures("induction_weights")

# %% [markdown]
# ## The task
#
# Each sequence is a random block of $L$ tokens (vocabulary 32), repeated until the sequence is full.
# $L$ is drawn between 8 and 24 for each sequence, so a model cannot just look a fixed distance back: it
# must *find* the previous occurrence. The first $L$ tokens are unpredictable (the best loss there is
# $\ln 32 = 3.47$); every later token is a copy.

# %%
V, T = 32, 48


def repeated_blocks(batch, rng):
    """x, y (B, T) with y = x shifted by one, and a mask of the targets that repeat an earlier token."""
    seqs, repeats = [], []
    for _ in range(batch):
        L = rng.integers(8, 25)
        seqs.append(np.resize(rng.integers(0, V, L), T + 1))    # block, block, block, ... cut to T + 1
        repeats.append(np.arange(1, T + 1) >= L)                 # target position t + 1 is a copy
    seqs = np.asarray(seqs, dtype=np.int64)
    return seqs[:, :-1], seqs[:, 1:], np.asarray(repeats)


x, y, repeat = repeated_blocks(1, np.random.default_rng(0))
print("tokens :", x[0].tolist())
print("copies :", repeat[0].astype(int).tolist())

# %% [markdown]
# ## One-layer models
#
# A Memory Mosaic and a GPT with one block each, two heads, width 32: about the same number of
# parameters. Same optimiser, schedule and data.

# %%
def train(kind, steps, lr=1e-2, seed=0):
    nn.manual_seed(seed)
    model = build_model(ModelConfig(model=kind, vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=T))
    optimizer = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.0), lr=lr, betas=(0.9, 0.99))
    schedule = optim.CosineSchedule(lr, lr / 10, warmup_steps=30, total_steps=steps)
    rng = np.random.default_rng(1)
    for step in range(steps):
        x, y, _ = repeated_blocks(32, rng)
        loss = model.loss(x, y)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        optimizer.step(lr=schedule(step))
        optimizer.zero_grad()
    return model


def evaluate(model, x, y, repeat):
    """Mean loss on the first block and on the copies, and the accuracy on the copies."""
    with mm.no_grad():
        logp = mm.ops.log_softmax(model(x), axis=-1).numpy()
    nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return nll[~repeat].mean(), nll[repeat].mean(), (logp.argmax(axis=-1) == y)[repeat].mean()


steps = 150 if QUICK else 300
mosaic = train("mosaic", steps)
gpt = train("gpt", steps)
x_test, y_test, repeat_test = repeated_blocks(256, np.random.default_rng(7))
print(f"after {steps} steps          params   loss (first block)   loss (copies)   copy accuracy")
scores = {}
for name, model in [("Memory Mosaic, 1 layer", mosaic), ("GPT, 1 layer", gpt)]:
    scores[name] = evaluate(model, x_test, y_test, repeat_test)
    first, copies, accuracy = scores[name]
    print(f"{name:24s} {model.num_parameters():8d} {first:14.3f} {copies:15.3f} {accuracy:15.3f}")
print(f"chance: loss ln V = {np.log(V):.3f}, accuracy 1/V = {1 / V:.3f}")
expect("the 1-layer mosaic copies", scores["Memory Mosaic, 1 layer"][2] > 0.8,
       f"copy accuracy {scores['Memory Mosaic, 1 layer'][2]:.3f}")
expect("the 1-layer GPT does not", scores["GPT, 1 layer"][2] < 0.5, f"copy accuracy {scores['GPT, 1 layer'][2]:.3f}")

# %% [markdown]
# The mosaic's loss on the first block is *above* $\ln V$: it has learned to trust its memory, and where
# there is nothing to copy yet its guesses are confidently wrong. Longer training teaches it to hedge
# there (exercise 1).
#
# ## Where does it look?
#
# With `inspect` (lesson 11) we read the context memory's weights. At a copy position $t$ of a sequence
# with block length $L$, the token to predict is $x_{t+1} = x_{t+1-L}$, which the value stored at
# position $s = t - L$ peeks at (and, from the third repeat on, also $s = t - 2L$, ...). So the weight
# should sit on positions $s$ with $t - s$ a multiple of $L$: the earlier occurrences of "now".

# %%
def mass_on_earlier_occurrences(model, rng, n=8):
    """Each head's weight on s = t - L, t - 2L, ... at each copy position t of n sequences: (positions, H)."""
    masses = []
    for _ in range(n):
        x, _, repeat = repeated_blocks(1, rng)
        L = int(np.argmax(repeat[0])) + 1                         # the first copied target is at t + 1 = L
        weights = model.inspect(x)[0]["context"][0]               # (H, T, T)
        for t in range(L, T):
            earlier = ((t - np.arange(T)) % L == 0) & (np.arange(T) < t)   # s = t - L, t - 2L, ...
            masses.append(weights[:, t, earlier].sum(axis=-1))    # (H,): each head's weight there
    return np.asarray(masses)


mosaic_mass = mass_on_earlier_occurrences(mosaic, np.random.default_rng(3))
on_target = mosaic_mass.max(axis=1)                               # the head that does the copying
print(f"weight of the copying head on earlier occurrences: mean {on_target.mean():.3f}, "
      f"above one half at {np.mean(on_target > 0.5):.3f} of {len(on_target)} copy positions")
expect("it finds the previous occurrences", on_target.mean() > 0.7, f"mean weight {on_target.mean():.3f}")

x, y, repeat = repeated_blocks(1, np.random.default_rng(5))
L = int(np.argmax(repeat[0])) + 1
weights = mosaic.inspect(x)[0]["context"][0]
t = L + 3
for h in range(weights.shape[0]):
    top = np.argsort(weights[h, t, :t])[::-1][:3]  # among the past positions s < t
    print(f"block length {L}, position {t}: head {h} looks at "
          + ", ".join(f"s={s} ({weights[h, t, s]:.2f})" for s in top))

# %% [markdown]
# ## The induction pattern, side by side
#
# The same measurement for the GPT's attention weights (`gpt.inspect`, same shapes; a GPT position may
# also attend to itself, which we leave out of "earlier occurrences"). Then the full weights of both
# heads of both models on the sequence above, row $t$ looking back at columns $s$; the dashed lines mark
# $s = t - L$ and $s = t - 2L$, the earlier occurrences. Look for the mosaic's copying head lying
# exactly on those lines from row $L$ on, the first copy. Above row $L$ there is nothing to copy yet,
# and it still picks one past position with full confidence: the confidently wrong guesses of the
# first block. The other mosaic head and both GPT heads spread their weight over the past, with
# nothing special on the lines: a one-layer GPT can only ask "which tokens are like me?", not "which
# tokens *came after* one like me?".

# %%
mass = {"mosaic": mosaic_mass.mean(axis=0),                      # per head, over the same copy positions
        "gpt": mass_on_earlier_occurrences(gpt, np.random.default_rng(3)).mean(axis=0)}
for name, per_head in mass.items():
    print(f"{name:6s} weight on earlier occurrences, per head: {per_head.round(3)}")
copying_head = int(mass["mosaic"].argmax())
expect("the mosaic's copying head puts most weight there", mass["mosaic"].max() > 0.7,
       f"head {copying_head}: {mass['mosaic'].max():.3f}")
expect("no GPT head does", mass["gpt"].max() < 0.3, f"best GPT head {mass['gpt'].max():.3f}")

gpt_weights = gpt.inspect(x)[0]["context"][0]
fig, axes = figure(ncols=2, nrows=2, size=(4.3, 4.3))
rows = np.arange(L, T)
panels = [("Memory Mosaic", "mosaic", weights), ("GPT", "gpt", gpt_weights)]
for r, (name, key, model_weights) in enumerate(panels):
    for h in range(2):
        ax = axes[r, h]
        image = ax.imshow(model_weights[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        for k in (1, 2):
            ax.plot(rows[rows >= k * L] - k * L, rows[rows >= k * L], "--", color="white", lw=0.6)
        ax.set_title(f"{name}, head {h}\n{mass[key][h]:.2f} of its weight on earlier occurrences", fontsize=9)
        ax.set(xlabel="looked at: position s", ylabel="position t")
fig.colorbar(image, ax=axes, label="weight", shrink=0.6)
show(fig, "induction_weights")

# %% [markdown]
# ## Exercises
#
# 1. Train the mosaic for 4x more steps. Does the loss on the first block come down towards $\ln V$?
# 2. Train a **two**-layer GPT (`n_layer=2`) for 400 and then 2000 steps. Induction heads in
#    transformers are known to appear suddenly after a while: can you see the jump in copy accuracy?
# 3. Set the mosaic's leaky averages off (a large `leak_rate`, so keys see only the current token) and
#    use blocks that contain repeated tokens. Why does copying then fail where a token occurs twice in
#    the block?
# 4. Replace the repeated block by a block repeated with one token changed. Where does the mosaic's
#    accuracy drop, and for how long?
