"""Every op in ops.py, from one table (minitorch style).

Each Case says: a name, our function over Tensors, the input shapes to try (several per op, with
broadcasting), the input domain where the op is smooth, and a plain NumPy reference. From the table we
generate, for every shape set and device:
  - a forward check against the NumPy reference,
  - a float64 gradient check of every input (all elements, central differences),
  - a float32 run: outputs and gradients stay float32 (no silent upcast).
Properties that a table cannot say (softmax rows sum to 1, masked rows, ties, ...) follow below it.
"""
import math
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import DEVICES, rand_array, rand_tensor

from minimosaic import backend, ops
from minimosaic.gradcheck import gradcheck
from minimosaic.tensor import Tensor

ATOL, RTOL = 1e-6, 1e-5  # tighter than gradcheck's defaults: float64 central differences allow it


@dataclass
class Case:
    name: str
    fn: object                  # (*Tensors) -> Tensor
    shapes: list                # one tuple of input shapes per variant
    domain: object = "real"     # a domain name for all inputs, or a tuple of names, one per input
    ref: object = None          # (*np.ndarray) -> np.ndarray, the plain NumPy meaning of fn
    float32_ok: bool = True     # output keeps its input's float dtype


def on(t, array):
    """A constant (mask, ids, targets) on the device of tensor t."""
    return t.xp.asarray(array)


def index_on(t, index):
    """An index with its arrays moved to the device of tensor t (slices and ints stay as they are)."""
    items = index if isinstance(index, tuple) else (index,)
    items = tuple(on(t, i) if isinstance(i, np.ndarray) else i for i in items)
    return items if isinstance(index, tuple) else items[0]


def fixed_mask(shape, seed=0, p=0.5):
    """A boolean array that depends only on (shape, seed): the same mask on every call of fn."""
    return np.random.default_rng(seed).random(shape) < p


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_layer_norm(x, w=None, b=None, eps=1e-5):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    y = y if w is None else y * w
    return y if b is None else y + b


