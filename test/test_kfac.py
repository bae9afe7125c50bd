"""Tests for curvlinops.kfac: exactness, conformance, MC, matrix functions."""

import pytest
from torch import cat, eye, float64, manual_seed, rand, randn, tensor
from torch.linalg import matrix_norm, slogdet
from torch.nn import CrossEntropyLoss, Linear, ReLU, Sequential
from torch.nn.functional import one_hot

from curvlinops import KFACLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case, Permute
from test.kfac_references import (
    CONFORMANCE,
    exact_case,
    functorch_ef,
    kfac_dense,
    linear_params,
    restrict_to_blocks,
)
from test.utils import assert_close, compare_matmat

SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])


def _kfac(model, loss_func, params, data, **kwargs):
    average = None if loss_func.reduction == "sum" else "batch+sequence"
    kwargs = {"loss_average": average, "fisher_type": "type-2", **kwargs}
    kwargs.setdefault("check_deterministic", False)
    return KFACLinearOperator(model, loss_func, params, data, **kwargs)


@SEPARATE
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "structure", ["mlp", "sequence", "conv", "circular", "chunked"]
)
def test_kfac_expand_is_exact_for_deep_linear_networks(structure, reduction, separate):
    """Type-2 KFAC-expand equals the GGN's blocks, at the GGN's scale (no factor 2).

    Eschenhagen et al. (2023)'s expand setting: every loss term depends on a layer
    through one position of one use, and the network after the layer is linear;
    ``'chunked'`` calls every layer once per chunk of positions.
    """
    model, loss_func, params, data = exact_case(structure, reduction)
    K = _kfac(model, loss_func, params, data, separate_weight_and_bias=separate)
    ggn_blocks = restrict_to_blocks(functorch_ggn(model, loss_func, params, data), K)
    compare_matmat(K, ggn_blocks)
    assert_close(kfac_dense(K), ggn_blocks)
    if structure in ("sequence", "chunked"):  # reduce's is not exact here
        kwargs = {"separate_weight_and_bias": separate, "kfac_approx": "reduce"}
        K_reduce = _kfac(model, loss_func, params, data, **kwargs)
        assert not kfac_dense(K_reduce).allclose(ggn_blocks)


@SEPARATE
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("structure", ["pooled", "conv_pooled", "chunked_pooled"])
def test_kfac_reduce_is_exact_for_pooled_deep_linear_networks(
    structure, reduction, separate
):
    """Reduce's exact case, Eschenhagen et al. (2023)'s reduce setting.

    The loss depends on a layer through the average over all its positions and
    uses, linearly; ``'chunked_pooled'`` calls every layer once per chunk.
    """
    model, loss_func, params, data = exact_case(structure, reduction)
    kwargs = {"separate_weight_and_bias": separate}
    K = _kfac(model, loss_func, params, data, kfac_approx="reduce", **kwargs)
    ggn_blocks = restrict_to_blocks(functorch_ggn(model, loss_func, params, data), K)
    compare_matmat(K, ggn_blocks)
    # expand treats positions as independent examples, which is not exact here
    K_expand = _kfac(model, loss_func, params, data, **kwargs)
    assert not kfac_dense(K_expand).allclose(ggn_blocks)


def test_batch_average_scales_by_inverse_terms_per_example():
    """With 'batch', each datum's loss is a mean over its 3 terms: KFAC / 3."""
    model, loss_func, params, data = exact_case("sequence", "mean")
    K_terms = _kfac(model, loss_func, params, data, num_per_example_loss_terms=3)
    K_batch = _kfac(model, loss_func, params, data, loss_average="batch")
    assert_close(kfac_dense(K_batch), kfac_dense(K_terms) / 3)


