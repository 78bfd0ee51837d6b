"""Devices and array modules: NumPy on the CPU, CuPy on a GPU.

Model and op code never imports numpy for computation. It asks the arrays it was given which module
they belong to (`get_array_module`, Chainer's idea), so one body of code serves both. Only this module
imports cupy, and only when a GPU is asked for.
"""
import os

import numpy as np

from .errors import MinimosaicError

_DEVICE_ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
_cupy = None  # imported on first use of the GPU


def normalize_device(device):
    """'cpu' -> 'cpu'; 'gpu' or 'cuda' -> 'gpu'. Anything else is a user error."""
    name = _DEVICE_ALIASES.get(str(device).lower())
    if name is None:
        raise MinimosaicError(f"unknown device {device!r}: use 'cpu' or 'gpu' (alias 'cuda')")
    return name


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError:
            raise MinimosaicError(
                "--device gpu needs CuPy: pip install 'minimosaic[gpu]' (or cupy-cuda12x / cupy-cuda13x "
                "matching your CUDA driver), or use --device cpu") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # CUDA driver missing or broken: cupy raises its own runtime errors here
            count = 0
        if count == 0:
            raise MinimosaicError("--device gpu: CuPy is installed but no CUDA GPU is visible; "
                                  "check nvidia-smi / CUDA_VISIBLE_DEVICES, or use --device cpu")
        _cupy = cupy
    return _cupy


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device (never raises)."""
    try:
        _import_cupy()
        return True
    except MinimosaicError:
        return False


def array_module(device):
    """The array module for a device name: numpy for 'cpu', cupy for 'gpu'/'cuda'."""
    return np if normalize_device(device) == "cpu" else _import_cupy()


def get_array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for plain Python values)."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def device_of(array):
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "gpu" if get_array_module(array) is not np else "cpu"


def to_device(array, device):
    """Copy `array` to `device` ('cpu' or 'gpu'); returns it unchanged if it is already there."""
    target = normalize_device(device)
    if target == device_of(array):
        return array
    if target == "cpu":
        return array.get()
    return _import_cupy().asarray(array)


def asnumpy(array):
    """A NumPy array on the host, whatever device `array` lives on."""
    return array.get() if device_of(array) == "gpu" else np.asarray(array)


def erf(x):
    """The error function, elementwise: scipy.special.erf on NumPy arrays, cupyx's on CuPy arrays."""
    if get_array_module(x) is np:
        from scipy.special import erf as special_erf
    else:
        from cupyx.scipy.special import erf as special_erf
    return special_erf(x)


def scatter_add(target, indices, values):
    """target[indices] += values, accumulating repeated indices (np.add.at / cupyx.scatter_add)."""
    xp = get_array_module(target)
    if hasattr(xp.add, "at"):  # NumPy; CuPy >= 13
        xp.add.at(target, indices, values)
    else:
        import cupyx
        cupyx.scatter_add(target, indices, values)
    return target


def set_tf32(enabled=True):
    """Let float32 matrix products on the GPU use TF32 tensor cores (Ampere and later), or forbid it.

    TF32 keeps float32's range but rounds the products' inputs to a 10-bit mantissa: several times the
    float32 rate, at a relative error near 1e-3 instead of 1e-7. Off by default (as in torch). CuPy reads
    CUPY_TF32 when it first multiplies float32 matrices; once cupy is in use its setting is changed too.
    """
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    if _cupy is not None:
        try:
            from cupy._core import _routines_linalg as linalg
            linalg.set_compute_type(_cupy.float32, linalg.COMPUTE_TYPE_TF32 if enabled
                                    else linalg.COMPUTE_TYPE_DEFAULT)
        except (ImportError, AttributeError):  # a CuPy without this (private) switch: the variable rules
            pass


def seed_everything(seed):
    """Seed NumPy's legacy global generator (and CuPy's, once it is in use)."""
    np.random.seed(seed)
    if _cupy is not None:
        _cupy.random.seed(seed)
