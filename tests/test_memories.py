"""Memory Mosaics' memories: kernel smoothing, the hand-written ops against the same maths composed from
primitive ops (whose gradients autograd derives), the extractors and both memories (gradients in float64
on fresh random inputs, against finite differences)."""
import math

import numpy as np
import pytest
from conftest import grads_of, leaky_average_as_matrix, rand_tensor

from minimosaic import memories as mm
from minimosaic import nn, ops
from minimosaic.gradcheck import gradcheck
from minimosaic.tensor import Tensor, no_grad


def assert_same_op(fast, reference, inputs, rng, atol=1e-10):
    """fast and reference give the same values and the same gradients for every input."""
    upstream = rng.standard_normal(fast(*inputs).shape)
    y_fast, g_fast = grads_of(fast, inputs, upstream)
    y_ref, g_ref = grads_of(reference, inputs, upstream)
    np.testing.assert_allclose(y_fast, y_ref, atol=atol, rtol=1e-9)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-9)


def decay_tensor(rng, H):
    return Tensor(rng.uniform(0.05, 0.95, H), requires_grad=True)


# The same maths composed from primitive ops (autograd derives their gradients).
def attention_from_primitives(q, k, v, mask=None, scale=1.0):
    """softmax(scale q k^T, mask) @ v with the scores and weights as separate ops."""
    return ops.softmax((q @ ops.swapaxes(k, -1, -2)) * scale, axis=-1, mask=mask) @ v


def peek_ahead_from_primitives(v, c):
    c = c.reshape(-1, 1, 1)
    return (1 - c) * ops.shift(v, -1, axis=-2) + c * v


def normalize_from_primitives(x, scale=None, eps=mm.NORM_EPS):
    u = x / (ops.sqrt((x * x).sum(axis=-1, keepdims=True)) + eps)
    return u if scale is None else u * scale


# ---------------------------------------------------------------- kernel smoothing
def test_kernel_smoothing_is_the_nadaraya_watson_estimate(rng):
    q, keys, values, beta = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3)), 0.7
    expected = np.empty((3, 3))
    for i in range(3):  # by hand: weights exp(-beta |q - k_j|^2), normalised
        w = np.array([math.exp(-beta * sum((q[i, d] - keys[j, d]) ** 2 for d in range(2))) for j in range(4)])
        expected[i] = (w[:, None] * values).sum(0) / w.sum()
    got = mm.kernel_smoothing(Tensor(q), Tensor(keys), Tensor(values), beta)
    np.testing.assert_allclose(got.data, expected, rtol=1e-12)


def test_kernel_smoothing_mask_drops_keys_and_empty_rows_give_zero(rng):
    q, keys, values = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3))
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    got = mm.kernel_smoothing(Tensor(q), Tensor(keys), Tensor(values), 1.3, mask=mask).data
    only = mm.kernel_smoothing(Tensor(q[:1]), Tensor(keys[:2]), Tensor(values[:2]), 1.3).data
    np.testing.assert_allclose(got[0], only[0], rtol=1e-12)
    assert np.all(got[1] == 0)


def test_with_unit_norm_keys_gaussian_kernel_equals_softmax_attention(rng):
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, keys, values = unit(rng.standard_normal((2, 5, 4))), unit(rng.standard_normal((2, 7, 4))), rng.standard_normal((2, 7, 3))
    beta = 1.7  # |q - k|^2 = 2 - 2 q.k  ->  softmax(2 beta q.k)
    gaussian = mm.kernel_smoothing(Tensor(q), Tensor(keys), Tensor(values), beta).data
    for attention in (mm.softmax_attention, attention_from_primitives):
        np.testing.assert_allclose(attention(Tensor(q), Tensor(keys), Tensor(values), scale=2 * beta).data,
                                   gaussian, rtol=1e-10, atol=1e-12)


def test_kernel_smoothing_gradcheck(rng):
    q, k, v = (rand_tensor(shape, rng=rng) for shape in ((2, 3, 4), (2, 5, 4), (2, 5, 2)))
    beta = rand_tensor((1,), rng=rng, domain="positive")
    gradcheck(lambda q, k, v, b: mm.kernel_smoothing(q, k, v, b, mask=np.tri(3, 5, 1, dtype=bool)),
              [q, k, v, beta])


