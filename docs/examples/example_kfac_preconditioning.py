r"""KFAC and EKFAC: matrix functions, inverses, and preconditioning
================================================================

Kronecker-factored approximate curvature (KFAC) replaces each layer's block of
the curvature matrix by a Kronecker product :math:`\mathbf{G} \otimes
\mathbf{A}` of two small matrices, and drops the blocks between layers. Because
the factors are small, KFAC's trace, determinant, norm and (damped) inverse cost
next to nothing, which makes it a popular preconditioner for optimization. This
tutorial

- checks the matrix functions of :class:`~curvlinops.KFACLinearOperator` and
  :class:`~curvlinops.EKFACLinearOperator` against dense matrices,
- explains the damping options of their inverse,
  :class:`~curvlinops.KFACInverseLinearOperator`,
- trains a network with KFAC-preconditioned gradient descent,
- uses KFAC and EKFAC as preconditioners of the conjugate gradient method, and
- saves and restores the factors.

We start with the imports.
"""

import os
from copy import deepcopy
from io import BytesIO

import matplotlib.pyplot as plt
import torch
from torch import (
    block_diag,
    cat,
    eye,
    float64,
    kron,
    logspace,
    manual_seed,
    no_grad,
    randint,
    randn,
)
from torch.autograd import grad
from torch.linalg import inv, matrix_norm, slogdet
from torch.nn import CrossEntropyLoss, Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    CGInverseLinearOperator,
    EKFACLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small network regresses a two-dimensional function of eight input features
# of different scales with the mean squared error, in double precision.

manual_seed(0)
num_data = 128 if FAST else 256
X = randn(num_data, 8, dtype=float64) * logspace(-1, 0.5, 8, dtype=float64)
y = (2 * X[:, :2]).sin() * X[:, 2:4].cos() + 0.05 * randn(num_data, 2, dtype=float64)
data = list(zip(X.split(64), y.split(64)))

model = Sequential(Linear(8, 16), Tanh(), Linear(16, 16), Tanh(), Linear(16, 2))
model = model.to(float64)
initial_model = deepcopy(model)  # for the training runs below
loss_func = MSELoss()
params = list(model.parameters())
num_params = sum(p.numel() for p in params)
identity = eye(num_params, dtype=float64)
print(f"{num_params} parameters, {num_data} data points")

# %%
# KFAC and EKFAC
# --------------
#
# For a ``Linear`` layer with weight :math:`\mathbf{W}`, KFAC approximates the
# curvature block by :math:`\mathbf{G} \otimes \mathbf{A}`, where
# :math:`\mathbf{A}` is the second moment of the layer's inputs and
# :math:`\mathbf{G}` that of the vectors backpropagated to its outputs. The
# ``fisher_type`` chooses these vectors, and with them the matrix that KFAC
# approximates: ``'type-2'`` the GGN, ``'mc'`` (the default) the Fisher through
# sampled labels, ``'empirical'`` the empirical Fisher. EKFAC (George et al.,
# 2018) keeps KFAC's eigenvectors and corrects its eigenvalues. Both compute
# their factors in one pass over the data (EKFAC in two) when first needed.

kfac_kwargs = {"fisher_type": "type-2"}
K = KFACLinearOperator(model, loss_func, params, data, **kfac_kwargs)
EK = EKFACLinearOperator(model, loss_func, params, data, **kfac_kwargs)
K_dense, EK_dense = K @ identity, EK @ identity
G_dense = GGNLinearOperator(model, loss_func, params, data) @ identity

# %%
# Matrix functions from the factors
# ---------------------------------
#
# The trace, the (log-)determinant and the Frobenius norm of a Kronecker product
# follow from those of its factors, e.g. :math:`\mathrm{tr}(\mathbf{G} \otimes
# \mathbf{A}) = \mathrm{tr}(\mathbf{G})\,\mathrm{tr}(\mathbf{A})` and
# :math:`\log\det(\mathbf{G} \otimes \mathbf{A}) = d_\mathbf{A} \log\det
# \mathbf{G} + d_\mathbf{G} \log\det \mathbf{A}`, so the operators compute
# them without products (as properties, cached until the factors change):

for name, op, dense in [("KFAC", K, K_dense), ("EKFAC", EK, EK_dense)]:
    sign, logabsdet = slogdet(dense)
    print(
        f"{name:>5}: trace {op.trace:.4f}, logdet {op.logdet:.2f}, "
        f"Frobenius norm {op.frobenius_norm:.4f}"
    )
    assert op.trace.allclose(dense.trace())
    assert sign == 1 and op.logdet.allclose(logabsdet)
    assert op.frobenius_norm.allclose(matrix_norm(dense))
    assert op.det == op.logdet.exp()

