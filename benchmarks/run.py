"""Measure curvature products as multiples of one gradient evaluation.

For every problem and operator, report the median (over ``--repeats`` rounds) of

- ``precompute``: one-off work (Kronecker factors; EKFAC's eigendecompositions and
  eigenvalue correction; the KFAC inverse's inverted factors),
- ``matvec``: one product with a vector,
- ``per col.``: one product with an 8-column matrix, divided by 8,
- ``col/vec``: the per-column cost over the matvec's,
- ``memory``: the peak memory allocated during one matvec,

each divided by the same quantity for one gradient on the same mini-batch (see
``measure.py``), with the targets of ``targets.py`` beside them (``ok``/``>``).
``hessian (torch)`` is PyTorch's own reverse-over-reverse Hessian product, the floor
of the Hessian's. Writes ``benchmarks/results/results.json`` and plots
``benchmarks/results/ratios.png``; ``--markdown`` prints the README's table (from
a run, or from the JSON with ``--from-json``).

Usage: ``python benchmarks/run.py [--problems mlp cnn] [--operators hessian ggn]
[--repeats 7] [--markdown] [--from-json] [--cpu-time]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import (  # noqa: E402
    gradient,
    measure_products,
    peak_memory,
    timed,
    use_cpu_time,
)
from operators import OPERATORS, PRECOMPUTE  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402
from targets import KRONECKER, target  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
METRICS = ("precompute", "matvec", "per col.", "col/vec", "memory")
DEFAULT_PROBLEMS = ["mlp", "cnn", "transformer", "transformer256"]


def eigendecomposition_ratio(problem: Problem, repeats: int) -> float | None:
    """Time the eigendecompositions of KFAC's factors, relative to a gradient.

    Returns:
        The ratio, or ``None`` if the KFAC operator does not expose its factors.
    """
    op = OPERATORS["kfac"](problem)
    op.compute_kronecker_factors()
    if not hasattr(op, "_factor_pairs"):
        return None
    factors = [f for pair in op._factor_pairs() for f in pair if f is not None]

    def eigh():
        for factor in factors:
            torch.linalg.eigh(factor)

    grad_time = timed(gradient(problem), repeats, device=problem.device)
    return timed(eigh, repeats, 1, problem.device) / grad_time


def measure(problem: Problem, name: str, repeats: int) -> dict[str, tuple]:
    """Measure one operator on a problem (see ``measure_products``)."""
    op = OPERATORS[name](problem)
    return measure_products(problem, op, repeats, PRECOMPUTE.get(name))


def format_ratio(ratio: float | None, goal: float | None) -> str:
    """Format a ratio with a mark whether it meets its target."""
    if ratio is None:
        return f"{'':>9}"
    mark = "" if goal is None else (" ok" if ratio <= goal else " >")
    return f"{ratio:6.2f}{mark:<3}"


def run_problem(problem_name: str, names: list[str], repeats: int) -> dict:
    """Measure all operators on one problem, printing a row per operator."""
    problem = PROBLEMS[problem_name]()
    grad_time = timed(gradient(problem), repeats, device=problem.device)
    grad_memory = peak_memory(gradient(problem), problem.device)
    entry = {
        "device": str(problem.device),
        "gradient": {"seconds": grad_time, "memory_bytes": grad_memory},
        "operators": {},
    }
    print(
        f"{problem_name:<15} {'gradient':<20}{'':>12}{1e3 * grad_time:>9.2f} ms"
        f"{'':>24}{grad_memory / 2**20:>9.1f} MB"
    )
    goals = {}
    if "ekfac" in names:
        eigh = eigendecomposition_ratio(problem, repeats)
        entry["kfac eigendecompositions"] = eigh
    for name in names:
        values = measure(problem, name, repeats)
        if name == "kfac" and entry.get("kfac eigendecompositions") is not None:
            # issue 18: EKFAC precompute <= KFAC build + eigendecompositions + 2
            build = values["precompute"][1]
            goals["ekfac"] = build + entry["kfac eigendecompositions"] + 2.0
        result = {}
        for metric, (value, ratio) in values.items():
            goal = target(problem_name, name, metric)
            if name in goals and metric == "precompute":
                goal = goals[name]
            result[metric] = {"value": value, "ratio": ratio, "target": goal}
        entry["operators"][name] = result
        cells = [
            format_ratio(
                result.get(m, {}).get("ratio"), result.get(m, {}).get("target")
            )
            for m in METRICS
        ]
        print(f"{problem_name:<15} {name:<20}" + "".join(f"{c:>12}" for c in cells))
    return entry


def plot(results: dict, path: Path):
    """Plot matvec and per-column costs of every operator, one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    axes = axes if len(results) > 1 else [axes]
    for ax, (problem, entry) in zip(axes, results.items()):
        names = list(entry["operators"])
        for offset, metric in [(-0.2, "matvec"), (0.2, "per col.")]:
            ratios = [
                entry["operators"][n].get(metric, {}).get("ratio", 0) for n in names
            ]
            ax.bar([i + offset for i in range(len(names))], ratios, 0.4, label=metric)
        ax.axhline(1.0, color="black", linewidth=0.8, label="one gradient")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(problem)
        ax.set_ylabel("cost / gradient")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


