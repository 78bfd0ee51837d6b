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
# # Lesson 4: softmax, cross-entropy and a linear classifier
#
# A language model is a classifier: given the text so far, it scores every possible next token and
# turns the scores into probabilities with a **softmax**; it is trained by **cross-entropy**, the
# negative log-probability it gave to the token that actually came next. Softmax will come back in a
# second role in lesson 6, as the weights of an associative memory. Here we build both carefully and
# train the simplest classifier there is, on points in the plane.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import nn, ops, optim
from _check import QUICK, check, expect

# %% [markdown]
# ## Softmax
#
# Scores ("logits") $z \in \mathbb{R}^V$ become probabilities
#
# $$p_i = \operatorname{softmax}(z)_i = \frac{e^{z_i}}{\sum_j e^{z_j}}.$$
#
# Adding a constant to every $z_i$ changes nothing (it cancels), so we subtract $m = \max_j z_j$ first:
# then every exponent is $\le 0$ and nothing overflows. The naive formula fails on large logits:

# %%
z = np.array([[1.0, 2.0, 3.0], [1000.0, 1001.0, 1002.0]])
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
print("naive softmax:\n", naive)
stable = ops.softmax(mm.Tensor(z)).numpy()
print("ops.softmax:\n", stable)
check("softmax row 1 vs naive", stable[0], naive[0])
check("softmax is shift invariant (row 2 = row 1)", stable[1], stable[0])

# %% [markdown]
# ## Cross-entropy and its gradient
#
# For one example with logits $z$ and correct class $y$, the loss is
#
# $$\ell = -\log p_y = \log \sum_j e^{z_j} - z_y,$$
#
# the "surprise" at the right answer. A model that guesses uniformly among $V$ classes pays
# $\log V$. Differentiating (the derivative of $\log\sum_j e^{z_j}$ is the softmax):
#
# $$\frac{\partial \ell}{\partial z_i} = p_i - [i = y].$$
#
# Push the right logit up, every other logit down in proportion to its probability. Averaged over a batch
# of $N$, divide by $N$. `ops.cross_entropy(logits, targets)` computes the mean in one fused op (rows
# with target `-1` are skipped, which we will use for padding later).

# %%
rng = np.random.default_rng(0)
N, V = 6, 4
logits_np = rng.standard_normal((N, V))
targets = rng.integers(0, V, N)

logits = mm.Tensor(logits_np.copy(), requires_grad=True)
loss = ops.cross_entropy(logits, targets)
loss.backward()

p = np.exp(logits_np - logits_np.max(1, keepdims=True))
p /= p.sum(1, keepdims=True)
check("cross_entropy vs mean(-log p_y)", loss, -np.log(p[np.arange(N), targets]).mean())
onehot = np.eye(V)[targets]
check("d loss / d logits = (p - onehot) / N", logits.grad, (p - onehot) / N)
expect("gradcheck cross_entropy",
       mm.gradcheck(lambda z: ops.cross_entropy(z, targets), [mm.Tensor(logits_np.copy(), requires_grad=True)]))

masked = targets.copy()
masked[:2] = -1  # ignore the first two rows
check("ignore_index=-1 skips rows", ops.cross_entropy(mm.Tensor(logits_np), masked),
      -np.log(p[np.arange(2, N), targets[2:]]).mean())
check("uniform guess costs log V", ops.cross_entropy(mm.Tensor(np.zeros((N, V))), targets), np.log(V))

# %% [markdown]
# ## A 2-D dataset
#
# Three clouds of points, one per class, around three centres.

# %%
n_per_class = 60 if QUICK else 200
centres = np.array([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])
data_rng = np.random.default_rng(42)
X = np.concatenate([c + 0.9 * data_rng.standard_normal((n_per_class, 2)) for c in centres])
y = np.repeat(np.arange(3), n_per_class)
order = data_rng.permutation(len(y))
X, y = X[order].astype(np.float32), y[order]
n_train = int(0.8 * len(y))
X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
print("train", X_train.shape, "validation", X_val.shape)

# %% [markdown]
# ## A linear classifier
#
# One linear layer maps a point $x \in \mathbb{R}^2$ to three logits: $z = x W + b$, with $W$ of shape
# (2, 3). `nn.Linear` is exactly that: a `Module` holding `Parameter`s (Tensors that require grad),
# initialised from `nn.init_rng`, which `nn.manual_seed` seeds so runs repeat exactly.

