"""Shared helpers for the ViViT tests: problems, backward passes, dense references.

Dense references come from :mod:`torch.func`, which cannot run through BackPACK's
module hooks, so they are computed on an unextended copy of the model.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

from backpack import backpack, extend
from torch import Tensor, cat, manual_seed, stack
from torch.nn import Module

from curvlinops.examples.functorch import functorch_ggn, functorch_gradient_and_loss
from curvlinops.vivit import EighComputation
from test.cases import Case

CASES = [
    Case("mlp", "mse"),
    Case("mlp", "ce"),
    Case("cnn", "ce"),
    Case("cnn", "mse"),
    Case("batchnorm_eval", "ce"),
]
CASE_IDS = [case.id for case in CASES]
GROUPINGS = ["full", "per_param", "interleaved"]
SUBSAMPLINGS = [None, [0, 3]]
SUBSAMPLING_IDS = ["all", "sub"]


@dataclass
class Problem:
    """Extended model and loss on one mini-batch, plus an unextended reference."""

    model: Module
    loss_func: Module
    params: list[Tensor]
    X: Tensor
    y: Tensor
    reference: Module
    reference_loss: Module
    cache: dict = field(default_factory=dict)

    @property
    def reference_params(self) -> list[Tensor]:
        return list(self.reference.parameters())

    def offsets(self, group: dict) -> list[int]:
        """Flat indices of a group's parameters in the full parameter vector."""
        starts = [0]
        for p in self.params:
            starts.append(starts[-1] + p.numel())
        ids = {id(p) for p in group["params"]}
        return [
            i
            for p, start in zip(self.params, starts)
            if id(p) in ids
            for i in range(start, start + p.numel())
        ]

    def subset(self, subsampling: list[int] | None) -> list[tuple[Tensor, Tensor]]:
        """Data restricted to the active samples, as one batch."""
        idx = list(range(self.X.shape[0])) if subsampling is None else subsampling
        return [(self.X[idx], self.y[idx])]


def make_problem(case: Case) -> Problem:
    """Merge a case's batches into one and extend model and loss."""
    model, loss_func, _, data = case.make()
    X, y = cat([X for X, _ in data]), cat([y for _, y in data])
    return extended_problem(model, loss_func, X, y)


def extended_problem(model: Module, loss_func: Module, X: Tensor, y: Tensor):
    """Extend model and loss, keeping unextended copies for the references."""
    reference, reference_loss = deepcopy(model), deepcopy(loss_func)
    model, loss_func = extend(model), extend(loss_func)
    params = list(model.parameters())
    return Problem(model, loss_func, params, X, y, reference, reference_loss)


def make_groups(params: list[Tensor], grouping: str, **keys) -> list[dict]:
    """Parameter groups: full GGN, per-parameter blocks, or blocks across layers.

    ``'interleaved'`` puts every other parameter (e.g. all weights) into one group,
    so that groups complete only after several layers.
    """
    blocks = {
        "full": [params],
        "per_param": [[p] for p in params],
        "interleaved": [params[::2], params[1::2]],
    }[grouping]
    return [{"params": block, **keys} for block in blocks]


def run(problem: Problem, computation, groups: list[dict], seed: int = 0):
    """Run the backward pass with a computation's extensions and hook."""
    get = getattr(computation, "get_extensions", None)
    extensions = get() if get else [computation.get_extension()]
    hook = computation.get_extension_hook(groups)
    manual_seed(seed)
    with backpack(*extensions, extension_hook=hook):
        problem.loss_func(problem.model(problem.X), problem.y).backward()


def _cached(problem: Problem, func, subsampling):
    """Evaluate a dense reference on the active samples once per problem."""
    key = (func.__name__, None if subsampling is None else tuple(subsampling))
    if key not in problem.cache:
        problem.cache[key] = func(
            problem.reference,
            problem.reference_loss,
            problem.reference_params,
            problem.subset(subsampling),
        )
    return problem.cache[key]


def dense_ggn(problem: Problem, group: dict, subsampling=None) -> Tensor:
    """GGN block of a group for the mean loss over the active samples."""
    G = _cached(problem, functorch_ggn, subsampling)
    idx = problem.offsets(group)
    return G[idx][:, idx]


def dense_gradient(problem: Problem, group: dict, subsampling=None) -> Tensor:
    """Gradient of the mean loss over the active samples, restricted to a group."""
    gradient, _ = _cached(problem, functorch_gradient_and_loss, subsampling)
    return cat([g.flatten() for g in gradient])[problem.offsets(group)]


def per_sample(func, problem: Problem, group: dict, subsampling=None) -> Tensor:
    """Stack a dense quantity over single samples (the per-sample loss ℓₙ)."""
    idx = range(problem.X.shape[0]) if subsampling is None else subsampling
    return stack([func(problem, group, [n]) for n in idx])


def top_three(evals: Tensor) -> list[int]:
    """Criterion: the three largest eigenvalues that are not round-off."""
    return non_zero(evals)[-3:]


def non_zero(evals: Tensor) -> list[int]:
    """Criterion: the eigenvalues that are not round-off."""
    return [i for i, ev in enumerate(evals) if ev > 1e-8 * evals.max()]


def flatten_vectors(vectors: list[Tensor]) -> Tensor:
    """Stack parameter-format vectors with leading axis ``K`` to ``[D, K]``."""
    return cat([v.flatten(start_dim=1) for v in vectors], dim=1).T


def eigenvectors(problem, groups, subsampling_ggn, mc_samples=0, seed=0):
    """GGN eigenvalues and eigenvectors ([D, K]) of each group (tested separately)."""
    eigh = EighComputation(subsampling_ggn, mc_samples, warn_small_eigvals=0.0)
    run(problem, eigh, groups, seed)
    results = [eigh.get_result(group) for group in groups]
    return [(evals, flatten_vectors(evecs)) for evals, evecs in results]
