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
# # Lesson 5: kernel smoothing and the bandwidth
#
# The oldest way to predict from examples is to **remember them all** and, for a new input, average
# the outputs of the stored examples whose inputs are close to it. That is kernel smoothing (the
# Nadaraya-Watson estimator, 1964), and it is the heart of a Memory Mosaic: every memory in the
# model (lessons 6-9) is a kernel smoother over stored (key, value) pairs. The one number that
# matters is the **bandwidth**: how close is "close". This lesson shows what too small and too large
# do, how to choose it from the data alone, and how to *learn* it by gradient descent, which is what a
# Memory Mosaic does.

# %%
import numpy as np

import minimosaic as mm
from minimosaic import memories, optim
from _check import QUICK, check, expect, figure, promise_figures, show

promise_figures("bandwidth_fits", "leave_one_out")

# %% [markdown]
# ## The estimator
#
# Given examples $(x_i, y_i)$, $i = 1..n$, predict at a query $x$ with a weighted average:
#
# $$\hat f(x) = \sum_i w_i(x)\, y_i, \qquad
#   w_i(x) = \frac{K(x, x_i)}{\sum_j K(x, x_j)}, \qquad K(x, x_i) = e^{-\beta \lVert x - x_i \rVert^2}.$$
#
# The Gaussian kernel has bandwidth $h$ with $\beta = 1/(2h^2)$: examples much farther than $h$ from
# the query get almost no weight. Note the weights are a **softmax** of $-\beta\lVert x - x_i\rVert^2$
# (lesson 4): they are positive and sum to 1.
#
# Our data: a noisy sine, $y = \sin x + 0.3\,\varepsilon$.

# %%
rng = np.random.default_rng(0)
n = 120 if QUICK else 200
x = np.sort(rng.uniform(0, 2 * np.pi, n))
y = np.sin(x) + 0.3 * rng.standard_normal(n)
x_query = np.linspace(0, 2 * np.pi, 300)


def smooth_by_hand(x_query, x, y, beta):
    """Nadaraya-Watson in NumPy: one row of weights per query."""
    logits = -beta * (x_query[:, None] - x[None, :]) ** 2   # (Q, n)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))   # subtracting the max changes nothing
    w /= w.sum(axis=1, keepdims=True)
    return w @ y

# %% [markdown]
# `memories.kernel_smoothing(query, keys, values, beta)` is the same estimator on Tensors, in the
# shapes the model uses: queries (Q, d), keys (n, d), values (n, d_v). Here $d = d_v = 1$.

# %%
def smooth(x_query, x, y, beta, mask=None):
    column = lambda a: mm.Tensor(np.asarray(a, np.float64)[:, None])  # noqa: E731  (n,) -> (n, 1)
    return memories.kernel_smoothing(column(x_query), column(x), column(y), beta, mask=mask)


beta = 1 / (2 * 0.3**2)
check("kernel_smoothing vs NumPy by hand", smooth(x_query, x, y, beta).numpy()[:, 0],
      smooth_by_hand(x_query, x, y, beta), atol=1e-10)

# %% [markdown]
# ## Too small, too large, just right
#
# * A **tiny** bandwidth averages only the one or two nearest examples: the estimate follows the noise
#   (high variance).
# * A **huge** bandwidth averages everything: the estimate is nearly the global mean, a flat line
#   (high bias).
#
# We know the truth here ($\sin x$), so we can measure the error of each choice directly.

# %%
bandwidths = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0]
true_error = {}
for h in bandwidths:
    f = smooth(x_query, x, y, 1 / (2 * h * h)).numpy()[:, 0]
    true_error[h] = ((f - np.sin(x_query)) ** 2).mean()
    print(f"h = {h:5.2f}   mean squared error against sin x: {true_error[h]:.4f}")
best_h = min(true_error, key=true_error.get)
expect("the best bandwidth is neither extreme", bandwidths[0] < best_h < bandwidths[-1], f"best h = {best_h}")

print("\n    x   sin x   h=0.01   h=0.2    h=3")
for xq in np.linspace(0.5, 5.5, 6):
    row = [smooth([xq], x, y, 1 / (2 * h * h)).item() for h in (0.01, 0.2, 3.0)]
    print(f"{xq:5.2f} {np.sin(xq):7.3f} {row[0]:8.3f} {row[1]:7.3f} {row[2]:6.3f}")

# %% [markdown]
# The same three estimates as curves over the data. Look at how the small bandwidth jumps from point
# to point (it has learned the noise), how the large one is almost a straight line through the middle
# (it has forgotten the sine), and how the middle one follows the dashed true curve. Before drawing we
# measure what the picture claims: how far each curve travels up and down (its total variation; the
# true sine travels 4 over one period) and its error against $\sin x$.