# %%
# The determinant of a matrix with hundreds of small eigenvalues underflows to
# zero in floating point arithmetic (here, the log-determinant is in the
# thousands below zero), which is why
# :attr:`~curvlinops.KFACLinearOperator.logdet` is usually what you want:

print(f"det of KFAC: {K.det}")

# %%
# The damped inverse
# ------------------
#
# Curvature matrices of networks are singular or nearly so, and KFAC is an
# approximation, so preconditioners use a damped inverse, a
# :class:`~curvlinops.KFACInverseLinearOperator` (``K.inverse(...)`` is a
# shortcut), which inverts each block through the factors. It offers three ways
# to add a damping :math:`\delta > 0`:
#
# - ``use_exact_damping=True``: :math:`(\mathbf{G} \otimes \mathbf{A} + \delta
#   \mathbf{I})^{-1}`, via the factors' eigendecompositions; the inverse of the
#   damped KFAC matrix,
# - the default: :math:`(\mathbf{G} + \delta \mathbf{I})^{-1} \otimes
#   (\mathbf{A} + \delta \mathbf{I})^{-1}`, damping each factor, which is
#   cheaper (Cholesky decompositions) but changes the matrix by :math:`\delta
#   (\mathbf{G} \otimes \mathbf{I} + \mathbf{I} \otimes \mathbf{A}) + \delta^2
#   \mathbf{I}`,
# - ``use_heuristic_damping=True``: factor damping with :math:`\delta_\mathbf{A}
#   = \pi \sqrt{\delta}` and :math:`\delta_\mathbf{G} = \sqrt{\delta} / \pi`,
#   where :math:`\pi^2` is the ratio of the factors' average eigenvalues
#   :math:`\frac{\mathrm{tr}(\mathbf{A}) / d_\mathbf{A}}{\mathrm{tr}(\mathbf{G})
#   / d_\mathbf{G}}` (Martens & Grosse, 2015, Section 6.3), which balances the
#   damping between the factors.
#
# EKFAC is always damped exactly: :math:`(\mathbf{E} + \delta
# \mathbf{I})^{-1}`. We check the options against dense matrices. The factors
# are cached in the attributes ``_input_covariances`` and
# ``_gradient_covariances``, keyed by layer name; by default, weight and bias
# have blocks of their own, and the bias block is :math:`\mathbf{G}`.

damping = 1e-2
K_inv_exact = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
assert (K_inv_exact @ identity).allclose(inv(K_dense + damping * identity))
assert (EK.inverse(damping=damping) @ identity).allclose(
    inv(EK_dense + damping * identity)
)


def factor_damped_kfac(damp_A, damp_G):
    """Return dense KFAC with damped factors; ``damp_*`` map a factor to a damping."""
    blocks = []
    for layer in K._mapping:  # in parameter order: weight block, then bias block
        A, G = K._input_covariances[layer], K._gradient_covariances[layer]
        I_A, I_G = eye(len(A), dtype=float64), eye(len(G), dtype=float64)
        G_damped = G + damp_G(A, G) * I_G
        blocks += [kron(G_damped, A + damp_A(A, G) * I_A), G + damping * I_G]
    return block_diag(*blocks)


def pi(A, G):
    """Return the balancing factor of the heuristic damping."""
    return ((A.trace() / len(A)) / (G.trace() / len(G))).sqrt()


K_inv_factor = K.inverse(damping=damping)
K_inv_heuristic = K.inverse(damping=damping, use_heuristic_damping=True)
assert (K_inv_factor @ identity).allclose(
    inv(factor_damped_kfac(lambda A, G: damping, lambda A, G: damping))
)
assert (K_inv_heuristic @ identity).allclose(
    inv(
        factor_damped_kfac(
            lambda A, G: pi(A, G) * damping**0.5, lambda A, G: damping**0.5 / pi(A, G)
        )
    )
)

# %%
# The inverse caches the inverted factors after its first product (unless
# ``cache=False``); after recomputing the factors, e.g. for new parameters,
# create a new inverse.
#
# How different are they? We compare each inverse with the exactly damped one
# on the gradient, the vector a preconditioner is applied to:

gradient, loss = K.gradient_and_loss()
g = cat([t.flatten() for t in gradient])
exact_step = K_inv_exact @ g
for name, K_inv in [("factor", K_inv_factor), ("heuristic", K_inv_heuristic)]:
    step = K_inv @ g
    distance = ((step - exact_step).norm() / exact_step.norm()).item()
    print(f"{name:>9} damping: relative distance to exact damping {distance:.3f}")

