"""Hand-written CUDA kernels for the GPU's hot spots (the GPU fast paths).

On a GPU every CuPy call is a kernel launch plus some microseconds of Python, and every pass over a big
array is a trip through device memory. The ops below are where a training step spent most of its time
on an H100 (benchmarks/op_profile.py, benchmarks/NOTES.md): each kernel here does in one launch what
the plain code does in several, and reads and writes each array once.

  leaky_scan            kbar_t = x_t + lambda kbar_{t-1}: one thread per (batch, head, channel) walks
                        the time axis (the plain code: chunked products and a loop over chunks)
  leaky_scan_backward   the reversed scan and, in the same walk, the partial sums of dL/dlambda
  softmax_rows          e = exp(scale s - rowmax) (0 where masked) and r = 1 / rowsum e, one block per row
  attention_score_grad  dS = scale e (dP - delta), in place
  layer_norm_rows       xhat, 1 / std and xhat w + b, one block per row; and the input gradient
  normalize_rows        y = s x / (|x| + eps) (s a per-head scale), one warp per row; and its gradient
  adamw_update          the whole AdamW update of one parameter (p, m, v) in one pass

Every kernel is checked against the plain core function it stands in for (memories.py, ops.py, optim.py),
through the replacements in fast/ops.py: tests/test_cuda_kernels.py and tests/test_fast.py, on random
inputs, in float32 and float64, and the gradient checks run through the kernels on the GPU.

`enabled(name, *arrays)` decides: a kernel runs only on CuPy arrays, and only if it is switched on.
All are on by default; MINIMOSAIC_CUDA_KERNELS=0 (or 'none') turns them off, and a comma-separated
list ('leaky_scan,adamw') keeps only those. `use_kernels(...)` does the same from Python.
"""
import functools
import os

import numpy  # only for kernel arguments' C types; the arrays are CuPy's

from ..backend import get_array_module
from ..errors import MinimosaicError

KERNELS = ("leaky_scan", "softmax_rows", "attention_score_grad", "layer_norm", "normalize", "adamw")
_active = None


def use_kernels(names=None):
    """Switch kernels on: None or 'all' = every kernel, '' / '0' / 'none' = none, or a list of names."""
    global _active
    if names is None or names == "all" or names == "1":
        _active = set(KERNELS)
    elif isinstance(names, str) and names.strip().lower() in ("", "0", "none", "off"):
        _active = set()
    else:
        names = names.split(",") if isinstance(names, str) else names
        unknown = {n.strip() for n in names} - set(KERNELS)
        if unknown:
            raise MinimosaicError(f"unknown CUDA kernel(s) {', '.join(sorted(unknown))} (in MINIMOSAIC_CUDA_KERNELS "
                                  f"or use_kernels): use 0, all, or some of {', '.join(KERNELS)}")
        _active = {n.strip() for n in names}
    return sorted(_active)


def active_kernels():
    if _active is None:
        use_kernels(os.environ.get("MINIMOSAIC_CUDA_KERNELS"))
    return sorted(_active)


def enabled(name, *arrays):
    """True when kernel `name` should run on these arrays: they are CuPy arrays and it is switched on."""
    if _active is None:
        active_kernels()
    xp = get_array_module(*arrays)
    return name in _active and xp.__name__ == "cupy"


