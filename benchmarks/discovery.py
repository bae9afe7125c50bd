"""What it costs KFAC to find the layers of a model, and to watch their uses.

KFAC-type operators find every use of a parameter as the weight of a linear map or
convolution with a torch function mode (``curvlinops/_kfac_uses.py``). For models
whose ``Linear``/``Conv2d`` modules own the parameters, the modules tell the layers
(no forward pass); for functional models ``model_func(params, X)``, reused or tied
weights, one forward pass under the mode finds them, once per operator. Every pass
over the data then runs under the mode. This script reports, on the transformer
problem (and its functional twin, ``functional_call`` on a parameter dict):

- ``discovery``: finding the layers, per operator (module path / functional path),
- ``watched forward``: a forward pass under the recording mode, vs. a plain one,
- ``factors``: KFAC's factor computation (module / functional), vs. a gradient,
- the alternatives that trace the model, for comparison: ``make_fx`` (real and
  symbolic shapes), ``torch.export`` and ``torch.fx.symbolic_trace``, each at two
  batch sizes (a trace with concrete shapes is only valid for its batch size).

All times are medians over ``--repeats`` runs, in ms, and medians of the per-round
ratios to one gradient on the same mini-batch, timed right before (to a plain
forward pass for the watched one). Writes ``benchmarks/results/discovery.json``.

Usage: ``python benchmarks/discovery.py [--problems transformer mlp]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from statistics import median

import torch
from torch.func import functional_call

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from measure import gradient, time_once  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402
from run import RESULTS_DIR  # noqa: E402

from curvlinops import KFACLinearOperator  # noqa: E402
from curvlinops._kfac_uses import LayerUses  # noqa: E402


def _kfac(problem: Problem, functional: bool) -> KFACLinearOperator:
    """KFAC of the problem's Linear/Conv2d layers, module or functional twin."""
    params = problem.kfac_params
    if functional:
        names = {id(p): n for n, p in problem.model.named_parameters()}
        params = {names[id(p)]: p for p in params}

        def model_func(p, X):
            return functional_call(problem.model, p, (X,))

        model = model_func
    else:
        model = problem.model
    return KFACLinearOperator(
        model, problem.loss_func, params, problem.data, check_deterministic=False
    )


def _tracers(problem: Problem) -> dict:
    """Tracing alternatives: name -> function of the input that traces the model."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, params = problem.model, dict(problem.model.named_parameters())

    def functional(p, x):
        return functional_call(model, p, (x,))

    return {
        "make_fx (real)": lambda X: make_fx(functional)(params, X),
        "make_fx (symbolic)": lambda X: make_fx(functional, tracing_mode="symbolic")(
            params, X
        ),
        "torch.export": lambda X: torch.export.export(model, (X,)),
        "fx.symbolic_trace": lambda X: torch.fx.symbolic_trace(model),
    }


def _round_robin(
    items: dict[str, tuple], repeats: int
) -> dict[str, tuple[float, float]]:
    """Time functions against references, all of them in every round.

    Each round times every item's reference right before the item, so that a
    machine whose speed drifts (shared cores) biases all items alike.

    Args:
        items: Name mapped to ``(function, reference)``.
        repeats: Number of rounds (after one warm-up round).

    Returns:
        Name mapped to the median time (seconds) and median per-round ratio.
    """
    times = {name: [] for name in items}
    ratios = {name: [] for name in items}
    for round_ in range(repeats + 1):
        for name, (func, reference) in items.items():
            reference_time = time_once(reference)
            seconds = time_once(func)
            if round_ > 0:
                times[name].append(seconds)
                ratios[name].append(seconds / reference_time)
    return {name: (median(times[name]), median(ratios[name])) for name in items}


def measure(problem: Problem, repeats: int) -> dict[str, tuple[float, float]]:
    """Time discovery, watched forward passes, factors, and tracing.

    Returns:
        Per measurement, the median time in seconds and the median ratio to the
        time of its reference, measured right before it in each round (one
        gradient; one plain forward pass for the watched forward pass).
    """
    grad = gradient(problem)
    module, functional = _kfac(problem, False), _kfac(problem, True)
    params, model, X = problem.kfac_params, problem.model, problem.X

    def forward():
        with torch.no_grad():
            model(X)

    def watched():
        with torch.no_grad(), LayerUses(module._mapping, params, module._labels, False):
            model(X)

    items = {
        "gradient": (grad, grad),
        "discovery (modules)": (
            lambda: module._mapping_from_modules(params, model),
            grad,
        ),
        "discovery (functional)": (functional._discover_mapping, grad),
        "forward": (forward, grad),
        "watched forward / forward": (watched, forward),
        "factors (modules)": (module.compute_kronecker_factors, grad),
        "factors (functional)": (functional.compute_kronecker_factors, grad),
    }
    half = X[: len(X) // 2]
    for name, trace in _tracers(problem).items():
        for size, inputs in [(len(X), X), (len(half), half)]:
            items[f"{name}, batch {size}"] = (lambda i=inputs, t=trace: t(i), grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _round_robin(items, repeats)


def main():
    """Print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["transformer"])
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("REPEATS", 7))
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("KFAC's layer discovery and use recording vs. tracing (median times)")
    all_results = {}
    print(f"{'problem':<12} {'':<34} {'time':>13} {'ratio':>8}")
    for name in args.problems:
        results = measure(PROBLEMS[name](), args.repeats)
        all_results[name] = {
            what: {"seconds": seconds, "ratio": ratio}
            for what, (seconds, ratio) in results.items()
        }
        for what, (seconds, ratio) in results.items():
            print(f"{name:<12} {what:<34} {1e3 * seconds:>10.2f} ms {ratio:>8.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / "discovery.json", "w") as file:
        json.dump(all_results, file, indent=2)
    print(f"Wrote {RESULTS_DIR / 'discovery.json'}")


if __name__ == "__main__":
    main()
