"""Tests for curvlinops.gradient_moments."""

import pytest
from torch import cat, eye, float64, no_grad, outer, randn_like, tensor, zeros
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, Module, MSELoss
from torch.nn.functional import one_hot

from curvlinops import EFLinearOperator
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_gradient_and_loss,
)
from curvlinops.gradient_moments import make_batch_ef_matrix_product
from test.cases import CASE_IDS, CASES, Case
from test.utils import (
    assert_close,
    batch_matrix,
    compare_matmat,
    diagonal_blocks,
    flatten_matrix,
)


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


BUILDER_CASES = [Case("sequence", "ce", "mean"), Case("dict_input", "mse", "sum")]


@pytest.mark.parametrize("case", BUILDER_CASES, ids=[c.id for c in BUILDER_CASES])
def test_batch_ef_matrix_product_matches_functorch(case: Case):
    """3.x's builder: ``mp(X, y, *M)`` is the mini-batch EF times ``M``."""
    model, loss_func, params, data = case.make()
    mp = make_batch_ef_matrix_product(model, loss_func, tuple(params))
    M = batch_matrix(params)
    for X, y in data:
        batch = [(X, y)]
        dense = functorch_empirical_fisher(
            model, loss_func, params, batch, case.input_key
        )
        EM = mp(X, y, *M)
        assert isinstance(EM, tuple)
        assert_close(flatten_matrix(EM), dense @ flatten_matrix(M))
        with no_grad():
            assert_close(mp(X, y, M), EM)


@pytest.mark.parametrize("case", BUILDER_CASES, ids=[c.id for c in BUILDER_CASES])
@pytest.mark.parametrize("block_sizes", ["per_param", "two_blocks"])
def test_ef_block_diagonal(case: Case, block_sizes: str):
    """``block_sizes`` gives the dense EF's diagonal blocks (zeros elsewhere)."""
    model, loss_func, params, data = case.make()
    block_sizes = (
        [1] * len(params) if block_sizes == "per_param" else [1, len(params) - 1]
    )
    E = EFLinearOperator(
        model, loss_func, params, data, block_sizes=block_sizes, **case.kwargs()
    )
    dense = functorch_empirical_fisher(model, loss_func, params, data, case.input_key)
    compare_matmat(E, diagonal_blocks(dense, params, block_sizes))


def test_ef_takes_3_0_1_positional_arguments():
    """Positional order of 3.0.1: ..., num_data, block_sizes, batch_size_fn."""
    case = Case("dict_input", "bce", "mean")
    model, loss_func, params, data = case.make()
    block_sizes = [len(params) - 1, 1]
    num_data = sum(y.shape[0] for _, y in data)
    E = EFLinearOperator(
        model, loss_func, params, data, False, True, num_data, block_sizes,
        case.batch_size_fn,
    )  # fmt: skip
    dense = functorch_empirical_fisher(model, loss_func, params, data, case.input_key)
    compare_matmat(E, diagonal_blocks(dense, params, block_sizes))
    assert EFLinearOperator.SUPPORTED_LOSSES == (
        MSELoss,
        CrossEntropyLoss,
        BCEWithLogitsLoss,
    )
