"""Tests for curvlinops.gradient_moments."""

import pytest
from torch import cat, eye, float64, outer, randn_like, tensor, zeros
from torch.nn import HuberLoss, Module, MSELoss
from torch.nn.functional import one_hot

from curvlinops import EFLinearOperator
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_gradient_and_loss,
)
from test.cases import CASE_IDS, CASES, Case
from test.utils import assert_close, compare_matmat


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ef_matches_functorch(case: Case):
    model, loss_func, params, data = case.make()
    E = EFLinearOperator(model, loss_func, params, data, **case.kwargs())
    E_dense = functorch_empirical_fisher(model, loss_func, params, data, case.input_key)
    compare_matmat(E, E_dense)


@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_ef_sums_outer_products_of_per_datum_gradients(loss: str):
    """With 2d outputs and 'sum', the EF is sum_n g_n g_n^T over data points n."""
    model, loss_func, params, data = Case("mlp", loss, "sum").make()
    num_params = sum(p.numel() for p in params)
    expected = zeros(num_params, num_params, dtype=params[0].dtype)
    for X, y in data:
        for n in range(X.shape[0]):
            datum = [(X[n : n + 1], y[n : n + 1])]
            gradient, _ = functorch_gradient_and_loss(model, loss_func, params, datum)
            g = cat([g.flatten() for g in gradient])
            expected += outer(g, g)
    compare_matmat(EFLinearOperator(model, loss_func, params, data), expected)


def test_ef_mean_is_sum_divided_by_number_of_averaged_entries():
    """For the square loss on [N, S, C] outputs, 'mean' averages N * S * C entries."""
    model, _, params, data = Case("sequence", "mse").make()
    E_sum, E_mean = (
        EFLinearOperator(model, MSELoss(reduction=reduction), params, data)
        for reduction in ("sum", "mean")
    )
    identity = eye(E_sum.shape[1], dtype=E_sum.dtype)
    num_entries = sum(y.numel() for _, y in data)
    assert_close(E_mean @ identity, (E_sum @ identity) / num_entries)


def test_ef_of_plain_callable_model():
    """A model that is a plain function (no Module) uses reverse mode only."""
    model, loss_func, params, data = Case("cnn", "bce").make()
    E_dense = functorch_empirical_fisher(model, loss_func, params, data)

    def model_func(X):
        return model(X)

    assert not isinstance(model_func, Module)
    compare_matmat(EFLinearOperator(model_func, loss_func, params, data), E_dense)


def test_ef_rejects_unsupported_loss():
    model, _, params, data = Case("mlp", "mse").make()
    with pytest.raises(NotImplementedError, match="MSELoss.*HuberLoss"):
        EFLinearOperator(model, HuberLoss(), params, data)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ef_with_class_probabilities_as_labels(reduction: str):
    """Cross-entropy labels may be class probabilities laid out like the output."""
    model, loss_func, params, data = Case("sequence", "ce", reduction).make()
    soft = [(X, (2 * randn_like(model(X))).softmax(1).detach()) for X, _ in data]
    E = EFLinearOperator(model, loss_func, params, soft)
    compare_matmat(E, functorch_empirical_fisher(model, loss_func, params, soft))
    # one-hot probabilities give the EF of the class indices
    num_classes = model(data[0][0]).shape[1]
    one_hots = [(X, one_hot(y, num_classes).movedim(-1, 1).double()) for X, y in data]
    identity = eye(E.shape[1], dtype=float64)
    assert_close(
        EFLinearOperator(model, loss_func, params, one_hots) @ identity,
        EFLinearOperator(model, loss_func, params, data) @ identity,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ef_leaves_out_terms_with_ignored_labels(reduction: str):
    """Cross-entropy terms labeled ``ignore_index`` neither count nor contribute."""
    model, loss_func, params, data = Case("sequence", "ce", reduction).make()
    data = [(X, y.index_fill(-1, tensor([0]), -100)) for X, y in data]
    E = EFLinearOperator(model, loss_func, params, data)
    compare_matmat(E, functorch_empirical_fisher(model, loss_func, params, data))