# %%
# KFAC-preconditioned gradient descent
# ------------------------------------
#
# KFAC's original purpose (Martens & Grosse, 2015) is optimization: multiply
# the gradient with the damped inverse of the curvature approximation, a cheap
# stand-in for the natural gradient or Gauss-Newton step,
#
# .. math::
#     \mathbf{\theta} \leftarrow \mathbf{\theta} - \eta\,
#     (\mathbf{G} \otimes \mathbf{A} + \delta \mathbf{I})^{-1} \nabla
#     \mathcal{L}(\mathbf{\theta})\,.
#
# Every step recomputes the factors (one pass over the data); every operator
# also computes the gradient and loss, in the tensor-list format, so we can
# subtract the step from the parameters directly. We compare with plain
# gradient descent at its best learning rate from a small grid (a larger one
# diverges).

num_steps = 30 if FAST else 60


def train(preconditioner, learning_rate):
    """Train a copy of the initial model and return its losses.

    ``preconditioner`` maps a KFAC operator (``None``: plain gradient descent) to
    the operator that multiplies the gradient.
    """
    model = deepcopy(initial_model)
    params = list(model.parameters())
    losses = []
    for _ in range(num_steps):
        if preconditioner is None:
            loss = loss_func(model(X), y)
            step = grad(loss, params)
        else:
            K = KFACLinearOperator(
                model, loss_func, params, data, check_deterministic=False, **kfac_kwargs
            )
            gradient, loss = K.gradient_and_loss()
            step = preconditioner(K) @ list(gradient)
        losses.append(loss.item())
        with no_grad():
            for p, s in zip(params, step):
                p.sub_(learning_rate * s)
    return losses


gd_losses = {lr: train(None, lr) for lr in [0.1, 0.3, 1.0]}
best_lr = min(gd_losses, key=lambda lr: gd_losses[lr][-1])
print(f"gradient descent: best learning rate {best_lr}")

kfac_damping = 1e-2
kfac_losses = {
    "KFAC, exact damping": train(
        lambda K: K.inverse(damping=kfac_damping, use_exact_damping=True), 0.3
    ),
    "KFAC, factor damping": train(lambda K: K.inverse(damping=kfac_damping), 0.3),
    "KFAC, heuristic damping": train(
        lambda K: K.inverse(damping=kfac_damping, use_heuristic_damping=True), 0.3
    ),
}

fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(gd_losses[best_lr], "k-", label=f"gradient descent, $\\eta = {best_lr}$")
for label, losses in kfac_losses.items():
    ax.semilogy(losses, label=f"{label}, $\\eta = 0.3$")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title(rf"KFAC-preconditioned gradient descent, $\delta = {kfac_damping}$")
ax.legend()
fig.tight_layout()

