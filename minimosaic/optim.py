"""Optimisers, gradient clipping and learning-rate schedules, written out step by step.

AdamW (Loshchilov & Hutter; the same update as torch.optim.AdamW), for each parameter p with grad g
at step t (t counts from 1):

    p <- p - lr * wd * p                      decoupled weight decay (only in groups with wd > 0)
    m <- b1 m + (1 - b1) g                    first moment
    v <- b2 v + (1 - b2) g^2                  second moment
    p <- p - lr * mhat / (sqrt(vhat) + eps),  mhat = m / (1 - b1^t),  vhat = v / (1 - b2^t)

Weight decay goes to matrices only (`weight_decay_groups`): shrinking a gain, a bias or a per-head
scalar towards zero has no regularising meaning, it only fights the parameter.
Functions marked @replaceable may be swapped for a faster equivalent by minimosaic.fast (registry.py).
"""
import math

from . import backend
from .registry import replaceable


def is_matrix(param):
    """True when at least two axes have size > 1 (weights, embeddings, memory slots; not gains/scalars)."""
    return sum(n > 1 for n in param.shape) >= 2



def weight_decay_groups(named_parameters, weight_decay):
    """Two parameter groups: matrices with `weight_decay`, everything else with none."""
    named_parameters = list(named_parameters)
    return [
        {"params": [p for _, p in named_parameters if is_matrix(p)], "weight_decay": weight_decay},
        {"params": [p for _, p in named_parameters if not is_matrix(p)], "weight_decay": 0.0},
    ]


def _as_groups(params, **defaults):
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    return [{**defaults, **g} for g in groups]


class Optimizer:
    def __init__(self, groups):
        self.param_groups = groups
        self.steps = 0

    def parameters(self):
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None


class AdamW(Optimizer):
    """AdamW with bias correction and decoupled weight decay; `step(lr)` takes the scheduled rate."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(_as_groups(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.m = [p.xp.zeros_like(p.data) for p in self.parameters()]
        self.v = [p.xp.zeros_like(p.data) for p in self.parameters()]

    def step(self, lr=None):
        """One update of every parameter that has a gradient (lr: this step's rate, else the group's)."""
        self.steps += 1
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                m, v = self.m[i], self.v[i]
                i += 1
                if p.grad is not None:
                    adamw_update(p.data, p.grad, m, v, group["lr"] if lr is None else lr, group["betas"],
                                 group["eps"], group["weight_decay"], self.steps)

    def state_dict(self):
        return {"steps": self.steps, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        for mine, theirs in ((self.m, state["m"]), (self.v, state["v"])):
            for k, array in enumerate(theirs):
                mine[k] = backend.to_device(array, backend.device_of(mine[k])).astype(mine[k].dtype, copy=True)


@replaceable
def adamw_update(p, g, m, v, lr, betas, eps, weight_decay, t):
    """The AdamW update of one parameter array p (gradient g, moments m, v) at step t, in place."""
    xp, (b1, b2) = backend.get_array_module(p), betas
    if weight_decay:
        p *= 1 - lr * weight_decay                                 # decoupled weight decay
    m *= b1
    m += (1 - b1) * g                                              # m = b1 m + (1 - b1) g
    v *= b2
    v += (1 - b2) * (g * g)                                        # v = b2 v + (1 - b2) g^2
    denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t) + eps              # sqrt(vhat) + eps
    p -= (lr / (1 - b1 ** t)) * (m / denom)                        # lr mhat / (sqrt(vhat) + eps)


class SGD(Optimizer):
    """SGD with momentum:  b <- mu b + g;  p <- p - lr b  (plain SGD when momentum = 0)."""

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(_as_groups(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.buffers = [None for _ in self.parameters()]

    def step(self, lr=None):
        self.steps += 1
        i = 0
        for group in self.param_groups:
            rate = group["lr"] if lr is None else lr
            for p in group["params"]:
                g, k = p.grad, i
                i += 1
                if g is None:
                    continue
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p.data
                if group["momentum"]:
                    self.buffers[k] = g if self.buffers[k] is None else group["momentum"] * self.buffers[k] + g
                    g = self.buffers[k]
                p.data -= rate * g


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before.

    norm = sqrt(sum_p |g_p|^2);  g <- g * min(1, max_norm / (norm + 1e-6)).
    The norm stays an array (no host sync on a GPU); float() it when you log.
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = grads[0].xp
    norm = xp.sqrt(sum((p.grad * p.grad).sum() for p in grads))  # in the grads' own dtype (float64 stays)
    if max_norm and max_norm > 0:
        scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(grads[0].grad.dtype)
        for p in grads:
            p.grad = p.grad * scale  # a new array: gradients may be shared between parameters
    return norm


class CosineSchedule:
    """Linear warmup to max_lr, then cosine decay to min_lr at total_steps, then min_lr (nanoGPT's get_lr).

    lr(s) = max_lr (s + 1) / (warmup + 1)                              for s < warmup
    lr(s) = min_lr + (max_lr - min_lr) (1 + cos(pi r)) / 2,  r = (s - warmup) / (total - warmup)
    lr(s) = min_lr                                                     for s > total
    """

    def __init__(self, max_lr, min_lr, warmup_steps, total_steps):
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / (self.warmup_steps + 1)
        if step > self.total_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (self.max_lr - self.min_lr)


class ConstantSchedule:
    """lr(s) = lr."""

    def __init__(self, lr):
        self.lr = lr

    def __call__(self, step):
        return self.lr
