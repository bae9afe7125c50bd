"""Tests for curvlinops.vivit._base: arguments, parameter groups, results, cleanup."""

import pickle
from copy import deepcopy

import pytest
from backpack import backpack
from torch.autograd import grad
from torch.nn import Sequential

from curvlinops.vivit import (
    DirectionalDampedNewtonComputation,
    DirectionalDerivativesComputation,
    EighComputation,
    EigvalshComputation,
)
from test.cases import Case
from test.faults import INJECTED, assert_same_state, model_state
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


def _failing(*args):
    raise RuntimeError(INJECTED)


def _interrupting(*args):
    raise KeyboardInterrupt


def _problem_state(problem) -> dict:
    return model_state(Sequential(problem.model, problem.loss_func))


@pytest.mark.parametrize("cls", COMPUTATIONS[1:], ids=IDS[1:])
def test_failing_group_function_leaves_nothing_behind(cls):
    """A group's callable raises after another group completed.

    The backward pass ends (BackPACK frees its stored inputs and outputs), then
    the error is raised: no quantities on the parameters, no results; the
    gradients are those of the whole pass. A retry gives a fresh computation's
    results.
    """
    problem = make_problem(Case("mlp", "ce"))
    params = problem.params
    keys = ["criterion", "damping"][
        : 2 if cls is DirectionalDampedNewtonComputation else 1
    ]
    for key in keys:
        for p in params:
            p.grad = None
        computation = cls()
        groups = [
            {"params": params[:2], **KEYS, key: _failing},  # completes last
            {"params": params[2:], **KEYS},
        ]
        before = _problem_state(problem)
        with pytest.raises(RuntimeError, match=INJECTED):
            run(problem, computation, groups)
        gradient = grad(
            problem.reference_loss(problem.reference(problem.X), problem.y),
            problem.reference_params,
        )
        assert_close([p.grad for p in params], list(gradient))
        for p in params:
            p.grad = None
        assert_same_state(before, _problem_state(problem))
        for group in groups:
            with pytest.raises(KeyError):
                computation.get_result(group)
        groups[0][key] = KEYS[key]
        run(problem, computation, groups)
        fresh = cls()
        run(problem, fresh, groups)
        for group in groups:
            assert_close(computation.get_result(group), fresh.get_result(group))


def test_interrupted_group_function_frees_the_parameters():
    """``KeyboardInterrupt`` in a criterion is raised at once.

    It leaves no results and no quantities on the parameters; the hook works for
    the next backward pass.
    """
    problem = make_problem(Case("mlp", "ce"))
    computation = EighComputation()
    interrupted = {"params": problem.params[:2], "criterion": _interrupting}
    groups = [interrupted, {"params": problem.params[2:], **KEYS}]
    hook = computation.get_extension_hook(groups)
    with pytest.raises(KeyboardInterrupt):
        with backpack(computation.get_extension(), extension_hook=hook):
            problem.loss_func(problem.model(problem.X), problem.y).backward()
    for p in problem.params:
        assert not [name for name in vars(p) if name.startswith("_vivit")]
    with pytest.raises(KeyError):
        computation.get_result(groups[1])
    interrupted["criterion"] = top_three
    with backpack(computation.get_extension(), extension_hook=hook):
        problem.loss_func(problem.model(problem.X), problem.y).backward()
    fresh = EighComputation()
    run(problem, fresh, groups)
    for group in groups:
        assert_close(computation.get_result(group), fresh.get_result(group))


@pytest.mark.parametrize("cls", COMPUTATIONS, ids=IDS)
def test_copies_and_pickles_have_their_own_names(cls):
    """Copies keep the results and store quantities under names of their own.

    So a computation and its copies can share a backward pass.
    """
    problem = make_problem(Case("mlp", "mse"))
    group = {"params": problem.params, **KEYS}
    computation = cls()
    run(problem, computation, [group])
    expected = computation.get_result(group)
    copies = [deepcopy(computation), pickle.loads(pickle.dumps(computation))]
    fields = {c._factor_field for c in [computation, *copies]}
    assert len(fields) == 3
    for copied in copies:
        assert_close(copied.get_result(group), expected)
    hooks = [c.get_extension_hook([group]) for c in [computation, *copies]]
    several = hasattr(computation, "get_extensions")
    extensions = [
        e
        for c in [computation, *copies]
        for e in (c.get_extensions() if several else [c.get_extension()])
    ]
    with backpack(*extensions, extension_hook=lambda m: [h(m) for h in hooks]):
        problem.loss_func(problem.model(problem.X), problem.y).backward()
    for c in [computation, *copies]:
        assert_close(c.get_result(group), expected)
