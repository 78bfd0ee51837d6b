"""Every differentiable op: the forward computation and its backward, side by side.

Each op takes Tensors (or numbers), computes its output from the raw arrays, and hands `make_result`
a `backward(g)` that maps the output's gradient g to one gradient per input. The docstring carries the
equation. `xp` (numpy or cupy) always comes from the arrays, so the same code runs on CPU and GPU.
Gradients that come back in a broadcast shape are summed down by the engine (tensor.sum_to).
Functions marked @replaceable may be swapped for a faster equivalent by minimosaic.fast (registry.py).
"""
import math

from . import backend, precision
from .registry import replaceable
from .tensor import Tensor, make_result


def as_tensor(x, like=None):
    """x as a Tensor; a number takes the dtype and device of `like` (no silent upcast)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and not hasattr(x, "shape"):
        return Tensor(like.xp.asarray(x, dtype=like.dtype))
    return Tensor(x)


def _pair(a, b):
    a = as_tensor(a, like=b if isinstance(b, Tensor) else None)
    return a, as_tensor(b, like=a)


# ---------------------------------------------------------------- elementwise arithmetic
def add(a, b):
    """z = a + b.   dz/da = 1, dz/db = 1 (broadcast shapes are summed back by the engine)."""
    a, b = _pair(a, b)
    return make_result(a.data + b.data, (a, b), lambda g: (g, g))


def sub(a, b):
    """z = a - b.   dz/da = 1, dz/db = -1."""
    a, b = _pair(a, b)
    return make_result(a.data - b.data, (a, b), lambda g: (g, -g))


def mul(a, b):
    """z = a * b.   dz/da = b, dz/db = a."""
    if isinstance(a, Tensor) and isinstance(b, (int, float)):
        # a constant factor goes to the kernel as a number, never to the device as an array
        c = a.dtype.type(b)
        return make_result(a.data * c, (a,), lambda g: (g * c,))
    a, b = _pair(a, b)
    return make_result(a.data * b.data, (a, b), lambda g: (g * b.data, g * a.data))


def div(a, b):
    """z = a / b.   dz/da = 1/b, dz/db = -a/b^2."""
    a, b = _pair(a, b)
    return make_result(a.data / b.data, (a, b),
                       lambda g: (g / b.data, -g * a.data / (b.data * b.data)))


def neg(a):
    """z = -a.   dz/da = -1."""
    return make_result(-a.data, (a,), lambda g: (-g,))


def power(a, p):
    """z = a^p for a constant number p.   dz/da = p a^(p-1)."""
    return make_result(a.data ** p, (a,), lambda g: (g * p * a.data ** (p - 1),))


@replaceable
def matmul(a, b):
    """Z = A @ B over the last two axes, batch axes broadcast.   dA = G B^T,  dB = A^T G."""
    a, b = _pair(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError("matmul needs at least 2-D operands; reshape vectors to (1, n) or (n, 1)")
    low = precision.low_dtype()
    if low is not None:  # mixed precision: products take low-precision operands (precision.py)
        a, b = (astype(t, low) if t.dtype == t.xp.float32 else t for t in (a, b))

    def backward(g):
        return g @ b.data.swapaxes(-1, -2), a.data.swapaxes(-1, -2) @ g
    return make_result(a.data @ b.data, (a, b), backward)


# ---------------------------------------------------------------- elementwise functions
def exp(a):
    """z = e^a.   dz/da = z."""
    out = a.xp.exp(a.data)
    return make_result(out, (a,), lambda g: (g * out,))


def log(a):
    """z = ln a.   dz/da = 1/a."""
    return make_result(a.xp.log(a.data), (a,), lambda g: (g / a.data,))


def sqrt(a):
    """z = sqrt(a).   dz/da = 1 / (2 z)."""
    out = a.xp.sqrt(a.data)
    return make_result(out, (a,), lambda g: (g / (2 * out),))


def tanh(a):
    """z = tanh a.   dz/da = 1 - z^2."""
    out = a.xp.tanh(a.data)
    return make_result(out, (a,), lambda g: (g * (1 - out * out),))


def sigmoid(a):
    """z = 1 / (1 + e^-a).   dz/da = z (1 - z)."""
    xp = a.xp
    out = 0.5 * (1 + xp.tanh(0.5 * a.data))  # same value, no overflow for large |a|
    return make_result(out, (a,), lambda g: (g * out * (1 - out),))


def relu(a):
    """z = max(a, 0).   dz/da = [a > 0]."""
    return make_result(a.xp.maximum(a.data, 0), (a,), lambda g: (g * (a.data > 0),))


def abs(a):  # noqa: A001  (the maths name)
    """z = |a|.   dz/da = sign(a)."""
    return make_result(a.xp.abs(a.data), (a,), lambda g: (g * a.xp.sign(a.data),))


def clip(a, low=None, high=None):
    """z = min(max(a, low), high).   dz/da = 1 inside [low, high], 0 where clipped."""
    out = a.xp.clip(a.data, low, high)
    return make_result(out, (a,), lambda g: (g * (out == a.data),))


@replaceable
def gelu(a):
    """GELU (Hendrycks & Gimpel), exact: z = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard
    normal CDF (torch.nn.GELU's default, as in the official GPT).

    dz/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi), the standard normal density.
    """
    x, xp = a.data, a.xp
    cdf = (1 + backend.erf(x * x.dtype.type(1 / math.sqrt(2)))) / 2
    out = x * cdf

    def backward(g):
        density = xp.exp(-x * x / 2) * x.dtype.type(1 / math.sqrt(2 * math.pi))
        return (g * (cdf + x * density),)
    return make_result(out, (a,), backward)


def astype(a, dtype):
    """z = a converted to `dtype`.   The gradient is converted back."""
    return make_result(a.data.astype(dtype), (a,), lambda g: (g.astype(a.dtype),))


def full_precision(a):
    """a in float32 if it is float16 (the mixed-precision policy keeps some ops in float32: precision.py)."""
    return astype(a, a.xp.float32) if a.dtype == a.xp.float16 else a


# ---------------------------------------------------------------- reductions
def _expand_reduced(g, shape, axis, keepdims):
    """Give g the reduced axes back (as size 1) so it broadcasts against the input."""
    if axis is None or keepdims:
        return g if axis is not None else g.reshape((1,) * len(shape))
    axes = (axis,) if isinstance(axis, int) else axis
    return g.reshape([1 if i in {ax % len(shape) for ax in axes} else n for i, n in enumerate(shape)])


def sum(a, axis=None, keepdims=False):  # noqa: A001
    """z = sum of a over `axis`.   dz/da = 1 (g is broadcast back over the summed axes)."""
    def backward(g):
        return (a.xp.broadcast_to(_expand_reduced(g, a.shape, axis, keepdims), a.shape),)
    return make_result(a.data.sum(axis=axis, keepdims=keepdims), (a,), backward)


def mean(a, axis=None, keepdims=False):
    """z = mean of a over `axis`.   dz/da = 1/n, n the number of averaged elements."""
    axes = range(a.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
    n = math.prod(a.shape[ax] for ax in axes)

    def backward(g):
        return (a.xp.broadcast_to(_expand_reduced(g, a.shape, axis, keepdims) / n, a.shape),)
    return make_result(a.data.mean(axis=axis, keepdims=keepdims), (a,), backward)


def max(a, axis=None, keepdims=False):  # noqa: A001
    """z = max of a over `axis`.   dz/da = 1 at the maximum (shared equally between ties), else 0."""
    out = a.data.max(axis=axis, keepdims=keepdims)

    def backward(g):
        peak = _expand_reduced(out, a.shape, axis, keepdims)
        is_max = (a.data == peak).astype(g.dtype)  # not bool / int: that would be float64
        share = is_max / is_max.sum(axis=axis, keepdims=True)
        return (share * _expand_reduced(g, a.shape, axis, keepdims),)
    return make_result(out, (a,), backward)


def logsumexp(a, axis=-1, keepdims=False):
    """z = log sum_i e^(a_i) = m + log sum_i e^(a_i - m), m = max a.   dz/da = softmax(a)."""
    xp = a.xp
    m = a.data.max(axis=axis, keepdims=True)
    e = xp.exp(a.data - m)
    s = e.sum(axis=axis, keepdims=True)
    out = m + xp.log(s)

    def backward(g):
        return (_expand_reduced(g, a.shape, axis, keepdims) * (e / s),)
    return make_result(out if keepdims else out.squeeze(axis), (a,), backward)


# ---------------------------------------------------------------- shapes
def reshape(a, *shape):
    """z = a viewed with a new shape.   dz/da: g reshaped back."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return make_result(a.data.reshape(shape), (a,), lambda g: (g.reshape(a.shape),))


