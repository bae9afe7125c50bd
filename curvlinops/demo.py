"""A quick tour of curvlinops: run ``python -m curvlinops.demo``.

Builds a small network on synthetic data, multiplies its Hessian and GGN onto a
vector, finds their top eigenvalues with SciPy's Lanczos method through
``.to_scipy()``, estimates the Hessian's trace with Hutch++, and checks each result
against a dense reference matrix. With ``--picture FILE`` (as ``make demo`` runs
it), it ends by drawing the Hessian's spectral density (from Lanczos quadratures)
next to the top eigenvalues, into a PNG file; this needs matplotlib, which
``import curvlinops`` does not, so the tour runs without it from a bare install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy
from scipy.sparse.linalg import eigsh
from torch import manual_seed, rand, randint
from torch.linalg import eigvalsh
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    hutchpp_trace,
    lanczos_approximate_spectrum,
)
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


def _draw(path: Path, density: tuple, exact, top: dict, ncv: int):
    """Draw the spectral density and the top eigenvalues into a PNG file.

    Args:
        path: Where to write the picture.
        density: Grid and density of the Hessian's spectrum (Lanczos).
        exact: The Hessian's eigenvalues from the dense matrix.
        top: Top eigenvalues (iterative, dense) keyed by the matrix's name.
        ncv: Number of Lanczos vectors behind the density.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "The demo's picture needs matplotlib: `pip install matplotlib`, or run "
            "`make demo`."
        ) from error
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    left.hist(exact, bins=80, density=True, color="0.8", label="dense eigenvalues")
    left.plot(*density, label=f"Lanczos quadrature ({ncv} products)")
    left.set(yscale="log", ylim=(1e-3, None), xlabel="eigenvalue", ylabel="density")
    left.set_title("Hessian spectral density")
    for (name, (iterative, dense)), marker in zip(top.items(), "os"):
        rank = numpy.arange(1, len(dense) + 1)
        right.plot(rank, dense[::-1], marker, mfc="none", ms=9, label=f"{name}, dense")
        right.plot(
            rank, iterative[::-1], "k.", label="eigsh" if marker == "s" else None
        )
    right.set(xticks=rank, xlabel="rank", ylabel="eigenvalue")
    right.set_title("Top eigenvalues")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(k: int = 3, picture: str | Path | None = None):
    """Run the tour and print what happens.

    Args:
        k: Number of top eigenvalues to compute.
        picture: Where to write the picture of the Hessian's spectral density and
            top eigenvalues (PNG, needs matplotlib). ``None`` (default) draws no
            picture.

    Returns:
        Relative errors of every computed quantity against its dense reference.
    """
    errors, top = {}, {}
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
        iterative = numpy.sort(
            eigsh(op.to_scipy(), k=k, which="LA", return_eigenvectors=False)
        )
        exact = eigvalsh(dense.double())[-k:].numpy()
        error = errors[f"{name} eigenvalues"] = _relative_error(iterative, exact)
        top[name] = (iterative, exact)
        print(f"Top-{k} {name} eigenvalues (eigsh): {numpy.round(iterative, 4)}")
        print(f"    rel. error vs. dense eigvalsh: {error:.1e}")

    num_matvecs = 150
    trace = float(hutchpp_trace(H, num_matvecs))
    exact = H_dense.trace().item()
    print(
        f"Hessian trace: Hutch++ with {num_matvecs} products {trace:.4f}, "
        f"exact {exact:.4f}"
    )
    errors["Hessian trace"] = abs(trace - exact) / abs(exact)

    if picture is not None:
        ncv, largest = 48, float(top["Hessian"][0][-1])  # known from eigsh
        numpy.random.seed(0)  # Lanczos starts from a random vector
        density = lanczos_approximate_spectrum(
            H, ncv, num_points=512, boundaries=(None, largest)
        )
        exact = eigvalsh(H_dense.double()).numpy()
        Path(picture).parent.mkdir(parents=True, exist_ok=True)
        _draw(Path(picture), density, exact, top, ncv)
        print(f"Picture of the spectral density and top eigenvalues: {picture}")
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="number of eigenvalues")
    parser.add_argument(
        "--picture",
        default=None,
        help="PNG file to write (needs matplotlib); default: no picture",
    )
    args = parser.parse_args()
    main(args.k, None if args.picture is None else Path(args.picture).resolve())
