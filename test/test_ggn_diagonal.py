"""Tests for curvlinops.ggn_diagonal."""

import pickle
from copy import deepcopy

import numpy
import pytest
import torch
from torch import Tensor, cat, float64, tensor
from torch.nn import (
    BCEWithLogitsLoss,
    Dropout,
    Flatten,
    HuberLoss,
    Linear,
    Module,
    MSELoss,
    Sequential,
    Tanh,
)

import curvlinops._per_sample
from curvlinops import (
    DiagonalLinearOperator,
    FisherMCLinearOperator,
    GGNDiagonalLinearOperator,
)
from curvlinops.examples.functorch import functorch_ggn
from test.cases import LOSSES, REDUCTIONS, Case
from test.utils import assert_close, compare_matmat

OFF = {"check_deterministic": False}
# every loss and reduction on the MLP and sequence outputs; each loss on the others
EXACT_CASES = [
    Case(arch, loss, reduction)
    for arch in ("mlp", "sequence")
    for loss in LOSSES
    for reduction in REDUCTIONS
] + [
    Case("cnn", "bce", "sum"),
    Case("cnn", "ce", "mean"),
    Case("dict_input", "ce", "sum"),
    Case("dict_input", "bce", "mean"),
    Case("batchnorm_eval", "mse", "mean"),
    Case("transformer", "ce", "mean"),
]


def flat(tensors: list[Tensor]) -> Tensor:
    return cat([t.flatten() for t in tensors])


def exact_diagonal(case: Case, model, loss_func, params, data) -> Tensor:
    return functorch_ggn(model, loss_func, params, data, case.input_key).diag()


@pytest.mark.parametrize("case", EXACT_CASES, ids=[c.id for c in EXACT_CASES])
def test_ggn_diagonal_matches_functorch(case: Case):
    model, loss_func, params, data = case.make()
    D = GGNDiagonalLinearOperator(
        model, loss_func, params, data, **OFF, **case.kwargs()
    )
    assert [d.shape for d in D.diagonal] == [p.shape for p in params]
    assert_close(flat(D.diagonal), exact_diagonal(case, model, loss_func, params, data))


def test_ggn_diagonal_is_a_diagonal_operator():
    """Products in every format, closed forms and the determinism probe."""
    case = Case("sequence", "bce", "sum")
    model, loss_func, params, data = case.make()
    D = GGNDiagonalLinearOperator(model, loss_func, params, data)
    expected = exact_diagonal(case, model, loss_func, params, data)
    compare_matmat(D, expected.diag())
    assert isinstance(D, DiagonalLinearOperator) and D.SELF_ADJOINT
    assert_close(D.trace, expected.sum())
    D_inv = D.inverse(damping=0.1)
    assert type(D_inv) is DiagonalLinearOperator
    assert_close(flat(D_inv.diagonal), 1 / (expected + 0.1))
    with torch.no_grad():  # the model changes: recompute
        params[0].mul_(2.0)
    D.compute_diagonal()
    expected = exact_diagonal(case, model, loss_func, params, data)
    assert_close(flat(D.diagonal), expected)


@pytest.mark.parametrize(
    "case",
    [
        Case("cnn", "mse", "mean"),
        Case("sequence", "ce", "sum"),
        Case("dict_input", "bce"),
    ],
    ids=lambda c: c.id,
)
def test_ggn_diagonal_generic_path(case: Case, monkeypatch):
    """Per-datum gradients from torch.func for parameters outside the layer path."""
    monkeypatch.setattr(
        curvlinops._per_sample.LinearUses, "layer_uses", lambda self, params: {}
    )
    model, loss_func, params, data = case.make()
    D = GGNDiagonalLinearOperator(
        model, loss_func, params, data, **OFF, **case.kwargs()
    )
    assert not D._squared_gradient_sums.layer_params
    assert_close(flat(D.diagonal), exact_diagonal(case, model, loss_func, params, data))


class SharedLayers(Module):
    """A layer called twice, and a weight tied between two layers."""

    def __init__(self):
        super().__init__()
        self.twice = Linear(3, 3)
        self.first, self.second = Linear(3, 4, bias=False), Linear(4, 3)
        self.tied = Linear(3, 4)
        self.tied.weight = self.first.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.twice(self.twice(x).tanh())
        return self.second(self.first(h).tanh() + self.tied(h))


