"""Devices and array modules: NumPy on the CPU, CuPy on a GPU.

Model and op code never imports numpy for computation. It asks the arrays it was given which module
they belong to (`get_array_module`, Chainer's idea), so one body of code serves both. Only this module
imports cupy, and only when a GPU is asked for.
"""
import ctypes
import glob
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import MinimosaicError

_DEVICE_ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
_cupy = None  # imported on first use of the GPU


TRIM_THRESHOLD = 1 << 30    # free memory at the heap's top that glibc keeps before returning it


def keep_freed_memory():
    """Let glibc's malloc keep freed memory for the next arrays instead of handing it back to the OS.

    By default glibc gives each block over ~128 KiB its own memory map, unmaps it when it is freed,
    and trims the heap's free top. A training step allocates and frees the same big temporaries every
    step, so each fresh array then costs a page fault per 4 KiB page while the kernel hands out zeroed
    pages again: about 30% of a char-small step on the CPU, torch's included (benchmarks/NOTES.md,
    entry 8). With no maps of its own (M_MMAP_MAX = 0: every block comes from the heap) and no trimming
    below 1 GiB, freed blocks are reused. The process keeps its high-water memory until it exits.
    Called when minimosaic is imported; MINIMOSAIC_MALLOC=default skips it. True if glibc took both.
    """
    if os.environ.get("MINIMOSAIC_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False  # macOS and Windows have other allocators (and no mallopt)
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc (and musl, where it does nothing)
    except (AttributeError, OSError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


keep_freed_memory()


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


def row_sum(a):
    """a.sum(axis=-1, keepdims=True). On NumPy, as a product with a ones vector: BLAS sums short rows
    (32 to a few hundred numbers) 3-9x faster than NumPy's reduction, which is built for long ones."""
    if get_array_module(a) is not np:
        return a.sum(axis=-1, keepdims=True)
    return np.matmul(a, np.ones(a.shape[-1], a.dtype))[..., None]


STAGED_SUM_MIN = 1 << 20   # elements from which a multi-axis sum on CuPy goes axis by axis


def sum_axes(a, axes):
    """a summed over `axes` (keepdims=True). On CuPy, for big arrays, one axis at a time: its reductions
    give each output element one block, so a few outputs fed by millions of inputs (a per-head gradient
    summed over batch, time and channels) would keep most of the GPU idle; axis by axis, every stage
    is wide. Small arrays take one launch (a step of a small model is bound by launches)."""
    if get_array_module(a) is np or len(axes) < 2 or a.size < STAGED_SUM_MIN:
        return a.sum(axis=tuple(axes), keepdims=True)
    for axis in sorted(axes):
        a = a.sum(axis=axis, keepdims=True)
    return a


def seed_everything(seed):
    """Seed NumPy's legacy global generator (and CuPy's, once it is in use)."""
    np.random.seed(seed)
    if _cupy is not None:
        _cupy.random.seed(seed)


# ---------------------------------------------------------------- CPU fast path: a small thread pool
# NumPy's elementwise passes (exp, sums, products) run on one core, while BLAS and torch use them all.
# The big ops (memories.softmax_attention, large matmuls) therefore cut their work into independent
# tiles and run them on a few Python threads: NumPy releases the GIL inside ufuncs and BLAS calls, so
# every core works on every pass, and each tile is small enough to stay in cache. While the pool runs,
# BLAS is set to one thread: its own threads spin while they wait, which fights the pool's and stalls
# badly when anything else runs on the machine. Without OpenBLAS's thread control there is no pool.
_blas = None          # (get_num_threads, set_num_threads) of the OpenBLAS that NumPy loaded, or False
_workers = None       # set_cpu_workers's choice
_pool = None
_pool_lock = threading.Lock()
_in_pool = threading.local()  # set in the pool's threads


def _openblas_controls():
    """OpenBLAS's get/set_num_threads as ctypes functions, or None where they cannot be found."""
    global _blas
    if _blas is None:
        _blas = False
        folder = os.path.dirname(np.__file__)
        paths = glob.glob(os.path.join(folder, "..", "numpy.libs", "*openblas*")) + \
            glob.glob(os.path.join(folder, ".dylibs", "*openblas*"))
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                                   ("openblas", "")):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    _blas = (get, put)
                    break
            if _blas:
                break
    return _blas or None


def cpu_workers():
    """Threads the CPU fast paths use: set_cpu_workers's choice, else BLAS's own thread count."""
    if _workers is not None:
        return _workers
    controls = _openblas_controls()
    return controls[0]() if controls else 1


def set_cpu_workers(n=None):
    """Use n threads in the CPU fast paths (None: as many as BLAS uses; 1: no pool). Without
    OpenBLAS's thread control there is no pool whatever n is."""
    global _workers
    _workers = None if n is None else (max(1, int(n)) if _openblas_controls() else 1)


def parallel_tiles(body, count, workers):
    """Call body(worker, i) for i in range(count) on `workers` threads (worker in range(workers)).

    Tiles are handed out in order as threads become free (so a core slowed by another process just
    takes fewer). BLAS runs on one thread meanwhile. workers == 1 runs everything here, in order.
    """
    if workers <= 1 or count <= 1 or getattr(_in_pool, "yes", False):  # (a tile's own calls run inline)
        for i in range(count):
            body(0, i)
        return
    global _pool
    with _pool_lock:  # one parallel region at a time (the pool is shared)
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="minimosaic")
        tiles = itertools.count()

        def run(worker):
            _in_pool.yes = True
            for i in tiles:  # next() on itertools.count is atomic under the GIL
                if i >= count:
                    return
                body(worker, i)

        get, put = _openblas_controls()
        before = get()
        put(1)
        try:
            for future in [_pool.submit(run, w) for w in range(workers)]:
                future.result()
        finally:
            put(before)