# ---------------------------------------------------------------- CUDA source
# Templates over the element type T (float or double). Strides are in elements.
_SOURCE = r"""
template<typename T> __device__ T neg_inf();
template<> __device__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template<> __device__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

template<typename T>
__device__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

template<typename T>
__device__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        T other = __shfl_xor_sync(0xffffffff, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// Sum (or max) over the block; every thread gets the result. shared: 32 slots.
template<typename T>
__device__ T block_sum(T v, T* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                       // shared may still be read from a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : T(0);
    return warp_sum(v);
}

template<typename T>
__device__ T block_max(T v, T* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : neg_inf<T>();
    return warp_max(v);
}

// kbar_t = x_t + lambda_h kbar_{t-1} (reverse: a_t = x_t + lambda_h a_{t+1}); one thread per (b, h, d).
// x (B, H, T, D) with any strides; y contiguous (B, H, T, D).
template<typename T>
__global__ void leaky_scan(const T* x, long long sb, long long sh, long long st, long long sd,
                           const T* decay, T* y, int B, int H, int n, int D, int reverse) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H * D) return;
    int d = i % D, h = (i / D) % H, b = i / ((long long)D * H);
    const T lambda = decay[h];
    const T* xs = x + b * sb + h * sh + d * sd;
    T* ys = y + ((long long)b * H + h) * n * D + d;
    T acc = 0;
    #pragma unroll 8
    for (int k = 0; k < n; ++k) {
        int t = reverse ? n - 1 - k : k;
        acc = xs[t * st] + lambda * acc;
        ys[(long long)t * D] = acc;
    }
}

// Backward of the scan: a_t = g_t + lambda a_{t+1} (a contiguous), and partial[b, h, d] =
// sum_{t >= 1} a_t kbar_{t-1}[d], whose sum over b and d is dL/dlambda_h. kbar = the forward output.
template<typename T>
__global__ void leaky_scan_backward(const T* g, long long sb, long long sh, long long st, long long sd,
                                    const T* kbar, const T* decay, T* a, T* partial,
                                    int B, int H, int n, int D) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H * D) return;
    int d = i % D, h = (i / D) % H, b = i / ((long long)D * H);
    const T lambda = decay[h];
    const T* gs = g + b * sb + h * sh + d * sd;
    long long base = ((long long)b * H + h) * n * D + d;
    T acc = 0, dlambda = 0;
    #pragma unroll 8
    for (int t = n - 1; t >= 0; --t) {
        acc = gs[t * st] + lambda * acc;
        a[base + (long long)t * D] = acc;
        if (t > 0) dlambda += acc * kbar[base + (long long)(t - 1) * D];
    }
    partial[i] = dlambda;
}

// One block per row of s (rows, n): e = exp(scale s - m) where allowed, else 0, m = the row's max over
// allowed entries (0 if none); r = 1 / sum e (1 if the sum is 0). mask (q, n) bytes or NULL: row i uses
// mask row i % q. e may be s (in place).
template<typename T>
__global__ void softmax_rows(const T* s, T* e, T* r, const unsigned char* mask, int q, int n, T scale) {
    __shared__ T shared[32];
    long long row = blockIdx.x;
    const T* in = s + row * n;
    T* out = e + row * n;
    const unsigned char* allowed = mask ? mask + (row % q) * n : 0;
    T m = neg_inf<T>();
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        if ((!allowed || allowed[j]) && scale * in[j] > m) m = scale * in[j];
    m = block_max(m, shared);
    if (m == neg_inf<T>()) m = 0;
    T total = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        T v = (!allowed || allowed[j]) ? exp(scale * in[j] - m) : T(0);
        out[j] = v;
        total += v;
    }
    total = block_sum(total, shared);
    if (threadIdx.x == 0) r[row] = total == 0 ? T(1) : T(1) / total;
}

// One block per row of x (rows, n): xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps),
// out = xhat * w + b (w, b may be NULL; out may be xhat when both are).
template<typename T>
__global__ void layer_norm_rows(const T* x, const T* w, const T* bias, T* xhat, T* rstd, T* out,
                                int n, T eps) {
    __shared__ T shared[32];
    long long row = blockIdx.x;
    const T* in = x + row * n;
    T sum = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += in[j];
    T mean = block_sum(sum, shared) / n;
    T sq = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { T c = in[j] - mean; sq += c * c; }
    T r = T(1) / sqrt(block_sum(sq, shared) / n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        T xh = (in[j] - mean) * r;
        xhat[row * n + j] = xh;
        T o = w ? xh * w[j] : xh;
        out[row * n + j] = bias ? o + bias[j] : o;
    }
    if (threadIdx.x == 0) rstd[row] = r;
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g w (g if w is NULL); one block per row.
template<typename T>
__global__ void layer_norm_backward_rows(const T* g, const T* w, const T* xhat, const T* rstd, T* dx, int n) {
    __shared__ T shared[32];
    long long row = blockIdx.x;
    long long o = row * n;
    T s1 = 0, s2 = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        T dxh = w ? g[o + j] * w[j] : g[o + j];
        s1 += dxh;
        s2 += dxh * xhat[o + j];
    }
    T mean1 = block_sum(s1, shared) / n;
    T mean2 = block_sum(s2, shared) / n;
    T r = rstd[row];
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        T dxh = w ? g[o + j] * w[j] : g[o + j];
        dx[o + j] = r * (dxh - mean1 - xhat[o + j] * mean2);
    }
}

// One warp per row (rows, n): norm[row] = |x|, y = s x / (norm + eps), s = scale[head] (1 if scale is NULL)
// with head = (row / per_head) % heads: rows ordered (..., heads, per_head).
template<typename T>
__global__ void normalize_rows(const T* x, T* y, T* norm, const T* scale, long long rows, int n,
                               long long per_head, int heads, T eps) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* in = x + row * n;
    T sq = 0;
    for (int j = lane; j < n; j += 32) sq += in[j] * in[j];
    T nrm = sqrt(warp_sum(sq));
    T inv = T(1) / (nrm + eps);
    if (scale) inv *= scale[(row / per_head) % heads];
    for (int j = lane; j < n; j += 32) y[row * n + j] = in[j] * inv;
    if (lane == 0) norm[row] = nrm;
}

// With u = x / (norm + eps) and p = u . g:  dx = (s g - x s p / norm) / (norm + eps) (the middle term 0
// where norm = 0), and partial[row] = p (summed per head, the gradient of s); one warp per row.
template<typename T>
__global__ void normalize_backward_rows(const T* g, const T* x, const T* norm, const T* scale, T* dx,
                                        T* partial, long long rows, int n, long long per_head, int heads,
                                        T eps) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long o = row * n;
    T nrm = norm[row];
    T inv = T(1) / (nrm + eps);
    T p = 0;
    for (int j = lane; j < n; j += 32) p += x[o + j] * g[o + j];
    p = warp_sum(p) * inv;
    T s = scale ? scale[(row / per_head) % heads] : T(1);
    T along = s * p / (nrm > 0 ? nrm : T(1));
    for (int j = lane; j < n; j += 32) dx[o + j] = (s * g[o + j] - x[o + j] * along) * inv;
    if (lane == 0 && partial) partial[row] = p;
}
"""