# %%
shown = {bandwidths[0]: "too small", best_h: "good", bandwidths[-1]: "too large"}
fits = {h: smooth(x_query, x, y, 1 / (2 * h * h)).numpy()[:, 0] for h in shown}
travel = {h: np.abs(np.diff(f)).sum() for h, f in fits.items()}
truth_travel = np.abs(np.diff(np.sin(x_query))).sum()
check("the true sine travels 4 over one period", truth_travel, 4.0, atol=1e-3)
expect("too small a bandwidth follows the noise", travel[bandwidths[0]] > 3 * truth_travel,
       f"h = {bandwidths[0]}: travels {travel[bandwidths[0]]:.1f}")
expect("too large a bandwidth is nearly flat", np.ptp(fits[bandwidths[-1]]) < 0.5 * np.ptp(np.sin(x_query)),
       f"h = {bandwidths[-1]}: range {np.ptp(fits[bandwidths[-1]]):.2f} (the sine's: 2)")
expect("the best bandwidth follows the sine", true_error[best_h] < 0.02,
       f"h = {best_h}: error {true_error[best_h]:.4f}")

fig, axes = figure(size=(7.0, 4.0))
ax = axes[0, 0]
ax.scatter(x, y, s=8, color="0.6", label="data: sin x + noise")
ax.plot(x_query, np.sin(x_query), "k--", lw=1.5, label="true curve sin x")
for (h, word), color in zip(shown.items(), ("tab:red", "tab:green", "tab:blue")):
    good = word == "good"
    ax.plot(x_query, fits[h], color=color, lw=2.0 if good else 1.0, zorder=3 if good else 2,
            label=f"h = {h:g} ({word}): error against sin x {true_error[h]:.3f}")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.set_title("Nadaraya-Watson fits at three bandwidths")
ax.legend(fontsize=8, loc="lower left")
show(fig, "bandwidth_fits")

# %% [markdown]
# ## Choosing the bandwidth without knowing the truth
#
# In practice we have no $\sin x$ to compare with. We can score a bandwidth by how well it predicts
# each **example from the others**: leave-one-out error, $\frac1n\sum_i (\hat f_{-i}(x_i) - y_i)^2$,
# where $\hat f_{-i}$ is the smoother with example $i$ removed.
#
# Why removed? If example $i$ may vote for itself, the tiniest bandwidth puts all the weight on
# itself, "predicts" $y_i$ perfectly, and looks best, while being the worst on new inputs. The
# answer has **leaked** into the prediction. A mask (True = this key may be used) with the diagonal
# set to False removes it. Keep this in mind: the Memory Mosaic's context memory masks its diagonal for
# exactly this reason (lesson 7).

# %%
not_self = ~np.eye(n, dtype=bool)
print("    h   leave-one-out   with itself")
loo_error, self_error = {}, {}
for h in bandwidths:
    b = 1 / (2 * h * h)
    loo_error[h] = ((smooth(x, x, y, b, mask=not_self).numpy()[:, 0] - y) ** 2).mean()
    self_error[h] = ((smooth(x, x, y, b).numpy()[:, 0] - y) ** 2).mean()
    print(f"{h:5.2f}   {loo_error[h]:13.4f}   {self_error[h]:11.4f}")
loo_best = min(loo_error, key=loo_error.get)
self_best = min(self_error, key=self_error.get)
expect("leave-one-out picks a good bandwidth", true_error[loo_best] < 2 * true_error[best_h],
       f"h = {loo_best}, true error {true_error[loo_best]:.4f} (best {true_error[best_h]:.4f})")
expect("letting examples vote for themselves picks the smallest", self_best == bandwidths[0],
       f"h = {self_best}, true error {true_error[self_best]:.4f}")

# %% [markdown]
# A grid of 8 bandwidths is coarse. The leave-one-out error costs one masked smoothing per bandwidth,
# so we can afford a fine grid and draw it as a curve (log scale for $h$, as bandwidths are compared by
# ratios). Look for the valley: to its left the estimate chases noise, to its right it flattens the
# sine, and its bottom is the chosen bandwidth. Beside it, the error when each example votes for
# itself: it only falls as $h$ shrinks, so it would choose the jagged red curve above. We check that
# the valley's bottom lies strictly inside the grid (otherwise the grid was too narrow and the choice
# meaningless) and that the chosen bandwidth is good against the truth.

# %%
fine = np.geomspace(bandwidths[0], bandwidths[-1], 40)
fine_loo = np.array([((smooth(x, x, y, 1 / (2 * h * h), mask=not_self).numpy()[:, 0] - y) ** 2).mean()
                     for h in fine])
