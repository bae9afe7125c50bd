r"""Data-parallel curvature products with torch.distributed
=========================================================

When the data behind a curvature matrix no longer fits one device, or one pass
over it takes too long, split the data over several processes. Every curvature
operator takes a ``process_group`` argument for this: each process (*rank*) passes
only its own shard of the data, and every product is the product over the union of
all shards, available on every rank.

Under the hood, each rank multiplies with its mini-batches as usual and the ranks
add their partial results with one ``all_reduce`` per product (not per batch). The
number of data points that scales a ``reduction='mean'`` loss is the total over all
ranks. Kronecker-factored operators (KFAC, EKFAC) add up their factors once, after
which every rank holds the same operator and products need no communication.

This tutorial runs on two CPU processes that talk through
`gloo <https://github.com/pytorch/gloo>`_ on the loopback interface; on GPUs use
the NCCL backend instead. Launched the usual way with ``torchrun``,

.. code-block:: bash

   torchrun --nproc_per_node=2 example_distributed.py

every rank executes this whole file. Run as a plain Python script (as the
documentation build does), the file launches that very command on itself.
"""

import os
import socket
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy
import torch.distributed as dist
from torch import float64, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvlinops
from curvlinops import GGNLinearOperator, KFACLinearOperator

# %%
# The problem
# -----------
#
# Every rank builds the same model (seeded, so the parameters agree) and sees the
# same data set; which part of it a rank uses is decided by the data loader below.
# Real jobs would load only their shard from disk.


def problem():
    """Return model, loss function, parameters and the data set (same on all ranks).

    Returns:
        Model, loss function, parameters, and a ``TensorDataset``.
    """
    manual_seed(0)
    X, y = rand(128, 10, dtype=float64), randint(0, 3, (128,))
    model = Sequential(Linear(10, 8), Tanh(), Linear(8, 3)).to(float64)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, CrossEntropyLoss(), params, TensorDataset(X, y)


# %%
# What every rank runs
# --------------------
#
# ``torchrun`` tells each process its rank and where to meet the others through
# environment variables, which :func:`torch.distributed.init_process_group` reads.
# A :class:`~torch.utils.data.DistributedSampler` hands each rank every
# ``world_size``-th data point. It must not shuffle (the operators go over the data
# several times and need the same batches each time), and the number of data
# points should be divisible by the number of ranks: otherwise the sampler repeats
# some data points to even out the shards, and they would count twice.
#
# The operator gets ``process_group=dist.group.WORLD``. Everything else is the same
# as in a single process. Since every product involves all ranks, all ranks must
# ask for the same products in the same order; randomized algorithms on top (e.g.
# trace estimation) must therefore draw the same random vectors on every rank.
#
# Operators that sample labels (:class:`~curvlinops.FisherMCLinearOperator`, KFAC
# with ``fisher_type='mc'``) draw them on each rank from a generator seeded with
# ``seed`` and the rank. Their products are reproducible for a fixed number of
# ranks and have the single-process expectation, but they are a different sample;
# here we use KFAC's ``'type-2'`` variant, which involves no sampling.


def run_rank():
    """Multiply with the GGN and KFAC data-parallel and check the results."""
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, loss_func, params, dataset = problem()
    sampler = DistributedSampler(dataset, shuffle=False)
    shard = DataLoader(dataset, batch_size=16, sampler=sampler)
    group = dist.group.WORLD

    G = GGNLinearOperator(model, loss_func, params, shard, process_group=group)
    K = KFACLinearOperator(
        model, loss_func, params, shard, fisher_type="type-2", process_group=group
    )
    manual_seed(1)  # the same vector on every rank
    v = rand(G.shape[1], dtype=float64)
    Gv, Kv = G @ v, K @ v

    # the same products in one process, on all data
    all_data = DataLoader(dataset, batch_size=16)
    G_single = GGNLinearOperator(model, loss_func, params, all_data)
    K_single = KFACLinearOperator(
        model, loss_func, params, all_data, fisher_type="type-2"
    )
    assert Gv.allclose(G_single @ v) and Kv.allclose(K_single @ v)
    print(
        f"rank {rank} of {world_size}: {len(sampler)} of {len(dataset)} data points, "
        f"|Gv| = {Gv.norm():.6f}, |Kv| = {Kv.norm():.6f}: equal to one process",
        flush=True,
    )
    dist.destroy_process_group()


# %%
# Which data points a rank sees
# -----------------------------
#
# The sampler deals the data set out like cards: rank 0 gets the data points 0,
# 2, 4, ..., rank 1 the others, and each rank's loader cuts its shard into
# mini-batches of 16. The sampler needs no process group to tell, so the launching
# process can draw the picture (the ranks skip it).


def shard_picture(num_ranks: int = 2, batch_size: int = 16):
    """Show which rank holds each data point, and in which of its mini-batches.

    Args:
        num_ranks: Number of processes.
        batch_size: Mini-batch size of each rank's loader.
    """
    dataset = problem()[-1]
    batch_of = numpy.full((num_ranks, len(dataset)), numpy.nan)
    for rank in range(num_ranks):
        sampler = DistributedSampler(dataset, num_ranks, rank, shuffle=False)
        for position, index in enumerate(sampler):
            batch_of[rank, index] = position // batch_size
    fig, ax = plt.subplots(figsize=(8, 1.8), layout="constrained")
    image = ax.imshow(batch_of, aspect="auto", cmap="viridis", interpolation="none")
    ax.set_yticks(range(num_ranks), [f"rank {rank}" for rank in range(num_ranks)])
    ax.set_xlabel("data point")
    ticks = range(int(numpy.nanmax(batch_of)) + 1)
    fig.colorbar(image, ax=ax, ticks=ticks).set_label("mini-batch")


if "LOCAL_RANK" not in os.environ:
    shard_picture()

# %%
# Launching the ranks
# -------------------
#
# Under ``torchrun``, the environment holds the rank, and the file runs the code of
# one rank. Otherwise it starts ``torchrun`` (``python -m torch.distributed.run``)
# with two processes on this file, on the loopback interface and a free port, and
# shows what the ranks print. The launched processes import the same ``curvlinops``
# as this one, and each uses one thread.


def launch(script: str, num_ranks: int = 2):
    """Run a script with ``torchrun`` on local processes and print their output.

    Args:
        script: Path of the script.
        num_ranks: Number of processes.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        *(sys.executable, "-m", "torch.distributed.run"),
        f"--nproc_per_node={num_ranks}",
        *("--master_addr=127.0.0.1", f"--master_port={port}", script),
    ]
    package_root = os.path.dirname(os.path.dirname(curvlinops.__file__))
    path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    print("".join(sorted(result.stdout.splitlines(keepends=True))), end="")
    assert result.returncode == 0, result.stderr


if "LOCAL_RANK" in os.environ:  # started by torchrun
    run_rank()
else:  # sphinx-gallery runs this file from its folder, without ``__file__``
    launch(os.path.abspath(globals().get("__file__", "example_distributed.py")))
