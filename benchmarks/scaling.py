"""How the costs relative to a gradient change with batch size, width and model size.

- ``batch``: the MLP 784-128-64-10 at batch sizes 32 to 1024,
- ``width``: the MLP 784-H-64-10 (batch 256) with hidden widths H of 128 to 2048,
- ``resnet18``: a ResNet-18 on 32x32 images, batch 32 (``--resnet-batch``), every
  operator (matvec, precompute and memory; ``--columns`` adds 8-column products).

Prints the figures with their targets (``targets.py``), writes
``benchmarks/results/scaling.json`` and plots ``scaling_batch.png``,
``scaling_width.png`` and ``resnet18.png`` there.

Usage: ``python benchmarks/scaling.py [--sweeps batch width resnet18]
[--operators hessian ggn] [--repeats 3] [--columns] [--cpu-time]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import measure_products, use_cpu_time  # noqa: E402
from operators import OPERATORS, PRECOMPUTE  # noqa: E402
from problems import mlp, resnet18_cpu  # noqa: E402
from run import METRICS, RESULTS_DIR, format_ratio  # noqa: E402
from targets import target  # noqa: E402

BATCH_SIZES = [32, 64, 128, 256, 512, 1024]
WIDTHS = [128, 256, 512, 1024, 2048]
SWEEP_METRICS = ("precompute", "matvec")


def _cells(figures: dict, problem: str, op_name: str, metrics) -> str:
    """Format figures with their targets, one cell per metric."""
    return "".join(
        f"{format_ratio(figures.get(m, (0, None))[1], target(problem, op_name, m)):>12}"
        for m in metrics
    )


def sweep(name: str, values: list[int], make, operators, repeats: int) -> dict:
    """Measure every operator's matvec (and precompute) on each problem size."""
    results = {}
    for value in values:
        problem = make(value)
        results[value] = {}
        for op_name in operators:
            op = OPERATORS[op_name](problem)
            figures = measure_products(
                problem, op, repeats, PRECOMPUTE.get(op_name), SWEEP_METRICS
            )
            results[value][op_name] = {m: r for m, (_, r) in figures.items()}
            cells = _cells(figures, "mlp", op_name, SWEEP_METRICS)
            print(f"{name:<8} {value:>6} {op_name:<20}{cells}", flush=True)
    return results


def resnet(operators, repeats: int, columns: bool) -> dict:
    """Measure every operator on the ResNet-18."""
    problem = resnet18_cpu()
    metrics = ("precompute", "matvec", "memory") + (("per col.",) if columns else ())
    results = {}
    for op_name in operators:
        op = OPERATORS[op_name](problem)
        figures = measure_products(
            problem, op, repeats, PRECOMPUTE.get(op_name), metrics
        )
        results[op_name] = {m: r for m, (_, r) in figures.items()}
        cells = _cells(figures, "resnet18", op_name, METRICS)
        print(f"{'resnet18':<15} {op_name:<20}{cells}", flush=True)
    return results


def plot_sweep(results: dict, xlabel: str, path: Path):
    """Plot matvec ratio against the swept size, one line per operator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(results, key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    for op_name in results[values[0]]:
        ratios = [results[v][op_name].get("matvec") for v in values]
        ax.plot([int(v) for v in values], ratios, marker="o", label=op_name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("matvec cost / gradient")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_resnet(results: dict, path: Path):
    """Bar chart of the ResNet-18 matvec ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(names)), [results[n].get("matvec", 0) for n in names])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("matvec cost / gradient")
    ax.set_title("ResNet-18, 32x32 images, batch 32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    """Run the sweeps, print, write JSON and plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", default=["batch", "width", "resnet18"])
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS))
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 3))
    )
    parser.add_argument("--columns", action="store_true", help="ResNet per column")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time one thread's CPU time (robust on a shared machine)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        use_cpu_time()
    clock = "CPU time of one thread" if args.cpu_time else "wall-clock time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}")
    print(f"multiples of one gradient; median of {args.repeats}; 'ok'/'>': target")
    RESULTS_DIR.mkdir(exist_ok=True)
    results = {}
    if "batch" in args.sweeps:
        results["batch"] = sweep(
            "batch",
            BATCH_SIZES,
            lambda b: mlp(batch_size=b),
            args.operators,
            args.repeats,
        )
        plot_sweep(
            results["batch"], "batch size (MLP)", RESULTS_DIR / "scaling_batch.png"
        )
    if "width" in args.sweeps:
        results["width"] = sweep(
            "width", WIDTHS, lambda w: mlp(width=w), args.operators, args.repeats
        )
        plot_sweep(
            results["width"], "hidden width (MLP)", RESULTS_DIR / "scaling_width.png"
        )
    if "resnet18" in args.sweeps:
        results["resnet18"] = resnet(args.operators, args.repeats, args.columns)
        plot_resnet(results["resnet18"], RESULTS_DIR / "resnet18.png")
    with open(RESULTS_DIR / "scaling.json", "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {RESULTS_DIR / 'scaling.json'} and the plots")


if __name__ == "__main__":
    main()
