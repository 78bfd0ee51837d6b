"""A training step recorded once as a CUDA graph and replayed (the GPU fast path for small models).

A small model's step on a GPU is bound by the host, not the device: a tok-small step is ~360 ops, each
a few kernel launches and some microseconds of Python, while most kernels run for a few microseconds.
CUDA can record every launch of one step (stream capture) and replay them all as one graph launch:
no Python and no launch gap between kernels. What a replay needs, and how this module gets it:

- fixed addresses. Every array a kernel touches was fixed when the graph was recorded, so each step
  copies its batch into the same two input arrays, the parameters and AdamW moments are updated in
  place, and the gradients, loss and gradient norm land in the same arrays every replay.
- nothing baked in that changes between steps. Numbers passed to kernels are recorded with them, so
  AdamW's learning rate and bias corrections are read from a device array instead: while recording,
  fast.ops.adamw_update hands each parameter's update a row of it; before each replay the optimizer's
  own step() runs once more with `rates_recorder` collecting the numbers (no kernel runs), and they are
  copied into that array. Dropout would replay one mask forever, so a model with dropout is not recorded.
- memory nobody else takes. The arrays the step allocates come from a memory pool of its own that
  nothing else allocates from, so later code cannot be given memory that a replay writes to.
- no host syncs inside the step (no .item(), no int() of a device value): during capture nothing runs.
- matrix products that can be recorded. cuBLAS supports capture, but CuPy refuses to call it while a
  stream is capturing, so while recording, fast.ops.product goes to a cuBLAS handle of this module's
  own, called through ctypes (`CaptureBlas`): one strided-batched GEMM per product.

The step is train.training_step, the one the trainer runs eagerly: tests/test_cuda_graph.py checks that
replays give the same parameters, loss and norm as running it step by step.
"""
import contextlib
import ctypes
import math
import os

import numpy as np  # shapes only: the arrays here are CuPy's

from .. import backend, registry
from ..errors import MinimosaicError
from . import cuda_kernels
from . import ops as fast_ops


def why_not_captured(device, dropout, grad_accum, precision="fp32", ranks=1):
    """None when a training run can replay its step from a CUDA graph, else the reason in a few words."""
    if device != "gpu":
        return "CUDA graphs are a GPU feature"
    if precision == "fp16":
        return "loss scaling checks each step's gradients for overflow on the host"
    if precision != "fp32":
        return "the step is recorded for float32 only"
    if ranks > 1:
        return "data-parallel steps all-reduce through NCCL between the backward and the update"
    if dropout:
        return "dropout would replay the same mask every step"
    if grad_accum != 1:
        return "gradient accumulation runs several forward passes per step"
    if "optim.adamw_update" not in registry.registered():
        return "the fast layer is off (--plain)"
    if "adamw" not in cuda_kernels.active_kernels():
        return "without the AdamW kernel the learning rate would be recorded once"
    return None


