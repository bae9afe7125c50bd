"""Tests for curvlinops._torch_base: formats, algebra, SciPy export, data loop."""

import numpy
import pytest
from scipy.sparse.linalg import eigsh
from torch import (
    Tensor,
    cat,
    eye,
    float32,
    float64,
    manual_seed,
    rand,
    randn,
    zeros,
)
from torch.nn import Dropout, Linear, MSELoss, Sequential
from torch.utils.data import DataLoader, TensorDataset

from curvlinops import (
    CurvatureLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    PyTorchLinearOperator,
)
from curvlinops._algebra import (
    _ChainPyTorchLinearOperator,
    _ScaledPyTorchLinearOperator,
    _SumPyTorchLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator
from curvlinops.examples.functorch import (
    functorch_gradient_and_loss,
    functorch_hessian,
)
from test.cases import Case
from test.utils import assert_close, compare_matmat


def _dense(rows, cols, seed=0):
    manual_seed(seed)
    return randn(rows, cols, dtype=float64)


class _ListFormatMatrix(PyTorchLinearOperator):
    """A dense matrix acting between spaces with a multi-tensor list format."""

    def __init__(self, A, in_shape, out_shape):
        self.tensor = A
        super().__init__(in_shape, out_shape)

    device = property(lambda self: self.tensor.device)
    dtype = property(lambda self: self.tensor.dtype)

    def _matmat(self, M):
        num_cols = M[0].shape[-1]
        flat = self.tensor @ cat([m.reshape(-1, num_cols) for m in M])
        rows = flat.split([s.numel() for s in self._out_shape])
        return [r.reshape(*s, num_cols) for r, s in zip(rows, self._out_shape)]

    def _adjoint(self):
        return _ListFormatMatrix(self.tensor.T, self._out_shape, self._in_shape)


def test_tensor_operator_all_formats():
    A = _dense(5, 4)
    compare_matmat(TensorLinearOperator(A), A)


def test_tensor_list_format_with_several_tensors():
    A = _dense(6, 7)
    op = _ListFormatMatrix(A, [(2, 2), (3,)], [(2, 3), (0,)])
    compare_matmat(op, A)


def test_algebra_matches_dense():
    A, B, C = _dense(4, 4, 0), _dense(4, 4, 1), _dense(4, 3, 2)
    opA, opB, opC = (TensorLinearOperator(x) for x in (A, B, C))
    compare_matmat(opA + opB, A + B)
    compare_matmat(opA - opB, A - B)
    compare_matmat(3 * opA, 3 * A)
    compare_matmat(opA * 3, 3 * A)
    compare_matmat(opA / 4, A / 4)
    compare_matmat(-opA, -A)
    compare_matmat(opA @ opB @ opC, A @ B @ C)
    compare_matmat((opA + 2 * opB) @ opC - opB @ opC / 2, (A + 2 * B) @ C - B @ C / 2)
    compare_matmat((opA @ opC).adjoint(), (A @ C).T)


class _PassThrough(PyTorchLinearOperator):
    """The identity, returning its input tensors themselves (no copy)."""

    SELF_ADJOINT = True

    def __init__(self, dim):
        super().__init__([(dim,)], [(dim,)], device="cpu", dtype=float64)

    def _matmat(self, M):
        return M


def test_algebra_does_not_modify_operand_products_in_place():
    """Composites must not write into tensors an operand hands back."""
    A = _dense(4, 4)
    P, opA = _PassThrough(4), TensorLinearOperator(A)
    V = _dense(4, 3, seed=5)
    V_before = V.clone()
    assert_close((P + opA + P) @ V, 2 * V_before + A @ V_before)
    assert_close((3 * P) @ V, 3 * V_before)
    assert_close((P - opA) @ [V], [V_before - A @ V_before])
    assert_close(V, V_before)


def test_algebra_folds_scales_and_flattens_chains_and_sums():
    opA, opB = (
        TensorLinearOperator(_dense(3, 3, 0)),
        TensorLinearOperator(_dense(3, 3, 1)),
    )
    scaled = 2 * (3 * opA)
    assert isinstance(scaled, _ScaledPyTorchLinearOperator)
    assert scaled._scale == 6 and scaled._operators == [opA]
    chain = opA @ (opB @ opA) @ opB
    assert isinstance(chain, _ChainPyTorchLinearOperator)
    assert chain._operators == [opA, opB, opA, opB]
    total = opA + (opB + opA)
    assert isinstance(total, _SumPyTorchLinearOperator) and len(total._operators) == 3


def test_algebra_self_adjointness_propagates():
    model, loss_func, params, data = Case("mlp", "mse").make()
    H = HessianLinearOperator(model, loss_func, params, data)
    G = GGNLinearOperator(model, loss_func, params, data)
    assert (H + 2 * G).adjoint() is not None and (H + 2 * G).SELF_ADJOINT
    assert not (H @ G).SELF_ADJOINT
    dense_H = functorch_hessian(model, loss_func, params, data)
    compare_matmat(H - H / 2, dense_H / 2)


def test_algebra_rejects_mismatches():
    opA, opB = TensorLinearOperator(_dense(3, 3)), TensorLinearOperator(_dense(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        _ = opA + opB
    with pytest.raises(ValueError, match="chain"):
        _ = opA @ opB
    op32 = TensorLinearOperator(_dense(3, 3).to(float32))
    with pytest.raises(ValueError, match="dtype"):
        _ = opA + op32
    with pytest.raises(TypeError):
        _ = opA * opA
    with pytest.raises(TypeError):
        _ = opA + 1.0
    with pytest.raises(ZeroDivisionError):
        _ = opA / 0


def test_matmul_rejects_bad_inputs():
    op = TensorLinearOperator(_dense(3, 2))
    with pytest.raises(ValueError, match=r"Expected a vector of shape \[2\]"):
        op @ zeros(3, dtype=float64)
    with pytest.raises(ValueError, match="Expected dtype torch.float64"):
        op @ zeros(2, dtype=float32)
    with pytest.raises(ValueError, match="Expected 1 tensors"):
        op @ [zeros(2, dtype=float64), zeros(2, dtype=float64)]
    with pytest.raises(ValueError, match="shapes"):
        op @ [zeros(3, dtype=float64)]
    with pytest.raises(TypeError, match="Expected a torch.Tensor"):
        op @ "a string"
    with pytest.raises(ValueError, match=r"Expected a vector of shape \[3\]"):
        zeros(2, dtype=float64) @ op


def test_numpy_input_is_converted_to_operator_dtype():
    A = _dense(3, 3).to(float32)
    x = numpy.arange(3, dtype=numpy.float64)
    result = TensorLinearOperator(A) @ x
    assert isinstance(result, numpy.ndarray) and result.dtype == numpy.float32
    assert_close(result, (A @ Tensor(x)).numpy(), rtol=1e-6)


def test_to_scipy_eigsh_finds_top_eigenvalues():
    A = _dense(20, 20)
    A = A @ A.T
    expected = numpy.linalg.eigvalsh(A.numpy())[-3:]
    scipy_op = TensorLinearOperator(A).to_scipy()
    assert scipy_op.dtype == numpy.float64
    computed = eigsh(scipy_op, k=3, which="LA", return_eigenvectors=False)
    assert_close(numpy.sort(computed), expected)
    assert TensorLinearOperator(A).to_scipy(numpy.float32).dtype == numpy.float32


def test_identity_operator():
    identity = IdentityLinearOperator([(2, 3), (4,)], "cpu", float64)
    compare_matmat(identity, eye(10, dtype=float64))


# CurvatureLinearOperator


def test_curvature_operator_requires_matmat_batch():
    model, loss_func, params, data = Case("mlp", "mse").make()
    op = CurvatureLinearOperator(
        model, loss_func, params, data, check_deterministic=False
    )
    with pytest.raises(NotImplementedError, match="_matmat_batch"):
        op @ zeros(op.shape[1], dtype=float64)


def test_gradient_and_loss_match_functorch():
    case = Case("dict_input", "ce", "mean")
    model, loss_func, params, data = case.make()
    H = HessianLinearOperator(model, loss_func, params, data, **case.kwargs())
    gradient, loss = H.gradient_and_loss()
    expected_grad, expected_loss = functorch_gradient_and_loss(
        model, loss_func, params, data, case.input_key
    )
    assert_close(loss, expected_loss)
    assert_close(gradient, expected_grad)


def test_num_data_is_inferred_and_can_be_given():
    model, loss_func, params, data = Case("mlp", "mse").make()
    H = HessianLinearOperator(model, loss_func, params, data)
    assert H._num_data == sum(X.shape[0] for X, _ in data)
    H_given = HessianLinearOperator(
        model,
        loss_func,
        params,
        data,
        num_data=H._num_data,
        check_deterministic=False,
    )
    v = rand(H.shape[1], dtype=float64)
    assert_close(H_given @ v, H @ v)


def test_dataloader_and_progressbar(capsys):
    model, loss_func, params, data = Case("mlp", "mse").make()
    X = data[0][0].new_tensor(numpy.random.default_rng(0).random((7, 5)))
    y = zeros(7, 3, dtype=float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    H = HessianLinearOperator(model, loss_func, params, loader, progressbar=True)
    H_dense = functorch_hessian(model, loss_func, params, list(loader))
    assert_close(H @ eye(H.shape[1], dtype=float64), H_dense)
    assert "matmat" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"params": []}, ValueError, "empty"),
        ({"params": "weights"}, TypeError, "list of tensors"),
        ({"data": []}, ValueError, "empty"),
        ({"data": [("X", "y")]}, TypeError, "Inputs X"),
        ({"data": [({"x": zeros(2, 5)}, zeros(2, 3))]}, ValueError, "batch_size_fn"),
        ({"loss_func": MSELoss(reduction="none")}, ValueError, "reduction"),
        ({"num_data": 0}, ValueError, "num_data"),
        ({"data": "generator"}, TypeError, "iterable more than once"),
        ({"params": "duplicate"}, ValueError, r"params\[1\] appears twice"),
        ({"data": "nan"}, RuntimeError, "inputs of batch 0 contain NaN"),
        ({"num_data": 100}, ValueError, "num_data=100. was given, but the data"),
    ],
)
def test_curvature_operator_rejects_bad_input(kwargs, error, match):
    model, loss_func, params, data = Case("mlp", "mse").make()
    special = {
        "generator": (batch for batch in data),
        "duplicate": [params[0], params[0]],
        "nan": [(X * float("nan"), y) for X, y in data],
    }
    kwargs = {
        key: special[value] if isinstance(value, str) and value in special else value
        for key, value in kwargs.items()
    }
    args = {"model_func": model, "loss_func": loss_func, "params": params, "data": data}
    with pytest.raises(error, match=match):
        HessianLinearOperator(**{**args, **kwargs})


