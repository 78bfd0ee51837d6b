"""The fast layer's replacements for the core's @replaceable functions, on NumPy and on CuPy.

Each function here takes the arguments of the plain function it replaces (named in REPLACEMENTS) and
gives the same result: the same values (to rounding) and the same gradients. It returns NotImplemented
for inputs it does not handle (another device, dropout, a kernel switched off), and the plain function
runs. tests/test_fast.py checks every pair, in float64 and float32, on the CPU and on a GPU.

  ops.matmul              CPU: big 2-D products in blocks on the pool; GPU: recordable in a CUDA graph
  ops.gelu                CPU, float32: a float32-exact erf, in-place passes over row blocks on all cores
  ops.layer_norm          CPU: the same, both passes; GPU: one CUDA block per row
  ops.cross_entropy       CPU: softmax rows on the pool, kept for a one-pass backward
  ops.embedding           CPU: the backward as sums over runs of sorted ids (np.add.reduceat)
  memories.softmax_attention  CPU: tiled, flash-style, on the pool; GPU: two fused passes and kernels
  memories.leaky_average  CPU: chunked scan (products inside chunks of 16); GPU: one thread per channel
  memories.normalize      CPU: row blocks on the pool, row sums through BLAS; GPU: one warp per row
  optim.adamw_update      CPU: big parameters over row blocks on the pool; GPU: the update in one pass,
                          its rates readable from a CUDA graph
  tensor.sum_to           GPU: big multi-axis sums one axis at a time
"""
import functools
import math

import numpy as np

from .. import memories, precision
from ..backend import get_array_module
from ..ops import _pair
from ..tensor import Tensor, broadcast_axes, make_result
from . import cpu, cuda_kernels

LEAKY_CHUNK = 16            # positions per chunk of the CPU scan: on 2 EPYC cores 8 and 16 tie
TILE_SCORES = cpu.l2_cache_bytes() // 4   # scores per attention tile: a core's L2 cache in float32
LOG2_E = 1 / math.log(2)
SMALL_ATTENTION = 1 << 15   # scores below which the plain attention is faster (a generated token's)
ROW_BLOCKS_PER_TASK = 4     # row blocks one thread runs in a row in the attention's backward (see _tiled_attention)
BOUND_SHIFT_MAX = 63        # base 2: shifts up to this keep every exp2(s - shift) >= 2^-126, a normal float32
STAGED_SUM_MIN = 1 << 20    # elements from which a multi-axis sum on CuPy goes axis by axis
capture_product = None      # while a CUDA graph records: its recordable a @ b (cuda_graph.CaptureBlas)


def _on_numpy(*arrays):
    return get_array_module(*arrays) is np


def product(a, b):
    """a @ b: on the CPU pool, through a recording cuBLAS handle while a graph records, else plainly."""
    if _on_numpy(a, b):
        return cpu.matmul(a, b)
    return a @ b if capture_product is None else capture_product(a, b)


# ---------------------------------------------------------------- ops.matmul
def matmul(a, b):
    """ops.matmul with its three products through `product`. A batch of rows times one matrix,
    (..., K) @ (K, N) as in every Linear layer, is one (rows, K) @ (K, N) product: its weight gradient
    is then one product with an inner dimension of all the rows, not a product per batch entry summed
    afterwards."""
    a, b = _pair(a, b)
    if a.ndim < 2 or b.ndim < 2:
        return NotImplemented  # the plain op says what is wrong
    if a.ndim > 2 and b.ndim == 2:
        rows = a.data.reshape(-1, a.shape[-1])                                   # (rows, K)

        def rows_backward(g):
            g = g.reshape(-1, g.shape[-1])                                       # (rows, N)
            return product(g, b.data.T).reshape(a.shape), product(rows.T, g)
        return make_result(product(rows, b.data).reshape(a.shape[:-1] + (b.shape[-1],)), (a, b),
                           rows_backward)

    def backward(g):
        return product(g, b.data.swapaxes(-1, -2)), product(a.data.swapaxes(-1, -2), g)
    return make_result(product(a.data, b.data), (a, b), backward)


