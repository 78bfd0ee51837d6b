"""Memory Mosaics' memories (Zhang, Bottou et al., arXiv 2405.06394): kernel smoothing over keys.

An associative memory stores (key, value) pairs and answers a query k with the Nadaraya-Watson
(Gaussian kernel smoothing) estimate

    f(k) = sum_i exp(-beta |k - k_i|^2) v_i / sum_j exp(-beta |k - k_j|^2)          kernel_smoothing

When all keys have the same norm, |k - k_i|^2 = const - 2 k.k_i, so f(k) = sum_i softmax_i(2 beta k.k_i) v_i:
attention with the key as its own query and no 1/sqrt(d). With keys of norm s (below), k.k_i = s^2 u.u_i
for unit u, so the bandwidth is carried by the learned per-head key scale s (beta = s^2 / 2).

Per head h, with x_t the (layer-normed) block input at position t:

    keys     kbar_t = W_k x_t + lambda_h kbar_{t-1},  lambda_h = exp(-b_h)   leaky_average   (KeyExtractor)
             k_t = s_h kbar_t / (|kbar_t| + 1e-10)                           normalize
    values   v_t = sigma_h normalize((1 - c_h) W_v x_{t+1} + c_h W_v x_t)    peek_ahead      (ValueExtractor)
    context  y_t = sum_{s<t} softmax_s(k_t . k_s) v_s,  y_0 = 0              softmax_attention (ContextMemory)
    persist. y_t = sigma'_h sum_j softmax_j(k'_t . P_k[j]) P_v[j]          softmax_attention (PersistentMemory)

The present key is excluded from the context memory because v_t already contains x_{t+1}, the token
position t must predict. Both memories end with an output projection W_o.

Fast ops, each with its plain reference beside it (tests check values and gradients agree):
  leaky_average      O(T d), chunked (decay matrix inside chunks of 16 positions, recurrence across
                     chunks); reference: the T x T decay matrix (`leaky_average_reference`).
  softmax_attention  scores, mask, softmax and the weighted sum in one op with a hand-written backward
                     that keeps only exp(scores) and the row normalisers; reference: composed ops.
  peek_ahead, normalize  one pass each, hand-written backward; references from primitive ops.
On a GPU the leaky scan, the attention's softmax and score gradient, and normalize run as CUDA kernels
(cuda_kernels.py); the NumPy/CuPy code here is what they are tested against.

Per-head scalars train 10x faster (like the official code): each is stored divided by FAST = 10 and
used as FAST * stored. Adam's step size is about lr in stored units whatever the gradient's scale, so
the used value moves FAST * lr per step. Stored values in the tables below are thus value / 10.

Parameters (names relative to the memory, as in state_dict; d = n_embd, H = n_head, hs = d / H):
  KeyExtractor   W_k.weight (d, d)   key projection, x @ W_k (W_k.bias (d,) when bias=True)
                 leak_rate  (H,)     b_h / 10; lambda_h = exp(-|10 leak_rate|), init b = linspace(0.5, 5)
                 log_scale  (H,)     log s_h / 10, init log s = 1; used as min(p 10 log_scale,
                                     log(2^16 - 1)) with p = scale_power (2 in the persistent memory)
  ValueExtractor W_v.weight (d, d)   value projection
                 peek       (H,)     c_h, clipped to [0, 1] when used (no gradient past the ends),
                                     init U(0, 1)
                 log_scale  (H,)     log sigma_h / 10, init log sigma = -0.5
  ContextMemory  key.*, value.*      the extractors above
                 W_o.weight (d, d)   output projection
  PersistentMemory key.*             its own KeyExtractor with scale_power 2 (stored keys carry no scale)
                 P_k, P_v (pmem_count, H, pmem_size, hs)   stored keys and values, std 1/sqrt(hs)
                 log_scale  (H,)     log sigma'_h / 10, init log sigma' = -0.5
                 W_o.weight (d, d)   output projection
Projections are initialised N(0, 1/d) (std 1/sqrt(fan_in)), output projections N(0, 1/(d n_layer)).
"""
import math

import numpy as np