_NAMES = ("leaky_scan", "leaky_scan_backward", "softmax_rows", "layer_norm_rows", "layer_norm_backward_rows",
          "normalize_rows", "normalize_backward_rows")
_BLOCK = 256           # threads per block for the one-thread-per-element kernels and the row kernels
_ROW_BLOCK = 128       # threads per row in layer_norm_rows (rows are a few hundred wide)


@functools.lru_cache(maxsize=None)
def _module():
    import cupy
    names = [f"{name}<{t}>" for name in _NAMES for t in ("float", "double")]
    return cupy.RawModule(code=_SOURCE, options=("-std=c++14",), name_expressions=names)


def _kernel(name, dtype):
    if dtype.name not in ("float32", "float64"):
        raise TypeError(f"CUDA kernel {name}: float32 or float64 arrays only, got {dtype}")
    return _module().get_function(f"{name}<{'float' if dtype.name == 'float32' else 'double'}>")


def _strides(a):
    return tuple(s // a.itemsize for s in a.strides)


def _scalar(value, dtype):
    return numpy.dtype(dtype).type(value)


def _int(*values):
    """Kernel arguments declared `int` (32 bits: a Python int would be passed as 64)."""
    return tuple(numpy.int32(v) for v in values)


def _long(*values):
    """Kernel arguments declared `long long`."""
    return tuple(numpy.int64(v) for v in values)


# ---------------------------------------------------------------- leaky average
def leaky_scan(x, decay, reverse=False):
    """kbar_t = x_t + decay_h kbar_{t-1} along axis 2 of x (B, H, T, hs), any strides; reverse=True runs
    backwards in time. Returns a new contiguous array. Reference: memories.leaky_average."""
    import cupy
    B, H, n, D = x.shape
    y = cupy.empty((B, H, n, D), x.dtype)
    decay = cupy.ascontiguousarray(decay, dtype=x.dtype)
    threads = B * H * D
    _kernel("leaky_scan", x.dtype)(((threads + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
                                   (x, *_long(*_strides(x)), decay, y, *_int(B, H, n, D, bool(reverse))))
    return y


def leaky_scan_backward(g, kbar, decay):
    """(a, dlambda) with a_t = g_t + decay a_{t+1} and dlambda_h = sum_{t >= 1} a_t . kbar_{t-1} (over
    batch and channels); kbar is the forward output (contiguous). Reference: memories.leaky_average."""
    import cupy
    B, H, n, D = g.shape
    a = cupy.empty((B, H, n, D), g.dtype)
    partial = cupy.empty((B, H, D), g.dtype)
    decay = cupy.ascontiguousarray(decay, dtype=g.dtype)
    kbar = cupy.ascontiguousarray(kbar)
    threads = B * H * D
    _kernel("leaky_scan_backward", g.dtype)(((threads + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
                                            (g, *_long(*_strides(g)), kbar, decay, a, partial, *_int(B, H, n, D)))
    return a, partial.sum(axis=(0, 2))


# ---------------------------------------------------------------- softmax of the attention scores
def softmax_rows(s, mask=None, scale=1.0):
    """(e, r) for scores s (..., Tq, Tk), in place in s (which must be contiguous): e = exp(scale s - max)
    with masked entries 0, r = 1 / rowsum e, shaped (..., Tq, 1); mask (Tq, Tk) boolean, True = allowed.
    Reference: fast.ops._softmax_terms's CuPy code."""
    import cupy
    assert s.flags.c_contiguous
    Tq, Tk = s.shape[-2:]
    rows = s.size // Tk
    r = cupy.empty(s.shape[:-1] + (1,), s.dtype)
    mask_bytes = None
    if mask is not None:
        mask_bytes = cupy.ascontiguousarray(cupy.broadcast_to(cupy.asarray(mask), (Tq, Tk))).view(cupy.uint8)
    _kernel("softmax_rows", s.dtype)((rows,), (_BLOCK,),
                                     (s, s, r, mask_bytes, *_int(Tq, Tk), _scalar(scale, s.dtype)))
    return s, r


@functools.lru_cache(maxsize=None)
def _score_grad_kernel():
    import cupy
    return cupy.ElementwiseKernel("T e, T delta, T scale", "T ds", "ds = (ds - delta) * e * scale",
                                  "minimosaic_attention_score_grad")


def attention_score_grad(ds, e, delta, scale=1.0):
    """ds <- scale e (ds - delta) in place (ds = dP on entry; delta broadcasts over the last axis)."""
    _score_grad_kernel()(e, delta, _scalar(scale, ds.dtype), ds)
    return ds


# ---------------------------------------------------------------- layer norm
def layer_norm_rows(x, w=None, b=None, eps=1e-5):
    """(out, xhat, rstd) of layer norm over the last axis of x; rstd shaped (..., 1).
    Reference: ops.layer_norm."""
    import cupy
    x = cupy.ascontiguousarray(x)
    n = x.shape[-1]
    rows = x.size // n
    xhat = cupy.empty(x.shape, x.dtype)
    out = xhat if w is None and b is None else cupy.empty(x.shape, x.dtype)
    rstd = cupy.empty(x.shape[:-1] + (1,), x.dtype)
    w = None if w is None else cupy.ascontiguousarray(w, dtype=x.dtype)
    b = None if b is None else cupy.ascontiguousarray(b, dtype=x.dtype)
    _kernel("layer_norm_rows", x.dtype)((rows,), (_ROW_BLOCK,),
                                        (x, w, b, xhat, rstd, out, *_int(n), _scalar(eps, x.dtype)))
    return out, xhat, rstd


def layer_norm_backward_rows(g, w, xhat, rstd):
    """dx of layer norm (see layer_norm_rows) for the output gradient g."""
    import cupy
    g = cupy.ascontiguousarray(g, dtype=xhat.dtype)
    n = xhat.shape[-1]
    dx = cupy.empty(xhat.shape, xhat.dtype)
    w = None if w is None else cupy.ascontiguousarray(w, dtype=xhat.dtype)
    _kernel("layer_norm_backward_rows", xhat.dtype)((xhat.size // n,), (_ROW_BLOCK,),
                                                    (g, w, xhat, rstd, dx, *_int(n)))
    return dx


# ---------------------------------------------------------------- normalize
def _head_layout(x, scale):
    """(scale as a contiguous (H,) array or None, rows per head, heads) for x (..., H, T, d)."""
    import cupy
    if scale is None:
        return None, 1, 1
    heads = scale.size
    if x.ndim < 3 or x.shape[-3] != heads:
        raise ValueError(f"a per-head scale of {heads} values needs x shaped (..., {heads}, T, d), got {x.shape}")
    return cupy.ascontiguousarray(scale.reshape(-1), dtype=x.dtype), x.shape[-2], heads


def normalize_rows(x, eps, scale=None):
    """(y, norm): y = s x / (|x| + eps) over the last axis of x (contiguous), norm = |x| shaped (..., 1);
    s = scale (H, 1, 1) per head for x (..., H, T, d), or 1. Reference: memories.normalize."""
    import cupy
    n = x.shape[-1]
    rows = x.size // n
    s, per_head, heads = _head_layout(x, scale)
    y = cupy.empty(x.shape, x.dtype)
    norm = cupy.empty(x.shape[:-1] + (1,), x.dtype)
    warps = _BLOCK // 32
    _kernel("normalize_rows", x.dtype)(((rows + warps - 1) // warps,), (_BLOCK,),
                                       (x, y, norm, s, *_long(rows), *_int(n), *_long(per_head), *_int(heads),
                                        _scalar(eps, x.dtype)))
    return y, norm


def normalize_backward_rows(g, x, norm, eps, scale=None):
    """(dx,) or (dx, dscale) of normalize_rows for the output gradient g (x and norm from the forward)."""
    import cupy
    g = cupy.ascontiguousarray(g, dtype=x.dtype)
    n = x.shape[-1]
    rows = x.size // n
    s, per_head, heads = _head_layout(x, scale)
    dx = cupy.empty(x.shape, x.dtype)
    partial = None if s is None else cupy.empty(rows, x.dtype)
    warps = _BLOCK // 32
    _kernel("normalize_backward_rows", x.dtype)(((rows + warps - 1) // warps,), (_BLOCK,),
                                                (g, x, norm, s, dx, partial, *_long(rows), *_int(n),
                                                 *_long(per_head), *_int(heads), _scalar(eps, x.dtype)))
    if s is None:
        return (dx,)
    return dx, partial.reshape(-1, heads, per_head).sum(axis=(0, 2)).reshape(scale.shape)


# ---------------------------------------------------------------- AdamW
_ADAMW_BODY = """
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * (g * g);
    p = p * KEEP - STEP_SIZE * (m / (sqrt(v) * VHAT_SCALE + eps));
"""


@functools.lru_cache(maxsize=None)
def _adamw_kernel(rates_in_memory):
    import cupy
    if rates_in_memory:  # read from a device array: a recorded graph replays with each step's values
        names, body = "T g, raw T rates, T b1, T b2, T eps", _ADAMW_BODY.replace("KEEP", "rates[0]").replace(
            "STEP_SIZE", "rates[1]").replace("VHAT_SCALE", "rates[2]")
    else:
        names, body = "T g, T keep, T step_size, T vhat_scale, T b1, T b2, T eps", _ADAMW_BODY.replace(
            "KEEP", "keep").replace("STEP_SIZE", "step_size").replace("VHAT_SCALE", "vhat_scale")
    return cupy.ElementwiseKernel(names, "T p, T m, T v", body, f"minimosaic_adamw_{int(rates_in_memory)}")


def adamw_update(p, g, m, v, rates, b1, b2, eps):
    """One AdamW step of one parameter in place; rates = (keep, step_size, vhat_scale) as numbers
    (keep = 1 - lr wd, step_size = lr / (1 - b1^t), vhat_scale = 1 / sqrt(1 - b2^t)).
    Reference: optim.adamw_update."""
    t = lambda value: _scalar(value, p.dtype)  # noqa: E731
    _adamw_kernel(False)(g, *(t(r) for r in rates), t(b1), t(b2), t(eps), p, m, v)


def adamw_update_from(p, g, m, v, rates, b1, b2, eps):
    """adamw_update with the rates read from a device array of 3 values when the kernel runs."""
    t = lambda value: _scalar(value, p.dtype)  # noqa: E731
    _adamw_kernel(True)(g, rates, t(b1), t(b2), t(eps), p, m, v)