# ---------------------------------------------------------------- leaky average
@pytest.mark.parametrize("T", [1, 2, 7, 40])
def test_leaky_average_equals_the_t_by_t_matrix(rng, T):
    x, decay = rand_tensor((2, 3, T, 4), rng=rng), decay_tensor(rng, 3)
    assert_same_op(mm.leaky_average, leaky_average_as_matrix, [x, decay], rng)


def test_leaky_average_is_the_recurrence(rng):
    x, lam = rng.standard_normal((2, 3, 11, 4)), rng.uniform(0.1, 0.9, 3)
    expected, running = np.empty_like(x), np.zeros((2, 3, 4))
    for t in range(11):
        running = x[:, :, t] + lam[None, :, None] * running
        expected[:, :, t] = running
    np.testing.assert_allclose(mm.leaky_average(Tensor(x), Tensor(lam)).data, expected, rtol=1e-12)


def test_leaky_average_gradcheck(rng):
    gradcheck(mm.leaky_average, [rand_tensor((2, 2, 7, 3), rng=rng), decay_tensor(rng, 2)], names=["x", "decay"])
    gradcheck(leaky_average_as_matrix, [rand_tensor((1, 2, 5, 3), rng=rng), decay_tensor(rng, 2)])


# ---------------------------------------------------------------- softmax attention
ATTENTION_CASES = {  # name: (q shape, k shape, v shape, mask, scale, q is k)
    "context K K^T, strict mask": ((2, 3, 6, 4), None, (2, 3, 6, 5), np.tri(6, 6, -1, dtype=bool), 1.0, True),
    "causal with scale": ((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 5), np.tri(6, 6, 0, dtype=bool), 0.5, False),
    "continuation, 3 past": ((1, 2, 2, 4), (1, 2, 5, 4), (1, 2, 5, 3), mm.causal_mask(np, 2, 3, False), 1.0,
                             False),
    "persistent, banks broadcast": ((3, 8, 4), (2, 3, 5, 4), (2, 3, 5, 4), None, 1.0, False),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_equals_primitives_and_gradcheck(rng, case):
    q_shape, k_shape, v_shape, mask, scale, same = ATTENTION_CASES[case]
    q, v = rand_tensor(q_shape, rng=rng), rand_tensor(v_shape, rng=rng)
    if same:
        inputs = [q, v]
        fast = lambda q, v: mm.softmax_attention(q, q, v, mask, scale)
        ref = lambda q, v: attention_from_primitives(q, q, v, mask, scale)
    else:
        inputs = [q, rand_tensor(k_shape, rng=rng), v]
        fast = lambda q, k, v: mm.softmax_attention(q, k, v, mask, scale)
        ref = lambda q, k, v: attention_from_primitives(q, k, v, mask, scale)
    assert_same_op(fast, ref, inputs, rng)
    gradcheck(fast, inputs)


def test_attention_fully_masked_row_is_zero_and_rows_sum_to_one(rng):
    k, v = rand_tensor((2, 2, 5, 3), rng=rng), rand_tensor((2, 2, 5, 3), rng=rng)
    mask = np.tri(5, 5, -1, dtype=bool)
    y = mm.softmax_attention(k, k, v, mask)
    assert np.all(y.data[:, :, 0] == 0)
    w = mm.attention_weights(k.data, k.data, mask)
    np.testing.assert_allclose(w[:, :, 1:].sum(-1), 1, rtol=1e-12)
    assert np.all(w[..., ~mask] == 0)


def test_attention_keeps_float32(rng):
    q = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    k = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    v = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    y = mm.softmax_attention(q, k, v, np.tri(4, 4, dtype=bool), scale=0.3)
    y.sum().backward()
    assert y.dtype == np.float32 and all(t.grad.dtype == np.float32 for t in (q, k, v))


# ---------------------------------------------------------------- peek ahead, normalize
def test_peek_ahead_equals_primitives_and_gradcheck(rng):
    v, c = rand_tensor((2, 3, 5, 4), rng=rng), Tensor(rng.uniform(-0.5, 1.5, 3), requires_grad=True)  # free c
    assert_same_op(mm.peek_ahead, peek_ahead_from_primitives, [v, c], rng)
    gradcheck(mm.peek_ahead, [v, c])
    out = mm.peek_ahead(v, c).data  # v_last peeks at zeros
    np.testing.assert_allclose(out[:, :, -1], c.data[None, :, None] * v.data[:, :, -1], rtol=1e-12)


def test_normalize_equals_primitives_and_gradcheck(rng):
    x = rand_tensor((3, 4, 5), rng=rng)
    assert_same_op(mm.normalize, normalize_from_primitives, [x], rng)
    gradcheck(mm.normalize, [x])
    np.testing.assert_allclose(np.linalg.norm(mm.normalize(x).data, axis=-1), 1, rtol=1e-9)


def test_normalize_with_a_per_head_scale_equals_primitives_and_gradcheck(rng):
    x, scale = rand_tensor((2, 3, 4, 5), rng=rng), rand_tensor((3, 1, 1), rng=rng, domain="positive")
    assert_same_op(mm.normalize, normalize_from_primitives, [x, scale], rng)
    gradcheck(mm.normalize, [x, scale])
    np.testing.assert_allclose(np.linalg.norm(mm.normalize(x, scale).data, axis=-1),
                               np.broadcast_to(scale.data[:, :, 0], (2, 3, 4)), rtol=1e-9)


def test_per_head_scalars_equal_their_op_chains_and_gradcheck(rng):
    rate = Tensor(rng.choice([-1.0, 1.0], 4) * rng.uniform(0.02, 0.5, 4), requires_grad=True)
    assert_same_op(mm.head_decay, lambda r: ops.exp(-ops.abs(r * mm.EXP_SCALING)), [rate], rng)
    gradcheck(mm.head_decay, [rate])
    log_scale = Tensor(np.array([-0.3, 0.1, 0.25, 0.9]), requires_grad=True)  # the last one is clipped
    for max_log in (None, 5.0):
        assert_same_op(lambda l: mm.head_scale(l, 7.0, max_log),
                       lambda l: ops.exp(ops.clip(l * 7.0, None, max_log)).reshape(-1, 1, 1), [log_scale], rng)
        gradcheck(lambda l: mm.head_scale(l, 7.0, max_log), [log_scale])


# ---------------------------------------------------------------- extractors and memories
def float64(module):
    return module.to(dtype=np.float64)


def check_module(module, x, directions=12):
    """Gradients of module(x) w.r.t. x (every element) and all parameters (random directions)."""
    gradcheck(lambda x: module(x), [x])
    gradcheck(lambda *params: module(x.detach()), module.parameters(), mode="random", directions=directions)


def test_key_extractor_gradcheck_and_unit_keys(rng):
    nn.manual_seed(1)
    key = float64(mm.KeyExtractor(8, 2, scale_power=2))
    x = rand_tensor((2, 5, 8), rng=rng)
    check_module(key, x)
    k = key(x).data
    s = np.exp(2 * mm.EXP_SCALING * key.log_scale.data)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), np.broadcast_to(s[None, :, None], k.shape[:3]),
                               rtol=1e-9)