def test_params_must_require_grad_and_share_dtype():
    model, loss_func, params, data = Case("mlp", "mse").make()
    frozen = [params[0].detach()] + params[1:]
    with pytest.raises(ValueError, match="require grad"):
        HessianLinearOperator(model, loss_func, frozen, data)
    mixed = [params[0].float().detach().requires_grad_()] + params[1:]
    with pytest.raises(ValueError, match="one dtype"):
        HessianLinearOperator(model, loss_func, mixed, data)


def test_block_sizes_only_where_supported():
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="does not support `block_sizes`"):
        GGNLinearOperator(model, loss_func, params, data, block_sizes=[len(params)])


def test_determinism_probe_catches_shuffled_data():
    manual_seed(0)
    model = Linear(5, 3).double()
    dataset = TensorDataset(rand(12, 5, dtype=float64), rand(12, 3, dtype=float64))
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="changed between two passes"):
        HessianLinearOperator(model, MSELoss(), params, loader)
    # without the probe, the operator is built (and would be silently wrong)
    HessianLinearOperator(model, MSELoss(), params, loader, check_deterministic=False)


def test_determinism_probe_catches_dropout_in_train_mode():
    manual_seed(0)
    model = Sequential(Linear(5, 4), Dropout(0.5), Linear(4, 3)).double().train()
    data = [(rand(6, 5, dtype=float64), rand(6, 3, dtype=float64))]
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="predictions of batch 0 changed"):
        GGNLinearOperator(model, MSELoss(), params, data)
    GGNLinearOperator(model.eval(), MSELoss(), params, data)  # eval mode is fine


def test_determinism_probe_catches_changing_number_of_batches():
    class GrowingData:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            batch = (rand(2, 5, dtype=float64), rand(2, 3, dtype=float64))
            return iter([batch] * self.passes)

    model = Linear(5, 3).double()
    with pytest.raises(RuntimeError, match="batches"):
        HessianLinearOperator(
            model, MSELoss(), list(model.parameters()), GrowingData(), num_data=2
        )