from . import backend, cuda_kernels, nn, ops
from .backend import get_array_module
from .tensor import Tensor, make_result

FAST = 10.0                              # per-head scalars are stored as value / FAST (see above)
LOG_SCALE_MAX = math.log(2 ** 16 - 1)    # key scales stay finite in float16
NORM_EPS = 1e-10
LEAKY_CHUNK = 16                         # on CPU 8 and 16 tie; 1 (plain recurrence) is 2-2.5x slower


# ---------------------------------------------------------------- kernel smoothing
def kernel_smoothing(query, keys, values, beta, mask=None):
    """Nadaraya-Watson estimate with a Gaussian kernel, written as the paper writes it:

        f(q) = sum_i w_i v_i,   w_i = exp(-beta |q - k_i|^2) / sum_j exp(-beta |q - k_j|^2)

    query (..., Tq, d), keys (..., Tk, d), values (..., Tk, dv); beta > 0 (a number or a Tensor that
    broadcasts against (..., Tq, Tk)) is the inverse bandwidth: large beta, narrow kernel.
    mask (Tq, Tk) boolean, True = may use that key; a query with no usable key returns 0.
    """
    sq_q = (query * query).sum(axis=-1, keepdims=True)                          # (..., Tq, 1)
    sq_k = ops.swapaxes((keys * keys).sum(axis=-1, keepdims=True), -1, -2)      # (..., 1, Tk)
    distance = sq_q - 2 * (query @ ops.swapaxes(keys, -1, -2)) + sq_k            # (..., Tq, Tk)
    return ops.softmax(-beta * distance, axis=-1, mask=mask) @ values


# ---------------------------------------------------------------- fused attention
def _softmax_terms(q, k, mask, scale):
    """e = exp(scale q k^T - rowmax) with masked entries 0, and r = 1 / rowsum(e): softmax = e * r."""
    xp = get_array_module(q)
    e = backend.matmul(q, k.swapaxes(-1, -2))                                    # (..., Tq, Tk)
    if cuda_kernels.enabled("softmax_rows", e):  # GPU fast path: one pass per row, same result
        return cuda_kernels.softmax_rows(e, mask, scale)
    if scale != 1.0:
        e *= scale
    if mask is not None:
        e += xp.where(mask, 0.0, -xp.inf).astype(e.dtype)
    m = e.max(axis=-1, keepdims=True)
    if mask is not None:
        m[~xp.isfinite(m)] = 0                  # a fully masked row: keep it -inf, so e = 0
    e -= m
    xp.exp(e, out=e)
    denom = e.sum(axis=-1, keepdims=True)
    denom[denom == 0] = 1                       # only fully masked rows (the row max gives e = 1)
    return e, 1 / denom


def attention_weights(q, k, mask=None, scale=1.0):
    """softmax(scale q k^T) over the last axis as a raw array (no graph): for inspection."""
    e, r = _softmax_terms(q, k, mask, scale)
    e *= r
    return e


def softmax_attention(q, k, v, mask=None, scale=1.0):
    """y = P v,  P = softmax(scale q k^T) (rows), masked entries of P are 0; one fused op.

    q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv), batch axes broadcast; mask (Tq, Tk) boolean, True =
    may attend; a fully masked row gives y = 0. Pass the same Tensor as q and k for K K^T (the memory
    mosaic's context memory): the engine adds both of its gradients.

    Backward, with P = e * r (e = exp(scores - max), r = 1 / rowsum e), g = dL/dy:
        dv = P^T g,   dP = g v^T,   dS = P * (dP - rowsum(dP * P)) = e * ((r g) v^T - rowsum((r g) * y))
        dq = scale dS k,   dk = scale dS^T q
    (rowsum(dP * P) = g . y: the row sums need no pass over the (Tq, Tk) matrix.) Only e, r and y are kept.
    On NumPy the same maths runs tile by tile (`_tiled_softmax_attention`, the CPU fast path).
    """
    if get_array_module(q.data) is np:
        return _tiled_softmax_attention(q, k, v, mask, scale)
    return _dense_softmax_attention(q, k, v, mask, scale)


