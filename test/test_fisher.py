"""Tests for curvlinops.fisher."""

import pytest
from torch import (
    Generator,
    eye,
    float64,
    manual_seed,
    no_grad,
    rand,
    randint,
    randn,
    tensor,
    zeros_like,
)
from torch.func import hessian
from torch.linalg import matrix_norm
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, MSELoss

from curvlinops import FisherMCLinearOperator, GGNLinearOperator, ggn
from curvlinops._losses import loss_terms, sample_labels
from curvlinops.examples.functorch import functorch_empirical_fisher, functorch_ggn
from curvlinops.fisher import make_batch_fmc_matrix_product, make_grad_output_sampler
from test.cases import CASE_IDS, CASES, Case
from test.utils import (
    assert_close,
    batch_matrix,
    compare_matmat,
    flatten_matrix,
    random_columns,
)

SEED = 2147483647


def mc_fisher_reference(case: Case, seed: int, mc_samples: int):
    """The MC Fisher is the mean of empirical Fishers on sampled labels.

    Labels are drawn batch by batch from one generator, as the operator does.
    """
    model, loss_func, params, data = case.make()
    generator = Generator().manual_seed(seed)
    sampled_data = [[] for _ in range(mc_samples)]
    for X, y in data:
        with no_grad():
            output_terms, _ = loss_terms(loss_func, model(X), y)
        labels = sample_labels(loss_func, output_terms, mc_samples, generator)
        for batches, y_sampled in zip(sampled_data, labels):
            batches.append((X, y_sampled.reshape(y.shape)))
    efs = [
        functorch_empirical_fisher(model, loss_func, params, d, case.input_key)
        for d in sampled_data
    ]
    return sum(efs) / mc_samples


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mc_fisher_matches_reference(case: Case):
    model, loss_func, params, data = case.make()
    F = FisherMCLinearOperator(
        model, loss_func, params, data, mc_samples=2, **case.kwargs()
    )
    compare_matmat(F, mc_fisher_reference(case, SEED, mc_samples=2))


CONVERGENCE_CASES = [Case("mlp", "ce"), Case("sequence", "mse", "sum")]


@pytest.mark.parametrize("case", CONVERGENCE_CASES, ids=lambda c: c.id)
def test_mc_fisher_converges_to_ggn(case: Case):
    """The error to the exact Fisher (= GGN) shrinks like 1/sqrt(mc_samples)."""
    model, loss_func, params, data = case.make()
    G = functorch_ggn(model, loss_func, params, data)
    identity = eye(G.shape[0], dtype=G.dtype)
    errors = []
    for mc_samples in (1, 100, 10_000):
        F = FisherMCLinearOperator(
            model, loss_func, params, data, mc_samples=mc_samples, seed=1
        )
        errors.append((matrix_norm(F @ identity - G) / matrix_norm(G)).item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2]
    assert errors[2] < 0.03


def test_mc_fisher_is_one_deterministic_sample_per_seed():
    model, loss_func, params, data = Case("cnn", "ce").make()
    dense = {}
    for name, seed in [("a", 0), ("a_again", 0), ("b", 1)]:
        F = FisherMCLinearOperator(model, loss_func, params, data, seed=seed)
        identity = eye(F.shape[1], dtype=F.dtype)
        dense[name] = F @ identity
        assert_close(F @ identity, dense[name])  # same product every time
    assert_close(dense["a"], dense["a_again"])
    assert (dense["a"] - dense["b"]).abs().max() > 1e-3


def test_mc_fisher_averaged_over_seeds_approaches_ggn():
    """Independent samples (different seeds) average to the GGN."""
    model, loss_func, params, data = Case("mlp", "bce").make()
    G = GGNLinearOperator(model, loss_func, params, data)
    identity = eye(G.shape[1], dtype=G.dtype)
    G_dense = G @ identity
    samples = [
        FisherMCLinearOperator(
            model, loss_func, params, data, seed=s, check_deterministic=False
        )
        @ identity
        for s in range(64)
    ]
    single_error = matrix_norm(samples[0] - G_dense)
    mean_error = matrix_norm(sum(samples) / len(samples) - G_dense)
    assert mean_error < 0.4 * single_error


