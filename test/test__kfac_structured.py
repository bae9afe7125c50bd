"""Tests for curvlinops._kfac_structured: KFAC, EKFAC and inverses as structured blocks.

The structured forms are compared, after the permutation into the canonical form,
with the dense matrices of :mod:`test.kfac_references` (assembled from the factors
with their own index bookkeeping), in float64.
"""

from copy import deepcopy

import pytest
from torch import eye, float64, manual_seed, no_grad, rand
from torch.linalg import inv, matrix_norm, slogdet
from torch.nn import Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    EighDecomposedLinearOperator,
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KroneckerProductLinearOperator,
)
from curvlinops.examples import TensorLinearOperator
from test.cases import Case
from test.kfac_references import ekfac_dense, kfac_dense, linear_params
from test.utils import assert_close, compare_matmat

OPERATORS = pytest.mark.parametrize(
    "cls", [KFACLinearOperator, EKFACLinearOperator], ids=["kfac", "ekfac"]
)
SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
CASES = [Case("mlp", "ce"), Case("cnn", "mse", "sum")]  # Linear, Conv2d (groups)


def _dense(op):
    return (kfac_dense if isinstance(op, KFACLinearOperator) else ekfac_dense)(op)


def _canonical(op, dense):
    """The dense matrix in the canonical form, ``P A P^T``."""
    P = op._to_canonical @ eye(op.shape[1], dtype=float64)
    return P @ dense @ P.T


@OPERATORS
@SEPARATE
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "case", [Case("mlp", "ce"), Case("cnn", "mse", "sum")], ids=str
)
def test_structured_form_is_the_operator_in_canonical_form(cls, case, separate, approx):
    model, loss_func, _, data = case.make()
    op = cls(
        model,
        loss_func,
        linear_params(model),
        data,
        fisher_type="type-2",
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    B = op.to_structured()
    weight_block = (
        KroneckerProductLinearOperator
        if cls is KFACLinearOperator
        else EighDecomposedLinearOperator
    )
    bias_block = (
        TensorLinearOperator
        if cls is KFACLinearOperator
        else EighDecomposedLinearOperator
    )
    for block, (_, kind) in zip(B.blocks, op._block_keys, strict=True):
        assert isinstance(block, bias_block if kind == "b" else weight_block)
    compare_matmat(B, _canonical(op, _dense(op)))
    # the operator's closed forms are the structured ones, bit for bit
    assert op.trace.equal(B.trace) and op.frobenius_norm.equal(B.frobenius_norm)


@OPERATORS
@SEPARATE
def test_structured_logdet_and_inverses_match_the_dense_ones(cls, separate):
    """On more data than inputs, so that the factors are well-conditioned."""
    manual_seed(0)
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2)).to(float64)
    data = [(rand(20, 3, dtype=float64), rand(20, 2, dtype=float64))]
    op = cls(
        model,
        MSELoss(),
        list(model.parameters()),
        data,
        fisher_type="type-2",
        separate_weight_and_bias=separate,
    )
    B, dense = op.to_structured(), _canonical(op, _dense(op))
    sign, logabsdet = slogdet(dense)
    assert sign > 0
    assert_close(B.logdet, logabsdet)
    assert_close(op.logdet, logabsdet)
    assert_close(op.det, logabsdet.exp())
    assert_close(op.frobenius_norm, matrix_norm(dense))
    identity = eye(len(dense), dtype=float64)
    compare_matmat(B.inverse(), inv(dense))
    compare_matmat(B.inverse(damping=0.1), inv(dense + 0.1 * identity))
    # KFAC's exact damping and EKFAC's inverse are the structured damped inverse
    exact = KFACInverseLinearOperator(op, damping=0.1, use_exact_damping=True)
    compare_matmat(exact.to_structured(), inv(dense + 0.1 * identity))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"damping": (0.1, 0.2)}, {"use_heuristic_damping": True}],
    ids=["factors", "pair", "heuristic"],
)
def test_factor_damped_inverse_is_a_kronecker_product_of_inverted_factors(kwargs):
    op = KFACLinearOperator(*Case("mlp", "ce").make(), fisher_type="type-2")
    inverse = KFACInverseLinearOperator(op, **{"damping": 0.1, **kwargs})
    structured = inverse.to_structured()
    dense = inverse @ eye(op.shape[1], dtype=float64)
    compare_matmat(structured, _canonical(op, dense))
    blocks = structured.blocks
    for block, (layer, kind) in zip(blocks, op._block_keys, strict=True):
        if kind == "b":
            continue
        G_inv, A_inv = block.factors
        damping_A, damping_G = inverse._factor_dampings(
            op._input_covariances[layer], op._gradient_covariances[layer]
        )
        for factor, damping, inverted in [
            (op._gradient_covariances[layer], damping_G, G_inv),
            (op._input_covariances[layer], damping_A, A_inv),
        ]:
            damped = factor + damping * eye(len(factor), dtype=float64)
            assert_close(inverted, inv(damped))
    assert inverse.to_structured() is structured  # cached


@OPERATORS
def test_matrix_functions_are_cached_until_the_factors_change(cls, monkeypatch):
    model, loss_func, params, data = Case("mlp", "mse").make()
    op = cls(model, loss_func, params, data, fisher_type="type-2")
    dense = _dense(op)
    calls = []
    for name in ["_structured", "_compute_logdet"]:
        if hasattr(op, name):
            original = getattr(op, name)
            monkeypatch.setattr(op, name, lambda f=original: calls.append(1) or f())
    assert_close(op.trace, dense.trace())
    assert_close(op.frobenius_norm, dense.norm())
    assert op.trace is op.trace and op.det is op.det and op.logdet is op.logdet
    assert len(calls) == 3  # trace, frobenius_norm and logdet (det reuses it)
    with no_grad():
        model[0].weight.mul_(2.0)
    op.compute_kronecker_factors()  # new factors: the caches are cleared
    assert_close(op.trace, _dense(op).trace())
    assert len(calls) == 4


@OPERATORS
def test_structured_form_is_built_once_per_set_of_factors(cls):
    """Products reuse it; new factors and copies rebuild it."""
    model, loss_func, params, data = Case("mlp", "mse").make()
    op = cls(model, loss_func, params, data, fisher_type="type-2")
    v = rand(op.shape[1], dtype=float64)
    first = op @ v
    structured = op._structured()
    op @ v
    assert op._structured() is structured
    copied = deepcopy(op)
    assert copied._structured_form is None
    assert_close(copied @ v, first)
    with no_grad():
        model[0].weight.mul_(2.0)
    op.compute_kronecker_factors()
    assert op._structured() is not structured
    assert_close(op @ v, _dense(op) @ v)
    assert not (op @ v).allclose(first)