def _dense_softmax_attention(q, k, v, mask, scale):
    """softmax_attention on whole arrays (the GPU path): keeps e (..., Tq, Tk), r and y."""
    e, r = _softmax_terms(q.data, k.data, mask, scale)
    y = backend.matmul(e, v.data)
    y *= r

    def backward(g):
        # The (Tq, Tk) arrays e and ds are only ever read as stored: a product with a transposed view
        # of a batched array can make the library copy it first. X^T Y is computed as (Y^T X)^T,
        # whose transposes touch only the small operands.
        g_r = g * r                                                              # (..., Tq, dv)
        dv = backend.matmul(g_r.swapaxes(-1, -2), e).swapaxes(-1, -2)            # e^T g_r
        ds = backend.matmul(g_r, v.data.swapaxes(-1, -2))                        # (..., Tq, Tk)
        delta = (g_r * y).sum(axis=-1, keepdims=True)
        if cuda_kernels.enabled("attention_score_grad", ds):  # GPU: the three passes below in one
            cuda_kernels.attention_score_grad(ds, e, delta, scale)
        else:
            ds -= delta
            ds *= e
            if scale != 1.0:
                ds *= scale
        dq = backend.matmul(ds, k.data)
        return dq, backend.matmul(q.data.swapaxes(-1, -2), ds).swapaxes(-1, -2), dv  # dk = ds^T q
    return make_result(y, (q, k, v), backward)


# ---------------------------------------------------------------- CPU fast path: tiled attention
TILE_SCORES = 1 << 18   # scores per tile: 1 MB in float32, about a core's L2 cache on recent x86; each
                        # tile's products pack the keys once for all its rows, so fewer, taller tiles
                        # waste less (2 cores, EPYC Zen 4: 5-9% per step over 256 KB tiles; NOTES, 8)


