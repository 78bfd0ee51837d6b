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
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("loss_curve", "decision_regions")

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
train_losses, val_losses = [], []
for step in range(steps):
    with mm.no_grad():  # the validation loss at the same parameters, only watched, never trained on
        val_losses.append(ops.cross_entropy(model(mm.Tensor(X_val)), y_val).item())
    loss = ops.cross_entropy(model(mm.Tensor(X_train)), y_train)
    train_losses.append(loss.item())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % (steps // 5) == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.4f}  train acc {accuracy(model, X_train, y_train):.3f}")

val_acc = accuracy(model, X_val, y_val)
expect("loss dropped well below log 3", loss.item() < 0.5 * np.log(3), f"{first_loss:.3f} -> {loss.item():.3f}")
expect("validation accuracy > 85%", val_acc > 0.85, f"{val_acc:.3f}")

# %% [markdown]
# The loss curve: the training loss (what gradient descent minimises) and the validation loss (points
# it never trains on), against the step, with the $\log 3$ of a uniform guess for scale. The curve
# starts well below the initial loss because of the one step we took by hand above. Look at the shape:
# a steep fall while the boundaries swing into place, then a long slow tail. And look at the gap: there
# is almost none, because a linear layer with 9 parameters cannot memorise a few hundred points.

# %%
expect("the training loss falls at every step", bool(np.all(np.diff(train_losses) < 0)),
       f"{train_losses[0]:.3f} -> {train_losses[-1]:.3f} in {steps} steps")
expect("validation loss ends within 0.1 of training loss",
       abs(val_losses[-1] - train_losses[-1]) < 0.1, f"{val_losses[-1]:.3f} vs {train_losses[-1]:.3f}")

# %%
fig, axes = figure()
ax = axes[0, 0]
ax.plot(train_losses, label="training loss")
ax.plot(val_losses, "--", label="validation loss")
ax.axhline(np.log(3), color="gray", ls=":", label="log 3: a uniform guess")
ax.set_ylim(0, 1.2)
ax.set_xlabel("step (full batch)")
ax.set_ylabel("cross-entropy")
ax.set_title("Training the linear classifier")
ax.legend()
show(fig, "loss_curve")

# %% [markdown]
# ## What the classifier learned
#
# Colour every point of the plane by the class the model predicts there, and put the training points
# on top, coloured by their true class; the class centres are stars, and the training points the model
# gets wrong are circled. Each boundary between two regions is where two logits are equal,
# $x (W_{:,i} - W_{:,j}) + b_i - b_j = 0$: a straight line. That is all a linear classifier can draw.
# The mistakes sit along the boundaries, where the clouds overlap and no straight line could do
# better.
#
# We check that the picture tells the truth: looking up each training point's cell of the coloured
# grid gives (nearly) the training accuracy the model reports, the only differences being points
# closer to a boundary than the grid's spacing.

# %%
xs = np.linspace(-5.0, 5.0, 201)
ys = np.linspace(-4.5, 5.0, 191)
grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.float32)
with mm.no_grad():
    regions = model(mm.Tensor(grid)).numpy().argmax(axis=1).reshape(len(ys), len(xs))
    predicted = model(mm.Tensor(X_train)).numpy().argmax(axis=1)


def region_at(points):
    """The colour of the grid cell each point falls in."""
    cols = np.clip(np.rint((points[:, 0] - xs[0]) / (xs[1] - xs[0])).astype(int), 0, len(xs) - 1)
    rows = np.clip(np.rint((points[:, 1] - ys[0]) / (ys[1] - ys[0])).astype(int), 0, len(ys) - 1)
    return regions[rows, cols]


train_acc = accuracy(model, X_train, y_train)
check("accuracy read off the picture = reported accuracy", (region_at(X_train) == y_train).mean(),
      train_acc, atol=0.02)
expect("each centre lies in its own class's region", region_at(centres).tolist() == [0, 1, 2],
       f"regions at the centres: {region_at(centres).tolist()}")

# %%
light, dark = ["#c6dbef", "#fdd0a2", "#c7e9c0"], ["tab:blue", "tab:orange", "tab:green"]
fig, axes = figure(size=(5.6, 5.0))
ax = axes[0, 0]
ax.contourf(xs, ys, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=light)
for c in range(3):
    ax.scatter(*X_train[y_train == c].T, s=10, color=dark[c], label=f"class {c}")
wrong_points = X_train[predicted != y_train]
ax.scatter(*wrong_points.T, s=70, facecolors="none", edgecolors="black", lw=1,
           label=f"misclassified ({len(wrong_points)})")
ax.scatter(*centres.T, marker="*", s=250, color="black", edgecolors="white", label="class centres")
ax.set_xlabel("$x_1$")
ax.set_ylabel("$x_2$")
ax.set_title(f"Decision regions (training accuracy {train_acc:.1%})")
ax.set_aspect("equal")
ax.legend(fontsize=8, loc="upper left")
show(fig, "decision_regions")

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
