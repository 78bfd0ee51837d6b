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
# # Lesson 10: AdamW and learning-rate schedules
#
# Plain gradient descent (lessons 1 and 4) uses one learning rate for every parameter. When some
# directions of the loss are steep and others flat, the rate that is safe for the steep ones is far
# too small for the flat ones. **Adam** gives every parameter its own step size, from running averages
# of its gradient and squared gradient; **AdamW** adds weight decay done right. Together with a
# **warmup + cosine** learning-rate schedule and **gradient clipping**, it is how nearly every language
# model is trained, our Memory Mosaic included (lesson 11).

# %%
import math

import numpy as np

import minimosaic as mm
from minimosaic import nn, optim
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("lr_schedule", "paths_on_the_bowl")

# %% [markdown]
# ## A badly scaled problem
#
# Linear regression where the three input features live on very different scales (10, 1 and 0.1).
# The loss $\ell(W, b) = \frac{1}{N}\sum_n \lVert x_n W + b - y_n\rVert^2$ is a bowl that is 10 000 times
# steeper along the first feature's weights than along the third's.

# %%
rng = np.random.default_rng(0)
N = 256
X = rng.standard_normal((N, 3)) * np.array([10.0, 1.0, 0.1])
W_true = rng.standard_normal((3, 2))
Y = X @ W_true + 0.5 + 0.01 * rng.standard_normal((N, 2))


def make_model():
    """Linear(3, 2) in float64, the same initial weights every time."""
    nn.manual_seed(0)
    return nn.Linear(3, 2, bias=True).to(dtype=np.float64)


def loss_of(model):
    return ((model(mm.Tensor(X)) - Y) ** 2).mean()


# %% [markdown]
# ## Plain SGD has one step size for everything
#
# On a quadratic, gradient descent diverges once $\eta$ exceeds $2 / \lambda_{\max}$ (the largest
# curvature), so $\eta$ is capped by the steepest direction, and the flattest one then crawls: its
# error shrinks by a factor $(1 - \eta \lambda_{\min})$ per step, printed below.

# %%
X1 = np.c_[X, np.ones(N)]  # the bias is a weight on a constant feature
curvatures = np.linalg.eigvalsh(2 * X1.T @ X1 / Y.size)  # the Hessian of the loss, per output column
print(f"curvatures of the bowl: {np.round(curvatures, 4)}; "
      f"SGD diverges above lr = {2 / curvatures.max():.4f}")
print(f"at that lr the flattest direction's error shrinks by {1 - 2 * curvatures.min() / curvatures.max():.6f} "
      "per step")

steps = 150 if QUICK else 400


def train(make_optimizer, steps=steps, schedule=None):
    model = make_model()
    opt = make_optimizer(model)
    for step in range(steps):
        loss = loss_of(model)
        loss.backward()
        opt.step(lr=schedule(step) if schedule else None)
        opt.zero_grad()
    return loss_of(model).item()


sgd_loss = train(lambda m: optim.SGD(m.parameters(), lr=0.9 * 2 / curvatures.max()))
sgd_big = train(lambda m: optim.SGD(m.parameters(), lr=1.1 * 2 / curvatures.max()), steps=30)
momentum_loss = train(lambda m: optim.SGD(m.parameters(), lr=0.5 * 2 / curvatures.max(), momentum=0.9))
print(f"SGD, lr just below the limit: loss {sgd_loss:.4f} after {steps} steps")
print(f"SGD, lr just above the limit: loss {sgd_big:.3g} after 30 steps (diverging)")
print(f"SGD with momentum 0.9:        loss {momentum_loss:.4f} after {steps} steps")
expect("SGD above the limit diverges", sgd_big > 1e3, f"{sgd_big:.3g}")

# %% [markdown]
# ## Adam: a step size per parameter
#
# For each parameter $p$ with gradient $g$ at step $t = 1, 2, \dots$ (all operations elementwise):
#
# $$m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,$$
# $$\hat m = \frac{m}{1 - \beta_1^t}, \qquad \hat v = \frac{v}{1 - \beta_2^t}, \qquad
#   p \leftarrow p - \eta\, \frac{\hat m}{\sqrt{\hat v} + \epsilon}.$$
#
# $m$ is a running mean of the gradient (momentum), $v$ of its square. Dividing by $\sqrt{\hat v}$
# makes the step about $\eta$ in size whatever the gradient's scale: steep and flat directions move at
# the same pace. $m$ and $v$ start at 0, so early averages are biased towards 0; dividing by
# $1 - \beta^t$ undoes exactly that (at $t = 1$, $\hat m = g$ and $\hat v = g^2$).
#
# **Weight decay, decoupled (the W in AdamW).** Adding $\lambda p$ to the gradient (L2 regularisation)
# would get divided by $\sqrt{\hat v}$ too, so parameters with large gradients would hardly be decayed.
# AdamW instead shrinks the parameter directly, before the Adam step: $p \leftarrow p - \eta \lambda p$.
# We apply it to weight matrices only (`optim.weight_decay_groups`): shrinking a bias or a gain towards
# zero has no regularising meaning.
#
# Here is that update written out in NumPy, next to `optim.AdamW`, on the same model.

