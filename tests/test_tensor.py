"""The Tensor and its graph: dtypes, devices, backward's bookkeeping, and a whole chained model."""
import builtins

import numpy as np
import pytest
from conftest import DEVICES, rand_array, rand_tensor

from minimosaic import MinimosaicError, backend, ops
from minimosaic.gradcheck import gradcheck
from minimosaic.tensor import Tensor, is_grad_enabled, no_grad, sum_to


# ---------------------------------------------------------------- dtypes and devices
def test_arrays_keep_their_dtype_and_numbers_become_float32():
    assert Tensor(np.ones(3, np.float64)).dtype == np.float64
    assert Tensor(np.ones(3, np.float32)).dtype == np.float32
    assert Tensor(np.arange(3)).dtype == np.arange(3).dtype  # integer ids stay integers
    assert Tensor(np.ones(3, bool)).dtype == bool
    assert Tensor(2.5).dtype == np.float32
    assert Tensor(3).dtype == np.float32
    assert Tensor([1, 2, 3]).dtype == np.float32
    assert Tensor([[1.0, 2.0]]).dtype == np.float32
    assert Tensor([1, 2], dtype=np.float64).dtype == np.float64
    assert Tensor(np.ones(2, np.float32), dtype=np.float64).dtype == np.float64


def test_python_numbers_do_not_upcast_float32():
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = (x * 2.0 + 1.0 - 0.5) / 3.0
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_numpy_and_to_cpu():
    a = rand_array((2, 3))
    t = Tensor(a)
    out = t.numpy()
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, a)
    assert t.to("cpu") is t and t.to("CPU") is t
    assert t.device == "cpu" and t.xp is np
    assert Tensor(a, device="cpu").device == "cpu"