class GraphedTrainingStep:
    """`step(x, y, lr)` -> (loss, grad_norm): train.training_step, run eagerly on the first call (so every
    kernel is compiled and every library handle made), recorded on the second, replayed from then on.

    x, y: one batch (host or device arrays of the same shape every call). The returned arrays are
    overwritten by the next replay: copy them to keep them. Nothing may replace the model's parameter
    arrays or the optimizer's moments after the first call (load a checkpoint before it).
    """

    def __init__(self, model, optimizer, grad_clip=None):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.calls, self.graph, self.pool = 0, None, None

    def __call__(self, x, y, lr=None):
        from ..train import training_step
        cupy = backend.array_module("gpu")
        self.calls += 1
        if self.calls == 1:
            return training_step(self.model, self.optimizer, [(cupy.asarray(x), cupy.asarray(y))], lr,
                                 self.grad_clip)
        if self.graph is None:
            self.x, self.y = cupy.array(x), cupy.array(y)
            self.rates = cupy.zeros((len(self.optimizer.parameters()), 3), self.optimizer.parameters()[0].dtype)
            host_rates = self._capture(cupy, lr, training_step)
        else:
            if tuple(x.shape) != self.x.shape or tuple(y.shape) != self.y.shape:
                raise ValueError(f"a recorded step takes batches of shape {self.x.shape}, got {tuple(x.shape)}")
            self.x[...] = cupy.asarray(x)
            self.y[...] = cupy.asarray(y)
            host_rates = self._collect_rates(lr)
        self.rates[:len(host_rates)] = cupy.asarray(host_rates, dtype=self.rates.dtype)
        self.graph.launch(cupy.cuda.get_current_stream())
        return self.outputs

    @contextlib.contextmanager
    def _rates_into(self, host_rates, device_rows):
        """Inside, each AdamW update appends its numbers to host_rates and (device_rows) gets its row of
        self.rates to read them from, or (not device_rows) launches nothing."""
        def record(rates):
            host_rates.append(rates)
            return self.rates[len(host_rates) - 1] if device_rows else None
        fast_ops.rates_recorder = record
        try:
            yield
        finally:
            fast_ops.rates_recorder = None

    def _collect_rates(self, lr):
        """This step's AdamW numbers, from the optimizer's step() (which counts the step)."""
        host_rates = []
        with self._rates_into(host_rates, device_rows=False):
            self.optimizer.step(lr)
        return host_rates

    def _capture(self, cupy, lr, training_step):
        cupy.get_default_memory_pool().free_all_blocks()  # the eager step's cached blocks: not needed again
        self.pool = cupy.cuda.MemoryPool()  # lives as long as the graph: it owns the graph's memory
        stream = cupy.cuda.Stream(non_blocking=True)
        blas = CaptureBlas.get(cupy)
        blas.bind(stream)
        host_rates = []
        try:
            with cupy.cuda.using_allocator(self.pool.malloc), stream, blas.products(), \
                    self._rates_into(host_rates, device_rows=True):
                stream.begin_capture()
                try:
                    self.outputs = training_step(self.model, self.optimizer, [(self.x, self.y)], lr,
                                                 self.grad_clip)
                finally:
                    graph = stream.end_capture()  # ends the capture even when the step raised
        except Exception as error:
            raise MinimosaicError(f"recording the training step as a CUDA graph failed ({type(error).__name__}: "
                                  f"{error}): run with --no-cuda-graph, and please report it") from error
        self.graph = graph
        return host_rates

    def memory_bytes(self):
        """Device memory held for the graph's own arrays (activations, gradients, temporaries)."""
        return 0 if self.pool is None else self.pool.total_bytes()


# ---------------------------------------------------------------- matrix products while recording
OP_N, OP_T = 0, 1                                   # cublasOperation_t
CUDA_R_32F, CUDA_R_64F = 0, 1                       # cudaDataType
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77   # cublasComputeType_t
GEMM_DEFAULT = -1                                   # cublasGemmAlgo_t
WORKSPACE_BYTES = 32 << 20                          # what cuBLAS asks for on Hopper


def _matrix_layout(shape, strides):
    """How cuBLAS can read a row-major (R, C) matrix with these element strides as the column-major
    (C, R) matrix X^T that it multiplies: (op, ld), or None when the matrix must be copied first.

    Rows contiguous (stride (ld, 1)): X stored row-major is X^T stored column-major, op N. Columns
    contiguous (stride (1, ld)): X is stored column-major, cuBLAS transposes it, op T.
    """
    (rows, cols), (row_stride, col_stride) = shape, strides
    if col_stride == 1 or cols == 1:
        ld = row_stride if rows > 1 else cols
        if ld >= cols:
            return OP_N, ld
    if row_stride == 1 or rows == 1:
        ld = col_stride if cols > 1 else rows
        if ld >= rows:
            return OP_T, ld
    return None


