"""Regressions for bad or unusual input: exact results or clear errors, never silence.

Each test covers one defect of issue 16 (and the same class of defect elsewhere),
in float64 against dense references, or by the error's type and message.
"""

from __future__ import annotations

from itertools import repeat

import numpy
import pytest
from torch import (
    Generator,
    Tensor,
    autograd,
    bfloat16,
    cat,
    eye,
    float16,
    float64,
    from_numpy,
    manual_seed,
    outer,
    rand,
    randn,
    zeros,
)
from torch.nn import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    Flatten,
    Linear,
    Module,
    MSELoss,
    Sequential,
    Tanh,
)

from curvlinops import (
    CGInverseLinearOperator,
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    TransposedJacobianLinearOperator,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_hessian,
    functorch_jacobian,
)
from curvlinops.sampling import normal, rademacher
from test.cases import Case
from test.operator_kinds import OPERATOR_KINDS, CountingOperator, make_operator
from test.utils import assert_close, compare_matmat

# Operators on a model and a loss; the Jacobians take no loss.
LOSS_OPERATORS = {
    "hessian": HessianLinearOperator,
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc_fisher": FisherMCLinearOperator,
    "kfac": KFACLinearOperator,
    "ekfac": EKFACLinearOperator,
    "kfoc": KFOCLinearOperator,
}
JACOBIANS = {
    "jacobian": JacobianLinearOperator,
    "transposed_jacobian": TransposedJacobianLinearOperator,
}


def _build(name: str, model, loss_func, params, data, **kwargs):
    """Build an operator by name; the Jacobians ignore the loss function."""
    if name in JACOBIANS:
        return JACOBIANS[name](model, params, data, **kwargs)
    return LOSS_OPERATORS[name](model, loss_func, params, data, **kwargs)


def _dense(op) -> Tensor:
    return op @ eye(op.shape[1], dtype=op.dtype)


def _columns(op, num_columns: int = 3) -> Tensor:
    """Multiply an operator onto seeded random columns (cheaper than densifying)."""
    generator = Generator().manual_seed(1)
    M = randn(op.shape[1], num_columns, generator=generator, dtype=float64)
    return op @ M.to(op.dtype)


# 1. One-dimensional outputs [N] have one loss term per datum


def _regression_problem(loss_func, flatten: bool):
    """A net ending in one output: ``[N]`` with ``Flatten(0)``, else ``[N, 1]``."""
    manual_seed(0)
    layers = [Linear(3, 2), Tanh(), Linear(2, 1)] + ([Flatten(0)] if flatten else [])
    model = Sequential(*layers).double()
    X, y = rand(6, 3, dtype=float64), rand(6, 1, dtype=float64)  # y: probabilities
    y = y.flatten() if flatten else y
    return model, loss_func, list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


def _per_datum_empirical_fisher(model, loss_func, params, data) -> Tensor:
    """Sum the outer products of every datum's loss gradient; scale like the loss."""
    summed = type(loss_func)(reduction="sum")
    gradients = []
    for X, y in data:
        for x, t in zip(X.split(1), y.split(1)):
            gradient = autograd.grad(summed(model(x), t), params)
            gradients.append(cat([g.flatten() for g in gradient]))
    E = sum(outer(g, g) for g in gradients)
    return E / len(gradients) if loss_func.reduction == "mean" else E


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_cls", [MSELoss, BCEWithLogitsLoss])
def test_empirical_fisher_of_one_dimensional_outputs(loss_cls, reduction: str):
    problem = _regression_problem(loss_cls(reduction=reduction), flatten=True)
    expected = _per_datum_empirical_fisher(*problem)
    compare_matmat(EFLinearOperator(*problem), expected)
    assert_close(functorch_empirical_fisher(*problem), expected)


