"""A quick tour of curvlinops: run ``python -m curvlinops.demo``.

Builds a small network on synthetic data, multiplies its Hessian and GGN onto a
vector, finds their top eigenvalues with SciPy's Lanczos method through
``.to_scipy()``, estimates the Hessian's trace with Hutch++, and checks each result
against a dense reference matrix.
"""

from __future__ import annotations

import argparse

import numpy
from scipy.sparse.linalg import eigsh
from torch import manual_seed, rand, randint
from torch.linalg import eigvalsh
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import GGNLinearOperator, HessianLinearOperator, hutchpp_trace
from curvlinops.examples.functorch import functorch_ggn, functorch_hessian


def _problem(num_data: int = 256, batch_size: int = 64):
    """Return a small classifier, its loss, parameters, and batches of data."""
    manual_seed(0)
    model = Sequential(Linear(20, 16), Tanh(), Linear(16, 16), Tanh(), Linear(16, 4))
    X, y = rand(num_data, 20), randint(0, 4, (num_data,))
    data = list(zip(X.split(batch_size), y.split(batch_size)))
    return model, CrossEntropyLoss(), list(model.parameters()), data


def _relative_error(a, b) -> float:
    """Return ``|a - b| / |b|`` for arrays or scalars."""
    return float(numpy.linalg.norm(a - b) / numpy.linalg.norm(b))


def main(k: int = 3) -> dict[str, float]:
    """Run the tour and print what happens.

    Args:
        k: Number of top eigenvalues to compute.

    Returns:
        Relative errors of every computed quantity against its dense reference.
    """
    errors = {}
    model, loss_func, params, data = _problem()
    num_params = sum(p.numel() for p in params)
    print(f"Model: MLP 20-16-16-4 with {num_params} parameters, {len(data)} batches.")

    H = HessianLinearOperator(model, loss_func, params, data)
    G = GGNLinearOperator(model, loss_func, params, data)
    H_dense = functorch_hessian(model, loss_func, params, data).detach()
    G_dense = functorch_ggn(model, loss_func, params, data).detach()

    v = rand(num_params)
    for name, op, dense in [("Hessian", H, H_dense), ("GGN", G, G_dense)]:
        error = errors[f"{name} matvec"] = _relative_error(
            (op @ v).numpy(), (dense @ v).numpy()
        )
        print(f"{name}-vector product: shape {tuple(op.shape)}, rel. error {error:.1e}")

    for name, op, dense in [("Hessian", H, H_dense), ("GGN", G, G_dense)]:
        top = eigsh(op.to_scipy(), k=k, which="LA", return_eigenvectors=False)
        exact = eigvalsh(dense.double())[-k:].numpy()
        error = errors[f"{name} eigenvalues"] = _relative_error(numpy.sort(top), exact)
        print(f"Top-{k} {name} eigenvalues (eigsh): {numpy.round(numpy.sort(top), 4)}")
        print(f"    rel. error vs. dense eigvalsh: {error:.1e}")

    num_matvecs = 150
    trace = float(hutchpp_trace(H, num_matvecs))
    exact = H_dense.trace().item()
    print(
        f"Hessian trace: Hutch++ with {num_matvecs} products {trace:.4f}, "
        f"exact {exact:.4f}"
    )
    errors["Hessian trace"] = abs(trace - exact) / abs(exact)
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="number of eigenvalues")
    main(parser.parse_args().k)
