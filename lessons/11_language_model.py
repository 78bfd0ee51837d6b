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
# # Lesson 11: a Memory Mosaic language model, end to end
#
# Everything comes together: text becomes integer ids (a tokenizer), ids become vectors (an
# embedding), blocks of context memory (lesson 8) and persistent memory (lesson 9) transform them, and a
# softmax over the vocabulary (lesson 4) predicts the next character. We train it with AdamW, warmup +
# cosine and gradient clipping (lesson 10), watch the loss drop, then let it write.
#
# The model is tiny and trains for a few hundred steps on the CPU, so do not expect prose; expect it to
# learn spelling, frequent words and, thanks to its context memory, names it has seen earlier in the
# same text. The command line does the same at scale (`minimosaic train`, see the exercises).

# %%
import math
import time

import numpy as np

import minimosaic as mm
from minimosaic import data, nn, optim
from minimosaic.models import ModelConfig, build_model
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("loss_curves", "loss_by_position", "retrieval")

# %% [markdown]
# ## Text, characters, ids
#
# minimosaic ships a generated corpus of short stories (`data.generate_stories`, no download): names,
# objects and places introduced early in a story come back later, so remembering the context pays off.
# A character-level tokenizer maps each distinct character to an id.

# %%
text = data.generate_stories(n_chars=200_000 if QUICK else 400_000, seed=0)
print(text[:300])
tokenizer = data.build_tokenizer("char", text)
print("vocabulary:", tokenizer.vocab_size, "characters")
sample = "Once upon a time"
check("decode(encode(s)) == s", float(tokenizer.decode(tokenizer.encode(sample)) == sample), 1.0)

ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]  # the last 10% is held out for validation
print(f"{len(train_ids)} training and {len(val_ids)} validation characters")

# %% [markdown]
# A batch is $B$ random windows of $T + 1$ characters: the input is the first $T$, the target the last
# $T$, so at every position the target is the *next* character. `data.BatchSampler` draws them.

# %%
block_size, batch_size = 64, 12 if QUICK else 16
sampler = data.BatchSampler(train_ids, block_size, batch_size, seed=0)
x, y = sampler.next_batch()
print("x", x.shape, x.dtype, "| y", y.shape)
check("targets are the inputs shifted by one", y[:, :-1], x[:, 1:], atol=0)
print(repr(tokenizer.decode(x[0].tolist())), "->", repr(tokenizer.decode(y[0].tolist())))

# %% [markdown]
# ## The model
#
# `ModelConfig` fixes the shape and `build_model` builds it (seed `nn.init_rng` first with
# `nn.manual_seed`). The Memory Mosaic is
#
# $$x = E[\text{ids}], \qquad x \leftarrow x + \text{ContextMemory}(\text{LN}(x)), \quad
#   x \leftarrow x + \text{PersistentMemory}(\text{LN}(x)) \ \text{(per block)}, \qquad
#   \text{logits} = \text{LN}(x)\, E^\top / \sqrt{d}.$$
#
# There is no position embedding: the memories see order through the leaky keys and peek-ahead values.
# The output layer reuses the embedding matrix $E$ (weight tying).

# %%
config = ModelConfig(model="mosaic", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                     n_embd=48 if QUICK else 64, block_size=block_size)
nn.manual_seed(0)
model = build_model(config)
print(config)
print(f"{model.num_parameters():,} parameters; block 0:")
for name, param in model.named_parameters():
    if name.startswith("blocks.0."):
        print(f"   {name:38s} {param.shape}")

# %% [markdown]
# `model(ids)` returns logits $(B, T, V)$, and `model.loss(ids, targets)` the mean cross-entropy.
# The first check of any language model: at initialisation the loss is about the uniform guess
# $\ln V$. The embedding has entries of size 0.02 (as in the official code), so every logit
# $\mathrm{LN}(x) \cdot E_v$ starts near 0 and the untrained model spreads its bets almost evenly.
# (A loss far above $\ln V$ at step 0 means confident wrong guesses: an init bug to fix first.)

# %%
logits = model(x)
print("logits", logits.shape)
first_loss = model.loss(x, y).item()
print(f"initial loss {first_loss:.3f}, ln V = {math.log(tokenizer.vocab_size):.3f}")
expect("the initial loss is about ln V", abs(first_loss - math.log(tokenizer.vocab_size)) < 0.15,
       f"{first_loss:.3f} vs {math.log(tokenizer.vocab_size):.3f}")

# %% [markdown]
# ## Training
#
# The loop of lesson 10 with everything switched on: AdamW with weight decay on matrices only,
# warmup + cosine, clipping at global norm 1. One log line every so often with the loss, the learning
# rate, the gradient norm before clipping and the time per step. We keep every training loss, and the
# validation loss every 25 steps, to draw the curves.

