r"""A visual tour of the curvature matrices
=======================================

``curvlinops`` offers many curvature matrices of the same network: the Hessian,
the generalized Gauss-Newton matrix (GGN), the Fisher, the empirical Fisher, and
the Kronecker-factored approximations KFAC and EKFAC. This tutorial builds all of
them for a tiny network, looks at them as images, and verifies numerically how
they are related, with the Jacobian as the common building block.

We start with the imports.
"""

import matplotlib.pyplot as plt
import numpy
from matplotlib.colors import SymLogNorm
from torch import block_diag, cat, eye, float64, manual_seed, rand, randint
from torch.autograd import grad
from torch.func import functional_call, hessian
from torch.linalg import matrix_norm, matrix_rank
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)
from curvlinops.examples.functorch import functorch_hessian, functorch_jacobian

# %%
# Setup
# -----
#
# A three-layer network classifies eight random inputs into three classes with
# the cross-entropy loss (``reduction='mean'``), in double precision. With 79
# parameters, every curvature matrix is a 79 x 79 image. The data come in two
# mini-batches; the operators sum over them.

manual_seed(0)
num_data, num_classes = 8, 3
X = rand(num_data, 5, dtype=float64)
y = randint(0, num_classes, (num_data,))
data = [(X[:4], y[:4]), (X[4:], y[4:])]

model = Sequential(
    Linear(5, 6), Tanh(), Linear(6, 4), Tanh(), Linear(4, num_classes)
).to(float64)
loss_func = CrossEntropyLoss()
names = [name for name, _ in model.named_parameters()]
params = list(model.parameters())
sizes = [p.numel() for p in params]
num_params = sum(sizes)
print(f"{num_params} parameters: {dict(zip(names, sizes))}")

# %%
# Every operator turns into a dense matrix by multiplying it onto the identity
# matrix: one batched product with :math:`D` columns. (This is only sensible for
# small networks; all operators are meant to be used matrix-free.)

identity = eye(num_params, dtype=float64)


def dense(operator):
    """Return the dense matrix of an operator with ``num_params`` columns."""
    return operator @ identity


# %%
# The matrices
# ------------
#
# For the empirical risk :math:`\mathcal{L}(\mathbf{\theta}) = \frac{1}{N}
# \sum_{n=1}^N \ell(\mathbf{f}_n, \mathbf{y}_n)` with the network's outputs
# (logits) :math:`\mathbf{f}_n = f_\mathbf{\theta}(\mathbf{x}_n)`, the
# operators represent
#
# - the **Hessian** :math:`\mathbf{H} = \nabla^2_\mathbf{\theta} \mathcal{L}`,
# - the **GGN** :math:`\mathbf{G} = \frac{1}{N} \sum_n \mathbf{J}_n^\top
#   \nabla^2_{\mathbf{f}_n} \ell_n \mathbf{J}_n` with the Jacobians
#   :math:`\mathbf{J}_n = \partial \mathbf{f}_n / \partial \mathbf{\theta}`,
# - the **Fisher** :math:`\mathbf{F} = \frac{1}{N} \sum_n
#   \mathbb{E}_{\tilde{\mathbf{y}} \sim q(\cdot | \mathbf{f}_n)} [\nabla_\mathbf{\theta}
#   \ell(\mathbf{f}_n, \tilde{\mathbf{y}}) \nabla_\mathbf{\theta}
#   \ell(\mathbf{f}_n, \tilde{\mathbf{y}})^\top]`, with labels drawn from the
#   model's predictive distribution :math:`q`; the operator estimates the
#   expectation with ``mc_samples`` Monte-Carlo samples,
# - the **empirical Fisher** (EF) :math:`\mathbf{E} = \frac{1}{N} \sum_n
#   \nabla_\mathbf{\theta} \ell_n \nabla_\mathbf{\theta} \ell_n^\top`, the same
#   outer products with the *true* labels,
# - and **KFAC** and **EKFAC**, which approximate each layer's diagonal block of
#   the GGN (``fisher_type='type-2'``), the Fisher (``'mc'``, the default) or
#   the EF (``'empirical'``) by a Kronecker product, and ignore the blocks
#   between layers.

matrices = {
    "Hessian": dense(HessianLinearOperator(model, loss_func, params, data)),
    "GGN": dense(GGNLinearOperator(model, loss_func, params, data)),
    "empirical Fisher": dense(EFLinearOperator(model, loss_func, params, data)),
    "MC Fisher (1 sample)": dense(
        FisherMCLinearOperator(model, loss_func, params, data, mc_samples=1)
    ),
    "MC Fisher (1000 samples)": dense(
        FisherMCLinearOperator(model, loss_func, params, data, mc_samples=1000)
    ),
    "KFAC": dense(
        KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    ),
    "EKFAC": dense(
        EKFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    ),
}
H, G, E = matrices["Hessian"], matrices["GGN"], matrices["empirical Fisher"]

