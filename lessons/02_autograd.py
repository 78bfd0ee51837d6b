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
# # Lesson 2: tensors, broadcasting and reverse-mode autograd
#
# In lesson 1 we wrote every backward pass by hand. That does not scale to a model with a hundred
# operations, so we let the computer do the bookkeeping: each operation records **where its output came
# from** and **how to send a gradient back** through it. Walking that record backwards from the loss
# is **reverse-mode automatic differentiation** (backpropagation).
#
# Plan: build a tiny engine over scalars ourselves (in the spirit of Karpathy's *micrograd*), then meet
# `minimosaic.Tensor`, which does the same over whole arrays, and check that they agree.

# %%
import inspect
import math

import numpy as np

import minimosaic as mm
from minimosaic import ops
from minimosaic.tensor import sum_to
from _check import check, expect, figure, promise_figures, show

promise_figures("computation_graph", "autograd_vs_finite_differences")

# %% [markdown]
# ## A scalar engine in fifty lines
#
# A `Value` holds a number `data`, its gradient `grad` = $\partial L / \partial \text{this}$ (filled in by
# `backward`), the values it was computed from (`_prev`), and a closure `_backward` that applies the
# chain rule locally: given `out.grad`, add each input's share into its `.grad`. We **add** (`+=`)
# because a value used twice receives gradient along both paths (lesson 1).

# %%
class Value:
    def __init__(self, data, _prev=()):
        self.data = float(data)
        self.grad = 0.0
        self._prev = _prev
        self._backward = lambda: None

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other))

        def _backward():  # d(a + b)/da = 1, d(a + b)/db = 1
            self.grad += out.grad
            other.grad += out.grad
        out._backward = _backward
        return out

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other))

        def _backward():  # d(a b)/da = b, d(a b)/db = a
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad
        out._backward = _backward
        return out

    def __pow__(self, p):  # p a plain number
        out = Value(self.data**p, (self,))

        def _backward():  # d(a^p)/da = p a^(p-1)
            self.grad += p * self.data ** (p - 1) * out.grad
        out._backward = _backward
        return out

    def tanh(self):
        t = math.tanh(self.data)
        out = Value(t, (self,))

        def _backward():  # d tanh(a)/da = 1 - tanh(a)^2
            self.grad += (1 - t * t) * out.grad
        out._backward = _backward
        return out

    def exp(self):
        e = math.exp(self.data)
        out = Value(e, (self,))

        def _backward():  # d e^a/da = e^a
            self.grad += e * out.grad
        out._backward = _backward
        return out

    # the rest are built from the ops above, so they need no backward of their own
    __radd__ = __add__
    __rmul__ = __mul__

    def __neg__(self):
        return self * -1

    def __sub__(self, other):
        return self + (-other)

    def __truediv__(self, other):
        return self * other**-1

    def backward(self):
        # order the graph so every node comes after everything it was computed from ...
        order, seen = [], set()

        def visit(v):
            if id(v) not in seen:
                seen.add(id(v))
                for p in v._prev:
                    visit(p)
                order.append(v)
        visit(self)
        # ... then apply the chain rule from the output back to the leaves
        self.grad = 1.0  # dL/dL
        for v in reversed(order):
            v._backward()

    def __repr__(self):
        return f"Value(data={self.data:.4f}, grad={self.grad:.4f})"

# %% [markdown]
# ### The neuron of lesson 1, differentiated automatically
#
# $L = (\tanh(w x + b) - t)^2$. In lesson 1 we derived $\partial L/\partial w = 2(o - t)(1 - o^2)\,x$ by
# hand; now `backward()` finds it by itself.

# %%
x, w, b, t = Value(1.5), Value(-0.8), Value(0.3), Value(0.5)
o = (w * x + b).tanh()
L = (o - t) ** 2
L.backward()

o_ = math.tanh(-0.8 * 1.5 + 0.3)
check("Value: dL/dw vs lesson 1 by hand", w.grad, 2 * (o_ - 0.5) * (1 - o_**2) * 1.5)
check("Value: dL/db vs lesson 1 by hand", b.grad, 2 * (o_ - 0.5) * (1 - o_**2))
check("Value: dL/dx vs lesson 1 by hand", x.grad, 2 * (o_ - 0.5) * (1 - o_**2) * -0.8)

# %% [markdown]
# ### The graph that `backward` walked
#
# The forward pass above recorded a graph, one node per `Value`, linked by `_prev`. Below it is drawn
# from those very links: each box shows the node's `data`, computed left to right, and its `grad`,
# filled in right to left by `backward()`, starting from $\partial L / \partial L = 1$. Look for:
#
# * every gradient is the one to its right times a local derivative: at $z$,
#   $\partial L / \partial o \cdot (1 - o^2)$; at $w$, $\partial L / \partial (w x) \cdot x$;
# * our `Value` has no subtraction, so `o - t` is really `o + (t * -1)`: the graph holds a node for
#   $-t$ and a leaf for the constant $-1$, which receives a gradient like any other leaf (nobody reads it).
#
# We name the nodes by following `_prev` from `L` back to the leaves, and check the numbers in three
# boxes against lesson 1's formulas before drawing.

