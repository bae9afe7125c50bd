"""Tests for curvlinops.vivit._sqrt_ggn: the GGN factor and per-sample gradients."""

from math import sqrt

import pytest
from backpack import extend
from backpack.extensions import SqrtGGNMC
from torch import Tensor, cat, float64, manual_seed, rand, randint
from torch.nn import (
    ELU,
    SELU,
    AvgPool2d,
    AvgPool3d,
    BatchNorm1d,
    BCEWithLogitsLoss,
    Conv1d,
    Conv3d,
    ConvTranspose2d,
    CrossEntropyLoss,
    Dropout,
    Embedding,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    LogSigmoid,
    MaxPool1d,
    Module,
    MSELoss,
    ReLU,
    ReLU6,
    Sequential,
    Sigmoid,
    Tanh,
    ZeroPad2d,
)

from curvlinops.vivit._sqrt_ggn import SqrtGGN
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import (
    CASE_IDS,
    CASES,
    SUBSAMPLING_IDS,
    SUBSAMPLINGS,
    BranchedCase,
    Problem,
    backward,
    dense_ggn,
    extended_problem,
    factor_matrix,
    make_problem,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def full_ggn(problem: Problem, subsampling=None) -> Tensor:
    return dense_ggn(problem, {"params": problem.params}, subsampling)


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS, ids=SUBSAMPLING_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factor_squares_to_ggn(case: Case, subsampling):
    """V Vᵀ is the GGN of the mean loss over the active samples."""
    problem = make_problem(case)
    backward(problem, SqrtGGN("factor", subsampling=subsampling))
    V = factor_matrix(problem.params, "factor")
    num_classes = problem.model(problem.X).shape[1]
    num_samples = problem.X.shape[0] if subsampling is None else len(subsampling)
    assert V.shape[1] == num_classes * num_samples
    assert_close(V @ V.T, full_ggn(problem, subsampling), atol=1e-12)


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS, ids=SUBSAMPLING_IDS)
def test_factor_of_class_probabilities_scales_with_their_mass(subsampling):
    """BackPACK's factors assume mass one; the Hessian scales with the label mass."""
    model, loss_func, _, data = Case("mlp", "ce").make()
    X = cat([X for X, _ in data])
    y = 3 * rand(model(X).shape, dtype=float64) / 2  # mass about 2.25 per datum
    problem = extended_problem(model, loss_func, X, y)
    backward(problem, SqrtGGN("factor", subsampling=subsampling))
    V = factor_matrix(problem.params, "factor")
    assert_close(V @ V.T, full_ggn(problem, subsampling), atol=1e-12)


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS, ids=SUBSAMPLING_IDS)
@pytest.mark.parametrize(
    "case", [*CASES[:3], BranchedCase("resnet")], ids=[*CASE_IDS[:3], "resnet"]
)
def test_mc_factor_matches_backpack(case: Case, subsampling):
    """With the same seed, the MC factor is BackPACK's (rescaled to the sub-batch)."""
    problem = make_problem(case)
    backward(problem, SqrtGGN("factor", 4, subsampling), seed=1)
    ours = factor_matrix(problem.params, "factor")
    backward(problem, SqrtGGNMC(4, subsampling), seed=1)
    theirs = factor_matrix(problem.params, "sqrt_ggn_mc")
    if subsampling is not None:
        theirs = theirs * sqrt(problem.X.shape[0] / len(subsampling))
    assert ours.shape[1] == 4 * (ours.shape[1] // 4)
    assert_close(ours, theirs, atol=1e-12)


@pytest.mark.parametrize(
    "case", [Case("mlp", "ce"), BranchedCase("parallel")], ids=["mlp", "parallel"]
)
def test_mc_factor_converges(case):
    """The MC GGN approaches the exact GGN as the number of samples grows."""
    problem = make_problem(case)
    G = full_ggn(problem)
    errors = []
    for mc_samples in [4, 64, 1024]:
        backward(problem, SqrtGGN("factor", mc_samples))
        V = factor_matrix(problem.params, "factor")
        errors.append(((V @ V.T - G).norm() / G.norm()).item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.1


def _zoo() -> dict:
    """Models with the less common supported layers, input shapes, and losses."""
    return {
        "conv1d": (
            Sequential(
                Conv1d(2, 3, 3), ELU(), MaxPool1d(2), Flatten(), Linear(6, 3), SELU()
            ),
            (2, 7),
            MSELoss,
        ),
        "conv3d": (
            Sequential(
                Conv3d(1, 2, 2), LeakyReLU(), AvgPool3d(2), Flatten(), Linear(16, 3)
            ),
            (1, 5, 5, 5),
            CrossEntropyLoss,
        ),
        "transpose": (
            Sequential(
                ZeroPad2d(1),
                ConvTranspose2d(2, 2, 2, stride=2),
                AvgPool2d(2),
                Identity(),
                Dropout(0.0),
                LogSigmoid(),
                Flatten(),
                Linear(50, 3),
            ),
            (2, 3, 3),
            CrossEntropyLoss,
        ),
        "batchnorm": (
            Sequential(Linear(4, 3), BatchNorm1d(3).eval(), ReLU(), Linear(3, 2)),
            (4,),
            MSELoss,
        ),
        "sequence": (  # Linear on [N, L, d_in]: no outer-product structure
            Sequential(Linear(4, 3), Sigmoid(), Flatten(), Linear(6, 3)),
            (2, 4),
            CrossEntropyLoss,
        ),
        "bce": (
            Sequential(Linear(4, 3), Tanh(), Linear(3, 1)),
            (4,),
            BCEWithLogitsLoss,
        ),
    }


@pytest.mark.parametrize("name", list(_zoo()))
def test_factor_layer_zoo(name: str):
    model, in_shape, loss_cls = _zoo()[name]
    manual_seed(0)
    model = model.to(float64)
    X = rand(4, *in_shape, dtype=float64)
    out = model(X).detach()
    if loss_cls is CrossEntropyLoss:
        y = randint(0, out.shape[1], (4,))
    elif loss_cls is BCEWithLogitsLoss:
        y = randint(0, 2, out.shape).to(float64)
    else:
        y = rand(out.shape, dtype=float64)
    _check_factor(extended_problem(model, loss_cls(), X, y))


def test_factor_embedding():
    manual_seed(0)
    model = Sequential(Embedding(6, 2), Flatten(), Linear(6, 3)).to(float64)
    X, y = randint(0, 6, (4, 3)), randint(0, 3, (4,))
    _check_factor(extended_problem(model, CrossEntropyLoss(), X, y))


class Residual(Module):
    """A residual block, converted to BackPACK's branching modules by ``extend``."""

    def __init__(self):
        super().__init__()
        self.inner, self.act, self.outer = Linear(4, 4), Tanh(), Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(self.act(self.inner(x)) + x)


def test_factor_residual_network():
    manual_seed(0)
    model = Residual().to(float64)
    X, y = rand(5, 4, dtype=float64), randint(0, 3, (5,))
    problem = extended_problem(model, CrossEntropyLoss(), X, y)
    problem.model = extend(model, use_converter=True)  # adds SumModule & co.
    problem.params = list(problem.model.parameters())
    _check_factor(problem)


def _check_factor(problem: Problem):
    backward(problem, SqrtGGN("factor"))
    V = factor_matrix(problem.params, "factor")
    assert_close(V @ V.T, full_ggn(problem), atol=1e-12)


def test_batchnorm_train_mode_raises():
    problem = make_problem(Case("batchnorm_eval", "ce"))
    problem.model.train()
    with pytest.raises(NotImplementedError, match="training mode"):
        backward(problem, SqrtGGN("factor"))


def test_unsupported_layer_raises():
    problem = make_problem(Case("mlp", "ce"))
    problem.model[1] = extend(ReLU6())
    with pytest.raises(NotImplementedError, match="ReLU6"):
        backward(problem, SqrtGGN("factor"))


def test_reduction_must_be_mean():
    problem = make_problem(Case("mlp", "mse"))
    problem.loss_func.reduction = "sum"
    with pytest.raises(ValueError, match="reduction='mean'"):
        backward(problem, SqrtGGN("factor"))


def test_subsampling_out_of_range_raises():
    problem = make_problem(Case("mlp", "ce"))
    with pytest.raises(ValueError, match="Sub-sampling indices"):
        backward(problem, SqrtGGN("factor", subsampling=[0, 5]))


def test_ignored_labels_raise():
    """Terms with ignored labels would enter the factor: refuse them."""
    problem = make_problem(Case("mlp", "ce"))
    problem.y[0] = problem.loss_func.ignore_index
    with pytest.raises(NotImplementedError, match="ignore_index"):
        backward(problem, SqrtGGN("factor"))
