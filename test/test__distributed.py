"""Data-parallel products: local gloo process groups against one process on all data.

Spawning processes is slow (about 2 s each), so one spawn per world size runs all
checks: every rank builds each operator on its own shard of the batches (shards are
uneven, and with three ranks the middle one is empty) and compares with references
that the parent process computes on all batches. Operators that sample labels (MC
Fisher, KFAC with ``'mc'``) are compared with the sum of single-process operators
on the shards, each seeded as the documented rank seed prescribes.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from copy import deepcopy
from datetime import timedelta
from time import perf_counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import float64

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
)
from curvlinops.experimental import ActivationHessianLinearOperator
from test.cases import Case
from test.faults import INJECTED, FaultyData
from test.utils import assert_close, batched_columns, compare_matmat

# batch sizes of the full data set, and the batches of every rank per world size
BATCH_SIZES = [2, 3, 1, 3]
SHARDS = {1: [[0, 1, 2, 3]], 2: [[0, 1], [2, 3]], 3: [[0, 1, 2], [], [3]]}
CASES = [Case("mlp", "ce", "mean"), Case("dict_input", "mse", "sum")]
SEED, MANY_SAMPLES = 3, 2_000
# A rank waiting for another that failed would hang this long; failures must be
# shared much faster (FAILURE_SECONDS).
TIMEOUT_SECONDS, FAILURE_SECONDS = 60, 10
# operators whose products must equal the single-process ones on all data
EXACT = {
    "hessian": (HessianLinearOperator, {}),
    "ggn": (GGNLinearOperator, {}),
    "ggn_diagonal": (GGNDiagonalLinearOperator, {}),
    "ef": (EFLinearOperator, {}),
    "kfac": (KFACLinearOperator, {"fisher_type": "type-2"}),
    "ekfac": (EKFACLinearOperator, {"fisher_type": "empirical"}),
    "kfoc": (KFOCLinearOperator, {"fisher_type": "type-2", "tol": 1e-12}),
    "kfoc_passes": (  # an empty shard records nothing but must pass with the others
        KFOCLinearOperator,
        {"fisher_type": "type-2", "tol": 1e-12, "max_cache_bytes": 0},
    ),
}
# operators that sample labels, with a seed
SAMPLED = {
    "fisher_mc": (FisherMCLinearOperator, {"seed": SEED}),
    "kfac_mc": (KFACLinearOperator, {"fisher_type": "mc", "seed": SEED}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=TIMEOUT_SECONDS),
    )


def _worker(rank, world_size, port, checks):
    torch.set_num_threads(1)
    _init(rank, world_size, port)
    for check, args in checks:
        check(rank, world_size, *args)
    dist.barrier()  # no rank exits while another still receives from it
    dist.destroy_process_group()


def _spawn(world_size: int, checks: list):
    mp.spawn(_worker, args=(world_size, _free_port(), checks), nprocs=world_size)


def _problem(case: Case):
    """Model, loss, parameters and the batches of the full data set."""
    model, loss_func, params, data = case.make()
    X_all = (
        {k: torch.cat([X[k] for X, _ in data]) for k in data[0][0]}
        if case.is_dict_input
        else torch.cat([X for X, _ in data])
    )
    y_all = torch.cat([y for _, y in data])
    bounds = torch.tensor([0, *BATCH_SIZES]).cumsum(0).tolist()
    batches = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        idx = torch.arange(start, stop) % y_all.shape[0]
        X = {k: v[idx] for k, v in X_all.items()} if case.is_dict_input else X_all[idx]
        batches.append((X, y_all[idx]))
    return model, loss_func, params, batches


def _build(cls, case: Case, problem, data, **kwargs):
    """Build an operator of a class on some data, with the case's arguments.

    Products with several columns are always batched, so that operators compare
    bit for bit (a measured choice may differ between them, in rounding).
    """
    model, loss_func, params, _ = problem
    kwargs = {**case.kwargs(), **kwargs}
    if cls is JacobianLinearOperator:
        return batched_columns(cls(model, params, data, **kwargs))
    if issubclass(cls, (KFACLinearOperator, EKFACLinearOperator)):
        kwargs["loss_average"] = None if case.reduction == "sum" else "batch"
    return batched_columns(cls(model, loss_func, params, data, **kwargs))


def _rank_seed(seed: int, rank: int) -> int:
    """The documented seed of a rank's label generator."""
    return (seed + rank * 0x9E3779B9) % 2**64


def _columns(num_rows: int) -> torch.Tensor:
    return torch.randn(
        num_rows, 3, dtype=float64, generator=torch.Generator().manual_seed(0)
    )