def np_gelu(x):
    """Exact GELU, x Phi(x), from the standard library's erf."""
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def layer_norm_from_primitives(x, weight=None, bias=None, eps=1e-5):
    """layer_norm composed from primitive ops: autograd derives its gradient, which must equal the op's."""
    centered = x - ops.mean(x, axis=-1, keepdims=True)
    y = centered / ops.sqrt(ops.mean(centered * centered, axis=-1, keepdims=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


CASES = []


def case(*args, **kwargs):
    CASES.append(Case(*args, **kwargs))


# ---------------------------------------------------------------- elementwise arithmetic
BINARY = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((4, 1), (1, 5))]
case("add", lambda a, b: a + b, BINARY, ref=np.add)
case("sub", lambda a, b: a - b, BINARY, ref=np.subtract)
case("mul", lambda a, b: a * b, BINARY, ref=np.multiply)
case("div", lambda a, b: a / b, BINARY, ("real", "positive"), ref=np.divide)
case("radd_number", lambda a: 2.5 + a, [((3, 4),)], ref=lambda a: 2.5 + a)
case("rsub_number", lambda a: 2.5 - a, [((3, 4),)], ref=lambda a: 2.5 - a)
case("rmul_number", lambda a: 3.0 * a, [((3, 4),)], ref=lambda a: 3.0 * a)
case("rdiv_number", lambda a: 1.5 / a, [((3, 4),)], "positive", ref=lambda a: 1.5 / a)
case("neg", lambda a: -a, [((3, 4),), ((2, 3, 4),)], ref=np.negative)
case("power_3", lambda a: a ** 3, [((3, 4),)], ref=lambda a: a ** 3)
case("power_2.5", lambda a: a ** 2.5, [((3, 4),)], "positive", ref=lambda a: a ** 2.5)
case("power_-1.5", lambda a: ops.power(a, -1.5), [((3, 4),)], "positive", ref=lambda a: a ** -1.5)
case("matmul", lambda a, b: a @ b,
     [((3, 4), (4, 5)), ((2, 3, 4, 5), (5, 2)), ((3, 1, 4, 5), (2, 5, 3)), ((4, 5), (2, 5, 3)),
      ((2, 1, 3), (1, 3, 2))], ref=np.matmul)

# ---------------------------------------------------------------- elementwise functions
UNARY = [((3, 4),), ((2, 3, 4),), ((),)]
case("exp", ops.exp, UNARY, ref=np.exp)
case("log", ops.log, UNARY, "positive", ref=np.log)
case("sqrt", ops.sqrt, UNARY, "positive", ref=np.sqrt)
case("tanh", ops.tanh, UNARY, ref=np.tanh)
case("sigmoid", ops.sigmoid, UNARY, ref=lambda a: 1 / (1 + np.exp(-a)))
case("relu", ops.relu, UNARY, "nonzero", ref=lambda a: np.maximum(a, 0))
case("gelu", ops.gelu, UNARY, ref=np_gelu)
case("abs", ops.abs, UNARY, "nonzero", ref=np.abs)
case("clip", lambda a: ops.clip(a, -1.0, 1.0), UNARY, "off_kinks", ref=lambda a: np.clip(a, -1, 1))
case("clip_low", lambda a: a.clip(-1.0), [((3, 4),)], "off_kinks", ref=lambda a: np.maximum(a, -1))
case("clip_high", lambda a: a.clip(None, 1.0), [((3, 4),)], "off_kinks", ref=lambda a: np.minimum(a, 1))
case("astype", lambda a: ops.astype(a, np.float64), [((3, 4),)], ref=lambda a: a, float32_ok=False)
case("full_precision", ops.full_precision, [((3, 4),)], ref=lambda a: a)  # float16 only changes: below

# ---------------------------------------------------------------- reductions
REDUCE_AXES = [None, 0, -1, 1, (0, 2), (-1, 0), (0, 1, 2)]
for _name, _np in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
    for _axis in REDUCE_AXES:
        for _keep in (False, True):
            case(f"{_name}_axis{_axis}_keep{_keep}".replace(" ", ""),
                 lambda a, op=getattr(ops, _name), ax=_axis, k=_keep: op(a, axis=ax, keepdims=k),
                 [((2, 3, 4),)], ref=lambda a, f=_np, ax=_axis, k=_keep: f(a, axis=ax, keepdims=k))
case("sum_method", lambda a: a.sum(), [((3, 4),), ((5,),)], ref=np.sum)
case("mean_method", lambda a: a.mean(-1), [((3, 4),)], ref=lambda a: a.mean(-1))
for _axis in (-1, 0, None, (0, 1)):
    for _keep in (False, True):
        case(f"logsumexp_axis{_axis}_keep{_keep}".replace(" ", ""),
             lambda a, ax=_axis, k=_keep: ops.logsumexp(a, axis=ax, keepdims=k), [((3, 5),), ((2, 3, 4),)],
             ref=lambda a, ax=_axis, k=_keep: np.log(np.exp(a).sum(axis=ax, keepdims=k)))

# ---------------------------------------------------------------- shapes
case("reshape", lambda a: a.reshape(6, 4), [((2, 3, 4),)], ref=lambda a: a.reshape(6, 4))
case("reshape_tuple_-1", lambda a: ops.reshape(a, (4, -1)), [((2, 3, 4),)], ref=lambda a: a.reshape(4, -1))
case("reshape_flat", lambda a: a.reshape(-1), [((3, 4),)], ref=lambda a: a.reshape(-1))
case("T", lambda a: a.T, [((3, 4),)], ref=lambda a: a.T)
case("transpose_reverse", lambda a: a.transpose(), [((2, 3, 4),)], ref=lambda a: a.transpose())
case("transpose_102", lambda a: a.transpose(1, 0, 2), [((2, 3, 4),)], ref=lambda a: a.transpose(1, 0, 2))
case("transpose_negative", lambda a: a.transpose(0, -1, 1), [((2, 3, 4),)],
     ref=lambda a: a.transpose(0, 2, 1))
case("permute", lambda a: a.permute((2, 0, 1)), [((2, 3, 4),)], ref=lambda a: a.transpose(2, 0, 1))
case("permute_4d", lambda a: a.permute(0, 2, 1, 3), [((2, 3, 4, 2),)], ref=lambda a: a.transpose(0, 2, 1, 3))
case("swapaxes", lambda a: a.swapaxes(0, 2), [((2, 3, 4),)], ref=lambda a: a.swapaxes(0, 2))
case("swapaxes_negative", lambda a: a.swapaxes(-1, -2), [((2, 3, 4),)], ref=lambda a: a.swapaxes(-1, -2))
case("expand", lambda a: a.expand(2, 3, 4), [((3, 1),), ((4,),), ((1, 3, 1),)],
     ref=lambda a: np.broadcast_to(a, (2, 3, 4)))
case("expand_tuple", lambda a: ops.expand(a, (3, 4)), [((4,),), ((3, 1),)],
     ref=lambda a: np.broadcast_to(a, (3, 4)))

IDX = np.array([0, 0, 2])
ROWS, COLS = np.array([0, 2, 2, 0]), np.array([1, 3, 3, 1])
BOOL = fixed_mask((3, 4), seed=3)
BOOL_ROWS = np.array([True, False, True])
for _label, _index in [("slices", (slice(1, None), slice(None, None, 2))), ("int", 1), ("ints", (-1, 2)),
                       ("ellipsis", (Ellipsis, 1)), ("newaxis", (slice(None), None, slice(1, 3))),
                       ("array_repeats", IDX), ("array_pairs_repeats", (ROWS, COLS)),
                       ("slice_and_list", (slice(None), [3, 0, 3])), ("bool_mask", BOOL),
                       ("bool_rows", BOOL_ROWS), ("bool_rows_and_int", (BOOL_ROWS, 1))]:
    case(f"getitem_{_label}", lambda a, i=_index: a[index_on(a, i)], [((3, 4),)], ref=lambda a, i=_index: a[i])
case("getitem_tensor_ids", lambda a: a[Tensor(on(a, IDX))], [((3, 4),)], ref=lambda a: a[IDX])

case("concatenate_0", lambda a, b, c: ops.concatenate([a, b, c], axis=0), [((2, 3), (4, 3), (1, 3))],
     ref=lambda a, b, c: np.concatenate([a, b, c], axis=0))
case("concatenate_-1", lambda a, b, c: ops.concatenate([a, b, c], axis=-1),
     [((2, 3), (2, 1), (2, 2)), ((2, 2, 1), (2, 2, 3), (2, 2, 1))],
     ref=lambda a, b, c: np.concatenate([a, b, c], axis=-1))
for _axis in (0, 1, -1):
    case(f"stack_{_axis}", lambda a, b, c, ax=_axis: ops.stack([a, b, c], axis=ax), [((2, 3),) * 3],
         ref=lambda a, b, c, ax=_axis: np.stack([a, b, c], axis=ax))
for _widths, _axis in (((2, 1), -1), ((0, 3), 0), ((1, 1), 1)):
    def _np_pad(a, w=_widths, ax=_axis):
        widths = [(0, 0)] * a.ndim
        widths[ax] = w
        return np.pad(a, widths)
    case(f"pad_{_widths}_{_axis}".replace(" ", ""), lambda a, w=_widths, ax=_axis: ops.pad(a, w, axis=ax),
         [((3, 4),), ((2, 3, 4),)], ref=_np_pad)


def np_shift(a, offset, axis):
    """z_t = a_{t - offset}, zeros where t - offset is outside [0, n)."""
    a = np.moveaxis(a, axis, 0)
    out = np.zeros_like(a)
    for t in range(len(a)):
        if 0 <= t - offset < len(a):
            out[t] = a[t - offset]
    return np.moveaxis(out, 0, axis)


for _offset in (1, 2, -1, -3, 0, 7, -7):
    case(f"shift_{_offset}", lambda a, o=_offset: ops.shift(a, o, axis=1), [((2, 5, 3),)],
         ref=lambda a, o=_offset: np_shift(a, o, 1))
case("shift_last_axis", lambda a: ops.shift(a, 2), [((3, 5),)], ref=lambda a: np_shift(a, 2, -1))

COND = fixed_mask((3, 4), seed=1)
case("where", lambda a, b: ops.where(on(a, COND), a, b), [((3, 4), (3, 4)), ((3, 4), (4,)), ((1, 4), (3, 1))],
     ref=lambda a, b: np.where(COND, a, b))
case("where_tensor_cond_number", lambda a: ops.where(Tensor(on(a, COND)), a, 0.5), [((3, 4),)],
     ref=lambda a: np.where(COND, a, 0.5))
case("masked_fill", lambda a: ops.masked_fill(a, on(a, COND), -2.0), [((3, 4),), ((2, 3, 4),)],
     ref=lambda a: np.where(COND, -2.0, a))

# ---------------------------------------------------------------- softmax family
case("softmax_-1", ops.softmax, [((3, 5),), ((2, 3, 4),)], ref=np_softmax)
case("softmax_0", lambda a: a.softmax(axis=0), [((4, 3),)], ref=lambda a: np_softmax(a, 0))
CAUSAL = np.tril(np.ones((5, 5), bool))
case("softmax_causal_mask", lambda a: ops.softmax(a, mask=on(a, CAUSAL)), [((2, 5, 5),), ((5, 5),)],
     ref=lambda a: np_softmax(np.where(CAUSAL, a, -np.inf)))
ROW_MASK = fixed_mask((4, 5), seed=2)
ROW_MASK[1] = False  # a fully masked row
case("softmax_fully_masked_row", lambda a: ops.softmax(a, mask=on(a, ROW_MASK)), [((4, 5),)],
     ref=lambda a: np.vstack([np_softmax(row[m]) @ np.eye(5)[m] if m.any() else np.zeros(5)
                              for row, m in zip(a, ROW_MASK)]))
case("log_softmax_-1", ops.log_softmax, [((3, 5),), ((2, 3, 4),)], ref=lambda a: np.log(np_softmax(a)))
case("log_softmax_0", lambda a: a.log_softmax(axis=0), [((4, 3),)], ref=lambda a: np.log(np_softmax(a, 0)))

TARGETS = np.array([3, -1, 0, 4, 4, -1])      # two ignored rows
TARGETS_2D = np.array([[1, 2, -100], [0, 0, 4]])


def np_cross_entropy(logits, targets, ignore_index=-1):
    z, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = t != ignore_index
    p = np_softmax(z[keep])
    return -np.log(p[np.arange(len(p)), t[keep]]).mean()


case("cross_entropy", lambda z: ops.cross_entropy(z, on(z, TARGETS)), [((6, 5),)],
     ref=lambda z: np_cross_entropy(z, TARGETS))
case("cross_entropy_3d_ignore_index", lambda z: ops.cross_entropy(z, on(z, TARGETS_2D), ignore_index=-100),
     [((2, 3, 5),)], ref=lambda z: np_cross_entropy(z, TARGETS_2D, -100))

# ---------------------------------------------------------------- layers as ops
case("layer_norm_weight_bias", ops.layer_norm, [((3, 6), (6,), (6,)), ((2, 3, 5), (5,), (5,))],
     ref=np_layer_norm)
case("layer_norm_weight", ops.layer_norm, [((3, 6), (6,))], ref=np_layer_norm)
case("layer_norm_bias", lambda x, b: ops.layer_norm(x, None, b), [((3, 6), (6,))],
     ref=lambda x, b: np_layer_norm(x, None, b))
case("layer_norm_plain", ops.layer_norm, [((3, 6),), ((2, 2, 4),)], ref=np_layer_norm)
case("layer_norm_from_primitives", layer_norm_from_primitives, [((3, 6), (6,), (6,)), ((2, 3, 5), (5,), (5,))],
     ref=np_layer_norm)
IDS = np.array([[1, 4, 1, 0, 5], [4, 4, 2, 1, 3]])  # repeats: their gradients must add up
case("embedding", lambda w: ops.embedding(w, on(w, IDS)), [((6, 4),)], ref=lambda w: w[IDS])
case("embedding_tensor_ids", lambda w: ops.embedding(w, Tensor(on(w, IDS[0]))), [((6, 4),)],
     ref=lambda w: w[IDS[0]])


def seeded_dropout(a, p=0.3):
    backend.seed_everything(7)  # the same mask on every call, so finite differences see one function
    return ops.dropout(a, p)


case("dropout_fixed_mask", seeded_dropout, [((4, 6),), ((2, 3, 4),)])
case("dropout_eval", lambda a: ops.dropout(a, 0.5, training=False), [((3, 4),)], ref=lambda a: a)


# ---------------------------------------------------------------- the generated tests
def variants(need_ref=False):
    return [pytest.param(c, shapes, id=f"{c.name}-{'-'.join(map(str, shapes)).replace(' ', '')}")
            for c in CASES if not (need_ref and c.ref is None) for shapes in c.shapes]


def make_inputs(c, shapes, device, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    domains = c.domain if isinstance(c.domain, tuple) else (c.domain,) * len(shapes)
    return [rand_tensor(s, device, rng, d, dtype=dtype) for s, d in zip(shapes, domains)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c, shapes", variants(need_ref=True))  # dropout's reference: tests below
def test_forward_matches_numpy(c, shapes, device):
    inputs = make_inputs(c, shapes, device)
    expected = c.ref(*[t.numpy() for t in inputs])
    got = c.fn(*inputs)
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c, shapes", variants())
def test_gradcheck(c, shapes, device):
    inputs = make_inputs(c, shapes, device)
    assert gradcheck(c.fn, inputs, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c, shapes", variants())
def test_float32_stays_float32(c, shapes, device):
    inputs = make_inputs(c, shapes, device, dtype=np.float32)
    out = c.fn(*inputs)
    if c.float32_ok:
        assert out.dtype == np.float32, f"{c.name} upcast its float32 input to {out.dtype}"
    (out * out).sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.dtype == np.float32 and t.grad.shape == t.shape


def test_table_covers_every_op():
    """A new op in ops.py must get a row in the table: a Case named after it (or `name_variant`)."""
    import inspect
    public = [name for name, f in inspect.getmembers(ops, inspect.isfunction)
              if f.__module__ == ops.__name__ and not name.startswith("_") and name != "as_tensor"]
    missing = [op for op in public if not any(c.name == op or c.name.startswith(op + "_") for c in CASES)]
    assert not missing, f"ops without a row in the table: {missing}"


# ---------------------------------------------------------------- properties beyond the table
def test_full_precision_casts_float16_up_and_its_gradient_back_down(rng):
    x = Tensor(rand_array((3, 4), rng).astype(np.float16), requires_grad=True)
    y = ops.full_precision(x)
    assert y.dtype == np.float32 and np.array_equal(y.numpy(), x.numpy().astype(np.float32))
    (y * 2).sum().backward()
    assert x.grad.dtype == np.float16 and np.all(x.grad == 2)
    z = Tensor(rand_array((2, 2), rng).astype(np.float32))
    assert ops.full_precision(z) is z  # float32 (and float64) pass through untouched


def test_softmax_rows_sum_to_one_and_masked_entries_are_zero(rng):
    x = Tensor(rand_array((4, 6), rng) * 30)  # large logits: the max shift keeps it finite
    np.testing.assert_allclose(ops.softmax(x).numpy().sum(-1), 1, rtol=1e-12)
    mask = fixed_mask((4, 6), seed=5)
    mask[:, 0] = True
    y = ops.softmax(x, mask=mask).numpy()
    np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-12)
    assert np.all(y[~mask] == 0)


def test_softmax_fully_masked_row_is_zeros_with_finite_gradient(rng):
    x = rand_tensor((3, 4), rng=rng)
    mask = np.ones((3, 4), bool)
    mask[2] = False
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = ops.softmax(x, mask=mask)
        (y * Tensor(rand_array((3, 4), rng))).sum().backward()
    assert np.all(y.numpy()[2] == 0) and np.all(np.isfinite(y.numpy()))
    assert np.all(np.isfinite(x.grad)) and np.all(x.grad[2] == 0)


def test_log_softmax_is_log_of_softmax(rng):
    x = Tensor(rand_array((5, 7), rng) * 10)
    np.testing.assert_allclose(ops.log_softmax(x).numpy(), np.log(ops.softmax(x).numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ops.logsumexp(x).numpy(), np.log(np.exp(x.numpy()).sum(-1)), rtol=1e-12)


def test_softmax_family_does_not_overflow():
    x = Tensor(np.array([[1000.0, 0.0, -1000.0]]))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, ly, lse = ops.softmax(x).numpy(), ops.log_softmax(x).numpy(), ops.logsumexp(x).numpy()
    np.testing.assert_allclose(y, [[1, 0, 0]], atol=1e-300)
    np.testing.assert_allclose(ly, [[0, -1000, -2000]])
    np.testing.assert_allclose(lse, [1000.0])


def test_layer_norm_has_zero_mean_and_unit_variance(rng):
    x = Tensor(rand_array((4, 64), rng) * 5 + 3)
    y = ops.layer_norm(x, eps=0.0).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-12)
    w, b = Tensor(rand_array(64, rng)), Tensor(rand_array(64, rng))
    np.testing.assert_allclose(ops.layer_norm(x, w, b, eps=0.0).numpy(), y * w.numpy() + b.numpy(), rtol=1e-12)


def test_cross_entropy_is_minus_log_p_of_the_target():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [1.0, 1.0, 1.0]])
    targets = np.array([0, 2, -1])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -(math.log(p[0, 0]) + math.log(p[1, 2])) / 2  # the ignored row counts in neither sum nor n
    assert ops.cross_entropy(Tensor(logits), targets).item() == pytest.approx(expected, rel=1e-12)
    assert ops.cross_entropy(Tensor(np.log([[0.25, 0.75]])), np.array([1])).item() == pytest.approx(-math.log(0.75))


def test_cross_entropy_all_ignored_is_zero_without_nan(rng):
    z = rand_tensor((4, 5), rng=rng)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = ops.cross_entropy(z, np.full(4, -1))
        loss.backward()
    assert loss.item() == 0.0
    assert np.all(z.grad == 0)


def test_cross_entropy_gradient_is_softmax_minus_onehot(rng):
    z = rand_tensor((3, 4), rng=rng)
    t = np.array([2, 0, 3])
    ops.cross_entropy(z, t).backward()
    expected = np_softmax(z.numpy())
    expected[np.arange(3), t] -= 1
    np.testing.assert_allclose(z.grad, expected / 3, rtol=1e-12)


def test_gelu_is_exact_erf_gelu_not_the_tanh_approximation():
    x = np.linspace(-5, 5, 101)
    y = ops.gelu(Tensor(x)).numpy()
    np.testing.assert_allclose(y, np_gelu(x), rtol=1e-14, atol=1e-16)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert 4e-4 < np.abs(y - tanh_form).max() < 5e-4  # torch's nn.GELU() default is the erf form


def test_max_shares_the_gradient_between_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 0.0, 5.0, 5.0]]), requires_grad=True)
    ops.max(x, axis=1).backward(np.array([1.0, 6.0]))
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5, 0], [2, 0, 2, 2]])
    x.grad = None
    ops.max(x).backward()  # the overall max 5 appears three times
    np.testing.assert_allclose(x.grad, [[0, 0, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3]])


