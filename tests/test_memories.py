"""Memory Mosaics' memories: kernel smoothing, the fast ops against their references, the extractors and
both memories (gradients in float64 on fresh random inputs, against finite differences)."""
import math

import numpy as np
import pytest
from conftest import grads_of, rand_tensor

from minimosaic import memories as mm
from minimosaic import nn
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
    for attention in (mm.softmax_attention, mm.softmax_attention_reference):
        np.testing.assert_allclose(attention(Tensor(q), Tensor(keys), Tensor(values), scale=2 * beta).data,
                                   gaussian, rtol=1e-10, atol=1e-12)


def test_kernel_smoothing_gradcheck(rng):
    q, k, v = (rand_tensor(shape, rng=rng) for shape in ((2, 3, 4), (2, 5, 4), (2, 5, 2)))
    beta = rand_tensor((1,), rng=rng, domain="positive")
    gradcheck(lambda q, k, v, b: mm.kernel_smoothing(q, k, v, b, mask=np.tri(3, 5, 1, dtype=bool)),
              [q, k, v, beta])


# ---------------------------------------------------------------- leaky average
@pytest.mark.parametrize("T, chunk", [(1, 16), (7, 1), (7, 3), (9, 4), (16, 16), (40, 16)])
def test_leaky_average_equals_the_t_by_t_reference(rng, T, chunk):
    x, decay = rand_tensor((2, 3, T, 4), rng=rng), decay_tensor(rng, 3)
    fast = lambda x, d: mm.leaky_average(x, d, chunk=chunk)
    assert_same_op(fast, mm.leaky_average_reference, [x, decay], rng)


