"""Modules: forward values, gradients, parameter naming, state dicts, train/eval."""
import numpy as np
import pytest
from conftest import rand_array, rand_tensor

from minimosaic import MinimosaicError, backend, nn, ops
from minimosaic.gradcheck import gradcheck
from minimosaic.tensor import Tensor


def randomize(module, rng):
    """Fresh random values in every parameter (a zero bias or unit gain would hide mistakes)."""
    for p in module.parameters():
        p.data = p.xp.asarray(rand_array(p.shape, rng, dtype=p.dtype))
    return module


# ---------------------------------------------------------------- layers
def test_linear_forward_and_gradients(device, rng):
    lin = randomize(nn.Linear(4, 3, bias=True), rng).to(device, dtype=np.float64)
    x = rand_tensor((2, 5, 4), device, rng)
    expected = x.numpy() @ lin.weight.numpy() + lin.bias.numpy()
    np.testing.assert_allclose(lin(x).numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda x, w, b: lin(x), [x, lin.weight, lin.bias], rtol=1e-6, atol=1e-9,
                     names=["x", "weight", "bias"])


def test_linear_defaults():
    nn.manual_seed(0)
    lin = nn.Linear(256, 128)
    assert lin.bias is None and lin.weight.shape == (256, 128) and lin.weight.dtype == np.float32
    assert [name for name, _ in lin.named_parameters()] == ["weight"]
    assert lin.weight.numpy().std() == pytest.approx(256 ** -0.5, rel=0.05)  # 32768 samples: ~0.4 % noise
    assert nn.Linear(4, 4, std=0.02).weight.numpy().std() == pytest.approx(0.02, rel=0.5)


def test_embedding_forward_and_gradients(device, rng):
    emb = nn.Embedding(7, 3).to(device, dtype=np.float64)
    ids = backend.array_module(device).asarray(np.array([[0, 6, 6], [2, 0, 6]]))
    np.testing.assert_array_equal(emb(ids).numpy(), emb.weight.numpy()[backend.asnumpy(ids)])
    assert gradcheck(lambda w: emb(ids), [emb.weight], rtol=1e-6, atol=1e-9)


def test_layer_norm_forward_and_gradients(device, rng):
    ln = nn.LayerNorm(6)
    np.testing.assert_array_equal(ln.weight.numpy(), np.ones(6))
    np.testing.assert_array_equal(ln.bias.numpy(), np.zeros(6))
    ln = randomize(ln, rng).to(device, dtype=np.float64)
    x = rand_tensor((3, 6), device, rng)
    xn = x.numpy()
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(x).numpy(), expected * ln.weight.numpy() + ln.bias.numpy(), rtol=1e-12)
    assert gradcheck(lambda x, w, b: ln(x), [x, ln.weight, ln.bias], rtol=1e-6, atol=1e-9)


def test_layer_norm_without_bias(rng):
    ln = randomize(nn.LayerNorm(5, bias=False), rng).to(dtype=np.float64)
    assert [name for name, _ in ln.named_parameters()] == ["weight"]
    x = rand_tensor((2, 5), rng=rng)
    np.testing.assert_allclose(ln(x).numpy(), ops.layer_norm(x, ln.weight).numpy(), rtol=1e-14)
    assert gradcheck(lambda x, w: ln(x), [x, ln.weight], rtol=1e-6, atol=1e-9)


def test_dropout_follows_train_and_eval(rng):
    drop = nn.Dropout(0.5)
    x = Tensor(rand_array((40, 50), rng, "nonzero"))
    zeros = (drop(x).numpy() == 0).mean()
    assert 0.45 < zeros < 0.55  # 2000 Bernoulli(0.5) draws: std 0.011
    assert drop.eval() is drop
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    drop.train()
    assert (drop(x).numpy() == 0).any()
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).numpy(), x.numpy())


# ---------------------------------------------------------------- a nested model
class Block(nn.Module):
    def __init__(self, dim):
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim, bias=True)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x + self.drop(self.fc(self.ln(x)).gelu())


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=4, n_blocks=2, tied=True):
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = [Block(dim) for _ in range(n_blocks)]
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.embed.weight  # the same Parameter, used transposed below
        self.tied = tied

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x @ self.head.weight.T if self.tied else self.head(x)