# %%
diff = L._prev[0]  # o - t, built by __sub__ as o + (-t)
z = o._prev[0]
node_names = {x: "x", w: "w", b: "b", t: "t", z._prev[0]: "w * x", z: "z = w x + b", o: "o = tanh z",
              diff._prev[1]: "-t = t * -1", diff._prev[1]._prev[1]: "-1", diff: "o - t", L: "L = (o - t)^2"}
depth, row = {}, {}  # column = longest path from a leaf; leaves stacked in order, others between parents


def place(v):
    for p in v._prev:
        if p not in depth:
            place(p)
    depth[v] = 1 + max((depth[p] for p in v._prev), default=-1)
    row[v] = float(np.mean([row[p] for p in v._prev])) if v._prev else float(sum(not u._prev for u in row))


place(L)
expect("the graph: 11 nodes, 5 of them leaves", (len(depth), sum(not v._prev for v in depth)) == (11, 5),
       f"{len(depth)} nodes: {', '.join(node_names[v] for v in depth)}")
check("graph: dL/dL = 1", L.grad, 1.0)
check("graph: dL/do = 2 (o - t)", o.grad, 2 * (o.data - t.data))
check("graph: dL/dz = dL/do (1 - o^2)", z.grad, o.grad * (1 - o.data**2))

# %%
fig, axes = figure(size=(11.0, 4.2))
ax = axes[0, 0]
boxes = {}
for v in depth:
    colour = "#cfe8cf" if not v._prev else ("#f6d5a8" if v is L else "#d6e4f5")
    boxes[v] = ax.text(depth[v], -row[v], f"{node_names[v]}\ndata {v.data:+.3f}\ngrad {v.grad:+.3f}",
                       ha="center", va="center", fontsize=9, family="monospace",
                       bbox=dict(boxstyle="round,pad=0.4", facecolor=colour, edgecolor="gray"))
ax.set_xlim(-0.5, max(depth.values()) + 0.5)
ax.set_ylim(-max(row.values()) - 0.6, 0.6)
ax.axis("off")
fig.canvas.draw()  # lay the boxes out, so that the arrows can end at their edges
for v in depth:
    for p in v._prev:
        ax.annotate("", xy=(depth[v], -row[v]), xytext=(depth[p], -row[p]),
                    arrowprops=dict(arrowstyle="-|>", color="gray", patchA=boxes[p].get_bbox_patch(),
                                    patchB=boxes[v].get_bbox_patch()))
ax.set_title("The neuron's graph: data flows right (forward), grad flows left (backward); green = leaves")
show(fig, "computation_graph")

# %% [markdown]
# A value used twice: $y = a \cdot a + e^a$ gives $dy/da = 2a + e^a$. Thanks to `+=` both paths count.
# (Replace `+=` by `=` in `__mul__` and this check fails: a classic bug.)

# %%
a = Value(0.6)
y = a * a + a.exp()
y.backward()
check("Value: a used three times, 2a + e^a", a.grad, 2 * 0.6 + math.exp(0.6))

# %% [markdown]
# ### The gradient is the slope, everywhere
#
# One point proves little. Sweep $w$ from $-3$ to $3$ (keeping $x$, $b$, $t$), build the neuron's graph
# afresh at each $w$, call `backward()`, and compare `w.grad` with a central difference of the plain
# loss (lesson 1). On the left, $L(w)$ with short segments of slope `w.grad`: each one should lie
# along the curve. On the right, the gradient itself: the autograd line should pass through every
# finite-difference dot. Notice also the flat tails: where $\tanh$ saturates ($|w x + b|$ large), the
# gradient all but vanishes, and gradient descent would barely move $w$.

# %%
def neuron_loss_and_grad(w_value, x_value=1.5, b_value=0.3, target=0.5):
    wv = Value(w_value)
    loss_v = ((wv * x_value + b_value).tanh() - target) ** 2
    loss_v.backward()
    return loss_v.data, wv.grad


sweep = np.linspace(-3.0, 3.0, 41)
losses, grads = np.array([neuron_loss_and_grad(v) for v in sweep]).T
eps = 1e-6
numeric = np.array([(neuron_loss_and_grad(v + eps)[0] - neuron_loss_and_grad(v - eps)[0]) / (2 * eps)
                    for v in sweep])
