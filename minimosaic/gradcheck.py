"""Gradient checking: compare backward() with central finite differences, in float64.

For a function f of tensors that returns a tensor, we check the scalar L = sum(f(inputs) * R) with a
fixed random R, so outputs of any shape are covered. The numerical derivative of L along a direction u
is the central difference

    (L(x + eps u) - L(x - eps u)) / (2 eps)        (error O(eps^2))

and it must match sum(grad_x L * u) within |expected - got| <= atol + rtol |expected|.

Why float64: with eps = 1e-6 the difference of two float32 losses has only ~1 correct digit left
(float32 keeps ~7 significant digits, and we divide their difference by 2e-6); float64 keeps ~16, so
about 10 digits survive. Defaults: eps = 1e-6, atol = 1e-5, rtol = 1e-3.

mode='full': u runs over every element of every input (exact, for small inputs: 2 calls per element).
mode='random': `directions` random unit directions over all inputs at once (for large tensors).
"""
import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """Raised when backward() disagrees with finite differences; the message names where."""


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, mode="full", directions=8, seed=0,
              names=None):
    """Check fn's backward against finite differences; raises GradcheckError, returns True if all agree.

    inputs: float64 Tensors; those with requires_grad are checked. names: optional labels per input.
    """
    inputs = list(inputs)
    names = names or [f"input {i}" for i in range(len(inputs))]
    checked = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck has nothing to check: give at least one input requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs; {names[i]} is {inputs[i].dtype}")
    rng = np.random.default_rng(seed)
    xp = inputs[checked[0]].xp
    out = fn(*inputs)
    weights = xp.asarray(rng.standard_normal(out.shape))  # L = sum(out * R)

    def loss_value():
        with no_grad():  # the perturbed runs only need values
            return float((fn(*inputs).data * weights).sum())

    for t in inputs:
        t.grad = None
    (out * Tensor(weights)).sum().backward()
    analytic = {i: (inputs[i].grad if inputs[i].grad is not None else xp.zeros(inputs[i].shape))
                for i in checked}

    def central_difference(perturb):
        perturb(+eps)
        up = loss_value()
        perturb(-2 * eps)
        down = loss_value()
        perturb(+eps)
        return (up - down) / (2 * eps)

    def compare(expected, got, where):
        if abs(expected - got) > atol + rtol * abs(expected):
            raise GradcheckError(f"gradient mismatch {where}: expected {expected:.8g} (finite "
                                 f"differences), got {got:.8g} (backward), difference {got - expected:.3g}")

    if mode == "full":
        for i in checked:
            data = inputs[i].data
            flat_grad = backend.asnumpy(analytic[i]).reshape(-1)
            for flat_index in range(data.size):
                index = tuple(int(i) for i in np.unravel_index(flat_index, data.shape))

                def perturb(delta, data=data, index=index):
                    data[index] += delta
                expected = central_difference(perturb)
                compare(expected, float(flat_grad[flat_index]), f"for {names[i]} at index {index}")
    elif mode == "random":
        for d in range(directions):
            us = {i: xp.asarray(rng.standard_normal(inputs[i].shape)) for i in checked}
            norm = np.sqrt(sum(float((u * u).sum()) for u in us.values()))

            def perturb(delta, us=us):
                for i, u in us.items():
                    inputs[i].data += delta * u / norm
            expected = central_difference(perturb)
            got = sum(float((analytic[i] * us[i]).sum()) for i in checked) / norm
            compare(expected, got, f"along random direction {d} over {', '.join(names[i] for i in checked)}")
    else:
        raise ValueError(f"mode must be 'full' or 'random', not {mode!r}")
    return True
