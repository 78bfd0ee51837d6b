"""The fast layer against the plain core: every replacement in fast.ops.REPLACEMENTS gives the values and
gradients of the plain function it replaces, in float64 and float32, on the CPU (and on a GPU, where the
`gpu` tests run). Also: enabling it is explicit and reversible, `import minimosaic` does not enable it,
and the CPU runtime's pool and allocator settings."""
import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEVICES, grads_of, rand_array, rand_tensor

from minimosaic import fast, memories as mm, ops, registry, tensor
from minimosaic.fast import cpu, ops as fast_ops
from minimosaic.gradcheck import gradcheck
from minimosaic.tensor import Tensor

TOLERANCE = {np.float64: dict(rtol=1e-9, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.fixture(params=[1, 2], ids=lambda n: f"workers{n}")
def workers(request):
    cpu.set_cpu_workers(request.param)
    yield cpu.cpu_workers()
    cpu.set_cpu_workers(None)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles of 24 scores and blocks of 50 elements: small inputs are cut into many pieces."""
    monkeypatch.setattr(fast_ops, "TILE_SCORES", 24)
    monkeypatch.setattr(fast_ops, "SMALL_ATTENTION", 0)
    monkeypatch.setattr(fast_ops, "STAGED_SUM_MIN", 1)
    monkeypatch.setattr(cpu, "ELEMENTWISE_MIN", 1)
    monkeypatch.setattr(cpu, "BLOCK_ELEMENTS", 50)
    monkeypatch.setattr(cpu, "PARALLEL_MATMUL_MIN", 1)


def on(device, array):
    from minimosaic import backend
    return backend.to_device(array, device)


def assert_replacement_agrees(name, fn, shapes, rng, dtype, device="cpu", domains=None, gradcheck_it=True):
    """fn(*inputs) with the plain core and with the fast layer on: same values, same input gradients."""
    domains = domains or [None] * len(shapes)
    arrays = [(rng.uniform(0.05, 0.95, s) if d == "unit" else rng.standard_normal(s)).astype(dtype)
              for s, d in zip(shapes, domains)]
    results = []
    for fast_on in (False, True):
        with fast.enabled(fast_on):
            inputs = [Tensor(on(device, a), requires_grad=True) for a in arrays]
            out = fn(*inputs)
            upstream = on(device, np.random.default_rng(1).standard_normal(out.shape).astype(dtype))
            value, grads = grads_of(fn, inputs, upstream)
            from minimosaic import backend
            results.append((backend.asnumpy(value), [backend.asnumpy(g) for g in grads]))
    (plain, plain_grads), (quick, quick_grads) = results
    assert quick.dtype == dtype and all(g.dtype == dtype for g in quick_grads), name
    np.testing.assert_allclose(quick, plain, err_msg=name, **TOLERANCE[dtype])
    for i, (a, b) in enumerate(zip(quick_grads, plain_grads)):
        np.testing.assert_allclose(a, b, err_msg=f"{name}: gradient of input {i}", **TOLERANCE[dtype])
    if gradcheck_it and dtype == np.float64 and device == "cpu":
        with fast.enabled():
            gradcheck(fn, [Tensor(a, requires_grad=True) for a in arrays])


MASK_STRICT, MASK_CAUSAL = np.tri(9, 9, -1, dtype=bool), np.tri(7, 7, 0, dtype=bool)
ATTENTION = {  # name: (fn, shapes)
    "context K K^T, strict causal": (lambda q, v: mm.softmax_attention(q, q, v, MASK_STRICT), [(2, 3, 9, 4), (2, 3, 9, 5)]),
    "gpt, causal, scaled": (lambda q, k, v: mm.softmax_attention(q, k, v, MASK_CAUSAL, 0.5),
                            [(2, 2, 7, 4), (2, 2, 7, 4), (2, 2, 7, 3)]),
    "continuation, 5 past": (lambda q, k, v: mm.softmax_attention(q, k, v, mm.causal_mask(np, 3, 5, False)),
                             [(1, 2, 3, 4), (1, 2, 8, 4), (1, 2, 8, 3)]),
    "persistent, 2 banks": (lambda q, k, v: mm.softmax_attention(q, k, v), [(3, 10, 4), (2, 3, 6, 4), (2, 3, 6, 4)]),
}
OTHERS = {  # name: (replaced function, fn, shapes, domains)
    "matmul 2-D, transposed": ("ops.matmul", lambda a, b: ops.matmul(a, ops.swapaxes(b, 0, 1)), [(40, 7), (9, 7)], None),
    "matmul 2-D, wide (cut by columns)": ("ops.matmul", ops.matmul, [(6, 7), (7, 40)], None),
    "matmul batched": ("ops.matmul", ops.matmul, [(2, 3, 5, 4), (3, 4, 6)], None),
    "matmul, rows @ matrix (a Linear layer)": ("ops.matmul", ops.matmul, [(2, 3, 5, 4), (4, 6)], None),
    "matmul, strided rows @ matrix": ("ops.matmul", lambda a, b: ops.matmul(ops.swapaxes(a, 0, 1), b),
                                      [(5, 3, 4), (4, 6)], None),
    "gelu, strided": ("ops.gelu", lambda x: ops.gelu(ops.swapaxes(x, 0, 1)), [(7, 9, 33)], None),
    "layer_norm, strided": ("ops.layer_norm", lambda x, w, b: ops.layer_norm(ops.swapaxes(x, 0, 1), w, b),
                            [(7, 9, 33), (33,), (33,)], None),
    "layer_norm, no params": ("ops.layer_norm", ops.layer_norm, [(5, 12)], None),
    "layer_norm, weight only": ("ops.layer_norm", ops.layer_norm, [(3, 7, 12), (12,)], None),
    "layer_norm, bias only": ("ops.layer_norm", lambda x, b: ops.layer_norm(x, None, b), [(3, 7, 12), (12,)], None),
    "leaky_average, T 33": ("memories.leaky_average", mm.leaky_average, [(2, 3, 33, 4), (3,)], [None, "unit"]),
    "leaky_average, T 40": ("memories.leaky_average", mm.leaky_average, [(2, 3, 40, 4), (3,)], [None, "unit"]),
    "leaky_average, strided x": ("memories.leaky_average", lambda x, d: mm.leaky_average(ops.transpose(x, (0, 2, 1, 3)), d),
                                 [(2, 37, 3, 4), (3,)], [None, "unit"]),
    "normalize": ("memories.normalize", mm.normalize, [(3, 4, 5)], None),
    "normalize, per-head scale": ("memories.normalize", mm.normalize, [(2, 3, 4, 5), (3, 1, 1)], None),
    "normalize, strided, per-head scale": ("memories.normalize", lambda x, s: mm.normalize(ops.swapaxes(x, 0, 2), s),
                                           [(6, 3, 2, 5), (3, 1, 1)], None),
    "cross_entropy, one row ignored": ("ops.cross_entropy",
                                       lambda z: ops.cross_entropy(z, np.array([[3, -1, 0], [6, 2, 2]])),
                                       [(2, 3, 7)], None),
    "embedding, repeated ids": ("ops.embedding", lambda w: ops.embedding(w, np.array([[1, 3, 3], [0, 6, 1]])),
                                [(7, 5)], None),
    "embedding, no ids": ("ops.embedding", lambda w: ops.embedding(w, np.zeros((0, 2), np.int64)), [(4, 3)], None),
    "sum_to (through broadcasting)": ("tensor.sum_to", lambda a, b: a * b, [(2, 3, 4, 5), (3, 1, 1)], None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(ATTENTION))
@pytest.mark.parametrize("shift_max", [np.inf, -1], ids=["shift by the bound", "shift by the row max"])
def test_attention_replacement_equals_the_plain_attention(rng, case, dtype, device, workers, small_blocks, used,
                                                          shift_max, monkeypatch):
    monkeypatch.setattr(fast_ops, "BOUND_SHIFT_MAX", shift_max)   # every CPU tile takes one of its two shifts
    fn, shapes = ATTENTION[case]
    assert_replacement_agrees(case, fn, shapes, rng, dtype, device)
    assert used.get("memories.softmax_attention")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(OTHERS))
def test_replacement_equals_the_plain_function(rng, case, dtype, device, workers, small_blocks, used):
    name, fn, shapes, domains = OTHERS[case]
    assert_replacement_agrees(case, fn, shapes, rng, dtype, device, domains)
    works = {"tensor.sum_to": device == "gpu",  # big multi-axis sums are a GPU matter
             "ops.gelu": device == "cpu" and dtype == np.float32,  # (float64: exact erf)
             "ops.cross_entropy": device == "cpu", "ops.embedding": device == "cpu"}.get(name, True)
    assert bool(used.get(name)) == works, f"{name}'s replacement ran: {used.get(name)}"


def test_every_replacement_is_tested_and_names_a_replaceable_core_function():
    from minimosaic import optim
    tested = {name for name, *_ in OTHERS.values()} | {"memories.softmax_attention", "optim.adamw_update"}
    assert tested == set(fast_ops.REPLACEMENTS)
    modules = {"ops": ops, "memories": mm, "optim": optim, "tensor": tensor}
    for name in fast_ops.REPLACEMENTS:
        module, function = name.split(".")
        assert getattr(modules[module], function).replaceable_name == name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_replacement_equals_the_plain_update(device, dtype, used, workers, small_blocks):
    """Three steps of AdamW (weight decay on the matrix only), fast layer off and on: on the CPU the update
    over row blocks (here tiny ones), on a GPU the fused kernel."""
    from minimosaic import backend, nn, optim
    rng = np.random.default_rng(3)
    shapes = [(7, 5), (5,), (3, 4, 6)]
    start, grads = [rng.standard_normal(s) for s in shapes], [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    finals = []
    for fast_on in (False, True):
        with fast.enabled(fast_on):
            params = [nn.Parameter(on(device, a.astype(dtype))) for a in start]
            opt = optim.AdamW(optim.weight_decay_groups([(str(i), p) for i, p in enumerate(params)], 0.1),
                              lr=0.01, betas=(0.9, 0.95))
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = on(device, g.astype(dtype))
                opt.step(lr=0.02)
            finals.append([backend.asnumpy(a) for a in [p.data for p in params] + opt.m + opt.v])
    for quick, plain in zip(*finals[::-1]):
        np.testing.assert_allclose(quick, plain, **TOLERANCE[dtype])
    assert used.get("optim.adamw_update")


def test_tiled_attention_fully_masked_rows_give_zero(rng, workers, small_blocks):
    k, v = rand_tensor((2, 2, 6, 3), rng=rng), rand_tensor((2, 2, 6, 3), rng=rng)
    mask = np.tri(6, 6, -1, dtype=bool)
    mask[3] = False                                          # a fully masked row inside the sequence
    with fast.enabled():
        y = mm.softmax_attention(k, k, v, mask)
        y.sum().backward()
    assert np.all(y.data[:, :, [0, 3]] == 0) and np.all(np.isfinite(k.grad)) and np.all(np.isfinite(v.grad))
    np.testing.assert_allclose(y.data, mm.softmax_attention.plain(k, k, v, mask).data, atol=1e-12)


def test_tiled_attention_shifts_each_batch_entry_by_its_bound_or_beyond_it_by_the_row_max(rng, workers, small_blocks,
                                                                                         monkeypatch):
    """In float32, one batch entry with scores in the hundreds, whose bound would leave exp2 at 0, and the
    others with scores of a few units. The others take the bound (the same bits as with it forced on every
    entry), that one each row's max and rowsum(dP * P) (the same bits as with those forced on every entry),
    and they agree with the plain attention."""
    q, k, v = (rand_array((2, 3, 9, 4), rng).astype(np.float32) for _ in range(3))
    q[1, 2] *= 40
    bounds = np.linalg.norm(q, axis=-1) * np.linalg.norm(k, axis=-1).max(axis=-1, keepdims=True) / np.log(2)
    beyond = np.zeros((2, 3), bool)
    beyond[1, 2] = True
    assert bounds[beyond].min() > fast_ops.BOUND_SHIFT_MAX > bounds[~beyond].max()    # (base 2)
    upstream = rand_array((2, 3, 9, 4), rng).astype(np.float32)

    def attention(shift_max):
        monkeypatch.setattr(fast_ops, "BOUND_SHIFT_MAX", shift_max)
        with fast.enabled(not np.isnan(shift_max)):  # (nan: the plain attention)
            inputs = [Tensor(a, requires_grad=True) for a in (q, k, v)]
            y, grads = grads_of(lambda q, k, v: mm.softmax_attention(q, k, v, MASK_STRICT), inputs, upstream)
        return [y] + grads
    chosen, bounded, by_row_max, plain = (attention(limit) for limit in
                                          (fast_ops.BOUND_SHIFT_MAX, np.inf, -1, np.nan))
    for mine, bound_everywhere, row_max_everywhere, exact in zip(chosen, bounded, by_row_max, plain):
        np.testing.assert_array_equal(mine[~beyond], bound_everywhere[~beyond])
        np.testing.assert_array_equal(mine[beyond], row_max_everywhere[beyond])
        np.testing.assert_allclose(mine[~beyond], exact[~beyond], **TOLERANCE[np.float32])
    # Beyond the bound: the output too (its gradients are the row max's, which the replacement test checks;
    # with scores in the hundreds, float32 gradients differ from the plain core's beyond its tolerance).
    np.testing.assert_allclose(chosen[0], plain[0], **TOLERANCE[np.float32])
    assert not np.allclose(bounded[0][beyond], plain[0][beyond], atol=1e-3)  # the bound would be wrong there


def test_normalize_of_a_zero_row_is_zero_with_a_finite_gradient_as_in_the_plain_core(rng, workers, small_blocks):
    data = rng.standard_normal((2, 3, 4, 5))
    data[1, 2, 3] = 0                                        # a zero key: its u is 0, its gradient finite
    scales, results = rng.uniform(0.5, 2, (3, 1, 1)), []
    for fast_on in (False, True):
        with fast.enabled(fast_on):
            x, scale = Tensor(data.copy(), requires_grad=True), Tensor(scales.copy(), requires_grad=True)
            y = mm.normalize(x, scale)
            (y * Tensor(np.random.default_rng(1).standard_normal(y.shape))).sum().backward()
            results.append((y.data, x.grad, scale.grad))
    assert np.all(results[1][0][1, 2, 3] == 0) and np.all(np.isfinite(results[1][1]))
    for quick, plain in zip(results[1], results[0]):
        np.testing.assert_allclose(quick, plain, rtol=1e-12, atol=1e-12)


def test_gelu_float32_is_within_float32_rounding_of_the_exact_gelu_where_it_matters():
    """The fast float32 GELU against the float64 exact one, from -12 to 12 (and +-0, +-30): its error is
    A&S 7.1.26's, absolute ~1e-7 times |x| at most, so a training step cannot tell the two apart."""
    from scipy.special import erf
    x = np.concatenate([np.linspace(-12, 12, 20001), [0.0, -0.0, 30.0, -30.0]]).astype(np.float32)
    with fast.enabled():
        t = Tensor(x, requires_grad=True)
        y = ops.gelu(t)
        y.sum().backward()
    exact = x.astype(np.float64) * (1 + erf(x / np.sqrt(2))) / 2
    slope = (1 + erf(x / np.sqrt(2))) / 2 + x * np.exp(-x.astype(np.float64) ** 2 / 2) / np.sqrt(2 * np.pi)
    assert np.abs(y.data - exact).max() < 1e-6 and np.abs(t.grad - slope).max() < 1e-6
    assert y.data[-4] == 0 and y.data[-2] == 30 and y.data[-1] == 0


def test_attention_with_dropout_few_scores_or_float16_is_left_to_the_plain_core(rng):
    q = rand_tensor((2, 4, 3), rng=rng)
    assert fast_ops.softmax_attention(q, q, q, None, 1.0, dropout=0.1) is NotImplemented
    assert fast_ops.softmax_attention(q, q, q, None, 1.0) is NotImplemented  # 32 scores: plain is faster
    big = rand_tensor((4, 128, 8), rng=rng)
    assert fast_ops.softmax_attention(big, big, big, None, 1.0) is not NotImplemented
    half = Tensor(big.data.astype(np.float16))   # the plain op computes it in float32
    assert fast_ops.softmax_attention(half, half, half, None, 1.0) is NotImplemented


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_tiles_cover_every_row_and_skip_future_keys(workers):
    mask = np.tri(16, 16, -1, dtype=bool)
    covered = np.zeros((6, 16), int)
    for b0, b1, r0, r1, kend in fast_ops._tiles(6, 16, 16, mask, workers):
        covered[b0:b1, r0:r1] += 1
        assert kend == (r1 - 1 if r1 > 1 else 0)         # strictly past keys of the block's last row
    assert np.all(covered == 1)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_scan_is_the_recurrence_for_any_chunk(rng, chunk):
    x, lam = rng.standard_normal((2, 3, 11, 4)), rng.uniform(0.1, 0.9, 3)
    np.testing.assert_allclose(fast_ops.chunked_scan(x, lam, chunk),
                               mm.leaky_average.plain(Tensor(x), Tensor(lam)).data, rtol=1e-12)
    backwards = fast_ops.chunked_scan(x, lam, chunk, reverse=True)[:, :, ::-1]
    np.testing.assert_allclose(backwards, fast_ops.chunked_scan(x[:, :, ::-1], lam, 1), rtol=1e-12)


def test_parallel_tiles_runs_each_tile_once_and_raises(workers):
    seen = []
    cpu.parallel_tiles(lambda worker, i: seen.append((worker, i)), 50, workers)
    assert sorted(i for _, i in seen) == list(range(50))
    assert {w for w, _ in seen} <= set(range(workers))

    def fail(worker, i):
        if i == 7:
            raise ValueError("tile 7")
    with pytest.raises(ValueError, match="tile 7"):
        cpu.parallel_tiles(fail, 20, workers)


# ---------------------------------------------------------------- switching the layer on and off
def test_enable_and_disable_register_and_unregister_every_replacement():
    with fast.enabled(False):
        assert not fast.is_enabled() and not registry.registered()
        with fast.enabled():
            assert fast.is_enabled()
            assert set(registry.registered()) == set(fast_ops.REPLACEMENTS)
        assert not fast.is_enabled()


def test_importing_minimosaic_changes_nothing_process_wide():
    """A fresh interpreter: `import minimosaic` (and its core modules) registers nothing, starts no
    thread, and leaves OpenBLAS's thread count and glibc's malloc alone."""
    probe = """
import threading, numpy
before_threads = threading.active_count()
from minimosaic.fast import cpu
controls = cpu._openblas_controls()
blas_before = controls[0]() if controls else None
import minimosaic, minimosaic.memories, minimosaic.models, minimosaic.optim, minimosaic.train, minimosaic.cli
from minimosaic import registry
assert not registry.registered(), registry.registered()
assert threading.active_count() == before_threads
assert (controls[0]() if controls else None) == blas_before
print("ok")
"""
    # fast.cpu is imported first only to read BLAS's thread count; importing it changes nothing either
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_malloc_settings_apply_on_glibc_and_can_be_switched_off(monkeypatch):
    """keep_freed_memory (run by fast.enable) sets glibc's mmap and trim thresholds;
    MINIMOSAIC_MALLOC=default leaves the allocator alone."""
    monkeypatch.setenv("MINIMOSAIC_MALLOC", "default")
    assert cpu.keep_freed_memory() is False
    monkeypatch.delenv("MINIMOSAIC_MALLOC")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert cpu.keep_freed_memory() is True
    for other in ("win32", "darwin"):  # no mallopt there: nothing is called, nothing fails
        monkeypatch.setattr(sys, "platform", other)
        assert cpu.keep_freed_memory() is False


@pytest.mark.parametrize("tile_scores", [24, 4000], ids=["one-row-tiles", "slices-by-workers"])
def test_tiled_attention_gradients_are_bitwise_the_same_for_any_number_of_threads(rng, small_blocks, monkeypatch,
                                                                                    tile_scores):
    """One thread runs a batch slice's row blocks in order of rows and adds into dk and dv: the result
    does not depend on which thread ran which slice (it used to, by ~1e-7 in float32, from run to run),
    nor on how many batch entries a slice holds (with 4000-score tiles, 3 on 1 worker and 2 on 2)."""
    monkeypatch.setattr(fast_ops, "TILE_SCORES", tile_scores)
    q, v = rand_tensor((3, 2, 40, 8), rng=rng, dtype=np.float32), rand_tensor((3, 2, 40, 8), rng=rng, dtype=np.float32)
    mask = np.tri(40, 40, -1, dtype=bool)
    results = []
    for workers in (1, 2, 2, 2):
        cpu.set_cpu_workers(workers)
        try:
            with fast.enabled():
                y, grads = grads_of(lambda q, v: mm.softmax_attention(q, q, v, mask), [q, v],
                                    np.ones((3, 2, 40, 8), np.float32))
        finally:
            cpu.set_cpu_workers(None)
        results.append([y] + list(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size, expected", [("1024K", 1 << 20), ("2048K", 2 << 20), ("2M", 2 << 20), ("512K", 1 << 19)])
def test_tiles_are_sized_to_the_l2_cache_read_from_sysfs(tmp_path, size, expected):
    for index, (level, kind, text) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                                 ("2", "Unified", size), ("3", "Unified", "32768K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(text + "\n")
    assert cpu.l2_cache_bytes(str(tmp_path)) == expected
    assert cpu.l2_cache_bytes(str(tmp_path / "nowhere")) == cpu.DEFAULT_L2_BYTES