# %%
# Here they are, on a common symmetric logarithmic color scale (entries of
# magnitude below :math:`10^{-4}` look white). The thin lines separate the
# parameters: the weight and bias of each of the three layers. The last panel
# shows the difference between the Hessian and the GGN.

boundaries = numpy.cumsum(sizes)[:-1] - 0.5
norm = SymLogNorm(linthresh=1e-4, vmin=-0.3, vmax=0.3)
panels = {**matrices, "Hessian - GGN": H - G}

fig, axes = plt.subplots(2, 4, figsize=(12, 6), layout="constrained")
for ax, (title, matrix) in zip(axes.flat, panels.items()):
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", norm=norm)
    for b in boundaries:
        ax.axhline(b, color="gray", linewidth=0.3)
        ax.axvline(b, color="gray", linewidth=0.3)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8).set_label("entry (symmetric log scale)")

# %%
# A few things stand out:
#
# - The Hessian differs from the GGN by the curvature of the network itself
#   (last panel, explained below), which vanishes on the last layer.
# - The MC Fisher with one sample is a noisy version of the GGN, and with 1000
#   samples it is hard to tell apart from it.
# - The empirical Fisher resembles the GGN, but it is a different matrix.
# - KFAC and EKFAC are zero outside the diagonal blocks of the weights and
#   biases, and close to the GGN inside them.
#
# The Jacobian, the common building block
# ---------------------------------------
#
# :class:`~curvlinops.JacobianLinearOperator` represents the Jacobian of all
# outputs on the data set w.r.t. the parameters, an :math:`NC \times D` matrix
# whose rows are ordered by datum, then by output. Its product costs one forward
# pass (forward-mode automatic differentiation); its transpose
# (:meth:`~curvlinops.PyTorchLinearOperator.adjoint`, a
# :class:`~curvlinops.TransposedJacobianLinearOperator`) costs one backward pass.

J_op = JacobianLinearOperator(model, params, data)
J = dense(J_op)
print(f"Jacobian: {J_op.shape}, transpose: {J_op.adjoint().shape}")
assert J.allclose(functorch_jacobian(model, params, data))
assert (J_op.adjoint() @ J[:, 0]).allclose(J.T @ J[:, 0])

# %%
# The GGN is the Jacobian "sandwich" :math:`\mathbf{G} = \mathbf{J}^\top
# \mathbf{H}_\ell \mathbf{J}` with the Hessian :math:`\mathbf{H}_\ell` of the
# loss w.r.t. all outputs. That is a small matrix, :math:`NC \times NC`, and
# block diagonal, because every datum's loss only depends on its own output.
# (For the cross-entropy loss, each :math:`C \times C` block is
# :math:`\frac{1}{N}(\mathrm{diag}(\mathbf{p}_n) - \mathbf{p}_n
# \mathbf{p}_n^\top)` with the predicted probabilities :math:`\mathbf{p}_n`.)
# We compute it with :func:`torch.func.hessian` and confirm the identity:

outputs = model(X).detach()
H_loss = hessian(lambda f: loss_func(f, y))(outputs)
H_loss = H_loss.reshape(num_data * num_classes, num_data * num_classes)
assert (J.T @ H_loss @ J).allclose(G)

# %%
# The Fisher and the empirical Fisher are sandwiches, too. The EF's middle
# matrix is block diagonal with blocks :math:`\frac{1}{N} \mathbf{g}_n
# \mathbf{g}_n^\top`, the outer products of the loss gradients
# :math:`\mathbf{g}_n = \nabla_{\mathbf{f}_n} \ell_n` w.r.t. the outputs. Each
# block has rank one, so the EF has rank at most :math:`N`. The Fisher replaces
# the true labels by samples from the model; for the cross-entropy (and the
# square loss) their expected outer product equals the loss Hessian, so the
# Fisher *is* the GGN, and the MC Fisher approaches it as the number of
# samples grows.

per_datum_loss = CrossEntropyLoss(reduction="none")
f = outputs.clone().requires_grad_(True)
(g,) = grad(per_datum_loss(f, y).sum(), f)  # [N, C], one gradient per datum
S_E = block_diag(*[g_n.outer(g_n) / num_data for g_n in g])
assert (J.T @ S_E @ J).allclose(E)
print(f"rank of the EF: {matrix_rank(E)}, of the GGN: {matrix_rank(G)}")
assert matrix_rank(E) <= num_data


def relative_distance(A, B):
    """Return the relative Frobenius-norm distance of ``A`` to ``B``."""
    return (matrix_norm(A - B) / matrix_norm(B)).item()


for key in ["MC Fisher (1 sample)", "MC Fisher (1000 samples)", "empirical Fisher"]:
    print(f"{key:>25}: distance to the GGN {relative_distance(matrices[key], G):.3f}")
assert relative_distance(matrices["MC Fisher (1000 samples)"], G) < 0.1
assert relative_distance(matrices["MC Fisher (1000 samples)"], G) < relative_distance(
    matrices["MC Fisher (1 sample)"], G
)

