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

Each op below is written as the maths: a forward and its backward side by side, in vectorised
NumPy/CuPy (the leaky average as its recurrence, kernel smoothing as a masked softmax times the values).
Functions marked @replaceable may be swapped for a faster equivalent by minimosaic.fast (registry.py).

Per-head scalars train 10x faster (like the official code): each is stored divided by EXP_SCALING = 10
and used as EXP_SCALING * stored. Adam's step size is about lr in stored units whatever the gradient's
scale, so the used value moves EXP_SCALING * lr per step. Stored values in the tables below are value / 10.

Parameters (names relative to the memory, as in state_dict; d = n_embd, H = n_head, hs = d / H):
  KeyExtractor   W_k.weight (d, d)   key projection, x @ W_k (W_k.bias (d,) when bias=True)
                 leak_rate  (H,)     b_h / 10; lambda_h = exp(-|10 leak_rate|), init b = linspace(0.5, 5)
                 log_scale  (H,)     log s_h / 10, init log s = 1; used as min(p 10 log_scale,
                                     log(2^16 - 1)) with p = scale_power (2 in the persistent memory)
  ValueExtractor W_v.weight (d, d)   value projection
                 peek       (H,)     c_h, used as it is (free, as in the official code), init U(0, 1)
                 log_scale  (H,)     log sigma_h / 10, init log sigma = -0.5
  ContextMemory  key.*, value.*      the extractors above
                 W_o.weight (d, d)   output projection
  PersistentMemory key.*             its own KeyExtractor with scale_power 2 (stored keys carry no scale)
                 P_k, P_v (pmem_count, H, pmem_size, hs)   stored keys and values, std 1/sqrt(hs)
                 log_scale  (H,)     log sigma'_h / 10, init log sigma' = -0.5
                 W_o.weight (d, d)   output projection
Projections are initialised N(0, 1/d) (std 1/sqrt(fan_in)), output projections N(0, 1/(d n_layer)).

Memory Mosaics v2 (Zhang & Bottou, arXiv 2507.03285; options, all off by default; docs/memory-mosaics.md
gives our reading of the paper and what we could not check):
  adaptive bandwidth  beta_h(n) = beta1_h n^alpha_h + beta0_h, n the pairs a query may read;
                      unit keys, y_t = sum_s softmax_s(2 beta(n_t) k_t . k_s) v_s     AdaptiveBandwidth
  gated keys          kbar_t = g_t W_k x_t + lambda_t kbar_{t-1},  g_t = exp(w_g . x_t),
                      lambda_t = exp(-|b_h + w_lambda . x_t|)                       gated_leaky_average
  three levels        long-term: pairs s < t - m;  short-term: pairs t - w <= s < t   memory_mask