ELEMENTWISE_MIN = 1 << 18      # elements below which an elementwise fast path runs in one piece
BLOCK_ELEMENTS = 1 << 15       # ~128 KB of float32 per block: the in-place passes stay in cache


def map_blocks(fn, *arrays):
    """Call fn(*blocks) on matching row blocks of arrays that share their leading axes (the last may
    differ, e.g. (B, T, C) and (B, T, 1)); the outputs among them are written in place by fn, so they
    must be C-contiguous arrays the caller just made.

    On NumPy with the pool on, the blocks run on all cores (parallel_tiles); otherwise (CuPy, small
    arrays) fn runs once on the whole arrays.
    """
    first = arrays[0]
    workers = cpu_workers() if get_array_module(*arrays) is np else 1
    if workers <= 1 or first.ndim == 0 or first.size < ELEMENTWISE_MIN:
        fn(*arrays)
        return
    rows = [a.reshape(-1, a.shape[-1]) for a in arrays]
    step = max(1, BLOCK_ELEMENTS // first.shape[-1])

    def block(worker, i):
        fn(*(r[i * step:(i + 1) * step] for r in rows))
    parallel_tiles(block, -(-rows[0].shape[0] // step), workers)


PARALLEL_MATMUL_MIN = 1 << 21   # multiply-adds below which a product runs in one piece (tens of microseconds)


gpu_matmul = None  # while cuda_graph records a step: its own cuBLAS call (CuPy's refuses to be recorded)


def matmul(a, b):
    """a @ b. On NumPy, a large 2-D product is cut into row blocks run by the CPU pool (parallel_tiles),
    so it shares the cores the same way as the fused ops (BLAS's own threads spin while they wait, which
    stalls when the machine is busy)."""
    if get_array_module(a, b) is not np:
        return a @ b if gpu_matmul is None else gpu_matmul(a, b)
    workers = cpu_workers()
    if workers <= 1 or a.ndim != 2 or b.ndim != 2 or a.shape[0] * a.shape[1] * b.shape[1] < PARALLEL_MATMUL_MIN:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    step = -(-a.shape[0] // (2 * workers))   # two blocks per thread: a slowed core takes fewer

    def block(worker, i):
        np.matmul(a[i * step:(i + 1) * step], b, out=out[i * step:(i + 1) * step])
    parallel_tiles(block, -(-a.shape[0] // step), workers)
    return out
