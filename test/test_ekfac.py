"""Tests for curvlinops.ekfac: conformance, exact cases, eigenvalue correction."""

import pytest
from torch import (
    Tensor,
    cat,
    einsum,
    equal,
    eye,
    float64,
    kron,
    rand,
    randn,
    zeros_like,
)
from torch.func import jacrev, vmap
from torch.linalg import matrix_norm

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from curvlinops._losses import loss_terms
from curvlinops.examples.functorch import _flat_model, functorch_ggn
from test.cases import Case
from test.kfac_references import (
    CONFORMANCE,
    block_indices,
    ekfac_dense,
    exact_case,
    functorch_ef,
    kfac_dense,
    linear_params,
)
from test.utils import assert_close, compare_matmat

SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])


def _ekfac(model, loss_func, params, data, cls=EKFACLinearOperator, **kwargs):
    average = None if loss_func.reduction == "sum" else "batch+sequence"
    kwargs = {"loss_average": average, "fisher_type": "type-2", **kwargs}
    kwargs.setdefault("check_deterministic", False)
    return cls(model, loss_func, params, data, **kwargs)


EKFAC_CONFORMANCE = [c for c in CONFORMANCE if c[1] != "forward-only"]


@SEPARATE
@pytest.mark.parametrize(
    "case,fisher_type,approx",
    EKFAC_CONFORMANCE,
    ids=[f"{c.id}-{f}-{a}" for c, f, a in EKFAC_CONFORMANCE],
)
def test_ekfac_products_match_its_eigendecomposition(
    case, fisher_type, approx, separate
):
    model, loss_func, _, data = case.make()
    E = EKFACLinearOperator(
        model,
        loss_func,
        linear_params(model),
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        loss_average=None if case.reduction == "sum" else "batch",
        separate_weight_and_bias=separate,
        **case.kwargs(),
    )
    compare_matmat(E, ekfac_dense(E))


@pytest.mark.parametrize(
    "structure,approx",
    [("mlp", "expand"), ("pooled", "reduce"), ("conv_pooled", "reduce")],
)
def test_ekfac_equals_kfac_where_kfac_is_exact(structure, approx):
    """With one loss term per datum (several terms add products between them)."""
    model, loss_func, params, data = exact_case(structure, "mean")
    kwargs = {"kfac_approx": approx, "separate_weight_and_bias": False}
    E = _ekfac(model, loss_func, params, data, **kwargs)
    K = _ekfac(model, loss_func, params, data, cls=KFACLinearOperator, **kwargs)
    compare_matmat(E, kfac_dense(K))


def _projected_diagonal(op, dense):
    """Diagonal of each block of ``dense`` in the operator's Kronecker eigenbasis."""
    op._ensure_factors()
    diagonals = {}
    for layer, kind, idx in block_indices(op):
        QG = op._gradient_covariances_eigenvectors[layer]
        QA = (
            op._input_covariances_eigenvectors[layer]
            if kind != "b"
            else QG.new_ones(1, 1)
        )
        Q = kron(QG, QA)
        block = dense[idx.unsqueeze(1), idx.unsqueeze(0)]
        diagonals[(layer, kind)] = (Q.T @ block @ Q).diagonal()
    return diagonals


@SEPARATE
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_corrected_eigenvalues_are_the_projected_curvature_diagonal(
    loss, fisher_type, separate
):
    """Without weight sharing (one loss term per datum), for any amount of data."""
    model, loss_func, params, data = Case("mlp", loss).make()
    kwargs = {"fisher_type": fisher_type, "separate_weight_and_bias": separate}
    E = _ekfac(model, loss_func, params, data, **kwargs)
    reference = functorch_ggn if fisher_type == "type-2" else functorch_ef
    dense = reference(model, loss_func, params, data)
    for key, diagonal in _projected_diagonal(E, dense).items():
        assert_close(E._corrected_eigenvalues[key].flatten(), diagonal, msg=str(key))


