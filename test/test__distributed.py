"""Data-parallel products: local gloo process groups against one process on all data.

Each test spawns ``world_size`` processes on the loopback interface. Every rank
builds the operator on its own shard of the batches (shards are uneven, and with
three ranks one shard is empty) and compares the products with those of a
single-process operator on all batches.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import float64

from curvlinops import GGNLinearOperator, HessianLinearOperator
from test.cases import Case
from test.utils import assert_close

# batch sizes of the full data set; rank r gets batches r, r + world, ...
BATCH_SIZES = [2, 3, 1, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, check, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    check(rank, world_size, *args)
    dist.barrier()  # no rank exits while another still receives from it
    dist.destroy_process_group()


def _spawn(world_size: int, check, *args):
    mp.spawn(_worker, args=(world_size, _free_port(), check, args), nprocs=world_size)


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


def _check_operators(rank, world_size, case):
    model, loss_func, params, batches = _problem(case)
    shard = batches[rank::world_size]
    group = dist.group.WORLD
    M = torch.randn(
        sum(p.numel() for p in params),
        3,
        dtype=float64,
        generator=torch.Generator().manual_seed(0),
    )
    for cls in (HessianLinearOperator, GGNLinearOperator):
        full = cls(model, loss_func, params, batches, **case.kwargs())
        dist_op = cls(
            model, loss_func, params, shard, process_group=group, **case.kwargs()
        )
        assert dist_op._num_data == full._num_data
        assert_close(dist_op @ M, full @ M, msg=f"{cls.__name__} rank {rank}")
    gradient, loss = dist_op.gradient_and_loss()
    expected_gradient, expected_loss = full.gradient_and_loss()
    assert_close(loss, expected_loss)
    assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(
    "case", [Case("mlp", "ce", "mean"), Case("dict_input", "mse", "sum")], ids=str
)
def test_products_equal_single_process(world_size, case):
    _spawn(world_size, _check_operators, case)


def _check_probe_fails_on_all_ranks(rank, world_size):
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


def test_determinism_probe_fails_on_every_rank():
    """A failing probe on one rank must not leave the others waiting forever."""
    _spawn(2, _check_probe_fails_on_all_ranks)


def test_process_group_requires_initialized_distributed():
    model, loss_func, params, data = Case("mlp", "mse").make()
    with pytest.raises(ValueError, match="init_process_group"):
        HessianLinearOperator(model, loss_func, params, data, process_group=object())
