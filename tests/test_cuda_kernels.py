"""The CUDA kernels (minimosaic/fast/cuda_kernels.py) against the plain code they replace.

Each GPU test runs the same op twice on the same fresh random inputs, with the fast layer on: once with
its kernel switched off (the replacement then declines and the plain core's CuPy code runs, or, for the
attention, fast.ops's CuPy code) and once with it on, and compares values and gradients; in float64
the two must agree to rounding, in float32 to well under 1e-4. Before each fast run the memory pool is
filled with NaN, so an output element a kernel forgets to write shows up. The GPU tests skip cleanly
without CuPy and a GPU; the switch itself is tested everywhere.
"""
import numpy as np
import pytest

from conftest import gpu_only, grads_of
from minimosaic import backend, fast, memories, models, nn, ops
from minimosaic.fast import cuda_kernels
from minimosaic.fast import ops as fast_ops
from minimosaic.errors import MinimosaicError
from minimosaic.tensor import Tensor

DTYPES = [np.float64, np.float32]
TOLERANCE = {np.float64: 1e-10, np.float32: 2e-5}


def on_gpu(test):
    """Mark a test as needing the GPU (marker `gpu`; skipped with a reason where there is none)."""
    for mark in gpu_only:
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def restore_kernels():
    before = cuda_kernels.active_kernels()
    with fast.enabled():
        yield
    cuda_kernels.use_kernels(before)


# ---------------------------------------------------------------- the switch (runs everywhere)
def test_the_switch_takes_all_none_or_a_list_and_refuses_unknown_names():
    assert cuda_kernels.use_kernels("all") == sorted(cuda_kernels.KERNELS)
    assert cuda_kernels.use_kernels("0") == []
    assert cuda_kernels.use_kernels("leaky_scan, adamw") == ["adamw", "leaky_scan"]
    with pytest.raises(MinimosaicError, match="unknown CUDA kernel"):
        cuda_kernels.use_kernels("leaky_scan,warp_drive")


def test_kernels_never_run_on_numpy_arrays():
    cuda_kernels.use_kernels("all")
    assert not any(cuda_kernels.enabled(name, np.zeros(3, np.float32)) for name in cuda_kernels.KERNELS)


# ---------------------------------------------------------------- helpers
def _poison_pool(cp):
    """Fill freed pool memory with NaN, so unwritten kernel outputs are NaN instead of stale values."""
    junk = [cp.full(n, cp.nan, cp.float32) for n in (1 << 10, 1 << 14, 1 << 18, 1 << 22)]
    del junk


def _compare(kernel, fn, arrays, dtype, upstream_shape=None, rng=None):
    """fn(*Tensors) with `kernel` off and on: values and input gradients agree."""
    cp = backend.array_module("gpu")
    rng = rng or np.random.default_rng(0)
    results = []
    for on in (False, True):
        cuda_kernels.use_kernels([kernel] if on else [])
        inputs = [Tensor(cp.asarray(a.astype(dtype)), requires_grad=True) for a in arrays]
        if on:
            _poison_pool(cp)
        out = fn(*inputs)
        upstream = cp.asarray(rng.standard_normal(out.shape).astype(dtype)) if results == [] else results[0][2]
        value, grads = grads_of(fn, inputs, upstream)
        results.append((backend.asnumpy(value), [backend.asnumpy(g) for g in grads], upstream))
    (plain, plain_grads, _), (fast, fast_grads, _) = results
    assert np.isfinite(fast).all() and all(np.isfinite(g).all() for g in fast_grads)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(fast, plain, rtol=tol, atol=tol * np.abs(plain).max())
    for i, (f, p) in enumerate(zip(fast_grads, plain_grads)):
        np.testing.assert_allclose(f, p, rtol=tol, atol=tol * np.abs(p).max(), err_msg=f"gradient of input {i}")


# ---------------------------------------------------------------- each kernel against its reference
@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 37, 64])
def test_leaky_scan_matches_the_plain_recurrence(dtype, T):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((2, T, 3, 8))                     # (B, T, H, hs): the kernel reads it strided
    decay = rng.uniform(0.05, 0.99, 3)

    def fn(x, decay):
        return memories.leaky_average(ops.transpose(x, (0, 2, 1, 3)), decay)
    _compare("leaky_scan", fn, [x, decay], dtype, rng=rng)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["causal", "causal_past", "none_wide"])
