"""Tests for curvlinops.kfoc: optimality against dense SVDs, data, MC, algebra."""

import pytest
from torch import cat, eye, float64, kron, manual_seed, rand, randint, randn
from torch.linalg import eigvalsh, inv, matrix_norm, slogdet
from torch.nn import BatchNorm1d, Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    BlockDiagonalLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    KroneckerProductLinearOperator,
)
from curvlinops._functional import bind_params
from curvlinops.examples.functorch import functorch_ggn
from test.cases import Case
from test.kfac_references import (
    block_indices,
    kfac_dense,
    kfoc_dense,
    linear_params,
    optimal_kronecker,
)
from test.shared_weights import cnn, mlp, random_params
from test.test__kfac_uses import SHAPES, Elman, TiedLinearLM
from test.utils import assert_close, compare_matmat

SEPARATE = pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
TOL = 1e-12  # power iteration tolerance for comparisons with float64 SVDs
# type-2 KFOC cases: MLP, CNN (stride, padding, groups), sequence outputs (one
# loss term per position), attention (weight sharing), dict inputs; both reductions
OPTIMALITY = [
    Case("mlp", "ce"),
    Case("cnn", "mse", "sum"),
    Case("sequence", "ce"),
    Case("sequence", "bce", "sum"),
    Case("transformer", "mse"),
    Case("dict_input", "mse", "sum"),
]


def _kfoc(case: Case, data=None, **kwargs) -> KFOCLinearOperator:
    model, loss_func, _, case_data = case.make()
    kwargs = {
        "fisher_type": "type-2",
        "tol": TOL,
        "check_deterministic": False,
        **kwargs,
    }
    return KFOCLinearOperator(
        model,
        loss_func,
        linear_params(model),
        case_data if data is None else data,
        **case.kwargs(),
        **kwargs,
    )


def _block(dense, idx):
    return dense[idx.unsqueeze(1), idx.unsqueeze(0)]


@SEPARATE
@pytest.mark.parametrize("case", OPTIMALITY, ids=str)
def test_kfoc_is_the_optimal_kronecker_approximation_of_the_ggn_blocks(case, separate):
    """Each block is the dense SVD's optimum, at most as far from the GGN as KFAC."""
    K = _kfoc(case, separate_weight_and_bias=separate)
    model, loss_func, _, data = case.make()
    params = linear_params(model)
    ggn = functorch_ggn(model, loss_func, params, data, input_key=case.input_key)
    kfac = kfac_dense(
        KFACLinearOperator(
            model,
            loss_func,
            params,
            data,
            fisher_type="type-2",
            separate_weight_and_bias=separate,
            check_deterministic=False,
            **case.kwargs(),
        )
    )
    approximation = kfoc_dense(K)
    for layer, kind, idx in block_indices(K):
        block = _block(ggn, idx)
        S1, S2 = K.kronecker_factors[layer, kind]
        if S2 is None:  # a separate bias block is represented exactly
            assert_close(S1, block, atol=1e-12, msg=f"{layer} bias")
            continue
        optimum = optimal_kronecker(block, len(S1), len(S2))
        scale = matrix_norm(block).item()
        assert_close(kron(S1, S2), optimum, atol=1e-9 * scale, msg=f"{layer} {kind}")
        errors = [matrix_norm(block - _block(m, idx)) for m in (approximation, kfac)]
        assert errors[0] <= errors[1] + 1e-12 * scale
    assert K._iterated_in_memory


@pytest.mark.parametrize("case", [Case("cnn", "ce"), Case("sequence", "mse")], ids=str)
def test_kfoc_products_conform(case):
    K = _kfoc(case, separate_weight_and_bias=False)
    compare_matmat(K, kfoc_dense(K))


def test_several_batches_equal_one_batch_of_the_concatenated_data():
    case = Case("sequence", "ce")
    data = case.make()[3]
    one_batch = [(cat([X for X, _ in data]), cat([y for _, y in data]))]
    assert len(data) > 1
    expected = kfoc_dense(_kfoc(case, data=one_batch))
    assert_close(kfoc_dense(_kfoc(case)), expected)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_passes_over_the_data_equal_iterations_in_memory(fisher_type):
    """Without memory for the recorded shares, every product takes a data pass."""
    case = Case("cnn", "bce")
    K = _kfoc(case, fisher_type=fisher_type)
    streamed = _kfoc(case, fisher_type=fisher_type, max_cache_bytes=0)
    assert_close(kfoc_dense(streamed), kfoc_dense(K))
    assert K._iterated_in_memory and not streamed._iterated_in_memory
    assert streamed._iterations == K._iterations > 1