BLOCK_NAMES = ["ln.weight", "ln.bias", "fc.weight", "fc.bias"]


def test_named_parameters_are_ordered_stable_and_tied_once():
    model = TinyLM()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["embed.weight"] + [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_NAMES]
    assert names == [name for name, _ in TinyLM().named_parameters()]  # the same for every instance
    assert model.parameters()[0] is model.embed.weight is model.head.weight
    assert model.num_parameters() == 11 * 4 + 2 * (4 + 4 + 16 + 4)
    untied = [name for name, _ in TinyLM(tied=False).named_parameters()]
    assert untied == names + ["head.weight"]
    assert len(model.modules()) == 1 + 1 + 2 * 4 + 1  # model, embed, 2 x (block, ln, fc, drop), head


def test_tied_weight_gets_both_gradients(rng):
    model = TinyLM().to(dtype=np.float64).eval()
    ids = np.array([[1, 5, 5, 10]])
    assert gradcheck(lambda *params: model(ids), model.parameters(), mode="random", directions=6,
                     rtol=1e-6, atol=1e-9, names=[n for n, _ in model.named_parameters()])


def test_train_and_eval_reach_every_module(rng):
    model = TinyLM()
    model.eval()
    assert all(not m.training for m in model.modules())
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())  # no dropout: deterministic
    assert model.train() is model
    assert all(m.training for m in model.modules())
    assert not np.array_equal(model(ids).numpy(), model(ids).numpy())  # dropout draws new masks


def test_manual_seed_makes_the_same_model():
    nn.manual_seed(3)
    a = TinyLM().state_dict()
    nn.manual_seed(3)
    b = TinyLM().state_dict()
    nn.manual_seed(4)
    c = TinyLM().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed.weight"], c["embed.weight"])


def test_to_dtype_casts_every_parameter():
    model = TinyLM().to(dtype=np.float64)
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float64)}
    assert model(np.array([[0, 1]])).dtype == np.float64


def test_zero_grad(rng):
    model = TinyLM().eval()
    model(np.array([[1, 2]])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- state dicts
def test_state_dict_round_trip(device):
    nn.manual_seed(0)
    source = TinyLM().eval()
    nn.manual_seed(1)
    target = TinyLM().to(device).eval()
    ids = np.array([[3, 1, 4, 1, 5]])
    assert not np.allclose(source(ids).numpy(), target(backend.to_device(ids, device)).numpy())
    state = {k: v.copy() for k, v in source.state_dict().items()}
    assert list(state) == [name for name, _ in source.named_parameters()]
    target.load_state_dict(state)
    for name, p in target.named_parameters():  # the very same numbers, on the target's device
        np.testing.assert_array_equal(p.numpy(), state[name])
    # the same outputs (a GPU's float32 kernels round differently from NumPy's, hence the tolerance)
    np.testing.assert_allclose(source(ids).numpy(), target(backend.to_device(ids, device)).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert all(p.device == device for p in target.parameters())
    state["embed.weight"][:] = 0  # the model holds its own copy
    assert np.abs(target.embed.weight.numpy()).sum() > 0


def test_load_state_dict_keeps_the_model_dtype():
    model = TinyLM()
    state = {k: v.astype(np.float64) for k, v in TinyLM().state_dict().items()}
    model.load_state_dict(state)
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("blocks.1.fc.bias"), r"missing: blocks\.1\.fc\.bias"),
    (lambda s: s.update({"blocks.2.fc.bias": np.zeros(4)}), r"unexpected: blocks\.2\.fc\.bias"),
    (lambda s: s.update({"blocks.0.fc.weight": np.zeros((4, 5))}),
     r"blocks\.0\.fc\.weight has shape \(4, 5\) but the model expects \(4, 4\)"),
])
def test_load_state_dict_that_does_not_fit_is_a_user_error(change, message):
    model = TinyLM()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = {k: v.copy() + 1 for k, v in TinyLM().state_dict().items()}
    change(state)
    with pytest.raises(MinimosaicError, match=message) as info:
        model.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
