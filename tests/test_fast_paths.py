"""The CPU fast paths against the plain code they replace: the tiled softmax attention (threads, row
blocks, causal key ranges, recomputed weights) against the whole-array fused op and the composed
reference; the pooled matmul against a @ b; the pool itself. Values and gradients, float64 and float32."""
import platform
import sys

import numpy as np
import pytest
from conftest import grads_of, rand_tensor

from minimosaic import backend, memories as mm, ops
from minimosaic.gradcheck import gradcheck

WORKERS = [1, 2]


@pytest.fixture(params=WORKERS, ids=lambda n: f"workers{n}")
def workers(request):
    backend.set_cpu_workers(request.param)
    yield backend.cpu_workers()
    backend.set_cpu_workers(None)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 24 scores, so even small inputs are cut into many row blocks and batch groups."""
    monkeypatch.setattr(mm, "TILE_SCORES", 24)


CASES = {  # name: (q shape, k shape or None for k = q, v shape, mask, scale)
    "context, strict causal": ((2, 3, 9, 4), None, (2, 3, 9, 5), np.tri(9, 9, -1, dtype=bool), 1.0),
    "gpt, causal, scaled": ((2, 2, 7, 4), (2, 2, 7, 4), (2, 2, 7, 3), np.tri(7, 7, 0, dtype=bool), 0.5),
    "continuation, 5 past": ((1, 2, 3, 4), (1, 2, 8, 4), (1, 2, 8, 3), mm.causal_mask(np, 3, 5, False), 1.0),
    "persistent, 2 banks": ((3, 10, 4), (2, 3, 6, 4), (2, 3, 6, 4), None, 1.0),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_attention_equals_dense_and_reference(rng, case, dtype, workers, small_tiles):
    q_shape, k_shape, v_shape, mask, scale = CASES[case]
    q, v = rand_tensor(q_shape, rng=rng, dtype=dtype), rand_tensor(v_shape, rng=rng, dtype=dtype)
    inputs = [q, v] if k_shape is None else [q, rand_tensor(k_shape, rng=rng, dtype=dtype), v]

    def call(op):
        if k_shape is None:
            return lambda q, v: op(q, q, v, mask, scale)
        return lambda q, k, v: op(q, k, v, mask, scale)

    upstream = rng.standard_normal(call(mm.softmax_attention)(*inputs).shape).astype(dtype)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == np.float64 else dict(atol=2e-5, rtol=2e-4)
    y_fast, g_fast = grads_of(call(mm.softmax_attention), inputs, upstream)
    assert y_fast.dtype == dtype and all(g.dtype == dtype for g in g_fast)
    for other in (mm._dense_softmax_attention, mm.softmax_attention_reference):
        y_other, g_other = grads_of(call(other), inputs, upstream)
        np.testing.assert_allclose(y_fast, y_other, **tol)
        for a, b in zip(g_fast, g_other):
            np.testing.assert_allclose(a, b, **tol)
    if dtype == np.float64:
        gradcheck(call(mm.softmax_attention), inputs)


def test_tiled_attention_fully_masked_rows_give_zero(rng, workers, small_tiles):
    k, v = rand_tensor((2, 2, 6, 3), rng=rng), rand_tensor((2, 2, 6, 3), rng=rng)
    mask = np.tri(6, 6, -1, dtype=bool)
    mask[3] = False                                          # a fully masked row inside the sequence
    y = mm.softmax_attention(k, k, v, mask)
    y.sum().backward()
    assert np.all(y.data[:, :, [0, 3]] == 0) and np.all(np.isfinite(k.grad)) and np.all(np.isfinite(v.grad))
    np.testing.assert_allclose(y.data, mm._dense_softmax_attention(k, k, v, mask, 1.0).data, atol=1e-12)


def test_tiles_cover_every_row_and_skip_future_keys():
    mask = np.tri(16, 16, -1, dtype=bool)
    tiles = mm._tiles(6, 16, 16, mask)
    covered = np.zeros((6, 16), int)
    for b0, b1, r0, r1, kend in tiles:
        covered[b0:b1, r0:r1] += 1
        assert kend == (r1 - 1 if r1 > 1 else 0)         # strictly past keys of the block's last row
    assert np.all(covered == 1)


@pytest.mark.parametrize("shape", [(300, 40, 70), (5, 40, 7)])
def test_pooled_matmul_equals_plain(rng, shape, workers, monkeypatch):
    monkeypatch.setattr(backend, "PARALLEL_MATMUL_MIN", 1)
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32).T      # a transposed view, as in backward
    np.testing.assert_allclose(backend.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    x, w = rand_tensor((m, k), rng=rng), rand_tensor((k, n), rng=rng)
    gradcheck(ops.matmul, [x, w], mode="random")


def test_parallel_tiles_runs_each_tile_once_and_raises(workers):
    seen = []
    backend.parallel_tiles(lambda worker, i: seen.append((worker, i)), 50, workers)
    assert sorted(i for _, i in seen) == list(range(50))
    assert {w for w, _ in seen} <= set(range(workers))

    def fail(worker, i):
        if i == 7:
            raise ValueError("tile 7")
    with pytest.raises(ValueError, match="tile 7"):
        backend.parallel_tiles(fail, 20, workers)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocked_gelu_equals_reference(rng, dtype, workers, monkeypatch):
    """gelu's in-place passes over row blocks (small blocks, so many of them, and a non-contiguous input)
    give the values and gradients of the plain composed formula."""
    monkeypatch.setattr(backend, "ELEMENTWISE_MIN", 1)
    monkeypatch.setattr(backend, "BLOCK_ELEMENTS", 50)
    x = rand_tensor((7, 9, 33), rng=rng, dtype=dtype)
    x_strided = lambda x: ops.swapaxes(x, 0, 1)  # noqa: E731
    upstream = rng.standard_normal((9, 7, 33)).astype(dtype)
    fast, fast_grads = grads_of(lambda x: ops.gelu(x_strided(x)), [x], upstream)
    plain, plain_grads = grads_of(lambda x: ops.gelu_reference(x_strided(x)), [x], upstream)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(fast, plain, rtol=tol, atol=tol)
    np.testing.assert_allclose(fast_grads[0], plain_grads[0], rtol=tol, atol=tol)
    assert fast.dtype == dtype and fast_grads[0].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocked_layer_norm_equals_reference(rng, dtype, workers, monkeypatch):
    """layer_norm over many small row blocks (and a non-contiguous input) gives the values and the
    gradients (input, weight, bias) of the plain composed formula."""
    monkeypatch.setattr(backend, "ELEMENTWISE_MIN", 1)
    monkeypatch.setattr(backend, "BLOCK_ELEMENTS", 50)
    x, w, b = (rand_tensor(s, rng=rng, dtype=dtype) for s in ((7, 9, 33), (33,), (33,)))
    upstream = rng.standard_normal((9, 7, 33)).astype(dtype)
    fast, fast_grads = grads_of(lambda x, w, b: ops.layer_norm(ops.swapaxes(x, 0, 1), w, b), [x, w, b], upstream)
    plain, plain_grads = grads_of(lambda x, w, b: ops.layer_norm_reference(ops.swapaxes(x, 0, 1), w, b),
                                  [x, w, b], upstream)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(fast, plain, rtol=tol, atol=tol)
    for got, expected in zip(fast_grads, plain_grads):
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    assert fast.dtype == dtype and all(g.dtype == dtype for g in fast_grads)


def test_malloc_settings_apply_on_glibc_and_can_be_switched_off(monkeypatch):
    """keep_freed_memory (run at import) sets glibc's mmap and trim thresholds; MINIMOSAIC_MALLOC=default
    leaves the allocator alone (the bench runs the official code that way)."""
    monkeypatch.setenv("MINIMOSAIC_MALLOC", "default")
    assert backend.keep_freed_memory() is False
    monkeypatch.delenv("MINIMOSAIC_MALLOC")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert backend.keep_freed_memory() is True
    for other in ("win32", "darwin"):  # no mallopt there: nothing is called, nothing fails
        monkeypatch.setattr(sys, "platform", other)
        assert backend.keep_freed_memory() is False