def test_factors_are_symmetric_positive_semi_definite_with_balanced_norms():
    K = _kfoc(Case("mlp", "mse"), separate_weight_and_bias=False)
    for S1, S2 in K.kronecker_factors.values():
        for S in (S1, S2):
            assert S.equal(S.T)
            eigenvalues = eigvalsh(S)
            assert eigenvalues.min() >= -1e-14 * eigenvalues.max()
        assert_close(matrix_norm(S1), matrix_norm(S2))


def test_kfoc_of_an_exact_kronecker_block_is_that_block():
    """Linear layers under square loss have Kronecker GGN blocks: KFOC = KFAC = GGN."""
    manual_seed(0)
    model = Sequential(Linear(4, 3), Linear(3, 2)).to(float64)
    data = [(rand(5, 4, dtype=float64), rand(5, 2, dtype=float64))]
    args = (model, MSELoss(), list(model.parameters()), data)
    K = KFOCLinearOperator(*args, fisher_type="type-2", tol=TOL)
    ggn = functorch_ggn(*args)
    for _, _, idx in block_indices(K)[2:]:  # the last layer's blocks
        assert_close(_block(kfoc_dense(K), idx), _block(ggn, idx))


def test_mc_is_seeded_and_converges_to_type2():
    case = Case("mlp", "ce")
    exact = kfoc_dense(_kfoc(case))

    def dense(seed: int, mc_samples: int = 1):
        kwargs = {"fisher_type": "mc", "seed": seed, "mc_samples": mc_samples}
        return kfoc_dense(_kfoc(case, **kwargs))

    assert_close(dense(1), dense(1))
    assert not dense(1).allclose(dense(2))
    errors = [
        (matrix_norm(dense(0, n) - exact) / matrix_norm(exact)).item()
        for n in (1, 3_000)
    ]
    assert errors[1] < 0.05 < errors[0]


@SEPARATE
def test_closed_forms_match_the_dense_matrix(separate):
    """On more data than inputs, so that the factors are well-conditioned."""
    manual_seed(0)
    model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2)).to(float64)
    data = [(rand(20, 3, dtype=float64), rand(20, 2, dtype=float64))]
    K = KFOCLinearOperator(
        model,
        MSELoss(),
        list(model.parameters()),
        data,
        fisher_type="type-2",
        separate_weight_and_bias=separate,
        tol=TOL,
    )
    dense = kfoc_dense(K)
    sign, logabsdet = slogdet(dense)
    assert sign > 0
    assert_close(K.trace, dense.trace())
    assert_close(K.logdet, logabsdet)
    assert_close(K.det, logabsdet.exp())
    assert_close(K.frobenius_norm, matrix_norm(dense))
    identity = eye(len(dense), dtype=float64)
    compare_matmat(K.inverse(), inv(dense))
    compare_matmat(K.inverse(damping=0.1), inv(dense + 0.1 * identity))


def test_structured_form_holds_the_factors_in_block_order():
    K = _kfoc(Case("mlp", "bce"))
    structured = K.to_structured()
    assert isinstance(structured, BlockDiagonalLinearOperator)
    blocks = structured.blocks
    for block, (S1, S2) in zip(blocks, K.kronecker_factors.values(), strict=True):
        if S2 is None:
            assert_close(block @ eye(len(S1), dtype=float64), S1)
        else:
            assert isinstance(block, KroneckerProductLinearOperator)
            assert block.factors[0] is S1 and block.factors[1] is S2
    # the same matrix, up to the permutation into KFAC's canonical form
    permutation = K._to_canonical @ eye(K.shape[1], dtype=float64)
    expected = permutation @ kfoc_dense(K) @ permutation.T
    assert_close(structured @ eye(K.shape[1], dtype=float64), expected)


def test_non_convergence_warns():
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=1"):
        _kfoc(Case("cnn", "mse"), tol=1e-15, max_iter=1).compute_kronecker_factors()


