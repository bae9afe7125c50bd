"""Tests for curvlinops._torch_base: formats, algebra, SciPy, data loop, copies."""

import pickle
from copy import deepcopy

import numpy
import pytest
from scipy.sparse.linalg import aslinearoperator, eigsh
from torch import (
    Tensor,
    allclose,
    cat,
    complex128,
    equal,
    eye,
    float32,
    float64,
    int64,
    manual_seed,
    no_grad,
    rand,
    randn,
    zeros,
)
from torch.autograd import grad
from torch.nn import Dropout, Linear, MSELoss, Sequential
from torch.utils.data import DataLoader, TensorDataset

from curvlinops import (
    CGInverseLinearOperator,
    CurvatureLinearOperator,
    DiagonalLinearOperator,
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    PyTorchLinearOperator,
    SubmatrixLinearOperator,
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
from curvlinops.experimental import ActivationHessianLinearOperator
from test.cases import Case
from test.utils import assert_close, batched_columns, compare_matmat


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
    with pytest.raises(ValueError, match="Expected dtype torch.float32"):
        TensorLinearOperator(_dense(3, 2).float()) @ zeros(2, dtype=float64)
    with pytest.raises(ValueError, match="Expected dtype torch.float64"):
        op @ zeros(2, dtype=int64)
    with pytest.raises(ValueError, match="Expected dtype torch.float64"):
        op @ [zeros(2, dtype=complex128)]
    with pytest.raises(ValueError, match="Expected device cpu"):
        op @ zeros(2, dtype=float64, device="meta")
    with pytest.raises(ValueError, match="Expected 1 tensors"):
        op @ [zeros(2, dtype=float64), zeros(2, dtype=float64)]
    with pytest.raises(ValueError, match="shapes"):
        op @ [zeros(3, dtype=float64)]
    with pytest.raises(TypeError, match="Expected a torch.Tensor"):
        op @ "a string"
    with pytest.raises(ValueError, match=r"Expected a vector of shape \[3\]"):
        zeros(2, dtype=float64) @ op


def _upcast_operators() -> dict:
    """One float64 operator of every kind: curvature, KFAC, inverses, structured."""
    model, loss_func, params, data = Case("mlp", "mse").make()
    kfac = KFACLinearOperator(model, loss_func, params, data)
    spd = _dense(4, 4) @ _dense(4, 4).T + eye(4, dtype=float64)
    return {
        "hessian": HessianLinearOperator(model, loss_func, params, data),
        "ggn": GGNLinearOperator(model, loss_func, params, data),
        "ef": EFLinearOperator(model, loss_func, params, data),
        "jacobian": JacobianLinearOperator(model, params, data),
        "kfac": kfac,
        "ekfac": EKFACLinearOperator(model, loss_func, params, data),
        "kfac_inverse": KFACInverseLinearOperator(kfac, damping=1e-2),
        "cg_inverse_of_scipy": CGInverseLinearOperator(aslinearoperator(spd.numpy())),
        "diagonal": DiagonalLinearOperator(rand(5, dtype=float64)),
        "sum": TensorLinearOperator(spd) + 2 * TensorLinearOperator(spd),
    }


def test_lossless_dtypes_are_cast_up_by_every_operator_kind():
    """laplace-torch multiplies float64 operators onto ``torch.eye`` in float32."""
    for name, op in _upcast_operators().items():
        M = rand(op.shape[1], 2, dtype=float64).float()  # exact in both dtypes
        expected = op @ M.double()
        for X, result in [(M, op @ M), (M[:, 0], op @ M[:, 0])]:
            assert result.dtype == float64, name
            assert_close(result, expected if X.ndim == 2 else expected[:, 0])
    op = _ListFormatMatrix(_dense(5, 5), [(2, 2), (1,)], [(5,)])
    M = rand(5, 3, dtype=float64).float()
    result = op @ [M[:4].reshape(2, 2, 3), M[4:]]
    assert result[0].dtype == float64
    assert_close(result[0], _dense(5, 5) @ M.double())
    half = TensorLinearOperator(_dense(3, 3).float())
    assert_close(half @ M[:3].half(), half.tensor @ M[:3].half().float())


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
        CurvatureLinearOperator(
            model, loss_func, params, data, block_sizes=[len(params)]
        )


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


# Members that curvlinops 3.x subclasses and utilities rely on


def test_flattened_shapes():
    A = _ListFormatMatrix(_dense(7, 10), [(2, 3), (4,)], [(7,)])
    assert A._in_shape_flat == [6, 4] and A._out_shape_flat == [7]
    model, loss_func, params, data = Case("cnn", "mse").make()
    H = HessianLinearOperator(model, loss_func, params, data)
    assert H._in_shape_flat == H._out_shape_flat == [p.numel() for p in params]


def test_number_of_data_under_3x_name():
    model, loss_func, params, data = Case("mlp", "mse").make()
    H = HessianLinearOperator(model, loss_func, params, data)
    num_data = sum(X.shape[0] for X, _ in data)
    assert H._N_data == H._num_data == num_data
    v = rand(H.shape[1], dtype=float64)
    Hv = H @ v
    H._N_data = 2 * num_data  # the 'mean' weights |B| / N follow
    assert H._num_data == 2 * num_data
    assert_close(H @ v, Hv / 2)


class _GradientInnerProducts(CurvatureLinearOperator):
    """A 3.x-style subclass: ``M -> g^T M``, one output row, via the shape hooks."""

    def _get_out_shape(self):
        return [(1,)]

    def _matmat_batch(self, X, y, M):
        gradient = grad(self._loss_func(self._model_func(X), y), self._params)
        return [sum((g.unsqueeze(-1) * m).flatten(end_dim=-2).sum(0, keepdim=True)
                    for g, m in zip(gradient, M))]  # fmt: skip


class _SummedHessian(HessianLinearOperator):
    """A 3.x-style subclass that overrides the normalization of 'mean' losses."""

    def _get_normalization_factor(self, X, y):
        return 1.0


def test_base_class_calls_the_3x_hooks():
    """Overriding ``_get_out_shape`` or ``_get_normalization_factor`` takes effect."""
    model, _, params, data = Case("mlp", "mse").make()
    loss_func = MSELoss(reduction="mean")
    op = _GradientInnerProducts(model, loss_func, params, data)
    num_params = sum(p.numel() for p in params)
    assert op.shape == (1, num_params) and op._out_shape_flat == [1]
    gradient, _ = functorch_gradient_and_loss(model, loss_func, params, data)
    v = rand(num_params, dtype=float64)
    assert_close(op @ v, (cat([g.flatten() for g in gradient]) @ v).reshape(1))

    H, H_summed = (
        cls(model, loss_func, params, data)
        for cls in (HessianLinearOperator, _SummedHessian)
    )
    sizes = [X.shape[0] for X, _ in data]
    # Hessians of the batch losses, each with its own 'mean'
    per_batch = [functorch_hessian(model, loss_func, params, [b]) for b in data]
    compare_matmat(H_summed, sum(per_batch))
    compare_matmat(H, sum(n / sum(sizes) * h for n, h in zip(sizes, per_batch)))
    _, loss = H_summed.gradient_and_loss()  # the hook also scales the loss
    assert_close(loss, sum(loss_func(model(X), y) for X, y in data).detach())


def test_data_prediction_loss_gradient():
    """Per batch: data, predictions, and the batch's share of risk and gradient."""
    case = Case("dict_input", "ce", "mean")
    model, loss_func, params, data = case.make()
    H = HessianLinearOperator(model, loss_func, params, data, **case.kwargs())
    batches = list(H.data_prediction_loss_gradient())
    assert len(batches) == len(data)
    for ((X, y), prediction, _, _), (X_true, y_true) in zip(batches, data):
        assert X is X_true and y.equal(y_true)
        assert_close(prediction, model(X_true))
    gradient, loss = functorch_gradient_and_loss(
        model, loss_func, params, data, case.input_key
    )
    assert_close(sum(loss for *_, loss, _ in batches), loss)
    summed = [sum(gs) for gs in zip(*(g for *_, g in batches))]
    assert_close(summed, gradient)
    J = JacobianLinearOperator(model, params, data, **case.kwargs())
    for _, prediction, loss, gradient in J.data_prediction_loss_gradient():
        assert loss is None and gradient is None and prediction.ndim == 2


def test_shape_keyword_is_checked():
    """Spec 003's ``shape=``: the expected shape must be the operator's."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    dim = sum(p.numel() for p in params)
    for cls in (HessianLinearOperator, GGNLinearOperator, EFLinearOperator):
        assert cls(model, loss_func, params, data, shape=(dim, dim)).shape == (dim, dim)
        with pytest.raises(ValueError, match=f"shape=\\({dim}, {dim + 1}\\)"):
            cls(model, loss_func, params, data, shape=(dim, dim + 1))
    J = JacobianLinearOperator(model, params, data, shape=(15, dim))
    assert J.shape == (15, dim)  # 5 data, 3 outputs each
    with pytest.raises(ValueError, match="shape"):
        FisherMCLinearOperator(model, loss_func, params, data, shape=(1, 1))


def _identity(op):
    return IdentityLinearOperator(op._in_shape, op.device, op.dtype)


# Builders of every kind of operator from a model, loss, parameters and data.
COPYABLE = {
    "hessian": lambda m, f, p, d: HessianLinearOperator(m, f, p, d),
    "ggn": lambda m, f, p, d: GGNLinearOperator(m, f, p, d),
    "ef": lambda m, f, p, d: EFLinearOperator(m, f, p, d),
    "mc_fisher": lambda m, f, p, d: FisherMCLinearOperator(m, f, p, d),
    "jacobian": lambda m, f, p, d: JacobianLinearOperator(m, p, d),
    "jacobian_t": lambda m, f, p, d: JacobianLinearOperator(m, p, d).adjoint(),
    "kfac": lambda m, f, p, d: KFACLinearOperator(m, f, p, d),
    "ekfac": lambda m, f, p, d: EKFACLinearOperator(m, f, p, d),
    "kfac_inverse": lambda m, f, p, d: KFACLinearOperator(m, f, p, d).inverse(
        damping=1e-2
    ),
    "ekfac_inverse": lambda m, f, p, d: EKFACLinearOperator(m, f, p, d).inverse(
        damping=1e-2
    ),
    "kfoc": lambda m, f, p, d: KFOCLinearOperator(m, f, p, d),
    "kfoc_inverse": lambda m, f, p, d: KFOCLinearOperator(m, f, p, d).inverse(
        damping=1e-2
    ),
    "activation_hessian": lambda m, f, p, d: ActivationHessianLinearOperator(
        m, f, ("1", "output", 0), d[:1]
    ),
    "cg": lambda m, f, p, d: CGInverseLinearOperator(
        (G := GGNLinearOperator(m, f, p, d)) + _identity(G)
    ),
    "lsmr": lambda m, f, p, d: LSMRInverseLinearOperator(
        JacobianLinearOperator(m, p, d), damp=1.0
    ),
    "neumann": lambda m, f, p, d: NeumannInverseLinearOperator(
        (G := GGNLinearOperator(m, f, p, d)) + _identity(G), num_terms=3, scale=0.5
    ),
    "submatrix": lambda m, f, p, d: SubmatrixLinearOperator(
        GGNLinearOperator(m, f, p, d), [0, 5, 2], [3, 1]
    ),
    "algebra": lambda m, f, p, d: (
        (2.0 * GGNLinearOperator(m, f, p, d) - HessianLinearOperator(m, f, p, d))
        @ EFLinearOperator(m, f, p, d)
    ),
    "tensor": lambda m, f, p, d: TensorLinearOperator(_dense(4, 3)),
    "ggn_diagonal": lambda m, f, p, d: GGNDiagonalLinearOperator(m, f, p, d),
    "ggn_diagonal_mc": lambda m, f, p, d: GGNDiagonalLinearOperator(
        m, f, p, d, mc_samples=2
    ),
    "neumann_preconditioned": lambda m, f, p, d: NeumannInverseLinearOperator(
        (G := GGNLinearOperator(m, f, p, d)) + _identity(G),
        num_terms=3,
        preconditioner=DiagonalLinearOperator([0.5 * q.detach() ** 2 for q in p]),
    ),
}


@pytest.mark.parametrize("name", COPYABLE)
def test_copies_and_pickles_multiply_like_the_original(name):
    """Deep copies and pickles of an operator used before give identical products.

    Lazily built helpers (closures over the model, cached inverses, the
    transpose) are rebuilt on use.
    """
    model, loss_func, params, data = Case("mlp", "ce").make()
    op = COPYABLE[name](model, loss_func, params, data)
    M = randn(op.shape[1], 2, dtype=float64)
    expected = op @ M
    for copied in (deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert equal(copied @ M, expected)
    assert equal(op @ M, expected)


def test_copy_with_its_model_computes_with_the_copied_model():
    """``deepcopy((model, G))``: the copy's products use the copied buffers."""
    model, loss_func, params, data = Case("batchnorm_eval", "ce").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    M = randn(G.shape[1], 2, dtype=float64)
    expected = G @ M
    model_copy, G_copy = deepcopy((model, G))
    with no_grad():
        model_copy[1].running_mean.add_(1.0)
    fresh = GGNLinearOperator(
        model_copy, loss_func, list(model_copy.parameters()), data
    )  # separate operators: the same choice of batched passes, for equal bits
    assert equal(batched_columns(G_copy) @ M, batched_columns(fresh) @ M)
    assert not allclose(G_copy @ M, expected)
    assert equal(G @ M, expected)


def test_copied_transpose_does_not_link_back():
    """A copy of ``J.adjoint()`` builds its own Jacobian, on its own model."""
    model, _, params, data = Case("mlp", "ce").make()
    J = JacobianLinearOperator(model, params, data)
    JT = J.adjoint()
    assert JT.adjoint() is J
    JT_copy = deepcopy(JT)
    J_copy = JT_copy.adjoint()
    assert J_copy is not J and J_copy._model_func is JT_copy._model_func
    assert JT_copy._model_func is not model and J_copy.adjoint() is JT_copy
    v = randn(J.shape[1], dtype=float64)
    assert equal(J_copy @ v, J @ v)