# %%
# Here is the Jacobian (rows: data points times outputs, columns: parameters)
# next to the block-diagonal loss Hessian and the EF's rank-one blocks. The
# Jacobian w.r.t. the last layer's bias is the identity for every datum.

fig, axes = plt.subplots(
    1, 3, figsize=(12, 3), layout="constrained", width_ratios=[num_params, 24, 24]
)
for ax, matrix, title in [
    (axes[0], J, r"$\mathbf{J}$ (Jacobian)"),
    (axes[1], H_loss, r"$\mathbf{H}_\ell$ (GGN, Fisher)"),
    (axes[2], S_E, r"$\frac{1}{N}\mathbf{g}_n\mathbf{g}_n^\top$ (EF)"),
]:
    image = ax.imshow(
        matrix.numpy(), cmap="RdBu_r", norm=SymLogNorm(1e-3, vmin=-1, vmax=1)
    )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes).set_label("entry (symmetric log scale)")

# %%
# Hessian and GGN
# ---------------
#
# By the chain rule, the Hessian has a second term:
#
# .. math::
#     \mathbf{H} = \mathbf{G} + \frac{1}{N} \sum_{n=1}^N \sum_{c=1}^C
#     [\nabla_{\mathbf{f}_n} \ell_n]_c \nabla^2_\mathbf{\theta} [\mathbf{f}_n]_c\,.
#
# It contains the second derivatives of the network, and it vanishes where the
# network is linear in the parameters or the loss gradients
# :math:`\mathbf{g}_n` are zero. The GGN drops it, which makes it positive
# semi-definite for losses that are convex in the outputs. We check the
# identity with
# :func:`torch.func.hessian` of :math:`\mathbf{\theta} \mapsto \frac{1}{N}
# \sum_n \mathbf{g}_n^\top f_\mathbf{\theta}(\mathbf{x}_n)` with the gradients
# held fixed.


def outputs_of(theta):
    """Return the network's outputs on all data for flattened parameters."""
    tensors = [t.reshape(p.shape) for t, p in zip(theta.split(sizes), params)]
    return functional_call(model, dict(zip(names, tensors)), (X,))


theta = cat([p.detach().flatten() for p in params])
model_curvature = hessian(lambda t: (g * outputs_of(t)).sum() / num_data)(theta)
assert (G + model_curvature).allclose(H)

# %%
# The outputs are linear in the last layer's weight and bias, so the Hessian and
# the GGN agree on that block (bottom right in the panel "Hessian - GGN" above):

last_layer = slice(num_params - sizes[-2] - sizes[-1], num_params)
assert (model_curvature[last_layer, last_layer] == 0).all()
assert H[last_layer, last_layer].allclose(G[last_layer, last_layer])
assert H.allclose(functorch_hessian(model, loss_func, params, data))

# %%
# KFAC and EKFAC
# --------------
#
# KFAC approximates the block of a layer with weight :math:`\mathbf{W}` by a
# Kronecker product :math:`\mathbf{G}_\text{out} \otimes \mathbf{A}` of the
# second moments of the gradients w.r.t. the layer's outputs and of its inputs.
# By default, weight and bias get blocks of their own
# (``separate_weight_and_bias=True``); all other entries are zero:

block_mask = block_diag(*[identity.new_ones(s, s) for s in sizes]).bool()
for key in ["KFAC", "EKFAC"]:
    assert (matrices[key][~block_mask] == 0).all()

# %%
# The approximation replaces the average of Kronecker products (one per datum)
# by the Kronecker product of averages. With a single datum, nothing is averaged,
# and KFAC's blocks are exactly the GGN's diagonal blocks, whatever the
# nonlinearities:

one_datum = [(X[:1], y[:1])]
kfac_one = dense(
    KFACLinearOperator(model, loss_func, params, one_datum, fisher_type="type-2")
)
ggn_one = dense(GGNLinearOperator(model, loss_func, params, one_datum))
assert kfac_one.allclose(ggn_one * block_mask)

# %%
# EKFAC keeps KFAC's eigenvectors, but replaces its eigenvalues by the exact
# second moments of the per-datum gradients in that eigenbasis: the diagonal of
# the GGN block in KFAC's eigenbasis. Therefore EKFAC has the same trace as the
# GGN, while KFAC's trace differs (both operators compute it from their
# factors):

K_op = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
EK_op = EKFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
print(f"trace: GGN {G.trace():.6f}, EKFAC {EK_op.trace:.6f}, KFAC {K_op.trace:.6f}")
assert EK_op.trace.allclose(G.trace())
assert not K_op.trace.allclose(G.trace())

# %%
# Among all matrices with KFAC's eigenvectors, EKFAC is the closest to the GGN's
# diagonal blocks in Frobenius norm, so it is at least as accurate as KFAC:

distances = {
    key: relative_distance(matrices[key], G * block_mask) for key in ["KFAC", "EKFAC"]
}
for key, distance in distances.items():
    print(f"{key:>5}: distance to the GGN's diagonal blocks {distance:.2e}")
assert distances["EKFAC"] <= distances["KFAC"]
