"""Tests for curvlinops.structured.block_diagonal."""

import pytest
import torch
from torch import Generator, block_diag, eye, float32, float64, kron, randn

from curvlinops import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    EighDecomposedLinearOperator,
    GGNLinearOperator,
    KFACLinearOperator,
    KroneckerProductLinearOperator,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.structured.closed_forms import check_closed_forms
from test.utils import assert_close, compare_matmat


def spd(n: int, seed: int):
    """A seeded symmetric positive definite matrix."""
    X = randn(n, n, generator=Generator().manual_seed(seed), dtype=float64)
    return X @ X.T / n + eye(n, dtype=float64)


def structured_blocks():
    """One block of every kind, symmetric, with the dense matrix of each."""
    A, B, C = spd(3, 0), spd(2, 1), spd(4, 2)
    values, vectors = torch.linalg.eigh(spd(3, 3))
    d = [torch.rand(2, 2, dtype=float64) + 0.5, torch.rand(1, dtype=float64) + 0.5]
    inner = BlockDiagonalLinearOperator([B, DiagonalLinearOperator(d[1])])
    blocks = [
        KroneckerProductLinearOperator(A, B),
        C,  # a torch matrix becomes a dense block
        EighDecomposedLinearOperator(values, vectors),
        DiagonalLinearOperator(d),
        inner,  # nested
    ]
    dense = [
        kron(A, B),
        C,
        vectors @ values.diag() @ vectors.T,
        torch.cat([t.flatten() for t in d]).diag(),
        block_diag(B, d[1].diag()),
    ]
    return blocks, dense


def test_block_diagonal_of_structured_and_dense_blocks():
    blocks, dense = structured_blocks()
    D = BlockDiagonalLinearOperator(blocks)
    assert D._in_shape == [s for b in D.blocks for s in b._in_shape]
    assert isinstance(D.blocks[1], TensorLinearOperator)
    check_closed_forms(
        D,
        block_diag(*dense),
        BlockDiagonalLinearOperator,
        BlockDiagonalLinearOperator,
    )
    inverse_types = [type(b) for b in D.inverse(damping=0.3).blocks]
    assert inverse_types == [
        EighDecomposedLinearOperator,  # damped Kronecker product
        TensorLinearOperator,
        EighDecomposedLinearOperator,
        DiagonalLinearOperator,
        BlockDiagonalLinearOperator,
    ]


def test_block_diagonal_of_rectangular_blocks():
    """Products and adjoints work for any blocks; square-only closed forms raise."""
    A = randn(3, 2, generator=Generator().manual_seed(0), dtype=float64)
    B = randn(1, 4, generator=Generator().manual_seed(1), dtype=float64)
    D = BlockDiagonalLinearOperator([A, B])
    assert D.shape == (4, 6) and not D.SELF_ADJOINT
    compare_matmat(D, block_diag(A, B))
    with pytest.raises(ValueError, match="square blocks; block 0"):
        _ = D.trace


def test_block_diagonal_of_curvature_operators():
    """GGN blocks w.r.t. parameter groups: the GGN's block-diagonal approximation.

    KFAC blocks provide their closed-form scalars; GGN blocks have none.
    """
    model, loss_func, params, data = Case("mlp", "mse").make()
    groups = [params[:2], params[2:]]
    kwargs = {"check_deterministic": False}
    G_blocks = [
        GGNLinearOperator(model, loss_func, ps, data, **kwargs) for ps in groups
    ]
    D = BlockDiagonalLinearOperator(G_blocks)
    assert D._in_shape == [p.shape for p in params]
    dense = block_diag(*(functorch_ggn(model, loss_func, ps, data) for ps in groups))
    M = randn(D.shape[1], 2, generator=Generator().manual_seed(0), dtype=float64)
    assert_close(D @ M, dense @ M)
    with pytest.raises(NotImplementedError, match="Block 0 .*GGNLinearOperator"):
        _ = D.trace
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        D.inverse(damping=1.0)
    kwargs["fisher_type"] = "type-2"
    K_blocks = [
        KFACLinearOperator(model, loss_func, ps, data, **kwargs) for ps in groups
    ]
    K = BlockDiagonalLinearOperator(K_blocks)
    assert_close(K.trace, sum(k.trace for k in K_blocks))
    assert_close(K.logdet, sum(k.logdet for k in K_blocks))
    assert_close(K.det, K_blocks[0].det * K_blocks[1].det)
    assert_close(K.frobenius_norm**2, sum(k.frobenius_norm**2 for k in K_blocks))


def test_block_diagonal_rejects_bad_blocks():
    with pytest.raises(ValueError, match="at least one"):
        BlockDiagonalLinearOperator([])
    with pytest.raises(ValueError, match="dtype"):
        BlockDiagonalLinearOperator([spd(2, 0), spd(2, 0).to(float32)])
    with pytest.raises(TypeError, match="Expected a PyTorchLinearOperator"):
        BlockDiagonalLinearOperator([spd(2, 0), "matrix"])
