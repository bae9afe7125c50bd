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

import torch
from torch.func import functional_call

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from problems import PROBLEMS, Problem  # noqa: E402
from run import RESULTS_DIR, gradient, timed_ratio  # noqa: E402

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

    results = {
        "gradient": timed_ratio(grad, grad, repeats),
        "discovery (modules)": timed_ratio(
            lambda: module._mapping_from_modules(params, model), grad, repeats
        ),
        "discovery (functional)": timed_ratio(
            functional._discover_mapping, grad, repeats
        ),
        "forward": timed_ratio(forward, grad, repeats),
        "watched forward / forward": timed_ratio(watched, forward, repeats),
        "factors (modules)": timed_ratio(
            module.compute_kronecker_factors, grad, repeats
        ),
        "factors (functional)": timed_ratio(
            functional.compute_kronecker_factors, grad, repeats
        ),
    }
    half = X[: len(X) // 2]
    for name, trace in _tracers(problem).items():
        for size, inputs in [(len(X), X), (len(half), half)]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    call = lambda i=inputs, t=trace: t(i)  # noqa: E731
                    value = timed_ratio(call, grad, max(repeats // 3, 1), 1)
                except Exception:  # noqa: BLE001 (report that it cannot trace)
                    value = (float("nan"), float("nan"))
            results[f"{name}, batch {size}"] = value
    return results


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
