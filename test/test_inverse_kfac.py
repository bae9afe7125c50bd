"""Tests for curvlinops.inverse.KFACInverseLinearOperator (KFAC and EKFAC)."""

from math import sqrt

import pytest
import torch
from torch import eye, float32, float64, kron, manual_seed, rand, randn
from torch.linalg import cholesky_ex, inv
from torch.nn import Linear, MSELoss

from curvlinops import (
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples import TensorLinearOperator
from test.cases import Case
from test.faults import (
    assert_same_object_state,
    assert_same_state,
    model_state,
    object_state,
)
from test.kfac_references import block_indices, ekfac_dense, kfac_dense
from test.utils import assert_close, compare_matmat

SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
CASES = pytest.mark.parametrize(
    "case", [Case("mlp", "ce"), Case("cnn", "mse", "sum")], ids=lambda c: c.id
)
DAMPING = 1e-2


def _operator(case, cls=KFACLinearOperator, **kwargs):
    model, loss_func, params, data = case.make()
    average = None if case.reduction == "sum" else "batch"
    return cls(model, loss_func, params, data, loss_average=average, **kwargs)


def _identity(op):
    return eye(op.shape[0], dtype=op.dtype)


@CASES
@SEPARATE
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_exact_damping_inverts_the_damped_operator(case, separate, cls):
    op = _operator(case, cls, separate_weight_and_bias=separate)
    dense = (kfac_dense if cls is KFACLinearOperator else ekfac_dense)(op)
    damped = dense + DAMPING * _identity(op)
    op_inv = op.inverse(damping=DAMPING, use_exact_damping=True)
    compare_matmat(op_inv, inv(damped), rtol=1e-6)
    assert_close(op_inv @ damped, _identity(op), atol=1e-8)


def _damped_factor_dense(op, damping_of):
    """Dense inverse of KFAC with each block's factors damped by ``damping_of``."""
    dense = op._zeros(*op.shape)
    for layer, kind, idx in block_indices(op):
        G = op._gradient_covariances[layer]
        A = op._input_covariances[layer] if kind != "b" else None
        delta_A, delta_G = damping_of(A, G)
        G_inv = inv(G + delta_G * eye(len(G), dtype=G.dtype))
        A_inv = G.new_ones(1, 1) if A is None else inv(A + delta_A * eye(len(A)))
        dense[idx.unsqueeze(1), idx.unsqueeze(0)] = kron(G_inv, A_inv)
    return dense


@CASES
@SEPARATE
def test_factor_damping(case, separate):
    op = _operator(case, separate_weight_and_bias=separate)
    expected = _damped_factor_dense(op, lambda A, G: (DAMPING, DAMPING))
    compare_matmat(op.inverse(damping=DAMPING), expected, rtol=1e-6)


@CASES
@SEPARATE
def test_heuristic_damping(case, separate):
    op = _operator(case, separate_weight_and_bias=separate)
    min_damping = 1e-3

    def pi_damping(A, G):
        if A is None:
            return DAMPING, DAMPING
        pi = sqrt((A.trace() / len(A)) / (G.trace() / len(G)))
        root = sqrt(DAMPING)
        return max(pi * root, min_damping), max(root / pi, min_damping)

    expected = _damped_factor_dense(op, pi_damping)
    op_inv = op.inverse(
        damping=DAMPING, use_heuristic_damping=True, min_damping=min_damping
    )
    compare_matmat(op_inv, expected, rtol=1e-6)


def test_undamped_inverse_of_positive_definite_kfac():
    manual_seed(0)
    model = Linear(3, 2).to(float64)
    data = [(rand(10, 3, dtype=float64), randn(10, 2, dtype=float64))]
    params = list(model.parameters())
    K = KFACLinearOperator(model, MSELoss(), params, data, fisher_type="type-2")
    dense = kfac_dense(K)
    assert_close(K.inverse() @ dense, _identity(K), atol=1e-8)
    exact = KFACInverseLinearOperator(K, use_exact_damping=True)
    assert_close(exact @ dense, _identity(K), atol=1e-8)


@pytest.mark.parametrize("cache", [True, False])
def test_inverse_caches_the_inverted_factors(cache, monkeypatch):
    op = _operator(Case("mlp", "ce"))
    op_inv = KFACInverseLinearOperator(op, damping=DAMPING, cache=cache)
    calls = []
    original = op_inv._inverted_blocks
    monkeypatch.setattr(
        op_inv, "_inverted_blocks", lambda: calls.append(1) or original()
    )
    v = rand(op.shape[1], dtype=float64)
    first = op_inv @ v
    assert_close(op_inv @ v, first)
    assert len(calls) == (1 if cache else 2)


def test_retry_in_double_precision_when_cholesky_fails(monkeypatch):
    """Cholesky decompositions that fail in float32 are retried in float64."""
    manual_seed(0)
    model = Linear(3, 2)
    data = [(rand(10, 3), rand(10, 2))]
    K = KFACLinearOperator(model, MSELoss(), list(model.parameters()), data)
    v = rand(K.shape[1])
    expected = K.inverse(damping=DAMPING) @ v

    def cholesky_ex_failing_in_float32(matrix):
        L, info = cholesky_ex(matrix)
        return L, info + int(matrix.dtype == float32)

    monkeypatch.setattr(
        "curvlinops._kfac_inverse.cholesky_ex", cholesky_ex_failing_in_float32
    )
    result = K.inverse(damping=DAMPING) @ v
    assert result.dtype == float32
    assert_close(result, expected, rtol=1e-4)
    with pytest.raises(RuntimeError, match="Cholesky"):
        K.inverse(damping=DAMPING, retry_double_precision=False) @ v


def test_invalid_arguments_raise():
    K = _operator(Case("mlp", "ce"))
    E = _operator(Case("mlp", "ce"), EKFACLinearOperator)
    with pytest.raises(TypeError, match="KFACLinearOperator"):
        KFACInverseLinearOperator(TensorLinearOperator(eye(3)))
    with pytest.raises(ValueError, match="non-negative"):
        KFACInverseLinearOperator(K, damping=-1.0)
    with pytest.raises(ValueError, match="exact damping or EKFAC"):
        KFACInverseLinearOperator(K, use_heuristic_damping=True, use_exact_damping=True)
    with pytest.raises(ValueError, match="exact damping or EKFAC"):
        KFACInverseLinearOperator(E, use_heuristic_damping=True)


INVERSE_LAYOUT_3_0_1 = {  # the end of test/compat/curvlinops-3.0.1-api.txt
    "A": dict,
    "damping": float,
    "use_heuristic_damping": bool,
    "min_damping": float,
    "use_exact_damping": bool,
    "cache": bool,
    "retry_double_precision": bool,
    "inverse_input_covariances": dict,
    "inverse_gradient_covariances": dict,
}


@pytest.mark.parametrize(
    "kwargs", [{}, {"use_heuristic_damping": True}, {"use_exact_damping": True}]
)
def test_inverse_state_dict_round_trip(kwargs, monkeypatch):
    op = _operator(Case("mlp", "ce"), separate_weight_and_bias=True)
    op_inv = KFACInverseLinearOperator(op, damping=DAMPING, **kwargs)
    state = op_inv.state_dict()
    assert {key: type(value) for key, value in state.items()} == INVERSE_LAYOUT_3_0_1
    inverses = [
        state["inverse_input_covariances"],
        state["inverse_gradient_covariances"],
    ]
    if kwargs.get("use_exact_damping"):
        assert inverses == [{}, {}]  # eigendecompositions are recomputed after loading
    else:
        assert [list(d) for d in inverses] == [["0", "2"], ["0", "2"]]
        A, G = op._input_covariances["0"], op._gradient_covariances["0"]
        damping_A = op_inv._factor_dampings(A, G)[0]
        assert_close(inverses[0]["0"], inv(A + damping_A * eye(len(A), dtype=A.dtype)))
    expected = op_inv @ _identity(op)
    fresh = _operator(Case("mlp", "ce"), check_deterministic=False)
    fresh._data_pass = None  # loading computes no factors
    if not kwargs.get("use_exact_damping"):  # nor inverts them
        monkeypatch.setattr(KFACInverseLinearOperator, "_damped_inverse", None)
    loaded = KFACInverseLinearOperator.from_state_dict(state, fresh)
    assert loaded._use_heuristic_damping == kwargs.get("use_heuristic_damping", False)
    if kwargs.get("use_heuristic_damping"):  # bias blocks invert their G anew
        monkeypatch.undo()
    assert_close(loaded @ _identity(op), expected)


def test_inverse_loads_a_3_0_1_state_with_hand_made_inverses():
    """Loaded inverted factors are used as they are (none computed)."""
    op = _operator(Case("mlp", "ce"))
    state = KFACInverseLinearOperator(op, damping=DAMPING).state_dict()
    manual_seed(1)

    def symmetric(like):
        M = rand(*like.shape, dtype=float64)
        return M @ M.T

    A_inv = {k: symmetric(v) for k, v in op._input_covariances.items()}
    G_inv = {k: symmetric(v) for k, v in op._gradient_covariances.items()}
    state |= {"inverse_input_covariances": A_inv, "inverse_gradient_covariances": G_inv}
    loaded = KFACInverseLinearOperator.from_state_dict(state, op)
    dense = op._zeros(*op.shape)
    for layer, kind, idx in block_indices(op):
        block = G_inv[layer] if kind == "b" else kron(G_inv[layer], A_inv[layer])
        dense[idx.unsqueeze(1), idx.unsqueeze(0)] = block
    compare_matmat(loaded, dense)


def test_a_pair_of_dampings_damps_each_factor():
    op = _operator(Case("cnn", "mse", "sum"))
    damping_A, damping_G = 1e-3, 1e-1
    expected = _damped_factor_dense(op, lambda A, G: (damping_A, damping_G))
    compare_matmat(op.inverse(damping=(damping_A, damping_G)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="pair"):
        op.inverse(damping=(damping_A, damping_G), use_exact_damping=True)
    with pytest.raises(ValueError, match="non-negative"):
        op.inverse(damping=(damping_A, -1.0))


def test_inverse_state_that_does_not_fit_changes_nothing():
    """A state that does not fit changes neither the inverse nor ``A`` (nor model).

    Invalid options, or ``A``'s state without keys, raise before anything is
    loaded; a state's inverted factors of wrong shapes are ignored (recomputed).
    """
    op = _operator(Case("mlp", "ce"))
    op_inv = KFACInverseLinearOperator(op, damping=DAMPING)
    expected = op_inv @ _identity(op)
    other = _operator(Case("mlp", "ce", seed=1))
    state = KFACInverseLinearOperator(other, damping=DAMPING).state_dict()
    model = op._model_func
    for bad, match in [({"damping": -1.0}, "non-negative"), ({"A": {}}, "lacks")]:
        before = (model_state(model), object_state(op), object_state(op_inv))
        with pytest.raises(ValueError, match=match):
            op_inv.load_state_dict({**state, **bad})
        assert_same_state(before[0], model_state(model))
        assert_same_object_state(before[1], object_state(op))
        assert_same_object_state(before[2], object_state(op_inv))
        assert torch.equal(op_inv @ _identity(op), expected)
    wrong = {
        layer: eye(2, dtype=float64) for layer in state["inverse_input_covariances"]
    }
    op_inv.load_state_dict({**state, "inverse_input_covariances": wrong})
    reference = KFACInverseLinearOperator(other, damping=DAMPING)
    assert_close(op_inv @ _identity(op), reference @ _identity(op))
