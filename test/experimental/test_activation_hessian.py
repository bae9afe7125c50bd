"""Tests for curvlinops.experimental.activation_hessian."""

import numpy
import pytest
from torch import float32, float64, manual_seed, rand
from torch.autograd import grad
from torch.func import hessian
from torch.nn import BatchNorm1d, Linear, Module, MSELoss, ReLU, Sequential
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from curvlinops.experimental import ActivationHessianLinearOperator
from curvlinops.experimental.activation_hessian import store_activation
from test.cases import CASES, Case
from test.faults import assert_same_state, model_state
from test.utils import assert_close, compare_matmat

SEQUENTIAL = {"mlp", "cnn", "sequence", "batchnorm_eval"}
SEQUENTIAL_CASES = [c for c in CASES if c.architecture in SEQUENTIAL]


def split_reference(head, tail, loss_func, X, y):
    """Dense Hessian of z -> loss(tail(z), y) at z = head(X)."""
    z = head(X).detach()
    with sdpa_kernel(SDPBackend.MATH):
        H = hessian(lambda z: loss_func(tail(z), y))(z)
    return H.reshape(z.numel(), z.numel())


@pytest.mark.parametrize("case", SEQUENTIAL_CASES, ids=[c.id for c in SEQUENTIAL_CASES])
def test_activation_hessian_of_sequential_models(case: Case):
    """Hessian w.r.t. the output of layer 1, named as input of layer 2 or output."""
    io = "input" if case.reduction == "mean" else "output"
    model, loss_func, _, data = case.make()
    X, y = data[0]
    layer = "2" if io == "input" else "1"
    H = ActivationHessianLinearOperator(model, loss_func, (layer, io, 0), [(X, y)])
    compare_matmat(H, split_reference(model[:2], model[2:], loss_func, X, y))


def test_activation_hessian_with_dict_input():
    case = Case("dict_input", "ce", "sum")
    model, loss_func, _, data = case.make()
    X, y = data[0]
    H = ActivationHessianLinearOperator(
        model, loss_func, ("net.0", "output", 0), [(X, y)], **case.kwargs()
    )
    head = lambda X: model.net[0](X["x"] * X["scale"])  # noqa: E731
    compare_matmat(H, split_reference(head, model.net[1:], loss_func, X, y))


def test_activation_hessian_through_attention():
    """Differentiating through the fused attention kernel needs the fallback."""
    model, loss_func, _, data = Case("transformer", "mse").make()
    X, y = data[0]
    H = ActivationHessianLinearOperator(
        model, loss_func, ("qkv", "output", 0), [(X, y)]
    )

    def tail(qkv_out):  # the rest of TinyTransformer.forward
        h = model.embed(X)
        batch, seq, dim = h.shape
        qkv = qkv_out.reshape(batch, seq, 3, model.heads, dim // model.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return model.out(h + attended.reshape(batch, seq, dim)).mean(1)

    head = lambda X: model.qkv(model.embed(X))  # noqa: E731
    compare_matmat(H, split_reference(head, tail, loss_func, X, y))


def test_activation_hessian_of_numpy_input_in_float32():
    """NumPy input is converted to the operator's dtype (here float32)."""
    manual_seed(0)
    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2))
    data = [(rand(6, 4), rand(6, 2))]
    H_in = ActivationHessianLinearOperator(model, MSELoss(), ("1", "input", 0), data)
    H_out = ActivationHessianLinearOperator(model, MSELoss(), ("0", "output", 0), data)
    assert H_in.dtype == float32 and H_in.shape == (18, 18)
    identity = numpy.eye(18)
    assert numpy.allclose(H_in @ identity, H_out @ identity)


def test_activation_hessian_gradient_and_loss():
    model, loss_func, _, data = Case("mlp", "ce").make()
    X, y = data[0]
    H = ActivationHessianLinearOperator(model, loss_func, ("1", "output", 0), [(X, y)])
    gradient, loss = H.gradient_and_loss()
    z = model[:2](X).detach().requires_grad_(True)
    expected_loss = loss_func(model[2:](z), y)
    assert_close(loss, expected_loss)
    assert_close(gradient, grad(expected_loss, z))


