"""KFOC's precompute against KFAC's and one gradient.

KFOC takes one pass over the data like KFAC (a forward and one batched backward
pass), records each layer's share of the rearranged curvature block, and then runs
power iterations: in memory on the recorded shares (default), or with two more
passes over the data per iteration if they do not fit into ``max_cache_bytes``
(``passes``: ``max_cache_bytes=0``). Each round times, back to back, a gradient,
KFAC's ``compute_kronecker_factors`` and KFOC's in both modes; the figures are the
medians over rounds of the per-round ratios (so that a machine whose speed drifts
biases numerator and denominator alike). Also reports the power iterations KFOC
needed (default ``tol``) and the memory of its recorded shares. ``--cpu-time``
measures the CPU time of the calling thread instead of wall-clock time (steadier
where many processes share the cores, but blind to other threads).

Writes ``benchmarks/results/kfoc.json``.

Usage: ``python benchmarks/kfoc.py [--problems mlp cnn] [--fisher-type mc]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from statistics import median
from time import perf_counter, thread_time

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from problems import PROBLEMS, Problem  # noqa: E402
from run import RESULTS_DIR, gradient  # noqa: E402

from curvlinops import KFACLinearOperator, KFOCLinearOperator  # noqa: E402


def build(cls, problem: Problem, fisher_type: str, **kwargs):
    """Create a KFAC-type operator on the problem's Linear and Conv2d layers."""
    return cls(
        problem.model,
        problem.loss_func,
        problem.kfac_params,
        problem.data,
        check_deterministic=False,
        fisher_type=fisher_type,
        **kwargs,
    )


def time_once(func, clock) -> float:
    """Return the time of one call ``func()`` in seconds on ``clock``."""
    start = clock()
    func()
    return clock() - start


def recorded_bytes(kfoc: KFOCLinearOperator) -> int:
    """Return the memory of KFOC's recorded shares, one recording pass."""
    _, _, cache = kfoc._recording_pass()
    return sum(terms.nbytes for shares in cache.values() for terms in shares)


def measure(problem: Problem, fisher_type: str, repeats: int, clock) -> dict:
    """Time a gradient, KFAC and KFOC (in memory and with passes) in paired rounds.

    Returns:
        Medians of KFAC's and KFOC's times in multiples of one gradient and of
        KFOC's time relative to KFAC's, with KFOC's iterations and memory.
    """
    kfac = build(KFACLinearOperator, problem, fisher_type)
    in_memory = build(KFOCLinearOperator, problem, fisher_type)
    passes = build(KFOCLinearOperator, problem, fisher_type, max_cache_bytes=0)
    steps = {
        "gradient": gradient(problem),
        "kfac": kfac.compute_kronecker_factors,
        "kfoc": in_memory.compute_kronecker_factors,
        "kfoc passes": passes.compute_kronecker_factors,
    }
    for step in steps.values():  # warm up
        step()
    rounds = [
        {name: time_once(step, clock) for name, step in steps.items()}
        for _ in range(repeats)
    ]
    result = {
        f"{name}/gradient": median(r[name] / r["gradient"] for r in rounds)
        for name in ("kfac", "kfoc", "kfoc passes")
    }
    for name in ("kfoc", "kfoc passes"):
        result[f"{name}/kfac"] = median(r[name] / r["kfac"] for r in rounds)
    result["gradient_ms"] = 1e3 * median(r["gradient"] for r in rounds)
    result["iterations"] = in_memory._iterations
    assert in_memory._iterated_in_memory and passes._iterations == result["iterations"]
    result["recorded_MiB"] = recorded_bytes(in_memory) / 2**20
    return result


def main():
    """Run the benchmark, print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_problems = [p for p in PROBLEMS if p != "resnet18"]
    parser.add_argument("--problems", nargs="+", default=default_problems)
    parser.add_argument("--fisher-type", default="type-2", choices=["type-2", "mc"])
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 5))
    )
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    clock = thread_time if args.cpu_time else perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fisher_type={args.fisher_type!r}, {'CPU' if args.cpu_time else 'wall'} time"
    )
    print("KFOC precompute vs KFAC's, and both in multiples of one gradient")
    header = (
        f"{'problem':<12}{'grad ms':>9}{'KFAC/g':>8}{'KFOC/g':>8}{'KFOC/KFAC':>11}"
        f"{'iters':>7}{'MiB':>8}{'passes/g':>10}{'passes/KFAC':>13}"
    )
    print(header + "\n" + "-" * len(header))
    results = {}
    for name in args.problems:
        problem = PROBLEMS[name]()
        r = results[name] = measure(problem, args.fisher_type, args.repeats, clock)
        print(
            f"{name:<12}{r['gradient_ms']:>9.1f}{r['kfac/gradient']:>8.2f}"
            f"{r['kfoc/gradient']:>8.2f}{r['kfoc/kfac']:>11.2f}{r['iterations']:>7}"
            f"{r['recorded_MiB']:>8.1f}{r['kfoc passes/gradient']:>10.2f}"
            f"{r['kfoc passes/kfac']:>13.2f}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"kfoc_{args.fisher_type}.json"
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
