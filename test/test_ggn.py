"""Tests for curvlinops.ggn."""

import pytest
from torch import float64, rand, tensor
from torch.nn import HuberLoss, Module

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import functorch_ggn
from test.cases import CASE_IDS, CASES, Case
from test.utils import compare_matmat


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ggn_matches_functorch(case: Case):
    model, loss_func, params, data = case.make()
    G = GGNLinearOperator(model, loss_func, params, data, **case.kwargs())
    G_dense = functorch_ggn(model, loss_func, params, data, case.input_key)
    compare_matmat(G, G_dense)


def test_ggn_of_plain_callable_model():
    """A model that is a plain function (no Module) uses reverse mode only."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    G_dense = functorch_ggn(model, loss_func, params, data)

    def model_func(X):
        return model(X)

    assert not isinstance(model_func, Module)
    compare_matmat(GGNLinearOperator(model_func, loss_func, params, data), G_dense)


def test_ggn_of_a_loss_without_closed_form():
    """Losses other than MSE/CE/BCE are differentiated twice with autograd."""
    model, _, params, data = Case("cnn", "mse").make()
    loss_func = HuberLoss(reduction="sum", delta=0.3)
    G = GGNLinearOperator(model, loss_func, params, data)
    compare_matmat(G, functorch_ggn(model, loss_func, params, data))


@pytest.mark.parametrize(
    "operator",
    [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator, KFACLinearOperator],
)
def test_labels_and_outputs_that_do_not_fit_the_loss_raise(operator):
    """Closed forms that ignore the labels must not accept wrong ones silently."""
    model, loss_func, params, data = Case("mlp", "mse").make()
    wrong = [(X, y[:, :1]) for X, y in data]  # broadcastable, yet not the output's
    with pytest.raises(ValueError, match=r"expects labels of shape \[\d+, 3\]"):
        operator(model, loss_func, params, wrong)

    class TupleOutput(Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, X):
            return self.model(X), X

    with pytest.raises(TypeError, match="must return one tensor, got tuple"):
        operator(TupleOutput(), loss_func, params, data)


def _loss_with_options(option: str):
    """A loss with an option the closed forms do not model, and fitting labels."""
    model, loss_func, params, data = Case(
        "mlp", "bce" if "pos" in option else "ce"
    ).make()
    if option == "ignore_index":  # some labels are ignored
        data = [(X, y.index_fill(0, tensor([0]), -100)) for X, y in data]
        return model, loss_func, params, data
    kwargs = {
        "weight": {"weight": rand(3, dtype=float64)},
        "label_smoothing": {"label_smoothing": 0.2},
        "pos_weight": {"pos_weight": rand(3, dtype=float64) + 0.5},
    }[option]
    return model, type(loss_func)(**kwargs), params, data


OPTIONS = ["weight", "label_smoothing", "ignore_index", "pos_weight"]


@pytest.mark.parametrize("option", OPTIONS)
def test_ggn_of_losses_with_options_matches_functorch(option):
    """Losses with weights, smoothing or ignored labels fall back to autograd."""
    model, loss_func, params, data = _loss_with_options(option)
    G = GGNLinearOperator(model, loss_func, params, data)
    compare_matmat(G, functorch_ggn(model, loss_func, params, data))


@pytest.mark.parametrize(
    "operator, option",
    [
        (operator, option)
        for operator in [EFLinearOperator, FisherMCLinearOperator, KFACLinearOperator]
        for option in OPTIONS
        if option != "ignore_index" or operator is KFACLinearOperator
    ],
)
def test_closed_form_operators_reject_loss_options(operator, option):
    model, loss_func, params, data = _loss_with_options(option)
    with pytest.raises(NotImplementedError, match="does not support"):
        operator(model, loss_func, params, data)