def _references(case: Case, world_size: int) -> dict:
    """Single-process results that the ranks must reproduce."""
    problem = _problem(case)
    _, _, params, batches = problem
    M, expected = _columns(sum(p.numel() for p in params)), {}
    off = {"check_deterministic": False}
    for name, (cls, kwargs) in EXACT.items():
        expected[name] = _build(cls, case, problem, batches, **kwargs, **off) @ M
    J = _build(JacobianLinearOperator, case, problem, batches, **off)
    expected["jacobian"] = J @ torch.eye(J.shape[1], dtype=float64)
    expected["gradient_and_loss"] = _build(
        GGNLinearOperator, case, problem, batches, **off
    ).gradient_and_loss()
    # sampled operators: sum of the shards' single-process operators, rank seeds,
    # rescaled from their shard's number of data points to all of them (the input
    # covariances always average over the data, the rest for reduction='mean')
    num_data = sum(BATCH_SIZES)
    fisher, A, G = 0, {}, {}
    for rank, shard in enumerate(SHARDS[world_size]):
        if not shard:
            continue
        data, seed = [batches[i] for i in shard], _rank_seed(SEED, rank)
        fraction = sum(BATCH_SIZES[i] for i in shard) / num_data
        weight = fraction if case.reduction == "mean" else 1.0
        kwargs = {**off, "seed": seed}
        for name, (cls, cls_kwargs) in SAMPLED.items():
            op = _build(cls, case, problem, data, **{**cls_kwargs, **kwargs})
            if name == "fisher_mc":
                fisher = fisher + weight * (op @ M)
                continue
            op.compute_kronecker_factors()
            for total, factors, scale in [
                (A, op._input_covariances, fraction),
                (G, op._gradient_covariances, weight),
            ]:
                for layer, factor in factors.items():
                    total[layer] = total.get(layer, 0) + scale * factor
    expected["fisher_mc"], expected["kfac_mc"] = fisher, (A, G)
    return expected


def _check_operators(rank, world_size, case, expected):
    problem = _problem(case)
    _, _, params, batches = problem
    shard = [batches[i] for i in SHARDS[world_size][rank]]
    M, group = _columns(sum(p.numel() for p in params)), dist.group.WORLD
    for name, (cls, kwargs) in EXACT.items():
        op = _build(cls, case, problem, shard, process_group=group, **kwargs)
        assert op._num_data == sum(BATCH_SIZES)
        assert_close(op @ M, expected[name], msg=f"{name} rank {rank}")
    op = _build(GGNLinearOperator, case, problem, shard, process_group=group)
    assert_close(op.gradient_and_loss(), expected["gradient_and_loss"])
    J = _build(JacobianLinearOperator, case, problem, shard, process_group=group)
    compare_matmat(J, expected["jacobian"])  # with J^T through J.adjoint()
    _check_sampled(rank, case, problem, shard, M, expected)


def _check_sampled(rank, case, problem, shard, M, expected):
    group = dist.group.WORLD
    cls, kwargs = SAMPLED["fisher_mc"]
    F = _build(cls, case, problem, shard, process_group=group, **kwargs)
    assert_close(F @ M, expected["fisher_mc"], msg=f"MC Fisher rank {rank}")
    cls, kwargs = SAMPLED["kfac_mc"]
    K = _build(cls, case, problem, shard, process_group=group, **kwargs)
    A, G = expected["kfac_mc"]
    assert_close([K._input_covariances[k] for k in A], list(A.values()))
    assert_close([K._gradient_covariances[k] for k in G], list(G.values()))
    # same expectation as in one process: with many samples, close to the GGN
    F_many = _build(
        FisherMCLinearOperator, case, problem, shard, process_group=group,
        mc_samples=MANY_SAMPLES,
    )  # fmt: skip
    GM = expected["ggn"]
    assert (F_many @ M - GM).norm() < 0.05 * GM.norm()


def _check_probe_fails_on_all_ranks(rank, world_size):
    """A failing probe on one rank must not leave the others waiting forever."""
    model, loss_func, params, batches = _problem(Case("mlp", "mse"))
    shard = batches[rank::world_size]
    if rank == 1:  # this rank's data changes between passes
        fixed_shard = shard

        class Changing:
            def __iter__(self):
                return iter([(X + torch.rand_like(X), y) for X, y in fixed_shard])

        shard = Changing()
    with pytest.raises(RuntimeError, match="changed" if rank == 1 else "Rank 1"):
        HessianLinearOperator(
            model, loss_func, params, shard, process_group=dist.group.WORLD, num_data=9
        )


def _check_transposed_jacobian_fails_on_all_ranks(rank, world_size):
    """Rank 1 gets more data than at construction; every rank raises."""
    model, _, params, batches = _problem(Case("mlp", "mse"))
    shard = batches[rank::world_size]
    J = JacobianLinearOperator(model, params, shard, process_group=dist.group.WORLD)
    JT = J.adjoint()
    W = torch.zeros(JT.shape[1], dtype=float64)
    JT @ W  # locates this rank's rows among all data points
    if rank == 1:
        shard.append(batches[0])
    with pytest.raises(ValueError, match="this rank's" if rank == 1 else "Another"):
        JT @ W


def _raises_on_all_ranks(rank: int, data: FaultyData, compute, *args, **kwargs):
    """Rank 1's data raises during a computation: every rank must raise at once."""
    if rank == 1:
        data.arm(at=1)  # the second of its two batches
    match = INJECTED if rank == 1 else f"Rank 1 failed: RuntimeError: {INJECTED}"
    start = perf_counter()
    with pytest.raises(RuntimeError, match=match):
        compute(*args, **kwargs)
    assert perf_counter() - start < FAILURE_SECONDS


