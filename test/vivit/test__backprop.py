"""Tests for curvlinops.vivit._backprop: passing the factor between modules."""

import pytest
from backpack.custom_module.branching import Parallel
from backpack.custom_module.permute import Permute
from backpack.custom_module.slicing import Slicing
from torch import arange, float64, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Flatten, Identity, Linear, Module, Sequential

from curvlinops.vivit._backprop import tensor_key
from curvlinops.vivit._sqrt_ggn import SqrtGGN
from test.utils import assert_close
from test.vivit.utils import backward, dense_ggn, extended_problem, factor_matrix

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def test_tensor_key_separates_views_at_the_same_address():
    x = arange(12.0).reshape(3, 4)
    views = [x[:, :2], x.flatten(), x.T, x.reshape(4, 3)]
    assert all(v.data_ptr() == x.data_ptr() for v in views)
    keys = {tensor_key(t) for t in [x, *views]}
    assert len(keys) == 1 + len(views)
    assert tensor_key(x.view(3, 4)) == tensor_key(x)  # same memory, same layout


def _square_permute_branch() -> Module:
    """The input and its transpose, of equal shape and address, are summed.

    BackPACK's ``data_ptr`` keys confuse the two branches: its ``DiagGGNExact``
    returns a wrong diagonal on this model.
    """
    return Sequential(
        Linear(3, 3),
        Parallel(Permute(0, 2, 1), Identity()),
        Flatten(),
        Linear(9, 2),
    )


def _split_branches() -> Module:
    """Two halves of a tensor, the first at the tensor's address, in two branches.

    BackPACK's ``data_ptr`` keys sum the factors of the first half and of the
    whole tensor, which fails on their shapes.
    """
    return Sequential(
        Linear(3, 6),
        Parallel(
            Sequential(Slicing((slice(None), slice(0, 3))), Linear(3, 2)),
            Sequential(Slicing((slice(None), slice(3, 6))), Linear(3, 2)),
        ),
    )


@pytest.mark.parametrize(
    "factory, in_shape",
    [(_square_permute_branch, (3, 3)), (_split_branches, (3,))],
    ids=["square_permute", "split"],
)
def test_factor_through_views_in_branches(factory, in_shape: tuple[int, ...]):
    """V Vᵀ is the GGN on branched models whose branches see views of a tensor."""
    manual_seed(0)
    model = factory().to(float64)
    X, y = rand(4, *in_shape, dtype=float64), randint(0, 2, (4,))
    problem = extended_problem(model, CrossEntropyLoss(), X, y)
    backward(problem, SqrtGGN("factor"))
    V = factor_matrix(problem.params, "factor")
    G = dense_ggn(problem, {"params": problem.params})
    assert_close(V @ V.T, G, atol=1e-12)