def test_mean_over_tuple_with_negative_axes(rng):
    x = rand_tensor((2, 3, 4), rng=rng)
    y = ops.mean(x, axis=(-1, 0))
    assert y.shape == (3,)
    np.testing.assert_allclose(y.numpy(), x.numpy().mean(axis=(0, 2)), rtol=1e-12)
    y.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad, np.broadcast_to(np.array([1.0, 2.0, 3.0])[None, :, None] / 8, (2, 3, 4)))


def test_getitem_boolean_mask_gradient(rng):
    x = rand_tensor((3, 4), rng=rng)
    mask = x.numpy() > 0
    y = x[mask]
    assert y.shape == (int(mask.sum()),)
    y.backward(np.arange(1.0, y.size + 1))
    expected = np.zeros((3, 4))
    expected[mask] = np.arange(1.0, y.size + 1)
    np.testing.assert_allclose(x.grad, expected)


def test_embedding_gradient_accumulates_repeated_ids(rng):
    w = rand_tensor((5, 3), rng=rng)
    ids = np.array([2, 0, 2, 2])
    g = rand_array((4, 3), rng)
    ops.embedding(w, ids).backward(g)
    expected = np.zeros((5, 3))
    expected[0] = g[1]
    expected[2] = g[0] + g[2] + g[3]
    np.testing.assert_allclose(w.grad, expected, rtol=1e-12)


