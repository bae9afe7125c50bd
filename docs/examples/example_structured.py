r"""Structured operators, KFOC and the exact GGN diagonal
=====================================================

Many curvature approximations are *structured*: block-diagonal over layers,
Kronecker products within a block, or diagonal. For such matrices, the trace,
the determinant and a damped inverse have closed forms that cost next to
nothing. This tutorial

- builds the Frobenius-optimal Kronecker approximation of every layer's GGN block
  (:class:`~curvlinops.KFOCLinearOperator`), turns it into a block-diagonal operator
  of Kronecker products, and checks its log-determinant and damped inverse against
  dense matrices,
- compares the per-layer errors of KFOC and KFAC to the exact GGN blocks, and
- computes the exact diagonal of the GGN
  (:class:`~curvlinops.GGNDiagonalLinearOperator`) and compares it with
  Hutchinson's estimate at equal and at larger cost.

KFAC-preconditioned conjugate gradients, which converge in far fewer products
than plain CG, are shown in the tutorial on KFAC and EKFAC.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import torch
from torch import eye, float64, manual_seed, rand
from torch.nn import Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    BlockDiagonalLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    KroneckerProductLinearOperator,
    hutchinson_diag,
)

FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"
_ = manual_seed(0)

# %%
# Setup
# -----
#
# A small regression network in float64, so that we can compare with dense
# matrices.

num_outputs = 4
model = Sequential(Linear(6, 5), Tanh(), Linear(5, num_outputs)).to(float64)
loss_func = MSELoss()
params = list(model.parameters())
X = rand(64, 6, dtype=float64)
y = rand(64, num_outputs, dtype=float64)
data = list(zip(X.split(32), y.split(32)))  # two mini-batches

G = GGNLinearOperator(model, loss_func, params, data)
D = G.shape[1]
G_dense = G @ eye(D, dtype=float64)
print(f"{D} parameters")

# %%
# KFOC as a block-diagonal operator of Kronecker products
# -------------------------------------------------------
#
# For every layer, :class:`~curvlinops.KFOCLinearOperator` finds the Kronecker
# product :math:`\mathbf{S}_1 \otimes \mathbf{S}_2` closest to the layer's GGN
# block in Frobenius norm (the top singular pair of the block's rearrangement),
# by power iteration over passes through the data. With the bias in the same
# block as the weight (``separate_weight_and_bias=False``) there is one block per
# layer. :meth:`~curvlinops.KFOCLinearOperator.to_structured` returns the
# approximation as a :class:`~curvlinops.BlockDiagonalLinearOperator` of
# :class:`~curvlinops.KroneckerProductLinearOperator` blocks:

kwargs = {"fisher_type": "type-2", "separate_weight_and_bias": False}
F = KFOCLinearOperator(model, loss_func, params, data, **kwargs)
S = F.to_structured()
assert isinstance(S, BlockDiagonalLinearOperator)
for block in S.blocks:
    assert isinstance(block, KroneckerProductLinearOperator)
    print(
        "block of shape",
        tuple(block.shape),
        "from factors of shapes",
        [tuple(f.shape) for f in block.factors],
    )

# %%
#
# Closed forms need only the small factors: for :math:`\mathbf{S}_1 \in
# \mathbb{R}^{m \times m}` and :math:`\mathbf{S}_2 \in \mathbb{R}^{n \times n}`,
# :math:`\log\det(\mathbf{S}_1 \otimes \mathbf{S}_2) = n \log\det \mathbf{S}_1 + m
# \log\det \mathbf{S}_2`, and a block-diagonal matrix sums over its blocks. We
# check the log-determinant against the dense matrix:

F_dense = F @ eye(D, dtype=float64)
logdet_dense = torch.linalg.slogdet(F_dense).logabsdet
print(
    f"log-determinant: closed form {S.logdet.item():.6f}, dense "
    f"{logdet_dense.item():.6f}"
)
assert torch.allclose(S.logdet, logdet_dense)
assert torch.allclose(F.logdet, logdet_dense)

# %%
#
# A damped inverse :math:`(\mathbf{F} + \delta \mathbf{I})^{-1}` is again
# structured: per block, the eigendecompositions of the two factors give the
# inverse of :math:`\mathbf{S}_1 \otimes \mathbf{S}_2 + \delta \mathbf{I}` in
# closed form. We compare its product with a vector to a dense solve:

delta = 1e-3
F_inv = F.inverse(damping=delta)
v = rand(D, dtype=float64)
x_dense = torch.linalg.solve(F_dense + delta * eye(D, dtype=float64), v)
print(
    f"damped inverse, relative error: "
    f"{((F_inv @ v - x_dense).norm() / x_dense.norm()).item():.1e}"
)
assert torch.allclose(F_inv @ v, x_dense)

# %%
# KFOC against KFAC
# -----------------
#
# KFAC approximates each block by a Kronecker product too, but not the closest
# one. We compare both with the exact GGN blocks (rows and columns of one layer),
# relative to the block's Frobenius norm. KFOC's error is never larger. For the
# square loss, the last layer's block is itself a Kronecker product (the
# network is linear after it), so both are exact there.

K = KFACLinearOperator(model, loss_func, params, data, **kwargs)
K_dense = K @ eye(D, dtype=float64)
sizes = [p.numel() for p in params]
starts = torch.tensor([0, *sizes]).cumsum(0)
errors = {"KFAC": [], "KFOC": []}
for layer in range(len(params) // 2):  # weight and bias of each layer
    block = slice(starts[2 * layer].item(), starts[2 * layer + 2].item())
    exact = G_dense[block, block]
    for name, approx in [("KFAC", K_dense), ("KFOC", F_dense)]:
        error = (approx[block, block] - exact).norm() / exact.norm()
        errors[name].append(error.item())
    print(
        f"layer {layer}: relative error KFAC {errors['KFAC'][-1]:.3f}, "
        f"KFOC {errors['KFOC'][-1]:.3f}"
    )
assert all(f <= k + 1e-12 for f, k in zip(errors["KFOC"], errors["KFAC"]))

# %%
# The exact diagonal of the GGN
# -----------------------------
#
# :class:`~curvlinops.GGNDiagonalLinearOperator` backpropagates the
# :math:`C` columns of each datum's loss-Hessian square root, batched in one
# backward pass per mini-batch, and sums the squared per-datum gradients. Its
# cost is about that of :math:`C` GGN-vector products. Hutchinson's estimator
# :math:`\mathrm{diag}(\mathbf{G}) \approx \frac{1}{M}\sum_m \mathbf{v}_m \odot
# \mathbf{G}\mathbf{v}_m` with Rademacher vectors needs many more products for a
# good estimate; we give it :math:`C` products (equal cost) and more.

diag_exact = G_dense.diag()
D_ggn = GGNDiagonalLinearOperator(model, loss_func, params, data)
diag = torch.cat([d.flatten() for d in D_ggn.diagonal])
print(
    f"exact diagonal, relative error: "
    f"{((diag - diag_exact).norm() / diag_exact.norm()).item():.1e}"
)
assert torch.allclose(diag, diag_exact)

num_matvecs = [num_outputs * 2**k for k in range(7 if FAST else 10)]
hutchinson_errors = []
for M in num_matvecs:
    _ = manual_seed(1)
    estimate = hutchinson_diag(G, M)
    hutchinson_errors.append(
        ((estimate - diag_exact).norm() / diag_exact.norm()).item()
    )
    print(f"Hutchinson, {M:4d} products: relative error {hutchinson_errors[-1]:.3f}")

# %%
#
# At equal cost, Hutchinson's estimate is far off; its error decays like
# :math:`1/\sqrt{M}`, so that every digit costs a hundred times more products.

fig, ax = plt.subplots(figsize=(6, 4))
ax.loglog(num_matvecs, hutchinson_errors, "o-", label="Hutchinson")
ax.axvline(num_outputs, color="k", linestyle=":", label="cost of the exact diagonal")
ax.set_xlabel("number of GGN-vector products")
ax.set_ylabel("relative error of the diagonal")
ax.legend()
fig.tight_layout()
plt.show()
