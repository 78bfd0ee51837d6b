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
# # Lesson 9: persistent memory, and why it is like an MLP
#
# The context memory (lesson 8) only knows the sequence it is reading: it starts empty every time.
# Knowledge that holds across all texts, how words are spelled, which word usually follows "of the",
# must live in the parameters. The **persistent memory** is an associative memory whose (key, value)
# pairs *are* parameters, $P_k$ and $P_v$, learned by gradient descent over the whole training set:
#
# $$y_t = W_o\Big[\sigma'_h \sum_{j=1}^{N} \operatorname{softmax}_j(k_t\cdot P_k[j])\; P_v[j]\Big]_{h = 1..H},
#   \qquad k_t = s_h^2\, \frac{\bar k_t}{\lVert\bar k_t\rVert},$$
#
# with the leaky-average key $\bar k_t$ of lesson 7 and $N$ = `pmem_size` slots per head. The stored keys
# carry no scale of their own, so the query gets the square of its scale ($s_h^2$): the product still
# has bandwidth $s_h^2$ as in the context memory. A Memory Mosaic block is a context memory followed by
# a persistent memory, exactly where a transformer block has attention followed by an MLP, and this
# lesson shows the persistent memory is the MLP's counterpart in form and in size.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import memories, nn, optim
from minimosaic.models import MLP, CausalSelfAttention
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("slot_weights")
rng = np.random.default_rng(0)

# %% [markdown]
# ## The layer by hand

# %%
B, T, C, H, N = 2, 6, 16, 4, 24
hs = C // H
nn.manual_seed(0)
layer = memories.PersistentMemory(C, H, pmem_size=N).to(dtype=np.float64)
for name, param in layer.named_parameters():
    print(f"{name:18s} {param.shape}")


def persistent_memory_by_hand(x):
    EXP_SCALING = memories.EXP_SCALING
    decay = np.exp(-np.abs(EXP_SCALING * layer.key.leak_rate.data))
    s2 = np.exp(np.minimum(2 * EXP_SCALING * layer.key.log_scale.data, memories.LOG_SCALE_MAX))  # s_h^2
    sigma = np.exp(EXP_SCALING * layer.log_scale.data)
    P_k, P_v = layer.P_k.data[0], layer.P_v.data[0]                       # one bank: (H, N, hs)
    heads = []
    for h in range(H):
        cols = slice(h * hs, (h + 1) * hs)
        raw = x @ layer.key.W_k.weight.data[:, cols]                      # (B, T, hs)
        kbar = np.zeros_like(raw)
        for t in range(T):
            kbar[:, t] = raw[:, t] + (decay[h] * kbar[:, t - 1] if t else 0)
        k = s2[h] * kbar / (np.linalg.norm(kbar, axis=-1, keepdims=True) + 1e-10)
        scores = k @ P_k[h].T                                             # (B, T, N): one per slot
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        heads.append(sigma[h] * w @ P_v[h])                               # (B, T, hs)
    return np.concatenate(heads, axis=-1) @ layer.W_o.weight.data


x_np = rng.standard_normal((B, T, C))
check("PersistentMemory == by hand", layer(mm.Tensor(x_np)), persistent_memory_by_hand(x_np), atol=1e-10)

x = mm.Tensor(rng.standard_normal((1, 4, C)), requires_grad=True)
expect("gradcheck PersistentMemory: input and all parameters",
       mm.gradcheck(lambda x, *p: layer(x), [x, *layer.parameters()], mode="random", directions=8))

