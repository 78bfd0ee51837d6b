"""Mixed precision: the policy (which ops compute in which dtype) and dynamic loss scaling.

The policy, written out (torch.autocast's, made explicit): inside `autocast("fp16")`

    matrix products       their float32 operands are cast down to float16 (ops.matmul)
    activations           whatever dtype the op before produced (float16 after a product)
    kept in float32       softmax and its normalisers, layer-norm statistics, normalize, the leaky-average
                          accumulator, the cross-entropy loss: their float16 inputs are cast up first
    parameters, AdamW     float32 "master weights" and moments: the casts are ops, so each gradient
                          flows back to its float32 parameter

float16 keeps 11 significant bits and reaches only 65504 (and 6e-8 in subnormals): a gradient smaller than
that becomes 0. Dynamic loss scaling (`LossScaler`) multiplies the loss by a large scale before backward,
so small gradients stay representable, divides the float32 gradients by it afterwards, and skips a step
whose gradients overflowed (inf or nan), halving the scale; after `growth_interval` good steps in a row it
doubles the scale again.
"""
import contextlib
import math

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "fp64")  # fp64: weights and every op in float64, for exact checks
_low = None   # the dtype matrix products compute in, inside autocast (None: as the inputs are)


def low_dtype():
    """float16 inside autocast('fp16'), else None."""
    return _low


@contextlib.contextmanager
def autocast(precision="fp32"):
    """Inside, the policy above for `precision` ('fp32' and 'fp64': nothing changes, the ops compute in
    the weights' dtype; 'fp16'); afterwards as before."""
    global _low
    if precision not in ("fp32", "fp16", "fp64"):
        raise ValueError(f"autocast({precision!r}): only 'fp32', 'fp16' and 'fp64' are implemented")
    before, _low = _low, (np.float16 if precision == "fp16" else None)
    try:
        yield
    finally:
        _low = before


class LossScaler:
    """Dynamic loss scaling: `scale` multiplies the loss; `unscale(params)` divides the gradients by it
    and says whether they are finite; `update(finite)` halves the scale after an overflow, doubles it
    after `growth_interval` finite steps in a row."""

    def __init__(self, scale=2.0 ** 16, growth_interval=2000, growth=2.0, backoff=0.5):
        self.scale, self.growth_interval, self.growth, self.backoff = float(scale), growth_interval, growth, backoff
        self.good_steps, self.skipped_steps = 0, 0

    def unscale(self, params):
        """g <- g / scale for every parameter's gradient; True when they are all finite (one host sync)."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return True
        for p in with_grad:
            p.grad = p.grad / p.grad.dtype.type(self.scale)  # a new array: gradients may be shared
        xp = with_grad[0].xp
        return bool(xp.stack([xp.isfinite(p.grad).all() for p in with_grad]).all())

    def update(self, finite):
        if not finite:
            self.scale *= self.backoff
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth, 2.0 ** 24)
            self.good_steps = 0

    def state(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state(self, state):
        self.scale = float(state["scale"])
        self.good_steps, self.skipped_steps = int(state["good_steps"]), int(state["skipped_steps"])
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"loss scale {self.scale} in the checkpoint is not a positive number")
