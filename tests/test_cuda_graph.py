"""The training step replayed from a CUDA graph (fast/cuda_graph.py) against the eager step it records.

The GPU tests run with `pytest -m gpu` and skip without CuPy and a CUDA GPU; the rest run everywhere.
The same comparison through `train()` (evaluations and checkpoints between replays) is in test_train.py.
"""
import numpy as np
import pytest

from minimosaic import backend, fast, models, nn, optim
from minimosaic.fast import cuda_kernels
from minimosaic.fast.cuda_graph import OP_N, CaptureBlas, GraphedTrainingStep, gemm_operand, why_not_captured
from minimosaic.train import training_step

on_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a CUDA GPU not available")


@pytest.fixture(autouse=True)
def fast_layer():
    with fast.enabled():
        yield


def test_only_a_gpu_run_without_dropout_or_accumulation_is_captured():
    assert why_not_captured("gpu", 0.0, 1) is None
    assert "GPU" in why_not_captured("cpu", 0.0, 1)
    assert "dropout" in why_not_captured("gpu", 0.1, 1)
    assert "accumulation" in why_not_captured("gpu", 0.0, 2)
    before = cuda_kernels.active_kernels()
    try:
        cuda_kernels.use_kernels("layer_norm")  # without the AdamW kernel the rates would be baked in
        assert "AdamW" in why_not_captured("gpu", 0.0, 1)
    finally:
        cuda_kernels.use_kernels(before)
    with fast.enabled(False):
        assert "plain" in why_not_captured("gpu", 0.0, 1)


def test_training_step_is_the_loop_body(rng):
    """training_step = forward, backward, clip, AdamW step: the same parameters as written out."""
    config = models.ModelConfig(model="mosaic", vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=6,
                                pmem_size=5)
    ids = rng.integers(0, 11, (2, 7))
    finals = []
    for use_helper in (True, False):
        nn.manual_seed(0)
        model = models.build_model(config)
        opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-2)
        if use_helper:
            loss, norm = training_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 3e-3, grad_clip=0.5)
        else:
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            norm = optim.clip_grad_norm(model.parameters(), 0.5)
            opt.step(3e-3)
            loss = loss.data
        finals.append([float(loss), float(norm)] + [p.data for p in model.parameters()])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)