@pytest.mark.parametrize("loss_cls", [MSELoss, BCEWithLogitsLoss])
def test_mc_fisher_of_one_dimensional_outputs(loss_cls):
    """Outputs ``[N]`` give the same sample as ``[N, 1]``: one term per datum."""
    ops = [
        FisherMCLinearOperator(*_regression_problem(loss_cls(), flat), mc_samples=3)
        for flat in (True, False)
    ]
    assert_close(_dense(ops[0]), _dense(ops[1]))


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_kfac_of_one_dimensional_outputs(cls, fisher_type: str):
    kwargs = {"fisher_type": fisher_type}
    flat, column = (
        cls(*_regression_problem(MSELoss(), flatten), **kwargs)
        for flatten in (True, False)
    )
    assert_close(_dense(flat), _dense(column))


@pytest.mark.parametrize("loss_cls", [MSELoss, BCEWithLogitsLoss])
def test_vivit_rejects_one_dimensional_outputs(loss_cls):
    """BackPACK cannot split ``[N]`` outputs into terms: a clear error, no result."""
    from backpack import backpack, extend

    from curvlinops.vivit import EigvalshComputation

    model, loss_func, params, data = _regression_problem(loss_cls(), flatten=True)
    model, loss_func = extend(model), extend(loss_func)
    computation, group = EigvalshComputation(), {"params": params}
    hook = computation.get_extension_hook([group])
    X, y = data[0]
    with pytest.raises((ValueError, NotImplementedError), match="2D inputs"):
        with backpack(computation.get_extension(), extension_hook=hook):
            loss_func(model(X), y).backward()


# 2. and 7. Every pass counts the data points: wrong num_data, endless data


@pytest.mark.parametrize("num_data", [4, 7])  # the data hold 5
@pytest.mark.parametrize("name", list(LOSS_OPERATORS))
def test_wrong_num_data_raises_on_the_first_pass(name: str, num_data: int):
    model, loss_func, params, data = Case("mlp", "mse").make()
    op = _build(
        name, model, loss_func, params, data, num_data=num_data,
        check_deterministic=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"num_data={num_data}` was given, but"):
        op @ rand(op.shape[1], dtype=float64)
    if name in {"hessian", "ggn"}:
        with pytest.raises(ValueError, match=f"num_data={num_data}` was given"):
            op.gradient_and_loss()


