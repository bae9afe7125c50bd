r"""Structured algebra, the exact GGN diagonal, and preconditioned CG
=================================================================

Kronecker-factored approximations store each layer's curvature block as two
small matrices. Written as a block-diagonal matrix of Kronecker products, their
log-determinant, trace, norm and damped inverse follow from the factors in closed
form. This tutorial

- turns KFAC into a :class:`~curvlinops.BlockDiagonalLinearOperator` of
  :class:`~curvlinops.KroneckerProductLinearOperator` blocks and checks its
  log-determinant and damped inverse against dense matrices,
- compares KFAC with KFOC, the Kronecker approximation closest to each layer's
  block of the GGN in Frobenius norm,
- computes the exact diagonal of the GGN with
  :class:`~curvlinops.GGNDiagonalLinearOperator` and compares it with
  Hutchinson's estimate at the same cost, and
- preconditions the conjugate gradient method with KFAC and KFOC on the damped
  GGN, counting the products with the GGN.

We start with the imports.
"""

import os
from time import perf_counter

import matplotlib.pyplot as plt
from torch import (
    Generator,
    cat,
    eye,
    float64,
    logspace,
    manual_seed,
    randn,
    zeros_like,
)
from torch.linalg import inv, matrix_norm, slogdet, solve
from torch.nn import Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    BlockDiagonalLinearOperator,
    CGInverseLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFOCLinearOperator,
    KroneckerProductLinearOperator,
    hutchinson_diag,
)
from curvlinops.examples import IdentityLinearOperator

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A network with one hidden layer regresses four targets from twenty features
# whose scales range over four orders of magnitude (think of measurements in
# different units), with the mean squared error, in double precision. The GGN of
# this small network fits into memory, so we build it densely for reference.

manual_seed(0)
num_data = 256 if FAST else 512
scales = logspace(-3, 1, 20, dtype=float64)
X = randn(num_data, 20, dtype=float64) * scales
W_true = randn(20, 4, dtype=float64) / (scales.unsqueeze(1) * 20**0.5)
y = (X @ W_true).sin() + 0.1 * randn(num_data, 4, dtype=float64)
data = list(zip(X.split(128), y.split(128)))

model = Sequential(Linear(20, 16), Tanh(), Linear(16, 4)).to(float64)
loss_func = MSELoss()
params = list(model.parameters())
names = [name for name, _ in model.named_parameters()]
num_params = sum(p.numel() for p in params)
identity = eye(num_params, dtype=float64)

G = GGNLinearOperator(model, loss_func, params, data)
G_dense = G @ identity
print(f"{num_params} parameters, {num_data} data points")


def close(A, B, rtol=1e-8):
    """Return whether two matrices agree up to a relative error in norm."""
    return (A - B).norm() <= rtol * B.norm()


# %%
# KFAC as a block-diagonal of Kronecker products
# ----------------------------------------------
#
# KFAC approximates the GGN block of a weight :math:`\mathbf{W} \in
# \mathbb{R}^{D_\text{out} \times D_\text{in}}` by :math:`\mathbf{G} \otimes
# \mathbf{A}` (the second moments of the backpropagated output gradients and of
# the inputs) and a bias's block by :math:`\mathbf{G}`, and drops the blocks
# between them. :meth:`~curvlinops.KFACLinearOperator.to_structured` returns
# exactly that: a :class:`~curvlinops.BlockDiagonalLinearOperator` whose blocks
# are :class:`~curvlinops.KroneckerProductLinearOperator` objects (weights) and
# matrices (biases). Its blocks act on KFAC's *canonical form* (each weight
# flattened row by row, a joint bias as its last column); with weights and
# biases in separate blocks (the default) and the parameters in the model's
# order, that is just the flattened parameter vector, so both are the same
# matrix:

K = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
B = K.to_structured()
K_dense = K @ identity
assert close(B @ identity, K_dense)

for name, block in zip(names, B.blocks):
    kind = type(block).__name__
    if isinstance(block, KroneckerProductLinearOperator):
        shapes = " ⊗ ".join(f"{len(f)}x{len(f)}" for f in block.factors)
        kind = f"{kind} {shapes}"
    print(f"{name:>8}: {block.shape[0]:>3} rows, {kind}")

# %%
# The structured form stores the factors, far fewer numbers than the :math:`D^2`
# entries of the dense matrix:

