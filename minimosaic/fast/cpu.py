"""The CPU runtime of the fast layer: a small thread pool over OpenBLAS, blocked passes, the allocator.

Nothing here runs unless minimosaic.fast is enabled: the plain core never imports this module.
"""
import contextlib
import ctypes
import glob
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


TRIM_THRESHOLD = 1 << 30    # free memory at the heap's top that glibc keeps before returning it


def keep_freed_memory():
    """Let glibc's malloc keep freed memory for the next arrays instead of handing it back to the OS.

    By default glibc gives each block over ~128 KiB its own memory map, unmaps it when it is freed,
    and trims the heap's free top. A training step allocates and frees the same big temporaries every
    step, so each fresh array then costs a page fault per 4 KiB page while the kernel hands out zeroed
    pages again: about 30% of a char-small step on the CPU, torch's included (benchmarks/NOTES.md,
    entry 8). With no maps of its own (M_MMAP_MAX = 0: every block comes from the heap) and no trimming
    below 1 GiB, freed blocks are reused. The process keeps its high-water memory until it exits.
    Called by minimosaic.fast.enable(); MINIMOSAIC_MALLOC=default skips it. True if glibc took both.
    """
    if os.environ.get("MINIMOSAIC_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False  # macOS and Windows have other allocators (and no mallopt)
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc (and musl, where it does nothing)
    except (AttributeError, OSError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ---------------------------------------------------------------- a small thread pool
# NumPy's elementwise passes (exp, sums, products) run on one core, while BLAS and torch use them all.
# The big ops (attention, large matmuls, GELU and layer norm) therefore cut their work into independent
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


def set_blas_threads(n):
    """OpenBLAS uses n threads from now on (where its thread control was found)."""
    controls = _openblas_controls()
    if controls:
        controls[1](n)


@contextlib.contextmanager
def blas_threads(n):
    """Inside, OpenBLAS uses n threads (where its thread control was found); afterwards, as before."""
    controls = _openblas_controls()
    before = controls[0]() if controls else None
    set_blas_threads(n)
    try:
        yield
    finally:
        if before is not None:
            set_blas_threads(before)


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

        with blas_threads(1):
            for future in [_pool.submit(run, w) for w in range(workers)]:
                future.result()


ELEMENTWISE_MIN = 1 << 18      # elements below which an elementwise fast path runs in one piece


def _rows_per_block(array):
    """Rows in each of map_blocks's blocks of `array`, or None where it runs in one piece: about
    BLOCK_ELEMENTS, and no more than a worker's share, so that every worker gets a block."""
    workers = cpu_workers() if isinstance(array, np.ndarray) else 1
    if workers <= 1 or array.ndim == 0 or array.size < ELEMENTWISE_MIN:
        return None
    rows = array.size // array.shape[-1]
    return max(1, min(BLOCK_ELEMENTS // array.shape[-1], -(-rows // workers)))


def block_count(array):
    """How many blocks map_blocks cuts `array` into (to size per-block partial results)."""
    step = _rows_per_block(array)
    return 1 if step is None else -(-(array.size // array.shape[-1]) // step)


def map_blocks(fn, *arrays, index=False):
    """Call fn(*blocks) on matching row blocks of arrays that share their leading axes (the last may
    differ, e.g. (B, T, C) and (B, T, 1)); the outputs among them are written in place by fn, so they
    must be C-contiguous arrays the caller just made. With index=True fn gets the block's number first,
    fn(i, *blocks), so it can write per-block partial results (block_count says how many).

    On NumPy with the pool on, the blocks run on all cores (parallel_tiles); otherwise (CuPy, small
    arrays) fn runs once on the whole arrays, as block 0 of 1.
    """
    step = _rows_per_block(arrays[0])
    if step is None:
        fn(*((0,) if index else ()), *arrays)
        return
    rows = [a.reshape(-1, a.shape[-1]) for a in arrays]

    def block(worker, i):
        fn(*((i,) if index else ()), *(r[i * step:(i + 1) * step] for r in rows))
    parallel_tiles(block, block_count(arrays[0]), cpu_workers())


PARALLEL_MATMUL_MIN = 1 << 21   # multiply-adds below which a product runs in one piece (tens of microseconds)


def matmul(a, b):
    """a @ b for NumPy arrays. A large 2-D product is cut into blocks run by the pool (parallel_tiles),
    so it shares the cores the same way as the fused ops (BLAS's own threads spin while they wait, which
    stalls when the machine is busy). The blocks cut the longer side of the output: a's rows, or b's
    columns when a has fewer rows than b has columns (a weight gradient x^T g, or the tied head's
    E-gradient g^T h), so that each block reads the smaller operand whole and a slice of the larger."""
    workers = cpu_workers()
    if workers <= 1 or a.ndim != 2 or b.ndim != 2 or a.shape[0] * a.shape[1] * b.shape[1] < PARALLEL_MATMUL_MIN:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    by_rows = a.shape[0] >= b.shape[1]
    length = a.shape[0] if by_rows else b.shape[1]
    step = -(-length // (2 * workers))   # two blocks per thread: a slowed core takes fewer

    def block(worker, i):
        part = slice(i * step, (i + 1) * step)
        if by_rows:
            np.matmul(a[part], b, out=out[part])
        else:
            np.matmul(a, b[:, part], out=out[:, part])
    parallel_tiles(block, -(-length // step), workers)
    return out


def row_sum(a):
    """a.sum(axis=-1, keepdims=True) as a product with a ones vector: BLAS sums short rows (32 to a few
    hundred numbers) 3-9x faster than NumPy's reduction, which is built for long ones."""
    return np.matmul(a, np.ones(a.shape[-1], a.dtype))[..., None]


DEFAULT_L2_BYTES = 1 << 20   # where the size cannot be read: 1 MiB, a recent x86 core's


def l2_cache_bytes(sysfs="/sys/devices/system/cpu/cpu0/cache"):
    """The first core's level-2 cache size in bytes, read from Linux's sysfs ('1024K', '2048K', '2M'),
    else DEFAULT_L2_BYTES. The tiles of the fast paths are sized to it, so that one tile's scores stay in
    the cache of the core that works on them, whatever the CPU (measured, not a constant from one machine)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in sorted(glob.glob(os.path.join(sysfs, "index*"))):
        try:
            with open(os.path.join(index, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip().upper()
            number, unit = text.rstrip("KMG"), text[len(text.rstrip("KMG")):]
            return int(number) * units[unit]
        except (OSError, ValueError, KeyError):
            continue
    return DEFAULT_L2_BYTES


# Elements in one block of an elementwise pass (map_blocks): as many float32 numbers as a core's L2 cache
# holds bytes / 4. Each NumPy call costs microseconds of Python under the GIL, which the pool's threads
# take turns to hold, so small blocks leave the cores waiting; blocks of an L2 of float32 were the
# fastest measured (benchmarks/NOTES.md, entry 13), though a block's 3-5 arrays then live in L3.
BLOCK_ELEMENTS = l2_cache_bytes() // 4