# ---------------------------------------------------------------- ops.gelu (CPU, float32)
ERF_P, ERF_A = 0.3275911, (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
SIGN_BIT = np.uint32(0x80000000)


def gelu(a):
    """ops.gelu for float32 NumPy arrays, as in-place passes over row blocks on the pool (cpu.map_blocks).

    SciPy's erf is exact but ~40x slower than NumPy's tanh. Here, with s = 1 / (1 + p |x| / sqrt 2),
    q = Phi(-|x|) = poly(s) exp(-x^2 / 2) / 2 (Abramowitz & Stegun 7.1.26 for erfc, absolute error
    < 1.5e-7: float32's rounding), and Phi(x) = 1/2 + sign(x) (1/2 - q). The sign is copied as a bit
    (NumPy's copysign is not vectorised: ~5x slower than two integer passes). Kept for the backward:
    Phi(x) - 1/2 and exp(-x^2 / 2), so dx = g (Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi)) is five passes.
    float64 inputs get the exact plain op.
    """
    x = a.data
    if not _on_numpy(x) or x.dtype != np.float32:
        return NotImplemented
    f = np.float32
    half_poly = [f(c / 2) for c in ERF_A]          # q = (poly / 2)(s) exp(-x^2 / 2)
    centred, e, out = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)

    def forward(centred, e, out, x):
        np.multiply(x, x, out=e)
        e *= f(-0.5)
        np.exp(e, out=e)                                                         # exp(-x^2 / 2)
        s = centred                                                              # (scratch until the end)
        np.abs(x, out=s)
        s *= f(ERF_P / math.sqrt(2))
        s += f(1)
        np.divide(f(1), s, out=s)                                                # s
        np.multiply(s, half_poly[4], out=out)
        for coefficient in reversed(half_poly[:4]):
            out += coefficient
            out *= s
        out *= e                                                                 # q = Phi(-|x|)
        np.subtract(f(0.5), out, out=centred)                                    # 1/2 - q >= 0
        sign = out.view(np.uint32)
        np.bitwise_and(x.view(np.uint32), SIGN_BIT, out=sign)
        np.bitwise_or(centred.view(np.uint32), sign, out=centred.view(np.uint32))  # Phi(x) - 1/2
        np.add(centred, f(0.5), out=out)
        out *= x                                                                 # x Phi(x)
    cpu.map_blocks(forward, centred, e, out, x)

    def backward(g):
        def derivative(dx, centred, e, x, g):
            np.multiply(x, e, out=dx)
            dx *= f(1 / math.sqrt(2 * math.pi))                                  # x phi(x)
            dx += centred
            dx += f(0.5)
            dx *= g
        dx = np.empty(x.shape, g.dtype)
        cpu.map_blocks(derivative, dx, centred, e, x, g)
        return (dx,)
    return make_result(out, (a,), backward)


# ---------------------------------------------------------------- ops.cross_entropy (CPU)
def cross_entropy(logits, targets, ignore_index=-1):
    """ops.cross_entropy on the CPU over row blocks on the pool. The forward leaves softmax(logits) in
    one array, computed as exp2((z - max) log2 e) (NumPy's float32 exp2 is faster than its exp) with
    row sums as products; the backward is then one pass, (softmax - onehot) g / n_counted."""
    z = logits.data
    if not _on_numpy(z) or z.dtype not in (np.float32, np.float64):
        return NotImplemented
    z = z.reshape(-1, z.shape[-1])                                               # (rows, V)
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)
    keep = t != ignore_index
    safe_t = np.where(keep, t, 0)
    rows = np.arange(len(t))
    one = z.dtype.type
    probs, lse = np.empty(z.shape, z.dtype), np.empty((len(t), 1), z.dtype)

    def softmax_rows(probs, lse, z):
        m = z.max(axis=-1, keepdims=True)
        np.subtract(z, m, out=probs)
        probs *= one(LOG2_E)
        np.exp2(probs, out=probs)
        total = cpu.row_sum(probs)
        probs /= total
        np.add(m, np.log(total), out=lse)                                        # log sum exp
    cpu.map_blocks(softmax_rows, probs, lse, z)
    count = max(int(keep.sum()), 1)
    loss = ((lse[:, 0] - z[rows, safe_t]) * keep).sum() / count

    def backward(g):
        def scale_rows(grad, probs, row_scale):
            np.multiply(probs, row_scale, out=grad)
        row_scale = (keep * (g / count)).astype(z.dtype)[:, None]                # (rows, 1)
        grad = np.empty(z.shape, z.dtype)
        cpu.map_blocks(scale_rows, grad, probs, row_scale)
        grad[rows, safe_t] -= row_scale[:, 0]                                    # - onehot g / n
        return (grad.reshape(logits.shape),)
    return make_result(np.asarray(loss, z.dtype), (logits,), backward)


