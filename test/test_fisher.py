"""Tests for curvlinops.fisher."""

import pytest
from torch import Generator, eye, no_grad, tensor
from torch.linalg import matrix_norm
from torch.nn import HuberLoss

from curvlinops import FisherMCLinearOperator, GGNLinearOperator, ggn
from curvlinops._losses import loss_terms, sample_labels
from curvlinops.examples.functorch import functorch_empirical_fisher, functorch_ggn
from test.cases import CASE_IDS, CASES, Case
from test.utils import assert_close, compare_matmat, random_columns

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