def test_ggn_diagonal_of_layers_called_twice_and_tied_weights():
    torch.manual_seed(0)
    model = SharedLayers().to(float64)
    params = list(model.parameters())  # twice.{weight,bias}, first.weight, ...
    data = [(torch.rand(4, 3, dtype=float64), torch.rand(4, 3, dtype=float64))]
    loss_func = MSELoss()
    D = GGNDiagonalLinearOperator(model, loss_func, params, data, **OFF)
    expected = functorch_ggn(model, loss_func, params, data).diag()
    assert_close(flat(D.diagonal), expected)
    # every call is seen: also the tied weight takes the layer path
    assert D._squared_gradient_sums.layer_params == set(range(len(params)))


class WeightUsedOutsideItsLayer(Module):
    """A Linear layer whose weight the parent also uses: ``x @ W.T`` and a norm."""

    def __init__(self, norm: bool):
        super().__init__()
        self.inner, self.head, self.norm = Linear(3, 3), Linear(3, 2), norm

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x).tanh() + (x @ self.inner.weight.T).sin()
        out = self.head(h)
        return out * self.head.weight.norm() if self.norm else out


@pytest.mark.parametrize("norm", [False, True], ids=["matmul", "matmul_and_norm"])
def test_ggn_diagonal_of_weights_used_outside_their_layer(norm: bool):
    """Uses outside the module count: ``x @ W.T`` is a use, a norm is generic."""
    torch.manual_seed(0)
    model = WeightUsedOutsideItsLayer(norm).to(float64)
    params = list(model.parameters())
    data = [(torch.rand(5, 3, dtype=float64), torch.rand(5, 2, dtype=float64))]
    loss_func = MSELoss()
    D = GGNDiagonalLinearOperator(model, loss_func, params, data, **OFF)
    expected = functorch_ggn(model, loss_func, params, data).diag()
    assert_close(flat(D.diagonal), expected)
    generic = {2} if norm else set()  # head.weight
    assert D._squared_gradient_sums.layer_params == {0, 1, 2, 3} - generic


def test_ggn_diagonal_of_a_functional_model_with_dict_params():
    """``model_func(params, X)`` with torch.nn.functional: the module's diagonal."""
    case = Case("cnn", "ce", "sum")
    model, loss_func, params, data = case.make()
    named = dict(model.named_parameters())

    def model_func(p: dict, X: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (X,))

    D = GGNDiagonalLinearOperator(model_func, loss_func, named, data, **OFF)
    assert_close(flat(D.diagonal), exact_diagonal(case, model, loss_func, params, data))
    assert D._squared_gradient_sums.layer_params == set(range(len(params)))


def test_ggn_diagonal_with_ignored_labels_and_class_probabilities():
    model, loss_func, params, data = Case("sequence", "ce", "mean").make()
    ignored = [(X, y.index_fill(0, tensor([0]), -100)) for X, y in data]
    D = GGNDiagonalLinearOperator(model, loss_func, params, ignored, **OFF)
    assert_close(
        flat(D.diagonal), functorch_ggn(model, loss_func, params, ignored).diag()
    )
    probabilities = [  # class probabilities of mass 2 per position
        (X, 2 * torch.rand(model(X).shape, dtype=float64).softmax(1)) for X, _ in data
    ]
    D = GGNDiagonalLinearOperator(model, loss_func, params, probabilities, **OFF)
    expected = functorch_ggn(model, loss_func, params, probabilities).diag()
    assert_close(flat(D.diagonal), expected)


def test_mc_ggn_diagonal_is_the_mc_fisher_diagonal_for_one_term_per_datum():
    """Same seed, same labels: the diagonal of FisherMCLinearOperator."""
    model, loss_func, params, data = Case("mlp", "ce", "sum").make()
    kwargs = {"seed": 3, "mc_samples": 5, **OFF}
    D = GGNDiagonalLinearOperator(model, loss_func, params, data, **kwargs)
    F = FisherMCLinearOperator(model, loss_func, params, data, **kwargs)
    assert_close(flat(D.diagonal), (F @ torch.eye(F.shape[1], dtype=float64)).diag())