# ---------------------------------------------------------------- ops.embedding (CPU)
def embedding(weight, ids):
    """ops.embedding on the CPU, its backward as sums over runs of equal ids: the ids sorted (stably, so
    each row's rows are added in their order), then np.add.reduceat over each run, instead of np.add.at,
    which adds one row at a time (char-small: 6.8 -> 1.3 ms; tok-small: 9.7 -> 3.7 ms)."""
    if not _on_numpy(weight.data):
        return NotImplemented
    ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)

    def backward(g):
        flat = ids.reshape(-1)
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])          # each run's first
        grad = np.zeros(weight.shape, g.dtype)
        if flat.size:
            rows = g.reshape(-1, weight.shape[-1])[order]                          # (N, C), sorted by id
            grad[ordered[starts]] = np.add.reduceat(rows, starts, axis=0)
        return (grad,)
    return make_result(weight.data[ids], (weight,), backward)


# ---------------------------------------------------------------- ops.layer_norm
def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """ops.layer_norm: on the CPU both passes over row blocks on the pool, in place, every row mean a
    product with a (1/C, ..., 1/C) vector (NumPy's reductions are slow on rows of a few hundred) and the
    weight and bias gradients summed per block; on a GPU one CUDA block per row."""
    data = x.data
    w = None if weight is None else weight.data
    b = None if bias is None else bias.data
    if cuda_kernels.enabled("layer_norm", data):
        return _layer_norm_gpu(x, weight, bias, eps)
    if not _on_numpy(data) or data.dtype not in (np.float32, np.float64):
        return NotImplemented  # (float16: the plain op computes in float32)
    mean_of = np.full(data.shape[-1], 1 / data.shape[-1], data.dtype)          # x @ mean_of: row means
    xhat, rstd = np.empty(data.shape, data.dtype), np.empty(data.shape[:-1] + (1,), data.dtype)
    affine = w is not None or b is not None
    out = np.empty(data.shape, data.dtype) if affine else xhat

    def normalize_rows(out, xhat, rstd, x):
        np.subtract(x, (x @ mean_of)[..., None], out=xhat)                         # x - mean
        squares = out if affine else np.empty_like(xhat)
        np.multiply(xhat, xhat, out=squares)
        np.add((squares @ mean_of)[..., None], eps, out=rstd)                      # var + eps
        np.sqrt(rstd, out=rstd)
        np.divide(1, rstd, out=rstd)
        xhat *= rstd
        if w is not None:
            np.multiply(xhat, w, out=out)
        elif affine:
            np.copyto(out, xhat)
        if b is not None:
            out += b
    cpu.map_blocks(normalize_rows, out, xhat, rstd, data)

    def backward(g):
        dx = np.empty(data.shape, g.dtype)
        blocks = cpu.block_count(dx)
        dw = np.zeros((blocks, data.shape[-1]), g.dtype) if w is not None else None   # per-block sums,
        db = np.zeros((blocks, data.shape[-1]), g.dtype) if b is not None else None   # added in order

        def input_grad(i, dx, g, xhat, rstd):
            scratch = np.empty_like(dx)
            if w is not None:
                np.multiply(g, w, out=dx)                                          # dxhat
            else:
                np.copyto(dx, g)
            np.multiply(dx, xhat, out=scratch)
            xhat_term = (scratch @ mean_of)[..., None]                             # mean(dxhat xhat)
            dx -= (dx @ mean_of)[..., None]                                        # - mean(dxhat)
            np.multiply(xhat, xhat_term, out=scratch)
            dx -= scratch
            dx *= rstd
            if dw is not None:
                np.multiply(g, xhat, out=scratch)
                dw[i] = _column_sums(scratch)
            if db is not None:
                db[i] = _column_sums(g)
        cpu.map_blocks(input_grad, dx, g, xhat, rstd, index=True)
        return (dx,) + tuple(partial.sum(axis=0) for partial in (dw, db) if partial is not None)
    return make_result(out, (x,) + tuple(p for p in (weight, bias) if p is not None), backward)


def _column_sums(a):
    """The sum of all rows of a (..., C) array, (C,), as one product with a ones vector."""
    rows = a.reshape(-1, a.shape[-1])
    return np.ones(rows.shape[0], a.dtype) @ rows


def _layer_norm_gpu(x, weight, bias, eps):
    """ops.layer_norm on a GPU: one CUDA block per row (cuda_kernels.layer_norm_rows and its backward)."""
    w = None if weight is None else weight.data
    out, xhat, rstd = cuda_kernels.layer_norm_rows(x.data, w, None if bias is None else bias.data, eps)

    def backward(g):
        dx = cuda_kernels.layer_norm_backward_rows(g, w, xhat, rstd)
        return (dx,) + ((g * xhat,) if weight is not None else ()) + ((g,) if bias is not None else ())
    return make_result(out, (x,) + tuple(p for p in (weight, bias) if p is not None), backward)


