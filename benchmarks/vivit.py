"""Time the top-k GGN eigenpairs: ViViT (Gram matrix) versus Lanczos (``eigsh``).

For each problem (the MLP and the CNN of ``problems.py``, one mini-batch), report the
median time (over ``--repeats`` runs) to obtain the ``k`` leading GGN eigenpairs

- ``vivit``: one forward and backward pass with BackPACK and
  :class:`curvlinops.vivit.EighComputation`, which eigen-decomposes the Gram matrix
  of the GGN's factor (size ``N * C``; ``N * M`` with ``M`` Monte-Carlo samples;
  smaller with sub-sampling). Variants: exact, exact on a sub-batch, MC with one
  sample;
- ``lanczos``: ``scipy.sparse.linalg.eigsh(G.to_scipy(), k, which='LA')`` on the
  :class:`curvlinops.GGNLinearOperator` of the same mini-batch (exact GGN),

as a multiple of one gradient evaluation. ``rel. error`` compares each method's k
eigenvalues with Lanczos' (the approximate variants target a different matrix, so
their error measures the approximation). ``gram`` is the Gram matrix size, ``matvecs``
the number of GGN-vector products Lanczos needed.

Usage: ``python benchmarks/vivit.py [--problems mlp cnn] [--k 10] [--repeats 3]
[--threads T]``
"""

from __future__ import annotations

import os

# SciPy's OpenBLAS threads spin after each call and steal the cores from PyTorch's
# threads, which slows eigsh on PyTorch operators about 3x on a 2-core CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from backpack import backpack, extend
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import gradient, timed  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

from curvlinops import GGNLinearOperator  # noqa: E402
from curvlinops.vivit import EighComputation  # noqa: E402

# variant name -> EighComputation keyword arguments (given the batch size)
VIVIT_VARIANTS = {
    "vivit exact": lambda N: {},
    "vivit exact, N/8": lambda N: {"subsampling": list(range(N // 8))},
    "vivit mc=1": lambda N: {"mc_samples": 1},
}


def vivit_top_k(problem: Problem, k: int, kwargs: dict) -> tuple[callable, dict]:
    """Build a function that returns the top-k eigenvalues via ViViT.

    Returns the function and a dict that records the Gram matrix size.
    """
    model = extend(deepcopy(problem.model))
    loss_func = extend(deepcopy(problem.loss_func))
    params = [p for p in model.parameters() if p.requires_grad]
    info = {}

    def criterion(evals: torch.Tensor) -> list[int]:
        info["gram"] = evals.numel()
        return list(range(evals.numel() - k, evals.numel()))

    group = {"params": params, "criterion": criterion}

    def run() -> torch.Tensor:
        computation = EighComputation(warn_small_eigvals=0.0, **kwargs)
        hook = computation.get_extension_hook([group])
        torch.manual_seed(0)
        with backpack(computation.get_extension(), extension_hook=hook):
            loss_func(model(problem.X), problem.y).backward()
        evals, _ = computation.get_result(group)
        return evals

    return run, info


def lanczos_top_k(problem: Problem, k: int) -> tuple[callable, dict]:
    """Build a function that returns the top-k eigenvalues via Lanczos (eigsh).

    Returns the function and a dict that records the number of matvecs.
    """
    G = GGNLinearOperator(
        problem.model,
        problem.loss_func,
        problem.params,
        problem.data,
        check_deterministic=False,
    ).to_scipy()
    info = {}

    def run() -> torch.Tensor:
        info["matvecs"] = 0

        def matvec(x):
            info["matvecs"] += 1
            return G @ x

        counted = LinearOperator(G.shape, matvec=matvec, dtype=G.dtype)
        evals, _ = eigsh(counted, k=k, which="LA")
        return torch.from_numpy(evals).sort().values

    return run, info


def main():
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 3))
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "Full backward hook is firing")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"top-{args.k} GGN eigenpairs (ms and multiples of one gradient)")
    header = (
        f"{'problem':<8} {'method':<18} {'time [ms]':>10} {'x grad':>8} "
        f"{'gram':>6} {'matvecs':>8} {'rel. error':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in args.problems:
        problem = PROBLEMS[name]()
        t_grad = timed(gradient(problem), args.repeats)
        print(f"{name:<8} {'gradient':<18} {1e3 * t_grad:>10.1f} {1:>8.2f}")
        lanczos, lanczos_info = lanczos_top_k(problem, args.k)
        reference = lanczos()
        methods = {"lanczos": (lanczos, lanczos_info)}
        for variant, make_kwargs in VIVIT_VARIANTS.items():
            kwargs = make_kwargs(problem.X.shape[0])
            methods[variant] = vivit_top_k(problem, args.k, kwargs)
        for method, (func, info) in methods.items():
            t = timed(func, args.repeats, warmup=1)
            error = ((func() - reference).norm() / reference.norm()).item()
            print(
                f"{name:<8} {method:<18} {1e3 * t:>10.1f} {t / t_grad:>8.2f} "
                f"{info.get('gram', ''):>6} {info.get('matvecs', ''):>8} "
                f"{error:>11.2e}"
            )


if __name__ == "__main__":
    main()