check("autograd dL/dw vs central differences, w in [-3, 3]", grads, numeric)
lowest = int(losses.argmin())
expect("dL/dw changes sign once, at the lowest L", np.count_nonzero(np.diff(np.sign(grads))) == 1
       and grads[lowest - 1] < 0 < grads[lowest + 1], f"lowest L at w = {sweep[lowest]:.2f}")
expect("flat tails: |dL/dw| at w = +-3 below 1% of its peak",
       max(abs(grads[0]), abs(grads[-1])) < 0.01 * np.abs(grads).max(),
       f"{abs(grads[0]):.1e}, {abs(grads[-1]):.1e} vs peak {np.abs(grads).max():.2f}")

# %%
fig, axes = figure(ncols=2)
ax = axes[0, 0]
ax.plot(sweep, losses, color="black", label="L(w)")
half = np.array([-0.25, 0.25])
for i in range(0, len(sweep), 5):
    ax.plot(sweep[i] + half, losses[i] + grads[i] * half, color="tab:red", lw=2,
            label="slope = w.grad" if i == 0 else None)
ax.set_xlabel("w")
ax.set_ylabel("L = (tanh(1.5 w + 0.3) - 0.5)²")
ax.set_title("The loss, with autograd's tangents")
ax.legend()
ax = axes[0, 1]
ax.plot(sweep, grads, color="tab:red", label="autograd: w.grad")
ax.plot(sweep, numeric, "o", ms=4, mfc="none", color="black", label="central difference")
ax.axhline(0, color="gray", lw=0.5)
ax.set_xlabel("w")
ax.set_ylabel("dL/dw")
ax.set_title("Autograd vs finite differences")
ax.legend()
show(fig, "autograd_vs_finite_differences")

# %% [markdown]
# ## Why arrays
#
# One `Value` per number means one Python object and one closure per multiply: a 128 x 128 matrix
# product would build two million of them. Real engines let each node hold a whole **array** (a
# tensor) and write the backward of each op in array form, e.g. for $Z = A B$:
#
# $$\frac{\partial L}{\partial A} = \frac{\partial L}{\partial Z} B^\top, \qquad
#   \frac{\partial L}{\partial B} = A^\top \frac{\partial L}{\partial Z}.$$
#
# (Check the shapes: $G$ is $(n, m)$, $B$ is $(k, m)$, so $G B^\top$ is $(n, k)$ like $A$.)
#
# ## Broadcasting, and its adjoint
#
# NumPy lets arrays of different shapes combine by **broadcasting**: shapes are aligned from the right,
# and an axis of size 1 (or a missing axis) is repeated to match. A bias `b` of shape `(4,)` added to
# `X` of shape `(3, 4)` is added to every row.

# %%
X = np.arange(12.0).reshape(3, 4)
bias = np.array([10.0, 20.0, 30.0, 40.0])
col = np.array([[1.0], [2.0], [3.0]])
print("(3, 4) + (4,)   ->", (X + bias).shape)
print("(3, 1) + (4,)   ->", (col + bias).shape)
print("(3, 4) * (3, 1) ->", (X * col).shape)

# %% [markdown]
# Since `b` was used once per row, its gradient is the **sum** of the output gradient over the rows
# (gradients add over uses). In general: the gradient of a broadcast input is the output gradient
# **summed over the broadcast axes**, then reshaped. minimosaic does this in one place,
# `minimosaic.tensor.sum_to`, so no op has to think about broadcasting.

# %%
G = np.random.default_rng(0).standard_normal((2, 3, 4))  # a gradient of shape (2, 3, 4)
check("sum_to (2,3,4) -> (4,)", sum_to(G, (4,)), G.sum(axis=(0, 1)))
check("sum_to (2,3,4) -> (3,1)", sum_to(G, (3, 1)), G.sum(axis=(0, 2)).reshape(3, 1))
check("sum_to (2,3,4) -> (1,3,4)", sum_to(G, (1, 3, 4)), G.sum(axis=0, keepdims=True))

# %% [markdown]
# ## minimosaic.Tensor
#
# `minimosaic.Tensor` wraps an array (`.data`), has a `.grad` and a `backward()`, and overloads the
# operators, just like our `Value`. Each op lives in `minimosaic/ops.py` with its forward and backward
# side by side. Here is one, the product:

# %%
print(inspect.getsource(ops.mul))

# %% [markdown]
# `make_result(data, parents, backward)` is our `Value.__init__` plus `_backward` in one call: it records
# the parents and a function that maps the output gradient `g` to one gradient per parent.
#
# Two differences from `Value`: `backward` *returns* gradients instead of adding them (the engine adds
# them up and applies `sum_to`), and a `Tensor` keeps the dtype of a NumPy array it is given (Python
# numbers become float32, the default for models). We use float64 here to compare at full precision.
#
# First the same neuron, now with Tensors:

# %%
def t64(v):
    return mm.Tensor(np.array(v, dtype=np.float64), requires_grad=True)


