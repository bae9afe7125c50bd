"""Tests for curvlinops.structured.diagonal."""

import numpy
import pytest
import torch
from torch import Generator, float32, float64, rand, tensor
from torch.linalg import LinAlgError

from curvlinops import DiagonalLinearOperator
from test.structured.closed_forms import check_closed_forms


def entries(*shape, seed: int = 0):
    """Seeded diagonal entries in [-1.5, -0.5] and [0.5, 1.5]."""
    generator = Generator().manual_seed(seed)
    values = rand(*shape, generator=generator, dtype=float64) + 0.5
    signs = rand(*shape, generator=generator, dtype=float64) < 0.3
    return values.masked_fill(signs, 0) - values * signs


def test_diagonal_of_a_vector():
    d = entries(6)
    D = DiagonalLinearOperator(d)
    assert D._in_shape == [torch.Size([6])] and D.diagonal[0] is d
    check_closed_forms(D, d.diag(), DiagonalLinearOperator, DiagonalLinearOperator)


def test_diagonal_in_tensor_list_format():
    """The diagonal of a list (e.g. one tensor per parameter) keeps its shapes."""
    d = [entries(2, 3, seed=0), entries(4, seed=1), entries(1, 1, 2, seed=2)]
    D = DiagonalLinearOperator(d)
    assert D._in_shape == [t.shape for t in d]
    flat = torch.cat([t.flatten() for t in d])
    check_closed_forms(D, flat.diag(), DiagonalLinearOperator, DiagonalLinearOperator)
    assert [t.shape for t in D.inverse(damping=0.1).diagonal] == [t.shape for t in d]


def test_diagonal_singular_and_bad_input():
    D = DiagonalLinearOperator(tensor([1.0, 0.0, 2.0], dtype=float64))
    assert D.det == 0 and D.logdet == -float("inf")
    with pytest.raises(LinAlgError, match="singular"):
        D.inverse()
    inverse = D.inverse(damping=1.0)
    assert inverse.diagonal[0].tolist() == [0.5, 1.0, 1 / 3]
    with pytest.raises(ValueError, match="at least one"):
        DiagonalLinearOperator([])
    with pytest.raises(TypeError, match="tensor or a list of tensors"):
        DiagonalLinearOperator([1.0, 2.0])
    with pytest.raises(ValueError, match="dtype"):
        DiagonalLinearOperator([entries(2), entries(2).to(float32)])
    for damping in ("large", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            D.inverse(damping=damping)
    assert inverse.diagonal[0].equal(D.inverse(damping=numpy.float32(1.0)).diagonal[0])