def transpose(a, *axes):
    """z = a with its axes permuted (reversed when none are given).   dz/da: the inverse permutation."""
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    axes = tuple(ax % a.ndim for ax in axes) if axes else tuple(reversed(range(a.ndim)))
    inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
    return make_result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def swapaxes(a, axis1, axis2):
    """z = a with two axes exchanged (its own inverse)."""
    return make_result(a.data.swapaxes(axis1, axis2), (a,), lambda g: (g.swapaxes(axis1, axis2),))


def expand(a, *shape):
    """z = a broadcast to `shape` (no copy).   dz/da: g summed over the broadcast axes (by sum_to)."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return make_result(a.xp.broadcast_to(a.data, shape), (a,), lambda g: (g,))


def _is_basic_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in items)


def getitem(a, index):
    """z = a[index] (slices, integers, index arrays).   dz/da: g written (or added, for repeated
    indices) back into zeros of a's shape."""
    if isinstance(index, Tensor):
        index = index.data

    def backward(g):
        grad = a.xp.zeros(a.shape, dtype=g.dtype)
        if _is_basic_index(index):
            grad[index] = g
        else:
            backend.scatter_add(grad, index, g)
        return (grad,)
    return make_result(a.data[index], (a,), backward)


def concatenate(tensors, axis=0):
    """z = [a; b; ...] joined along `axis`.   dz/da_i: the slice of g that a_i filled."""
    tensors = [as_tensor(t) for t in tensors]
    xp = tensors[0].xp
    ends = [0]
    for t in tensors:
        ends.append(ends[-1] + t.shape[axis])

    def backward(g):
        return tuple(xp.split(g, ends[1:-1], axis=axis))
    return make_result(xp.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), backward)