xt, wt, bt = t64(1.5), t64(-0.8), t64(0.3)
Lt = ((wt * xt + bt).tanh() - 0.5) ** 2
Lt.backward()
check("Tensor vs Value: L", Lt.item(), L.data)
check("Tensor vs Value: dL/dw", wt.grad, w.grad)
check("Tensor vs Value: dL/db", bt.grad, b.grad)
check("Tensor vs Value: dL/dx", xt.grad, x.grad)

# %% [markdown]
# ### A layer of neurons on a batch
#
# Now many inputs at once: $X$ is $(N, 3)$, $W$ is $(3, 2)$, $b$ is $(2,)$ (broadcast over the batch),
#
# $$O = \tanh(X W + b), \qquad L = \operatorname{mean}\,(O - T)^2.$$
#
# By hand, in array form, going backwards: $\partial L/\partial O = 2(O - T)/n$ with $n = 2N$ entries,
# $\partial L/\partial Z = \partial L/\partial O \odot (1 - O^2)$, $\partial L/\partial W = X^\top
# \partial L/\partial Z$, $\partial L/\partial b = \sum_{\text{rows}} \partial L/\partial Z$ (the
# broadcast adjoint), $\partial L/\partial X = \partial L/\partial Z\, W^\top$.

# %%
rng = np.random.default_rng(1)
N = 5
X_np, W_np, b_np, T_np = (rng.standard_normal(s) for s in [(N, 3), (3, 2), (2,), (N, 2)])

X_t, W_t, b_t = (mm.Tensor(a.copy(), requires_grad=True) for a in (X_np, W_np, b_np))
O_t = (X_t @ W_t + b_t).tanh()
loss = ((O_t - T_np) ** 2).mean()
loss.backward()

out = np.tanh(X_np @ W_np + b_np)
dO = 2 * (out - T_np) / out.size
dZ = dO * (1 - out**2)
check("batch: loss", loss, ((out - T_np) ** 2).mean())
check("batch: dL/dW = X^T dZ", W_t.grad, X_np.T @ dZ)
check("batch: dL/db = sum over rows of dZ", b_t.grad, dZ.sum(axis=0))
check("batch: dL/dX = dZ W^T", X_t.grad, dZ @ W_np.T)

# %% [markdown]
# And, for a third opinion, the same layer built from our scalar `Value`s, one multiply at a time
# (this is what the array version saves us from):

# %%
Xv = [[Value(v) for v in row] for row in X_np]
Wv = [[Value(v) for v in row] for row in W_np]
bv = [Value(v) for v in b_np]
terms = []
for i in range(N):
    for j in range(2):
        z = bv[j]
        for k in range(3):
            z = z + Xv[i][k] * Wv[k][j]
        terms.append((z.tanh() - float(T_np[i, j])) ** 2)
Lv = terms[0]
for term in terms[1:]:
    Lv = Lv + term
Lv = Lv / len(terms)
Lv.backward()
check("Value engine vs Tensor: dL/dW", [[v.grad for v in row] for row in Wv], W_t.grad)
check("Value engine vs Tensor: dL/db", [v.grad for v in bv], b_t.grad)

# %% [markdown]
# ## Two practical details
#
# **Gradients accumulate.** `backward()` *adds* into `.grad` (that is how a parameter used in several
# places gets all its gradient). So before the next backward pass, reset them (`p.grad = None`), or
# the old gradient is counted twice.

# %%
before = W_t.grad.copy()
loss2 = (((X_t @ W_t + b_t).tanh() - T_np) ** 2).mean()
loss2.backward()
check("second backward without reset doubles .grad", W_t.grad, 2 * before)
W_t.grad = None

# %% [markdown]
# **Not every computation needs a graph.** Recording parents and closures costs memory. When we only
# evaluate (or update parameters), `with mm.no_grad():` turns recording off.

# %%
with mm.no_grad():
    evaluated = (X_t @ W_t + b_t).tanh()
expect("no graph under no_grad", not evaluated.requires_grad, f"requires_grad = {evaluated.requires_grad}")
expect("a graph outside it", (X_t @ W_t).requires_grad, "")

# %% [markdown]
# ## Exercises
#
# 1. Add `relu` and `log` to `Value` and check them against finite differences (lesson 1).
# 2. Our `Value.backward` is recursive: a chain of 5000 additions overflows Python's stack. Rewrite the
#    topological sort with an explicit stack (compare with `_topological_order` in
#    `minimosaic/tensor.py`).
# 3. Read `ops.matmul` and `ops.sum` in `minimosaic/ops.py`. Why does `sum` need `broadcast_to` in its
#    backward, while `add` needs nothing for broadcasting?
# 4. What is the gradient of `X.max(axis=1).sum()` when a row has two equal maxima? Read `ops.max` to
#    see the convention minimosaic picks, and argue why any convex combination would be "correct".