def _hide_cupy(monkeypatch):
    """Make `import cupy` fail, whether or not CuPy is installed, so the error path is deterministic."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(backend, "_cupy", None)


@pytest.mark.parametrize("name", ["gpu", "cuda", "GPU"])
def test_gpu_without_cupy_says_what_to_install(monkeypatch, name):
    _hide_cupy(monkeypatch)
    t = Tensor(np.ones(3))
    with pytest.raises(MinimosaicError, match=r"pip install .*minimosaic\[gpu\]") as info:
        t.to(name)
    assert "cupy" in str(info.value).lower() and "\n" not in str(info.value)
    with pytest.raises(MinimosaicError, match="CuPy"):
        Tensor(np.ones(3), device=name)
    assert backend.gpu_available() is False  # the probe never raises


@pytest.mark.parametrize("name", ["tpu", "cuda:0", "", "mps"])
def test_unknown_device_is_a_user_error(name):
    with pytest.raises(MinimosaicError, match="unknown device.*'cpu' or 'gpu'"):
        Tensor(np.ones(2)).to(name)


def test_round_trip_through_the_device(device):
    a = rand_array((3, 4))
    t = Tensor(a, requires_grad=True).to(device)
    assert t.device == device and t.requires_grad
    np.testing.assert_array_equal(t.to("cpu").numpy(), a)


# ---------------------------------------------------------------- backward's bookkeeping
def test_gradient_accumulates_when_a_tensor_is_used_twice(device, rng):
    x = rand_tensor((3, 4), device, rng)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(backend.asnumpy(x.grad), 2 * x.numpy() + 1, rtol=1e-14)


def test_gradients_add_up_over_separate_backward_passes(rng):
    """Two forward/backward passes without zero_grad add their gradients (gradient accumulation)."""
    x = rand_tensor((3,), rng=rng)
    for _ in range(2):
        (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0, 6.0])


def test_second_backward_through_a_freed_graph_raises(rng):
    """backward() frees the graph it walked; walking it again must fail loudly, never count twice."""
    x = rand_tensor((3,), rng=rng)
    loss = (x * x).sum()
    loss.backward()
    first = x.grad.copy()
    with pytest.raises(RuntimeError, match="freed"):
        loss.backward()
    np.testing.assert_array_equal(x.grad, first)


def test_shared_subgraph_after_backward_raises_instead_of_losing_gradients(rng):
    x = rand_tensor((3,), rng=rng)
    h = x * 2.0
    h.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):
        (h * 3.0).sum().backward()  # silently treating h as a leaf would leave x.grad at 2


def test_summed_losses_share_a_subgraph_in_one_backward(rng):
    x = rand_tensor((3,), rng=rng)
    h = x * 2.0
    (h.sum() + (h * 3.0).sum()).backward()
    np.testing.assert_allclose(x.grad, [8.0, 8.0, 8.0])


def test_backward_needs_requires_grad():
    with pytest.raises(RuntimeError, match="require"):
        Tensor(np.ones(2)).sum().backward()


def test_backward_with_an_explicit_output_gradient(rng):
    x = rand_tensor((2, 3), rng=rng)
    g = rand_array((2, 3), rng)
    (x * 2.0).backward(g)
    np.testing.assert_allclose(x.grad, 2 * g)


def test_leaf_gradients_are_their_own_writable_arrays(rng):
    """In-place edits of one .grad (clipping, zeroing) must not reach another tensor or the caller."""
    a, b = rand_tensor((3,), rng=rng), rand_tensor((3,), rng=rng)
    g = np.ones(3)
    (a + b).backward(g)
    a.grad *= 0.5
    np.testing.assert_array_equal(b.grad, np.ones(3))
    np.testing.assert_array_equal(g, np.ones(3))
    c = rand_tensor((2, 3), rng=rng)
    c.sum().backward()  # the sum's gradient is a broadcast (read-only) view of one number
    c.grad *= 2
    np.testing.assert_array_equal(c.grad, np.full((2, 3), 2.0))


def test_no_grad_records_no_graph(rng):
    x = rand_tensor((3,), rng=rng)
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
        with no_grad():
            pass
        assert not is_grad_enabled()  # a nested block restores the outer state, not True
    assert is_grad_enabled()
    assert not y.requires_grad and y._parents == () and y._backward is None
    with pytest.raises(ValueError), no_grad():
        raise ValueError
    assert is_grad_enabled()  # restored after an exception


def test_detach_cuts_the_graph(rng):
    x = rand_tensor((3,), rng=rng)
    y = (x * 2.0).detach()
    assert not y.requires_grad
    (x * y).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.numpy())  # y counted as a constant


def test_deep_graph_backprops_without_recursion_error(rng):
    x = rand_tensor((2,), rng=rng)
    y = x
    for _ in range(5000):
        y = y + x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [5001.0, 5001.0])
    z = rand_tensor((), rng=rng)
    w = z
    for _ in range(5000):
        w = w * 1.0001
    w.backward()
    assert z.grad == pytest.approx(1.0001 ** 5000, rel=1e-10)


# ---------------------------------------------------------------- broadcasting
@pytest.mark.parametrize("grad_shape, shape", [
    ((2, 3, 4), (3, 1)), ((2, 3, 4), (4,)), ((2, 3, 4), ()), ((2, 3, 4), (1, 3, 4)),
    ((2, 3, 4), (2, 1, 1)), ((5,), (1,)), ((3, 4), (3, 4))])
def test_sum_to_undoes_broadcasting(grad_shape, shape, rng):
    g = rand_array(grad_shape, rng)
    out = sum_to(g, shape)
    assert out.shape == shape
    # the adjoint of broadcast_to: <sum_to(g), v> == <g, broadcast_to(v)> for every v
    v = rand_array(shape, rng)
    assert np.sum(out * v) == pytest.approx(np.sum(g * np.broadcast_to(v, grad_shape)), rel=1e-12)


def test_sum_to_same_shape_is_the_same_array():
    g = np.ones((2, 3))
    assert sum_to(g, (2, 3)) is g


def test_broadcast_gradients_are_summed_to_the_parent_shape(device, rng):
    a, b, c = rand_tensor((3, 4), device, rng), rand_tensor((4,), device, rng), rand_tensor((3, 1), device, rng)
    (a * b + c).sum().backward()
    assert b.grad.shape == (4,) and c.grad.shape == (3, 1)
    np.testing.assert_allclose(backend.asnumpy(b.grad), a.numpy().sum(0), rtol=1e-14)
    np.testing.assert_allclose(backend.asnumpy(c.grad), np.full((3, 1), 4.0))


# ---------------------------------------------------------------- a whole chained model
def mlp_loss(x, w1, b1, ln_w, ln_b, w2, b2, targets, activation):
    """x @ W1 + b1 -> layer_norm -> activation -> @ W2 + b2 -> softmax cross-entropy."""
    h = ops.layer_norm(x @ w1 + b1, ln_w, ln_b)  # (N, H)
    logits = activation(h) @ w2 + b2              # (N, V)
    return ops.cross_entropy(logits, targets)


MLP_SHAPES = {"x": (5, 4), "w1": (4, 6), "b1": (6,), "ln_w": (6,), "ln_b": (6,), "w2": (6, 3), "b2": (3,)}
TARGETS = np.array([0, 2, 1, -1, 2])  # one ignored row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [ops.gelu, ops.tanh], ids=["gelu", "tanh"])
def test_mlp_gradients_match_finite_differences_to_1e6(activation, device):
    rng = np.random.default_rng(42)
    params = [rand_tensor(s, device, rng) for s in MLP_SHAPES.values()]
    targets = backend.array_module(device).asarray(TARGETS)
    assert gradcheck(lambda *p: mlp_loss(*p, targets, activation), params, rtol=1e-6, atol=1e-10,
                     names=list(MLP_SHAPES))


def test_mlp_gradients_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    arrays = [rand_array(s, rng) for s in MLP_SHAPES.values()]
    ours = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    loss = mlp_loss(*ours, TARGETS, ops.gelu)
    loss.backward()

    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    x, w1, b1, ln_w, ln_b, w2, b2 = theirs
    h = torch.nn.functional.layer_norm(x @ w1 + b1, (6,), ln_w, ln_b, eps=1e-5)
    logits = torch.nn.functional.gelu(h) @ w2 + b2
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(TARGETS), ignore_index=-1)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for name, mine, t in zip(MLP_SHAPES, ours, theirs):
        np.testing.assert_allclose(mine.grad, t.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
