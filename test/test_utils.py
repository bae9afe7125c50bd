"""Tests for curvlinops.utils: checks and functional models of curvlinops 3.x."""

import pytest
from torch import float64, manual_seed, rand, randint, randn, zeros
from torch.func import jacrev
from torch.nn import (
    BCEWithLogitsLoss,
    Conv1d,
    CrossEntropyLoss,
    Linear,
    MSELoss,
    Sequential,
)

from curvlinops.examples import TensorLinearOperator
from curvlinops.utils import (
    assert_divisible_by,
    assert_is_square,
    assert_matvecs_subseed_dim,
    make_functional_call,
    make_functional_flattened_model_and_loss,
)
from test.utils import assert_close


def test_assert_is_square():
    assert assert_is_square(TensorLinearOperator(zeros(4, 4))) == 4
    assert assert_is_square(zeros(2, 2).numpy()) == 2
    for shape in [(3, 4), (3,), (2, 2, 2)]:
        with pytest.raises(ValueError, match="square"):
            assert_is_square(zeros(shape))


def test_assert_matvecs_subseed_dim_and_divisible_by():
    assert_matvecs_subseed_dim(zeros(5, 6), 4)
    for num_matvecs in (5, 6):
        with pytest.raises(ValueError, match=f"num_matvecs \\({num_matvecs}\\)"):
            assert_matvecs_subseed_dim(zeros(5, 6), num_matvecs)
    assert_divisible_by(9, 3, "num_matvecs")
    with pytest.raises(ValueError, match="basis_dim \\(7\\) must be divisible by 3"):
        assert_divisible_by(7, 3, "basis_dim")


def test_make_functional_call_frees_named_parameters():
    manual_seed(0)
    model = Sequential(Linear(3, 4), Linear(4, 2)).double()
    X = rand(5, 3, dtype=float64)
    f = make_functional_call(model, ["1.weight", "0.bias"])
    w, b = randn(2, 4, dtype=float64), randn(4, dtype=float64)
    expected = (X @ model[0].weight.T + b) @ w.T + model[1].bias
    assert_close(f(w, b, X), expected)
    # differentiable w.r.t. the free parameters with torch.func
    jacobian = jacrev(f)(w, b, X)
    assert jacobian.shape == (5, 2, 2, 4)
    with pytest.raises(ValueError, match="not parameters"):
        make_functional_call(model, ["2.weight"])


@pytest.mark.parametrize("loss", ["mse", "ce", "ce_probabilities", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flattened_model_has_one_row_per_loss_term(loss: str, reduction: str):
    """Rows [T, C] for outputs [B, C, S] (cross-entropy) or [B, S, C], same loss."""
    manual_seed(0)
    B, S, C = 3, 4, 5
    if loss.startswith("ce"):
        model, X = Conv1d(2, C, 1).double(), rand(B, 2, S, dtype=float64)
        y = (
            randint(0, C, (B, S))
            if loss == "ce"
            else rand(B, C, S, dtype=float64).softmax(1)
        )
        expected_rows = model(X).movedim(1, -1).reshape(-1, C)
        loss_func = CrossEntropyLoss(reduction=reduction)
    else:
        model, X = Linear(2, C).double(), rand(B, S, 2, dtype=float64)
        y = rand(B, S, C, dtype=float64).round()
        expected_rows = model(X).reshape(-1, C)
        loss_func = (MSELoss if loss == "mse" else BCEWithLogitsLoss)(
            reduction=reduction
        )
    params = tuple(model.parameters())
    f_flat, c_flat = make_functional_flattened_model_and_loss(model, loss_func, params)
    rows = f_flat(*params, X)
    assert_close(rows, expected_rows)
    assert_close(c_flat(rows, y), loss_func(model(X), y))
