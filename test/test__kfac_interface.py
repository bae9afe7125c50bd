"""Tests for curvlinops._kfac_interface: mapping and labels."""

import pytest
from torch import float64, manual_seed, rand, randn, sigmoid, stack
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, Linear, MSELoss, Sequential

from curvlinops import KFACLinearOperator
from test.cases import Case
from test.utils import assert_close


@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_draw_label_samples_the_predictive_distribution(loss):
    """Label frequencies match the likelihood; labels have the loss's layout."""
    manual_seed(0)
    loss_func = {"mse": MSELoss(), "ce": CrossEntropyLoss(), "bce": BCEWithLogitsLoss()}
    model = Sequential(Linear(2, 3)).to(float64)
    params = list(model.parameters())
    data = [(rand(4, 2, dtype=float64), randn(4, 3, dtype=float64).sigmoid())]
    if loss == "ce":
        data = [(data[0][0], data[0][1].argmax(1))]
    K = KFACLinearOperator(model, loss_func[loss], params, data)
    output = randn(1, 3, 5, dtype=float64)  # [B, C, positions] for cross-entropy
    if loss != "ce":
        output = output.movedim(1, -1)  # [B, positions, C]
    repeated = output.expand(20_000, *output.shape[1:])  # one datum, many draws
    labels = K.draw_label(repeated)
    if loss == "ce":
        assert labels.shape == (20_000, 5)
        frequencies = [(labels == c).double().mean(0) for c in range(3)]
        assert_close(stack(frequencies), output[0].softmax(0), atol=0.02)
    elif loss == "bce":
        assert labels.shape == repeated.shape
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
        assert_close(labels.mean(0), sigmoid(output[0]), atol=0.02)
    else:
        assert labels.shape == repeated.shape
        assert_close(labels.mean(0), output[0], atol=0.03)
        assert_close(labels.var(0), output.new_full(output.shape[1:], 0.5), atol=0.03)


def test_draw_label_is_seeded():
    model, loss_func, params, data = Case("mlp", "ce").make()
    output = randn(6, 3, dtype=float64)

    def first_labels(seed):
        K = KFACLinearOperator(model, loss_func, params, data, seed=seed)
        return K.draw_label(output)

    assert (first_labels(1) == first_labels(1)).all()
    assert not all((first_labels(1) == first_labels(s)).all() for s in range(2, 6))
