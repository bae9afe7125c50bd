"""Tests for curvlinops.ggn."""

import pytest
from torch import float64, no_grad, rand, tensor
from torch.func import vmap
from torch.nn import HuberLoss, Module

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import functorch_ggn
from curvlinops.ggn import make_batch_ggn_matrix_product, make_ggn_vector_product
from curvlinops.utils import make_functional_model_and_loss
from test.cases import CASE_IDS, CASES, Case
from test.utils import (
    assert_close,
    batch_matrix,
    compare_matmat,
    diagonal_blocks,
    flatten_matrix,
)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ggn_matches_functorch(case: Case):
    model, loss_func, params, data = case.make()
    G = GGNLinearOperator(model, loss_func, params, data, **case.kwargs())
    G_dense = functorch_ggn(model, loss_func, params, data, case.input_key)
    compare_matmat(G, G_dense)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_of_class_probabilities_of_any_mass(reduction: str):
    """Cross-entropy's Hessian scales with the label mass of every position."""
    model, loss_func, params, data = Case("sequence", "ce", reduction).make()
    data = [(X, 4 * rand(model(X).shape, dtype=float64) / 3) for X, _ in data]
    G = GGNLinearOperator(model, loss_func, params, data)
    compare_matmat(G, functorch_ggn(model, loss_func, params, data))


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


BUILDER_CASES = [Case("sequence", "ce", "mean"), Case("dict_input", "bce", "sum")]


@pytest.mark.parametrize("case", BUILDER_CASES, ids=[c.id for c in BUILDER_CASES])
def test_batch_ggn_matrix_product_matches_functorch(case: Case):
    """3.x's builder: ``mp(X, y, *M)`` is the mini-batch GGN times ``M``."""
    model, loss_func, params, data = case.make()
    mp = make_batch_ggn_matrix_product(model, loss_func, tuple(params))
    M = batch_matrix(params)
    for X, y in data:
        dense = functorch_ggn(model, loss_func, params, [(X, y)], case.input_key)
        GM = mp(X, y, *M)
        assert isinstance(GM, tuple)
        assert_close(flatten_matrix(GM), dense @ flatten_matrix(M))
        with no_grad():
            assert_close(mp(X, y, M), GM)


@pytest.mark.parametrize("block_sizes", [[1, 1, 2], [3, 1]], ids=str)
def test_ggn_block_diagonal(block_sizes):
    """``block_sizes`` gives the GGN's diagonal blocks (and zeros elsewhere)."""
    model, loss_func, params, data = Case("mlp", "ce", "mean").make()
    G = GGNLinearOperator(model, loss_func, params, data, block_sizes=block_sizes)
    dense = functorch_ggn(model, loss_func, params, data)
    compare_matmat(G, diagonal_blocks(dense, params, block_sizes))


def test_ggn_vector_product_of_functional_model_and_loss():
    """``make_ggn_vector_product(f, c, 1)`` multiplies the GGN onto a vector.

    Both argument conventions, and batched over vectors with ``torch.func.vmap``.
    """
    model, loss_func, params, data = Case("mlp", "ce", "sum").make()
    (X, y), _ = data
    f, c = make_functional_model_and_loss(model, loss_func, tuple(params))
    ggnvp = make_ggn_vector_product(f, c, num_c_extra_args=1)
    dense = functorch_ggn(model, loss_func, params, [(X, y)])
    V = batch_matrix(params, num_cols=3)
    v = [m[..., 0] for m in V]
    expected = dense @ flatten_matrix(V)
    Gv = ggnvp(*params, X, y, *v)
    assert_close(flatten_matrix([g.unsqueeze(-1) for g in Gv]), expected[:, :1])
    assert_close(ggnvp(tuple(params), X, y, tuple(v)), Gv)
    GV = vmap(lambda *vs: ggnvp(*params, X, y, *vs), in_dims=-1, out_dims=-1)(*V)
    assert_close(flatten_matrix(GV), expected)
    with pytest.raises(ValueError, match="c_args"):
        ggnvp(*params, X, *v)
