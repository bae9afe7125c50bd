"""Tests for curvlinops._losses: closed forms against autograd and Monte-Carlo."""

import pytest
from torch import Generator, float64, manual_seed, rand, randint, randn, tensor, uint8
from torch.func import hessian, jacrev
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._losses import (
    check_output_and_labels,
    hessian_matmat,
    hessian_sqrt,
    label_mass,
    loss_terms,
    reduction_factor,
    sample_labels,
    scale_by_label_mass,
    term_gradients,
    terms_to_output,
)
from test.utils import assert_close

LOSSES = {"mse": MSELoss, "ce": CrossEntropyLoss, "bce": BCEWithLogitsLoss}
BATCH, SEQ, CLASSES = 3, 2, 4


def _problem(loss: str, reduction: str = "sum"):
    manual_seed(0)
    loss_func = LOSSES[loss](reduction=reduction)
    if loss == "ce":  # [B, C, S] outputs and [B, S] labels
        return (
            loss_func,
            randn(BATCH, CLASSES, SEQ, dtype=float64),
            randint(0, CLASSES, (BATCH, SEQ)),
        )
    output = randn(BATCH, SEQ, CLASSES, dtype=float64)
    y = randint(0, 2, output.shape).to(float64) if loss == "bce" else rand(output.shape)
    return loss_func, output, y.to(float64)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_terms_and_reduction_factor_reproduce_the_loss(loss, reduction):
    loss_func, output, y = _problem(loss, reduction)
    f, y_t = loss_terms(loss_func, output, y)
    assert f.shape == (BATCH * SEQ, CLASSES)
    per_term_sum = LOSSES[loss](reduction="sum")(f, y_t)
    expected = loss_func(output, y)
    assert_close(per_term_sum / reduction_factor(loss_func, f), expected)


@pytest.mark.parametrize("loss", LOSSES)
def test_terms_to_output_inverts_loss_terms_on_columns(loss):
    loss_func, output, y = _problem(loss)
    columns = randn(5, *output.shape, dtype=float64)  # 5 columns in output layout
    terms = loss_terms(loss_func, columns.flatten(end_dim=1), y)[0]
    terms = terms.reshape(5, BATCH * SEQ, CLASSES)
    assert_close(terms_to_output(loss_func, terms, output.shape), columns)
    assert_close(terms[2], loss_terms(loss_func, columns[2], y)[0])


@pytest.mark.parametrize("loss", LOSSES)
def test_label_shapes_are_checked_against_the_output(loss):
    loss_func, output, y = _problem(loss)
    check_output_and_labels(loss_func, output, y)
    if loss == "ce":  # class probabilities are accepted as well
        check_output_and_labels(loss_func, output, output.softmax(1))
    with pytest.raises(ValueError, match="expects labels of shape"):
        check_output_and_labels(loss_func, output, y[:1])
    with pytest.raises(TypeError, match="must return one tensor, got list"):
        check_output_and_labels(loss_func, [output], y)


def test_term_gradients_take_byte_class_indices():
    """Cross-entropy accepts uint8 class indices besides int64; so do the terms."""
    loss_func, output, y = _problem("ce")
    f, y_t = loss_terms(loss_func, output, y)
    expected = term_gradients(loss_func, f, y_t)
    assert_close(term_gradients(loss_func, f, y_t.to(uint8)), expected)


@pytest.mark.parametrize("loss", LOSSES)
def test_term_gradients_match_autograd(loss):
    loss_func, output, y = _problem(loss)
    f, y_t = loss_terms(loss_func, output, y)
    expected = jacrev(lambda f: loss_func(f, y_t))(f)  # sum reduction: grads per row
    assert_close(term_gradients(loss_func, f, y_t), expected)


def _class_probabilities(output):
    """Class probabilities whose mass (sum over classes) differs per term, in (0, 4)."""
    return 4 * rand(output.shape, dtype=float64) / output.shape[1]


