"""Tests for curvlinops.ekfac: conformance, exact cases, eigenvalue correction."""

import pytest
from torch import eye, float64, kron, rand, randn
from torch.linalg import matrix_norm

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.kfac_references import (
    CONFORMANCE,
    block_indices,
    ekfac_dense,
    exact_case,
    functorch_ef,
    kfac_dense,
    linear_params,
)
from test.utils import assert_close, compare_matmat

SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])


def _ekfac(model, loss_func, params, data, cls=EKFACLinearOperator, **kwargs):
    average = None if loss_func.reduction == "sum" else "batch+sequence"
    kwargs = {"loss_average": average, "fisher_type": "type-2", **kwargs}
    kwargs.setdefault("check_deterministic", False)
    return cls(model, loss_func, params, data, **kwargs)


EKFAC_CONFORMANCE = [c for c in CONFORMANCE if c[1] != "forward-only"]


@SEPARATE
@pytest.mark.parametrize(
    "case,fisher_type,approx",
    EKFAC_CONFORMANCE,
    ids=[f"{c.id}-{f}-{a}" for c, f, a in EKFAC_CONFORMANCE],
)
def test_ekfac_products_match_its_eigendecomposition(
    case, fisher_type, approx, separate
):
    model, loss_func, _, data = case.make()
    E = EKFACLinearOperator(
        model,
        loss_func,
        linear_params(model),
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        loss_average=None if case.reduction == "sum" else "batch",
        separate_weight_and_bias=separate,
        **case.kwargs(),
    )
    compare_matmat(E, ekfac_dense(E))


@pytest.mark.parametrize(
    "structure,approx",
    [
        ("mlp", "expand"),
        ("sequence", "expand"),
        ("conv", "expand"),
        ("pooled", "reduce"),
    ],
)
def test_ekfac_equals_kfac_where_kfac_is_exact(structure, approx):
    model, loss_func, params, data = exact_case(structure, "mean")
    kwargs = {"kfac_approx": approx, "separate_weight_and_bias": False}
    E = _ekfac(model, loss_func, params, data, **kwargs)
    K = _ekfac(model, loss_func, params, data, cls=KFACLinearOperator, **kwargs)
    compare_matmat(E, kfac_dense(K))


def _projected_diagonal(op, dense):
    """Diagonal of each block of ``dense`` in the operator's Kronecker eigenbasis."""
    op._ensure_factors()
    diagonals = {}
    for layer, kind, idx in block_indices(op):
        QG = op._gradient_covariances_eigenvectors[layer]
        QA = (
            op._input_covariances_eigenvectors[layer]
            if kind != "b"
            else QG.new_ones(1, 1)
        )
        Q = kron(QG, QA)
        block = dense[idx.unsqueeze(1), idx.unsqueeze(0)]
        diagonals[(layer, kind)] = (Q.T @ block @ Q).diagonal()
    return diagonals


@SEPARATE
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_corrected_eigenvalues_are_the_projected_curvature_diagonal(
    loss, fisher_type, separate
):
    """Without weight sharing (one loss term per datum), for any amount of data."""
    model, loss_func, params, data = Case("mlp", loss).make()
    kwargs = {"fisher_type": fisher_type, "separate_weight_and_bias": separate}
    E = _ekfac(model, loss_func, params, data, **kwargs)
    reference = functorch_ggn if fisher_type == "type-2" else functorch_ef
    dense = reference(model, loss_func, params, data)
    for key, diagonal in _projected_diagonal(E, dense).items():
        assert_close(E._corrected_eigenvalues[key].flatten(), diagonal, msg=str(key))


def test_ekfac_is_closer_to_the_ggn_than_kfac():
    model, loss_func, params, data = Case("mlp", "ce").make()
    ggn = functorch_ggn(model, loss_func, params, data)
    E = _ekfac(model, loss_func, params, data)
    K = _ekfac(model, loss_func, params, data, cls=KFACLinearOperator)
    blocks = ggn * (kfac_dense(K) != 0)
    assert matrix_norm(ekfac_dense(E) - blocks) < matrix_norm(kfac_dense(K) - blocks)


def test_ekfac_mc_converges_to_type2():
    model, loss_func, params, data = Case("mlp", "bce").make()
    exact = ekfac_dense(_ekfac(model, loss_func, params, data))

    def error(mc_samples: int) -> float:
        kwargs = {"fisher_type": "mc", "mc_samples": mc_samples}
        E = _ekfac(model, loss_func, params, data, **kwargs)
        return (matrix_norm(ekfac_dense(E) - exact) / matrix_norm(exact)).item()

    errors = [error(n) for n in (1, 100, 10_000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


@SEPARATE
def test_ekfac_matrix_functions_match_dense(separate):
    model, loss_func, params, _ = Case("mlp", "mse").make()
    X = rand(20, 5, dtype=float64)
    data = [(X, randn(20, 3, dtype=float64))]
    E = _ekfac(model, loss_func, params, data, separate_weight_and_bias=separate)
    dense = E @ eye(E.shape[1], dtype=float64)
    assert_close(E.trace, dense.trace())
    assert_close(E.logdet, dense.slogdet()[1])
    assert_close(E.det, dense.det(), rtol=1e-6)
    assert_close(E.frobenius_norm, matrix_norm(dense))
