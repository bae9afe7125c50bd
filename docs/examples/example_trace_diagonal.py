r"""Trace, diagonal and Frobenius norm estimation
==============================================

The trace and the diagonal of a curvature matrix appear in generalization
measures, pruning criteria and preconditioners, but reading them off requires
the full matrix. Randomized estimators approximate them from a few
matrix-vector products. This tutorial compares

- Hutchinson's method, Hutch++ and XTrace for the trace,
- Hutchinson's method and XDiag for the diagonal, and
- Hutchinson's method for the squared Frobenius norm

on the generalized Gauss-Newton matrix (GGN) of a small network, and shows how
their errors decrease with the number of products.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import numpy
from torch import Generator, float64, manual_seed, rand, randint
from torch.linalg import eigvalsh
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import (
    GGNLinearOperator,
    HutchinsonTraceEstimator,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from curvlinops.examples.functorch import functorch_ggn

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small classifier on synthetic data, in double precision. For reference, we
# compute the dense GGN and its trace, diagonal and squared Frobenius norm.

manual_seed(0)
num_data = 64 if FAST else 256
X, y = rand(num_data, 8, dtype=float64), randint(0, 4, (num_data,))
data = list(zip(X.split(32), y.split(32)))

model = Sequential(Linear(8, 16), Tanh(), Linear(16, 16), Tanh(), Linear(16, 4)).to(
    float64
)
loss_func = CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]

G = GGNLinearOperator(model, loss_func, params, data)
G_dense = functorch_ggn(model, loss_func, params, data).detach()
trace, diagonal, squared_fro = G_dense.trace(), G_dense.diag(), (G_dense**2).sum()
print(f"GGN of shape {G.shape}, trace {trace:.4f}")

# %%
# A few eigenvalues of the GGN are much larger than the others: the spectrum
# decays fast, as is typical for neural networks. This is what the more advanced
# estimators exploit.

eigenvalues = eigvalsh(G_dense).flip(0)
print("largest eigenvalues:", eigenvalues[:6].numpy().round(4))
print(f"fraction of the trace in the top 3: {eigenvalues[:3].sum() / trace:.2f}")

# %%
# The estimators
# --------------
#
# Each estimator takes an operator and a budget of matrix-vector products
# ``num_matvecs``, and multiplies the operator onto its vectors in batches, each
# batch in one pass over the data: Hutchinson's method needs one batched
# product, the others two (the vectors of the second depend on the first).
#
# - :func:`~curvlinops.hutchinson_trace` averages :math:`\mathbf{v}^\top
#   \mathbf{G}\mathbf{v}` over random vectors with :math:`\mathbb{E}[\mathbf{v}
#   \mathbf{v}^\top] = \mathbf{I}`. Its error decays as :math:`1/\sqrt{K}` with
#   the number of products :math:`K`.
# - :func:`~curvlinops.hutchpp_trace` (Hutch++) spends two thirds of the budget
#   on finding the dominant eigenspace, whose trace it computes exactly, and the
#   rest on Hutchinson's method for the remainder. For positive semi-definite
#   matrices, its error decays as :math:`1/K`.
# - :func:`~curvlinops.xtrace` (XTrace) uses every random vector both for the
#   eigenspace and for the remainder, which makes it more accurate still.
#
# All three are unbiased. For reproducible results, pass a
# :class:`torch.Generator`:

generator = Generator().manual_seed(0)
for estimator in [hutchinson_trace, hutchpp_trace, xtrace]:
    estimate = estimator(G, 24, generator=generator)
    error = abs(estimate - trace) / trace
    print(f"{estimator.__name__:>16}: {estimate:.4f} (relative error {error:.1e})")

# %%
# Convergence
# -----------
#
# We repeat each estimator with different random vectors for growing budgets
# (multiples of 6, so that Hutch++ can split them into thirds and XTrace into
# halves) and record the relative errors.

budgets = [6, 12, 24, 48, 96] if FAST else [6, 12, 24, 48, 96, 192]
num_repeats = 5 if FAST else 12


def relative_errors(estimator, exact):
    """Return the relative errors ``[num_repeats, len(budgets)]`` of an estimator."""
    errors = numpy.zeros((num_repeats, len(budgets)))
    generator = Generator().manual_seed(1)
    for i in range(num_repeats):
        for j, K in enumerate(budgets):
            estimate = estimator(G, K, generator=generator)
            errors[i, j] = ((estimate - exact).norm() / exact.norm()).item()
    return errors


trace_errors = {
    name: relative_errors(estimator, trace)
    for name, estimator in [
        ("Hutchinson", hutchinson_trace),
        ("Hutch++", hutchpp_trace),
        ("XTrace", xtrace),
    ]
}
diagonal_errors = {
    name: relative_errors(estimator, diagonal)
    for name, estimator in [("Hutchinson", hutchinson_diag), ("XDiag", xdiag)]
}
fro_errors = {"Hutchinson": relative_errors(hutchinson_squared_fro, squared_fro)}

# %%
# The median errors at the largest budget rank the methods as expected:

median = {name: numpy.median(e[:, -1]) for name, e in trace_errors.items()}
print("trace:", {name: f"{m:.1e}" for name, m in median.items()})
assert median["XTrace"] < median["Hutch++"] < median["Hutchinson"]

median = {name: numpy.median(e[:, -1]) for name, e in diagonal_errors.items()}
print("diagonal:", {name: f"{m:.1e}" for name, m in median.items()})
assert median["XDiag"] < median["Hutchinson"]

# %%
# The plots show the median over the repetitions and the range between the first
# and third quartile. The dotted lines have slopes :math:`-1/2`
# (Hutchinson's rate) and :math:`-1`.
#
# - For the trace, Hutch++ and XTrace are orders of magnitude more accurate than
#   Hutchinson's method, because the few large eigenvalues carry most of the
#   trace, and they capture those exactly.
# - The diagonal is harder to estimate: every entry is an unknown. XDiag still
#   beats Hutchinson's method clearly.
# - The squared Frobenius norm (the sum of the squared eigenvalues) is estimated
#   from :math:`\lVert \mathbf{G}\mathbf{v} \rVert^2`, whose error decays at
#   Hutchinson's rate.

fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharex=True)
titles = ["trace", "diagonal", "squared Frobenius norm"]
for ax, title, errors in zip(axes, titles, [trace_errors, diagonal_errors, fro_errors]):
    for name, e in errors.items():
        (line,) = ax.loglog(budgets, numpy.median(e, axis=0), "o-", label=name)
        ax.fill_between(
            budgets,
            *numpy.quantile(e, [0.25, 0.75], axis=0),
            color=line.get_color(),
            alpha=0.2,
        )
    K = numpy.array(budgets)
    first = numpy.median(next(iter(errors.values()))[:, 0])
    ax.loglog(K, first * (K / K[0]) ** -0.5, "k:", lw=1)
    if title != "squared Frobenius norm":
        ax.loglog(K, first * (K / K[0]) ** -1.0, "k:", lw=1)
    ax.set_title(title)
    ax.set_xlabel("matrix-vector products")
    ax.legend()
axes[0].set_ylabel("relative error")
fig.tight_layout()

# %%
# One sample at a time
# --------------------
#
# To refine an estimate until it is accurate enough, the estimator classes draw
# one sample per call, here :class:`~curvlinops.HutchinsonTraceEstimator` (there
# is also :class:`~curvlinops.HutchPPTraceEstimator` and
# :class:`~curvlinops.HutchinsonDiagonalEstimator`). Each sample costs one
# product, so the batched functions above are faster for a fixed budget.

estimator = HutchinsonTraceEstimator(G)
samples = [estimator.sample().item() for _ in range(50)]
running_mean = numpy.cumsum(samples) / numpy.arange(1, len(samples) + 1)
print(f"after {len(samples)} samples: {running_mean[-1]:.4f} (exact: {trace:.4f})")