stored = sum(
    sum(f.numel() for f in b.factors)
    if isinstance(b, KroneckerProductLinearOperator)
    else b.shape[0] ** 2
    for b in B.blocks
)
print(f"stored numbers: {stored}, entries of the dense matrix: {num_params**2}")

# %%
# The exact log-determinant
# -------------------------
#
# The determinant of a Kronecker product of :math:`d_1 \times d_1` and
# :math:`d_2 \times d_2` factors is :math:`\det(\mathbf{G})^{d_2}
# \det(\mathbf{A})^{d_1}`, and that of a block-diagonal matrix the product of
# the blocks' determinants. So the log-determinant, which the Laplace
# approximation's evidence needs, costs two small decompositions per layer and
# is exact:

sign, logabsdet = slogdet(K_dense)
print(f"structured logdet {B.logdet:.6f}, dense {logabsdet:.6f}")
assert sign > 0 and B.logdet.allclose(logabsdet)
assert K.logdet.allclose(B.logdet)  # the operator reads it from the same form

# %%
# The damped inverse
# ------------------
#
# A damped Kronecker product :math:`\mathbf{G} \otimes \mathbf{A} + \delta
# \mathbf{I}` is no Kronecker product any more, but its eigenvectors are still
# :math:`\mathbf{Q}_\mathbf{G} \otimes \mathbf{Q}_\mathbf{A}` (from the factors'
# eigendecompositions) and its eigenvalues are :math:`\lambda_i(\mathbf{G})
# \lambda_j(\mathbf{A}) + \delta`. ``B.inverse(damping)`` therefore returns a
# block-diagonal operator of
# :class:`~curvlinops.EighDecomposedLinearOperator` blocks with inverted damped
# eigenvalues, again structured: its log-determinant is
# :math:`-\log\det(\mathbf{K} + \delta \mathbf{I})`, exactly.
# :class:`~curvlinops.KFACInverseLinearOperator` with ``use_exact_damping=True``
# is the same operator.

damping = 1e-5
B_inv = B.inverse(damping=damping)
print([type(block).__name__ for block in B_inv.blocks])
damped_inverse = inv(K_dense + damping * identity)
assert close(B_inv @ identity, damped_inverse)
assert B_inv.logdet.allclose(-slogdet(K_dense + damping * identity).logabsdet)
K_inv = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
assert close(K_inv @ identity, damped_inverse)

# %%
# KFOC: the closest Kronecker product
# -----------------------------------
#
# KFAC's factors are cheap to compute but not the best Kronecker approximation of
# a layer's block. :class:`~curvlinops.KFOCLinearOperator` finds the Kronecker
# product :math:`\mathbf{S}_1 \otimes \mathbf{S}_2` that is closest to the GGN's
# block in Frobenius norm (Van Loan & Pitsianis, 1993) by power iteration on the
# recorded per-datum gradients, without forming the block. It has the same
# structure, so everything above works for it, too. We compare both with the
# GGN's diagonal blocks:

F = KFOCLinearOperator(model, loss_func, params, data, fisher_type="type-2")
F_dense = F.to_structured() @ identity
sizes = [p.numel() for p in params]
offsets = [sum(sizes[:i]) for i in range(len(sizes))]
errors = {}
for name, start, size in zip(names, offsets, sizes):
    block = slice(start, start + size)
    exact = G_dense[block, block]
    errors[name] = [
        (matrix_norm(exact - M[block, block]) / matrix_norm(exact)).item()
        for M in (K_dense, F_dense)
    ]
    print(
        f"{name:>8}: relative error KFAC {errors[name][0]:.2e}, "
        f"KFOC {errors[name][1]:.2e}"
    )
    assert errors[name][1] <= errors[name][0] + 1e-10

# %%
# The biases' blocks are exact for both (a bias's block is a single factor), and
# so is the output layer's weight block: the network is linear after it and the
# loss's Hessian is constant, where KFAC is exact. In the hidden layer, KFOC's
# error is smaller. We plot the magnitudes of the three matrices:

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), layout="constrained")
vmin = -8
for ax, (title, M) in zip(
    axes, [("GGN", G_dense), ("KFAC", K_dense), ("KFOC", F_dense)]
):
    image = ax.imshow(
        M.abs().clamp(min=10**vmin).log10(), vmin=vmin, vmax=0, cmap="magma"
    )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes).set_label(r"$\log_{10} |\mathrm{entry}|$")

