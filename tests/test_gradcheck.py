"""gradcheck itself: it passes correct ops, catches wrong ones, and says where."""
import re

import numpy as np
import pytest
from conftest import rand_tensor

from minimosaic import ops
from minimosaic.gradcheck import GradcheckError, gradcheck
from minimosaic.tensor import make_result


def square_off_by(factor):
    """z = a^2 with a backward that is wrong by `factor` (1.0 is the correct op)."""
    def op(a):
        return make_result(a.data ** 2, (a,), lambda g: (g * 2 * a.data * factor,))
    return op


def mul_wrong_at(index):
    """z = a * b whose gradient for b is off by one at a single element."""
    def op(a, b):
        def backward(g):
            gb = g * a.data
            gb[index] += 1.0
            return g * b.data, gb
        return make_result(a.data * b.data, (a, b), backward)
    return op


MESSAGE = re.compile(r"gradient mismatch for (?P<name>.+) at index (?P<index>\(.*?\)): "
                     r"expected (?P<expected>\S+) \(finite differences\), got (?P<got>\S+) \(backward\)")


@pytest.mark.parametrize("mode", ["full", "random"])
def test_correct_ops_pass(mode, device, rng):
    a, b = rand_tensor((3, 4), device, rng), rand_tensor((4, 2), device, rng)
    fn = lambda a, b: ops.tanh(a @ b).exp() * 2.0 + ops.softmax(a).sum(-1, keepdims=True)  # noqa: E731
    assert gradcheck(fn, [a, b], mode=mode, rtol=1e-6, atol=1e-9)
    assert gradcheck(square_off_by(1.0), [a], mode=mode, rtol=1e-6, atol=1e-9)


def test_full_mode_names_the_input_the_index_and_both_values(rng):
    a = rand_tensor((2, 3), rng=rng, domain="nonzero")
    with pytest.raises(GradcheckError) as info:
        gradcheck(square_off_by(1.1), [a], names=["x"])
    found = MESSAGE.search(str(info.value))
    assert found, str(info.value)
    assert found["name"] == "x" and found["index"] == "(0, 0)"
    expected, got = float(found["expected"]), float(found["got"])
    assert got == pytest.approx(1.1 * expected, rel=1e-6)  # printed to 8 digits


def test_full_mode_finds_the_one_wrong_element_of_the_second_input(rng):
    a, b = rand_tensor((3, 4), rng=rng), rand_tensor((3, 4), rng=rng)
    with pytest.raises(GradcheckError) as info:
        gradcheck(mul_wrong_at((2, 1)), [a, b], names=["a", "b"])
    found = MESSAGE.search(str(info.value))
    assert found["name"] == "b" and found["index"] == "(2, 1)"
    assert float(found["got"]) - float(found["expected"]) == pytest.approx(1.0, rel=1e-5)
    assert gradcheck(mul_wrong_at((2, 1)), [a, b.detach()])  # b is not checked when it needs no grad


def test_default_names_are_input_positions(rng):
    a = rand_tensor((2,), rng=rng, domain="nonzero")
    with pytest.raises(GradcheckError, match=r"for input 0 at index \(0,\)"):
        gradcheck(square_off_by(0.5), [a])


def test_random_mode_reports_a_wrong_backward(rng):
    a = rand_tensor((20, 30), rng=rng)
    with pytest.raises(GradcheckError, match=r"along random direction 0 over x: expected \S+ .*got \S+"):
        gradcheck(square_off_by(1.01), [a], mode="random", names=["x"])


def test_random_mode_catches_a_single_wrong_element(rng):
    a, b = rand_tensor((10, 10), rng=rng), rand_tensor((10, 10), rng=rng)
    with pytest.raises(GradcheckError, match="over a, b"):
        gradcheck(mul_wrong_at((7, 3)), [a, b], mode="random", names=["a", "b"])


def test_missing_gradient_is_reported(rng):
    """A backward that returns None for an input that matters is as wrong as a bad formula."""
    a, b = rand_tensor((2, 2), rng=rng), rand_tensor((2, 2), rng=rng)
    op = lambda a, b: make_result(a.data * b.data, (a, b), lambda g: (g * b.data, None))  # noqa: E731
    with pytest.raises(GradcheckError, match="for input 1"):
        gradcheck(op, [a, b])


def test_refuses_float32(rng):
    a = rand_tensor((3,), rng=rng, dtype=np.float32)
    with pytest.raises(TypeError, match="float64.*x is float32"):
        gradcheck(ops.exp, [a], names=["x"])


def test_refuses_nothing_to_check(rng):
    with pytest.raises(ValueError, match="requires_grad"):
        gradcheck(ops.exp, [rand_tensor((3,), rng=rng, requires_grad=False)])
    with pytest.raises(ValueError, match="mode"):
        gradcheck(ops.exp, [rand_tensor((3,), rng=rng)], mode="sideways")


@pytest.mark.parametrize("mode", ["full", "random"])
def test_inputs_are_restored(mode, rng):
    a = rand_tensor((4, 3), rng=rng)
    before = a.numpy().copy()
    gradcheck(ops.tanh, [a], mode=mode)
    np.testing.assert_allclose(a.numpy(), before, rtol=0, atol=1e-15)