def test_leaky_average_is_the_recurrence(rng):
    x, lam = rng.standard_normal((2, 3, 11, 4)), rng.uniform(0.1, 0.9, 3)
    expected, running = np.empty_like(x), np.zeros((2, 3, 4))
    for t in range(11):
        running = x[:, :, t] + lam[None, :, None] * running
        expected[:, :, t] = running
    np.testing.assert_allclose(mm.leaky_average(Tensor(x), Tensor(lam)).data, expected, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_leaky_average_gradcheck(rng, chunk):
    gradcheck(lambda x, d: mm.leaky_average(x, d, chunk=chunk),
              [rand_tensor((2, 2, 7, 3), rng=rng), decay_tensor(rng, 2)], names=["x", "decay"])


def test_leaky_average_reference_gradcheck(rng):
    gradcheck(mm.leaky_average_reference, [rand_tensor((1, 2, 5, 3), rng=rng), decay_tensor(rng, 2)])


# ---------------------------------------------------------------- fused softmax attention
ATTENTION_CASES = {  # name: (q shape, k shape, v shape, mask, scale, q is k)
    "context K K^T, strict mask": ((2, 3, 6, 4), None, (2, 3, 6, 5), np.tri(6, 6, -1, dtype=bool), 1.0, True),
    "causal with scale": ((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 5), np.tri(6, 6, 0, dtype=bool), 0.5, False),
    "continuation, 3 past": ((1, 2, 2, 4), (1, 2, 5, 4), (1, 2, 5, 3), mm.causal_mask(np, 2, 3, False), 1.0,
                             False),
    "persistent, banks broadcast": ((3, 8, 4), (2, 3, 5, 4), (2, 3, 5, 4), None, 1.0, False),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_fused_attention_equals_reference(rng, case):
    q_shape, k_shape, v_shape, mask, scale, same = ATTENTION_CASES[case]
    q, v = rand_tensor(q_shape, rng=rng), rand_tensor(v_shape, rng=rng)
    if same:
        inputs = [q, v]
        fast = lambda q, v: mm.softmax_attention(q, q, v, mask, scale)
        ref = lambda q, v: mm.softmax_attention_reference(q, q, v, mask, scale)
    else:
        inputs = [q, rand_tensor(k_shape, rng=rng), v]
        fast = lambda q, k, v: mm.softmax_attention(q, k, v, mask, scale)
        ref = lambda q, k, v: mm.softmax_attention_reference(q, k, v, mask, scale)
    assert_same_op(fast, ref, inputs, rng)
    gradcheck(fast, inputs)


def test_fused_attention_fully_masked_row_is_zero_and_rows_sum_to_one(rng):
    k, v = rand_tensor((2, 2, 5, 3), rng=rng), rand_tensor((2, 2, 5, 3), rng=rng)
    mask = np.tri(5, 5, -1, dtype=bool)
    y = mm.softmax_attention(k, k, v, mask)
    assert np.all(y.data[:, :, 0] == 0)
    w = mm.attention_weights(k.data, k.data, mask)
    np.testing.assert_allclose(w[:, :, 1:].sum(-1), 1, rtol=1e-12)
    assert np.all(w[..., ~mask] == 0)


def test_fused_attention_keeps_float32(rng):
    q = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    k = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    v = rand_tensor((2, 4, 3), rng=rng, dtype=np.float32)
    y = mm.softmax_attention(q, k, v, np.tri(4, 4, dtype=bool), scale=0.3)
    y.sum().backward()
    assert y.dtype == np.float32 and all(t.grad.dtype == np.float32 for t in (q, k, v))


# ---------------------------------------------------------------- peek ahead, normalize
def test_peek_ahead_equals_reference_and_gradcheck(rng):
    v, c = rand_tensor((2, 3, 5, 4), rng=rng), Tensor(rng.uniform(0.1, 0.9, 3), requires_grad=True)
    assert_same_op(mm.peek_ahead, mm.peek_ahead_reference, [v, c], rng)
    gradcheck(mm.peek_ahead, [v, c])
    out = mm.peek_ahead(v, c).data  # v_last peeks at zeros
    np.testing.assert_allclose(out[:, :, -1], c.data[None, :, None] * v.data[:, :, -1], rtol=1e-12)


def test_normalize_equals_reference_and_gradcheck(rng):
    x = rand_tensor((3, 4, 5), rng=rng)
    assert_same_op(mm.normalize, mm.normalize_reference, [x], rng)
    gradcheck(mm.normalize, [x])
    np.testing.assert_allclose(np.linalg.norm(mm.normalize(x).data, axis=-1), 1, rtol=1e-9)


def test_normalize_with_a_per_head_scale_equals_reference_and_gradcheck(rng):
    x, scale = rand_tensor((2, 3, 4, 5), rng=rng), rand_tensor((3, 1, 1), rng=rng, domain="positive")
    assert_same_op(mm.normalize, mm.normalize_reference, [x, scale], rng)
    gradcheck(mm.normalize, [x, scale])
    np.testing.assert_allclose(np.linalg.norm(mm.normalize(x, scale).data, axis=-1),
                               np.broadcast_to(scale.data[:, :, 0], (2, 3, 4)), rtol=1e-9)


def test_per_head_scalars_equal_their_op_chains_and_gradcheck(rng):
    rate = Tensor(rng.choice([-1.0, 1.0], 4) * rng.uniform(0.02, 0.5, 4), requires_grad=True)
    assert_same_op(mm.head_decay, mm.head_decay_reference, [rate], rng)
    gradcheck(mm.head_decay, [rate])
    log_scale = Tensor(np.array([-0.3, 0.1, 0.25, 0.9]), requires_grad=True)  # the last one is clipped
    for max_log in (None, 5.0):
        assert_same_op(lambda l: mm.head_scale(l, 7.0, max_log), lambda l: mm.head_scale_reference(l, 7.0, max_log),
                       [log_scale], rng)
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
    s = np.exp(2 * mm.FAST * key.log_scale.data)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), np.broadcast_to(s[None, :, None], k.shape[:3]),
                               rtol=1e-9)


def test_key_extractor_leak_rates_init_and_log_scale_clamp():
    nn.manual_seed(0)
    key = mm.KeyExtractor(12, 3)
    np.testing.assert_allclose(mm.FAST * key.leak_rate.data, [0.5, 2.75, 5.0], rtol=1e-6)
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


def test_memories_continue_from_a_state_exactly(rng):
    """Feeding a sequence in pieces with a state gives what one pass over it gives."""
    nn.manual_seed(6)
    x = Tensor(rng.standard_normal((2, 9, 8)))
    for memory in (float64(mm.ContextMemory(8, 2)), float64(mm.PersistentMemory(8, 2, pmem_size=5))):
        full = memory(x).data
        state, pieces = {}, []
        for a, b in ((0, 4), (4, 5), (5, 9)):
            with no_grad():
                pieces.append(memory(x[:, a:b], state).data)
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
    np.testing.assert_allclose(mm.FAST * ctx.key.log_scale.data, 1.0, rtol=1e-6)
    np.testing.assert_allclose(mm.FAST * ctx.value.log_scale.data, -0.5, rtol=1e-6)
    np.testing.assert_allclose(mm.FAST * pmem.log_scale.data, -0.5, rtol=1e-6)
    assert np.all((ctx.value.peek.data >= 0) & (ctx.value.peek.data <= 1))