class _EndlessData:
    """A re-iterable stream that repeats one batch (fails the test after many)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        for idx, batch in enumerate(repeat(self.batch)):
            assert idx < 1000, "the pass over endless data does not stop"
            yield batch


@pytest.mark.parametrize("check_deterministic", [True, False])
@pytest.mark.parametrize("name", [*LOSS_OPERATORS, *JACOBIANS])
def test_endless_data_with_num_data_raises(name: str, check_deterministic: bool):
    model, loss_func, params, data = Case("mlp", "mse").make()
    endless = _EndlessData(data[0])  # 3 data points per batch
    with pytest.raises(ValueError, match="num_data=5` was given.*at least 6"):
        op = _build(
            name, model, loss_func, params, endless, num_data=5,
            check_deterministic=check_deterministic,
        )  # fmt: skip
        op @ rand(op.shape[1], dtype=float64)


# 3. Algorithms that assume symmetry probe it


def _non_symmetric(dim: int = 12) -> Tensor:
    A = randn(dim, dim, dtype=float64, generator=Generator().manual_seed(0))
    return A @ A.T + eye(dim, dtype=float64) + 0.1 * (A - A.T)  # SPD part + skew


SYMMETRY_USERS = {
    "cg": lambda A, **kw: CGInverseLinearOperator(A, **kw),
    "spectrum": lambda A, **kw: lanczos_approximate_spectrum(A, 4, **kw),
    "log_spectrum": lambda A, **kw: lanczos_approximate_log_spectrum(A, 4, **kw),
    "cached": lambda A, **kw: LanczosApproximateSpectrumCached(A, 4, **kw),
    "log_cached": lambda A, **kw: LanczosApproximateLogSpectrumCached(A, 4, **kw),
}


@pytest.mark.parametrize("kind", OPERATOR_KINDS)
@pytest.mark.parametrize("name", list(SYMMETRY_USERS))
def test_non_symmetric_operators_are_rejected(name: str, kind: str):
    A = make_operator(_non_symmetric(), kind)
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        SYMMETRY_USERS[name](A)
    SYMMETRY_USERS[name](A, check_symmetric=False)  # opt out: no probe, no error


def test_symmetric_operators_pass_the_probe_up_to_rounding():
    """A float32 chain ``J^T J`` is symmetric only up to rounding errors."""
    model, _, params, data = Case("cnn", "mse").make()
    model = model.float()
    data = [(X.float(), y) for X, y in data]
    J = JacobianLinearOperator(model, params, data)
    JTJ = J.adjoint() @ J
    assert not JTJ.SELF_ADJOINT
    for name in ("cg", "cached", "log_cached"):  # the probe runs at construction
        SYMMETRY_USERS[name](JTJ)  # no error
    X = randn(50, 50, generator=Generator().manual_seed(0))
    CGInverseLinearOperator(X @ X.T)  # float32 dense, symmetric up to rounding


def test_self_adjoint_operators_skip_the_probe():
    model, loss_func, params, data = Case("mlp", "ce").make()
    G = CountingOperator(GGNLinearOperator(model, loss_func, params, data))
    CGInverseLinearOperator(G)
    LanczosApproximateSpectrumCached(G, 4, boundaries=(0.0, 1.0))
    assert G.num_columns == 0


# 4. Unused parameters have zero blocks; parameters of another model are named


class _UnusedHead(Module):
    """A model with a head that the forward pass skips."""

    def __init__(self):
        super().__init__()
        self.body, self.head = Linear(3, 2), Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).tanh()


def _unused_problem():
    manual_seed(0)
    model = _UnusedHead().double()
    params = [model.body.weight, model.head.weight, model.body.bias, model.head.bias]
    X, y = rand(5, 3, dtype=float64), rand(5, 2, dtype=float64)
    return model, MSELoss(), params, [(X[:3], y[:3]), (X[3:], y[3:])]


REFERENCES = {
    "hessian": functorch_hessian,
    "ggn": functorch_ggn,
    "ef": functorch_empirical_fisher,
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_unused_parameters_get_zero_blocks(name: str):
    problem = _unused_problem()
    expected = REFERENCES[name](*problem)  # the head's rows are 6:12 and 14:16
    assert expected[6:12].abs().max() == 0 and expected[14:].abs().max() == 0
    assert expected[:6, :6].abs().max() > 0
    compare_matmat(LOSS_OPERATORS[name](*problem), expected)


@pytest.mark.parametrize("name", ["mc_fisher", "kfac", "ekfac", "kfoc"])
def test_unused_parameters_of_sampled_and_kronecker_operators(name: str):
    """The used block equals the operator on the used parameters; the rest is 0."""
    model, loss_func, params, data = _unused_problem()
    full = _dense(_build(name, model, loss_func, params, data))
    used = _dense(_build(name, model, loss_func, params[::2], data))
    rows = [*range(6), 12, 13]  # body's weight and bias
    expected = zeros(16, 16, dtype=float64)
    expected[[[r] for r in rows], rows] = used
    assert_close(full, expected)


@pytest.mark.parametrize("name", list(JACOBIANS))
def test_unused_parameters_in_jacobians(name: str):
    model, _, params, data = _unused_problem()
    J = functorch_jacobian(model, params, data)
    assert J[:, 6:12].abs().max() == 0
    compare_matmat(
        _build(name, model, None, params, data), J if name == "jacobian" else J.T
    )


@pytest.mark.parametrize("name", [*LOSS_OPERATORS, *JACOBIANS])
def test_parameters_of_another_model_are_named(name: str):
    model, loss_func, params, data = Case("mlp", "mse").make()
    other = Linear(2, 7).double()
    with pytest.raises(ValueError, match=r"params\[2\] \(shape \[7, 2\]\)"):
        _build(name, model, loss_func, [*params[:2], other.weight], data)


# 5. Valid input that was rejected: half precision for SciPy, wider labels, NumPy ints


@pytest.mark.parametrize("dtype", [bfloat16, float16])
def test_half_precision_operators_export_to_scipy(dtype):
    A = randn(6, 6, dtype=float64, generator=Generator().manual_seed(0))
    op = TensorLinearOperator(A.to(dtype))
    x = numpy.random.default_rng(0).standard_normal((6, 2)).astype(numpy.float32)
    A, X = A.to(dtype), from_numpy(x).to(dtype)
    scipy_op = op.to_scipy()
    assert scipy_op.dtype == numpy.float32
    assert_close(scipy_op.matmat(x), (A @ X).float(), rtol=0, atol=0)
    assert_close(scipy_op.rmatvec(x[:, 0]), (A.T @ X[:, 0]).float(), rtol=0, atol=0)
    # NumPy has float16 but no bfloat16
    assert (op @ x).dtype == (numpy.float16 if dtype == float16 else numpy.float32)


def test_half_precision_curvature_operator_exports_to_scipy():
    model, loss_func, params, data = Case("mlp", "ce").make()
    model = model.to(bfloat16)
    data = [(X.to(bfloat16), y) for X, y in data]
    G = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    v = numpy.random.default_rng(0).standard_normal(G.shape[1]).astype(numpy.float32)
    expected = (G @ from_numpy(v).to(bfloat16)).float()
    assert_close(G.to_scipy() @ v, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LOSS_OPERATORS))
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_float64_labels_with_a_float32_model(name: str, loss: str):
    """Like the loss itself, the operators accept wider labels (promoted, cast back)."""
    model, loss_func, params, data = Case("mlp", loss).make()
    fisher_types = {"kfac": "empirical", "ekfac": "empirical", "kfoc": "type-2"}
    kwargs = {"fisher_type": fisher_types[name]} if name in fisher_types else {}
    reference = _columns(_build(name, model, loss_func, params, data, **kwargs))
    model = model.float()
    data32 = [(X.float(), y) for X, y in data]  # float64 labels
    op = _build(name, model, loss_func, list(model.parameters()), data32, **kwargs)
    if name == "mc_fisher":  # labels drawn in float32: compare with float32 labels
        data32 = [(X, y.float()) for X, y in data32]
        reference = _columns(
            _build(name, model, loss_func, list(model.parameters()), data32)
        ).double()
    scale = reference.abs().max().item()
    assert_close(_columns(op).double(), reference, rtol=1e-4, atol=1e-5 * scale)


def _numpy_int_cases():
    """Pairs of calls, with NumPy and with Python integers, that must agree."""
    from curvlinops import (
        HutchPPTraceEstimator,
        LSMRInverseLinearOperator,
        NeumannInverseLinearOperator,
        hutchinson_diag,
        hutchinson_squared_fro,
        hutchinson_trace,
        hutchpp_trace,
        xdiag,
        xtrace,
    )
    from curvlinops.experimental import ActivationHessianLinearOperator

    problem = Case("mlp", "mse").make()
    model, loss_func, params, data = problem
    A = _non_symmetric(8)
    A = A + A.T
    v = rand(A.shape[1], dtype=float64)

    def seeded(f, *args, **kwargs):
        return f(*args, generator=Generator().manual_seed(0), **kwargs)

    def spectrum(*args, **kwargs):
        manual_seed(0)
        return lanczos_approximate_spectrum(A, *args, **kwargs)

    def hutchpp_estimator(basis_dim):
        manual_seed(0)
        return HutchPPTraceEstimator(A, basis_dim=basis_dim).sample()

    def product(cls, *args, **kwargs):
        return _columns(cls(*problem, *args, **kwargs))

    def kfac(n):
        return product(
            KFACLinearOperator, seed=n(3), mc_samples=n(2),
            num_per_example_loss_terms=n(1),
        )  # fmt: skip

    return {
        "block_sizes": lambda n: product(
            HessianLinearOperator, block_sizes=[n(1), n(1), n(2)]
        ),
        "num_data": lambda n: product(GGNLinearOperator, num_data=n(5)),
        "fisher": lambda n: product(
            FisherMCLinearOperator, seed=n(3), mc_samples=n(2)
        ),
        "kfac": kfac,
        "hutchinson_trace": lambda n: seeded(hutchinson_trace, A, n(4)),
        "hutchpp_trace": lambda n: seeded(hutchpp_trace, A, n(6)),
        "xtrace": lambda n: seeded(xtrace, A, n(4)),
        "xdiag": lambda n: seeded(xdiag, A, n(4)),
        "hutchinson_diag": lambda n: seeded(hutchinson_diag, A, n(4)),
        "squared_fro": lambda n: seeded(hutchinson_squared_fro, A, n(4)),
        "hutchpp_estimator": lambda n: hutchpp_estimator(n(2)),
        "lanczos": lambda n: spectrum(n(4), num_points=n(9), num_repeats=n(2))[1],
        "neumann": lambda n: NeumannInverseLinearOperator(A / 40, num_terms=n(3)) @ v,
        "lsmr": lambda n: LSMRInverseLinearOperator(A, maxiter=n(3)) @ v,
        "cg": lambda n: CGInverseLinearOperator(A, maxiter=n(3)) @ v,
        "cg_3x": lambda n: CGInverseLinearOperator(
            A, max_iter=n(12), n_tridiag=n(1), max_tridiag_iter=n(3)) @ v,
        "rademacher": lambda n: seeded(rademacher, n(4)),
        "normal": lambda n: seeded(normal, n(4)),
        "activation_hessian": lambda n: _dense(ActivationHessianLinearOperator(
            model, loss_func, ("1", "output", n(0)), data[:1])),
    }  # fmt: skip


NUMPY_INT_CASES = list(_numpy_int_cases())


@pytest.mark.parametrize("name", NUMPY_INT_CASES)
def test_numpy_integers_are_integers(name: str):
    call = _numpy_int_cases()[name]
    assert_close(call(numpy.int64), call(int), rtol=0, atol=0)


def test_numpy_integers_in_vivit():
    from backpack import backpack, extend

    from curvlinops.vivit import EigvalshComputation

    model, loss_func, params, data = Case("mlp", "ce").make()
    model, loss_func = extend(model), extend(loss_func)
    X, y = data[0]
    results = []
    for n in (numpy.int64, int):
        computation = EigvalshComputation(subsampling=[n(0), n(2)], mc_samples=n(0))
        group = {"params": params}
        hook = computation.get_extension_hook([group])
        with backpack(computation.get_extension(), extension_hook=hook):
            loss_func(model(X), y).backward()
        results.append(computation.get_result(group))
    assert_close(results[0], results[1], rtol=0, atol=0)


# 6. Clear errors


@pytest.mark.parametrize("name", [n for n in LOSS_OPERATORS if n != "ekfac"])
def test_cross_entropy_with_float_labels_of_index_shape(name: str):
    model, loss_func, params, data = Case("mlp", "ce").make()
    data = [(X, y.double()) for X, y in data]  # [N] floats: neither indices nor probs
    with pytest.raises(ValueError, match=r"integer class indices of shape \[3\]"):
        op = _build(name, model, loss_func, params, data, check_deterministic=False)
        op @ rand(op.shape[1], dtype=float64)


def test_cross_entropy_needs_a_class_axis():
    model, _, params, data = _regression_problem(CrossEntropyLoss(), flatten=True)
    data = [(X, (y > 0.5).long()) for X, y in data]
    with pytest.raises(ValueError, match=r"outputs \[B, C, \*\] with a class axis"):
        GGNLinearOperator(model, CrossEntropyLoss(), params, data)


def test_tensor_list_of_numpy_arrays():
    model, loss_func, params, data = Case("mlp", "mse").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    arrays = [numpy.zeros(p.shape) for p in params]
    with pytest.raises(TypeError, match="must hold torch.Tensors, got ndarray at"):
        G @ arrays


@pytest.mark.parametrize("name", [*LOSS_OPERATORS, *JACOBIANS])
def test_data_of_another_dtype_than_the_model(name: str):
    model, loss_func, params, data = Case("mlp", "mse").make()
    data = [(X.float(), y) for X, y in data]
    match = "Inputs X have dtype torch.float32, but the parameters have dtype"
    with pytest.raises(ValueError, match=match):
        _build(name, model, loss_func, params, data)


# Zero-width spectra (all eigenvalues equal) whose estimated boundaries cross


@pytest.mark.parametrize("seed", [7, 12, 18])
def test_constant_spectrum_with_estimated_boundaries(seed: int):
    for A in (3.0 * numpy.eye(30), -2.0 * numpy.eye(25)):
        for density_of, transform in (
            (lanczos_approximate_spectrum, lambda x: x),
            (lanczos_approximate_log_spectrum, lambda x: abs(x) + 1e-5),  # grid: λ
        ):
            numpy.random.seed(seed)
            grid, density = density_of(A, ncv=4)
            peak = transform(A[0, 0])
            assert abs(grid[density.argmax()] - peak) < 1e-2 * max(abs(peak), 1)


# More of the same classes of defect


@pytest.mark.parametrize("name", list(LOSS_OPERATORS))
def test_empty_batches_contribute_nothing(name: str):
    model, loss_func, params, data = Case("mlp", "mse").make()
    X, y = data[0]
    with_empty = [data[0], (X[:0], y[:0]), data[1]]
    expected = _columns(_build(name, model, loss_func, params, data))
    assert_close(_columns(_build(name, model, loss_func, params, with_empty)), expected)


@pytest.mark.parametrize(
    "data, match",
    [
        ("triples", "got a tuple of 3 entries"),
        ("tensor", "got a Tensor"),
        ("one_batch", r"got a Tensor. .*one batch: \[\(X, y\)\]"),
    ],
)
def test_batches_must_be_pairs(data: str, match: str):
    model, loss_func, params, batches = Case("mlp", "mse").make()
    data = {
        "triples": [(X, y, y) for X, y in batches],
        "tensor": batches[0][0],
        "one_batch": batches[0],
    }[data]
    with pytest.raises(TypeError, match=match):
        GGNLinearOperator(model, loss_func, params, data)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (None, TypeError, "MSELoss needs labels y as tensors, got NoneType"),
        ("numpy", TypeError, "MSELoss needs labels y as tensors, got ndarray"),
    ],
)
@pytest.mark.parametrize("name", list(LOSS_OPERATORS))
def test_labels_must_be_tensors(name: str, labels, error, match: str):
    model, loss_func, params, data = Case("mlp", "mse").make()
    data = [(X, y.numpy() if labels == "numpy" else labels) for X, y in data]
    with pytest.raises(error, match=match):
        _build(name, model, loss_func, params, data)


@pytest.mark.parametrize("name", list(LOSS_OPERATORS))
def test_bce_needs_floating_labels(name: str):
    model, loss_func, params, data = Case("mlp", "bce").make()
    data = [(X, y.long()) for X, y in data]
    with pytest.raises(ValueError, match="needs floating point labels"):
        _build(name, model, loss_func, params, data)


def test_products_with_zero_columns():
    model, loss_func, params, data = Case("mlp", "mse").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    assert (G @ zeros(G.shape[1], 0, dtype=float64)).shape == (G.shape[0], 0)
    result = G @ [zeros(*p.shape, 0, dtype=float64) for p in params]
    assert [r.shape for r in result] == [(*p.shape, 0) for p in params]
    assert (G @ numpy.zeros((G.shape[1], 0))).shape == (G.shape[0], 0)


def test_scales_and_scipy_dtypes_are_checked():
    op = TensorLinearOperator(eye(3, dtype=float64))
    for scale in (float("nan"), float("inf"), numpy.float64("-inf")):
        with pytest.raises(ValueError, match="Cannot scale a linear operator by"):
            scale * op
    with pytest.raises(ValueError, match="must be a floating point type"):
        op.to_scipy(dtype=numpy.int64)


@pytest.mark.parametrize("name", list(JACOBIANS))
def test_jacobian_outputs_must_keep_their_shape(name: str):
    manual_seed(0)
    model = Linear(3, 2).double()
    data = [(rand(2, 4, 3, dtype=float64), None), (rand(2, 5, 3, dtype=float64), None)]
    with pytest.raises(ValueError, match=r"shape \[B, 4, 2\] on every batch"):
        op = _build(name, model, None, list(model.parameters()), data)
        op @ rand(op.shape[1], dtype=float64)


def test_jacobian_of_a_model_that_returns_no_tensor():
    class DictOutput(Module):
        def __init__(self):
            super().__init__()
            self.linear = Linear(3, 2).double()

        def forward(self, x: Tensor) -> dict:
            return {"logits": self.linear(x)}

    model = DictOutput()
    with pytest.raises(TypeError, match="must return one tensor, got dict"):
        JacobianLinearOperator(
            model, list(model.parameters()), [(rand(2, 3, dtype=float64), None)]
        )


def test_bad_spectrum_boundaries():
    A = _non_symmetric()
    A = A + A.T
    for boundaries in ((float("nan"), 1.0), (0.0, float("inf")), ("low", 1.0)):
        with pytest.raises(ValueError, match="must hold finite numbers or None"):
            lanczos_approximate_spectrum(A, 4, boundaries=boundaries)
    with pytest.raises(ValueError, match=r"eigenvalues of \|A\| and must be >= 0"):
        lanczos_approximate_log_spectrum(A, 4, boundaries=(-1.0, 2.0))


def test_generators_must_be_generators():
    from curvlinops import hutchinson_trace

    with pytest.raises(TypeError, match="must be a torch.Generator, got int"):
        hutchinson_trace(eye(3, dtype=float64), 2, generator=0)


@pytest.mark.parametrize("name", ["maxiter", "max_iter"])
def test_cg_iteration_limits_must_be_integers(name: str):
    A = eye(3, dtype=float64)
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1, got 2.5"):
        CGInverseLinearOperator(A, **{name: 2.5})


def test_block_sizes_and_batch_sizes_must_be_integers():
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="must be a list of integers, got 2"):
        HessianLinearOperator(model, loss_func, params, data, block_sizes=2)
    model, loss_func, params, data = Case("dict_input", "mse").make()
    with pytest.raises(TypeError, match="batch size must be an integer, got '3'"):
        HessianLinearOperator(
            model, loss_func, params, data, batch_size_fn=lambda X: "3"
        )


def test_activation_hessian_checks_labels_and_dtypes():
    from curvlinops.experimental import ActivationHessianLinearOperator

    model, loss_func, _, data = Case("mlp", "mse").make()
    X, y = data[0]
    with pytest.raises(ValueError, match=r"expects labels of shape \[3, 3\]"):
        ActivationHessianLinearOperator(
            model, loss_func, ("0", "output", 0), [(X, y[:, :1])]
        )
    with pytest.raises(ValueError, match="Inputs X have dtype torch.float32"):
        ActivationHessianLinearOperator(
            model, loss_func, ("0", "output", 0), [(X.float(), y)]
        )
