"""Optimisers against hand-written references, clipping, schedules, and two small problems learned."""
import math

import numpy as np
import pytest
from conftest import rand_array

from minimosaic import nn, ops
from minimosaic.nn import Parameter
from minimosaic.optim import (SGD, AdamW, ConstantSchedule, CosineSchedule, clip_grad_norm, is_matrix,
                              weight_decay_groups)
from minimosaic.tensor import Tensor

STEPS = 3


def params_and_grads(rng, shapes=((3, 4), (4,))):
    """float64 parameters and STEPS fresh gradients for each."""
    params = [Parameter(rand_array(s, rng), dtype=np.float64) for s in shapes]
    grads = [[rand_array(s, rng) for s in shapes] for _ in range(STEPS)]
    return params, grads


def adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """AdamW written from the paper's algorithm (Loshchilov & Hutter, Alg. 2, with bias correction)."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


# ---------------------------------------------------------------- AdamW
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_the_numpy_reference(wd, rng):
    params, grads = params_and_grads(rng)
    start = [p.numpy().copy() for p in params]
    opt = AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    for k, p in enumerate(params):
        expected = adamw_reference(start[k], [g[k] for g in grads], 0.01, 0.8, 0.95, 1e-6, wd)
        np.testing.assert_allclose(p.numpy(), expected, rtol=1e-13, atol=1e-15)
        assert not np.allclose(p.numpy(), start[k])


def step_side_by_side(torch, ours, ref, params, theirs, grads):
    """Give both optimizers the same gradients, step by step."""
    for step_grads in grads:
        for p, t, g in zip(params, theirs, step_grads):
            p.grad, t.grad = g, torch.tensor(g)
        ours.step()
        ref.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(wd, rng):
    torch = pytest.importorskip("torch")
    params, grads = params_and_grads(rng)
    theirs = [torch.tensor(p.numpy().copy(), requires_grad=True) for p in params]
    ours = AdamW(params, lr=0.02, weight_decay=wd)
    ref = torch.optim.AdamW(theirs, lr=0.02, weight_decay=wd)  # same defaults: betas, eps
    step_side_by_side(torch, ours, ref, params, theirs, grads)
    for p, t in zip(params, theirs):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_adamw_step_lr_overrides_and_groups_keep_their_own_decay(rng):
    params, grads = params_and_grads(rng)
    start = [p.numpy().copy() for p in params]
    opt = AdamW([{"params": [params[0]], "weight_decay": 0.5}, {"params": [params[1]], "weight_decay": 0.0}],
                lr=123.0, weight_decay=0.01)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step(lr=0.03)  # the scheduled rate wins over the group's lr
    for k, wd in enumerate((0.5, 0.0)):
        expected = adamw_reference(start[k], [g[k] for g in grads], 0.03, 0.9, 0.999, 1e-8, wd)
        np.testing.assert_allclose(params[k].numpy(), expected, rtol=1e-13)


def test_adamw_skips_parameters_without_gradient(rng):
    params, grads = params_and_grads(rng)
    frozen = params[1].numpy().copy()
    opt = AdamW(params, lr=0.1)
    params[0].grad = grads[0][0]
    opt.step()
    np.testing.assert_array_equal(params[1].numpy(), frozen)
    assert np.all(opt.m[1] == 0) and np.all(opt.v[1] == 0)


def test_adamw_keeps_float32(rng):
    p = Parameter(rand_array((3, 3), rng).astype(np.float32))
    opt = AdamW([p], lr=0.1)
    p.grad = rand_array((3, 3), rng).astype(np.float32)
    opt.step()
    assert p.dtype == np.float32 and opt.m[0].dtype == np.float32 and opt.v[0].dtype == np.float32


def test_adamw_state_dict_resumes_the_same_trajectory(rng):
    params, grads = params_and_grads(rng)
    twin = [Parameter(p.numpy().copy(), dtype=np.float64) for p in params]
    a = AdamW(params, lr=0.05)
    for p, g in zip(params, grads[0]):
        p.grad = g
    a.step()
    b = AdamW(twin, lr=0.05)
    for p, q in zip(twin, params):
        p.data = q.data.copy()
    b.load_state_dict({k: (v if k == "steps" else [x.copy() for x in v]) for k, v in a.state_dict().items()})
    for step_grads in grads[1:]:
        for p, q, g in zip(params, twin, step_grads):
            p.grad, q.grad = g, g
        a.step()
        b.step()
    for p, q in zip(params, twin):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


# ---------------------------------------------------------------- decay groups
def test_weight_decay_groups_split_matrices_from_gains_and_scalars():
    named = [("embed", np.zeros((11, 4))), ("fc.weight", np.zeros((4, 8))), ("qkv", np.zeros((3, 4, 2))),
             ("ln.weight", np.zeros(4)), ("fc.bias", np.zeros(8)), ("bandwidth", np.zeros((1, 4, 1, 1))),
             ("row", np.zeros((1, 8))), ("scalar", np.zeros(()))]
    named = [(n, Parameter(a, dtype=np.float32)) for n, a in named]
    decay, no_decay = weight_decay_groups(named, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in named}
    assert [by_id[id(p)] for p in decay["params"]] == ["embed", "fc.weight", "qkv"]
    assert [by_id[id(p)] for p in no_decay["params"]] == ["ln.weight", "fc.bias", "bandwidth", "row", "scalar"]
    assert is_matrix(named[0][1]) and not is_matrix(named[5][1])


def test_weight_decay_groups_feed_adamw(rng):
    model = nn.Linear(3, 2, bias=True)
    opt = AdamW(weight_decay_groups(model.named_parameters(), 0.2), lr=0.1)
    bias_before = model.bias.numpy().copy()
    w_before = model.weight.numpy().copy()
    for p in model.parameters():
        p.grad = np.zeros(p.shape, np.float32)  # only the decay moves anything
    opt.step()
    np.testing.assert_allclose(model.weight.numpy(), w_before * (1 - 0.1 * 0.2), rtol=1e-6)
    np.testing.assert_array_equal(model.bias.numpy(), bias_before)


# ---------------------------------------------------------------- SGD
@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05)])
def test_sgd_matches_the_hand_formula(momentum, wd, rng):
    params, grads = params_and_grads(rng)
    start = [p.numpy().copy() for p in params]
    opt = SGD(params, lr=0.1, momentum=momentum, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    for k, p in enumerate(params):
        expected, buf = start[k].copy(), None
        for step_grads in grads:
            g = step_grads[k] + wd * expected
            buf = g if buf is None else momentum * buf + g  # b <- mu b + g, the first step b = g
            expected = expected - 0.1 * (buf if momentum else g)
        np.testing.assert_allclose(p.numpy(), expected, rtol=1e-13)


def test_sgd_matches_torch(rng):
    torch = pytest.importorskip("torch")
    params, grads = params_and_grads(rng)
    theirs = [torch.tensor(p.numpy().copy(), requires_grad=True) for p in params]
    ours, ref = SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    step_side_by_side(torch, ours, ref, params, theirs, grads)
    for p, t in zip(params, theirs):
        np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-13)


def test_sgd_momentum_does_not_alias_the_gradient(rng):
    p = Parameter(rand_array((3,), rng), dtype=np.float64)
    opt = SGD([p], lr=0.1, momentum=0.5)
    g = np.ones(3)
    p.grad = g
    opt.step()
    p.grad = g
    opt.step()
    np.testing.assert_array_equal(g, np.ones(3))


# ---------------------------------------------------------------- clipping
def test_clip_grad_norm_returns_the_norm_before_and_clips_to_max_norm(rng):
    params, grads = params_and_grads(rng)
    for p, g in zip(params, grads[0]):
        p.grad = g * 10
    before = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    directions = [p.grad / before for p in params]
    norm = clip_grad_norm(params, max_norm=1.5)
    assert float(norm) == pytest.approx(before, rel=1e-12)  # float64 gradients: a float64 norm
    after = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert after == pytest.approx(1.5, rel=1e-6)
    for p, d in zip(params, directions):  # the direction is kept
        np.testing.assert_allclose(p.grad / after, d, rtol=1e-10)


def test_clip_grad_norm_leaves_small_gradients_and_skips_missing_ones(rng):
    params, grads = params_and_grads(rng, shapes=((3,), (2, 2), (5,)))
    params[0].grad = grads[0][0] * 1e-3
    params[1].grad = grads[0][1] * 1e-3
    kept = [params[0].grad.copy(), params[1].grad.copy()]
    norm = clip_grad_norm(params, max_norm=1.0)
    assert float(norm) == pytest.approx(1e-3 * math.sqrt((grads[0][0] ** 2).sum() + (grads[0][1] ** 2).sum()))
    np.testing.assert_array_equal(params[0].grad, kept[0])
    np.testing.assert_array_equal(params[1].grad, kept[1])
    assert params[2].grad is None
    assert clip_grad_norm([Parameter(np.ones(2))], 1.0) == 0.0  # nothing to clip


def test_clip_grad_norm_with_a_shared_gradient_array(rng):
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2))
    shared = np.array([3.0, 4.0])
    a.grad = b.grad = shared  # one array, two parameters: must be scaled once, not twice
    norm = clip_grad_norm([a, b], 1.0)
    assert float(norm) == pytest.approx(math.sqrt(50))
    np.testing.assert_allclose(a.grad, shared / math.sqrt(50), rtol=1e-6)
    np.testing.assert_allclose(b.grad, shared / math.sqrt(50), rtol=1e-6)


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_landmarks():
    sched = CosineSchedule(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert sched(0) == pytest.approx(1e-3 / 11)
    assert sched(10) == pytest.approx(1e-3)                  # the end of warmup
    assert sched(60) == pytest.approx((1e-3 + 1e-4) / 2)     # halfway through the decay
    assert sched(110) == pytest.approx(1e-4)                 # the end
    assert sched(111) == sched(10_000) == 1e-4               # and after
    warmup = [sched(s) for s in range(11)]
    decay = [sched(s) for s in range(10, 111)]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_cosine_schedule_without_warmup_and_constant_schedule():
    sched = CosineSchedule(max_lr=0.5, min_lr=0.0, warmup_steps=0, total_steps=4)
    assert [sched(s) for s in range(6)] == pytest.approx([0.5, 0.5 * (1 + math.cos(math.pi / 4)) / 2, 0.25,
                                                          0.5 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0])
    assert {ConstantSchedule(3e-4)(s) for s in (0, 1, 10**6)} == {3e-4}


# ---------------------------------------------------------------- small problems, learned
class MLP(nn.Module):
    def __init__(self, sizes):
        self.layers = [nn.Linear(a, b, bias=True) for a, b in zip(sizes, sizes[1:])]

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x).tanh()
        return self.layers[-1](x)


def fit(model, loss_fn, steps, lr):
    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = loss_fn()
        model.zero_grad()
        loss.backward()
        opt.step()
    return loss_fn().item()


def test_mlp_learns_xor():
    nn.manual_seed(0)
    model = MLP([2, 8, 2])
    x = Tensor(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32))
    y = np.array([0, 1, 1, 0])
    loss = fit(model, lambda: ops.cross_entropy(model(x), y), steps=200, lr=0.05)
    assert loss < 0.05
    assert np.array_equal(model(x).numpy().argmax(-1), y)


def test_mlp_fits_a_sine():
    nn.manual_seed(0)
    model = MLP([1, 32, 32, 1])
    xs = np.linspace(-np.pi, np.pi, 64, dtype=np.float32)[:, None]
    x, y = Tensor(xs), Tensor(np.sin(xs))
    mse = fit(model, lambda: ((model(x) - y) ** 2).mean(), steps=400, lr=0.01)
    assert mse < 0.01
