"""The self-check helpers every lesson uses (lesson 1 builds `check` step by step).

check(name, ours, reference) prints whether our numbers equal a trusted reference exactly, approximately
(within atol + rtol * |reference|), and the largest difference, then asserts the approximate match, so a
lesson stops at the first place where it is wrong. expect(name, condition, detail) does the same for a
yes/no fact ("the loss went down").

QUICK is True when the environment sets MINIMOSAIC_QUICK=1: the lessons then shrink their sizes so the
whole course runs in a couple of minutes (that is what the test suite does).
"""
import os

import numpy as np

QUICK = os.environ.get("MINIMOSAIC_QUICK", "0") not in ("", "0")


def _host(x):
    """A float64 NumPy array from a number, a list, a NumPy/CuPy array or a minimosaic Tensor."""
    if hasattr(x, "numpy") and callable(x.numpy):  # a Tensor
        x = x.numpy()
    elif hasattr(x, "get") and callable(x.get):  # a CuPy array
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def check(name, ours, reference, atol=1e-6, rtol=1e-5):
    """Compare ours with reference; print exact / approx / max diff; assert approx."""
    a, b = _host(ours), _host(reference)
    assert a.shape == b.shape, f"{name}: shape {a.shape} is not the reference's {b.shape}"
    exact = bool(np.array_equal(a, b))
    approx = bool(np.allclose(a, b, atol=atol, rtol=rtol))
    maxdiff = float(np.max(np.abs(a - b))) if a.size else 0.0
    print(f"{name:<52s} | exact: {exact!s:5} | approx: {approx!s:5} | maxdiff: {maxdiff:.2e}")
    assert approx, f"{name}: differs from the reference by up to {maxdiff:.3g} (atol {atol}, rtol {rtol})"


def expect(name, condition, detail=""):
    """Print a yes/no fact with its numbers; assert it holds."""
    print(f"{name:<52s} | {'ok' if condition else 'FAILED':5} | {detail}")
    assert condition, f"{name}: {detail}"