def _batch_stride(shape, strides):
    """The one stride that steps through every batch entry in C order (0: all the same), else None."""
    step, span = 0, None
    for n, stride in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if span is None:
            step, span = stride, stride * n
        elif stride == span:
            span = stride * n
        else:
            return None
    return step


def gemm_operand(x, batch):
    """x (..., R, C), broadcast to `batch`, as cuBLAS reads it: (array, op, ld, batch stride), strides in
    elements. A layout one strided-batched GEMM cannot read is copied (contiguous) first."""
    xp = backend.get_array_module(x)
    x = xp.broadcast_to(x, tuple(batch) + x.shape[-2:])
    strides = [s // x.itemsize for s in x.strides]
    layout = _matrix_layout(x.shape[-2:], strides[-2:])
    step = _batch_stride(x.shape[:-2], strides[:-2])
    if layout is None or step is None:
        x = xp.ascontiguousarray(x)
        strides = [s // x.itemsize for s in x.strides]
        layout, step = _matrix_layout(x.shape[-2:], strides[-2:]), _batch_stride(x.shape[:-2], strides[:-2])
    return (x, *layout, step)


class CaptureBlas:
    """A cuBLAS handle of our own, called through ctypes, for the products of a step being recorded."""
    _instance = None

    @classmethod
    def get(cls, cupy):
        if cls._instance is None:
            cls._instance = cls(cupy)
        return cls._instance

    def __init__(self, cupy):
        self.cupy = cupy
        self.lib = _load_cublas()
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)  # kept for good: graphs use it
        gemm = self.lib.cublasGemmStridedBatchedEx
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        gemm.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i]

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} returned cuBLAS status {status}")

    def bind(self, stream):
        """Issue work on `stream`, with our workspace (cuBLAS then records no allocations in a graph)."""
        self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")

    @contextlib.contextmanager
    def products(self):
        """Inside, fast.ops.product on CuPy arrays is `self.matmul`."""
        fast_ops.capture_product = self.matmul
        try:
            yield
        finally:
            fast_ops.capture_product = None

    def matmul(self, a, b):
        """a @ b (batch axes broadcast) as one cublasGemmStridedBatchedEx on the bound stream.

        Row-major C = A B is column-major C^T = B^T A^T, so cuBLAS gets B where it expects its first
        operand: m = N, n = M, k = K, and writes C^T column-major, i.e. C row-major with ldc = N.
        """
        cupy = self.cupy
        dtype = cupy.result_type(a, b)
        if dtype not in (cupy.float32, cupy.float64):
            raise TypeError(f"products of {dtype} arrays are not recorded; use float32 or float64")
        a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        (M, K), N = a.shape[-2:], b.shape[-1]
        out = cupy.empty(batch + (M, N), dtype)
        if out.size == 0 or K == 0:
            out.fill(0)
            return out
        A, op_a, ld_a, step_a = gemm_operand(a, batch)
        B, op_b, ld_b, step_b = gemm_operand(b, batch)
        double = dtype == cupy.float64
        scalar = ctypes.c_double if double else ctypes.c_float
        one, zero = scalar(1), scalar(0)
        data_type = CUDA_R_64F if double else CUDA_R_32F
        compute = COMPUTE_64F if double else (
            COMPUTE_32F_FAST_TF32 if os.environ.get("CUPY_TF32") == "1" else COMPUTE_32F)
        status = self.lib.cublasGemmStridedBatchedEx(
            self.handle, op_b, op_a, N, M, K, ctypes.addressof(one),
            B.data.ptr, data_type, ld_b, step_b, A.data.ptr, data_type, ld_a, step_a,
            ctypes.addressof(zero), out.data.ptr, data_type, N, M * N, math.prod(batch), compute, GEMM_DEFAULT)
        self._check(status, "cublasGemmStridedBatchedEx")
        return out


def _load_cublas():
    """The libcublas CuPy has loaded (so both share one library), else the first one the loader finds."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return ctypes.CDLL(path)
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    raise MinimosaicError("no libcublas found for recording a CUDA graph: run with --no-cuda-graph")
