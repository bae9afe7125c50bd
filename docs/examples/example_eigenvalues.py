r"""Eigenvalues and eigenvectors of the Hessian and GGN
=====================================================

The extreme eigenvalues of the curvature matrix describe the loss landscape: the
largest one bounds the step sizes at which gradient descent is stable, negative
ones reveal saddle points, and the leading eigenvectors span the directions in
which the loss is most curved. This tutorial computes them for a small
convolutional network with SciPy's Lanczos method, from matrix-vector products
alone, and checks the results against dense matrices.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import numpy
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import float64, manual_seed, rand, randint, randn
from torch.linalg import eigh
from torch.nn import Conv2d, CrossEntropyLoss, Flatten, Linear, Sequential, Tanh

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.examples import IdentityLinearOperator
from curvlinops.examples.functorch import functorch_ggn, functorch_hessian

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small CNN classifies random 8x8 images into four classes. We work in double
# precision to compare with dense matrices to many digits.

manual_seed(0)
num_data = 32 if FAST else 128
X = rand(num_data, 1, 8, 8, dtype=float64)
y = randint(0, 4, (num_data,))
data = list(zip(X.split(32), y.split(32)))

model = Sequential(
    Conv2d(1, 3, kernel_size=3, padding=1),
    Tanh(),
    Conv2d(3, 3, kernel_size=3, stride=2, padding=1),
    Tanh(),
    Flatten(),
    Linear(3 * 4 * 4, 4),
).to(float64)
loss_func = CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]
num_params = sum(p.numel() for p in params)
print(f"{num_params} parameters, {num_data} images")

H = HessianLinearOperator(model, loss_func, params, data)
G = GGNLinearOperator(model, loss_func, params, data)

# %%
# For reference, we also build both matrices and their eigen-decompositions
# (:func:`torch.linalg.eigh` sorts eigenvalues in ascending order). This is only
# possible for small networks; the rest of this tutorial does not need it.

H_dense = functorch_hessian(model, loss_func, params, data).detach()
G_dense = functorch_ggn(model, loss_func, params, data).detach()
H_evals, H_evecs = eigh(H_dense)
G_evals, G_evecs = eigh(G_dense)

# %%
# Top eigenvalues
# ---------------
#
# :meth:`~curvlinops.PyTorchLinearOperator.to_scipy` turns an operator into a
# :class:`scipy.sparse.linalg.LinearOperator`, which
# :func:`scipy.sparse.linalg.eigsh` accepts. ``which='LA'`` asks for the largest
# algebraic eigenvalues; ``eigsh`` returns them in ascending order, together with
# the eigenvectors as columns.

k = 4
top_H, top_H_vecs = eigsh(H.to_scipy(), k=k, which="LA")
top_G, top_G_vecs = eigsh(G.to_scipy(), k=k, which="LA")
print("top Hessian eigenvalues:", top_H)
print("top GGN eigenvalues:    ", top_G)

assert numpy.allclose(top_H, H_evals[-k:].numpy())
assert numpy.allclose(top_G, G_evals[-k:].numpy())

# %%
# Eigenvectors are unique only up to their sign (if the eigenvalue is simple), so
# we compare them through the absolute value of their inner product, which is 1
# for parallel unit vectors. We also check the defining equation
# :math:`\mathbf{H}\mathbf{v} = \lambda \mathbf{v}` with the operator itself. The
# operators accept NumPy arrays and then return NumPy arrays.

overlap = numpy.abs(numpy.sum(top_H_vecs * H_evecs[:, -k:].numpy(), axis=0))
print("|<v_eigsh, v_dense>|:", overlap)
assert numpy.allclose(overlap, 1.0)

residual = H @ top_H_vecs - top_H_vecs * top_H
assert numpy.allclose(residual, 0.0)

# %%
# An eigenvector lives in parameter space. Splitting it into tensors shaped like
# the parameters shows which layers the most curved direction involves:

sizes = [p.numel() for p in params]
names = [name for name, p in model.named_parameters() if p.requires_grad]
v_top = top_H_vecs[:, -1]
for name, chunk in zip(names, numpy.split(v_top, numpy.cumsum(sizes)[:-1])):
    print(f"{name:>8}: squared norm {numpy.sum(chunk**2):.3f}")

# %%
# Bottom eigenvalues
# ------------------
#
# The Hessian of a non-convex loss can have negative eigenvalues. ``which='SA'``
# asks for the smallest algebraic ones:

bottom_H = eigsh(H.to_scipy(), k=k, which="SA", return_eigenvectors=False)
print("bottom Hessian eigenvalues:", numpy.sort(bottom_H))
assert numpy.allclose(numpy.sort(bottom_H), H_evals[:k].numpy())

# %%
# Negative eigenvalues make Newton's method move towards saddle points, and they
# break the conjugate gradient method for solving linear systems with the
# Hessian. A damping :math:`\delta` shifts all eigenvalues: those of
# :math:`\mathbf{H} + \delta \mathbf{I}` are :math:`\lambda_i + \delta`, so it is
# positive definite for :math:`\delta > -\lambda_{\min}`. Operators combine
# lazily, so the damped Hessian costs one Hessian-vector product per product:

identity = IdentityLinearOperator([p.shape for p in params], H.device, H.dtype)
lambda_min = numpy.min(bottom_H)
damping = -lambda_min + 1e-2
damped_H = H + damping * identity
bottom_damped = eigsh(damped_H.to_scipy(), k=1, which="SA", return_eigenvectors=False)
print(f"smallest eigenvalue of the damped Hessian: {bottom_damped[0]:.5f}")
assert numpy.isclose(bottom_damped[0], 1e-2)

# %%
# The number of products
# ----------------------
#
# Each product with the operator is one pass over the data, so the number of
# products is the cost of an eigen-solver. We compare SciPy's Lanczos method with
# the simplest alternative, the power iteration
# :math:`\mathbf{v} \leftarrow \mathbf{G}\mathbf{v} / \lVert
# \mathbf{G}\mathbf{v}\rVert`, which converges to the eigenvector of the largest
# eigenvalue in magnitude at a rate given by the ratio of the two largest
# eigenvalues, :math:`|\lambda_2 / \lambda_1|` per product. We use the GGN,
# whose largest eigenvalue is also the largest in magnitude. To count the
# products that ``eigsh`` makes, we wrap the operator.


class CountingOperator(LinearOperator):
    """SciPy linear operator that counts its matrix-vector products."""

    def __init__(self, A):
        super().__init__(A.dtype, A.shape)
        self.A, self.num_matvecs = A, 0

    def _matvec(self, x):
        self.num_matvecs += 1
        return self.A @ x


counted = CountingOperator(G.to_scipy())
lambda_max = eigsh(counted, k=1, which="LA", return_eigenvectors=False)[0]
assert numpy.isclose(lambda_max, G_evals[-1].item())
print(
    f"eigsh: {counted.num_matvecs} products, error {abs(lambda_max - G_evals[-1]):.1e}"
)

# %%
# The power iteration estimates the eigenvalue with the Rayleigh quotient
# :math:`\mathbf{v}^\top \mathbf{G} \mathbf{v}` of the current unit vector. We
# record its error after each product:

num_steps = 3 * counted.num_matvecs
v = randn(num_params, dtype=float64)
v = v / v.norm()
power_errors = []
for _ in range(num_steps):
    Gv = G @ v
    power_errors.append(abs(v @ Gv - G_evals[-1]).item())
    v = Gv / Gv.norm()

gap = (G_evals[-2] / G_evals[-1]).item()
print(f"ratio of the two largest GGN eigenvalues: {gap:.3f}")
print(
    f"power iteration: error {power_errors[counted.num_matvecs - 1]:.1e} after "
    f"{counted.num_matvecs} products, {power_errors[-1]:.1e} after {num_steps}"
)
assert power_errors[counted.num_matvecs - 1] > abs(lambda_max - G_evals[-1])

# %%
# The Rayleigh quotient's error decays as :math:`|\lambda_2 / \lambda_1|^{2t}`
# after :math:`t` products. Lanczos builds the best approximation from all the
# vectors :math:`\mathbf{v}, \mathbf{G}\mathbf{v}, \mathbf{G}^2\mathbf{v},\dots`
# it has seen, not only from the last one, and typically needs far fewer
# products; ``eigsh`` also stops once it has reached machine precision.

steps = numpy.arange(1, num_steps + 1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(steps, power_errors, label="power iteration")
c = counted.num_matvecs
rate = power_errors[c - 1] * gap ** (2 * (steps - c))
ax.semilogy(steps, rate, "k:", label=r"rate $|\lambda_2/\lambda_1|^{2t}$")
ax.axvline(counted.num_matvecs, color="C1", label="eigsh (Lanczos) converged")
ax.set_ylim(1e-16, 10)
ax.set_xlabel("matrix-vector products $t$")
ax.set_ylabel(r"error of $\lambda_{\max}$")
ax.set_title("Largest GGN eigenvalue")
ax.legend()
fig.tight_layout()

# %%
# The spectrum at a glance
# ------------------------
#
# Finally, all eigenvalues of both matrices from the dense reference, with the
# ones we computed matrix-free marked. Most eigenvalues are close to zero; the
# GGN has none below zero, while the Hessian of this untrained network has
# many.

fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
for ax, evals, top, name in [
    (axes[0], H_evals, top_H, "Hessian"),
    (axes[1], G_evals, top_G, "GGN"),
]:
    ax.plot(evals.numpy(), ".", markersize=3, label="all (dense)")
    ax.plot(
        numpy.arange(num_params - k, num_params), top, "o", mfc="none", label="eigsh"
    )
    ax.set_title(name)
    ax.set_xlabel("index (ascending)")
axes[0].plot(numpy.arange(k), numpy.sort(bottom_H), "o", mfc="none", color="C1")
axes[0].set_ylabel("eigenvalue")
axes[0].legend()
fig.tight_layout()