for label, losses in kfac_losses.items():
    print(f"{label}: final loss {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * gd_losses[best_lr][-1]
print(f"gradient descent: final loss {gd_losses[best_lr][-1]:.4f}")

# %%
# All three variants reach a much lower loss than gradient descent. The damping
# is a hyperparameter like the learning rate: factor damping, whose steps are
# farthest from those of the exactly damped inverse, happens to train fastest
# here, and on another problem another choice may win.
#
# Preconditioned conjugate gradients
# ----------------------------------
#
# To solve a linear system with a damped curvature matrix exactly, e.g. for a
# damped Newton step or an influence function, we can run the conjugate
# gradient method (CG) and use KFAC as its *preconditioner*: CG then works on
# the system transformed by the preconditioner :math:`\mathbf{P}`, and converges
# fast if :math:`\mathbf{P}` approximates the inverse of the system's matrix
# well. :class:`~curvlinops.CGInverseLinearOperator` takes the preconditioner as
# its ``M`` argument; each iteration costs one product with the curvature matrix
# (a pass over the data) and one with :math:`\mathbf{P}` (almost free).
#
# KFAC captures the curvature within each layer. A case where that is all there
# is: a linear classifier on features of very different scales, e.g. a linear
# probe on fixed embeddings, or the last layer of a network. We solve
# :math:`(\mathbf{G} + \delta\mathbf{I}) \mathbf{x} = -\mathbf{g}` for its GGN
# with a small damping. Weight and bias share one Kronecker block here
# (``separate_weight_and_bias=False``), so that KFAC and EKFAC capture their
# correlation, too.

num_samples = 256 if FAST else 512
features = randn(num_samples, 20, dtype=float64) * logspace(-3, 1, 20, dtype=float64)
labels = randint(0, 5, (num_samples,))
probe_data = list(zip(features.split(128), labels.split(128)))
probe = Linear(20, 5).to(float64)
probe_params, probe_loss = list(probe.parameters()), CrossEntropyLoss()

G_probe = GGNLinearOperator(probe, probe_loss, probe_params, probe_data)
gradient, _ = G_probe.gradient_and_loss()
g_probe = cat([t.flatten() for t in gradient])
probe_kwargs = {"fisher_type": "type-2", "separate_weight_and_bias": False}
K_probe = KFACLinearOperator(
    probe, probe_loss, probe_params, probe_data, **probe_kwargs
)
EK_probe = EKFACLinearOperator(
    probe, probe_loss, probe_params, probe_data, **probe_kwargs
)

delta = 1e-4
I_probe = IdentityLinearOperator(
    [p.shape for p in probe_params], G_probe.device, float64
)
damped_G_probe = G_probe + delta * I_probe
A_dense = G_probe @ eye(len(g_probe), dtype=float64) + delta * eye(len(g_probe))
print(f"condition number: {torch.linalg.cond(A_dense):.1e}")


def cg_residuals(A, b, preconditioner=None):
    """Run CG on ``A x = b`` and return the relative residual after each iteration."""
    iterates = [torch.zeros_like(b)]
    A_inv = CGInverseLinearOperator(
        A,
        tol=1e-8,
        M=preconditioner,
        callback=lambda x: iterates.append(x.reshape(-1).clone()),
        maxiter=2000,
    )
    _ = A_inv @ b
    return [((A @ x - b).norm() / b.norm()).item() for x in iterates]


probe_residuals = {
    "none": cg_residuals(damped_G_probe, -g_probe),
    "KFAC": cg_residuals(
        damped_G_probe,
        -g_probe,
        K_probe.inverse(damping=delta, use_exact_damping=True),
    ),
    "EKFAC": cg_residuals(damped_G_probe, -g_probe, EK_probe.inverse(damping=delta)),
}
for name, residuals in probe_residuals.items():
    print(f"preconditioner {name:>5}: {len(residuals) - 1} iterations")
assert len(probe_residuals["KFAC"]) < 0.5 * len(probe_residuals["none"])
assert len(probe_residuals["EKFAC"]) < 0.5 * len(probe_residuals["none"])

fig, ax = plt.subplots(figsize=(6, 4))
for name, residuals in probe_residuals.items():
    ax.semilogy(residuals, label=name)
ax.set_xlabel("CG iteration (= products with the GGN)")
ax.set_ylabel("relative residual")
ax.set_title(
    r"Linear probe: $(\mathbf{G} + 10^{-4}\,\mathbf{I})\mathbf{x}"
    r" = -\mathbf{g}$"
)
ax.legend(title="preconditioner")
fig.tight_layout()

# %%
# A caveat: in a deep network, the blocks *between* layers, which KFAC ignores,
# carry much of the curvature. Meanwhile, plain CG profits from the GGN's
# spectrum, whose many tiny eigenvalues become one cluster at the damping,
# which CG resolves in few iterations. For the regression network above, the
# KFAC preconditioner slows CG down:

damped_G = GGNLinearOperator(
    model, loss_func, params, data
) + damping * IdentityLinearOperator([p.shape for p in params], K.device, float64)
mlp_residuals = {
    "none": cg_residuals(damped_G, -g),
    "KFAC": cg_residuals(
        damped_G, -g, K.inverse(damping=damping, use_exact_damping=True)
    ),
}
for name, residuals in mlp_residuals.items():
    print(f"MLP, preconditioner {name:>5}: {len(residuals) - 1} iterations")
assert len(mlp_residuals["KFAC"]) > len(mlp_residuals["none"])

# %%
# So measure before you precondition. As a preconditioner of an optimizer, where
# no linear system is solved to high accuracy, KFAC shines, as we saw above.
#
# Saving and loading the factors
# ------------------------------
#
# Computing the factors is a pass over the data, which may be expensive for large
# data sets. :meth:`~curvlinops.KFACLinearOperator.state_dict` returns the
# factors together with the hyperparameters and the model's state, in a
# dictionary that :func:`torch.save` can write;
# :meth:`~curvlinops.KFACLinearOperator.load_state_dict` restores them into an
# operator, and :meth:`~curvlinops.KFACLinearOperator.from_state_dict` creates a
# new one (rebuilding the loss function from the saved type and reduction),
# without a pass over the data if the determinism check is off. The layout is that
# of curvlinops 3.0.1, so the two libraries read each other's files.

buffer = BytesIO()  # a file in practice
torch.save(EK.state_dict(), buffer)
buffer.seek(0)
state = torch.load(buffer)

EK_restored = EKFACLinearOperator.from_state_dict(
    state, model, params, data, check_deterministic=False
)
v = randn(num_params, dtype=float64)
assert (EK_restored @ v).allclose(EK @ v)
assert EK_restored.logdet.allclose(EK.logdet)

# %%
# References:
#
# - Martens, J., & Grosse, R. (2015). Optimizing neural networks with
#   Kronecker-factored approximate curvature. ICML.
# - George, T., Laurent, C., Bouthillier, X., Ballas, N., & Vincent, P. (2018).
#   Fast approximate natural gradient descent in a Kronecker factored
#   eigenbasis. NeurIPS.
