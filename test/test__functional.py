"""Tests for curvlinops._functional: every operator on ``model_func(params, X)``."""

from io import BytesIO

import pytest
from torch import eye, float64, kron, load, manual_seed, rand, randn, save
from torch.func import functional_call
from torch.nn import MSELoss

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops._functional import FunctionalModel, bind_params, functional_form
from curvlinops.examples.functorch import functorch_ggn, functorch_gradient_and_loss
from curvlinops.ggn import make_batch_ggn_matrix_product
from test.cases import Case
from test.utils import assert_close, compare_matmat

OPERATORS = {
    "hessian": (HessianLinearOperator, {}),
    "ggn": (GGNLinearOperator, {}),
    "ef": (EFLinearOperator, {}),
    "fisher_mc": (FisherMCLinearOperator, {}),
    "kfac": (KFACLinearOperator, {"fisher_type": "type-2"}),
    "ekfac": (EKFACLinearOperator, {"fisher_type": "mc"}),
    "ggn_diagonal": (GGNDiagonalLinearOperator, {}),
    "jacobian": (JacobianLinearOperator, {}),
    "transposed_jacobian": (TransposedJacobianLinearOperator, {}),
}


def _functional_case(architecture: str = "mlp", loss: str = "ce"):
    """A case's module, its parameter dictionary, and the functional model."""
    model, loss_func, params, data = Case(architecture, loss).make()
    named = dict(model.named_parameters())

    def model_func(p, X):
        return functional_call(model, p, (X,))

    return model, model_func, named, loss_func, data


def _build(cls, model, loss_func, params, data, **kwargs):
    if cls in (JacobianLinearOperator, TransposedJacobianLinearOperator):
        return cls(model, params, data, **kwargs)
    return cls(model, loss_func, params, data, **kwargs)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_dict_params_give_the_operator_of_the_module(name):
    """Same matrix from ``model_func(params, X)`` as from the module and a list."""
    cls, kwargs = OPERATORS[name]
    model, model_func, named, loss_func, data = _functional_case()
    A = _build(cls, model, loss_func, list(named.values()), data, **kwargs)
    A_dict = _build(cls, model_func, loss_func, named, data, **kwargs)
    assert A_dict._in_shape == A._in_shape and A_dict._out_shape == A._out_shape
    M = randn(A.shape[1], 3, dtype=float64)
    assert_close(A_dict @ M, A @ M, rtol=1e-12, atol=1e-14)


def test_in_shape_follows_the_dictionary_order():
    model, model_func, named, loss_func, data = _functional_case()
    reordered = dict(reversed(named.items()))
    G = GGNLinearOperator(model_func, loss_func, named, data)
    G_reordered = GGNLinearOperator(model_func, loss_func, reordered, data)
    assert G_reordered._in_shape == [p.shape for p in reordered.values()]
    M = [randn(*p.shape, 2, dtype=float64) for p in named.values()]
    expected = G @ M
    assert_close(G_reordered @ M[::-1], expected[::-1])
    compare_matmat(G_reordered, functorch_ggn(model_func, loss_func, reordered, data))


def test_functional_kfac_state_dict_round_trip():
    _, model_func, named, loss_func, data = _functional_case()
    K = KFACLinearOperator(model_func, loss_func, named, data, fisher_type="type-2")
    buffer = BytesIO()
    save(K.state_dict(), buffer)
    buffer.seek(0)
    state = load(buffer, weights_only=True)
    assert list(state["model_func_state_dict"]) == list(named)
    saved = {k: v.clone() for k, v in named.items()}
    for p in named.values():
        p.data.add_(1.0)
    K_loaded = KFACLinearOperator.from_state_dict(state, model_func, named, data)
    assert all(named[k].equal(v) for k, v in saved.items())  # values restored
    M = randn(K.shape[1], 2, dtype=float64)
    assert_close(K_loaded @ M, K @ M, rtol=0, atol=0)


def test_functional_references_and_builders_take_dicts():
    manual_seed(0)
    params = {"w": randn(2, 3, dtype=float64, requires_grad=True)}

    def model_func(p, X):
        return X @ p["w"].T

    X, y = rand(5, 3, dtype=float64), rand(5, 2, dtype=float64)
    loss_func = MSELoss(reduction="sum")
    G = 2 * kron(eye(2, dtype=float64), X.T @ X)  # linear model, square loss
    assert_close(functorch_ggn(model_func, loss_func, params, [(X, y)]), G)
    gradient, _ = functorch_gradient_and_loss(model_func, loss_func, params, [(X, y)])
    assert_close(gradient[0], 2 * (X @ params["w"].T - y).T @ X)
    mp = make_batch_ggn_matrix_product(model_func, loss_func, params)
    (GM,) = mp(X, y, eye(6, dtype=float64).reshape(2, 3, 6))
    assert_close(GM.reshape(6, 6), G)


def test_functional_form_replaces_some_parameters():
    params = {
        "a": randn(3, dtype=float64, requires_grad=True),
        "b": randn(3, dtype=float64, requires_grad=True),
    }
    model, values = bind_params(lambda p, X: p["a"] * X + p["b"], params)
    assert isinstance(model, FunctionalModel) and values == list(params.values())
    X, new_b = rand(3, dtype=float64), rand(3, dtype=float64)
    f = functional_form(model, [params["b"]])
    assert_close(f(new_b, X), params["a"] * X + new_b)
    assert functional_form(model, [randn(3, requires_grad=True)]) is None
    assert functional_form(lambda X: X, [params["a"]]) is None


@pytest.mark.parametrize(
    "params,error,match",
    [
        ({}, ValueError, "empty"),
        ({1: randn(2, requires_grad=True)}, TypeError, "str keys"),
        ({"w": [1.0]}, TypeError, r"params\['w'\] must be a tensor"),
        ({"w": randn(2)}, ValueError, r"params\['w'\] must require grad"),
    ],
    ids=["empty", "key", "value", "requires_grad"],
)
def test_bad_parameter_dictionaries_raise(params, error, match):
    data = [(rand(3, 2), rand(3, 2))]
    with pytest.raises(error, match=match):
        GGNLinearOperator(lambda p, X: X, MSELoss(), params, data)


def test_operators_on_one_functional_model_share_its_lock():
    """Threads take turns on ``model_func`` (it may swap a module's parameters)."""
    _, model_func, named, loss_func, data = _functional_case()
    G = GGNLinearOperator(model_func, loss_func, named, data)
    H = HessianLinearOperator(model_func, loss_func, named, data)
    other = GGNLinearOperator(lambda p, X: model_func(p, X), loss_func, named, data)
    assert G._lock is H._lock and G._lock is not other._lock