@pytest.mark.parametrize(
    "activation, match",
    [
        (("3", "input", 0), "available names: \\['', '0', '1', '2'\\]"),
        (("1", "outputs", 0), "'input' or 'output'"),
        (("1", "input", -1), "non-negative integer"),
        (("1", "input", 1), "no tensor at index 1"),
        (("1", "input"), "layer_name"),
    ],
)
def test_activation_hessian_rejects_invalid_activation(activation, match):
    model, loss_func, _, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match=match):
        ActivationHessianLinearOperator(model, loss_func, activation, data[:1])


def test_activation_hessian_rejects_several_batches():
    model, loss_func, _, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="exactly one mini-batch.*holds 2"):
        ActivationHessianLinearOperator(model, loss_func, ("1", "input", 0), data)


def test_activation_hessian_rejects_layer_that_does_not_run_once():
    """A layer used twice (weight sharing) has no single output to differentiate."""
    manual_seed(0)
    shared = Linear(3, 3)
    model = Sequential(shared, ReLU(), shared)
    data = [(rand(4, 3), rand(4, 3))]
    with pytest.raises(ValueError, match="exactly once.*2 times"):
        ActivationHessianLinearOperator(model, MSELoss(), ("0", "output", 0), data)


def test_activation_hessian_rejects_non_module_model():
    model, loss_func, _, data = Case("mlp", "mse").make()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ActivationHessianLinearOperator(
            lambda X: model(X), loss_func, ("", "input", 0), data[:1]
        )


class _TwoOutputs(Module):
    def forward(self, x):
        return x.sin(), x.cos()


def test_store_activation_records_inputs_and_outputs_while_active():
    manual_seed(0)
    model = Sequential(Linear(4, 3), _TwoOutputs())
    X, stored = rand(2, 4), []
    with store_activation(model, "1", "output", 1, stored):
        model(X)
        model(X)
    model(X)  # the hook is removed on exit
    hidden = model[0](X)
    assert len(stored) == 2
    assert_close(stored[0], hidden.cos()) and not stored[0].requires_grad
    stored.clear()
    with store_activation(model, "1", "input", 0, stored):
        model(X)
    assert_close(stored[0], hidden)
    assert store_activation.SUPPORTED_IO_TYPES == {"input", "output"}
    with pytest.raises(ValueError, match="'input' or 'output'"):
        store_activation(model, "1", "inputs", 0, stored)
    with pytest.raises(ValueError, match="No layer named '2'"):
        store_activation(model, "2", "input", 0, stored)
    with pytest.raises(ValueError, match="no tensor at index 2"):  # noqa: PT012
        with store_activation(model, "1", "output", 2, stored):
            model(X)


def test_activation_hessian_shape_keyword():
    """Spec 003's ``shape=`` is checked against the feature's size."""
    model, loss_func, _, data = Case("mlp", "mse").make()
    data = data[:1]
    H = ActivationHessianLinearOperator(
        model, loss_func, ("1", "input", 0), data, shape=(12, 12)
    )
    assert H.shape == (12, 12)  # batch size 3 times 4 features
    with pytest.raises(ValueError, match="shape"):
        ActivationHessianLinearOperator(
            model, loss_func, ("1", "input", 0), data, shape=(11, 11)
        )


def test_activation_hessian_leaves_train_mode_statistics_unchanged():
    """Locating the feature (a forward pass at construction) restores BatchNorm's."""
    manual_seed(0)
    model = Sequential(Linear(3, 4), BatchNorm1d(4), ReLU(), Linear(4, 2)).double()
    data = [(rand(5, 3, dtype=float64), rand(5, 2, dtype=float64))]
    before = model_state(model.train())
    H = ActivationHessianLinearOperator(model, MSELoss(), ("2", "output", 0), data)
    H @ rand(H.shape[1], dtype=float64)
    assert_same_state(before, model_state(model))
