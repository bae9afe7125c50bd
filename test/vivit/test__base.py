"""Tests for curvlinops.vivit._base: arguments, parameter groups, results, cleanup."""

import pytest
from backpack import backpack

from curvlinops.vivit import (
    DirectionalDampedNewtonComputation,
    DirectionalDerivativesComputation,
    EighComputation,
    EigvalshComputation,
)
from test.cases import Case
from test.utils import assert_close
from test.vivit.utils import make_problem, run, top_three

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

KEYS = {"criterion": top_three, "damping": lambda evals, *_: 0 * evals + 1}
COMPUTATIONS = [
    EigvalshComputation,
    EighComputation,
    DirectionalDerivativesComputation,
    DirectionalDampedNewtonComputation,
]
IDS = [cls.__name__ for cls in COMPUTATIONS]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subsampling": []},
        {"subsampling": [0, -1]},
        {"subsampling": 3},
        {"mc_samples": -1},
        {"mc_samples": 1.5},
        {"warn_small_eigvals": -1.0},
    ],
)
def test_invalid_arguments_raise(kwargs: dict):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EighComputation(**kwargs)


def test_invalid_directional_arguments_raise():
    with pytest.raises(ValueError, match="subsampling_grad"):
        DirectionalDerivativesComputation(subsampling_grad=[0.5])
    with pytest.raises(ValueError, match="mc_samples"):
        DirectionalDampedNewtonComputation(mc_samples_ggn=-2)


@pytest.mark.parametrize("cls", COMPUTATIONS, ids=IDS)
def test_invalid_param_groups_raise(cls):
    problem = make_problem(Case("mlp", "ce"))
    computation, params = cls(), problem.params
    for groups, match in [
        ([], "non-empty list"),
        ({"params": params}, "non-empty list"),
        ([{"params": []}], "'params'"),
        ([{"params": [p.shape for p in params]}], "'params'"),
        ([{"params": params[:2], **KEYS}, {"params": params[1:], **KEYS}], "shares"),
    ]:
        with pytest.raises(ValueError, match=match):
            computation.get_extension_hook(groups)


@pytest.mark.parametrize("cls", COMPUTATIONS[1:], ids=IDS[1:])
def test_missing_group_callables_raise(cls):
    params = make_problem(Case("mlp", "ce")).params
    with pytest.raises(ValueError, match="criterion"):
        cls().get_extension_hook([{"params": params}])
    if cls is DirectionalDampedNewtonComputation:
        with pytest.raises(ValueError, match="damping"):
            cls().get_extension_hook([{"params": params, "criterion": top_three}])


@pytest.mark.parametrize("cls", COMPUTATIONS, ids=IDS)
def test_results_and_cleanup(cls, capsys):
    """Results exist for computed groups only; the stored quantities are freed."""
    problem = make_problem(Case("cnn", "ce"))
    params = problem.params
    group = {"params": params[:2], **KEYS}  # the other parameters are in no group
    computation = cls(verbose=True)
    run(problem, computation, [group])

    computation.get_result(group)
    assert "completes group" in capsys.readouterr().out
    with pytest.raises(KeyError, match="No results"):
        computation.get_result({"params": params[2:], **KEYS})
    with pytest.raises(KeyError, match="No results"):
        computation.get_result(dict(group))  # a copy is another group
    for p in params:
        assert not [name for name in vars(p) if name.startswith("_vivit")]

    computation.get_extension_hook([group])  # a new backward pass resets results
    with pytest.raises(KeyError):
        computation.get_result(group)


def test_frozen_parameters_raise():
    """A parameter that does not require gradients never receives a factor."""
    problem = make_problem(Case("mlp", "ce"))
    problem.params[0].requires_grad_(False)
    with pytest.raises(ValueError, match="require gradients"):
        EigvalshComputation().get_extension_hook([{"params": problem.params}])


def test_computations_share_a_backward_pass():
    """Two computations with one combined hook give their separate results."""
    problem = make_problem(Case("mlp", "mse"))
    group = {"params": problem.params, **KEYS}
    eigh, derivatives = EighComputation(), DirectionalDerivativesComputation()
    hooks = [c.get_extension_hook([group]) for c in (eigh, derivatives)]
    extensions = [eigh.get_extension(), *derivatives.get_extensions()]
    with backpack(*extensions, extension_hook=lambda m: [h(m) for h in hooks]):
        problem.loss_func(problem.model(problem.X), problem.y).backward()

    for computation in (eigh, derivatives):
        alone = type(computation)()
        run(problem, alone, [group])
        assert_close(computation.get_result(group), alone.get_result(group))