def test_deterministic_check_passes_and_factors_are_computed_once():
    model, loss_func, params, data = Case("mlp", "ce").make()
    K = KFOCLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    factors = K.kronecker_factors
    assert K.kronecker_factors is factors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fisher_type": "empirical"}, "fisher_type"),
        ({"fisher_type": "forward-only"}, "fisher_type"),
        ({"kfac_approx": "reduce"}, "kfac_approx"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_cache_bytes": -1}, "max_cache_bytes"),
        ({"mc_samples": 2}, "mc_samples"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    model, loss_func, params, data = Case("mlp", "ce").make()
    kwargs = {"fisher_type": "type-2", **kwargs}
    with pytest.raises(ValueError, match=match):
        KFOCLinearOperator(model, loss_func, params, data, **kwargs)


def test_unsupported_layers_and_features_raise():
    model, loss_func, _, data = Case("batchnorm_eval", "ce").make()
    bn = [m for m in model.modules() if isinstance(m, BatchNorm1d)][0]
    with pytest.raises(NotImplementedError, match="batch_norm"):
        KFOCLinearOperator(model, loss_func, [bn.weight], data)
    K = _kfoc(Case("mlp", "ce"))
    for method in (K.state_dict, lambda: K.load_state_dict({})):
        with pytest.raises(NotImplementedError, match="no state dict"):
            method()
    with pytest.raises(TypeError, match="KFACLinearOperator"):
        KFACInverseLinearOperator(K)


def _assert_optimal(K: KFOCLinearOperator, ggn):
    """Every block of ``K`` is the dense SVD's optimum for the GGN's block."""
    for layer, kind, idx in block_indices(K):
        block = _block(ggn, idx)
        S1, S2 = K.kronecker_factors[layer, kind]
        scale = matrix_norm(block).item()
        approximation = S1 if S2 is None else kron(S1, S2)
        optimum = block if S2 is None else optimal_kronecker(block, len(S1), len(S2))
        assert_close(approximation, optimum, atol=1e-9 * scale, msg=f"{layer} {kind}")


def _reused(name: str):
    """Models that reuse layers or are functions of a parameter dictionary."""
    manual_seed(0)
    if name == "linear_twice":
        layer = Linear(4, 4).to(float64)
        return Sequential(layer, Tanh(), layer), list(layer.parameters()), (5, 2, 4)
    if name == "rnn":
        model = Elman().to(float64)
        return model, list(model.parameters()), (3, 4, 3)
    in_shape = (4, 3) if name == "mlp" else (4, 2, 6, 6)
    return (mlp if name == "mlp" else cnn), random_params(SHAPES[name]), in_shape


@SEPARATE
@pytest.mark.parametrize("name", ["linear_twice", "rnn", "mlp", "cnn"])
def test_kfoc_on_reused_layers_and_functional_models(name, separate):
    """Uses of a weight add to its per-datum gradients; dict params work as lists."""
    model, params, in_shape = _reused(name)
    X = rand(*in_shape, dtype=float64)
    y = randn(bind_params(model, params)[0](X).shape, dtype=float64)
    args = (model, MSELoss(reduction="sum"), params, [(X, y)])
    K = KFOCLinearOperator(
        *args, fisher_type="type-2", tol=TOL, separate_weight_and_bias=separate
    )
    _assert_optimal(K, functorch_ggn(*args))


def test_kfoc_leaves_a_tied_lookup_out_as_kfac_does():
    """The tied matrix's block is that of the model whose lookup reads a constant."""
    manual_seed(0)
    model = TiedLinearLM().to(float64)
    data = [(randint(0, 5, (4, 3)), randn(4, 3, 5, dtype=float64))]
    args = (model, MSELoss(reduction="sum"), list(model.parameters()), data)
    K = KFOCLinearOperator(*args, fisher_type="type-2", tol=TOL)
    assert list(K._mapping) == ["head", "mid"]
    model.detach_lookup = True
    K_constant = KFOCLinearOperator(*args, fisher_type="type-2", tol=TOL)
    assert_close(kfoc_dense(K), kfoc_dense(K_constant))
    _assert_optimal(K, functorch_ggn(*args))