# ---------------------------------------------------------------- memories.softmax_attention
def softmax_attention(q, k, v, mask=None, scale=1.0, dropout=0.0):
    """memories.softmax_attention without dropout: tiled on the CPU, dense with kernels on a GPU.

    Both keep P = e r (e = exp(scores - shift), r = 1 / rowsum e) or its row log-normalisers, never the
    softmax's graph. The backward takes delta = rowsum(dP * P) from the same rounded dP and P that dS
    uses: when a head's key scale saturates, P's rows are one-hot, dP - delta is exactly 0 where P is
    1, and no rounding residue is amplified by the key scale (the identity delta = g . y would leave one).
    The CPU's tiles take the identity only where a bound on the scores keeps that residue small.
    """
    if dropout:
        return NotImplemented
    if _on_numpy(q.data):
        if q.dtype not in (np.float32, np.float64):
            return NotImplemented  # (float16: the plain op computes in float32; the bound assumes its range)
        scores = math.prod(np.broadcast_shapes(q.shape[:-1], k.shape[:-2] + (1,))) * k.shape[-2]
        return NotImplemented if scores < SMALL_ATTENTION else _tiled_attention(q, k, v, mask, scale)
    return _dense_attention(q, k, v, mask, scale)


def _softmax_terms(q, k, mask, scale):
    """e = exp(scale q k^T - rowmax) with masked entries 0, and r = 1 / rowsum(e): softmax = e * r."""
    xp = get_array_module(q)
    e = product(q, k.swapaxes(-1, -2))                                           # (..., Tq, Tk)
    if cuda_kernels.enabled("softmax_rows", e):
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
    denom[denom == 0] = 1                       # only fully masked rows
    return e, 1 / denom


def _dense_attention(q, k, v, mask, scale):
    """On whole arrays (the GPU path): keeps e (..., Tq, Tk) and r."""
    e, r = _softmax_terms(q.data, k.data, mask, scale)
    y = product(e, v.data)
    y *= r

    def backward(g):
        # The (Tq, Tk) arrays are only read as stored: X^T Y is computed as (Y^T X)^T, whose transposes
        # touch only the small operands (a transposed view of a batched array can make cuBLAS copy it).
        g_r = g * r                                                              # (..., Tq, dv)
        dv = product(g_r.swapaxes(-1, -2), e).swapaxes(-1, -2)                   # P^T g
        ds = product(g_r, v.data.swapaxes(-1, -2))                               # r dP, (..., Tq, Tk)
        delta = (ds * e).sum(axis=-1, keepdims=True) * r                         # r rowsum(dP * P)
        if cuda_kernels.enabled("attention_score_grad", ds):
            cuda_kernels.attention_score_grad(ds, e, delta, scale)               # scale e (ds - delta)
        else:
            ds -= delta
            ds *= e
            if scale != 1.0:
                ds *= scale
        dq = product(ds, k.data)
        return dq, product(q.data.swapaxes(-1, -2), ds).swapaxes(-1, -2), dv     # dk = dS^T q
    return make_result(y, (q, k, v), backward)


