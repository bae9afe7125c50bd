"""Shared helpers for the ViViT tests: problems, backward passes, dense references.

Dense references come from :mod:`torch.func`, which cannot run through BackPACK's
module hooks, so they are computed on an unextended copy of the model.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

import pytest
from backpack import backpack, extend
from backpack.custom_module.branching import Parallel
from backpack.custom_module.pad import Pad
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from torch import Tensor, cat, float64, manual_seed, rand, randint, randn, stack, zeros
from torch.linalg import eigvalsh
from torch.nn import (
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Identity,
    Linear,
    Module,
    MSELoss,
    ReLU,
    Sequential,
    Tanh,
)

from curvlinops.examples.functorch import functorch_ggn, functorch_gradient_and_loss
from curvlinops.vivit import EighComputation
from test.cases import Case
from test.utils import assert_close


class ResidualNet(Module):
    """A ResNet-style block with a skip connection, written with tensor operations.

    ``backpack.extend(..., use_converter=True)`` turns the ``+``, the ``*`` and the
    ``flatten`` into BackPACK's ``SumModule``, ``ScaleModule`` and ``Flatten``.
    """

    def __init__(self):
        super().__init__()
        self.stem = Conv2d(1, 2, 2)
        self.conv1, self.bn, self.relu1 = (
            Conv2d(2, 2, 3, padding=1),
            BatchNorm2d(2),
            ReLU(),
        )
        self.conv2, self.relu2 = Conv2d(2, 2, 3, padding=1), ReLU()
        self.head = Linear(2 * 3 * 3, 3)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        h = self.conv2(self.relu1(self.bn(self.conv1(x))))
        return self.head((0.5 * self.relu2(h + x)).flatten(1))


def _parallel_net() -> Module:
    """Branches of BackPACK's custom modules, merged by ``Parallel``'s ``SumModule``.

    The slices, one of which starts at its input's address, get padded or mapped
    back to the input width; the third branch scales.
    """
    return Sequential(
        Linear(4, 6),
        Parallel(
            Sequential(Slicing((slice(None), slice(0, 4))), Pad((1, 1)), Tanh()),
            Sequential(Slicing((slice(None), slice(2, 6))), Linear(4, 6)),
            Sequential(ScaleModule(0.5), Identity()),
        ),
        Tanh(),
        Linear(6, 3),
    )


@dataclass(frozen=True)
class BranchedCase:
    """A seeded problem on a branched model (one batch of 5 samples, float64)."""

    architecture: str
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.architecture}-branched"

    @property
    def use_converter(self) -> bool:
        return self.architecture == "resnet"

    def make(self) -> tuple[Module, Module, list[Tensor], list]:
        """Build model, loss function, parameters, and data, as :meth:`Case.make`."""
        manual_seed(self.seed)
        if self.architecture == "resnet":
            model, X = ResidualNet().eval(), rand(5, 1, 4, 4)
            loss_func, y = CrossEntropyLoss(), randint(0, 3, (5,))
        else:
            model, X = _parallel_net(), randn(8, 4)
            loss_func, y = MSELoss(), randn(8, 3)
        model = model.to(float64)
        return model, loss_func, list(model.parameters()), [(X.to(float64), y)]


BRANCHED_CASES = [BranchedCase("resnet"), BranchedCase("parallel")]
CASES = [
    Case("mlp", "mse"),
    Case("mlp", "ce"),
    Case("cnn", "ce"),
    Case("cnn", "mse"),
    Case("batchnorm_eval", "ce"),
    *BRANCHED_CASES,
]
CASE_IDS = [case.id for case in CASES]
GROUPINGS = ["full", "per_param", "interleaved"]
SUBSAMPLINGS = [None, [0, 3]]
SUBSAMPLING_IDS = ["all", "sub"]


def case_grid(subsamplings: list, subsampling_ids: list[str]) -> list:
    """Parameters ``(case, grouping, sub-sampling)`` for tests against dense references.

    The branched models test the graph structure; to keep the suite fast they run
    with the grouping whose blocks span several layers only.
    """
    return [
        pytest.param(case, grouping, sub, id=f"{case.id}-{grouping}-{sub_id}")
        for case in CASES
        for grouping in (["interleaved"] if case in BRANCHED_CASES else GROUPINGS)
        for sub, sub_id in zip(subsamplings, subsampling_ids)
    ]


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
    reference_params: list[Tensor]
    cache: dict = field(default_factory=dict)

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


def make_problem(case: Case | BranchedCase) -> Problem:
    """Merge a case's batches into one and extend model and loss."""
    model, loss_func, _, data = case.make()
    X, y = cat([X for X, _ in data]), cat([y for _, y in data])
    use_converter = getattr(case, "use_converter", False)
    return extended_problem(model, loss_func, X, y, use_converter)


def extended_problem(
    model: Module, loss_func: Module, X: Tensor, y: Tensor, use_converter=False
) -> Problem:
    """Extend model and loss, keeping unextended copies for the references.

    BackPACK's converter may reorder the parameters; the reference parameters follow
    the order of the extended model (matched by name).
    """
    reference, reference_loss = deepcopy(model), deepcopy(loss_func)
    model = extend(model, use_converter=use_converter)
    loss_func = extend(loss_func)
    names, params = zip(*model.named_parameters())
    by_name = dict(reference.named_parameters())
    reference_params = [by_name[name] for name in names]
    return Problem(
        model,
        loss_func,
        list(params),
        X,
        y,
        reference,
        reference_loss,
        reference_params,
    )


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


def backward(problem: Problem, *extensions, seed: int = 0):
    """Run the backward pass with BackPACK extensions (no hook)."""
    manual_seed(seed)
    with backpack(*extensions):
        problem.loss_func(problem.model(problem.X), problem.y).backward()


def factor_matrix(params: list[Tensor], savefield: str) -> Tensor:
    """Concatenate the factors stored on parameters to V, of shape [D, V * N]."""
    factors = [getattr(p, savefield) for p in params]
    factors = [f if isinstance(f, Tensor) else f.to_tensor() for f in factors]
    factors = [f.flatten(end_dim=1) for f in factors]
    return cat([f.flatten(start_dim=1) for f in factors], dim=1).T


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


def assert_same_spectrum(evals: Tensor, G: Tensor):
    """Gram eigenvalues are the GGN block's, padded with zeros to the larger size.

    Both matrices have the same non-zero eigenvalues; compare relative to the
    largest one.
    """
    expected = eigvalsh(G)
    scale = max(expected.abs().max().item(), 1e-3)
    padding = evals.numel() - expected.numel()
    if padding > 0:
        expected = cat([zeros(padding, dtype=expected.dtype), expected])
    assert_close(evals, expected[-evals.numel() :], atol=1e-10 * scale)


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
