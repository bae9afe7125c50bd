"""Tests for curvlinops.jacobian."""

from weakref import ref

import pytest
from torch import Size, cat, float64, no_grad, randn, zeros
from torch.autograd import grad
from torch.nn import Module

from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator
from curvlinops.examples.functorch import (
    functorch_gradient_and_loss,
    functorch_jacobian,
)
from curvlinops.jacobian import (
    make_batch_jacobian_matrix_product,
    make_batch_transposed_jacobian_matrix_product,
)
from test.cases import CASES, Case
from test.utils import assert_close, batch_matrix, compare_matmat, flatten_matrix

# The loss only matters through the output layout (cross-entropy permutes sequence
# outputs), the reduction not at all.
JACOBIAN_CASES = [c for c in CASES if c.reduction == "mean" and c.loss != "bce"]
JACOBIAN_IDS = [f"{c.architecture}-{c.loss}" for c in JACOBIAN_CASES]


@pytest.mark.parametrize("case", JACOBIAN_CASES, ids=JACOBIAN_IDS)
def test_jacobian_matches_functorch(case: Case):
    model, _, params, data = case.make()
    J = JacobianLinearOperator(model, params, data, **case.kwargs())
    J_dense = functorch_jacobian(model, params, data, case.input_key)
    compare_matmat(J, J_dense)
    JT = TransposedJacobianLinearOperator(model, params, data, **case.kwargs())
    compare_matmat(JT, J_dense.T)


def test_jacobian_format_and_adjoints():
    """The range's tensor-list format is the stacked output; adjoints link up."""
    model, _, params, data = Case("sequence", "ce").make()
    J = JacobianLinearOperator(model, params, data)
    num_data = sum(X.shape[0] for X, _ in data)
    assert J._out_shape == [Size([num_data, *model(data[0][0]).shape[1:]])]
    JT = J.adjoint()
    assert isinstance(JT, TransposedJacobianLinearOperator)
    assert JT.adjoint() is J and J.adjoint() is JT
    assert JT._in_shape == J._out_shape
    # no reference cycle (it would keep a process group alive until exit)
    J_ref = ref(J)
    del J
    assert J_ref() is None
    assert isinstance(JT.adjoint(), JacobianLinearOperator)


def test_transposed_jacobian_maps_output_gradients_to_the_gradient():
    """Chain rule: J^T (dL/df) = dL/dθ for the risk L, stacked over batches."""
    model, loss_func, params, data = Case("sequence", "mse", "sum").make()
    output_gradients = []
    for X, y in data:
        output = model(X).detach().requires_grad_(True)
        output_gradients.extend(grad(loss_func(output, y), output))
    JT = TransposedJacobianLinearOperator(model, params, data)
    expected, _ = functorch_gradient_and_loss(model, loss_func, params, data)
    assert_close(JT @ [cat(output_gradients)], expected)


def test_jacobian_of_plain_callable_model():
    """A model that is a plain function (no Module) uses reverse mode only."""
    model, _, params, data = Case("cnn", "mse").make()
    J_dense = functorch_jacobian(model, params, data)

    def model_func(X):
        return model(X)

    assert not isinstance(model_func, Module)
    compare_matmat(JacobianLinearOperator(model_func, params, data), J_dense)


@pytest.mark.parametrize(
    "cls", [JacobianLinearOperator, TransposedJacobianLinearOperator]
)
@pytest.mark.parametrize("num_data", [4, 6])
def test_jacobian_rejects_wrong_num_data(cls, num_data: int):
    model, _, params, data = Case("mlp", "mse").make()  # 5 data points
    op = cls(model, params, data, num_data=num_data, check_deterministic=False)
    with pytest.raises(ValueError, match="num_data=.*yielded"):
        op @ zeros(op.shape[1], dtype=op.dtype)


@pytest.mark.parametrize("case", [Case("sequence", "ce"), Case("dict_input", "mse")])
def test_batch_jacobian_matrix_products_match_functorch(case: Case):
    """3.x's builders: the mini-batch Jacobian and its transpose times columns."""
    model, _, params, data = case.make()
    jmp = make_batch_jacobian_matrix_product(model, tuple(params))
    jtmp = make_batch_transposed_jacobian_matrix_product(model, tuple(params))
    M = batch_matrix(params)
    for X, _ in data:
        J = functorch_jacobian(model, params, [(X, None)], case.input_key)
        JM = jmp(X, *M)
        output_shape = model(X).shape
        assert JM.shape == (*output_shape, 3)
        assert_close(JM.reshape(-1, 3), J @ flatten_matrix(M))
        with no_grad():
            assert_close(jmp(X, M), JM)
        V = randn(*output_shape, 2, dtype=float64)
        JTV = jtmp(X, V)
        assert isinstance(JTV, tuple)
        assert_close(flatten_matrix(JTV), J.T @ V.reshape(-1, 2))
        assert_close(jtmp(X, (V,)), JTV)


def test_jacobians_need_a_fixed_data_order():
    assert JacobianLinearOperator.FIXED_DATA_ORDER is True
    assert TransposedJacobianLinearOperator.FIXED_DATA_ORDER is True
