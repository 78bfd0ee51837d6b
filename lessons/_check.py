"""The self-check helpers every lesson uses (lesson 1 builds `check` step by step).

check(name, ours, reference) prints whether our numbers equal a trusted reference exactly, approximately
(within atol + rtol * |reference|), and the largest difference, then asserts the approximate match, so a
lesson stops at the first place where it is wrong. expect(name, condition, detail) does the same for a
yes/no fact ("the loss went down").

QUICK is True when the environment sets MINIMOSAIC_QUICK=1: the lessons then shrink their sizes so the
whole course runs in a couple of minutes (that is what the test suite does).

Figures: a lesson names the figures it draws once, near its top, with promise_figures("name", ...), and
hands each finished matplotlib Figure to show(fig, "name"). In a notebook the figure appears inline; run
as a script it is saved as lessons/figures/<lesson>/<name>.png (or under $MINIMOSAIC_FIGURES). A lesson
that ends without showing a figure it promised fails, like a failed check. The checks about what a
figure shows are made on the data behind it, with check() and expect(), before it is drawn.
"""
import atexit
import os
import sys
from pathlib import Path

import numpy as np

QUICK = os.environ.get("MINIMOSAIC_QUICK", "0") not in ("", "0")
FIGURES = Path(os.environ.get("MINIMOSAIC_FIGURES") or Path(__file__).resolve().parent / "figures")
_promised, _shown = {}, set()


def _in_notebook():
    return "ipykernel" in sys.modules


def _lesson_name():
    """The running lesson's file stem (in a notebook: $MINIMOSAIC_LESSON, set by the course build)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return Path(path).stem if path and not _in_notebook() else os.environ.get("MINIMOSAIC_LESSON", "lesson")


def promise_figures(*names):
    """Declare the figures this lesson draws: each must be shown before the lesson ends."""
    lesson = _lesson_name()
    _promised.update({name: lesson for name in names})


def figure(ncols=1, nrows=1, size=(5.0, 3.6)):
    """A new matplotlib Figure with a grid of axes (a 2-D array), laid out to fit."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             layout="constrained")
    return fig, axes


def show(fig, name):
    """Show a promised figure: inline in a notebook, else saved as FIGURES/<lesson>/<name>.png."""
    assert name in _promised, f"figure {name!r} was not promised: add it to promise_figures(...)"
    _shown.add(name)
    if _in_notebook():
        from IPython.display import display
        display(fig)
    else:
        path = FIGURES / _promised[name] / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        print(f"figure {name}: {path}")
    import matplotlib.pyplot as plt
    plt.close(fig)


_failed = []
_excepthook = sys.excepthook


def _note_failure(*exc_info):
    _failed.append(exc_info[0])
    _excepthook(*exc_info)


def _every_promised_figure_was_shown():
    missing = sorted(set(_promised) - _shown)
    if missing and not _failed:  # (a failed check has already said what went wrong)
        print(f"figures promised but never shown: {', '.join(missing)}", file=sys.stderr)
        os._exit(1)


if not _in_notebook():  # in a notebook, the course build checks the figures in the page
    sys.excepthook = _note_failure
    atexit.register(_every_promised_figure_was_shown)


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
