r"""Spectral density of a network's Hessian
=========================================

The eigenvalues of the Hessian of a trained network are not spread evenly: most
of them form a *bulk* close to zero, and a few *outliers* stand apart, whose
number and location reflect the classes of the data (Papyan, 2020). With
millions of parameters we can neither store the Hessian nor compute its
eigenvalues, but we can approximate their distribution, the *spectral density*

.. math::
    p(\lambda) = \frac{1}{D} \sum_{i=1}^D \delta(\lambda - \lambda_i)\,,

from a few hundred Hessian-vector products with Lanczos quadrature. This
tutorial trains a small classifier, approximates the density of its Hessian on
a linear and a logarithmic scale, and compares it with the exact eigenvalues.

- Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
  spectra. Journal of Machine Learning Research (JMLR).

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import numpy
from torch import cat, eye, float64, manual_seed, no_grad, randint, randn, trapezoid
from torch.linalg import eigvalsh
from torch.nn import CrossEntropyLoss, Linear, ReLU, Sequential
from torch.optim import SGD

from curvlinops import (
    HessianLinearOperator,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
)

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Training a classifier
# ---------------------
#
# The data are samples of a mixture of Gaussians in 20 dimensions, one component
# per class, that overlap a little. A two-hidden-layer ReLU network learns to
# classify them with stochastic gradient descent.

manual_seed(0)
num_classes, dim = 5, 20
num_data = 500 if FAST else 2000
hidden = 16 if FAST else 32

means = 2 * randn(num_classes, dim, dtype=float64)
y = randint(0, num_classes, (num_data,))
X = means[y] + 4 * randn(num_data, dim, dtype=float64)
data = list(zip(X.split(250), y.split(250)))

model = Sequential(
    Linear(dim, hidden),
    ReLU(),
    Linear(hidden, hidden),
    ReLU(),
    Linear(hidden, num_classes),
).to(float64)
loss_func = CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]
num_params = sum(p.numel() for p in params)

optimizer = SGD(params, lr=0.1, momentum=0.9)
for _ in range(20):  # epochs
    for X_batch, y_batch in data:
        optimizer.zero_grad()
        loss_func(model(X_batch), y_batch).backward()
        optimizer.step()

with no_grad():
    accuracy = (model(X).argmax(dim=1) == y).double().mean()
print(f"{num_params} parameters, training accuracy {accuracy:.2f}")

# %%
# The Hessian and its exact eigenvalues
# -------------------------------------
#
# For this small network we can afford the exact eigenvalues as reference. We
# build the Hessian by multiplying the operator onto the columns of the identity
# matrix, a few hundred at a time.

H = HessianLinearOperator(model, loss_func, params, data)

identity = eye(num_params, dtype=float64)
H_dense = cat([H @ columns for columns in identity.split(256, dim=1)], dim=1)
evals = eigvalsh(H_dense).numpy()
print(f"eigenvalues from {evals[0]:.2e} to {evals[-1]:.2e}")
print("the largest ones:", evals[-8:].round(3))

# %%
# Lanczos quadrature
# ------------------
#
# :class:`~curvlinops.LanczosApproximateSpectrumCached` runs the Lanczos
# iteration with ``ncv`` products from ``num_repeats`` random starting vectors
# (all in one batch). Each run yields ``ncv`` quadrature nodes, i.e. locations
# of eigenvalues, with weights, i.e. their share of the spectrum. Smoothing every
# node with a Gaussian gives a density on a grid. The width of the Gaussians is
# set by ``kappa``: between evenly spaced nodes, each Gaussian falls to a
# fraction :math:`1/\kappa` of its peak half-way to the next node, so larger
# values give narrower peaks. The class caches the Lanczos runs, so trying other
# settings costs no further products. The extreme eigenvalues, needed for the grid, are
# estimated with SciPy's ``eigsh``.

ncv, num_repeats = (64, 5) if FAST else (128, 10)
spectrum = LanczosApproximateSpectrumCached(H, ncv=ncv)
grid, density = spectrum.approximate_spectrum(num_repeats=num_repeats, kappa=3.0)
_, density_wide = spectrum.approximate_spectrum(num_repeats=num_repeats, kappa=1.5)

# %%
# The density integrates to one, and its grid covers the exact spectrum:

spacing = (grid[1] - grid[0]).item()
assert abs(density.sum().item() * spacing - 1) < 1e-3
assert grid[0] < evals[0] and evals[-1] < grid[-1]

# %%
# Most of the mass is the bulk near zero. We compare the fraction of eigenvalues
# in the bulk, here below a fifth of the largest eigenvalue, with the mass that
# the density assigns to it:

threshold = evals[-1] / 5
exact_fraction = numpy.mean(evals < threshold)
approximate_fraction = density[grid < threshold].sum().item() * spacing
print(f"bulk: exact {exact_fraction:.3f}, Lanczos {approximate_fraction:.3f}")
assert abs(exact_fraction - approximate_fraction) < 0.02

# %%
# On a linear scale, the density shows the bulk as one sharp peak at zero and
# the outliers as small bumps at the locations of the largest exact eigenvalues
# (gray histogram). The density axis is logarithmic to make the outliers
# visible. The wider Gaussians (smaller ``kappa``) give a smoother density but
# blur outliers that lie close to each other.

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.hist(evals, bins=100, density=True, color="0.7", label="exact eigenvalues")
ax.semilogy(grid, density, label=r"Lanczos, $\kappa = 3$")
ax.semilogy(grid, density_wide, label=r"Lanczos, $\kappa = 1.5$", lw=1)
ax.set_ylim(1e-4, 3 * max(density.max().item(), density_wide.max().item()))
ax.set_xlabel(r"eigenvalue $\lambda$")
ax.set_ylabel(r"density $p(\lambda)$")
ax.set_title("Hessian spectrum")
ax.legend()
fig.tight_layout()

# %%
# The log-spectrum
# ----------------
#
# The eigenvalues span many orders of magnitude, which a linear axis cannot
# resolve. Papyan (2020) therefore smooths the quadrature nodes on a logarithmic
# scale, in :math:`\log(|\lambda| + \epsilon)` (Section C.7);
# :func:`~curvlinops.lanczos_approximate_log_spectrum` does so. It returns the
# grid of eigenvalue magnitudes :math:`|\lambda| + \epsilon`, spaced
# logarithmically, and the density w.r.t. them (as curvlinops 3.x does), which
# we plot on logarithmic axes next to a histogram with logarithmic bins. A
# density w.r.t. the magnitude falls like its inverse, so the few outliers far
# right have small values. (Its
# class version, :class:`~curvlinops.LanczosApproximateLogSpectrumCached`, caches
# the Lanczos runs like above.)

epsilon = 1e-5
abs_grid, abs_density = lanczos_approximate_log_spectrum(
    H, ncv=ncv, num_repeats=num_repeats, epsilon=epsilon
)
magnitudes = numpy.abs(evals) + epsilon
bins = numpy.geomspace(magnitudes.min(), magnitudes.max(), 60)

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.hist(magnitudes, bins=bins, density=True, color="0.7", label="exact eigenvalues")
ax.loglog(abs_grid, abs_density, label="Lanczos")
ax.set_ylim(1e-5, 3 * abs_density.max().item())
ax.set_xlabel(r"$|\lambda| + \epsilon$, $\epsilon = 10^{-5}$")
ax.set_ylabel(r"density $p(|\lambda| + \epsilon)$")
ax.set_title("Hessian log-spectrum")
ax.legend()
fig.tight_layout()

# %%
# Above :math:`|\lambda| \approx 10^{-2}`, the approximation follows the
# histogram closely. Below, it cannot resolve the eigenvalues: a few dozen
# quadrature nodes cannot represent eigenvalues that are a million times
# smaller than the largest one, so the mass of the tiniest eigenvalues collects
# at the smallest node, which is also where the grid starts. So read the
# log-spectrum at its upper end. There, the approximate density puts as much
# mass above a threshold as the exact eigenvalues do:

threshold = 1e-2 + epsilon
above = abs_grid > threshold
exact_fraction = numpy.mean(magnitudes > threshold)
approximate_fraction = trapezoid(abs_density[above], abs_grid[above]).item()
print(f"|eigenvalue| > 1e-2: exact {exact_fraction:.3f}, ", end="")
print(f"Lanczos {approximate_fraction:.3f}")
assert abs(exact_fraction - approximate_fraction) < 0.05
