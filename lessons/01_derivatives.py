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
# # Lesson 1: derivatives and the chain rule
#
# Everything in this course, up to a trained Memory Mosaic language model, rests on one question:
# *if I nudge this number a little, how much does the loss change?* The answer is a derivative.
# Training is nothing more than computing derivatives of a loss with respect to millions of
# parameters and taking small steps downhill.
#
# This lesson uses plain Python on single numbers (scalars). We compute derivatives two ways:
#
# 1. **numerically**, by nudging the input and watching the output (finite differences), and
# 2. **by hand**, with the rules of calculus, chiefly the **chain rule**,
#
# and we check that they agree. Lesson 2 turns the hand work into a machine (automatic differentiation).

# %%
import math

import numpy as np

from _check import expect, figure, promise_figures, show

promise_figures("difference_error_vs_step")

# %% [markdown]
# ## A self-check helper
#
# Every lesson compares what we compute with a trusted reference and prints the comparison, so you
# always see *where* you are right: exactly equal, approximately equal, and by how much at most.
# Here it is, written out once; later lessons import the same function from `lessons/_check.py`.
# (From there we already take `expect`, its twin for yes/no facts, and the helpers that draw and save
# the figures.)

# %%
def check(name, ours, reference, atol=1e-6, rtol=1e-5):
    """Print exact / approximate agreement and the largest difference; stop if not approximate."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    exact = bool(np.array_equal(a, b))
    approx = bool(np.allclose(a, b, atol=atol, rtol=rtol))
    maxdiff = float(np.max(np.abs(a - b)))
    print(f"{name:<44s} | exact: {exact!s:5} | approx: {approx!s:5} | maxdiff: {maxdiff:.2e}")
    assert approx, f"{name}: differs by {maxdiff:.3g}"


check("0.1 + 0.2 vs 0.3", 0.1 + 0.2, 0.3)  # approx True, exact False: binary floating point rounds

# %% [markdown]
# ## The derivative as a limit
#
# For a function $f$ of one number, the derivative at $x$ is the slope of $f$ there:
#
# $$f'(x) = \lim_{h \to 0} \frac{f(x + h) - f(x)}{h}.$$
#
# Take $f(x) = 3x^2 - 4x + 5$. The power rule gives $f'(x) = 6x - 4$.

# %%
def f(x):
    return 3 * x**2 - 4 * x + 5


def f_prime(x):  # by hand: d/dx (3x^2) = 6x, d/dx (-4x) = -4, d/dx 5 = 0
    return 6 * x - 4


x = 3.0
h = 1e-6
forward_difference = (f(x + h) - f(x)) / h
print(f"f({x}) = {f(x)},  slope by nudging = {forward_difference:.6f},  by hand = {f_prime(x)}")
check("forward difference vs 6x - 4 at x = 3", forward_difference, f_prime(x), atol=1e-4)

# %% [markdown]
# ## How small should h be?
#
# The forward difference has a **truncation error** of order $h$ (Taylor: $f(x+h) = f(x) + h f'(x) +
# \tfrac{h^2}{2} f''(x) + \dots$, so dividing by $h$ leaves $\tfrac{h}{2} f''(x)$). Making $h$ smaller
# shrinks it, but then $f(x+h)$ and $f(x)$ agree in almost all their digits and their difference is
# dominated by **rounding error**, about $\epsilon_{\text{machine}} |f(x)| / h$.
#
# The **central difference** $\frac{f(x+h) - f(x-h)}{2h}$ cancels the $h^2$ term of the Taylor series
# too, so its truncation error is of order $h^2$: much better for the same $h$.

# %%
print(f"{'h':>8s} {'forward error':>15s} {'central error':>15s}")
errors = {}
for k in range(1, 13):
    h = 10.0**-k
    fwd = (f(x + h) - f(x)) / h
    ctr = (f(x + h) - f(x - h)) / (2 * h)
    errors[k] = (abs(fwd - f_prime(x)), abs(ctr - f_prime(x)))
    print(f"{h:8.0e} {errors[k][0]:15.3e} {errors[k][1]:15.3e}")

# %% [markdown]
# For this quadratic the central difference is exact up to rounding (its third derivative is zero),
# while the forward difference is off by exactly $3h$ (since $\tfrac{h}{2} f''(x) = \tfrac{h}{2} \cdot 6$).
# Both get *worse* again for tiny $h$: rounding wins. The sweet spot for the forward difference is
# near $h \approx \sqrt{\epsilon} \approx 10^{-8}$ in float64; for the central difference near
# $\epsilon^{1/3} \approx 10^{-5}$.

# %%
check("forward-difference error = 3h at h = 1e-3", errors[3][0], 3e-3, rtol=1e-6, atol=1e-12)
assert errors[3][1] < errors[3][0], "central beats forward at h = 1e-3"
assert errors[12][0] > errors[7][0], "at h = 1e-12 rounding error has taken over"
print("central difference beats forward at h = 1e-3; rounding dominates at h = 1e-12")

# %% [markdown]
# ### The error against $h$, drawn
#
# The quadratic is too kind to the central difference: its $h^2$ term is zero. Take $g(x) = \sin x$
# at $x = 1$ instead, where every derivative is alive, and sweep $h$ from $10^{-15}$ to $1$. On log-log
# axes a power law $C h^p$ is a straight line of slope $p$, so each error curve is a **V**:
#
# * the right arm is truncation: slope 1 for the forward difference ($\tfrac{h}{2}|g''|$), slope 2 for
#   the central one ($\tfrac{h^2}{6}|g'''|$);
# * the left arm is rounding, about $\epsilon / h$: slope $-1$ for both, and jagged, because rounding
#   errors are;
# * the bottom of the V (a star) is the best $h$: near $\sqrt{\epsilon} \approx 10^{-8}$ for the forward
#   difference, near $\epsilon^{1/3} \approx 10^{-5}$ for the central one, whose bottom also lies
#   hundreds of times lower.
#
# We fit the slopes of both arms and find both bottoms before drawing (rounding is jagged, so a
# bottom's depth is the median of its five lowest points, lest one lucky rounding decide). The dashed
# lines in the figure are the error formulas above, not fits.

# %%
steps = np.logspace(-15, 0, 61)  # 4 points per decade
x = 1.0
forward_errors = np.abs((np.sin(x + steps) - np.sin(x)) / steps - np.cos(x))
central_errors = np.abs((np.sin(x + steps) - np.sin(x - steps)) / (2 * steps) - np.cos(x))


def loglog_slope(errors, lo, hi):
    """The slope of the straight line that fits log10(error) against log10(h) for lo <= h <= hi."""
    inside = (steps >= lo) & (steps <= hi)
    return np.polyfit(np.log10(steps[inside]), np.log10(errors[inside]), 1)[0]


check("forward: truncation slope 1 (h 1e-4..0.1)", loglog_slope(forward_errors, 1e-4, 1e-1), 1.0, atol=0.1)
check("central: truncation slope 2 (h 1e-3..0.1)", loglog_slope(central_errors, 1e-3, 1e-1), 2.0, atol=0.1)
check("forward: rounding slope -1 (h 1e-14..1e-9)", loglog_slope(forward_errors, 1e-14, 1e-9), -1.0, atol=0.4)
check("central: rounding slope -1 (h 1e-14..1e-7)", loglog_slope(central_errors, 1e-14, 1e-7), -1.0, atol=0.4)
best_forward, best_central = forward_errors.argmin(), central_errors.argmin()
expect("both bottoms lie strictly inside the sweep",
       0 < best_forward < len(steps) - 1 and 0 < best_central < len(steps) - 1,
       f"best h: forward {steps[best_forward]:.1e}, central {steps[best_central]:.1e}")
expect("central's best h is larger than forward's", steps[best_central] > steps[best_forward],
       f"{steps[best_central]:.1e} > {steps[best_forward]:.1e}")
bottom_forward, bottom_central = (np.median(np.sort(curve)[:5]) for curve in (forward_errors, central_errors))
expect("central's V bottoms out 10x lower than forward's", 10 * bottom_central < bottom_forward,
       f"median of the 5 lowest errors: {bottom_central:.1e} vs {bottom_forward:.1e}")

# %%
epsilon = np.finfo(np.float64).eps
fig, axes = figure(size=(6.4, 4.4))
ax = axes[0, 0]
ax.loglog(steps, forward_errors, "o-", ms=3, color="tab:blue", label="forward difference")
ax.loglog(steps, central_errors, "o-", ms=3, color="tab:orange", label="central difference")
ax.loglog(steps, steps / 2 * np.sin(x), "--", color="tab:blue", lw=1,
          label=r"truncation $\frac{h}{2}|g''|$ (slope 1)")
ax.loglog(steps, steps**2 / 6 * np.cos(x), "--", color="tab:orange", lw=1,
          label=r"truncation $\frac{h^2}{6}|g'''|$ (slope 2)")
ax.loglog(steps, epsilon / steps, ":", color="black", lw=1, label=r"rounding $\epsilon / h$ (slope $-1$)")
for best, curve, color in [(best_forward, forward_errors, "tab:blue"),
                           (best_central, central_errors, "tab:orange")]:
    ax.plot(steps[best], curve[best], "*", ms=14, color=color, markeredgecolor="black")
ax.set_ylim(1e-14, 1)
ax.set_xlabel("step h")
ax.set_ylabel("|error| of the slope of sin at x = 1")
ax.set_title("Finite-difference error: truncation (right) vs rounding (left)")
ax.legend(fontsize=8, loc="lower left")
show(fig, "difference_error_vs_step")

# %% [markdown]
# ## Several inputs: partial derivatives
#
# With $d = a b + c$, nudging one input while holding the others fixed gives a **partial
# derivative**: $\partial d / \partial a = b$, $\partial d / \partial b = a$, $\partial d / \partial c = 1$.
# The list of all partial derivatives is the **gradient**.

# %%
def d_of(a, b, c):
    return a * b + c


a, b, c = 2.0, -3.0, 10.0
h = 1e-6
numeric = [(d_of(a + h, b, c) - d_of(a - h, b, c)) / (2 * h),
           (d_of(a, b + h, c) - d_of(a, b - h, c)) / (2 * h),
           (d_of(a, b, c + h) - d_of(a, b, c - h)) / (2 * h)]
by_hand = [b, a, 1.0]
check("gradient of a*b + c (central differences)", numeric, by_hand)

# %% [markdown]
# ## The chain rule
#
# If $y = g(u)$ and $u = h(x)$, then a nudge $\delta x$ moves $u$ by about $h'(x)\,\delta x$, which moves
# $y$ by about $g'(u)\,h'(x)\,\delta x$:
#
# $$\frac{dy}{dx} = \frac{dy}{du}\,\frac{du}{dx}.$$
#
# Example: $y = \sin(x^2)$, so with $u = x^2$, $\frac{dy}{dx} = \cos(u) \cdot 2x$.
#
# A longer chain works the same way, link by link. Here is one artificial "neuron" with an input
# $x$, a weight $w$, a bias $b$ and a tanh squashing function, followed by a squared error against a
# target $t$:
#
# $$z = w x + b, \qquad o = \tanh z, \qquad L = (o - t)^2.$$
#
# Going **backwards** from $L$, each step multiplies by one local derivative:
#
# $$\frac{\partial L}{\partial o} = 2(o - t), \quad
#   \frac{\partial L}{\partial z} = \frac{\partial L}{\partial o}\,(1 - o^2), \quad
#   \frac{\partial L}{\partial w} = \frac{\partial L}{\partial z}\, x, \quad
#   \frac{\partial L}{\partial b} = \frac{\partial L}{\partial z}.$$

# %%
def y_of(x):
    return math.sin(x**2)


x = 0.7
dy_dx = math.cos(x**2) * 2 * x
numeric = (y_of(x + 1e-6) - y_of(x - 1e-6)) / 2e-6
check("d/dx sin(x^2): chain rule vs numeric", dy_dx, numeric)


def neuron_loss(x, w, b, t):
    return (math.tanh(w * x + b) - t) ** 2


x, w, b, t = 1.5, -0.8, 0.3, 0.5
# forward pass, keeping the intermediate values the backward pass needs
z = w * x + b
o = math.tanh(z)
L = (o - t) ** 2
# backward pass: one local derivative per step, multiplied along the chain
dL_do = 2 * (o - t)
dL_dz = dL_do * (1 - o**2)
dL_dw = dL_dz * x
dL_db = dL_dz
eps = 1e-6
numeric_w = (neuron_loss(x, w + eps, b, t) - neuron_loss(x, w - eps, b, t)) / (2 * eps)
numeric_b = (neuron_loss(x, w, b + eps, t) - neuron_loss(x, w, b - eps, t)) / (2 * eps)
check("dL/dw of the tanh neuron", dL_dw, numeric_w)
check("dL/db of the tanh neuron", dL_db, numeric_b)

# %% [markdown]
# Notice the bookkeeping: the backward pass reuses values from the forward pass ($o$, $x$) and each
# intermediate gradient ($\partial L/\partial z$) is computed **once** and shared by every input below
# it. That is exactly what reverse-mode automatic differentiation automates (lesson 2).
#
# ## When a value is used twice, gradients add
#
# If $x$ feeds two paths, $y = x \cdot x + 3x$, a nudge of $x$ travels along both, and the
# contributions add: $dy/dx = (x + x) + 3 = 2x + 3$. (The multivariable chain rule: sum over paths.)

# %%
x = 1.25
through_product = x + x  # d(x*x)/dx: each factor, holding the other fixed
through_linear = 3.0
numeric = ((x + 1e-6) ** 2 + 3 * (x + 1e-6) - ((x - 1e-6) ** 2 + 3 * (x - 1e-6))) / 2e-6
check("gradients add over paths: 2x + 3", through_product + through_linear, numeric)

# %% [markdown]
# ## Using the derivative: gradient descent
#
# The derivative points uphill. Stepping against it, $x \leftarrow x - \eta f'(x)$ with a small
# **learning rate** $\eta$, walks down to a minimum. For $f(x) = 3x^2 - 4x + 5$ the minimum is where
# $f'(x) = 0$, at $x^* = 2/3$.

# %%
x, lr = 3.0, 0.05
for step in range(60):
    x = x - lr * f_prime(x)
    if step % 15 == 0:
        print(f"step {step:2d}  x = {x:.6f}  f(x) = {f(x):.6f}")
check("gradient descent finds x* = 2/3", x, 2 / 3, atol=1e-6)

# %% [markdown]
# Each step multiplies the distance to $x^*$ by $(1 - 6\eta) = 0.7$. Try $\eta = 0.4$: the factor is
# $-1.4$, and the iterates oscillate and blow up. Choosing the learning rate, and changing it during
# training, is the subject of lesson 10.
#
# ## Exercises
#
# 1. Redraw the figure for $f(x) = e^x$ at $x = 1$, then for the quadratic $f$ of this lesson. Where is
#    each one's best $h$? Compare with $\sqrt{\epsilon}$ and $\epsilon^{1/3}$ for
#    $\epsilon = 2.2 \times 10^{-16}$. Why has the quadratic's central-difference curve no right arm?
# 2. Derive by hand the derivative of the sigmoid $\sigma(x) = 1 / (1 + e^{-x})$ and show it equals
#    $\sigma(x)(1 - \sigma(x))$. Check it with a central difference.
# 3. Add a second neuron: $L = (\tanh(w_2 \tanh(w_1 x + b_1) + b_2) - t)^2$. Write the backward pass
#    by hand for all four parameters and check each against finite differences.
# 4. Run gradient descent on $f$ with $\eta = 0.3$, $0.33$ and $0.34$. Predict from the factor
#    $(1 - 6\eta)$ which ones converge, and how.