# %%
# The exact GGN diagonal versus Hutchinson's estimate
# ---------------------------------------------------
#
# The GGN is :math:`\sum_n \mathbf{J}_n^\top \mathbf{S}_n \mathbf{S}_n^\top
# \mathbf{J}_n` with a square root :math:`\mathbf{S}_n` of the loss Hessian
# (:math:`C` columns for :math:`C` outputs), so its diagonal is the sum of the
# squared entries of the :math:`C` backpropagated vectors
# :math:`\mathbf{J}_n^\top \mathbf{s}_{n,c}` of every datum (Dangel et al.,
# 2020). :class:`~curvlinops.GGNDiagonalLinearOperator` computes them in one
# backward pass per mini-batch, batched over the :math:`C` columns: the cost of
# about :math:`C` gradients, here :math:`C = 4`.
#
# Hutchinson's method (:func:`~curvlinops.hutchinson_diag`) estimates the
# diagonal from products :math:`\mathbf{v} \odot \mathbf{G}\mathbf{v}` with
# random sign vectors. Each GGN product costs a forward-mode and a reverse-mode
# pass, at least a gradient's cost, so :math:`C` products cost at least as much
# as the exact diagonal. We compare the relative errors at that cost and at
# larger budgets (averaged over a few seeds):

num_outputs = 4
start = perf_counter()
exact_diagonal = GGNDiagonalLinearOperator(
    model, loss_func, params, data, check_deterministic=False
)
diagonal = cat([d.flatten() for d in exact_diagonal.diagonal])
time_exact = perf_counter() - start
assert diagonal.allclose(G_dense.diag())
exact_error = ((diagonal - G_dense.diag()).norm() / G_dense.diag().norm()).item()

budgets = [num_outputs * factor for factor in (1, 4, 16, 64)]
seeds = range(3 if FAST else 10)
hutchinson_errors = []
for num_matvecs in budgets:
    relative = [
        (
            hutchinson_diag(G, num_matvecs, generator=Generator().manual_seed(s))
            - G_dense.diag()
        ).norm()
        / G_dense.diag().norm()
        for s in seeds
    ]
    hutchinson_errors.append(sum(relative).item() / len(relative))

start = perf_counter()
hutchinson_diag(G, num_outputs)
time_hutchinson = perf_counter() - start
print(f"exact diagonal: relative error {exact_error:.1e}, {time_exact:.3f} s")
for num_matvecs, error in zip(budgets, hutchinson_errors):
    print(f"Hutchinson, {num_matvecs:>3} GGN products: relative error {error:.3f}")
print(f"(Hutchinson with {num_outputs} products took {time_hutchinson:.3f} s)")
assert exact_error < 1e-10 and hutchinson_errors[0] > 0.1

# %%
# Hutchinson's error decays like :math:`1/\sqrt{K}` with the number :math:`K` of
# products; at the cost of the exact diagonal it is of the order of the diagonal
# itself:

fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.loglog(budgets, hutchinson_errors, "o-", label="Hutchinson")
ax.loglog(
    budgets,
    [hutchinson_errors[0] * (budgets[0] / k) ** 0.5 for k in budgets],
    "k:",
    label=r"$\propto 1/\sqrt{K}$",
)
ax.axvline(
    num_outputs,
    color="C3",
    linestyle="--",
    label=f"cost of the exact diagonal\n(relative error {exact_error:.0e})",
)
ax.set_xlabel("GGN products $K$ (exact diagonal: $C$ backpropagated vectors)")
ax.set_ylabel("relative error of the diagonal")
ax.legend()
fig.tight_layout()

# %%
# KFAC-preconditioned conjugate gradients
# ---------------------------------------
#
# Solving :math:`(\mathbf{G} + \delta \mathbf{I}) \mathbf{x} = -\mathbf{g}`
# for the gradient :math:`\mathbf{g}`, a damped Gauss-Newton step, with the
# conjugate gradient method (CG) costs one GGN product (a pass over the data)
# per iteration. The badly scaled inputs make the system ill-conditioned, and
# plain CG needs many iterations. Most of the ill-conditioning lives within the
# first layer's block, in the scales of its inputs, which KFAC's factor
# :math:`\mathbf{A}` captures; so the damped KFAC inverse (a few small matrix
# products per iteration, no pass over the data) is a good preconditioner
# :math:`\mathbf{P} \approx (\mathbf{G} + \delta \mathbf{I})^{-1}`.
# :class:`~curvlinops.CGInverseLinearOperator` takes it as ``preconditioner``
# (curvlinops 3.x's keyword, GPyTorch-style hyperparameters) or as ``M``
# (SciPy's keyword, together with a ``callback`` that sees every iterate). We
# record the iterates to plot the relative residual against the number of GGN
# products, and also try KFOC's damped inverse.