# %%
def hand_adamw(steps, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):
    model = make_model()
    W, b = model.weight.data.copy(), model.bias.data.copy()
    state = {"W": [np.zeros_like(W), np.zeros_like(W)], "b": [np.zeros_like(b), np.zeros_like(b)]}
    b1, b2 = betas
    for t in range(1, steps + 1):
        residual = X @ W + b - Y  # the gradient of the mean squared error, by hand
        grads = {"W": 2 * X.T @ residual / residual.size, "b": 2 * residual.sum(axis=0) / residual.size}
        for name, p in (("W", W), ("b", b)):
            if name == "W":  # decay matrices only
                p -= lr * weight_decay * p
            m, v = state[name]
            g = grads[name]
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return W, b


def library_adamw(steps, lr=0.05, weight_decay=0.1):
    model = make_model()
    opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), weight_decay), lr=lr)
    for _ in range(steps):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    return model


W_hand, b_hand = hand_adamw(steps)
adam_model = library_adamw(steps)
check(f"hand AdamW == optim.AdamW after {steps} steps: W", adam_model.weight, W_hand, atol=1e-9)
check(f"hand AdamW == optim.AdamW after {steps} steps: b", adam_model.bias, b_hand, atol=1e-9)

groups = optim.weight_decay_groups(adam_model.named_parameters(), 0.1)
print("weight decay 0.1 for:", [p.shape for p in groups[0]["params"]],
      "| none for:", [p.shape for p in groups[1]["params"]])

# %% [markdown]
# If PyTorch happens to be installed, it gives a third opinion (minimosaic does not need it; quick mode
# skips it, as importing torch takes longer than the rest of the lesson).

# %%
torch = None
if QUICK:
    print("quick mode: skipping the comparison with torch.optim.AdamW")
else:
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the comparison with torch.optim.AdamW")
if torch is not None:
    model = make_model()
    Wt = torch.tensor(model.weight.data, requires_grad=True)
    bt = torch.tensor(model.bias.data, requires_grad=True)
    Xt, Yt = torch.tensor(X), torch.tensor(Y)
    topt = torch.optim.AdamW([{"params": [Wt], "weight_decay": 0.1}, {"params": [bt], "weight_decay": 0.0}],
                             lr=0.05)
    for _ in range(steps):
        topt.zero_grad()
        ((Xt @ Wt + bt - Yt) ** 2).mean().backward()
        topt.step()
    check("optim.AdamW == torch.optim.AdamW: W", adam_model.weight, Wt.detach().numpy(), atol=1e-9)

# %% [markdown]
# ## Learning-rate schedules
#
# A fixed $\eta$ is a compromise: large is fast but noisy near the end, small is precise but slow. The
# schedule used by nanoGPT (and by our trainer) is a **linear warmup** (Adam's $v$ is still a poor
# estimate in the first steps, and a full-size step then can throw the model somewhere bad), then a
# **cosine decay** to a floor:
#
# $$\eta(s) = \eta_{\max}\frac{s + 1}{w + 1}\ (s < w), \qquad
#   \eta(s) = \eta_{\min} + \tfrac12 (\eta_{\max} - \eta_{\min})
#   \left(1 + \cos \pi \tfrac{s - w}{S - w}\right)\ (w \le s \le S),$$
#
# and $\eta_{\min}$ after $S$.

