"""Tests for curvlinops._autodiff: Jacobian products in every mode agree."""

from functools import cache

import pytest
import torch
from torch import float64, manual_seed, rand, randn
from torch.nn import (
    Conv1d,
    Conv2d,
    Conv3d,
    Flatten,
    Linear,
    Sequential,
    Tanh,
    Unflatten,
)
from torch.nn.functional import linear

from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops._autodiff import fast_rule_layers, jvp
from curvlinops.examples.functorch import (
    functorch_ggn,
    functorch_hessian,
    functorch_jacobian,
)
from curvlinops.utils import make_functional_model_and_loss
from test.cases import Case
from test.utils import assert_close, random_columns


def _model():
    """Linear and convolution layers of every kind the lean rules handle."""
    return Sequential(
        Linear(6, 8),
        Unflatten(1, (2, 4)),
        Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
        Unflatten(2, (2, 2)),
        Conv2d(2, 3, 2, padding=1, bias=False),
        Tanh(),
        Unflatten(1, (1, 3)),
        Conv3d(1, 2, 2, stride=(1, 2, 1)),
        Flatten(),
        Linear(2 * 2 * 1 * 2, 4),
    ).to(float64)


@pytest.mark.parametrize(
    "trainable",
    [
        "all",
        "weights only",  # biases have no tangent
        "first bias and later",  # the first weight has no tangent, its bias has
        "last layer",  # earlier layers carry no tangents at all
    ],
)
@pytest.mark.parametrize("num_cols", [1, 3])
def test_forward_mode_matches_reverse_mode(trainable, num_cols):
    manual_seed(0)
    model = _model()
    named = list(model.named_parameters())
    if trainable == "weights only":
        named = [(n, p) for n, p in named if n.endswith("weight")]
    elif trainable == "first bias and later":
        named = named[1:]
    elif trainable == "last layer":
        named = named[-2:]
    params = [p for _, p in named]
    X = rand(5, 6, dtype=float64)
    M = [randn(num_cols, *p.shape, dtype=float64) for p in params]
    f, _ = make_functional_model_and_loss(model, None, tuple(params))

    out_rev, JM_rev = jvp(lambda *_: model(X), params, M, forward_mode=False)
    out_fwd, JM_fwd = jvp(
        lambda *ps: f(*ps, X), params, M, True, fast_rule_layers(model)
    )
    out_plain, JM_plain = jvp(lambda *ps: f(*ps, X), params, M, True)
    assert_close(out_fwd, out_rev)
    assert_close(JM_fwd, JM_rev)
    assert_close(JM_plain, JM_rev)
    assert all("forward" not in vars(m) for m in model.modules())  # patch undone


def test_lean_rules_leave_replaced_forward_methods_alone():
    """A layer whose ``forward`` the user replaced keeps it in forward mode."""
    manual_seed(0)
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2)).to(float64)
    model[2].forward = lambda x: 2 * linear(x, model[2].weight, model[2].bias)
    params = list(model.parameters())
    X = rand(5, 3, dtype=float64)
    M = [randn(1, *p.shape, dtype=float64) for p in params]
    f, _ = make_functional_model_and_loss(model, None, tuple(params))
    layers = fast_rule_layers(model)
    assert layers == [model[0], model[2]]
    out_fwd, JM_fwd = jvp(lambda *ps: f(*ps, X), params, M, True, layers)
    out_rev, JM_rev = jvp(lambda *_: model(X), params, M, forward_mode=False)
    assert_close(out_fwd, out_rev)
    assert_close(JM_fwd, JM_rev)


@pytest.mark.parametrize("architecture", ["mlp", "transformer"])
@pytest.mark.parametrize(
    "operator", [HessianLinearOperator, GGNLinearOperator, JacobianLinearOperator]
)
def test_products_compile_without_graph_breaks(architecture, operator):
    """With autograd ops traced, dynamo captures a whole product in one graph.

    The transformer also checks that compiled code, which cannot fall back, uses
    attention kernels with the derivatives the product needs.
    """
    model, loss_func, params, data = Case(architecture, "mse").make()
    args = (
        (model, params)
        if operator is JacobianLinearOperator
        else (model, loss_func, params)
    )
    op = operator(*args, data[:1], check_deterministic=False)
    v = randn(op.shape[1], dtype=float64)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda v: op @ v)(v)
        compiled = torch.compile(lambda v: op @ v, backend="aot_eager")(v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_close(compiled, op @ v)


@cache
def _cnn_dense(name: str) -> torch.Tensor:
    """Dense matrix of an operator on the CNN case (computed once)."""
    model, loss_func, params, data = Case("cnn", "ce").make()
    if name == "HessianLinearOperator":
        return functorch_hessian(model, loss_func, params, data)
    if name == "GGNLinearOperator":
        return functorch_ggn(model, loss_func, params, data)
    J = functorch_jacobian(model, params, data)
    return J if name == "JacobianLinearOperator" else J.T


def _column_policy(op):
    return op._mp.modes.columns  # of the per-batch product


@pytest.mark.parametrize("force", ["batched", "loop", None])
@pytest.mark.parametrize(
    "operator",
    [
        HessianLinearOperator,
        GGNLinearOperator,
        JacobianLinearOperator,
        TransposedJacobianLinearOperator,
    ],
)
def test_columns_batched_or_looped_match_dense(operator, force):
    """Each way of treating columns gives the dense reference's products."""
    model, loss_func, params, data = Case("cnn", "ce").make()
    if operator in (JacobianLinearOperator, TransposedJacobianLinearOperator):
        op = operator(model, params, data, check_deterministic=False)
    else:
        op = operator(model, loss_func, params, data, check_deterministic=False)
    dense = _cnn_dense(operator.__name__)
    policy = _column_policy(op)
    policy.force = force
    M = random_columns(op.shape[1], 3, op)
    for _ in range(3):  # warm-up and two measurements, unless forced
        assert_close(op @ M, dense @ M)
    if force is None:  # measured per kind of pass, for 3 columns
        assert {num_cols for _, num_cols in policy._votes} == {3}
        assert all(len(votes) == 3 for votes in policy._votes.values())
    else:
        assert all(votes == [] for votes in policy._votes.values())