@pytest.mark.parametrize(
    "case", [Case("mlp", "bce", "mean"), Case("sequence", "mse", "sum")], ids=str
)
def test_mc_ggn_diagonal_converges(case: Case):
    """The error shrinks as samples grow (seeded), and the seed fixes the sample."""
    model, loss_func, params, data = case.make()
    exact = exact_diagonal(case, model, loss_func, params, data)

    def estimate(mc_samples: int, seed: int = 0) -> Tensor:
        D = GGNDiagonalLinearOperator(
            model, loss_func, params, data, mc_samples=mc_samples, seed=seed, **OFF
        )
        return flat(D.diagonal)

    errors = [(estimate(m) - exact).norm() / exact.norm() for m in (1, 30, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1
    assert_close(estimate(30), estimate(30), rtol=0, atol=0)
    assert not torch.equal(estimate(30), estimate(30, seed=1))


def test_ggn_diagonal_rejects_what_it_does_not_support():
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(NotImplementedError, match="supports the losses"):
        GGNDiagonalLinearOperator(model, HuberLoss(), params, data)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GGNDiagonalLinearOperator(lambda X: model(X), loss_func, params, data)
    for mc_samples in (-1, 1.5):
        with pytest.raises(ValueError, match="mc_samples"):
            GGNDiagonalLinearOperator(
                model, loss_func, params, data, mc_samples=mc_samples
            )
    with pytest.raises(ValueError, match="seed"):
        GGNDiagonalLinearOperator(model, loss_func, params, data, seed="0")
    model, loss_func, params, data = Case("batchnorm_eval", "mse").make()
    model.train()
    with pytest.raises(ValueError, match="BatchNorm layer '1' is in train mode"):
        GGNDiagonalLinearOperator(model, loss_func, params, data)


def test_ggn_diagonal_in_train_mode():
    """Train mode without BatchNorm is fine; random models fail the probe."""
    model = Sequential(Linear(2, 3), Tanh(), Linear(3, 1)).to(float64).train()
    params = list(model.parameters())
    data = [(torch.rand(5, 2, dtype=float64), torch.rand(5, 1, dtype=float64))]
    loss_func = MSELoss(reduction="sum")
    D = GGNDiagonalLinearOperator(model, loss_func, params, data)
    expected = functorch_ggn(model, loss_func, params, data).diag()
    assert_close(flat(D.diagonal), expected)
    model.insert(2, Dropout(0.5))
    with pytest.raises(RuntimeError, match="diagonal differ"):
        GGNDiagonalLinearOperator(model, loss_func, params, data)


def test_ggn_diagonal_rejects_outputs_and_labels_that_do_not_fit():
    model, loss_func, params, data = Case("mlp", "mse").make()
    wrong = [(X, y[:, :1]) for X, y in data]
    with pytest.raises(ValueError, match=r"expects labels of shape \[\d+, 3\]"):
        GGNDiagonalLinearOperator(model, loss_func, params, wrong)

    class TupleOutput(Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, X):
            return self.model(X), X

    with pytest.raises(TypeError, match="must return one tensor, got tuple"):
        GGNDiagonalLinearOperator(TupleOutput(), loss_func, params, data)


def test_ggn_diagonal_copies_recompute_with_their_own_model():
    """Copies and pickles rebuild the per-datum machinery on their own model."""
    model, loss_func, params, data = Case("mlp", "ce").make()
    for mc_samples in (0, 2):
        D = GGNDiagonalLinearOperator(
            model, loss_func, params, data, mc_samples=mc_samples
        )
        for copied in (deepcopy(D), pickle.loads(pickle.dumps(D))):
            assert copied._model_func is not model
            assert_close(flat(copied.compute_diagonal()), flat(D.diagonal))
            assert not any(d.requires_grad for d in copied.diagonal)


@pytest.mark.parametrize("loss_func", [MSELoss(), BCEWithLogitsLoss()], ids=str)
def test_ggn_diagonal_of_one_dimensional_outputs_and_unused_parameters(loss_func):
    """Outputs ``[N]`` have one loss term per datum; unused parameters get zeros."""
    torch.manual_seed(0)

    class WithUnusedHead(Module):
        def __init__(self):
            super().__init__()
            self.net = Sequential(Linear(3, 4), Tanh(), Linear(4, 1), Flatten(0))
            self.unused = Linear(2, 2)

        def forward(self, X: Tensor) -> Tensor:
            return self.net(X)

    model = WithUnusedHead().to(float64)
    X, y = torch.rand(6, 3, dtype=float64), torch.rand(6, dtype=float64)
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    params = list(model.parameters())
    D = GGNDiagonalLinearOperator(
        model, loss_func, params, data, num_data=numpy.int64(6)
    )
    expected = functorch_ggn(model, loss_func, params, data).diag()
    assert_close(flat(D.diagonal), expected)
    assert all(d.abs().sum() == 0 for d in D.diagonal[-2:])


def test_ggn_diagonal_counts_are_integers():
    model, loss_func, params, data = Case("mlp", "mse").make()
    D = GGNDiagonalLinearOperator(model, loss_func, params, data, mc_samples=2, seed=1)
    D_numpy = GGNDiagonalLinearOperator(
        model, loss_func, params, data, mc_samples=numpy.int64(2), seed=numpy.int32(1)
    )
    assert_close(flat(D_numpy.diagonal), flat(D.diagonal), rtol=0, atol=0)
