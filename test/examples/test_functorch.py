"""Tests for the dense references in curvlinops.examples.functorch.

They are checked against closed forms for a linear model ``f(x) = W x``.
"""

import pytest
from torch import (
    einsum,
    eye,
    float64,
    manual_seed,
    no_grad,
    rand,
    randint,
    randn,
    stack,
)
from torch.autograd import grad
from torch.func import functional_call, hessian
from torch.nn import (
    BatchNorm1d,
    CrossEntropyLoss,
    LayerNorm,
    Linear,
    MSELoss,
    Sequential,
    Tanh,
)
from torch.nn.functional import one_hot
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from curvlinops.examples.functorch import (
    blocks_to_matrix,
    functorch_empirical_fisher,
    functorch_hessian,
    functorch_jacobian,
)
from test.cases import Case, Permute
from test.utils import assert_close

N, S, D_IN, C = 4, 3, 2, 3


def linear_problem():
    manual_seed(0)
    model = Linear(D_IN, C, bias=False).to(float64)
    X = rand(N, S, D_IN, dtype=float64)  # sequence inputs: outputs [N, S, C]
    return model, X


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_square_loss(reduction: str):
    """Term (n, s) has gradient 2 (W x_ns - y_ns) x_ns^T; 'mean' averages N S C."""
    model, X = linear_problem()
    y = rand(N, S, C, dtype=float64)
    residual = model(X).detach() - y
    grads = einsum("nsc,nsj->nscj", 2 * residual, X).reshape(N * S, C * D_IN)
    scale = 1 / (N * S * C) if reduction == "mean" else 1.0
    data = [(X[:1], y[:1]), (X[1:], y[1:])]
    E = functorch_empirical_fisher(
        model, MSELoss(reduction=reduction), [model.weight], data
    )
    assert_close(E, scale * grads.T @ grads)


def test_empirical_fisher_cross_entropy_on_sequences():
    """Outputs [N, C, S]: term (n, s) has gradient (softmax - onehot) x_ns^T."""
    model, X = linear_problem()
    y = randint(0, C, (N, S))
    probs = model(X).detach().softmax(-1)
    residual = probs - one_hot(y, C).to(float64)
    grads = einsum("nsc,nsj->nscj", residual, X).reshape(N * S, C * D_IN)
    E = functorch_empirical_fisher(
        Sequential(model, Permute()), CrossEntropyLoss(), [model.weight], [(X, y)]
    )
    assert_close(E, grads.T @ grads / (N * S))


def test_jacobian_rows_are_ordered_by_datum_then_output_entry():
    """The derivative of f[n, s, c] w.r.t. W[c', j] is delta(c, c') x[n, s, j]."""
    model, X = linear_problem()
    data = [(X[:3], None), (X[3:], None)]
    J = functorch_jacobian(model, [model.weight], data)
    expected = einsum("nsj,cd->nscdj", X, eye(C, dtype=float64))
    assert_close(J, expected.reshape(N * S * C, C * D_IN))


def _normalized_model(norm: str) -> Sequential:
    """A net with LayerNorm (scale, shift off 1 and 0) or train-mode BatchNorm."""
    manual_seed(0)
    layer = LayerNorm(4) if norm == "layernorm" else BatchNorm1d(4)
    model = Sequential(Linear(3, 4), layer, Tanh(), Linear(4, 2)).to(float64)
    with no_grad():
        layer.weight.add_(0.3 * randn(4, dtype=float64))
        layer.bias.add_(0.3 * randn(4, dtype=float64))
    return model.train()


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm_train"])
def test_hessian_agrees_with_finite_differences_through_normalization(norm: str):
    """torch.func's Hessians through layer_norm and batch_norm are wrong (torch 2.13).

    The reference differentiates with plain autograd; central differences of the
    autograd gradient confirm it (and running statistics stay as they were).
    """
    model = _normalized_model(norm)
    X, y = rand(6, 3, dtype=float64), randint(0, 2, (6,))
    params, loss_func = list(model.parameters()), CrossEntropyLoss()
    buffers = [b.clone() for b in model.buffers()]
    H = functorch_hessian(model, loss_func, params, [(X, y)])
    assert all(b.equal(saved) for b, saved in zip(model.buffers(), buffers))

    def gradient(theta):
        with no_grad():
            vector_to_parameters(theta, params)
        return parameters_to_vector(grad(loss_func(model(X), y), params))

    theta, eps = parameters_to_vector(params).detach(), 1e-6
    columns = [
        (gradient(theta + eps * e) - gradient(theta - eps * e)) / (2 * eps)
        for e in eye(theta.numel(), dtype=float64)
    ]
    vector_to_parameters(theta, params)
    assert_close(H, stack(columns), rtol=1e-7, atol=1e-8)


def test_blocks_to_matrix_assembles_torch_func_hessians():
    """The nested blocks of ``torch.func.hessian`` form the Hessian matrix."""
    case = Case("cnn", "mse", "sum")
    model, loss_func, params, data = case.make()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ((X, y), *_) = data

    def loss(p: dict):
        return loss_func(functional_call(model, p, (X,)), y)

    blocks = hessian(loss)(dict(zip(names, params)))
    expected = functorch_hessian(model, loss_func, params, [(X, y)])
    assert_close(blocks_to_matrix(blocks), expected)
    with pytest.raises(ValueError, match="keys"):
        blocks_to_matrix({"a": {"a": eye(2)}, "b": {"b": eye(2)}})
    with pytest.raises(ValueError, match="not square"):
        blocks_to_matrix({"a": {"a": eye(2)[:, :1]}})