README_OPERATORS = {
    "hessian": "Hessian",
    "hessian (torch)": "Hessian, PyTorch's own",
    "ggn": "GGN",
    "ef": "empirical Fisher",
    "mc_fisher": "MC Fisher",
    "jacobian": "Jacobian",
    "transposed_jacobian": "transposed Jacobian",
    "kfac": "KFAC (precompute)",
    "ekfac": "EKFAC (precompute)",
    "kfac_inverse": "KFAC inverse (precompute)",
}
README_PROBLEMS = {
    "mlp": "MLP",
    "cnn": "CNN",
    "transformer": "transformer",
    "transformer256": "transformer, seq. 256",
    "resnet18": "ResNet-18",
}


def markdown(results: dict) -> str:
    """Return the README's table: matvec / per col. / memory, per problem.

    Kronecker-factored operators show ``matvec / per col. (precompute)``.
    """

    def cell(entry: dict, name: str) -> str:
        figures = entry["operators"].get(name)
        if figures is None:
            return ""

        def fmt(metric):
            ratio = figures.get(metric, {}).get("ratio")
            return "-" if ratio is None else f"{ratio:.2f}"

        if name in KRONECKER:
            precompute = figures.get("precompute", {}).get("ratio")
            extra = "" if precompute is None else f" ({precompute:.2g})"
            return f"{fmt('matvec')} / {fmt('per col.')}{extra}"
        return f"{fmt('matvec')} / {fmt('per col.')} / {fmt('memory')}"

    problems = list(results)
    header = ["operator"] + [
        f"{README_PROBLEMS.get(p, p)} matvec / per col. / memory" for p in problems
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = [
        n
        for n in README_OPERATORS
        if any(n in results[p]["operators"] for p in problems)
    ]
    for name in names:
        row = [README_OPERATORS[name]] + [cell(results[p], name) for p in problems]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    """Run the benchmark, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_problems = list(DEFAULT_PROBLEMS)
    if torch.cuda.is_available():
        default_problems.append("resnet18_cuda")
    parser.add_argument("--problems", nargs="+", default=default_problems)
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS))
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 7))
    )
    parser.add_argument("--markdown", action="store_true", help="print README table")
    parser.add_argument(
        "--from-json", action="store_true", help="table from results.json, no run"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time one thread's CPU time (robust on a shared machine)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        use_cpu_time()
    path = RESULTS_DIR / "results.json"
    if args.from_json:
        with open(path) as file:
            print(markdown(json.load(file)))
        return

    clock = "CPU time of one thread" if args.cpu_time else "wall-clock time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}")
    print(f"multiples of one gradient; median of {args.repeats} runs; 'ok'/'>': target")
    header = f"{'problem':<15} {'operator':<20}" + "".join(f"{m:>12}" for m in METRICS)
    print(header + "\n" + "-" * len(header))
    results = {p: run_problem(p, args.operators, args.repeats) for p in args.problems}
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    plot(results, RESULTS_DIR / "ratios.png")
    print(f"Wrote {path} and {RESULTS_DIR / 'ratios.png'}")
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