Id = IdentityLinearOperator([p.shape for p in params], G.device, float64)
damped_G = G + damping * Id
gradient, _ = G.gradient_and_loss()
b = -cat([t.flatten() for t in gradient])
A_dense = G_dense + damping * identity


def residuals(preconditioner=None):
    """Run CG (SciPy's keywords) and return the relative residual per iteration."""
    iterates = [zeros_like(b)]
    solver = CGInverseLinearOperator(
        damped_G,
        tol=1e-8,
        maxiter=5000,
        M=preconditioner,
        callback=lambda x: iterates.append(x.reshape(-1).clone()),
    )
    _ = solver @ b
    return [((A_dense @ x - b).norm() / b.norm()).item() for x in iterates]


histories = {
    "none": residuals(),
    "KFAC": residuals(KFACInverseLinearOperator(K, damping, use_exact_damping=True)),
    "KFOC": residuals(F.inverse(damping=damping)),
}
for name, history in histories.items():
    print(f"preconditioner {name:>4}: {len(history) - 1} GGN products")
assert len(histories["KFAC"]) < 0.5 * len(histories["none"])

fig, ax = plt.subplots(figsize=(5.5, 3.8))
for name, history in histories.items():
    ax.semilogy(history, label=name)
ax.set_xlabel("products with the GGN (CG iterations)")
ax.set_ylabel("relative residual")
ax.set_title(r"$(\mathbf{G} + 10^{-5}\,\mathbf{I})\,\mathbf{x} = -\mathbf{g}$")
ax.legend(title="preconditioner")
fig.tight_layout()

# %%
# The same solve with curvlinops 3.x's keywords: ``tolerance`` bounds the mean
# relative residual over the right-hand sides, and ``eps`` is the guard against
# tiny denominators in CG's coefficients; GPyTorch's default of ``1e-10``
# stalls this badly scaled system at a relative residual of about
# :math:`10^{-6}`, so we lower it for an accurate solve:

solver = CGInverseLinearOperator(
    damped_G,
    preconditioner=KFACInverseLinearOperator(K, damping, use_exact_damping=True),
    tolerance=1e-8,
    max_iter=1000,
    eps=1e-20,
)
x = solver @ b
x_dense = solve(A_dense, b)
relative_error = ((x - x_dense).norm() / x_dense.norm()).item()
print(f"relative error of the solution: {relative_error:.1e}")
assert relative_error < 1e-5

# %%
# Structured blocks combine freely: a
# :class:`~curvlinops.BlockDiagonalLinearOperator` may hold Kronecker products,
# eigendecompositions, diagonals and dense matrices side by side, e.g. KFAC for
# the hidden layer and the exact GGN block for the small output layer:

hidden = sum(sizes[:2])
mixed = BlockDiagonalLinearOperator(B.blocks[:2] + [G_dense[hidden:, hidden:]])
print(f"mixed: logdet {mixed.logdet:.4f}, trace {mixed.trace:.4f}")
mixed_dense = mixed @ identity
assert mixed.logdet.allclose(slogdet(mixed_dense).logabsdet)
assert close(mixed.inverse(damping) @ identity, inv(mixed_dense + damping * identity))

# %%
# References:
#
# - Martens, J., & Grosse, R. (2015). Optimizing neural networks with
#   Kronecker-factored approximate curvature. ICML.
# - Van Loan, C. F., & Pitsianis, N. (1993). Approximation with Kronecker
#   products. Linear Algebra for Large Scale and Real-Time Applications.
# - Bekas, C., Kokiopoulou, E., & Saad, Y. (2007). An estimator for the diagonal
#   of a matrix. Applied Numerical Mathematics.
# - Dangel, F., Kunstner, F., & Hennig, P. (2020). BackPACK: Packing more into
#   backprop. ICLR.
# - Hestenes, M. R., & Stiefel, E. (1952). Methods of conjugate gradients for
#   solving linear systems. Journal of Research of the National Bureau of
#   Standards.