def _check_local_failures_fail_all_ranks(rank, world_size):
    """Rank 1's data raises mid-pass and rank 1 goes on: no rank waits for it.

    Construction, products, KFAC's factors, the Jacobian and its transpose, and
    gradients; every rank raises with rank 1's message, and retries (also of
    copies, which share the process group) agree with one process on all data.
    """
    model, loss_func, params, batches = _problem(Case("mlp", "mse"))
    shard = [batches[i] for i in SHARDS[world_size][rank]]  # two batches each
    data, group = FaultyData(shard), dist.group.WORLD
    builders = {
        "ggn": lambda d, **kw: GGNLinearOperator(model, loss_func, params, d, **kw),
        "kfac": lambda d, **kw: KFACLinearOperator(
            model, loss_func, params, d, fisher_type="type-2", **kw
        ),
        "jacobian": lambda d, **kw: JacobianLinearOperator(model, params, d, **kw),
    }
    M = _columns(sum(p.numel() for p in params))
    kwargs = {"process_group": group, "check_deterministic": False}
    for build in builders.values():
        _raises_on_all_ranks(rank, data, build, data, **kwargs)  # counting data
        op, reference = build(data, **kwargs), build(batches)
        _raises_on_all_ranks(rank, data, _pass_over_data, op, M)
        for copy in (op, deepcopy(op)):
            assert_close(_pass_over_data(copy, M), _pass_over_data(reference, M))
    JT, W = op.adjoint(), torch.ones(op.shape[0], 1, dtype=float64)
    _raises_on_all_ranks(rank, data, JT.__matmul__, W)
    assert_close(JT @ W, reference.adjoint() @ W)
    G = builders["ggn"](data, **kwargs)
    _raises_on_all_ranks(rank, data, G.gradient_and_loss)
    assert_close(G.gradient_and_loss(), builders["ggn"](batches).gradient_and_loss())


def _pass_over_data(op, M):
    """Multiply, after computing KFAC's factors anew."""
    if isinstance(op, KFACLinearOperator):
        op.compute_kronecker_factors()
    return op @ M


def _check_functional_kfac(rank, world_size, case, expected):
    """KFAC of ``model_func(params, X)``: the layers of one rank, on all ranks.

    The lowest rank with data discovers the layers and shares them, also with a
    rank without data (three ranks).
    """
    model, loss_func, _, batches = _problem(case)
    shard = [batches[i] for i in SHARDS[world_size][rank]]
    named = dict(model.named_parameters())
    M = _columns(sum(p.numel() for p in named.values()))

    def model_func(params, X):
        return torch.func.functional_call(model, params, (X,))

    cls, kwargs = EXACT["kfac"]
    K = cls(
        model_func, loss_func, named, shard, process_group=dist.group.WORLD,
        loss_average="batch", **kwargs,
    )  # fmt: skip
    assert list(K._mapping) == list(named)[::2]  # named after the weights
    assert_close(K @ M, expected["kfac"], msg=f"functional KFAC rank {rank}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_products_equal_single_process(world_size):
    references = {case: _references(case, world_size) for case in CASES}
    checks = [(_check_operators, (case, references[case])) for case in CASES]
    checks.append((_check_functional_kfac, (CASES[0], references[CASES[0]])))
    if world_size == 2:
        checks += [
            (_check_probe_fails_on_all_ranks, ()),
            (_check_transposed_jacobian_fails_on_all_ranks, ()),
            (_check_local_failures_fail_all_ranks, ()),
        ]
    _spawn(world_size, checks)


@contextmanager
def _single_process_group():
    _init(0, 1, _free_port())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_process_group_equals_no_group(case: Case):
    """Rank 0 of a one-process group computes exactly the single-process operator."""
    problem = _problem(case)
    _, _, params, batches = problem
    M = _columns(sum(p.numel() for p in params))
    ops = {
        **EXACT,
        **SAMPLED,
        "ekfac_mc": (EKFACLinearOperator, {"fisher_type": "mc", "seed": SEED}),
        "ggn_diagonal_mc": (GGNDiagonalLinearOperator, {"mc_samples": 2, "seed": SEED}),
        "jacobian": (JacobianLinearOperator, {}),
    }
    with _single_process_group() as group:
        for name, (cls, kwargs) in ops.items():
            with_group = _build(
                cls, case, problem, batches, process_group=group, **kwargs
            )
            without = _build(cls, case, problem, batches, **kwargs)
            assert_close(with_group @ M, without @ M, rtol=0, atol=0, msg=name)


def test_process_group_requires_initialized_distributed():
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="init_process_group"):
        HessianLinearOperator(model, loss_func, params, data, process_group=object())


def test_activation_hessian_rejects_process_group():
    model, loss_func, _, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="one mini-batch"):
        ActivationHessianLinearOperator(
            model, loss_func, ("1", "output", 0), data[:1], process_group=object()
        )