# %% [markdown]
# Unlike the context memory, a persistent memory has no mask: its slots are not positions of the text,
# so position $t$ may use all of them. It also does not mix positions except through the leaky key.
#
# ## Side by side with a transformer's MLP
#
# A GPT block's MLP is $\text{MLP}(x) = \operatorname{gelu}(x W_{in})\, W_{out}$ with $W_{in}$ of shape
# $(d, 4d)$. Read the columns of $W_{in}$ as $4d$ stored keys and the rows of $W_{out}$ as $4d$ stored
# values:
#
# $$\text{MLP}(x) = \sum_{j=1}^{4d} \operatorname{gelu}(x\cdot W_{in}[:, j])\; W_{out}[j], \qquad
#   \text{PM}(k) = \sum_{j=1}^{N} \operatorname{softmax}_j(k\cdot P_k[j])\; P_v[j].$$
#
# Both compare the input with every stored key and return a weighted sum of stored values. The MLP
# weighs each slot on its own (gelu), the persistent memory normalises the weights over slots (softmax):
# it is kernel smoothing over learned slots, with a bandwidth, so it reads like the rest of the model.
#
# ### Same size, by design
#
# Count the weight matrices of one block, with $d$ = n_embd:
#
# | GPT block | | Mosaic block | |
# |---|---|---|---|
# | attention $W_q, W_k, W_v, W_o$ | $4d^2$ | context memory $W_k, W_v, W_o$ | $3d^2$ |
# | MLP $W_{in}, W_{out}$ | $8d^2$ | persistent memory $W_k, W_o$ + $P_k, P_v$ | $2d^2 + 2Nd$ |
#
# With $N = 3.5d$ slots per head ($2Nd = 7d^2$) both blocks hold $12d^2$ weights; that is the default
# `pmem_size` of the models (lesson 11). The mosaic adds a handful of per-head scalars.

# %%
d, H = 128, 4
nn.manual_seed(0)
counts = {
    "GPT attention": CausalSelfAttention(d, H, n_layer=1).num_parameters(),
    "GPT MLP": MLP(d, n_layer=1).num_parameters(),
    "context memory": memories.ContextMemory(d, H).num_parameters(),
    "persistent memory": memories.PersistentMemory(d, H, pmem_size=int(3.5 * d)).num_parameters(),
}
for name, count in counts.items():
    print(f"{name:18s} {count:7d} = {count / d**2:5.2f} d^2")
gpt, mosaic = counts["GPT attention"] + counts["GPT MLP"], counts["context memory"] + counts["persistent memory"]
print(f"GPT block {gpt}, mosaic block {mosaic}: the mosaic has {mosaic - gpt} more (7 scalars per head)")
check("GPT block: 12 d^2", gpt, 12 * d**2, atol=0)
check("mosaic block: 12 d^2 + 7 H", mosaic, 12 * d**2 + 7 * H, atol=0)

# %% [markdown]
# ## Storing facts
#
# What is a persistent memory good for? Storing associations that no linear map can hold. We give it
# 128 "facts": random unit inputs $x_i \in \mathbb{R}^{32}$, each with a random unit target $y_i$, and
# train three layers of comparable purpose to map $x_i \mapsto y_i$ (mean squared error):
#
# * a linear map $x W$ ($32^2$ weights: a rank-32 map cannot fit 128 random pairs),
# * a persistent memory with $3.5 \cdot 32 = 112$ slots per head,
# * a GPT MLP with $4 \cdot 32 = 128$ hidden units.
#
# Recall is the fraction of inputs whose output is closer (in angle) to their own target than to any
# other. We train with SGD with momentum (lesson 4's `optim.SGD`, `momentum=0.9`). The per-head scalars
# are left out of the optimiser here: they are stored divided by 10 for Adam (lesson 8), and under
# plain SGD they would move 100 times too fast. Lesson 10 introduces Adam.

# %%
d, N_facts = 32, 128


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


X = unit(rng.standard_normal((N_facts, 1, d))).astype(np.float32)  # (N, T=1, d): one-token sequences
Y = unit(rng.standard_normal((N_facts, d))).astype(np.float32)


def fit(body, params, steps=150 if QUICK else 300, lr=1.0):
    sgd = optim.SGD(params, lr=lr, momentum=0.9)
    for _ in range(steps):
        out = body(mm.Tensor(X)).reshape(N_facts, d)
        loss = ((out - Y) ** 2).sum(axis=-1).mean()
        loss.backward()
        sgd.step()
        sgd.zero_grad()
    recall = float(((out.numpy() @ Y.T).argmax(axis=1) == np.arange(N_facts)).mean())
    return loss.item(), recall


nn.manual_seed(0)
linear = nn.Linear(d, d)
pm = memories.PersistentMemory(d, 4, pmem_size=int(3.5 * d))
mlp = MLP(d, n_layer=1)
results = {
    "linear": fit(linear, linear.parameters()),
    "persistent memory": fit(pm, [p for name, p in pm.named_parameters()
                                  if "scale" not in name and "leak" not in name]),
    "MLP": fit(mlp, mlp.parameters()),
}
for name, (loss, recall) in results.items():
    print(f"{name:18s} loss {loss:.4f}  recall {recall:.3f}")
