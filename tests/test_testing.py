"""The correctness helpers themselves must be able to fail: a check that cannot fail is a defect."""
import random

import pytest
import torch

from nitrokernels import testing


def test_full_precision_check_catches_small_errors():
    ref = torch.randn(64, dtype=torch.float64)
    good = ref.float()
    testing.assert_close_to_reference(good, ref)
    bad = good.clone()
    bad[7] += 1e-3
    with pytest.raises(AssertionError, match="max error"):
        testing.assert_close_to_reference(bad, ref)


def test_low_precision_check_uses_eager_error_as_yardstick():
    ref = torch.randn(256, dtype=torch.float64)
    eager = ref.half()
    testing.assert_close_to_reference(eager.clone(), ref, eager)
    worse = eager.clone()
    worse[0] += 0.05
    with pytest.raises(AssertionError, match="eager torch.float16 error"):
        testing.assert_close_to_reference(worse, ref, eager, atol=1e-4)
    with pytest.raises(ValueError, match="needs the eager result"):
        testing.assert_close_to_reference(eager, ref)


def test_poisoned_outputs_fail_the_check():
    out = testing.poisoned_empty(4, 5)
    assert torch.isnan(out).all()
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_close_to_reference(out, torch.zeros(4, 5, dtype=torch.float64))
    ints = testing.poison_(torch.empty(3, dtype=torch.int32))
    assert (ints == torch.iinfo(torch.int32).max).all()


def test_shape_mismatch_is_reported():
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close_to_reference(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.float64))


def test_layout_helpers():
    x = testing.random_tensor((2, 3, 4, 5), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = testing.non_contiguous(x)
    assert not y.is_contiguous() and torch.equal(y, x)
    sizes = testing.odd_sizes(random.Random(0), 3, 40, 50)
    assert all(n % 16 and n & (n - 1) for n in sizes)


def test_to_reference_keeps_grad_flags_and_structure():
    a = torch.randn(3, requires_grad=True)
    out = testing.to_reference([a, {"b": torch.ones(2, dtype=torch.half)}, 3])
    assert out[0].dtype == torch.float64 and out[0].requires_grad and out[0].is_leaf
    assert out[1]["b"].dtype == torch.float64 and out[2] == 3