def test_ekfac_is_closer_to_the_ggn_than_kfac():
    model, loss_func, params, data = Case("mlp", "ce").make()
    ggn = functorch_ggn(model, loss_func, params, data)
    E = _ekfac(model, loss_func, params, data)
    K = _ekfac(model, loss_func, params, data, cls=KFACLinearOperator)
    blocks = ggn * (kfac_dense(K) != 0)
    assert matrix_norm(ekfac_dense(E) - blocks) < matrix_norm(kfac_dense(K) - blocks)


def test_ekfac_mc_converges_to_type2():
    model, loss_func, params, data = Case("mlp", "bce").make()
    exact = ekfac_dense(_ekfac(model, loss_func, params, data))

    def error(mc_samples: int) -> float:
        kwargs = {"fisher_type": "mc", "mc_samples": mc_samples}
        E = _ekfac(model, loss_func, params, data, **kwargs)
        return (matrix_norm(ekfac_dense(E) - exact) / matrix_norm(exact)).item()

    errors = [error(n) for n in (1, 100, 10_000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


@SEPARATE
def test_ekfac_matrix_functions_match_dense(separate):
    model, loss_func, params, _ = Case("mlp", "mse").make()
    X = rand(20, 5, dtype=float64)
    data = [(X, randn(20, 3, dtype=float64))]
    E = _ekfac(model, loss_func, params, data, separate_weight_and_bias=separate)
    dense = E @ eye(E.shape[1], dtype=float64)
    assert_close(E.trace, dense.trace())
    assert_close(E.logdet, dense.slogdet()[1])
    assert_close(E.det, dense.det(), rtol=1e-6)
    assert_close(E.frobenius_norm, matrix_norm(dense))


# The correction from per-datum gradients


def _recording_vectors(op) -> list:
    """Record the scaled backpropagated vectors ``[K, T, C]`` of every batch."""
    recorded, original = [], op._scaled_vectors

    def record(X, output, y, generator):
        output_terms, V = original(X, output, y, generator)
        recorded.append(V.detach())
        return output_terms, V

    op._scaled_vectors = record
    return recorded


def _per_datum_gradients(op, data, vectors) -> Tensor:
    """Gradients of every datum's vector-weighted outputs ``[sum_n K, D]``."""
    f, _, theta = _flat_model(op._model_func, op._loss_func, op._params)

    def weighted_output(theta, x, y, v):  # one datum; v: [K, T_n, C]
        terms, _ = loss_terms(op._loss_func, f(theta, x[None]), y[None])
        return einsum("tc,ktc->k", terms, v)

    gradients = []
    for (X, y), V in zip(data, vectors):
        V = V.unflatten(1, (len(X), -1)).transpose(0, 1)  # [B, K, T_n, C]
        J = vmap(jacrev(weighted_output), (None, 0, 0, 0))(theta, X, y, V)
        gradients.append(J.flatten(end_dim=1))
    return cat(gradients)


def _projected_squares(op, gradients: Tensor) -> dict:
    """Sum the squared per-datum gradients of each block in its eigenbasis."""
    eigenvalues = {}
    for layer, kind, idx in block_indices(op):
        QG = op._gradient_covariances_eigenvectors[layer]
        block = gradients[:, idx].unflatten(1, (len(QG), -1))  # [M, D_out, D_in]
        rotated = QG.T @ block
        if kind != "b":
            rotated = rotated @ op._input_covariances_eigenvectors[layer]
        eigenvalues[(layer, kind)] = (rotated**2).sum(0).squeeze(-1)
    return eigenvalues


PER_DATUM = [
    (arch, fisher_type, approx, ("mean", "sum")[(f + x) % 2], (f + a) % 2 == 0)
    for a, arch in enumerate(["mlp", "sequence", "cnn", "transformer"])
    for f, fisher_type in enumerate(["type-2", "mc", "empirical"])
    for x, approx in enumerate(["expand", "reduce"])
]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap, attention
@pytest.mark.parametrize(
    "arch,fisher_type,approx,reduction,separate",
    PER_DATUM,
    ids=["-".join(map(str, c[:4])) + ("-sep" if c[4] else "-joint") for c in PER_DATUM],
)
def test_corrected_eigenvalues_square_per_datum_gradients(
    arch, fisher_type, approx, reduction, separate
):
    """Against torch.func's per-datum gradients of the backpropagated vectors."""
    model, loss_func, params, data = Case(arch, "ce", reduction).make()
    E = _ekfac(
        model,
        loss_func,
        linear_params(model),
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        loss_average=None if reduction == "sum" else "batch",
        separate_weight_and_bias=separate,
    )
    vectors = _recording_vectors(E)
    E._ensure_factors()
    gradients = _per_datum_gradients(E, data, vectors[-len(data) :])
    for key, expected in _projected_squares(E, gradients).items():
        assert_close(E._corrected_eigenvalues[key], expected, msg=str(key))


def _per_position_eigenvalues(op) -> dict:
    """The former correction: squares per position (of the factors' rows)."""
    op._ensure_factors()
    QA, QG = op._input_covariances_eigenvectors, op._gradient_covariances_eigenvectors
    eigenvalues = {key: zeros_like(E) for key, E in op._corrected_eigenvalues.items()}
    squared_inputs = {}

    def on_input(layer, rows):
        squared_inputs[layer] = (rows @ QA[layer]) ** 2

    def on_output_grad(layer, rows):
        squared_grads = (rows @ QG[layer]) ** 2
        for (name, kind), E in eigenvalues.items():
            if name == layer and kind == "b":
                E.add_(squared_grads.sum((0, 1, 2)))
            elif name == layer:
                a2 = squared_inputs[layer]
                E.add_(einsum("kbpo,bpi->oi", squared_grads, a2))

    op._data_pass(on_input, on_output_grad)
    return eigenvalues


@SEPARATE
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_without_weight_sharing_the_correction_is_bit_for_bit_per_position(
    approx, separate
):
    model, loss_func, params, data = Case("mlp", "ce").make()
    kwargs = {"fisher_type": "mc", "mc_samples": 2, "kfac_approx": approx}
    E = _ekfac(
        model, loss_func, params, data, separate_weight_and_bias=separate, **kwargs
    )
    E._ensure_factors()
    for key, expected in _per_position_eigenvalues(E).items():
        assert equal(E._corrected_eigenvalues[key], expected), key


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap, attention
@pytest.mark.parametrize(
    "reduction,approx", [("mean", "expand"), ("sum", "reduce")], ids=lambda x: x
)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_weight_sharing_correction_is_the_best_diagonal(
    arch, fisher_type, reduction, approx
):
    """One loss term per datum: the projected diagonal of the exact GGN/EF block.

    That is the diagonal closest to the block in Frobenius norm, so the former
    per-position squares are farther away wherever positions share the weight.
    """
    model, loss_func, params, data = Case(arch, "ce", reduction).make()
    params = linear_params(model)
    kwargs = {"fisher_type": fisher_type, "kfac_approx": approx}
    E = _ekfac(model, loss_func, params, data, separate_weight_and_bias=False, **kwargs)
    reference = functorch_ggn if fisher_type == "type-2" else functorch_ef
    exact = reference(model, loss_func, params, data)
    per_position = _per_position_eigenvalues(E)
    distances = []
    for key, diagonal in _projected_diagonal(E, exact).items():
        corrected = E._corrected_eigenvalues[key].flatten()
        assert_close(corrected, diagonal, msg=str(key))
        old = (per_position[key].flatten() - diagonal).norm()
        distances.append(((corrected - diagonal).norm(), old, diagonal.norm()))
    # equal where a datum's positions see one gradient (e.g. before mean pooling)
    assert all(new <= old + 1e-12 * scale for new, old, scale in distances)
    assert sum(d[0] for d in distances) < sum(d[1] for d in distances)