def test_dropout_mask_scaling_and_gradient(rng):
    x = rand_tensor((50, 40), rng=rng, domain="nonzero")
    backend.seed_everything(3)
    y = ops.dropout(x, 0.25)
    kept = y.numpy() != 0
    assert abs(kept.mean() - 0.75) < 0.03  # 2000 Bernoulli(0.75) draws: std 0.01
    np.testing.assert_allclose(y.numpy()[kept], x.numpy()[kept] / 0.75, rtol=1e-12)
    g = rand_array((50, 40), rng)
    y.backward(g)
    np.testing.assert_allclose(x.grad, g * kept / 0.75, rtol=1e-12)  # the same mask flows back
    backend.seed_everything(3)
    np.testing.assert_array_equal(ops.dropout(x, 0.25).numpy() != 0, kept)  # seeding fixes the mask


def test_dropout_is_identity_in_eval_and_for_p_zero(rng):
    x = rand_tensor((3, 4), rng=rng)
    for y in (ops.dropout(x, 0.5, training=False), ops.dropout(x, 0.0)):
        np.testing.assert_array_equal(y.numpy(), x.numpy())
        x.grad = None
        y.backward(np.ones((3, 4)))
        np.testing.assert_array_equal(x.grad, np.ones((3, 4)))


def test_astype_gradient_comes_back_in_the_source_dtype(rng):
    x = rand_tensor((3, 4), rng=rng, dtype=np.float32)
    y = ops.astype(x, np.float64)
    assert y.dtype == np.float64
    g = rand_array((3, 4), rng)
    y.backward(g)
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, g.astype(np.float32))


def test_shift_peeks_ahead_and_delays():
    x = Tensor(np.arange(1.0, 6.0).reshape(1, 5))
    np.testing.assert_array_equal(ops.shift(x, 1).numpy(), [[0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(ops.shift(x, -1).numpy(), [[2, 3, 4, 5, 0]])


def test_matmul_refuses_vectors():
    with pytest.raises(ValueError, match="2-D"):
        ops.matmul(Tensor(np.ones(3)), Tensor(np.ones((3, 2))))


def test_number_operands_keep_the_tensor_dtype():
    x = Tensor(np.ones((2, 2), np.float32))
    for y in (x + 1, 1 - x, x * 2.5, 2.5 / x, x ** 2, ops.where(np.eye(2, dtype=bool), x, 0.5),
              ops.masked_fill(x, np.eye(2, dtype=bool), -1e9)):
        assert y.dtype == np.float32