def stack(tensors, axis=0):
    """z = the tensors stacked along a new `axis`.   dz/da_i = g[..., i, ...]."""
    tensors = [as_tensor(t) for t in tensors]
    xp = tensors[0].xp

    def backward(g):
        return tuple(xp.moveaxis(g, axis, 0))
    return make_result(xp.stack([t.data for t in tensors], axis=axis), tuple(tensors), backward)


def pad(a, widths, axis=-1):
    """Zero-pad along one axis: widths = (before, after), each >= 0.   dz/da: the middle of g."""
    before, after = widths
    axis = axis % a.ndim
    pad_widths = [(0, 0)] * a.ndim
    pad_widths[axis] = (before, after)
    middle = [slice(None)] * a.ndim
    middle[axis] = slice(before, before + a.shape[axis])
    return make_result(a.xp.pad(a.data, pad_widths), (a,), lambda g: (g[tuple(middle)],))


def shift(a, offset, axis=-1):
    """z_t = a_{t - offset} along `axis`, zeros where that falls outside (same shape as a).

    offset = 1 delays by one step; offset = -1 peeks one step ahead (z_t = a_{t+1}, z_last = 0).
    dz/da is the opposite shift of g.
    """
    n = a.shape[axis]
    if offset >= 0:
        return getitem(pad(a, (offset, 0), axis), _axis_slice(a.ndim, axis, 0, n))
    return getitem(pad(a, (0, -offset), axis), _axis_slice(a.ndim, axis, -offset, n - offset))


def _axis_slice(ndim, axis, start, stop):
    index = [slice(None)] * ndim
    index[axis % ndim] = slice(start, stop)
    return tuple(index)


def where(condition, a, b):
    """z = a where condition else b (condition: a boolean array).   dz/da = [cond], dz/db = [not cond]."""
    a, b = _pair(a, b)
    cond = condition.data if isinstance(condition, Tensor) else condition
    xp = a.xp
    return make_result(xp.where(cond, a.data, b.data), (a, b),
                       lambda g: (xp.where(cond, g, 0), xp.where(cond, 0, g)))


def masked_fill(a, mask, value):
    """z = value where mask else a."""
    return where(mask, value, a)


# ---------------------------------------------------------------- softmax family
def softmax(a, axis=-1, mask=None):
    """y_i = e^(a_i - m) / sum_j e^(a_j - m), m = max a (stability; it cancels).

    With `mask` (boolean, True = may attend) masked entries get y_i = 0 and a fully masked row is all
    zeros rather than NaN.   dy/da: da = y * (g - sum_j g_j y_j).
    """
    a = full_precision(a)
    xp = a.xp
    x = a.data if mask is None else xp.where(mask, a.data, -xp.inf)
    m = x.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)  # a fully masked row has m = -inf
    e = xp.exp(x - m)
    s = e.sum(axis=axis, keepdims=True)
    y = e / xp.where(s == 0, 1, s)

    def backward(g):
        return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)
    return make_result(y, (a,), backward)


