"""minimosaic.fast: everything that exists only for speed, in one optional layer.

The core (tensor, ops, gradcheck, nn, optim, memories, models) is the maths, and it never imports this
package. `enable()` plugs the layer in: it registers, for each core function marked @replaceable, a
faster function that gives the same values and gradients (fast/ops.py lists them), and lets glibc keep
freed memory for the next arrays. `disable()` unplugs it. The CLI and `train.train()` enable it unless
asked for the plain core (`--plain`, or MINIMOSAIC_PLAIN=1); `import minimosaic` does not.

  ops.py          the replacements, each beside the plain function's name it replaces
  cpu.py          the CPU runtime: a thread pool over OpenBLAS, blocked passes, glibc's allocator
  cuda_kernels.py hand-written CUDA kernels for the GPU's hot spots (CuPy RawModule / ElementwiseKernel)
  cuda_graph.py   the training step recorded once as a CUDA graph and replayed
  distributed.py  data parallelism: ranks over MPI (or NCCL on GPUs), the gradients all-reduced

tests/test_fast.py checks every replacement against its plain function (values and gradients, float64
and float32, CPU and GPU); tests/test_core_is_plain.py checks that the core does not know about this.
"""
import contextlib
import os

from .. import registry
from . import cpu
from .ops import REPLACEMENTS

__all__ = ["enable", "disable", "is_enabled", "enabled", "plain_requested"]


def enable():
    """Register every replacement (once) and keep freed memory in glibc's malloc (MINIMOSAIC_MALLOC=default
    skips that; it cannot be undone in a running process)."""
    if is_enabled():
        return
    for name, replacement in REPLACEMENTS.items():
        registry.register(name, replacement)
    cpu.keep_freed_memory()


def disable():
    """Unregister the replacements: the plain core runs again."""
    for name, replacement in REPLACEMENTS.items():
        registry.unregister(name, replacement)


def is_enabled():
    registered = registry.registered()
    return all(replacement in registered.get(name, ()) for name, replacement in REPLACEMENTS.items())


@contextlib.contextmanager
def enabled(on=True):
    """Inside, the fast layer is on (on=True) or off; afterwards it is as it was."""
    before = is_enabled()
    enable() if on else disable()
    try:
        yield
    finally:
        enable() if before else disable()


def plain_requested():
    """True when the environment asks for the plain core (MINIMOSAIC_PLAIN=1)."""
    return os.environ.get("MINIMOSAIC_PLAIN", "").strip().lower() in ("1", "true", "yes", "on")