def test_softmax_rows_matches_the_plain_softmax_terms(dtype, case):
    cp = backend.array_module("gpu")
    rng = np.random.default_rng(1)
    if case == "causal":        # first row fully masked (the context memory excludes the present)
        q, k, mask, scale = (2, 3, 19, 8), (2, 3, 19, 8), memories.causal_mask(cp, 19, 0, False), 1.0
    elif case == "causal_past":  # generation: 5 new queries after 11 cached keys
        q, k, mask, scale = (2, 5, 8), (2, 16, 8), memories.causal_mask(cp, 5, 11, True), 0.7
    else:                        # the persistent memory: no mask, rows longer than a block
        q, k, mask, scale = (3, 7, 8), (3, 300, 8), None, 1.3
    q, k = (cp.asarray(rng.standard_normal(s).astype(dtype)) for s in (q, k))
    cuda_kernels.use_kernels([])
    e0, r0 = fast_ops._softmax_terms(q, k, mask, scale)
    cuda_kernels.use_kernels(["softmax_rows"])
    _poison_pool(cp)
    e1, r1 = fast_ops._softmax_terms(q, k, mask, scale)
    tol = TOLERANCE[dtype]
    assert e1.shape == e0.shape and r1.shape == r0.shape
    np.testing.assert_allclose(backend.asnumpy(e1), backend.asnumpy(e0), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.asnumpy(r1), backend.asnumpy(r0), rtol=tol)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["softmax_rows", "attention_score_grad"])
@pytest.mark.parametrize("memory", ["context", "persistent"])
def test_softmax_attention_with_each_kernel_matches_the_plain_op(dtype, kernel, memory):
    rng = np.random.default_rng(2)
    if memory == "context":   # q is k, causal without the present
        k, v = rng.standard_normal((2, 3, 17, 8)), rng.standard_normal((2, 3, 17, 8))

        def fn(k, v):
            return memories.softmax_attention(k, k, v, mask=memories.causal_mask(k.xp, 17, 0, False))
        _compare(kernel, fn, [k, v], dtype, rng=rng)
    else:                     # (H, B*T, hs) queries against (banks, H, slots, hs) stored pairs
        q, pk, pv = (rng.standard_normal(s) for s in ((3, 10, 8), (2, 3, 40, 8), (2, 3, 40, 8)))
        _compare(kernel, lambda q, pk, pv: memories.softmax_attention(q, pk, pv, scale=0.9), [q, pk, pv],
                 dtype, rng=rng)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [37, 768])
@pytest.mark.parametrize("affine", ["weight_and_bias", "weight", "none"])
def test_layer_norm_kernel_matches_the_plain_op(dtype, width, affine):
    rng = np.random.default_rng(width)
    arrays = [rng.standard_normal((3, 5, width)) * 3 + 1]
    if affine != "none":
        arrays.append(rng.standard_normal(width))
    if affine == "weight_and_bias":
        arrays.append(rng.standard_normal(width))
    _compare("layer_norm", lambda x, *wb: ops.layer_norm(x, *wb), arrays, dtype, rng=rng)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [8, 64, 100])
@pytest.mark.parametrize("scaled", [False, True])
def test_normalize_kernel_matches_the_plain_op(dtype, width, scaled):
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 3, 9, width))
    x[0, 1, 4] = 0  # a zero row: y = 0 and a finite gradient
    if scaled:        # a per-head scale (H, 1, 1), applied in the same pass
        _compare("normalize", memories.normalize, [x, rng.uniform(0.5, 2.0, (3, 1, 1))], dtype, rng=rng)
    else:
        _compare("normalize", memories.normalize, [x], dtype, rng=rng)


# The AdamW kernel against optim.adamw_update: tests/test_fast.py::test_adamw_replacement_equals_the_plain_update


@on_gpu
@pytest.mark.parametrize("model_name", ["mosaic", "gpt"])
def test_a_training_step_with_all_kernels_matches_the_plain_step(model_name):
    """Loss and every parameter gradient of a small model, all kernels on vs all off (float32)."""
    cp = backend.array_module("gpu")
    config = models.ModelConfig(model=model_name, vocab_size=23, n_layer=2, n_head=2, n_embd=16,
                                block_size=12, pmem_size=20)
    ids = np.random.default_rng(4).integers(0, 23, (3, 13))
    results = []
    for names in ([], "all"):  # with no kernel, fast.ops uses its CuPy code or declines to the plain core
        cuda_kernels.use_kernels(names)
        nn.manual_seed(0)
        model = models.build_model(config).to("gpu")
        loss = model.loss(cp.asarray(ids[:, :-1]), cp.asarray(ids[:, 1:]))
        loss.backward()
        results.append((float(loss.item()), [backend.asnumpy(p.grad) for _, p in model.named_parameters()]))
    (plain_loss, plain_grads), (kernel_loss, kernel_grads) = results
    assert kernel_loss == pytest.approx(plain_loss, rel=1e-5)
    for got, plain in zip(kernel_grads, plain_grads):
        np.testing.assert_allclose(got, plain, rtol=1e-3, atol=1e-4 * np.abs(plain).max())
