"""Shared test helpers: the device parametrization and fresh random float64 inputs.

Every device-aware test takes the `device` fixture (or parametrizes over DEVICES): 'cpu' always runs;
'gpu' carries the `gpu` marker, so the default `-m 'not slow and not gpu'` deselects it, and it is
skipped with a reason when CuPy or a CUDA GPU is missing (`pytest -m gpu` on a laptop skips cleanly).
Nothing here imports cupy: backend.gpu_available() never raises.

Tests import the helpers directly: `from conftest import DEVICES, rand_tensor`.
"""
import numpy as np
import pytest

from minimosaic import backend, ops, registry
from minimosaic.tensor import Tensor

GPU_SKIP_REASON = "CuPy with a CUDA GPU not available"
HAVE_GPU = backend.gpu_available()

gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason=GPU_SKIP_REASON)]
DEVICES = ["cpu", pytest.param("gpu", marks=gpu_only, id="gpu")]


@pytest.fixture(autouse=True, scope="session")
def private_cache_folder(tmp_path_factory):
    """The encoded-id cache (and anything else under $XDG_CACHE_HOME) goes to a folder of this test
    session, never into the user's ~/.cache."""
    import os
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def plain_core():
    """Every test starts on the plain core (a test, or the CLI it calls, may enable the fast layer), and
    whatever it registered is gone afterwards."""
    saved = registry.registered()
    registry.clear()
    yield
    registry.clear()
    for name, replacements in saved.items():
        for replacement in replacements:
            registry.register(name, replacement)


@pytest.fixture(params=DEVICES)
def device(request):
    """'cpu', and 'gpu' where CuPy sees a CUDA device (marked `gpu`, deselected by default)."""
    return request.param


@pytest.fixture
def used(monkeypatch):
    """{replaced name: times its replacement did the work (did not decline)} while the test runs."""
    from minimosaic.fast import ops as fast_ops
    counts = {}
    for name, replacement in list(fast_ops.REPLACEMENTS.items()):
        def counting(*args, _name=name, _replacement=replacement, **kwargs):
            result = _replacement(*args, **kwargs)
            counts[_name] = counts.get(_name, 0) + (result is not NotImplemented)
            return result
        monkeypatch.setitem(fast_ops.REPLACEMENTS, name, counting)
    yield counts  # (conftest's plain_core fixture: nothing is registered when the test starts)


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so each test is reproducible on its own."""
    return np.random.default_rng(1234)


# Input domains: where an op is smooth enough for central differences (eps = 1e-6) to be exact.
def _real(rng, shape):
    return rng.standard_normal(shape)


def _positive(rng, shape):  # log, sqrt, denominators, fractional powers
    return rng.uniform(0.5, 2.0, shape)


def _nonzero(rng, shape):  # relu, abs: |x| >= 0.2 keeps x +- eps on one side of the kink at 0
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 1.5, shape)


def _off_kinks(rng, shape):  # clip to [-1, 1]: away from -1, 0 and 1
    magnitude = np.where(rng.random(shape) < 0.5, rng.uniform(0.2, 0.8, shape), rng.uniform(1.2, 2.0, shape))
    return rng.choice([-1.0, 1.0], shape) * magnitude


DOMAINS = {"real": _real, "positive": _positive, "nonzero": _nonzero, "off_kinks": _off_kinks}


def rand_array(shape, rng=None, domain="real", dtype=np.float64):
    """A NumPy array of fresh random values from `domain` (never zeros, never a constant)."""
    rng = rng if rng is not None else np.random.default_rng()
    return np.asarray(DOMAINS[domain](rng, shape), dtype=dtype)


def rand_tensor(shape, device="cpu", rng=None, domain="real", requires_grad=True, dtype=np.float64):
    """A random Tensor on `device` (built with xp.asarray), float64 and requiring grad by default."""
    xp = backend.array_module(device)
    return Tensor(xp.asarray(rand_array(shape, rng, domain, dtype)), requires_grad=requires_grad)


def grads_of(fn, inputs, upstream):
    """d sum(fn(inputs) * upstream) / d inputs, by backward()."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out * Tensor(upstream)).sum().backward()
    return out.data, [t.grad for t in inputs]


def leaky_average_as_matrix(x, decay):
    """kbar = M x,  M[t, s] = lambda^(t - s) for s <= t (the official code's T x T way, O(T^2 d))."""
    xp, T = x.xp, x.shape[2]
    t = xp.arange(T, dtype=x.dtype)
    lag = t[:, None] - t[None, :]
    powers = ops.exp(ops.log(decay).reshape(-1, 1, 1) * xp.maximum(lag, 0))      # (H, T, T)
    return (powers * (lag >= 0).astype(x.dtype)) @ x


def invoke(capsys, *args):
    """Run `minimosaic args...` in this process: (exit code, stdout, stderr)."""
    from minimosaic import cli
    with pytest.raises(SystemExit) as done:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def assert_user_error(result, *fragments):
    """The command failed as a user mistake: exit code 2 and one line `error: ...` naming the fragments."""
    code, out, err = result
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stepwise_logits(model, ids, split):
    """(logits at each position from a generation cache: the first `split` tokens at once, then one by
    one, as a NumPy array; the cache afterwards)."""
    from minimosaic import backend
    from minimosaic.tensor import no_grad
    cache = model.new_cache()
    with no_grad():
        rows = [model(ids[None, :split], cache).data[0]]
        rows += [model(ids[None, t:t + 1], cache).data[0] for t in range(split, len(ids))]
    return np.concatenate([backend.asnumpy(r) for r in rows]), cache