# %%
schedule = optim.CosineSchedule(max_lr=0.05, min_lr=0.005, warmup_steps=20, total_steps=steps)
for s in [0, 5, 10, 19, 20, steps // 2, steps - 1, steps, steps + 50]:
    bar = "#" * round(schedule(s) / 0.05 * 40)
    print(f"step {s:4d}  lr {schedule(s):.5f}  {bar}")
check("warmup starts at max_lr / (w + 1)", schedule(0), 0.05 / 21)
check("warmup reaches max_lr", schedule(20), 0.05)
check("halfway through the cosine: the mean", schedule(20 + (steps - 20) / 2), (0.05 + 0.005) / 2)
check("the floor at and after total_steps", [schedule(steps), schedule(steps + 50)], [0.005, 0.005])

# %% [markdown]
# The whole schedule, step by step: a straight ramp up to $\eta_{\max}$ at the end of warmup, then half
# a cosine wave down to the floor $\eta_{\min}$ at `total_steps`, and flat after.

# %%
schedule_steps = np.arange(steps + 50)
lrs = np.array([schedule(s) for s in schedule_steps])
check("the schedule peaks at max_lr ...", lrs.max(), 0.05)
check("... at the end of warmup", schedule_steps[lrs.argmax()], 20, atol=0)
expect("it only goes down after warmup", np.all(np.diff(lrs[20:]) <= 1e-15), "lr(s + 1) <= lr(s) for s >= 20")
check("it ends at min_lr", lrs[-1], 0.005)

fig, axes = figure(size=(6.0, 3.4))
ax = axes[0, 0]
ax.plot(schedule_steps, lrs, color="tab:blue")
ax.axvspan(0, 20, color="tab:orange", alpha=0.15, label="warmup (20 steps)")
ax.axvline(steps, color="gray", ls=":", label=f"total_steps = {steps}")
ax.axhline(0.005, color="gray", ls="--", lw=0.8, label="min_lr")
ax.set(title="warmup + cosine", xlabel="step", ylabel="learning rate")
ax.legend()
show(fig, "lr_schedule")

# %% [markdown]
# ## The race
#
# The same number of steps for each optimiser, from the same start. Adam's per-parameter step sizes
# make the flat direction move as fast as the steep one; the schedule lets it settle at the end.

# %%
adam_loss = loss_of(adam_model).item()
adam_cosine_loss = train(lambda m: optim.AdamW(optim.weight_decay_groups(m.named_parameters(), 0.0), lr=0.05),
                         schedule=schedule)
floor = ((X1 @ np.linalg.lstsq(X1, Y, rcond=None)[0] - Y) ** 2).mean()
print(f"best possible loss (least squares): {floor:.6f}")
for name, value in [("SGD", sgd_loss), ("SGD + momentum", momentum_loss),
                    ("AdamW (wd 0.1), constant lr", adam_loss), ("AdamW, warmup + cosine", adam_cosine_loss)]:
    print(f"  {name:30s} loss {value:.6f}")
expect("AdamW + cosine beats plain SGD by 10x", adam_cosine_loss * 10 < sgd_loss,
       f"{adam_cosine_loss:.5f} vs {sgd_loss:.5f}")

# %% [markdown]
# ### The race, seen from above
#
# Eight parameters are too many to draw, so we slice the bowl: train only two weights of the first
# output, the one on the steep first feature ($W_{11}$) and the one on the flat third feature
# ($W_{31}$), with every other weight held at its least-squares value. The contours below are that
# 2-D loss surface (note the axes: the valley is 10 000 times steeper across than along). Look at
# how each optimiser spends its steps: SGD, with the largest safe rate, zigzags across the valley in a
# few steps and then crawls along it; AdamW heads for the minimum along both weights at about the same
# pace, and the schedule settles it there. On the right, the distance to the minimum step by step:
# momentum (its path, not drawn, would hide SGD's) crawls a little faster than SGD, while AdamW's
# distance falls by orders of magnitude.

# %%
best = np.linalg.lstsq(X1, Y, rcond=None)[0]             # (4, 2): the least-squares weights and bias
F = X1[:, [0, 2]]                                         # the two features we train on
rest = X1[:, [1, 3]] @ best[[1, 3], :1]                   # the frozen rest of the first output
target = Y[:, :1]


def slice_loss(w1, w3):
    """The loss of the first output over a grid of (W_11, W_31), everything else at its best."""
    residual = w1[..., None] * F[:, 0] + w3[..., None] * F[:, 1] + rest[:, 0] - target[:, 0]
    return (residual**2).mean(axis=-1)


slice_curvature = np.linalg.eigvalsh(2 * F.T @ F / N)
minimum = best[[0, 2], 0]
start = minimum + np.array([0.25, -3.0])


def path(make_optimizer, schedule=None):
    w = mm.Tensor(start[:, None].copy(), requires_grad=True)
    opt = make_optimizer([w])
    points = [w.data[:, 0].copy()]
    for step in range(steps):
        loss = ((mm.Tensor(F) @ w + rest - target) ** 2).mean()
        loss.backward()
        opt.step(lr=schedule(step) if schedule else None)
        opt.zero_grad()
        points.append(w.data[:, 0].copy())
    return np.array(points)


print(f"curvatures of the slice: {slice_curvature.round(4)}")
paths = {
    "SGD": path(lambda p: optim.SGD(p, lr=0.9 * 2 / slice_curvature.max())),
    "SGD + momentum": path(lambda p: optim.SGD(p, lr=0.5 * 2 / slice_curvature.max(), momentum=0.9)),
    "AdamW, warmup + cosine": path(lambda p: optim.AdamW(p, lr=0.05, weight_decay=0.0), schedule),
}
distance = {name: float(np.linalg.norm(points[-1] - minimum)) for name, points in paths.items()}
for name, d in distance.items():
    print(f"  {name:24s} ends {d:.4f} from the minimum (started {np.linalg.norm(start - minimum):.2f} away)")
check("the slice's minimum is the least-squares one", slice_loss(*minimum),
      ((X1 @ best[:, 0] - Y[:, 0]) ** 2).mean())
expect("AdamW ends much nearer the minimum than SGD",
       distance["AdamW, warmup + cosine"] < 0.25 * distance["SGD"],
       f"{distance['AdamW, warmup + cosine']:.4f} vs {distance['SGD']:.4f}")
expect("SGD has settled across the valley, not along it", abs(paths["SGD"][-1, 0] - minimum[0]) < 0.01,
       f"|W_11 - best| = {abs(paths['SGD'][-1, 0] - minimum[0]):.4f}, |W_31 - best| = "
       f"{abs(paths['SGD'][-1, 1] - minimum[1]):.3f}")

w3_grid, w1_grid = np.meshgrid(np.linspace(start[1] - 0.4, minimum[1] + 0.6, 150),
                               np.linspace(minimum[0] - 0.3, minimum[0] + 0.3, 150))
surface = slice_loss(w1_grid, w3_grid)
fig, axes = figure(ncols=2, size=(5.4, 4.0))
ax = axes[0, 0]
levels = surface.min() + np.geomspace(1e-3, surface.max() - surface.min(), 14)
ax.contour(w3_grid, w1_grid, surface, levels=levels, cmap="Greys_r", linewidths=0.7)
colors = {"SGD": "tab:red", "SGD + momentum": "tab:orange", "AdamW, warmup + cosine": "tab:blue"}
for name in ("SGD", "AdamW, warmup + cosine"):  # (momentum's path would hide SGD's: see the right)
    ax.plot(paths[name][:, 1], paths[name][:, 0], ".-", color=colors[name], ms=2.5, lw=0.8, label=name)
ax.plot(*start[::-1], "ks", ms=6, label="start")
ax.plot(*minimum[::-1], "k*", ms=12, label="minimum")
ax.set(title="the loss over two weights (contours) and the paths", xlabel="$W_{31}$ (flat: 3rd feature)",
       ylabel="$W_{11}$ (steep: 1st feature)")
ax.legend(fontsize=8, loc="lower right")
ax = axes[0, 1]
for name, points in paths.items():
    ax.semilogy(np.linalg.norm(points - minimum, axis=1), color=colors[name], label=name)
ax.set(title="distance to the minimum", xlabel="step", ylabel="|w - w*| (log scale)")
ax.legend(fontsize=8)
show(fig, "paths_on_the_bowl")

# %% [markdown]
# ## Gradient clipping
#
# One bad batch can produce a huge gradient and undo hours of training. `optim.clip_grad_norm`
# rescales all gradients together so their global norm $\sqrt{\sum_p \lVert g_p \rVert^2}$ is at most a
# threshold; the direction is kept, only the length is capped. It returns the norm before clipping,
# which is worth logging: spikes in it are the first sign of trouble.

# %%
model = make_model()
loss_of(model).backward()
raw = [p.grad.copy() for p in model.parameters()]
norm = math.sqrt(sum((g**2).sum() for g in raw))
returned = optim.clip_grad_norm(model.parameters(), max_norm=1.0)
check("clip_grad_norm returns the global norm", float(returned), norm, rtol=1e-6)
check("after clipping the norm is 1", math.sqrt(sum((p.grad**2).sum() for p in model.parameters())), 1.0,
      rtol=1e-5)
check("the direction is unchanged", model.weight.grad, raw[0] / (norm + 1e-6))

# %% [markdown]
# ## Exercises
#
# 1. Set $\beta_1 = 0$: what is left of Adam? With $\beta_2 = 0$ too, show that each step moves every
#    parameter by exactly $\eta$ (up to $\epsilon$): *sign descent*.
# 2. Remove the bias correction from `hand_adamw`. How big is the first step? Why does warmup make
#    the bias correction matter less?
# 3. Replace decoupled weight decay by L2 regularisation (add $\lambda p$ to the gradient) and compare
#    how much $W$ shrinks for the first feature (large gradients) and the third (small ones).
# 4. Standardise the features (divide each column of X by its standard deviation) and rerun the
#    race. Which optimiser gains the most, and why?