def log_softmax(a, axis=-1):
    """y = a - logsumexp(a).   da = g - softmax(a) * sum(g)."""
    a = full_precision(a)
    xp = a.xp
    m = a.data.max(axis=axis, keepdims=True)
    shifted = a.data - m
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return make_result(y, (a,), backward)


@replaceable
def cross_entropy(logits, targets, ignore_index=-1):
    """Mean over counted rows of  -log softmax(logits)[target],  rows with target == ignore_index skipped.

    logits (..., V), targets (...) integer array.   dlogits = (softmax - onehot(target)) / n_counted.
    """
    logits = full_precision(logits)
    xp = logits.xp
    targets = targets.data if isinstance(targets, Tensor) else targets
    z = logits.data.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    safe_t = xp.where(keep, t, 0)
    rows = xp.arange(len(t))
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    losses = (m[:, 0] + xp.log(s[:, 0])) - z[rows, safe_t]
    count = xp.maximum(keep.sum(), 1).astype(z.dtype)  # an array: no host sync on a GPU
    loss = (losses * keep).sum() / count

    def backward(g):
        grad = e / s
        grad[rows, safe_t] -= 1
        grad *= (keep[:, None] * (g / count)).astype(grad.dtype)
        return (grad.reshape(logits.shape),)
    return make_result(loss.astype(logits.dtype), (logits,), backward)


# ---------------------------------------------------------------- layers as ops
@replaceable
def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """y = xhat * w + b,  xhat = (x - mean) r,  r = 1 / sqrt(var + eps), statistics over the last axis.

    With dxhat = g * w:   dx = r (dxhat - mean(dxhat) - xhat mean(dxhat * xhat)),  dw = g xhat,  db = g
    (dw and db are summed over the leading axes by the engine).
    """
    x = full_precision(x)
    xp, data = x.xp, x.data
    centered = data - data.mean(axis=-1, keepdims=True)
    rstd = 1 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)             # (..., 1)
    xhat = centered * rstd
    out = xhat if weight is None else xhat * weight.data
    if bias is not None:
        out = out + bias.data
    params = tuple(p for p in (weight, bias) if p is not None)

    def backward(g):
        dxhat = g if weight is None else g * weight.data
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        grads = [dx]
        if weight is not None:
            grads.append(g * xhat)
        if bias is not None:
            grads.append(g)
        return tuple(grads)
    return make_result(out, (x,) + params, backward)


@replaceable
def embedding(weight, ids):
    """z[..., :] = W[ids[...], :] (a row lookup).   dW: g rows added into the looked-up rows."""
    ids = ids.data if isinstance(ids, Tensor) else ids

    def backward(g):
        grad = weight.xp.zeros(weight.shape, dtype=g.dtype)
        return (backend.scatter_add(grad, ids.reshape(-1), g.reshape(-1, weight.shape[-1])),)
    return make_result(weight.data[ids], (weight,), backward)


def dropout(a, p, training=True):
    """z = a * mask / (1 - p), mask_i ~ Bernoulli(1 - p); identity when not training or p = 0.

    dz/da = mask / (1 - p). The mask comes from xp.random's global state (seeded by
    backend.seed_everything and saved in checkpoints, so a resumed run draws the same masks).
    """
    if not training or p == 0:
        return a
    keep = (a.xp.random.random_sample(a.shape) >= p).astype(a.dtype) / a.dtype.type(1 - p)
    return make_result(a.data * keep, (a,), lambda g: (g * keep,))


# ---------------------------------------------------------------- Tensor methods and operators
def _install_methods():
    def flip(op):
        return lambda self, other: op(other, self)

    methods = {
        "__add__": add, "__radd__": flip(add), "__sub__": sub, "__rsub__": flip(sub),
        "__mul__": mul, "__rmul__": flip(mul), "__truediv__": div, "__rtruediv__": flip(div),
        "__neg__": neg, "__pow__": power, "__matmul__": matmul, "__rmatmul__": flip(matmul),
        "__getitem__": getitem, "exp": exp, "log": log, "sqrt": sqrt, "tanh": tanh,
        "sigmoid": sigmoid, "relu": relu, "gelu": gelu, "abs": abs, "clip": clip, "astype": astype,
        "sum": sum, "mean": mean, "max": max, "logsumexp": logsumexp, "reshape": reshape,
        "transpose": transpose, "permute": transpose, "swapaxes": swapaxes, "expand": expand,
        "softmax": softmax, "log_softmax": log_softmax,
    }
    for name, op in methods.items():
        setattr(Tensor, name, op)
    Tensor.T = property(lambda self: transpose(self))


_install_methods()
