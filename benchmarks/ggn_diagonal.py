"""Time the GGN diagonal as a multiple of one gradient, against its goal of C gradients.

For each problem of ``problems.py`` (one mini-batch), report the median time (over
``--repeats`` runs) of :meth:`curvlinops.GGNDiagonalLinearOperator.compute_diagonal`

- ``exact``: ``mc_samples=0``, backpropagating the ``C`` columns of the loss
  Hessian's square root (``C`` outputs per datum),
- ``mc=1``: one sampled gradient per datum,

divided by the time of one gradient on the same mini-batch (median of per-round
ratios, as in ``run.py``). The goal for ``exact`` is at most ``C`` gradients. For
comparison, ``hutchinson@eq`` is the relative error of Hutchinson's diagonal
estimate with as many GGN-vector products as the exact diagonal's cost in
gradients (a GGN-vector product costs more than a gradient, so this favours
Hutchinson), and ``mc=1`` reports its relative error too.

Writes ``benchmarks/results/ggn_diagonal.json``.

Usage: ``python benchmarks/ggn_diagonal.py [--problems mlp cnn] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import gradient, timed_ratio  # noqa: E402
from problems import PROBLEMS  # noqa: E402
from run import RESULTS_DIR  # noqa: E402

from curvlinops import GGNDiagonalLinearOperator, GGNLinearOperator  # noqa: E402
from curvlinops.diagonal import hutchinson_diag  # noqa: E402

VARIANTS = {"exact": 0, "mc=1": 1}


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Return the relative error in the Euclidean norm."""
    return ((estimate - exact).norm() / exact.norm()).item()


def measure(problem, repeats: int) -> dict:
    """Time the exact and MC diagonals and compare with Hutchinson at equal cost."""
    args = (problem.model, problem.loss_func, problem.params, problem.data)
    num_outputs = problem.model(problem.X[:1]).numel()
    result = {"C": num_outputs}
    diagonals = {}
    for name, mc_samples in VARIANTS.items():
        D = GGNDiagonalLinearOperator(
            *args, check_deterministic=False, mc_samples=mc_samples
        )
        seconds, ratio = timed_ratio(
            D.compute_diagonal, gradient(problem), repeats, 1, problem.device
        )
        diagonals[name] = torch.cat([d.flatten() for d in D.compute_diagonal()])
        result[name] = {"seconds": seconds, "ratio": ratio}
    exact = diagonals["exact"]
    result["mc=1"]["error"] = relative_error(diagonals["mc=1"], exact)
    G = GGNLinearOperator(*args, check_deterministic=False)
    num_matvecs = max(1, round(result["exact"]["ratio"]))
    generator = torch.Generator(device=problem.device).manual_seed(0)
    estimate = hutchinson_diag(G, num_matvecs, generator=generator)
    result["hutchinson@eq"] = {"matvecs": num_matvecs}
    result["hutchinson@eq"]["error"] = relative_error(estimate, exact)
    return result


def main():
    """Run the benchmark, print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_problems = [p for p in PROBLEMS if not p.startswith("resnet18")]
    if torch.cuda.is_available():
        default_problems.append("resnet18_cuda")
    parser.add_argument("--problems", nargs="+", default=default_problems)
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 5))
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("GGN diagonal, multiples of one gradient (goal for exact: <= C)")
    header = (
        f"{'problem':<12}{'C':>5}{'exact':>10}{'goal':>6}{'mc=1':>10}"
        f"{'mc=1 err':>10}{'hutch@eq err':>14}"
    )
    print(header + "\n" + "-" * len(header))
    results = {}
    for name in args.problems:
        r = results[name] = measure(PROBLEMS[name](), args.repeats)
        mark = "ok" if r["exact"]["ratio"] <= r["C"] else ">"
        print(
            f"{name:<12}{r['C']:>5}{r['exact']['ratio']:>10.2f}{mark:>6}"
            f"{r['mc=1']['ratio']:>10.2f}{r['mc=1']['error']:>10.2f}"
            f"{r['hutchinson@eq']['error']:>14.2f}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "ggn_diagonal.json", "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {RESULTS_DIR / 'ggn_diagonal.json'}")


if __name__ == "__main__":
    main()
