"""Scaling of a data-parallel GGN matrix-vector product over gloo processes.

The mini-batch of the MLP problem (``problems.py``, batch size 256) is split into
one shard per process. For every number of processes, each process uses
``cores / processes`` threads and reports the median over ``--repeats`` runs of

- ``matvec``: one data-parallel GGN-vector product (``process_group``), which
  includes the all-reduce of the result,
- ``local``: the same product on the process's shard without communication,
- ``all-reduce``: the all-reduce of a parameter-sized vector alone,

and ``overhead = matvec - local``. One process runs without a process group. All
processes start every timed run together (after a barrier); the times are those of
rank 0. Timings on a shared machine are noisy.

On a machine whose cores other programs keep busy, several threads per process
can be much slower than one (they wait for each other); compare with
``--cores 1`` then.

Usage: ``python benchmarks/distributed.py [--processes 1 2] [--repeats 20]
[--cores C]``
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from statistics import median
from time import perf_counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from problems import mlp  # noqa: E402

from curvlinops import GGNLinearOperator  # noqa: E402
from curvlinops._distributed import all_reduce_sum  # noqa: E402


def timed(func, repeats: int, group, warmup: int = 2) -> float:
    """Return the median time of ``func()`` in seconds, all ranks starting together.

    Args:
        func: The function to time.
        repeats: Number of timed runs.
        group: Process group whose ranks start every run together, or ``None``.
        warmup: Number of untimed runs first.

    Returns:
        The median time in seconds.
    """
    times = []
    for _ in range(warmup + repeats):
        if group is not None:
            dist.barrier(group=group)
        start = perf_counter()
        func()
        times.append(perf_counter() - start)
    return median(times[warmup:])


def measure(rank: int, world_size: int, repeats: int) -> dict[str, float]:
    """Time the products of one process on its shard of the MLP problem.

    Args:
        rank: This process's rank.
        world_size: Number of processes.
        repeats: Number of timed runs.

    Returns:
        Median times in seconds, keyed by what was timed.
    """
    problem = mlp()
    model, loss_func, params = problem.model, problem.loss_func, problem.params
    shards = list(zip(problem.X.chunk(world_size), problem.y.chunk(world_size)))
    shard = [shards[rank]]
    group = dist.group.WORLD if world_size > 1 else None
    kwargs = {"check_deterministic": False}
    G = GGNLinearOperator(
        model, loss_func, params, shard, process_group=group, **kwargs
    )
    # the shard's own GGN: the same passes, scaled by N / |shard| (every pass must
    # yield num_data points, so the shard cannot pose as all N)
    G_local = GGNLinearOperator(model, loss_func, params, shard, **kwargs)
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(0))
    return {
        "matvec": timed(lambda: G @ v, repeats, group),
        "local": timed(lambda: G_local @ v, repeats, group),
        # without a group, all_reduce_sum returns at once
        "all-reduce": timed(lambda: all_reduce_sum([v.clone()], group), repeats, group),
    }


def worker(rank: int, world_size: int, port: int, threads: int, repeats: int, queue):
    """Join the process group, time the products, and report rank 0's times.

    Args:
        rank: This process's rank.
        world_size: Number of processes.
        port: Port of the rendezvous on the loopback interface.
        threads: Number of threads of this process.
        repeats: Number of timed runs.
        queue: Receives rank 0's times.
    """
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    times = measure(rank, world_size, repeats)
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def run(world_size: int, cores: int, repeats: int) -> dict[str, float]:
    """Time the products with a number of processes.

    Args:
        world_size: Number of processes.
        cores: Number of cores to share among them.
        repeats: Number of timed runs.

    Returns:
        Rank 0's median times in seconds.
    """
    threads = max(1, cores // world_size)
    if world_size == 1:
        torch.set_num_threads(threads)
        return measure(0, 1, repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    args = (world_size, port, threads, repeats, queue)
    mp.spawn(worker, args=args, nprocs=world_size)
    return queue.get()


def main():
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--cores", type=int, help="cores to share (default: all available)"
    )
    args = parser.parse_args()
    affinity = getattr(os, "sched_getaffinity", None)
    cores = args.cores or (len(affinity(0)) if affinity else os.cpu_count())

    print(f"torch {torch.__version__}, {cores} cores, GGN matvec on the MLP problem")
    header = (
        f"{'processes':>9} {'threads':>7} {'matvec [ms]':>11} {'local [ms]':>10} "
        f"{'overhead [ms]':>13} {'all-reduce [ms]':>15} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    baseline = None
    for world_size in args.processes:
        t = run(world_size, cores, args.repeats)
        baseline = baseline or t["matvec"]
        print(
            f"{world_size:>9} {max(1, cores // world_size):>7} "
            f"{1e3 * t['matvec']:>11.2f} {1e3 * t['local']:>10.2f} "
            f"{1e3 * (t['matvec'] - t['local']):>13.2f} "
            f"{1e3 * t['all-reduce']:>15.2f} {baseline / t['matvec']:>7.2f}"
        )


if __name__ == "__main__":
    main()