# %%
nn.manual_seed(0)
model = nn.Linear(2, 3, bias=True)
for name, param in model.named_parameters():
    print(f"{name:8s} {param.shape} {param.dtype}")


def accuracy(model, X, y):
    with mm.no_grad():
        return float((model(mm.Tensor(X)).numpy().argmax(axis=1) == y).mean())


first_loss = ops.cross_entropy(model(mm.Tensor(X_train)), y_train).item()
expect("initial loss is near log 3", abs(first_loss - np.log(3)) < 0.8, f"{first_loss:.3f} vs {np.log(3):.3f}")

# %% [markdown]
# ## Gradient descent, by hand and with `optim.SGD`
#
# One training step: forward, loss, `backward()`, then move each parameter against its gradient,
# $\theta \leftarrow \theta - \eta\, \nabla_\theta \ell$, and clear the gradients. `optim.SGD` does the
# same update (plus optional momentum and weight decay). We check that one hand-written step and one
# `SGD` step land on the same parameters.

# %%
lr = 0.5
twin = nn.Linear(2, 3, bias=True)
twin.load_state_dict(model.state_dict())  # state_dict(): {name: array}; load_state_dict copies them in

ops.cross_entropy(model(mm.Tensor(X_train)), y_train).backward()
with mm.no_grad():
    for param in model.parameters():
        param.data -= lr * param.grad
model.zero_grad()

sgd = optim.SGD(twin.parameters(), lr=lr)
ops.cross_entropy(twin(mm.Tensor(X_train)), y_train).backward()
sgd.step()
sgd.zero_grad()
check("hand-written step == optim.SGD step (W)", model.weight, twin.weight)
check("hand-written step == optim.SGD step (b)", model.bias, twin.bias)

# %% [markdown]
# Now train with `SGD` on the whole training set at every step (full-batch gradient descent).

# %%
optimizer = optim.SGD(model.parameters(), lr=lr)
steps = 100 if QUICK else 300
for step in range(steps):
    loss = ops.cross_entropy(model(mm.Tensor(X_train)), y_train)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % (steps // 5) == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.4f}  train acc {accuracy(model, X_train, y_train):.3f}")

val_acc = accuracy(model, X_val, y_val)
expect("loss dropped well below log 3", loss.item() < 0.5 * np.log(3), f"{first_loss:.3f} -> {loss.item():.3f}")
expect("validation accuracy > 85%", val_acc > 0.85, f"{val_acc:.3f}")

# %% [markdown]
# ## What the classifier learned
#
# The predicted class over a grid of the plane (0, 1, 2), with the class centres marked `*`. Each
# boundary between two regions is where two logits are equal, $x (W_{:,i} - W_{:,j}) + b_i - b_j = 0$:
# a straight line. That is all a linear classifier can draw.

# %%
xs = np.linspace(-4.5, 4.5, 48)
ys = np.linspace(4.5, -3.5, 16)
grid = np.array([[gx, gy] for gy in ys for gx in xs], np.float32)
with mm.no_grad():
    labels = model(mm.Tensor(grid)).numpy().argmax(axis=1).reshape(len(ys), len(xs))
canvas = [["012"[c] for c in row] for row in labels]
for cx, cy in centres:
    canvas[int(np.abs(ys - cy).argmin())][int(np.abs(xs - cx).argmin())] = "*"
print("\n".join("".join(row) for row in canvas))

# %% [markdown]
# ## Exercises
#
# 1. Replace the data by two concentric rings (class 0 inside, class 1 outside). Show the linear
#    classifier stays near 50% accuracy, then add a hidden layer (`nn.Linear(2, 16)`, `.tanh()`,
#    `nn.Linear(16, 2)`) and reach > 95%.
# 2. Multiply all logits by a temperature factor $1/\tau$. What happens to the softmax as
#    $\tau \to 0$ and $\tau \to \infty$? (Memory Mosaics learn this factor; lesson 6 calls it $\beta$.)
# 3. Train with mini-batches of 16 points drawn at random each step instead of the full set. How does
#    the loss curve change? Why does the final accuracy barely change?
# 4. Derive the gradient of the *sum* (not mean) cross-entropy and explain why the learning rate then
#    has to depend on the batch size.