def _product_cases(seed, make=np.asarray):
    """(a, b) pairs in the layouts a step multiplies: views, transposes, broadcasts, slices, 1-wide.
    make(array) puts each fresh array where it should live (a device) before the views are taken."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: make(rng.standard_normal(shape))  # noqa: E731
    yield r(3, 4), r(4, 5)
    yield r(4, 3).T, r(5, 4).T                                   # both transposed views
    yield r(2, 3, 4, 5), r(2, 3, 5, 6)                           # batched
    yield r(2, 3, 4, 5), r(3, 5, 6)                              # b broadcast over the first axis
    yield r(4, 5), r(2, 3, 5, 6)                                 # a broadcast over both
    yield r(1, 3, 4, 5), r(2, 1, 5, 6)                           # no single batch stride: copied
    yield r(2, 3, 5, 4).swapaxes(-1, -2), r(2, 3, 5, 6)          # transposed batched (K^T)
    yield r(3, 2, 4, 5).transpose(1, 0, 2, 3), r(2, 3, 5, 6)     # batch axes swapped: copied
    yield r(2, 4, 8)[:, :, :5], r(2, 5, 6)                       # rows with a gap (ld > columns)
    yield r(2, 4, 5)[:, ::2], r(2, 5, 3)[..., ::2]               # strided rows, strided columns
    yield r(3, 1, 5), r(3, 5, 1)                                 # one row, one column
    yield r(2, 1, 7).swapaxes(-1, -2), r(2, 1, 4)                # K = 1
    yield r(6, 3).T[:, ::2], r(3, 4)                             # neither layout: copied


def _as_cublas_reads(a, b):
    """a @ b computed from gemm_operand's plans the way cuBLAS reads memory: each operand as a strided,
    column-major batch of matrices over its buffer; C^T = op(B) op(A)."""
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (M, K), N = a.shape[-2:], b.shape[-1]
    count = int(np.prod(batch))

    def transposed(x, rows, cols):  # X^T (cols, rows) for every batch entry
        array, op, ld, step = gemm_operand(x, batch)
        stored = (cols, rows) if op == OP_N else (rows, cols)
        itemsize = array.itemsize
        view = np.lib.stride_tricks.as_strided(array, (count,) + stored, (step * itemsize, itemsize, ld * itemsize))
        return view if op == OP_N else view.transpose(0, 2, 1)
    c_transposed = transposed(b, K, N) @ transposed(a, M, K)                     # (count, N, M)
    return c_transposed.transpose(0, 2, 1).reshape(batch + (M, N))


def test_gemm_plans_read_every_layout_correctly():
    """The (op, ld, batch stride) that the recorded products give cuBLAS, replayed with NumPy strides."""
    for a, b in _product_cases(seed=8):
        np.testing.assert_allclose(_as_cublas_reads(a, b), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_our_cublas_products_match_cupy(dtype):
    cp = backend.array_module("gpu")
    blas = CaptureBlas.get(cp)
    blas.bind(cp.cuda.get_current_stream())
    on_device = _product_cases(seed=9, make=lambda x: cp.asarray(x.astype(dtype)))
    on_host = _product_cases(seed=9, make=lambda x: x.astype(dtype))
    for (a, b), (a_host, b_host) in zip(on_device, on_host):
        assert a.strides == a_host.strides and b.strides == b_host.strides  # the same layouts
        np.testing.assert_allclose(backend.asnumpy(blas.matmul(a, b)), a_host @ b_host,
                                   rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def _model_and_optimizer(model_name, device, dtype=np.float32):
    config = models.ModelConfig(model=model_name, vocab_size=37, n_layer=2, n_head=2, n_embd=16,
                                block_size=12, pmem_size=20)
    nn.manual_seed(0)
    model = models.build_model(config).to(device, dtype=dtype)
    opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95))
    return model, opt


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("model_name", ["mosaic", "gpt"])
def test_replayed_steps_match_eager_steps(model_name):
    """Six steps with a changing learning rate and active clipping: the loss, norm, parameters and AdamW
    moments of every replay equal those of the eager step. In float64, so that rounding differences
    between two GEMM implementations stay far below the tolerance (AdamW divides by sqrt(v): a
    float32 rounding difference in a gradient near 0 can flip the sign of that element's update)."""
    schedule = optim.CosineSchedule(3e-2, 3e-3, 2, 6)
    batches = np.random.default_rng(5).integers(0, 37, (6, 2, 3, 12))
    eager_model, eager_opt = _model_and_optimizer(model_name, "gpu", np.float64)
    graph_model, graph_opt = _model_and_optimizer(model_name, "gpu", np.float64)
    graphed = GraphedTrainingStep(graph_model, graph_opt, grad_clip=0.5)
    for step, (x, y) in enumerate(batches):
        eager_loss, eager_norm = training_step(eager_model, eager_opt, [(x, y)], schedule(step), grad_clip=0.5)
        graph_loss, graph_norm = graphed(x, y, schedule(step))  # host batches, copied in each step
        assert float(eager_norm) > 0.5  # clipping is active, so its scale is part of the replay
        np.testing.assert_allclose(float(graph_loss), float(eager_loss), rtol=1e-10)
        np.testing.assert_allclose(float(graph_norm), float(eager_norm), rtol=1e-10)
        for a, b in zip([p.data for p in graph_model.parameters()] + graph_opt.m + graph_opt.v,
                        [p.data for p in eager_model.parameters()] + eager_opt.m + eager_opt.v):
            np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=1e-9, atol=1e-12)
    assert graphed.graph is not None and graphed.memory_bytes() > 0


@pytest.mark.gpu
@on_gpu
def test_a_batch_of_another_shape_is_refused_not_broadcast():
    model, opt = _model_and_optimizer("gpt", "gpu")
    graphed = GraphedTrainingStep(model, opt)
    batches = np.random.default_rng(7).integers(0, 37, (2, 2, 3, 12))
    for x, y in batches:  # eager, then recorded
        graphed(x, y, 1e-2)
    with pytest.raises(ValueError, match="shape"):
        graphed(batches[0, 0][:1], batches[0, 1][:1], 1e-2)  # (1, 12) would broadcast into (3, 12)


@pytest.mark.gpu
@on_gpu
def test_arrays_made_between_replays_are_not_overwritten():
    """The graph's arrays come from its own memory pool: what other code allocates between replays (and
    keeps across the next replay) still holds its values afterwards."""
    cp = backend.array_module("gpu")
    model, opt = _model_and_optimizer("mosaic", "gpu")
    graphed = GraphedTrainingStep(model, opt, grad_clip=1.0)
    batches = np.random.default_rng(6).integers(0, 37, (5, 2, 3, 12))
    kept = []
    for x, y in batches:
        loss, _ = graphed(x, y, 1e-2)
        kept.append((cp.full(4096, float(len(kept)), dtype=cp.float32), loss.copy()))
    cp.cuda.Device().synchronize()
    for i, (filled, _) in enumerate(kept):
        assert bool((filled == i).all()), i
    assert len({float(loss) for _, loss in kept}) == len(kept)  # each step's own loss, not the last one
