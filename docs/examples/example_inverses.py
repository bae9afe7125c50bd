r"""Inverses: solving a damped Newton system
=========================================

Second-order optimizers, influence functions and Laplace approximations multiply
with the *inverse* of a curvature matrix. This tutorial computes the damped
Gauss-Newton step (also known as the Levenberg-Marquardt step)

.. math::
    \mathbf{x} = -(\mathbf{G} + \lambda \mathbf{I})^{-1} \mathbf{g}

of a small regression network, where :math:`\mathbf{G}` is the generalized
Gauss-Newton matrix (GGN), :math:`\mathbf{g}` the gradient and :math:`\lambda > 0`
the damping. We solve the linear system matrix-free with the method of conjugate
gradients (CG), in PyTorch with :class:`~curvlinops.CGInverseLinearOperator` and
in SciPy with :func:`scipy.sparse.linalg.cg`, and compare with a dense solve.
Then we look at two alternatives, the Neumann series and LSMR.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import numpy
from matplotlib.ticker import MaxNLocator
from scipy.sparse.linalg import cg, eigsh
from torch import (
    as_tensor,
    cat,
    eye,
    float64,
    from_numpy,
    manual_seed,
    no_grad,
    rand,
    randn,
    zeros,
)
from torch.linalg import eigvalsh, solve
from torch.nn import Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    CGInverseLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator
from curvlinops.examples.functorch import functorch_ggn, functorch_hessian

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small network regresses a noisy two-dimensional function of five inputs with
# the mean squared error. We work in double precision to compare with dense
# matrices to many digits.

manual_seed(0)
num_data = 64 if FAST else 256
X = rand(num_data, 5, dtype=float64)
y = (3 * X[:, :2]).sin() + 0.1 * randn(num_data, 2, dtype=float64)
data = list(zip(X.split(32), y.split(32)))

model = Sequential(Linear(5, 16), Tanh(), Linear(16, 2)).to(float64)
loss_func = MSELoss()
params = [p for p in model.parameters() if p.requires_grad]
num_params = sum(p.numel() for p in params)
print(f"{num_params} parameters, {num_data} data points")

# %%
# The damped GGN is a sum of two operators. The identity comes with the library;
# the sum is lazy, so a product with it costs one product with the GGN.

G = GGNLinearOperator(model, loss_func, params, data)
identity = IdentityLinearOperator([p.shape for p in params], G.device, G.dtype)
damping = 0.1
damped_G = G + damping * identity

# %%
# Every curvature operator also evaluates the loss and its gradient over the
# data set, in the tensor-list format (one tensor per parameter). We flatten it
# into a vector.

gradient, loss = G.gradient_and_loss()
g = cat([t.flatten() for t in gradient])
print(f"loss: {loss:.4f}, gradient norm: {g.norm():.4f}")

# %%
# For reference, here is the dense solution:

G_dense = functorch_ggn(model, loss_func, params, data).detach()
damped_G_dense = G_dense + damping * eye(num_params, dtype=float64)
step_dense = -solve(damped_G_dense, g)

# %%
# Conjugate gradients in PyTorch
# ------------------------------
#
# :class:`~curvlinops.CGInverseLinearOperator` wraps a symmetric positive definite
# operator :math:`\mathbf{A}` and is itself an operator: multiplying it onto a
# vector runs CG on :math:`\mathbf{A}\mathbf{x} = \mathbf{b}` until the residual
# :math:`\lVert\mathbf{b} - \mathbf{A}\mathbf{x}\rVert` falls below ``tol`` times
# :math:`\lVert\mathbf{b}\rVert`. Each iteration costs one product with
# :math:`\mathbf{A}`, i.e. one pass over the data. The hyperparameters follow
# :func:`scipy.sparse.linalg.cg`; the ``callback`` sees the iterate after each
# iteration, here to keep a copy of it (after the initial guess, zero).


def recorder(iterates):
    """Return a callback that appends a copy of the current iterate to a list."""
    return lambda x: iterates.append(as_tensor(x).reshape(-1).clone())


def relative_residuals(A_dense, b, iterates):
    """Return the relative residual ``|A x - b| / |b|`` of each iterate ``x``."""
    return [((A_dense @ x - b).norm() / b.norm()).item() for x in iterates]


cg_iterates = [zeros(num_params, dtype=float64)]
damped_G_inv = CGInverseLinearOperator(
    damped_G, tol=1e-10, callback=recorder(cg_iterates)
)
step = damped_G_inv @ -g
print(f"CG: {len(cg_iterates) - 1} iterations")
assert step.allclose(step_dense)

# %%
# Like every operator, the inverse accepts the tensor-list format, too. Then the
# step comes out shaped like the parameters, ready to be applied. (We first
# remove the callback: the setter resets every hyperparameter that it is not
# given to its default.) The Gauss-Newton step reduces the loss:

damped_G_inv.set_cg_hyperparameters(tol=1e-10)
step_list = damped_G_inv @ [-t for t in gradient]
with no_grad():
    for p, s in zip(params, step_list):
        p.add_(s)
    new_loss = loss_func(model(X), y)
    for p, s in zip(params, step_list):  # undo the step
        p.sub_(s)

print(f"loss before the step: {loss:.4f}, after: {new_loss:.4f}")
assert new_loss < loss

# %%
# The hyperparameters above are SciPy's. Code written for curvlinops 3.x passes
# those of its GPyTorch-style batched CG instead (``tolerance`` on the mean
# relative residual norm, ``max_iter``, ``preconditioner``, ...), which the same
# class accepts; mixing the two sets in one call raises an error.

step_3x = (
    CGInverseLinearOperator(damped_G, tolerance=1e-10, max_iter=1000, eps=1e-30) @ -g
)
assert step_3x.allclose(step_dense)

# %%
# Conjugate gradients in SciPy
# ----------------------------
#
# :meth:`~curvlinops.PyTorchLinearOperator.to_scipy` exports the damped GGN to
# SciPy, whose solvers then work on NumPy arrays. SciPy's ``cg`` calls its
# callback with the current iterate, too.

scipy_iterates = [zeros(num_params, dtype=float64)]
step_scipy, info = cg(
    damped_G.to_scipy(), -g.numpy(), rtol=1e-10, callback=recorder(scipy_iterates)
)
print(f"SciPy's CG: {len(scipy_iterates) - 1} iterations (info={info})")
assert info == 0
assert from_numpy(step_scipy).allclose(step_dense)

# %%
# Damping and convergence
# -----------------------
#
# CG converges faster the better conditioned the matrix is. The damping shifts
# every eigenvalue of the GGN by :math:`\lambda`, so the condition number is
# :math:`\kappa = (\lambda_{\max} + \lambda) / (\lambda_{\min} + \lambda)`, and the
# error of CG decays at least as fast as :math:`((\sqrt{\kappa} - 1) /
# (\sqrt{\kappa} + 1))^t` after :math:`t` iterations. The GGN of a network is
# singular or nearly so, so the damping sets the speed. (CG is usually faster
# than this bound because the GGN's spectrum has few large eigenvalues and many
# tiny ones, and CG adapts to such clusters.)

G_evals = eigvalsh(G_dense)
dampings = [1.0, 0.1, 0.01]
residuals = {}
for lam in dampings:
    iterates = [zeros(num_params, dtype=float64)]
    A_inv = CGInverseLinearOperator(
        G + lam * identity, tol=1e-10, callback=recorder(iterates)
    )
    _ = A_inv @ -g
    A_dense = G_dense + lam * eye(num_params, dtype=float64)
    residuals[lam] = relative_residuals(A_dense, -g, iterates)
    kappa = ((G_evals[-1] + lam) / (G_evals[0] + lam)).item()
    print(f"damping {lam:.0e}: condition number {kappa:.1e}, ", end="")
    print(f"{len(residuals[lam]) - 1} iterations")

assert len(residuals[1.0]) < len(residuals[0.1]) < len(residuals[0.01])

fig, ax = plt.subplots(figsize=(6, 3.5))
for lam in dampings:
    ax.semilogy(residuals[lam], label=f"{lam:g}")
scipy_residuals = relative_residuals(damped_G_dense, -g, scipy_iterates)
ax.semilogy(scipy_residuals, "k:", label="0.1 (SciPy)")
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_xlabel("iteration (= matrix-vector products)")
ax.set_ylabel("relative residual")
ax.set_title(r"CG on $(\mathbf{G} + \lambda \mathbf{I})\mathbf{x} = -\mathbf{g}$")
ax.legend(title=r"damping $\lambda$")
fig.tight_layout()

# %%
# The Neumann series
# ------------------
#
# :class:`~curvlinops.NeumannInverseLinearOperator` approximates the inverse by
# the truncated series
# :math:`\mathbf{A}^{-1} \approx \alpha \sum_{k=0}^K (\mathbf{I} - \alpha
# \mathbf{A})^k`, which needs no inner products and is popular for implicit
# differentiation. It converges if all eigenvalues of :math:`\alpha \mathbf{A}`
# lie in :math:`(0, 2)`, so we estimate the largest eigenvalue first and choose
# :math:`\alpha = 1 / \lambda_{\max}`. Along each eigenvector, the error decays as
# :math:`(1 - \alpha\lambda)^{K+1}`: slowly for the small eigenvalues.

lambda_max = eigsh(damped_G.to_scipy(), k=1, which="LA", return_eigenvectors=False)[0]
num_terms = [10, 20, 40, 80] if FAST else [10, 20, 40, 80, 160, 320]
neumann_errors = []
for K in num_terms:
    neumann_inv = NeumannInverseLinearOperator(
        damped_G, num_terms=K, scale=1 / lambda_max
    )
    neumann_step = -(neumann_inv @ g)
    neumann_errors.append((neumann_step - step_dense).norm() / step_dense.norm())

assert all(e1 > e2 for e1, e2 in zip(neumann_errors, neumann_errors[1:]))

# %%
# At equal cost (the number of products), CG is far more accurate. The dotted
# line shows the Neumann series' worst-case rate
# :math:`(1 - \lambda_{\min} / \lambda_{\max})^{K+1}`: with the damping as
# smallest eigenvalue, it takes hundreds of products to gain a few digits.

cg_errors = [((x - step_dense).norm() / step_dense.norm()).item() for x in cg_iterates]
assert cg_errors[-1] < 1e-6 < neumann_errors[-1]
rate = 1 - (G_evals[0].item() + damping) / lambda_max

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(cg_errors, label="CG")
ax.semilogy(
    num_terms, neumann_errors, "o-", label=r"Neumann, $\alpha = 1/\lambda_{\max}$"
)
K = numpy.arange(num_terms[-1] + 1)
ax.semilogy(K, rate ** (K + 1), "C1:", label="Neumann, worst case")
ax.set_xlabel("matrix-vector products")
ax.set_ylabel("relative error of the step")
ax.set_title(
    rf"Solving $(\mathbf{{G}} + {damping}\,\mathbf{{I}})\mathbf{{x}} = -\mathbf{{g}}$"
)
ax.legend()
fig.tight_layout()

# %%
# LSMR: beyond positive definite matrices
# ---------------------------------------
#
# CG is designed for symmetric positive definite matrices. The Hessian is
# generally indefinite, and so is the damped Hessian if the damping is smaller
# than the magnitude of its most negative eigenvalue:

H = HessianLinearOperator(model, loss_func, params, data)
H_dense = functorch_hessian(model, loss_func, params, data).detach()
print(f"smallest Hessian eigenvalue: {eigvalsh(H_dense)[0]:.3f}")

# %%
# :class:`~curvlinops.LSMRInverseLinearOperator` solves the least-squares problem
# :math:`\min_\mathbf{x} \lVert \mathbf{A}\mathbf{x} - \mathbf{b}\rVert`, which
# works for any matrix, even a non-square one, and gives the solution of the
# linear system if :math:`\mathbf{A}` is invertible. Each iteration costs a
# product with :math:`\mathbf{A}` and one with its transpose, and convergence
# depends on the condition number of :math:`\mathbf{A}^\top\mathbf{A}`, so it is
# usually slower than CG on positive definite problems. (Its ``damp``
# hyperparameter :math:`\mu` regularizes the least-squares problem instead,
# which multiplies with :math:`(\mathbf{A}^\top\mathbf{A} + \mu^2
# \mathbf{I})^{-1} \mathbf{A}^\top`; here we damp :math:`\mathbf{A}` itself.)

damped_H_inv = LSMRInverseLinearOperator(
    H + damping * identity, atol=1e-10, btol=1e-10, maxiter=10 * num_params
)
newton_step = -(damped_H_inv @ g)
newton_step_dense = -solve(H_dense + damping * eye(num_params, dtype=float64), g)
error = (newton_step - newton_step_dense).norm() / newton_step_dense.norm()
print(f"relative error of LSMR's damped Newton step: {error:.1e}")
assert error < 1e-6
