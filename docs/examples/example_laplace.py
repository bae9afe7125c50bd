r"""Laplace approximations with laplace-torch on curvlinops
=======================================================

The Laplace approximation turns a trained network into a Bayesian one. Around
the trained weights :math:`\mathbf{\theta}_\star`, it approximates the
posterior by the Gaussian :math:`\mathcal{N}(\mathbf{\theta}_\star,
\mathbf{P}^{-1})` whose precision

.. math::
    \mathbf{P} = \mathbf{H} + \delta \mathbf{I}

adds the precision :math:`\delta` of a Gaussian prior to a curvature matrix
:math:`\mathbf{H}` of the negative log-likelihood: in practice the
generalized Gauss-Newton matrix (GGN), or a Kronecker-factored (KFAC) or
diagonal approximation of it. `laplace-torch
<https://github.com/aleximmer/Laplace>`_ (Daxberger et al., 2021) implements
the approximation, the tuning of :math:`\delta` and the predictive with
several curvature backends. Its backends ``CurvlinopsGGN``, ``CurvlinopsEF``
and ``CurvlinopsHessian`` call the operators of curvlinops; they were written
for curvlinops 3.x and run unchanged on this package. This tutorial

- trains a small regression network on data with a gap,
- builds a Laplace approximation of its last layer with the exact GGN, and
  checks laplace's curvature against :class:`~curvlinops.GGNLinearOperator`,
- tunes the prior precision by maximizing the marginal likelihood,
- shows the predictive uncertainty, and
- approximates the posterior of the whole network with KFAC, checked against
  :class:`~curvlinops.KFACLinearOperator`.

laplace-torch depends on ``curvlinops-for-pytorch``, which would replace this
package: install it with ``pip install --no-deps laplace-torch`` and then its
other requirements (``make install`` does so).

- Daxberger, E., Kristiadi, A., Immer, A., Eschenhagen, R., Bauer, M., &
  Hennig, P. (2021). Laplace Redux: Effortless Bayesian deep learning.
  Advances in Neural Information Processing Systems (NeurIPS).

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import cat, eye, float64, linspace, manual_seed, no_grad, rand, randn
from torch.nn import Linear, MSELoss, Sequential, Tanh
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset

from curvlinops import GGNLinearOperator, KFACLinearOperator

# The test suite runs the tutorials with shorter training.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Data and training
# -----------------
#
# A sine wave with noise of standard deviation 0.1, observed on the intervals
# :math:`[-3, -1]` and :math:`[1, 3]`. A network with two hidden layers fits it with the
# squared error, in double precision.

manual_seed(0)
X = cat([rand(40, 1, dtype=float64) * 2 - 3, rand(40, 1, dtype=float64) * 2 + 1])
y = X.sin() + 0.1 * randn(X.shape, dtype=float64)
loader = DataLoader(TensorDataset(X, y), batch_size=40)

model = Sequential(Linear(1, 32), Tanh(), Linear(32, 32), Tanh(), Linear(32, 1))
model = model.to(float64)
optimizer = Adam(model.parameters(), lr=1e-2)
for _ in range(600 if FAST else 1500):
    optimizer.zero_grad()
    loss = MSELoss()(model(X), y)
    loss.backward()
    optimizer.step()

with no_grad():
    sigma_noise = (model(X) - y).square().mean().sqrt().item()
print(f"training loss {loss.item():.4f}, residual standard deviation {sigma_noise:.3f}")

# %%
# A last-layer Laplace approximation
# ----------------------------------
#
# laplace-torch's likelihood for regression is a Gaussian of standard
# deviation ``sigma_noise``, which we set to the residuals' one. With
# ``subset_of_weights='last_layer'`` and ``hessian_structure='full'``, the
# curvature is the dense GGN of the last layer's weights and bias, which the
# ``CurvlinopsGGN`` backend computes with
# :class:`~curvlinops.GGNLinearOperator` (multiplied onto an identity matrix)
# for every batch of the loader.

la = Laplace(
    model,
    "regression",
    subset_of_weights="last_layer",
    hessian_structure="full",
    backend=CurvlinopsGGN,
    sigma_noise=sigma_noise,
)
la.fit(loader)

# %%
# laplace sums the squared errors and halves them into a negative
# log-likelihood (up to the noise variance, which enters the posterior
# precision :math:`\mathbf{P} = \mathbf{H} / \sigma^2 + \delta \mathbf{I}`), so
# its curvature is half the GGN of ``MSELoss(reduction='sum')``:

last_layer = list(model[-1].parameters())
G = GGNLinearOperator(model, MSELoss(reduction="sum"), last_layer, [(X, y)])
assert la.H.allclose(0.5 * (G @ eye(G.shape[1], dtype=float64)))
print(f"last-layer curvature: {tuple(la.H.shape)}, that of our GGN")

# %%
# Tuning the prior precision
# --------------------------
#
# The prior precision :math:`\delta` regularizes the posterior. laplace-torch
# tunes it by gradient ascent on the log marginal likelihood (the evidence),
# which the Laplace approximation gives in closed form:

evidence_before = la.log_marginal_likelihood().item()
la.optimize_prior_precision(method="marglik", pred_type="glm")
evidence_after = la.log_marginal_likelihood().item()
print(f"prior precision {la.prior_precision.item():.3f}")
print(f"log evidence {evidence_before:.2f} (prior precision 1) -> {evidence_after:.2f}")
assert evidence_after > evidence_before

# %%
# Predictive uncertainty
# ----------------------
#
# The linearized (GLM) predictive is Gaussian: its mean is the network's
# prediction, its variance :math:`\mathbf{J}(\mathbf{x}) \mathbf{P}^{-1}
# \mathbf{J}(\mathbf{x})^\top` with the Jacobian :math:`\mathbf{J}` of the
# output w.r.t. the weights, plus the noise variance for new observations.
# It is uncertain where there were no data: in the gap and outside the data.

X_test = linspace(-5, 5, 201, dtype=float64).unsqueeze(1)


def predictive_std(la) -> tuple:
    """Return the predictive mean and standard deviation on ``X_test``."""
    f_mean, f_var = la(X_test, pred_type="glm")
    return f_mean.squeeze(1), (f_var.flatten() + la.sigma_noise**2).sqrt()


mean_ll, std_ll = predictive_std(la)
in_data, in_gap = (X_test.squeeze(1) + 2).abs() < 0.5, X_test.squeeze(1).abs() < 0.3
print(
    f"last layer: predictive std {std_ll[in_data].mean():.3f} in the data, "
    f"{std_ll[in_gap].mean():.3f} in the gap, {std_ll[-1]:.3f} at x = 5"
)
assert std_ll[in_gap].mean() > std_ll[in_data].mean() < std_ll[-1]

# %%
# KFAC for the whole network
# --------------------------
#
# For all weights, the dense GGN grows quadratically with the number of
# parameters. ``hessian_structure='kron'`` uses KFAC instead: the
# ``CurvlinopsGGN`` backend builds a :class:`~curvlinops.KFACLinearOperator`
# with ``fisher_type='type-2'`` (which approximates the GGN) for every batch and
# reads its Kronecker factors. With one batch, laplace's matrix is half of our
# KFAC of the summed loss:

la_kfac = Laplace(
    model,
    "regression",
    subset_of_weights="all",
    hessian_structure="kron",
    backend=CurvlinopsGGN,
    sigma_noise=sigma_noise,
)
la_kfac.fit(loader)

params = list(model.parameters())
K = KFACLinearOperator(
    model,
    MSELoss(reduction="sum"),
    params,
    [(X, y)],
    fisher_type="type-2",
    separate_weight_and_bias=True,
)
K_dense = K @ eye(K.shape[1], dtype=float64)
assert la_kfac.H.to_matrix().allclose(0.5 * K_dense)
print(f"KFAC of {K.shape[1]} parameters: laplace's matrix is half of ours")

la_kfac.optimize_prior_precision(method="marglik", pred_type="glm")
mean_kfac, std_kfac = predictive_std(la_kfac)
print(
    f"KFAC: prior precision {la_kfac.prior_precision.item():.3f}, predictive std "
    f"{std_kfac[in_data].mean():.3f} in the data, {std_kfac[in_gap].mean():.3f} "
    f"in the gap"
)
assert std_kfac[in_gap].mean() > std_kfac[in_data].mean()

# %%
# Both approximations follow the data closely where there are data and grow
# uncertain away from them; the last-layer approximation, with fewer
# uncertain weights, is the more confident of the two.

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
x_test = X_test.squeeze(1)
for ax, mean, std, title in [
    (axes[0], mean_ll, std_ll, "last layer, exact GGN"),
    (axes[1], mean_kfac, std_kfac, "all weights, KFAC"),
]:
    ax.fill_between(x_test, mean - 2 * std, mean + 2 * std, alpha=0.3, label="±2 std")
    ax.plot(x_test, mean, label="predictive mean")
    ax.plot(X.squeeze(1), y.squeeze(1), "k.", markersize=3, label="data")
    ax.set_title(title)
    ax.set_xlabel("x")
axes[0].set_ylim(-3, 3)
axes[0].legend(loc="lower left")
fig.tight_layout()
