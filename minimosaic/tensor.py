"""Tensor and reverse-mode automatic differentiation.

A Tensor wraps a raw array (`.data`, NumPy or CuPy) and remembers how it was made: the tensors it came
from (`_parents`) and a function (`_backward`) that turns the gradient of the output into gradients of
those parents. `backward()` visits the recorded graph from the output back to the leaves, in reverse
topological order, and adds each contribution into the leaves' `.grad`.

Every op lives in ops.py as a forward/backward pair; this file only knows how to walk the graph.
Broadcasting is handled here, once: whatever shape an op's backward returns is summed down to the
parent's shape by `sum_to`, so no op has to think about it.
Functions marked @replaceable may be swapped for a faster equivalent by minimosaic.fast (registry.py).
"""
import contextlib

import numpy as np

from . import backend
from .registry import replaceable

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside `with no_grad():` ops record no graph (evaluation, generation, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


@replaceable
def sum_to(grad, shape):
    """Sum `grad` down to `shape`, undoing NumPy broadcasting (the adjoint of broadcast_to)."""
    if grad.shape == tuple(shape):
        return grad
    return grad.sum(axis=broadcast_axes(grad.shape, shape), keepdims=True).reshape(shape)


def broadcast_axes(big, shape):
    """The axes of shape `big` that broadcasting `shape` to it added or stretched."""
    extra = len(big) - len(shape)
    return tuple(range(extra)) + tuple(extra + i for i, n in enumerate(shape) if n == 1 and big[extra + i] != 1)


def _as_array(data, dtype=None):
    """Arrays keep their dtype and device; Python scalars and lists become float32 NumPy arrays."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, (np.ndarray, np.generic)) or backend.device_of(data) == "gpu":
        return data if dtype is None else data.astype(dtype, copy=False)
    return np.asarray(data, dtype=dtype or np.float32)


class Tensor:
    """An array with a gradient. `Tensor(np_array)` keeps the array's dtype; numbers default to float32."""

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward")
    __array_ufunc__ = None  # make `ndarray * Tensor` call Tensor.__rmul__ instead of a NumPy ufunc

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        data = _as_array(data, dtype)
        if device is not None:
            data = backend.to_device(data, device)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = ()
        self._backward = None

    # ----- what the tensor is
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.get_array_module(self.data))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({backend.asnumpy(self.data)!r}{grad})"

    # ----- moving and reading
    def to(self, device):
        """A copy on `device` ('cpu' or 'gpu'); the same tensor if it is already there."""
        if backend.normalize_device(device) == self.device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def numpy(self):
        """The values as a NumPy array on the host."""
        return backend.asnumpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        """The same values, cut from the graph."""
        return Tensor(self.data)

    # ----- autograd
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad`; then free the graph.

        `grad` is the gradient flowing into self (ones by default, so a scalar loss needs none).
        The walk is iterative, so deep graphs never hit Python's recursion limit.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        xp = self.xp
        grads = {id(self): xp.ones_like(self.data) if grad is None else _as_array(grad, self.dtype)}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: keep its gradient, in an array of its own (g may be
                node.grad = g.copy() if node.grad is None else node.grad + g  # shared or read-only)
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                pg = sum_to(pg, parent.shape)
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            node._parents, node._backward = (), _freed  # free the graph and the arrays it holds


def _freed(g):
    """The backward of a node whose graph was freed: a second walk would lose gradients silently."""
    raise RuntimeError("backward() through a graph that an earlier backward() already freed: run the "
                       "forward pass again, or add the losses and call backward() once")


def _topological_order(root):
    """Nodes that require grad, each after all of its parents (iterative depth-first post-order)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in seen)
    return order


def make_result(data, parents, backward):
    """The output of an op: records `parents` and `backward` when a gradient will be needed.

    `backward(g)` returns one gradient per parent (None where there is none), each in the shape of
    the parent or broadcastable to it.
    """
    out = Tensor(data)
    if _grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
    return out