Their parameters: KeyExtractor(gated=True) W_gate.weight, W_decay.weight (d, H), zero at init (the
2024 keys); KeyExtractor(scaled=False) has no log_scale; ContextMemory(adaptive_bandwidth=True)
bandwidth.{log_beta0, log_beta1} (H,) (log beta / 10, init 0) and bandwidth.alpha_logit (H,) (init 0).
"""
import math

import numpy as np

from . import nn, ops
from .backend import get_array_module
from .registry import replaceable
from .tensor import Tensor, make_result, no_grad

EXP_SCALING = 10.0   # per-head scalars are stored as value / EXP_SCALING (the official code's exp_scaling)
LOG_SCALE_MAX = math.log(2 ** 16 - 1)    # key scales stay finite in float16
NORM_EPS = 1e-10


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


# ---------------------------------------------------------------- attention: the dot-product form
@replaceable
def softmax_attention(q, k, v, mask=None, scale=1.0, dropout=0.0):
    """y = P v,  P = softmax(scale q k^T) over the keys (rows), masked entries of P are 0.

    q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv), batch axes broadcast; mask (Tq, Tk) boolean, True =
    may attend; a fully masked row gives y = 0. With keys of equal norm this is kernel_smoothing with
    2 beta = scale. dropout p > 0 zeroes each weight of P with probability p and scales the others by
    1 / (1 - p), as torch's scaled_dot_product_attention does while training. Pass the same Tensor as q
    and k for K K^T (the context memory): the engine adds both of its gradients.
    The gradient is the composition's: dv = P^T g,  dP = g v^T,  dS = P * (dP - rowsum(dP * P)) (softmax),
    dq = scale dS k,  dk = scale dS^T q.
    """
    scores = q @ ops.swapaxes(k, -1, -2)                                         # (..., Tq, Tk)
    if scale != 1.0:
        scores = scores * scale
    weights = ops.softmax(scores, axis=-1, mask=mask)
    return ops.dropout(weights, dropout) @ v                                     # (..., Tq, dv)


def attention_weights(q, k, mask=None, scale=1.0):
    """softmax(scale q k^T) over the last axis, as a raw array (no graph): for inspection."""
    with no_grad():
        return ops.softmax(Tensor(q @ k.swapaxes(-1, -2) * q.dtype.type(scale)), axis=-1, mask=mask).data


def causal_mask(xp, queries, past, include_present):
    """(queries, past + queries) boolean: query i sits at position past + i and may attend to
    positions s <= past + i (include_present) or s < past + i."""
    return xp.tri(queries, past + queries, past if include_present else past - 1, dtype=bool)


def memory_mask(xp, queries, past, first=0, skip=0, window=None):
    """(queries, past + queries - first) boolean: the query at position p = past + i may use the pair stored
    at position s = first + j when s < p - skip and, with a window, s >= p - window.

    The present (s = p) is never used: v_p already holds x_{p+1}. skip = 0, window = None, first = 0 is the
    2024 context memory (causal_mask with include_present=False); skip m is v2's long-term memory (it
    skips the m most recent pairs), window w its short-term memory (only the w most recent pairs), and
    first > 0 says the cache dropped the pairs before position `first` (the short-term memory's window).
    """
    p = xp.arange(past, past + queries)[:, None]
    s = xp.arange(first, past + queries)[None, :]
    allowed = s < p - skip
    return allowed if window is None else allowed & (s >= p - window)


# ---------------------------------------------------------------- leaky average (keys)
@replaceable
def leaky_average(x, decay):
    """kbar_t = x_t + lambda_h kbar_{t-1},  kbar_{-1} = 0, along time; x (B, H, T, hs), decay lambda (H,).

    Backward, with a_t = dL/dx_t:  a_t = g_t + lambda_h a_{t+1}  (the same recurrence, backwards in time),
    dL/dlambda_h = sum_{t >= 1} a_t . kbar_{t-1}  (over batch, time and channels).
    """
    x = ops.full_precision(x)
    xp, T = x.xp, x.shape[2]
    lam = decay.data[:, None]                                                    # (H, 1) against (B, H, hs)
    kbar = xp.empty(x.shape, x.dtype)
    kbar[:, :, 0] = x.data[:, :, 0]
    for t in range(1, T):
        kbar[:, :, t] = x.data[:, :, t] + lam * kbar[:, :, t - 1]

    def backward(g):
        a = xp.empty(g.shape, g.dtype)
        a[:, :, T - 1] = g[:, :, T - 1]
        for t in range(T - 2, -1, -1):
            a[:, :, t] = g[:, :, t] + lam * a[:, :, t + 1]
        return a, (a[:, :, 1:] * kbar[:, :, :-1]).sum(axis=(0, 2, 3))
    return make_result(kbar, (x, decay), backward)


def gated_leaky_average(x, gate, decay, initial=None):
    """kbar_t = g_t x_t + lambda_t kbar_{t-1},  kbar_{-1} = initial (or 0): the leaky average of v2
    (arXiv 2507.03285, section 3.2), whose gate g_t and decay lambda_t depend on the input at t.
    x (B, H, T, hs); gate, decay (B, H, T): one number per head and position; initial (B, H, 1, hs), a
    constant (the sum carried over from earlier text by the generation cache).

    Backward, with a_t = dL/dkbar_t (the upstream gradient g'_t plus all that flows back from later sums):
        a_t = g'_t + lambda_{t+1} a_{t+1},   a_{T-1} = g'_{T-1}        (the recurrence, backwards in time)
        dL/dx_t = g_t a_t,   dL/dg_t = a_t . x_t,   dL/dlambda_t = a_t . kbar_{t-1}   (over channels)
    """
    x, gate, decay = (ops.full_precision(a) for a in (x, gate, decay))
    xp, T = x.xp, x.shape[2]
    g, lam = gate.data[..., None], decay.data[..., None]                         # (B, H, T, 1)
    start = xp.zeros(x.shape[:2] + (1,) + x.shape[3:], x.dtype) if initial is None else initial  # kbar_{-1}
    kbar = xp.empty(x.shape, x.dtype)
    previous = start[:, :, 0]
    for t in range(T):
        kbar[:, :, t] = g[:, :, t] * x.data[:, :, t] + lam[:, :, t] * previous
        previous = kbar[:, :, t]

    def backward(grad):
        a = xp.empty(grad.shape, grad.dtype)
        a[:, :, T - 1] = grad[:, :, T - 1]
        for t in range(T - 2, -1, -1):
            a[:, :, t] = grad[:, :, t] + lam[:, :, t + 1] * a[:, :, t + 1]
        before = xp.concatenate([start.astype(x.dtype), kbar[:, :, :-1]], axis=2)  # kbar_{t-1}
        return a * g, (a * x.data).sum(axis=-1), (a * before).sum(axis=-1)
    return make_result(kbar, (x, gate, decay), backward)


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
        return dv, (g * step).sum(axis=axes)
    return make_result(out, (v, c), backward)


@replaceable
def normalize(x, scale=None, eps=NORM_EPS):
    """y = s u,  u = x / (|x| + eps) over the last axis; s = 1, or a per-head scale (H, 1, 1) for x
    (..., H, T, d) (the key and value scales, applied in the same op).

    Backward, n = |x|, gu = s g:  dx = (gu - x (u . gu) / n) / (n + eps)  (the term is 0 where x = 0),
    ds_h = sum of g . u over every row of head h (the engine sums g u down to (H, 1, 1)).
    """
    x = ops.full_precision(x)
    xp = x.xp
    parents = (x,) if scale is None else (x, scale)
    s = None if scale is None else scale.data
    norm = xp.sqrt((x.data * x.data).sum(axis=-1, keepdims=True))              # (..., 1)
    inv = 1 / (norm + eps)
    u = x.data * inv
    y = u if s is None else u * s

    def backward(g):
        gu = g if s is None else g * s
        along = (u * gu).sum(axis=-1, keepdims=True) / xp.where(norm > 0, norm, 1)
        dx = (gu - x.data * along) * inv
        return (dx,) if s is None else (dx, g * u)
    return make_result(y, parents, backward)


# ---------------------------------------------------------------- per-head scalars
# Each is one op (forward and backward side by side) rather than a chain of three or four tiny ones: on a
# GPU a small model's step is bound by the number of ops it issues.
def head_decay(rate):
    """lambda_h = exp(-|E r_h|) for stored leak rates r (H,), E = EXP_SCALING.   dlambda/dr = -E sign(r) lambda."""
    xp = rate.xp
    z = rate.data * EXP_SCALING
    out = xp.exp(-xp.abs(z))
    return make_result(out, (rate,), lambda g: (g * out * xp.sign(z) * -EXP_SCALING,))


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
    """A float32 Parameter holding values / EXP_SCALING (the 10x-faster storage)."""
    return nn.Parameter((np.asarray(values, dtype=np.float64) / EXP_SCALING).astype(np.float32))


class KeyExtractor(nn.Module):
    """k_t = s_h^p kbar_t / (|kbar_t| + 1e-10),  kbar_t = W_k x_t + lambda_h kbar_{t-1}  (p = scale_power).

    forward(x (B, T, C), cache=None) -> keys (B, H, T, hs). With a `cache` dict (generation), the leaky
    sum continues from cache['kbar'] and leaves its last value there.

    v2 options (arXiv 2507.03285): gated=True makes the leak input-dependent, kbar_t = g_t W_k x_t +
    lambda_t kbar_{t-1} (`gates`, `gated_leaky_average`); scaled=False leaves the keys at unit norm, for a
    memory whose bandwidth is scheduled separately (`AdaptiveBandwidth`).
    """

    def __init__(self, n_embd, n_head, bias=False, scale_power=1, gated=False, scaled=True):
        self.n_head, self.scale_power, self.gated, self.scaled = n_head, scale_power, gated, scaled
        self.W_k = nn.Linear(n_embd, n_embd, bias=bias)
        self.leak_rate = _per_head_scalar(np.linspace(0.5, 5.0, n_head))
        if scaled:
            self.log_scale = _per_head_scalar(np.ones(n_head))
        if gated:  # zero weights: at init g_t = 1 and lambda_t = lambda_h, the 2024 leaky average exactly
            self.W_gate = nn.Linear(n_embd, n_head, std=0.0)
            self.W_decay = nn.Linear(n_embd, n_head, std=0.0)

    def decay(self):
        """lambda_h = exp(-b_h), b_h = |EXP_SCALING leak_rate| >= 0.   (H,)"""
        return head_decay(self.leak_rate)

    def scale(self):
        """s_h^p = exp(min(p EXP_SCALING log_scale, log(2^16 - 1))), shaped (H, 1, 1) to scale (B, H, T, hs)."""
        return head_scale(self.log_scale, EXP_SCALING * self.scale_power, LOG_SCALE_MAX)

    def gates(self, x):
        """(g, lambda), each (B, H, T):  g_t = exp(w_g,h . x_t),  lambda_t = exp(-|b_h + w_lambda,h . x_t|),
        b_h = EXP_SCALING leak_rate_h (the 2024 rate becomes the gate's bias)."""
        to_heads = lambda z: ops.transpose(z, (0, 2, 1))                       # (B, T, H) -> (B, H, T)
        gate = ops.exp(to_heads(project(self.W_gate, x)))
        rate = to_heads(project(self.W_decay, x)) + self.leak_rate.reshape(-1, 1) * EXP_SCALING
        return gate, ops.exp(-ops.abs(rate))

    def forward(self, x, cache=None):
        raw = split_heads(project(self.W_k, x), self.n_head)                     # (B, H, T, hs)
        if self.gated:
            kbar = gated_leaky_average(raw, *self.gates(x), None if cache is None else cache.get("kbar"))
        else:
            decay = self.decay()
            kbar = leaky_average(raw, decay)
            if cache is not None and "kbar" in cache:  # continue the sum: + lambda^(t+1) kbar_before (a constant)
                steps = kbar.xp.arange(1, kbar.shape[2] + 1, dtype=kbar.dtype)
                carried = (decay.data[:, None] ** steps)[:, :, None] * cache["kbar"]
                kbar = kbar + Tensor(carried)
        if cache is not None:
            cache["kbar"] = kbar.data[:, :, -1:]                                 # (B, H, 1, hs)
        return normalize(kbar, self.scale() if self.scaled else None)


class ValueExtractor(nn.Module):
    """v_t = sigma_h normalize((1 - c_h) W_v x_{t+1} + c_h W_v x_t),  W_v x_T = 0 (past the end).

    forward(x (B, T, C), cache=None) -> values (B, H, T, hs). v_{T-1} is incomplete (its x_T is not known
    yet). With a `cache` dict, the last W_v x of the previous call is kept in cache['vtilde'] and the
    output gains one leading position: the now complete value of the previous call's last position.
    """

    def __init__(self, n_embd, n_head, bias=False):
        self.n_head = n_head
        self.W_v = nn.Linear(n_embd, n_embd, bias=bias)
        self.peek = nn.Parameter(nn.init_rng.uniform(0.0, 1.0, n_head).astype(np.float32))
        self.log_scale = _per_head_scalar(np.full(n_head, -0.5))

    def forward(self, x, cache=None):
        vtilde = split_heads(project(self.W_v, x), self.n_head)                  # (B, H, T, hs)
        if cache is not None:
            last = vtilde.data[:, :, -1:]
            if "vtilde" in cache:
                vtilde = ops.concatenate([Tensor(cache["vtilde"]), vtilde], axis=2)
            cache["vtilde"] = last
        v = peek_ahead(vtilde, self.peek)
        return normalize(v, head_scale(self.log_scale, EXP_SCALING))


# ---------------------------------------------------------------- the two memories
class AdaptiveBandwidth(nn.Module):
    """beta_h(n) = beta1_h n^alpha_h + beta0_h: the kernel's inverse bandwidth as a function of the number n
    of (key, value) pairs the memory holds (v2, arXiv 2507.03285, section 3.1). Kernel regression wants a
    narrower kernel (larger beta) the more pairs it averages over; how much narrower is learned per head.

    beta0 = exp(10 log_beta0), beta1 = exp(10 log_beta1) > 0 (stored / EXP_SCALING like the other per-head
    scalars), alpha = sigmoid(alpha_logit) in (0, 1). Init beta0 = beta1 = 1, alpha = 1/2.
    """

    def __init__(self, n_head):
        self.log_beta0 = _per_head_scalar(np.zeros(n_head))
        self.log_beta1 = _per_head_scalar(np.zeros(n_head))
        self.alpha_logit = nn.Parameter(np.zeros(n_head, np.float32))

    def forward(self, counts):
        """counts (Tq,): pairs the memory holds for each query -> beta (H, Tq, 1)."""
        xp, dtype = self.alpha_logit.xp, self.alpha_logit.dtype
        # n = 0 (an empty memory, whose answer is 0 anyway) is taken as 1: log 0 would make dbeta/dalpha NaN
        log_n = Tensor(xp.log(xp.maximum(xp.asarray(counts), 1)).astype(dtype)[None, :, None])  # (1, Tq, 1)
        alpha = ops.sigmoid(self.alpha_logit).reshape(-1, 1, 1)                     # (H, 1, 1)
        beta0 = ops.exp(self.log_beta0 * EXP_SCALING).reshape(-1, 1, 1)
        beta1 = ops.exp(self.log_beta1 * EXP_SCALING).reshape(-1, 1, 1)
        return beta1 * ops.exp(alpha * log_n) + beta0                              # (H, Tq, 1)


class ContextMemory(nn.Module):
    """y_t = W_o [sum_{s<t} softmax_s(k_t . k_s) v_s]_heads,  y_0 = W_o 0: an associative memory of the
    (key, value) pairs of this sequence so far.

    forward(x (B, T, C), cache=None) -> (B, T, C). With a `cache` dict (generation) the stored keys and
    the completed values of earlier calls are kept in it, so the next call attends to them.

    v2 options (arXiv 2507.03285, all off by default): gated_keys (section 3.2, `KeyExtractor.gates`);
    adaptive_bandwidth (section 3.1): unit keys and y_t = sum_s softmax_s(2 beta(n_t) k_t . k_s) v_s, the
    Gaussian kernel exp(-beta |k_t - k_s|^2) with n_t the pairs position t may use; skip m (the long-term
    memory of section 3.3: only pairs s < t - m) and window w (the short-term memory: only t - w <= s < t).
    With a window the cache keeps only the last w pairs.
    """

    def __init__(self, n_embd, n_head, n_layer=1, bias=False, dropout=0.0, gated_keys=False,
                 adaptive_bandwidth=False, skip=0, window=None):
        self.n_head, self.dropout, self.skip, self.window = n_head, dropout, skip, window
        self.key = KeyExtractor(n_embd, n_head, bias, gated=gated_keys, scaled=not adaptive_bandwidth)
        self.value = ValueExtractor(n_embd, n_head, bias)
        self.W_o = nn.Linear(n_embd, n_embd, bias=bias, std=(n_embd * n_layer) ** -0.5)
        self.bandwidth = AdaptiveBandwidth(n_head) if adaptive_bandwidth else None

    def mask(self, xp, queries, past=0, first=0):
        return memory_mask(xp, queries, past, first, self.skip, self.window)

    def queries(self, k, mask):
        """k itself (the key scale is the bandwidth), or 2 beta(n_t) k_t with the adaptive bandwidth, n_t the
        number of pairs row t of the mask lets query t use."""
        if self.bandwidth is None:
            return k
        return k * (2 * self.bandwidth(mask.sum(axis=-1)))                       # (B, H, T, hs)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        k = self.key(x, cache)                                                   # (B, H, T, hs)
        v = self.value(x, cache)                                                 # (B, H, T(+1), hs)
        keys, values, past, first = k, v, 0, 0
        if cache is not None and "keys" in cache:
            first = cache.get("first", 0)
            past = first + cache["keys"].shape[2]
            keys = ops.concatenate([Tensor(cache["keys"]), k], axis=2)           # (B, H, past - first + T, hs)
            values = ops.concatenate([Tensor(cache["values"]), v], axis=2)
        if cache is not None:  # keep what the next query may use (the last value is incomplete)
            start = first
            if self.window is not None:  # the short-term memory: only the last `window` pairs
                start = cache["first"] = max(first, past + T - self.window)
            cache["keys"], cache["values"] = keys.data[:, :, start - first:], values.data[:, :, start - first:-1]
        mask = self.mask(k.xp, T, past, first)
        y = softmax_attention(self.queries(k, mask), keys, values, mask=mask,
                              dropout=self.dropout if self.training else 0.0)
        return self.W_o(merge_heads(y)).reshape(B, T, C)

    def kernel_weights(self, x):
        """The weights over past positions that the forward pass uses: (B, H, T, T) raw array (no graph)."""
        with no_grad():
            k = self.key(x)
            mask = self.mask(k.xp, k.shape[2])
            return attention_weights(self.queries(k, mask).data, k.data, mask)

    def bandwidths(self, T):
        """beta(n_t) for positions 0..T-1: (H, T) raw array, or None without the adaptive bandwidth."""
        if self.bandwidth is None:
            return None
        with no_grad():
            return self.bandwidth(self.mask(get_array_module(self.W_o.weight.data), T).sum(axis=-1)).data[..., 0]


class PersistentMemory(nn.Module):
    """y_t = W_o [sigma_h mean_banks sum_j softmax_j(k_t . P_k[j]) P_v[j]]_heads: an associative memory
    whose (key, value) pairs are parameters, learned over the whole training set (the transformer's MLP).

    Per head, the B*T queries meet the slots in one GEMM: (H, B*T, hs) @ (banks, H, hs, pmem_size).
    """

    def __init__(self, n_embd, n_head, pmem_size, pmem_count=1, n_layer=1, bias=False, dropout=0.0):
        self.n_head, self.dropout = n_head, dropout
        hs = n_embd // n_head
        self.key = KeyExtractor(n_embd, n_head, bias, scale_power=2)
        self.P_k = nn.normal((pmem_count, n_head, pmem_size, hs), hs ** -0.5)
        self.P_v = nn.normal((pmem_count, n_head, pmem_size, hs), hs ** -0.5)
        self.log_scale = _per_head_scalar(np.full(n_head, -0.5))
        self.W_o = nn.Linear(n_embd, n_embd, bias=bias, std=(n_embd * n_layer) ** -0.5)

    def _queries(self, x, cache=None):
        k = self.key(x, cache)                                                   # (B, H, T, hs)
        B, H, T, hs = k.shape
        return ops.transpose(k, (1, 0, 2, 3)).reshape(H, B * T, hs)              # (H, B*T, hs)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        H = self.n_head
        y = softmax_attention(self._queries(x, cache), self.P_k, self.P_v,       # (banks, H, B*T, hs)
                              dropout=self.dropout if self.training else 0.0)
        y = y.mean(axis=0) * head_scale(self.log_scale, EXP_SCALING)                    # (H, B*T, hs)
        y = ops.transpose(y.reshape(H, B, T, C // H), (1, 0, 2, 3))              # (B, H, T, hs)
        return self.W_o(merge_heads(y)).reshape(B, T, C)

    def kernel_weights(self, x):
        """softmax_j(k_t . P_k[j]) averaged over banks: (B, H, T, pmem_size) raw array (no graph)."""
        B, T, _ = x.shape
        w = attention_weights(self._queries(x).data, self.P_k.data).mean(axis=0)  # (H, B*T, slots)
        return w.reshape(self.n_head, B, T, -1).transpose(1, 0, 2, 3)