def test_key_extractor_leak_rates_init_and_log_scale_clamp():
    nn.manual_seed(0)
    key = mm.KeyExtractor(12, 3)
    np.testing.assert_allclose(mm.EXP_SCALING * key.leak_rate.data, [0.5, 2.75, 5.0], rtol=1e-6)
    key.log_scale.data[:] = 100.0  # way past the float16 limit
    assert np.all(key.scale().data <= 2 ** 16 - 1 + 1e-2) and np.all(np.isfinite(key.scale().data))


def test_value_extractor_gradcheck_and_peek_at_the_next_input(rng):
    nn.manual_seed(2)
    value = float64(mm.ValueExtractor(8, 2))
    x = rand_tensor((2, 5, 8), rng=rng)
    check_module(value, x)
    value.peek.data[:] = 0.0  # v_t then depends on x_{t+1} only
    x2 = x.data.copy()
    x2[:, 3] += 1.0
    a, b = value(Tensor(x.data)).data, value(Tensor(x2)).data
    assert not np.allclose(a[:, :, 2], b[:, :, 2])
    np.testing.assert_allclose(a[:, :, [0, 1, 3, 4]], b[:, :, [0, 1, 3, 4]], rtol=1e-12)


def test_context_memory_gradcheck_and_first_output_is_zero(rng):
    nn.manual_seed(3)
    ctx = float64(mm.ContextMemory(8, 2, n_layer=2))
    x = rand_tensor((2, 6, 8), rng=rng)
    check_module(ctx, x)
    y = ctx(x).data
    assert np.all(y[:, 0] == 0) and np.all(np.abs(y[:, 1:]) > 0)