fine_self = np.array([((smooth(x, x, y, 1 / (2 * h * h)).numpy()[:, 0] - y) ** 2).mean() for h in fine])
chosen = int(fine_loo.argmin())
chosen_h = fine[chosen]
chosen_true = ((smooth(x_query, x, y, 1 / (2 * chosen_h**2)).numpy()[:, 0] - np.sin(x_query)) ** 2).mean()
expect("the leave-one-out minimum is strictly inside the range", 0 < chosen < len(fine) - 1,
       f"h = {chosen_h:.3f}, grid point {chosen} of 0..{len(fine) - 1}")
expect("the chosen bandwidth is good against the truth", chosen_true < 2 * true_error[best_h],
       f"true error {chosen_true:.4f} (best of the coarse grid {true_error[best_h]:.4f})")
expect("voting for itself only gets better as h shrinks", np.all(np.diff(fine_self) >= -1e-12),
       f"from {fine_self[0]:.4f} at h = {fine[0]:g} to {fine_self[-1]:.4f} at h = {fine[-1]:g}")

fig, axes = figure(size=(6.0, 4.0))
ax = axes[0, 0]
ax.plot(fine, fine_loo, "o-", ms=3, color="tab:green", label="leave-one-out error")
ax.plot(fine, fine_self, "s-", ms=3, color="tab:red", alpha=0.7,
        label="error when each example votes for itself")
ax.axvline(chosen_h, color="k", ls=":", lw=1)
ax.plot([chosen_h], [fine_loo[chosen]], "k*", ms=14, label=f"chosen: h = {chosen_h:.2f}")
ax.axhline(0.3**2, color="0.5", lw=0.8, ls="--", label="noise variance 0.09")
ax.set_xscale("log")
ax.set_xlabel("bandwidth h (log scale)")
ax.set_ylabel("mean squared error on the examples")
ax.set_title("Choosing the bandwidth from the data alone")
ax.legend(fontsize=8)
show(fig, "leave_one_out")

# %% [markdown]
# ## Learning the bandwidth by gradient descent
#
# The leave-one-out error is a differentiable function of $\beta$, so instead of a grid search we can
# follow its gradient. We learn $\log\beta$ (so $\beta$ stays positive and steps are relative), with the
# engine of lesson 2 and the SGD of lesson 4. This is what a Memory Mosaic does in every head: its
# key scale (lesson 6) is a learned $\beta$.
#
# First, is the gradient through `kernel_smoothing` right? (Lesson 3.)

# %%
small = rng.standard_normal((6, 2)), rng.standard_normal((9, 2)), rng.standard_normal((9, 3))
inputs = [mm.Tensor(a, requires_grad=True) for a in small] + [mm.Tensor(np.array(0.7), requires_grad=True)]
expect("gradcheck kernel_smoothing (query, keys, values, beta)",
       mm.gradcheck(memories.kernel_smoothing, inputs, names=["query", "keys", "values", "beta"]))

# %%
log_beta = mm.Tensor(np.array(np.log(1 / (2 * 3.0**2))), requires_grad=True)  # start at h = 3: far too wide
sgd = optim.SGD([log_beta], lr=2.0)
for step in range(60 if QUICK else 120):
    loss = ((smooth(x, x, y, log_beta.exp(), mask=not_self) - y[:, None]) ** 2).mean()
    loss.backward()
    sgd.step()
    sgd.zero_grad()
    if step % 20 == 0:
        h_now = (2 * np.exp(log_beta.item())) ** -0.5
        print(f"step {step:3d}  leave-one-out error {loss.item():.4f}  bandwidth h = {h_now:.3f}")
learned_h = float((2 * np.exp(log_beta.item())) ** -0.5)
learned_true = ((smooth(x_query, x, y, np.exp(log_beta.item())).numpy()[:, 0] - np.sin(x_query)) ** 2).mean()
expect("the learned bandwidth is close to the best", learned_true < 1.5 * true_error[best_h],
       f"h = {learned_h:.3f}, true error {learned_true:.4f} (grid best {true_error[best_h]:.4f})")

# %% [markdown]
# ## Exercises
#
# 1. Double the noise (0.6 instead of 0.3). Does the best bandwidth get larger or smaller? Why?
# 2. Use 20 examples instead of 200. What happens to the best bandwidth and to its error?
# 3. Replace the Gaussian kernel by a box kernel ($K = 1$ if $|x - x_i| < h$, else 0). Why can we no
#    longer learn $h$ by gradient descent?
# 4. Make $x$ two-dimensional ($y = \sin x_1 \cos x_2$) and check that one $\beta$ still works, then
#    give each dimension its own $\beta$ (a diagonal metric) and learn both.