@pytest.mark.parametrize("loss", [*LOSSES, "ce-probabilities"])
def test_hessian_sqrt_factorizes_term_hessians(loss):
    loss_func, output, y = _problem(loss.split("-")[0])
    if loss == "ce-probabilities":  # the Hessian scales with the label mass
        y = _class_probabilities(output)
    f, y_t = loss_terms(loss_func, output, y)
    S = hessian_sqrt(loss_func, f, y_t)

    def term_loss(f_t, label):
        return loss_func(f_t.unsqueeze(0), label.unsqueeze(0))

    for t in range(f.shape[0]):
        assert_close(S[t] @ S[t].T, hessian(term_loss)(f[t], y_t[t]))


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_gradients_have_the_hessian_as_covariance(loss):
    """For these likelihoods, E[g g^T] over sampled labels equals the Hessian."""
    loss_func, output, _ = _problem(loss)
    f, _ = loss_terms(loss_func, output, _problem(loss)[2])
    generator = Generator().manual_seed(0)
    samples = sample_labels(loss_func, f, 200_000, generator)
    g = term_gradients(loss_func, f, samples)  # [M, T, C]
    fisher = (g.unsqueeze(-1) * g.unsqueeze(-2)).mean(0)
    S = hessian_sqrt(loss_func, f)
    assert_close(fisher, S @ S.transpose(-1, -2), rtol=0, atol=3e-2)


def test_sampled_gradients_of_class_probabilities_scale_with_their_mass():
    """Gradients at sampled labels, times sqrt(mass), estimate the term Hessian."""
    loss_func, output, _ = _problem("ce")
    y = _class_probabilities(output)
    f, y_t = loss_terms(loss_func, output, y)
    samples = sample_labels(loss_func, f, 200_000, Generator().manual_seed(0))
    g = scale_by_label_mass(loss_func, term_gradients(loss_func, f, samples), y_t)
    fisher = (g.unsqueeze(-1) * g.unsqueeze(-2)).mean(0)
    S = hessian_sqrt(loss_func, f, y_t)
    assert_close(fisher, S @ S.transpose(-1, -2), rtol=0, atol=3e-2)
    assert (label_mass(loss_func, y_t) - y_t.sum(1)).abs().max() == 0
    assert label_mass(loss_func, loss_terms(*_problem("ce"))[1]) is None


def test_class_probabilities_of_negative_mass_have_no_square_root():
    loss_func, output, _ = _problem("ce")
    y = _class_probabilities(output)
    y[1, :, 0] -= 2.0  # the Hessian of this term is negative semi-definite
    f, y_t = loss_terms(loss_func, output, y)
    with pytest.raises(ValueError, match="non-negative mass"):
        hessian_sqrt(loss_func, f, y_t)
    M = randn(1, *output.shape, dtype=float64)  # the product is exact for any mass
    H = hessian(lambda out: loss_func(out, y))(output).reshape(output.numel(), -1)
    expected = (H @ M.flatten()).reshape(M.shape)
    assert_close(hessian_matmat(loss_func, output, M, y), expected)


def test_sampling_is_reproducible_with_a_seeded_generator():
    loss_func, output, y = _problem("ce")
    f, _ = loss_terms(loss_func, output, y)
    draw = lambda: sample_labels(loss_func, f, 5, Generator().manual_seed(3))  # noqa: E731
    assert (draw() == draw()).all()


@pytest.mark.parametrize("loss", [*LOSSES, "ce-ignore_index", "ce-probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_matmat_matches_autograd(loss, reduction):
    loss_func, output, y = _problem(loss.split("-")[0], reduction)
    if loss == "ce-ignore_index":  # cross-entropy leaves out these terms
        y = y.index_fill(1, tensor([0]), loss_func.ignore_index)
    if loss == "ce-probabilities":  # [B, C, S] labels of mass != 1
        y = _class_probabilities(output)
    M = randn(2, *output.shape, dtype=float64)
    H = hessian(lambda out: loss_func(out, y))(output)  # [*out, *out]
    expected = (H.reshape(output.numel(), -1) @ M.reshape(2, -1).T).T
    assert_close(hessian_matmat(loss_func, output, M, y), expected.reshape(M.shape))