def test_context_memory_is_causal(rng):
    nn.manual_seed(4)
    ctx = float64(mm.ContextMemory(8, 2))
    x = rng.standard_normal((1, 7, 8))
    changed = x.copy()
    changed[:, 4] = rng.standard_normal(8)
    a, b = ctx(Tensor(x)).data, ctx(Tensor(changed)).data
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=0, atol=1e-13)  # outputs up to t = 3
    assert not np.allclose(a[:, 4], b[:, 4])


def test_persistent_memory_gradcheck_with_two_banks(rng):
    nn.manual_seed(5)
    pmem = float64(mm.PersistentMemory(8, 2, pmem_size=6, pmem_count=2))
    check_module(pmem, rand_tensor((2, 4, 8), rng=rng))


def test_memories_continue_from_a_cache_exactly(rng):
    """Feeding a sequence in pieces with a cache gives what one pass over it gives."""
    nn.manual_seed(6)
    x = Tensor(rng.standard_normal((2, 9, 8)))
    for memory in (float64(mm.ContextMemory(8, 2)), float64(mm.PersistentMemory(8, 2, pmem_size=5))):
        full = memory(x).data
        cache, pieces = {}, []
        for a, b in ((0, 4), (4, 5), (5, 9)):
            with no_grad():
                pieces.append(memory(x[:, a:b], cache).data)
        np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-12)


def test_memories_stay_float32(rng):
    nn.manual_seed(7)
    x = rand_tensor((2, 5, 8), rng=rng, dtype=np.float32)
    for memory in (mm.ContextMemory(8, 2), mm.PersistentMemory(8, 2, pmem_size=4)):
        y = memory(x)
        (y * y).sum().backward()
        assert y.dtype == np.float32 and x.grad.dtype == np.float32
        assert all(p.grad.dtype == np.float32 for p in memory.parameters())
        x.grad = None


def test_per_head_scalars_are_stored_divided_by_fast():
    nn.manual_seed(0)
    ctx, pmem = mm.ContextMemory(8, 2), mm.PersistentMemory(8, 2, pmem_size=4)
    np.testing.assert_allclose(mm.EXP_SCALING * ctx.key.log_scale.data, 1.0, rtol=1e-6)
    np.testing.assert_allclose(mm.EXP_SCALING * ctx.value.log_scale.data, -0.5, rtol=1e-6)
    np.testing.assert_allclose(mm.EXP_SCALING * pmem.log_scale.data, -0.5, rtol=1e-6)
    assert np.all((ctx.value.peek.data >= 0) & (ctx.value.peek.data <= 1))


def test_peek_is_free_and_keeps_its_gradient_outside_0_1(rng):
    """As in the official code, c is used as it is: a value pushed past 0 or 1 still learns."""
    nn.manual_seed(8)
    value = float64(mm.ValueExtractor(8, 2))
    value.peek.data[:] = [-0.4, 1.3]
    x = rand_tensor((2, 5, 8), rng=rng)
    (value(x) ** 2).sum().backward()
    assert np.all(np.abs(value.peek.grad) > 0)
    gradcheck(lambda c: value(x.detach()), [value.peek])


@pytest.mark.parametrize("memory", ["context", "persistent"])
def test_memories_drop_attention_weights_only_while_training(rng, memory):
    """dropout p drops attention weights (as torch's scaled_dot_product_attention in the official code)."""
    nn.manual_seed(9)
    make = (lambda p: mm.ContextMemory(8, 2, dropout=p)) if memory == "context" else (
        lambda p: mm.PersistentMemory(8, 2, pmem_size=5, dropout=p))
    x = rand_tensor((2, 6, 8), rng=rng)
    nn.manual_seed(9)
    with_dropout = float64(make(0.5))
    nn.manual_seed(9)
    without = float64(make(0.0))
    assert not np.allclose(with_dropout(x).data, without(x).data)
    with_dropout.eval()
    np.testing.assert_allclose(with_dropout(x).data, without(x).data, rtol=1e-12)