def _tiles(batch, Tq, Tk, mask):
    """[(b0, b1, r0, r1, kend)]: blocks of batch slices and query rows holding about TILE_SCORES scores;
    a block needs only keys [:kend] (the last one any of its rows may use: causal rows skip the future).
    With a mask, rows come in at least 4 chunks so the upper triangle is mostly skipped."""
    if mask is None:
        last = np.full(Tq, Tk)
    else:
        last = np.where(mask.any(axis=1), Tk - mask[:, ::-1].argmax(axis=1), 0)   # (Tq,) keys used
    rows = max(1, min(Tq, TILE_SCORES // Tk, Tq if mask is None else -(-Tq // 4)))
    group = max(1, min(batch, TILE_SCORES // (rows * Tk)))
    return [(b0, min(b0 + group, batch), r0, min(r0 + rows, Tq), int(last[r0:r0 + rows].max()))
            for b0 in range(0, batch, group) for r0 in range(0, Tq, rows)]


def _tiled_softmax_attention(q, k, v, mask, scale):
    """softmax_attention computed block by block (NumPy only; same maths, same gradients).

    Each block of rows gets its scores, softmax and weighted sum while they are in cache, on a few
    threads (backend.parallel_tiles). The (Tq, Tk) weights are never stored: the forward keeps the
    row log-normalisers lse = max + log rowsum e, and the backward recomputes P = exp(s - lse) per block
    (one more q k^T product, flash-attention style), which saves the memory and the passes over it.
    """
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    Tq, (Tk, dv) = q.shape[-2], v.shape[-2:]
    flat = lambda a, n: np.ascontiguousarray(np.broadcast_to(a, batch + a.shape[-2:]).reshape(-1, n, a.shape[-1]))  # noqa: E731
    qs = flat(q.data, Tq) * q.dtype.type(scale)                                  # (nb, Tq, d), scaled once
    kf, vf = flat(k.data, Tk), flat(v.data, Tk)                                  # (nb, Tk, d), (nb, Tk, dv)
    nb = qs.shape[0]
    bias = None if mask is None else np.where(mask, 0, -np.inf).astype(q.dtype)  # (Tq, Tk)
    tiles = _tiles(nb, Tq, Tk, None if mask is None else np.asarray(mask))
    workers = backend.cpu_workers()
    y = np.zeros((nb, Tq, dv), q.dtype)
    lse = np.zeros((nb, Tq, 1), q.dtype)

    def scores(b0, b1, r0, r1, kend):
        s = qs[b0:b1, r0:r1] @ kf[b0:b1, :kend].swapaxes(-1, -2)                 # (G, rows, kend)
        if bias is not None:
            s += bias[r0:r1, :kend]
        return s

    def forward_tile(worker, i):
        b0, b1, r0, r1, kend = tiles[i]
        if kend == 0:  # every row fully masked: y = 0
            return
        e = scores(b0, b1, r0, r1, kend)
        m = e.max(axis=-1, keepdims=True)
        m[~np.isfinite(m)] = 0                  # fully masked rows: e = 0 below
        e -= m
        np.exp(e, out=e)
        total = backend.row_sum(e)
        total[total == 0] = 1
        out = e @ vf[b0:b1, :kend]
        out /= total
        y[b0:b1, r0:r1] = out
        lse[b0:b1, r0:r1] = m + np.log(total)

    backend.parallel_tiles(forward_tile, len(tiles), workers)

    def backward(g):
        g = np.ascontiguousarray(g.reshape(nb, Tq, dv))
        delta = backend.row_sum(g * y)                                           # rowsum(dP * P) = g . y
        dq = np.zeros_like(qs)
        dk = np.zeros((workers,) + kf.shape, q.dtype)  # one accumulator per thread: blocks share keys
        dvs = np.zeros((workers,) + vf.shape, q.dtype)
        # -lse and -delta ride along as one more column of the queries and of g, against a column of
        # ones on the keys and on the values: the products then give s - lse and g v^T - delta
        # directly, one pass over each tile of scores fewer for each.
        ones = lambda a: np.ones(a.shape[:-1] + (1,), q.dtype)  # noqa: E731
        with_column = lambda a, column: np.concatenate([a, column], axis=-1)  # noqa: E731
        q_lse, k_one = with_column(qs, -lse), with_column(kf, ones(kf))
        g_delta, v_one = with_column(g, -delta), with_column(vf, ones(vf))

        def backward_tile(worker, i):
            b0, b1, r0, r1, kend = tiles[i]
            if kend == 0:
                return
            p = q_lse[b0:b1, r0:r1] @ k_one[b0:b1, :kend].swapaxes(-1, -2)       # s - lse
            if bias is not None:
                p += bias[r0:r1, :kend]
            np.exp(p, out=p)                                                     # P, (G, rows, kend)
            dvs[worker, b0:b1, :kend] += p.swapaxes(-1, -2) @ g[b0:b1, r0:r1]
            ds = g_delta[b0:b1, r0:r1] @ v_one[b0:b1, :kend].swapaxes(-1, -2)    # dP - delta
            ds *= p                                                              # dS / scale
            dq[b0:b1, r0:r1] = ds @ kf[b0:b1, :kend]
            dk[worker, b0:b1, :kend] += ds.swapaxes(-1, -2) @ qs[b0:b1, r0:r1]

        backend.parallel_tiles(backward_tile, len(tiles), workers)
        if scale != 1.0:
            dq *= q.dtype.type(scale)
        shape = lambda a, n: a.reshape(batch + (n, a.shape[-1]))  # noqa: E731
        return shape(dq, Tq), shape(dk.sum(axis=0), Tk), shape(dvs.sum(axis=0), Tk)
    return make_result(y.reshape(batch + (Tq, dv)), (q, k, v), backward)


def softmax_attention_reference(q, k, v, mask=None, scale=1.0):
    """softmax_attention from primitive ops (what the lesson shows): softmax(scale q k^T, mask) @ v."""
    return ops.softmax((q @ ops.swapaxes(k, -1, -2)) * scale, axis=-1, mask=mask) @ v


def causal_mask(xp, queries, past, include_present):
    """(queries, past + queries) boolean: query i sits at position past + i and may attend to
    positions s <= past + i (include_present) or s < past + i."""
    return xp.tri(queries, past + queries, past if include_present else past - 1, dtype=bool)


# ---------------------------------------------------------------- leaky average (keys)
def _leaky_scan(x, decay, chunk, reverse=False):
    """kbar_t = x_t + decay kbar_{t-1} along axis 2 of x (B, H, T, hs); decay (H,) array.
    reverse=True runs backwards in time: a_t = x_t + decay a_{t+1}.

    Inside chunks of L positions kbar = M x with M[t, s] = decay^(t - s) (s <= t); then each chunk
    adds decay^(t+1) times the last kbar of the chunk before it. chunk = 1 is the plain recurrence.
    """
    xp = get_array_module(x)
    B, H, T, hs = x.shape
    L = max(1, min(chunk, T))
    n = -(-T // L)
    if n * L != T:  # zeros at the end change nothing, either way in time
        x = xp.concatenate([x, xp.zeros((B, H, n * L - T, hs), x.dtype)], axis=2)
    i = xp.arange(L, dtype=x.dtype)
    lag = i[:, None] - i[None, :]                                                # (L, L): t - s
    within = decay[:, None, None] ** xp.maximum(lag, 0) * (lag >= 0)             # (H, L, L)
    carry = (decay[:, None] ** (i + 1))[:, :, None]                              # (H, L, 1)
    if reverse:  # M^T, and the carry comes from the first position of the next chunk
        within, carry = within.swapaxes(-1, -2), carry[:, ::-1]
    y = within[:, None] @ x.reshape(B, H, n, L, hs)                              # (B, H, n, L, hs)
    for c in (range(n - 2, -1, -1) if reverse else range(1, n)):
        y[:, :, c] += carry * (y[:, :, c + 1, :1] if reverse else y[:, :, c - 1, -1:])
    return y.reshape(B, H, n * L, hs)[:, :, :T]


def leaky_average(x, decay, chunk=LEAKY_CHUNK):
    """kbar_t = x_t + lambda kbar_{t-1} (kbar_{-1} = 0) along time; x (B, H, T, hs), decay lambda (H,).

    O(T d) (see _leaky_scan). Backward: a_t = g_t + lambda a_{t+1} (the same scan, reversed in time)
    is dL/dx_t, and dL/dlambda = sum_{t >= 1} a_t . kbar_{t-1}.
    On a GPU both scans are one CUDA kernel each (cuda_kernels.leaky_scan), tested against this code.
    """
    if cuda_kernels.enabled("leaky_scan", x.data):
        y = cuda_kernels.leaky_scan(x.data, decay.data)
        return make_result(y, (x, decay), lambda g: cuda_kernels.leaky_scan_backward(g, y, decay.data))
    y = _leaky_scan(x.data, decay.data, chunk)

    def backward(g):
        a = _leaky_scan(g, decay.data, chunk, reverse=True)
        return a, x.xp.einsum("bhtd,bhtd->h", a[:, :, 1:], y[:, :, :-1])
    return make_result(y, (x, decay), backward)


def leaky_average_reference(x, decay):
    """leaky_average as one T x T matrix per head (the official code's way, O(T^2 d)) from ops:
    kbar = M x,  M[t, s] = lambda^(t - s) for s <= t, else 0."""
    xp, T = x.xp, x.shape[2]
    t = xp.arange(T, dtype=x.dtype)
    lag = t[:, None] - t[None, :]
    powers = ops.exp(ops.log(decay).reshape(-1, 1, 1) * xp.maximum(lag, 0))      # (H, T, T)
    return (powers * (lag >= 0).astype(x.dtype)) @ x


# ---------------------------------------------------------------- peek ahead (values), normalize
def peek_ahead(v, c):
    """out_t = (1 - c_h) v_{t+1} + c_h v_t along axis -2 (time), v_T = 0; v (..., H, T, hs), c (H,).

    Backward: dv_t = c g_t + (1 - c) g_{t-1};  dc = sum g_t . (v_t - v_{t+1}) over all but the head axis.
    """
    c_ = c.data[:, None, None]                                                   # (H, 1, 1)
    out = v.data * c_
    out[..., :-1, :] += (1 - c_) * v.data[..., 1:, :]
    axes = tuple(a for a in range(v.ndim) if a != v.ndim - 3)

    def backward(g):
        dv = g * c_
        dv[..., 1:, :] += (1 - c_) * g[..., :-1, :]
        step = v.data.copy()                                                     # v_t - v_{t+1}
        step[..., :-1, :] -= v.data[..., 1:, :]
        return dv, backend.sum_axes(g * step, axes).reshape(-1)
    return make_result(out, (v, c), backward)


def peek_ahead_reference(v, c):
    """peek_ahead from ops: (1 - c) shift(v, -1) + c v."""
    c = c.reshape(-1, 1, 1)
    return (1 - c) * ops.shift(v, -1, axis=-2) + c * v


def normalize(x, scale=None, eps=NORM_EPS):
    """y = s u,  u = x / (|x| + eps) over the last axis; s = 1, or a per-head scale (H, 1, 1) for x
    (..., H, T, d) (the key and value scales, applied in the same pass).

    Backward, n = |x|, gu = s g:  dx = (gu - x (u . gu) / n) / (n + eps)  (the term is 0 where x = 0),
    ds_h = sum of g . u over every row of head h.
    On a GPU: one warp per row, forward and backward (cuda_kernels.normalize_rows).
    """
    xp = x.xp
    parents = (x,) if scale is None else (x, scale)
    s = None if scale is None else scale.data
    if cuda_kernels.enabled("normalize", x.data):
        data = xp.ascontiguousarray(x.data)
        y, norm = cuda_kernels.normalize_rows(data, eps, s)
        return make_result(y, parents, lambda g: cuda_kernels.normalize_backward_rows(g, data, norm, eps, s))
    norm = xp.sqrt(backend.row_sum(x.data * x.data))
    inv = 1 / (norm + eps)
    u = x.data * inv
    y = u if s is None else u * s

    def backward(g):
        gu = g if s is None else g * s
        along = backend.row_sum(u * gu) / xp.where(norm > 0, norm, 1)
        dx = (gu - x.data * along) * inv
        return (dx,) if s is None else (dx, g * u)  # the engine sums g u down to (H, 1, 1)
    return make_result(y, parents, backward)


def normalize_reference(x, scale=None, eps=NORM_EPS):
    """normalize from ops: x / (sqrt(sum x^2) + eps) (* scale)."""
    u = x / (ops.sqrt((x * x).sum(axis=-1, keepdims=True)) + eps)
    return u if scale is None else u * scale


# ---------------------------------------------------------------- per-head scalars
# Each is one op (forward and backward side by side) rather than a chain of three or four tiny ones: on a
# GPU a small model's step is bound by the number of ops it issues. The chains are the references.
def head_decay(rate):
    """lambda_h = exp(-|FAST r_h|) for stored leak rates r (H,).   dlambda/dr = -FAST sign(r) lambda."""
    xp = rate.xp
    z = rate.data * FAST
    out = xp.exp(-xp.abs(z))
    return make_result(out, (rate,), lambda g: (g * out * xp.sign(z) * -FAST,))


def head_decay_reference(rate):
    return ops.exp(-ops.abs(rate * FAST))


def head_scale(log_scale, factor, max_log=None):
    """s_h = exp(min(factor l_h, max_log)) shaped (H, 1, 1), for stored log-scales l (H,).
    ds/dl = factor s, and 0 where the min clipped (as ops.clip: the gradient passes at the bound)."""
    xp = log_scale.xp
    z = log_scale.data * factor
    kept = None if max_log is None else z <= max_log
    out = xp.exp(z if max_log is None else xp.minimum(z, max_log)).reshape(-1, 1, 1)

    def backward(g):
        d = g.reshape(-1) * out.reshape(-1) * factor
        return (d if kept is None else d * kept,)
    return make_result(out, (log_scale,), backward)


def head_scale_reference(log_scale, factor, max_log=None):
    return ops.exp(ops.clip(log_scale * factor, None, max_log)).reshape(-1, 1, 1)


# ---------------------------------------------------------------- feature extractors
def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, hs), a view."""
    B, T, C = x.shape
    return ops.transpose(x.reshape(B, T, n_head, C // n_head), (0, 2, 1, 3))


def merge_heads(y):
    """(B, H, T, hs) -> (B * T, C): the heads side by side, rows ready for one GEMM."""
    B, H, T, hs = y.shape
    return ops.transpose(y, (0, 2, 1, 3)).reshape(B * T, H * hs)


def project(linear, x):
    """linear(x) for x (B, T, C) as one (B*T, C) GEMM (so dW is one GEMM too), back to (B, T, C')."""
    B, T, C = x.shape
    return linear(x.reshape(B * T, C)).reshape(B, T, -1)


def _per_head_scalar(values):
    """A float32 Parameter holding values / FAST (the 10x-faster storage)."""
    return nn.Parameter((np.asarray(values, dtype=np.float64) / FAST).astype(np.float32))


class KeyExtractor(nn.Module):
    """k_t = s_h^p kbar_t / (|kbar_t| + 1e-10),  kbar_t = W_k x_t + lambda_h kbar_{t-1}  (p = scale_power).

    forward(x (B, T, C), state=None) -> keys (B, H, T, hs). With a `state` dict (generation), the leaky
    sum continues from state['kbar'] and leaves its last value there.
    """

    def __init__(self, n_embd, n_head, bias=False, scale_power=1):
        self.n_head, self.scale_power = n_head, scale_power
        self.W_k = nn.Linear(n_embd, n_embd, bias=bias)
        self.leak_rate = _per_head_scalar(np.linspace(0.5, 5.0, n_head))
        self.log_scale = _per_head_scalar(np.ones(n_head))

    def decay(self):
        """lambda_h = exp(-b_h), b_h = |FAST leak_rate| >= 0.   (H,)"""
        return head_decay(self.leak_rate)

    def scale(self):
        """s_h^p = exp(min(p FAST log_scale, log(2^16 - 1))), shaped (H, 1, 1) to scale (B, H, T, hs)."""
        return head_scale(self.log_scale, FAST * self.scale_power, LOG_SCALE_MAX)

    def forward(self, x, state=None):
        decay = self.decay()
        kbar = leaky_average(split_heads(project(self.W_k, x), self.n_head), decay)  # (B, H, T, hs)
        if state is not None:
            if "kbar" in state:  # continue the sum: + lambda^(t+1) kbar_before (a constant)
                steps = kbar.xp.arange(1, kbar.shape[2] + 1, dtype=kbar.dtype)
                carried = (decay.data[:, None] ** steps)[:, :, None] * state["kbar"]
                kbar = kbar + Tensor(carried)
            state["kbar"] = kbar.data[:, :, -1:]                                 # (B, H, 1, hs)
        return normalize(kbar, self.scale())


class ValueExtractor(nn.Module):
    """v_t = sigma_h normalize((1 - c_h) W_v x_{t+1} + c_h W_v x_t),  W_v x_T = 0 (past the end).

    forward(x (B, T, C), state=None) -> values (B, H, T, hs). v_{T-1} is incomplete (its x_T is not known
    yet). With a `state` dict, the last W_v x of the previous call is kept in state['vtilde'] and the
    output gains one leading position: the now complete value of the previous call's last position.
    """

    def __init__(self, n_embd, n_head, bias=False):
        self.n_head = n_head
        self.W_v = nn.Linear(n_embd, n_embd, bias=bias)
        self.peek = nn.Parameter(nn.init_rng.uniform(0.0, 1.0, n_head).astype(np.float32))
        self.log_scale = _per_head_scalar(np.full(n_head, -0.5))

    def forward(self, x, state=None):
        vtilde = split_heads(project(self.W_v, x), self.n_head)                  # (B, H, T, hs)
        if state is not None:
            last = vtilde.data[:, :, -1:]
            if "vtilde" in state:
                vtilde = ops.concatenate([Tensor(state["vtilde"]), vtilde], axis=2)
            state["vtilde"] = last
        v = peek_ahead(vtilde, ops.clip(self.peek, 0.0, 1.0))
        return normalize(v, head_scale(self.log_scale, FAST))


# ---------------------------------------------------------------- the two memories
class ContextMemory(nn.Module):
    """y_t = W_o [sum_{s<t} softmax_s(k_t . k_s) v_s]_heads,  y_0 = W_o 0: an associative memory of the
    (key, value) pairs of this sequence so far.

    forward(x (B, T, C), state=None) -> (B, T, C). With a `state` dict (generation) the stored keys and
    the completed values of earlier calls are kept in it, so the next call attends to them.
    """

    def __init__(self, n_embd, n_head, n_layer=1, bias=False):
        self.n_head = n_head
        self.key = KeyExtractor(n_embd, n_head, bias)
        self.value = ValueExtractor(n_embd, n_head, bias)
        self.W_o = nn.Linear(n_embd, n_embd, bias=bias, std=(n_embd * n_layer) ** -0.5)

    def forward(self, x, state=None):
        B, T, C = x.shape
        k = self.key(x, state)                                                   # (B, H, T, hs)
        v = self.value(x, state)                                                 # (B, H, T(+1), hs)
        keys, values, past = k, v, 0
        if state is not None and "keys" in state:
            past = state["keys"].shape[2]
            keys = ops.concatenate([Tensor(state["keys"]), k], axis=2)           # (B, H, past + T, hs)
            values = ops.concatenate([Tensor(state["values"]), v], axis=2)
        if state is not None:
            state["keys"], state["values"] = keys.data, values.data[:, :, :-1]  # the last is incomplete
        y = softmax_attention(k, keys, values, mask=causal_mask(k.xp, T, past, include_present=False))
        return self.W_o(merge_heads(y)).reshape(B, T, C)

    def kernel_weights(self, x):
        """softmax_s(k_t . k_s) for s < t: (B, H, T, T) raw array (no graph)."""
        k = self.key(x).data
        return attention_weights(k, k, causal_mask(get_array_module(k), k.shape[2], 0, False))


class PersistentMemory(nn.Module):
    """y_t = W_o [sigma_h mean_banks sum_j softmax_j(k_t . P_k[j]) P_v[j]]_heads: an associative memory
    whose (key, value) pairs are parameters, learned over the whole training set (the transformer's MLP).

    Per head, the B*T queries meet the slots in one GEMM: (H, B*T, hs) @ (banks, H, hs, pmem_size).
    """

    def __init__(self, n_embd, n_head, pmem_size, pmem_count=1, n_layer=1, bias=False):
        self.n_head = n_head
        hs = n_embd // n_head
        self.key = KeyExtractor(n_embd, n_head, bias, scale_power=2)
        self.P_k = nn.normal((pmem_count, n_head, pmem_size, hs), hs ** -0.5)
        self.P_v = nn.normal((pmem_count, n_head, pmem_size, hs), hs ** -0.5)
        self.log_scale = _per_head_scalar(np.full(n_head, -0.5))
        self.W_o = nn.Linear(n_embd, n_embd, bias=bias, std=(n_embd * n_layer) ** -0.5)

    def _queries(self, x, state=None):
        k = self.key(x, state)                                                   # (B, H, T, hs)
        B, H, T, hs = k.shape
        return ops.transpose(k, (1, 0, 2, 3)).reshape(H, B * T, hs)              # (H, B*T, hs)

    def forward(self, x, state=None):
        B, T, C = x.shape
        H = self.n_head
        y = softmax_attention(self._queries(x, state), self.P_k, self.P_v)      # (banks, H, B*T, hs)
        y = y.mean(axis=0) * head_scale(self.log_scale, FAST)                    # (H, B*T, hs)
        y = ops.transpose(y.reshape(H, B, T, C // H), (1, 0, 2, 3))              # (B, H, T, hs)
        return self.W_o(merge_heads(y)).reshape(B, T, C)

    def kernel_weights(self, x):
        """softmax_j(k_t . P_k[j]) averaged over banks: (B, H, T, pmem_size) raw array (no graph)."""
        B, T, _ = x.shape
        w = attention_weights(self._queries(x).data, self.P_k.data).mean(axis=0)  # (H, B*T, slots)
        return w.reshape(self.n_head, B, T, -1).transpose(1, 0, 2, 3)