def _tiles(batch, Tq, Tk, mask, workers):
    """[(b0, b1, r0, r1, kend)], by batch slice then rows: blocks of batch slices and query rows holding
    about TILE_SCORES scores, each with all the keys its rows may use ([:kend]: causal rows skip the
    future). With a mask, rows come in at least 4 chunks so the upper triangle is mostly skipped. There
    are at least two batch slices for each of the `workers` threads where the batch allows, so that a core
    slowed by another process takes fewer."""
    if mask is None:
        last = np.full(Tq, Tk)
    else:
        last = np.where(mask.any(axis=1), Tk - mask[:, ::-1].argmax(axis=1), 0)   # (Tq,) keys used
    rows = max(1, min(Tq, TILE_SCORES // Tk, Tq if mask is None else -(-Tq // 4)))
    group = max(1, min(-(-batch // (2 * workers)), TILE_SCORES // (rows * Tk)))
    return [(b0, min(b0 + group, batch), r0, min(r0 + rows, Tq), int(last[r0:r0 + rows].max()))
            for b0 in range(0, batch, group) for r0 in range(0, Tq, rows)]


def _tiled_attention(q, k, v, mask, scale):
    """Block by block on the pool (NumPy): each block of rows gets its scores, softmax and weighted sum
    while they are in cache. The (Tq, Tk) weights are never stored: the forward keeps the row
    log-normalisers lse = m + log rowsum e, and the backward recomputes P = exp(s - lse) per block
    (one more q k^T product, flash-attention style). Scores are kept in base 2 (the keys scaled by
    scale log2 e once): exp(s - m) = exp2(s log2 e - m log2 e), and NumPy's float32 exp2 is both faster
    than its exp (~0.4 against ~0.7 ns per number on AVX-512) and more accurate (under 1 ulp).

    Passes over the (rows, keys) blocks are what the products leave of the time, so two subtractions ride
    inside the products, as one more column of the left operand against a column of ones on the right:
    - the softmax's shift m. Softmax(s) = softmax(s - m) for any m; it need not be each row's max (a pass
      for the max, NumPy's slowest, and one to subtract it). Here m_i = |q_i| max_j |k_j| >= s_ij
      (Cauchy-Schwarz), known before the scores: then every exp2(s - m) lies in [2^-2m, 1], normal
      float32 numbers, as exact as with the max, while m <= BOUND_SHIFT_MAX. The backward puts -lse
      in the same column, so the product gives s - lse.
    - delta = rowsum(dP * P), through the identity delta_i = g_i . y_i, so that the product gives dP - delta.
    A batch entry whose bound is larger (a saturated key scale, s ~ e^11) shifts by each row's max and
    takes delta from its own rounded dP and P, so that dS is exactly 0 where P is one-hot: the identity's
    rounding residue would be amplified by s^2 there (docs/memory-mosaics.md, "Saturated heads").
    """
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    Tq, (Tk, dv), d = q.shape[-2], v.shape[-2:], q.shape[-1]

    def flat(a, n):
        return np.broadcast_to(a, batch + a.shape[-2:]).reshape(-1, n, a.shape[-1])

    def with_ones(a, factor=None, dot_with=None):
        """[a factor, 1]: a (nb, n, width) copied into a new (nb, n, width + 1) on the pool (these copies
        are most of the setup); and, where dot_with is given, each row's a . dot_with (nb, n, 1)."""
        out, dots = np.empty(a.shape[:-1] + (a.shape[-1] + 1,), q.dtype), np.empty(a.shape[:-1] + (1,), q.dtype)

        def fill(out, dots, a, b):
            np.multiply(a, 1 if factor is None else factor, out=out[..., :-1])
            out[..., -1] = 1
            if dot_with is not None:
                np.einsum("...j,...j->...", a, b, out=dots[..., 0])
        cpu.map_blocks(fill, out, dots, a, a if dot_with is None else dot_with)
        return out, dots
    q_in, k_in = flat(q.data, Tq), flat(k.data, Tk)                              # (nb, T, d)
    c = q.dtype.type(scale * LOG2_E)
    q_ext, q_square = with_ones(q_in, dot_with=q_in)                             # [q, 1], |q_i|^2
    k_one, k_square = with_ones(k_in, c, dot_with=None if k.data is q.data else k_in)   # [c k, 1]
    if k.data is q.data:  # K K^T (the context memory): the same norms
        k_square = q_square
    qs, kf, vf = q_ext[..., :d], k_one[..., :d], flat(v.data, Tk)                # (nb, T, d) views
    nb = q_ext.shape[0]
    m = np.sqrt(q_square) * (abs(c) * np.sqrt(k_square.max(axis=(1, 2), keepdims=True)))  # (nb, Tq, 1)
    by_row_max = m.max(axis=(1, 2)) > BOUND_SHIFT_MAX                            # (nb,): entries beyond the bound
    m[by_row_max] = 0
    np.negative(m, out=q_ext[..., d:])                                           # [q, -m]
    bias = None if mask is None else np.where(mask, 0, -np.inf).astype(q.dtype)  # (Tq, Tk)
    workers = cpu.cpu_workers()
    tiles = _tiles(nb, Tq, Tk, None if mask is None else np.asarray(mask), workers)
    row_max_entries = {(b0, b1): np.flatnonzero(by_row_max[b0:b1]) for b0, b1, *_ in tiles}  # in each slice
    y = np.zeros((nb, Tq, dv), q.dtype)
    lse = np.zeros((nb, Tq, 1), q.dtype)

    def forward_tile(worker, i):
        b0, b1, r0, r1, kend = tiles[i]
        if kend == 0:  # every row fully masked: y = 0
            return
        e = q_ext[b0:b1, r0:r1] @ k_one[b0:b1, :kend].swapaxes(-1, -2)           # s - m, (G, rows, kend)
        if bias is not None:
            e += bias[r0:r1, :kend]
        for entry in row_max_entries[b0, b1]:  # (m = 0 there: e = s)
            row_max = e[entry].max(axis=-1, keepdims=True)
            row_max[~np.isfinite(row_max)] = 0      # fully masked rows: e = 0 below
            e[entry] -= row_max
            m[b0 + entry, r0:r1] = row_max
        np.exp2(e, out=e)
        total = cpu.row_sum(e)
        total[total == 0] = 1
        out = y[b0:b1, r0:r1]
        np.matmul(e, vf[b0:b1, :kend], out=out)
        out /= total
        lse[b0:b1, r0:r1] = m[b0:b1, r0:r1] + np.log2(total)                     # (base 2)

    cpu.parallel_tiles(forward_tile, len(tiles), workers)

    # The backward's tasks: runs of up to ROW_BLOCKS_PER_TASK row blocks of one batch slice, in order of
    # rows. Row blocks of a slice share its keys, so each task sums its blocks' dk and dv in buffers of its
    # own, added up in a fixed order at the end: the result does not depend on which thread ran which
    # task (bitwise the same for any number of threads, and from one run to the next).
    slices = {}
    for tile in tiles:
        slices.setdefault(tile[:2], []).append(tile)
    tasks = [run[i:i + ROW_BLOCKS_PER_TASK] for run in slices.values()
             for i in range(0, len(run), ROW_BLOCKS_PER_TASK)]

    def backward(g):
        g_ext, delta = with_ones(g.reshape(nb, Tq, dv), dot_with=y)              # [g, 1], g . y
        v_one, _ = with_ones(vf)                                                 # [v, 1]
        delta[by_row_max] = 0
        np.negative(delta, out=g_ext[..., dv:])                                  # [g, -delta]
        gs = g_ext[..., :dv]
        np.negative(lse, out=q_ext[..., d:])
        dq = np.zeros(qs.shape, q.dtype)
        sums = [None] * len(tasks)                                               # each task's (dk, dv)

        def backward_tile(b0, b1, r0, r1, kend, dk, dvs):
            if kend == 0:
                return
            p = q_ext[b0:b1, r0:r1] @ k_one[b0:b1, :kend].swapaxes(-1, -2)       # s - lse
            if bias is not None:
                p += bias[r0:r1, :kend]
            np.exp2(p, out=p)                                                    # P, (G, rows, kend)
            dvs[:, :kend] += p.swapaxes(-1, -2) @ gs[b0:b1, r0:r1]
            ds = g_ext[b0:b1, r0:r1] @ v_one[b0:b1, :kend].swapaxes(-1, -2)      # dP - delta
            for entry in row_max_entries[b0, b1]:  # (delta = 0 there: ds = dP)
                ds[entry] -= np.einsum("ij,ij->i", ds[entry], p[entry])[:, None]
            ds *= p                                                              # dS / scale
            dq[b0:b1, r0:r1] = ds @ kf[b0:b1, :kend]
            dk[:, :kend] += ds.swapaxes(-1, -2) @ qs[b0:b1, r0:r1]

        def backward_task(worker, i):
            b0, b1 = tasks[i][0][:2]
            dk = np.zeros((b1 - b0, Tk, d), q.dtype)                             # this slice's keys
            dvs = np.zeros((b1 - b0, Tk, dv), q.dtype)
            for tile in tasks[i]:
                backward_tile(*tile, dk, dvs)
            sums[i] = dk, dvs

        cpu.parallel_tiles(backward_task, len(tasks), workers)
        dk, dvs = np.zeros((nb, Tk, d), q.dtype), np.zeros((nb, Tk, dv), q.dtype)
        for task, (dk_task, dv_task) in zip(tasks, sums):
            b0, b1 = task[0][:2]
            dk[b0:b1] += dk_task
            dvs[b0:b1] += dv_task
        dq *= q.dtype.type(1 / LOG2_E)                                           # (kf carries scale log2 e)
        if scale != 1.0:
            dk *= q.dtype.type(scale)

        def shape(a, n):
            return a.reshape(batch + (n, a.shape[-1]))
        return shape(dq, Tq), shape(dk, Tk), shape(dvs, Tk)
    return make_result(y.reshape(batch + (Tq, dv)), (q, k, v), backward)


# ---------------------------------------------------------------- memories.leaky_average
def leaky_average(x, decay):
    """memories.leaky_average: one CUDA thread per (batch, head, channel) on a GPU; on the CPU a chunked
    scan, whose products replace most of the recurrence's Python steps."""
    if cuda_kernels.enabled("leaky_scan", x.data):
        y = cuda_kernels.leaky_scan(x.data, decay.data)
        return make_result(y, (x, decay), lambda g: cuda_kernels.leaky_scan_backward(g, y, decay.data))
    if not _on_numpy(x.data) or x.shape[2] < 2 * LEAKY_CHUNK:  # a few steps: the recurrence is cheaper
        return NotImplemented
    y = chunked_scan(x.data, decay.data, LEAKY_CHUNK)

    def backward(g):
        a = chunked_scan(g, decay.data, LEAKY_CHUNK, reverse=True)
        return a, np.einsum("bhtd,bhtd->h", a[:, :, 1:], y[:, :, :-1])
    return make_result(y, (x, decay), backward)


def chunked_scan(x, decay, chunk, reverse=False):
    """kbar_t = x_t + decay kbar_{t-1} along axis 2 of x (B, H, T, hs); decay (H,). reverse=True runs
    backwards in time: a_t = x_t + decay a_{t+1}.

    Inside chunks of L positions kbar = M x with M[t, s] = decay^(t - s) (s <= t); then each chunk adds
    decay^(t+1) times the last kbar of the chunk before it. chunk = 1 is the plain recurrence.
    """
    B, H, T, hs = x.shape
    L = max(1, min(chunk, T))
    n = -(-T // L)
    if n * L != T:  # zeros at the end change nothing, either way in time
        x = np.concatenate([x, np.zeros((B, H, n * L - T, hs), x.dtype)], axis=2)
    i = np.arange(L, dtype=x.dtype)
    lag = i[:, None] - i[None, :]                                                # (L, L): t - s
    within = decay[:, None, None] ** np.maximum(lag, 0) * (lag >= 0)             # (H, L, L)
    carry = (decay[:, None] ** (i + 1))[:, :, None]                              # (H, L, 1)
    if reverse:  # M^T, and the carry comes from the first position of the next chunk
        within, carry = within.swapaxes(-1, -2), carry[:, ::-1]
    y = within[:, None] @ x.reshape(B, H, n, L, hs)                              # (B, H, n, L, hs)
    for c in (range(n - 2, -1, -1) if reverse else range(1, n)):
        y[:, :, c] += carry * (y[:, :, c + 1, :1] if reverse else y[:, :, c - 1, -1:])
    return y.reshape(B, H, n * L, hs)[:, :, :T]


# ---------------------------------------------------------------- memories.normalize
def normalize(x, scale=None, eps=memories.NORM_EPS):
    """memories.normalize: one warp per row on a GPU. On the CPU, row blocks on the pool, each row's
    sums a product with a ones vector (cpu.row_sum), and u = x / (|x| + eps) never stored: the forward
    keeps 1 / (|x| + eps) per row, and the backward needs only the row dot products x . g, as
    dx = g s / (n + eps) - x (x . g) s / (n (n + eps)^2) and ds_h = sum over head h's rows of (x . g) / (n + eps)."""
    parents = (x,) if scale is None else (x, scale)
    s = None if scale is None else scale.data
    if cuda_kernels.enabled("normalize", x.data):
        data = x.data if x.data.flags.c_contiguous else x.data.copy()
        y, norm = cuda_kernels.normalize_rows(data, eps, s)
        return make_result(y, parents, lambda g: cuda_kernels.normalize_backward_rows(g, data, norm, eps, s))
    if not _on_numpy(x.data):
        return NotImplemented
    data = np.ascontiguousarray(x.data)
    rows = data.shape[:-1] + (1,)
    row_scale = np.ones(rows, data.dtype) if s is None else np.ascontiguousarray(np.broadcast_to(s, rows))
    y, norm, inv = np.empty(data.shape, data.dtype), np.empty(rows, data.dtype), np.empty(rows, data.dtype)

    def forward(y, norm, inv, x, row_scale):
        np.multiply(x, x, out=y)
        np.sqrt(cpu.row_sum(y), out=norm)                                        # n = |x|
        np.add(norm, eps, out=inv)
        np.divide(1, inv, out=inv)                                               # 1 / (n + eps)
        np.multiply(x, inv * row_scale, out=y)                                   # s u
    cpu.map_blocks(forward, y, norm, inv, data, row_scale)

    def backward(g):
        dx, along = np.empty(data.shape, g.dtype), np.empty(rows, g.dtype)

        def input_grad(dx, along, g, x, norm, inv, row_scale):
            np.multiply(x, g, out=dx)
            np.multiply(cpu.row_sum(dx), inv, out=along)                         # u . g
            np.multiply(g, inv * row_scale, out=dx)
            safe_norm = np.where(norm > 0, norm, 1)
            dx -= x * (along * row_scale * inv / safe_norm)                      # (0 where x = 0)
        cpu.map_blocks(input_grad, dx, along, np.ascontiguousarray(g), data, norm, inv, row_scale)
        if s is None:
            return (dx,)
        return dx, along.sum(axis=broadcast_axes(along.shape, s.shape), keepdims=True).reshape(s.shape)
    return make_result(y, parents, backward)


# ---------------------------------------------------------------- optim.adamw_update (GPU)
rates_recorder = None   # while a CUDA graph records or replays: cuda_graph's AdamW rate slots


def adamw_update(p, g, m, v, lr, betas, eps, weight_decay, t):
    """optim.adamw_update in one CUDA pass. Its three step-dependent numbers (keep = 1 - lr wd,
    step_size = lr / (1 - b1^t), 1 / sqrt(1 - b2^t)) are kernel arguments, or, while a CUDA graph
    records, a row of a device array that each replay refreshes (`rates_recorder`)."""
    if _on_numpy(p):
        return _adamw_update_cpu(p, g, m, v, lr, betas, eps, weight_decay, t)
    if not cuda_kernels.enabled("adamw", p):
        return NotImplemented
    b1, b2 = betas
    rates = (1 - lr * weight_decay, lr / (1 - b1 ** t), 1 / math.sqrt(1 - b2 ** t))
    if rates_recorder is not None:
        device_rates = rates_recorder(rates)
        if device_rates is None:  # a replay's bookkeeping: the graph does the update
            return None
        cuda_kernels.adamw_update_from(p, g, m, v, device_rates, b1, b2, eps)
    else:
        cuda_kernels.adamw_update(p, g, m, v, rates, b1, b2, eps)
    return None


def _adamw_update_cpu(p, g, m, v, lr, betas, eps, weight_decay, t):
    """optim.adamw_update on the CPU for big parameters: the same passes, in place, over row blocks on the
    pool (a token embedding of millions of numbers is updated on all cores, in cache)."""
    if p.size < cpu.ELEMENTWISE_MIN or not all(a.flags.c_contiguous for a in (p, m, v)):
        return NotImplemented
    (b1, b2), one = betas, p.dtype.type
    keep, step_size, rms_correction = 1 - lr * weight_decay, lr / (1 - b1 ** t), 1 / math.sqrt(1 - b2 ** t)

    def update(p, g, m, v):
        scratch = np.empty_like(p)
        if weight_decay:
            p *= one(keep)
        m *= one(b1)
        np.multiply(g, one(1 - b1), out=scratch)
        m += scratch                                                             # b1 m + (1 - b1) g
        v *= one(b2)
        np.multiply(g, g, out=scratch)
        scratch *= one(1 - b2)
        v += scratch                                                             # b2 v + (1 - b2) g^2
        np.sqrt(v, out=scratch)
        scratch *= one(rms_correction)
        scratch += one(eps)                                                      # sqrt(vhat) + eps
        np.divide(m, scratch, out=scratch)
        scratch *= one(step_size)
        p -= scratch
    cpu.map_blocks(update, p, g, m, v)
    return None


# ---------------------------------------------------------------- tensor.sum_to (GPU)
def sum_to(grad, shape):
    """tensor.sum_to on CuPy for big arrays, one axis at a time: CuPy's reductions give each output
    element one block, so a few outputs fed by millions of inputs (a per-head gradient summed over
    batch, time and channels) would keep most of the GPU idle; axis by axis, every stage is wide."""
    if _on_numpy(grad) or grad.size < STAGED_SUM_MIN or grad.shape == tuple(shape):
        return NotImplemented
    for axis in broadcast_axes(grad.shape, shape):
        grad = grad.sum(axis=axis, keepdims=True)
    return grad.reshape(shape)


def _full_precision_only(replacement):
    """The replacement, declining inside precision.autocast: the plain ops carry the policy's casts."""
    @functools.wraps(replacement)
    def declines_under_autocast(*args, **kwargs):
        return NotImplemented if precision.low_dtype() is not None else replacement(*args, **kwargs)
    return declines_under_autocast


REPLACEMENTS = {name: _full_precision_only(replacement) for name, replacement in {
    "ops.matmul": matmul,
    "ops.gelu": gelu,
    "ops.layer_norm": layer_norm,
    "ops.cross_entropy": cross_entropy,
    "ops.embedding": embedding,
    "memories.softmax_attention": softmax_attention,
    "memories.leaky_average": leaky_average,
    "memories.normalize": normalize,
    "optim.adamw_update": adamw_update,
    "tensor.sum_to": sum_to,
}.items()}
