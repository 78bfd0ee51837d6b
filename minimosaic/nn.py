"""Modules: containers of parameters with a forward(), in the shape PyTorch users know.

A Module finds its parameters by looking at its attributes (Parameters, sub-Modules and lists of
Modules), in the order they were assigned, so `state_dict()` names are stable: 'blocks.0.ln_1.weight'.
Parameters are created on the CPU with NumPy from `init_rng` (seed it with `manual_seed`), then
moved with `model.to('gpu')`, so the same seed gives the same model on every device.
"""
import numpy as np

from . import backend, ops
from .errors import MinimosaicError
from .tensor import Tensor

init_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Seed parameter initialisation (init_rng) and the xp.random state used by dropout."""
    global init_rng
    init_rng = np.random.default_rng(seed)
    backend.seed_everything(seed)


class Parameter(Tensor):
    """A Tensor the optimizer updates: requires_grad is True, and it defaults to float32."""

    def __init__(self, data, dtype=np.float32):
        super().__init__(np.asarray(data, dtype=dtype) if isinstance(data, (list, float, int)) else data,
                         requires_grad=True)


def normal(shape, std, rng=None):
    """A float32 Parameter with entries ~ N(0, std^2)."""
    rng = rng or init_rng
    return Parameter((rng.standard_normal(shape) * std).astype(np.float32))


class Module:
    training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _children(self):
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}.{i}", v

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs, each Parameter once (a tied weight under its first name)."""
        seen, out = set(), []

        def walk(pre, module):
            for name, child in module._children():
                if isinstance(child, Parameter):
                    if id(child) not in seen:
                        seen.add(id(child))
                        out.append((pre + name, child))
                else:
                    walk(pre + name + ".", child)
        walk(prefix, self)
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        """This module and every module below it."""
        found = [self]
        for _, child in self._children():
            if isinstance(child, Module):
                found.extend(child.modules())
        return found

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def train(self, mode=True):
        """Training mode (dropout on); `eval()` turns it off."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None):
        """Move (and/or cast) every parameter in place; returns self."""
        for p in self.parameters():
            if device is not None:
                p.data = backend.to_device(p.data, device)
            if dtype is not None:
                p.data = p.data.astype(dtype)
        return self

    def state_dict(self):
        """{name: array} for every parameter (the arrays themselves, on their device)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters, onto each parameter's device; names and shapes must match."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise MinimosaicError(
                f"weights do not fit this model (missing: {', '.join(missing[:5]) or 'none'}; "
                f"unexpected: {', '.join(unexpected[:5]) or 'none'}); was it saved from another model?")
        for name, p in params.items():  # check every shape first: a refused load changes nothing
            if tuple(state[name].shape) != p.shape:
                raise MinimosaicError(f"weight {name} has shape {tuple(state[name].shape)} but the model "
                                      f"expects {p.shape}; was it saved with another config?")
        for name, p in params.items():
            p.data = backend.to_device(state[name], p.device).astype(p.dtype, copy=True)


class Linear(Module):
    """y = x @ W (+ b).  weight (in_features, out_features), std 1/sqrt(in_features) unless given."""

    def __init__(self, in_features, out_features, bias=False, std=None):
        self.weight = normal((in_features, out_features), std if std is not None else in_features ** -0.5)
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class Embedding(Module):
    """y[..., :] = weight[ids[...]].  weight (num_embeddings, dim), N(0, std^2)."""

    def __init__(self, num_embeddings, dim, std=1.0):
        self.weight = normal((num_embeddings, dim), std)

    def forward(self, ids):
        return ops.embedding(self.weight, ids)


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight (+ bias), over the last axis. weight 1, bias 0."""

    def __init__(self, dim, bias=True, eps=1e-5):
        self.weight = Parameter(np.ones(dim, np.float32))
        self.bias = Parameter(np.zeros(dim, np.float32)) if bias else None
        self.eps = eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Zero each element with probability p while training, scaling the rest by 1/(1-p)."""

    def __init__(self, p=0.0):
        self.p = p

    def forward(self, x):
        return ops.dropout(x, self.p, self.training)