# %%
steps = 150 if QUICK else 300
optimizer = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=3e-3, betas=(0.9, 0.99))
schedule = optim.CosineSchedule(max_lr=3e-3, min_lr=3e-4, warmup_steps=20, total_steps=steps)
val_batches = data.eval_batches(val_ids, block_size, batch_size, n=4)  # the same batches every time


def validation_loss():
    with mm.no_grad():
        return float(np.mean([model.loss(xb, yb).item() for xb, yb in val_batches]))


train_losses, val_steps, val_losses = [], [0], [validation_loss()]
start = time.perf_counter()
for step in range(steps):
    x, y = sampler.next_batch()
    loss = model.loss(x, y)
    loss.backward()
    grad_norm = optim.clip_grad_norm(model.parameters(), 1.0)
    optimizer.step(lr=schedule(step))
    optimizer.zero_grad()
    train_losses.append(loss.item())
    if (step + 1) % 25 == 0 or step == steps - 1:
        val_steps.append(step + 1)
        val_losses.append(validation_loss())
    if step % 50 == 0 or step == steps - 1:
        ms = 1e3 * (time.perf_counter() - start) / (step + 1)
        print(f"step {step:4d} | loss {loss.item():.3f} | lr {schedule(step):.2e} | "
              f"grad norm {float(grad_norm):6.2f} | {ms:5.1f} ms/step")
final_val = val_losses[-1]

# %% [markdown]
# ## Did it learn?
#
# A yardstick: a model that knows only how often each character occurs, and nothing about context,
# cannot do better than the **unigram entropy** $-\sum_c p_c \ln p_c$ of the training text. Beating it
# means the model uses the characters before.

# %%
freq = np.bincount(train_ids, minlength=tokenizer.vocab_size) / len(train_ids)
unigram = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
print(f"validation loss {final_val:.3f} nats/char ({final_val / math.log(2):.2f} bits); "
      f"unigram entropy {unigram:.3f}; uniform ln V {math.log(tokenizer.vocab_size):.3f}")
expect("the loss dropped", final_val < first_loss - 1.5, f"{first_loss:.3f} -> {final_val:.3f}")
expect("it beats the unigram entropy", final_val < unigram - 0.3, f"{final_val:.3f} < {unigram:.3f} - 0.3")

# %% [markdown]
# The curves: the training loss of every batch (noisy: each is a different 16 windows) and the
# validation loss on the same held-out batches every 25 steps. Look for three things: both fall fast
# through the unigram line once warmup is over, then more slowly as the learning rate decays; and the
# validation curve stays on the training curve. A validation curve that turns up while training keeps
# going down would be overfitting: memorising the training text instead of learning its rules.

# %%
recent_train = float(np.mean(train_losses[-25:]))
expect("the validation curve ends well below its start", val_losses[-1] < val_losses[0] - 1.5,
       f"{val_losses[0]:.3f} -> {val_losses[-1]:.3f}")
expect("... close to the training loss (no overfitting)", abs(val_losses[-1] - recent_train) < 0.3,
       f"validation {val_losses[-1]:.3f}, training (last 25 steps) {recent_train:.3f}")

fig, axes = figure(size=(6.4, 3.8))
ax = axes[0, 0]
ax.plot(np.arange(1, steps + 1), train_losses, lw=0.8, alpha=0.7, label="training (each batch)")
ax.plot(val_steps, val_losses, "o-", ms=3, label="validation")
ax.axhline(unigram, color="gray", ls="--", lw=0.8, label=f"unigram entropy {unigram:.2f}")
ax.axhline(math.log(tokenizer.vocab_size), color="gray", ls=":", lw=0.8, label="uniform guess ln V")
ax.set(title="learning curves", xlabel="step", ylabel="cross-entropy (nats/char)")
ax.legend()
show(fig, "loss_curves")

# %% [markdown]
# The loss may also depend on *where* in the window a character is: at position 0 the context memory
# is empty, later it holds more of the story. With this little training the model leans mostly on the
# last few characters, so expect small differences (exercise 2). Mean validation loss by position:

# %%
with mm.no_grad():  # ops.log_softmax(z) = z - logsumexp(z): the log of the softmax, computed stably
    per_position = []
    for xb, yb in val_batches:
        logp = mm.ops.log_softmax(model(xb), axis=-1).numpy()
        per_position.append(-np.take_along_axis(logp, yb[..., None], axis=-1)[..., 0].mean(axis=0))
per_position = np.mean(per_position, axis=0)
for lo, hi in [(0, 1), (1, 4), (4, 16), (16, 32), (32, block_size)]:
    print(f"positions {lo:2d}..{hi - 1:2d}: {per_position[lo:hi].mean():.3f}")