def test_mc_fisher_draws_the_same_labels_when_a_batch_is_retried(monkeypatch):
    """A fallback to another differentiation mode must not draw new labels."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    F = FisherMCLinearOperator(model, loss_func, params, data)
    v = random_columns(F.shape[1], 1, F)[:, 0]
    expected = F @ v
    original_vjp, calls = ggn.vjp, []

    def vjp_failing_once(*args, **kwargs):  # fails after the labels were drawn
        calls.append(None)
        if len(calls) == 1:
            raise NotImplementedError("derivative for some op is not implemented")
        return original_vjp(*args, **kwargs)

    monkeypatch.setattr(ggn, "vjp", vjp_failing_once)
    assert_close(F @ v, expected)
    assert len(calls) == 1 + len(data)


@pytest.mark.parametrize("mc_samples", [0, 1.5, True])
def test_mc_fisher_rejects_invalid_mc_samples(mc_samples):
    model, loss_func, params, data = Case("mlp", "ce").make()
    with pytest.raises(ValueError, match="mc_samples"):
        FisherMCLinearOperator(model, loss_func, params, data, mc_samples=mc_samples)


def test_mc_fisher_rejects_invalid_seed():
    model, loss_func, params, data = Case("mlp", "ce").make()
    with pytest.raises(ValueError, match="seed"):
        FisherMCLinearOperator(model, loss_func, params, data, seed=0.5)


def test_mc_fisher_rejects_unsupported_loss():
    model, _, params, data = Case("mlp", "mse").make()
    with pytest.raises(NotImplementedError, match="BCEWithLogitsLoss.*HuberLoss"):
        FisherMCLinearOperator(model, HuberLoss(), params, data)


def test_mc_fisher_leaves_out_terms_with_ignored_labels():
    """With ignored cross-entropy labels, the MC Fisher still converges to the GGN."""
    model, loss_func, params, data = Case("sequence", "ce").make()
    data = [(X, y.index_fill(-1, tensor([0]), -100)) for X, y in data]
    G = functorch_ggn(model, loss_func, params, data)
    F = FisherMCLinearOperator(model, loss_func, params, data, mc_samples=10_000)
    identity = eye(G.shape[0], dtype=G.dtype)
    assert (matrix_norm(F @ identity - G) / matrix_norm(G)).item() < 0.03


@pytest.mark.parametrize("case", [Case("sequence", "ce"), Case("mlp", "bce", "sum")])
def test_batch_fmc_matrix_product_matches_reference(case: Case):
    """3.x's builder draws labels from the generator, batch after batch."""
    model, loss_func, params, data = case.make()
    mp = make_batch_fmc_matrix_product(model, loss_func, tuple(params))
    M = batch_matrix(params)
    generator = Generator().manual_seed(SEED)
    num_data = sum(X.shape[0] for X, _ in data)
    FM = zeros_like(flatten_matrix(M))
    for X, y in data:
        weight = X.shape[0] / num_data if loss_func.reduction == "mean" else 1.0
        FM += weight * flatten_matrix(mp(X, y, *M, 2, generator))
    expected = mc_fisher_reference(case, SEED, mc_samples=2) @ flatten_matrix(M)
    assert_close(FM, expected)
    X, y = data[0]  # keywords and a packed matrix draw the same labels
    first = mp(X, y, *M, 2, Generator().manual_seed(0))
    again = mp(X, y, M, mc_samples=2, generator=Generator().manual_seed(0))
    assert_close(again, first)


@pytest.mark.parametrize("loss", ["mse", "ce", "ce_probabilities", "bce"])
def test_grad_output_sampler_estimates_the_loss_hessian(loss: str):
    """The sampled output gradients' outer products average to the loss Hessian.

    For these losses the Hessian w.r.t. the output is block-diagonal over the
    terms, and labels are drawn independently per term, so the average over the
    whole output converges to it; with 'mean' it carries the 1/R of the loss.
    """
    manual_seed(0)
    output = randn(2, 3, 2, dtype=float64)  # two data, [C, S] or [S, C]
    y = {
        "mse": randn(2, 3, 2, dtype=float64),
        "ce": randint(0, 3, (2, 2)),
        "ce_probabilities": 2 * rand(2, 3, 2, dtype=float64),  # mass != 1
        "bce": randint(0, 2, (2, 3, 2)).to(float64),
    }[loss]
    loss_func = {"mse": MSELoss, "ce": CrossEntropyLoss, "bce": BCEWithLogitsLoss}[
        loss.split("_")[0]
    ](reduction="mean")
    sample = make_grad_output_sampler(loss_func)
    num_samples = 40_000
    G = sample(output, num_samples, y, Generator().manual_seed(1))
    assert G.shape == (num_samples, *output.shape)
    G = G.reshape(num_samples, -1)
    estimate = G.T @ G / num_samples
    H = hessian(lambda o: loss_func(o, y))(output).reshape(12, 12)
    assert (estimate - H).abs().max() < 5 * H.abs().max() / num_samples**0.5


def test_grad_output_sampler_zeros_ignored_terms():
    loss_func = CrossEntropyLoss(reduction="sum")
    output, y = randn(4, 3, dtype=float64), tensor([0, -100, 2, -100])
    G = make_grad_output_sampler(loss_func)(output, 5, y, Generator().manual_seed(0))
    assert (G[:, [1, 3]] == 0).all() and (G[:, [0, 2]] != 0).all()
    with pytest.raises(NotImplementedError, match="HuberLoss"):
        make_grad_output_sampler(HuberLoss())


def test_mc_fisher_attributes_as_in_3_0_1():
    assert FisherMCLinearOperator.FIXED_DATA_ORDER is True
    supported = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)
    assert FisherMCLinearOperator.supported_losses == supported