expect("the linear map cannot store 128 random facts", results["linear"][1] < 0.8,
       f"recall {results['linear'][1]:.3f}")
expect("the persistent memory stores them", results["persistent memory"][1] > 0.95,
       f"recall {results['persistent memory'][1]:.3f}")
expect("... and so does the MLP", results["MLP"][1] > 0.95, f"recall {results['MLP'][1]:.3f}")

# %% [markdown]
# ## What do the slots respond to?
#
# `pm.kernel_weights(x)` returns the softmax weights $(B, H, T, N)$: how much each slot answers each
# input. Below, head 0's weights for the 128 facts, one row per fact. Rows are sorted by the slot that
# answers them most, and slots by the first fact they answer most, so a fact's strongest slot lies on
# the staircase (colours on a square-root scale, so that weak weights show too). Look at two things:
# each row is dark but for a handful of bright slots (a fact is answered by a few slots, not by all
# 112), and the staircase crosses dozens of columns (the facts are spread over many slots; no slot
# answers them all). On the right, a fact's weights sorted from the largest down, averaged over facts
# and heads: a few slots carry most of the weight, far above the uniform $1/N$.

# %%
from matplotlib.colors import PowerNorm

slot_weights = pm.kernel_weights(mm.Tensor(X))[:, :, 0]              # (facts, heads, slots)
check("each fact's weights over the slots sum to 1", slot_weights.sum(axis=-1), np.ones((N_facts, 4)),
      atol=1e-5)
head0 = slot_weights[:, 0]
top_slot = head0.argmax(axis=1)
sorted_weights = np.sort(slot_weights, axis=-1)[..., ::-1].mean(axis=(0, 1))  # mean k-th largest weight
n_slots = head0.shape[1]
expect("a few slots answer each fact: top 3 carry > 40%", sorted_weights[:3].sum() > 0.4,
       f"{sorted_weights[:3].sum():.3f} (uniform weights would give {3 / n_slots:.3f})")
expect("the facts are spread over many slots (head 0)", len(set(top_slot)) >= 30,
       f"{len(set(top_slot))} of {n_slots} slots are some fact's strongest")

rows = np.argsort(top_slot, kind="stable")
first_use = {}
for slot in top_slot[rows]:
    first_use.setdefault(slot, len(first_use))
cols = sorted(range(n_slots), key=lambda j: first_use.get(j, n_slots))   # unused slots go last
fig, axes = figure(ncols=2, size=(5.2, 4.0))
image = axes[0, 0].imshow(head0[rows][:, cols], cmap="magma", norm=PowerNorm(0.5), aspect="auto",
                          interpolation="nearest")
fig.colorbar(image, ax=axes[0, 0], label="softmax weight")
axes[0, 0].set(title="head 0: weight of each slot for each fact", xlabel="slot (sorted)",
               ylabel="fact (sorted by its strongest slot)")
k = np.arange(1, 21)
axes[0, 1].bar(k, sorted_weights[:20], color="tab:purple")
axes[0, 1].axhline(1 / n_slots, color="gray", ls="--", label=f"uniform 1/N = {1 / n_slots:.3f}")
axes[0, 1].set(title="a fact's weights, largest first", xlabel="k-th strongest slot",
               ylabel="mean weight (facts, heads)", xticks=[1, 5, 10, 15, 20])
axes[0, 1].legend()
show(fig, "slot_weights")

# %% [markdown]
# ## Exercises
#
# 1. Shrink `pmem_size` to 8, 16, 32 slots per head. How many facts can the persistent memory still
#    store? Compare with the number of slots times heads.
# 2. `PersistentMemory(..., pmem_count=2)` averages two banks of slots. Count its parameters and compare
#    its recall at equal size with one bank of twice the slots.
# 3. Replace the softmax in `persistent_memory_by_hand` by a gelu of the scores (no normalisation) and
#    show that what is left is a GPT MLP (`P_k` as $W_{in}$, `P_v` as $W_{out}$) between the extra
#    projections $W_k$ and $W_o$, fed with normalised keys.
# 4. After lesson 10, train all parameters of the persistent memory with AdamW and watch the key scale
#    $s_h$ (the bandwidth) move.