# %% [markdown]
# The same numbers as a curve. The first few positions see only one to four characters, so they
# are guessed from little; the loss falls over them and then flattens. The wobble after that is noise
# (only a few dozen windows per position), and a longer-trained model would keep falling a little,
# as its context memory starts recalling names from earlier in the window.

# %%
early, late = per_position[:4].mean(), per_position[16:].mean()
expect("the loss is lower late in the window than early", late < early - 0.1,
       f"positions 16..{block_size - 1}: {late:.3f}, positions 0..3: {early:.3f}")

fig, axes = figure(size=(6.0, 3.4))
ax = axes[0, 0]
ax.plot(np.arange(block_size), per_position, ".-", ms=4)
ax.axhline(final_val, color="gray", ls="--", lw=0.8, label=f"mean over positions {final_val:.2f}")
ax.set(title="validation loss by position in the window", xlabel="position t (characters seen: t + 1)",
       ylabel="cross-entropy (nats/char)")
ax.legend()
show(fig, "loss_by_position")

# %% [markdown]
# ## Writing
#
# `model.generate(prompt_ids, max_new_tokens, temperature, top_k, seed)` samples one character at a
# time and feeds it back. It keeps a **cache** (lesson 8's `state`) so each new character costs one
# position, not a pass over the whole text; greedy decoding (temperature 0) with and without the cache
# must give the same text.

# %%
prompt = np.asarray(tokenizer.encode("Once upon a time, there was a "), dtype=np.int64)
out = model.generate(prompt, 200, temperature=0.8, top_k=20, seed=0)
print(tokenizer.decode(out.tolist()))
greedy_cached = model.generate(prompt, 40, temperature=0)
greedy_plain = model.generate(prompt, 40, temperature=0, use_cache=False)
check("greedy text: cache == no cache", greedy_cached, greedy_plain, atol=0)

# %% [markdown]
# ## Looking inside
#
# `model.inspect(ids)` returns, for each block, the context memory's weights over past positions
# (B, H, T, T) and the persistent memory's weights over its slots. For the last character of a prompt,
# where did each head of block 0 look? Remember that the value stored at position $s$ peeks at the
# character *after* it (lesson 7), shown after the arrow: that is what the head retrieves.

# %%
probe = "Mira found a red ball. Mira"
probe_ids = np.asarray([tokenizer.encode(probe)], dtype=np.int64)
weights = model.inspect(probe_ids)[0]["context"][0, :, -1]  # (H, T): last position, each head
for h, row in enumerate(weights):
    top = np.argsort(row)[::-1][:3]
    looked = ", ".join(f"{probe[s]!r}@{s}->{probe[s + 1]!r} ({row[s]:.2f})" for s in top)
    print(f"head {h}: {looked}")
check("each head's weights sum to 1", weights.sum(axis=1), np.ones(config.n_head), atol=1e-5)

# %% [markdown]
# The whole picture, one heat map per head of block 0: row $t$ is where position $t$ looked, column
# $s$ the past positions (labelled with their character; the value retrieved is the character after
# it). Everything on and above the diagonal is 0: position $t$ may only use $s < t$, since the value at
# $t$ already peeks at the character it must predict. Look for heads that keep a sharp, short reach (a
# bright band just below the diagonal: the last few characters) and heads that spread their weight
# over the past, and for bright spots where the second "Mira" looks back at the first.

# %%
context = model.inspect(probe_ids)[0]["context"][0]                  # (H, T, T), block 0
T_probe = len(probe)
expect("no weight on the present or the future (s >= t)", np.triu(context).max() == 0,
       f"largest weight at s >= t: {np.triu(context).max():.2g}")
check("rows t >= 1 sum to 1 (row 0 has no past)", context[:, 1:].sum(axis=-1),
      np.ones((config.n_head, T_probe - 1)), atol=1e-5)

fig, axes = figure(ncols=2, nrows=2, size=(4.6, 4.2))
labels = [c if c != " " else "_" for c in probe]
for h, ax in enumerate(axes.flat):
    image = ax.imshow(context[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(T_probe), labels, fontsize=6)
    ax.set_yticks(range(T_probe), labels, fontsize=6)
    ax.set(title=f"block 0, head {h}", xlabel="looked at: position s", ylabel="position t")
fig.colorbar(image, ax=axes, label="weight", shrink=0.6)
show(fig, "retrieval")

# %% [markdown]
# ## Exercises
#
# 1. Train the GPT baseline on the same data: `ModelConfig(model="gpt", ...)` with the same sizes. Count
#    parameters (lesson 9) and compare validation losses after the same number of steps.
# 2. Double the steps. Which part of the loss-by-position table improves most?
# 3. Sample with temperature 0.2, 0.8 and 1.5. Explain what you see with lesson 4's softmax.
# 4. Train at scale from the command line: `minimosaic train --preset char-small --steps 2000`, then
#    `minimosaic sample` and `minimosaic explain` on the run it writes.