@pytest.mark.parametrize("loss", ["mse", "ce", "ce_probabilities", "bce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_kfac_is_exact_on_one_datum(loss, fisher_type):
    """Without weight sharing, one datum makes every layer block rank-one Kronecker."""
    model, loss_func, params, data = Case("mlp", loss.split("_")[0]).make()
    data = [(data[0][0][:1], data[0][1][:1])]
    if loss == "ce_probabilities":  # the Hessian scales with the label mass
        data = [(data[0][0], 3 * rand(model(data[0][0]).shape, dtype=float64))]
    K = _kfac(model, loss_func, params, data, fisher_type=fisher_type)
    reference = functorch_ggn if fisher_type == "type-2" else functorch_ef
    compare_matmat(K, restrict_to_blocks(reference(model, loss_func, params, data), K))


def test_kfac_handles_in_place_operations_on_layer_outputs():
    model = Sequential(Linear(4, 3), ReLU(inplace=True), Linear(3, 2)).to(float64)
    _, loss_func, _, data = Case("mlp", "mse").make()
    X, y = data[0][0][:1, :4], data[0][1][:1, :2]
    params = list(model.parameters())
    K = _kfac(model, loss_func, params, [(X, y)])
    ggn = functorch_ggn(model, loss_func, params, [(X, y)])
    compare_matmat(K, restrict_to_blocks(ggn, K))


@SEPARATE
@pytest.mark.parametrize(
    "case,fisher_type,approx",
    CONFORMANCE,
    ids=[f"{c.id}-{f}-{a}" for c, f, a in CONFORMANCE],
)
def test_kfac_products_match_its_factors(case, fisher_type, approx, separate):
    model, loss_func, _, data = case.make()
    K = KFACLinearOperator(
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
    compare_matmat(K, kfac_dense(K))


def test_mc_converges_to_type2():
    model, loss_func, params, data = Case("mlp", "ce").make()
    exact = kfac_dense(_kfac(model, loss_func, params, data))

    def error(mc_samples: int) -> float:
        K = _kfac(
            model, loss_func, params, data, fisher_type="mc", mc_samples=mc_samples
        )
        return (matrix_norm(kfac_dense(K) - exact) / matrix_norm(exact)).item()

    errors = [error(n) for n in (1, 100, 10_000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


def test_mc_of_class_probabilities_approaches_the_ggn_on_one_datum():
    """Gradients at sampled labels carry the root of the label mass."""
    model, loss_func, params, data = Case("mlp", "ce", "sum").make()
    X = data[0][0][:1]
    data = [(X, 3 * rand(model(X).shape, dtype=float64))]  # mass about 4.5
    K = _kfac(model, loss_func, params, data, fisher_type="mc", mc_samples=20_000)
    exact = restrict_to_blocks(functorch_ggn(model, loss_func, params, data), K)
    error = matrix_norm(kfac_dense(K) - exact) / matrix_norm(exact)
    assert error < 0.03  # 0.87 without the mass


def test_mc_seed_determines_the_approximation():
    model, loss_func, params, data = Case("mlp", "mse").make()

    def dense(seed: int):
        return kfac_dense(
            _kfac(model, loss_func, params, data, fisher_type="mc", seed=seed)
        )

    assert_close(dense(1), dense(1))
    assert not dense(1).allclose(dense(2))


def test_forward_only_uses_identity_and_input_covariance():
    model = Linear(3, 2).to(float64)
    _, loss_func, _, data = Case("mlp", "mse").make()
    data = [(X[:, :3], y[:, :2]) for X, y in data]
    K = _kfac(
        model, loss_func, [model.weight, model.bias], data, fisher_type="forward-only"
    )
    K.compute_kronecker_factors()
    inputs = cat([X for X, _ in data])
    assert_close(K._input_covariances[""], inputs.T @ inputs / len(inputs))
    assert_close(K._gradient_covariances[""], eye(2, dtype=float64))


_INPUT_SHAPES = {"mlp": (5,), "cnn": (2, 6, 6)}


@SEPARATE
@pytest.mark.parametrize(
    "case", [Case("mlp", "mse"), Case("cnn", "mse", "sum")], ids=str
)
def test_matrix_functions_match_dense(case, separate):
    model, loss_func, params, _ = case.make()
    X = rand(40, *_INPUT_SHAPES[case.architecture], dtype=float64)
    data = [(X, randn(model(X).shape, dtype=float64))]  # positive definite factors
    K = _kfac(model, loss_func, params, data, separate_weight_and_bias=separate)
    dense = K @ eye(K.shape[1], dtype=float64)
    sign, logabsdet = slogdet(dense)
    assert sign > 0
    assert_close(K.trace, dense.trace())
    assert_close(K.logdet, logabsdet)
    assert_close(K.det, dense.det(), rtol=1e-6)
    assert_close(K.frobenius_norm, matrix_norm(dense))


def test_singular_factors_give_minus_infinite_logdet():
    model, loss_func, params, data = Case("mlp", "mse").make()
    K = _kfac(model, loss_func, params, [(data[0][0][:1], data[0][1][:1])])
    assert K.logdet.item() == float("-inf")
    assert K.det.item() == 0.0


def test_empirical_kfac_takes_class_probabilities_as_labels():
    """One-hot class probabilities give the factors of the class indices."""
    model, loss_func, params, data = Case("sequence", "ce").make()
    num_classes = model(data[0][0]).shape[1]
    one_hots = [(X, one_hot(y, num_classes).movedim(-1, 1).double()) for X, y in data]
    K_soft = _kfac(model, loss_func, params, one_hots, fisher_type="empirical")
    K = _kfac(model, loss_func, params, data, fisher_type="empirical")
    assert_close(kfac_dense(K_soft), kfac_dense(K))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_default_scaling_follows_the_reduction_on_sequences(reduction):
    """As in curvlinops 3.0.1, without ``loss_average``: 4 sequences x 3 terms.

    ``'mean'`` averages over all 12 terms (and the outputs), as the loss does;
    ``'sum'`` does not average. Type-2 KFAC-expand of a deep linear network with
    square loss then equals the GGN's blocks.
    """
    model, loss_func, params, data = exact_case("sequence", reduction, (4,))
    K = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    ggn = functorch_ggn(model, loss_func, params, data)
    compare_matmat(K, restrict_to_blocks(ggn, K))


def test_default_scaling_of_cross_entropy_on_a_sequence():
    """Cross-entropy over 3 positions of one datum whose positions see one input.

    All positions share input and output Hessian, so KFAC-expand is exact; with
    ``reduction='mean'`` the loss averages over the 3 positions.
    """
    manual_seed(0)
    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 5), Permute()).to(float64)
    X = rand(1, 1, 4, dtype=float64).expand(1, 3, 4)  # [datum, position, feature]
    data, loss_func = [(X, tensor([[0, 3, 4]]))], CrossEntropyLoss()
    params = list(model.parameters())
    K = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    ggn = functorch_ggn(model, loss_func, params, data)
    compare_matmat(K, restrict_to_blocks(ggn, K))


def test_explicit_loss_average_keeps_its_meaning():
    """``'batch+sequence'`` is the default for a mean; ``'batch'`` divides by 3."""
    model, loss_func, params, data = exact_case("sequence", "mean", (4,))
    dense = kfac_dense(KFACLinearOperator(model, loss_func, params, data))
    for average, factor in [("batch+sequence", 1.0), ("batch", 1 / 3)]:
        K = KFACLinearOperator(model, loss_func, params, data, loss_average=average)
        assert_close(kfac_dense(K), factor * dense)


def test_positional_arguments_bind_as_in_3_0_1():
    model, loss_func, params, data = Case("mlp", "ce").make()
    args = (False, False, 3, "empirical", 1, "reduce", None, False, 5, None)
    K = KFACLinearOperator(model, loss_func, params, data, *args)
    assert (K._progressbar, K._seed, K._fisher_type, K._kfac_approx) == (
        False,
        3,
        "empirical",
        "reduce",
    )
    assert not K._separate_weight_and_bias and K._num_data == 5
    with pytest.raises(TypeError):  # our additions are keyword-only
        KFACLinearOperator(model, loss_func, params, data, *args, "batch")
