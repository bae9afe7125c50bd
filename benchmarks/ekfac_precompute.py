"""EKFAC precompute against its budget: KFAC build + eigendecompositions + 2 gradients.

EKFAC's one-off work is KFAC's pass over the data, the eigendecompositions of the
factors, and a second pass for the corrected eigenvalues. The target (performance
issue) is that the whole costs no more than KFAC's build, the factors'
eigendecompositions and two gradients, i.e. that the correction pass costs at most two
gradients. Each round times, back to back, a gradient, KFAC's build, the
eigendecompositions of its factors and EKFAC's precompute; the figure is the median
over rounds of the per-round ratio, so that a machine whose speed drifts (shared
cores) biases numerator and denominator alike. ``--cpu-time`` measures the CPU time
of one thread instead of wall-clock time (steadier where many processes share the
cores). With ``--profile``, also prints the operations that take the most time in
EKFAC's precompute.

Usage: ``python benchmarks/ekfac_precompute.py [--problems mlp cnn] [--fisher-type mc]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import median
from time import perf_counter, thread_time

import torch
from torch.linalg import eigh
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import gradient, quiet_stderr  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

from curvlinops import EKFACLinearOperator, KFACLinearOperator  # noqa: E402

TARGET = 1.0


def build(cls, problem: Problem, fisher_type: str):
    """Create a KFAC-type operator on the problem's Linear and Conv2d layers."""
    return cls(
        problem.model,
        problem.loss_func,
        problem.kfac_params,
        problem.data,
        check_deterministic=False,
        fisher_type=fisher_type,
    )


def eigendecompositions(kfac: KFACLinearOperator):
    """Eigendecompose the (cached) Kronecker factors, as EKFAC does."""
    for factors in (kfac._input_covariances, kfac._gradient_covariances):
        for factor in factors.values():
            eigh(factor)


def time_once(func, clock) -> float:
    """Return the time of one call ``func()`` in seconds on ``clock``."""
    start = clock()
    func()
    return clock() - start


def measure(problem: Problem, fisher_type: str, repeats: int, clock) -> dict:
    """Time the parts of the budget and EKFAC's precompute in paired rounds.

    Returns:
        Medians of each part in multiples of one gradient, and of the ratio of
        EKFAC's precompute to the budget.
    """
    kfac, ekfac = (
        build(cls, problem, fisher_type)
        for cls in (KFACLinearOperator, EKFACLinearOperator)
    )
    steps = {
        "gradient": gradient(problem),
        "kfac": kfac.compute_kronecker_factors,
        "eigh": lambda: eigendecompositions(kfac),
        "ekfac": ekfac.compute_kronecker_factors,
    }
    for step in steps.values():  # warm up
        step()
    rounds = []
    for _ in range(repeats):
        rounds.append({name: time_once(step, clock) for name, step in steps.items()})
    result = {
        name: median(r[name] / r["gradient"] for r in rounds)
        for name in ("kfac", "eigh", "ekfac")
    }
    result["ratio"] = median(
        r["ekfac"] / (r["kfac"] + r["eigh"] + 2 * r["gradient"]) for r in rounds
    )
    result["gradient_ms"] = 1e3 * median(r["gradient"] for r in rounds)
    return result


def print_profile(problem: Problem, fisher_type: str, repeats: int, clock):
    """Print EKFAC's phases in gradients, and the correction's top operations."""
    ekfac = build(EKFACLinearOperator, problem, fisher_type)
    ekfac.compute_kronecker_factors()

    factors = [C for Cs in ekfac._accumulated_factors() for C in Cs.values()]

    def noop(*args):
        pass

    steps = {
        "gradient": gradient(problem),
        "factors' pass": ekfac._accumulated_factors,
        "eigendecompositions": lambda: [eigh(C) for C in factors],
        "correction's data pass": lambda: ekfac._data_pass(noop, noop, per_datum=True),
        "correction": ekfac.compute_eigenvalue_correction,
    }
    rounds = [
        {name: time_once(step, clock) for name, step in steps.items()}
        for _ in range(repeats)
    ]
    phases = {
        name: median(r[name] / r["gradient"] for r in rounds)
        for name in list(steps)[1:]
    }
    phases["correction's contraction"] = (
        phases["correction"] - phases["correction's data pass"]
    )
    for name, value in phases.items():
        print(f"  {name:<30}{value:>8.2f} gradients")
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ekfac.compute_eigenvalue_correction()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"  correction's top operations (self time share of {total / 1e3:.1f} ms):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
        print(f"    {e.key:<50}{e.self_cpu_time_total / total:>8.1%}")


def main():
    """Print EKFAC's precompute ratios (and, optionally, profiles)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [p for p in PROBLEMS if not p.startswith("resnet18")]
    parser.add_argument("--problems", nargs="+", default=names)
    parser.add_argument("--fisher-type", default="mc")
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 7))
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    clock = perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = thread_time
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CPU' if args.cpu_time else 'wall-clock'} time, "
        f"fisher_type={args.fisher_type!r}, median of {args.repeats} rounds"
    )
    print(
        f"{'problem':<12}{'gradient':>10}{'KFAC':>8}{'eigh':>8}{'EKFAC':>8}"
        f"{'EKFAC / (KFAC + eigh + 2 grad)':>34}"
    )
    for name in args.problems:
        problem = PROBLEMS[name]()
        r = measure(problem, args.fisher_type, args.repeats, clock)
        mark = "ok" if r["ratio"] <= TARGET else ">"
        print(
            f"{name:<12}{r['gradient_ms']:>7.1f} ms{r['kfac']:>8.2f}{r['eigh']:>8.2f}"
            f"{r['ekfac']:>8.2f}{r['ratio']:>31.2f} {mark}"
        )
        if args.profile:
            print_profile(problem, args.fisher_type, args.repeats, clock)


if __name__ == "__main__":
    main()
