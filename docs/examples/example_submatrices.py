r"""Sub-matrices: blocks of the Hessian
====================================

Often only part of a curvature matrix is of interest: the block of one layer,
the coupling between two layers, or a few selected entries. This tutorial
extracts such blocks from the Hessian of a small network with
:class:`~curvlinops.SubmatrixLinearOperator`, which stays matrix-free, and
compares them with the dense Hessian.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
from torch import eye, float64, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import HessianLinearOperator, SubmatrixLinearOperator
from curvlinops.examples.functorch import functorch_hessian

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small three-layer classifier on synthetic data, in double precision to
# compare with the dense Hessian to many digits:

manual_seed(0)
num_data = 64 if FAST else 256
X, y = rand(num_data, 6, dtype=float64), randint(0, 3, (num_data,))
data = list(zip(X.split(32), y.split(32)))

model = Sequential(Linear(6, 5), Tanh(), Linear(5, 4), Tanh(), Linear(4, 3)).to(float64)
loss_func = CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]
names = [name for name, p in model.named_parameters() if p.requires_grad]

H = HessianLinearOperator(model, loss_func, params, data)
H_dense = functorch_hessian(model, loss_func, params, data).detach()
print(f"Hessian of shape {H.shape}")

# %%
# The Hessian's rows and columns follow the parameters in the order of
# ``params``, each flattened. We collect the indices that belong to each
# parameter:

indices, start = {}, 0
for name, p in zip(names, params):
    indices[name] = list(range(start, start + p.numel()))
    start += p.numel()
    print(f"{name:>8}: indices {indices[name][0]:>2} to {indices[name][-1]:>2}")

# %%
# One parameter's block
# ---------------------
#
# :class:`~curvlinops.SubmatrixLinearOperator` takes an operator and lists of row
# and column indices, and represents ``A[rows, :][:, cols]``. A product with it
# is one product with the full operator (on a zero-padded vector), so a block
# with :math:`c` columns costs :math:`c` Hessian-vector products, not
# :math:`D`. Multiplying onto the identity matrix materializes the block; all
# columns run through one batched product.

W1 = indices["0.weight"]
H_W1 = SubmatrixLinearOperator(H, W1, W1)
H_W1_mat = H_W1 @ eye(len(W1), dtype=float64)
print(f"first-layer weight block: {H_W1.shape}")
assert H_W1_mat.allclose(H_dense[W1, :][:, W1])

# %%
# The diagonal block of one parameter is also the Hessian of the loss w.r.t. that
# parameter alone, with all others fixed. We can check this with a Hessian
# operator that only sees the first-layer weight:

H_only_W1 = HessianLinearOperator(model, loss_func, [model[0].weight], data)
assert (H_only_W1 @ eye(len(W1), dtype=float64)).allclose(H_W1_mat)

# %%
# A layer's block and a coupling block
# ------------------------------------
#
# A layer's block contains its weight and bias. The block between the weights of
# the first and the last layer describes how the two interact: block-diagonal
# approximations of the Hessian (e.g. ``HessianLinearOperator(...,
# block_sizes=...)``) drop it. :meth:`~curvlinops.SubmatrixLinearOperator.set_submatrix`
# selects another block of the same operator.

layer2 = indices["2.weight"] + indices["2.bias"]
H_sub = SubmatrixLinearOperator(H, layer2, layer2)
H_layer2 = H_sub @ eye(len(layer2), dtype=float64)
assert H_layer2.allclose(H_dense[layer2, :][:, layer2])

W3 = indices["4.weight"]
H_sub.set_submatrix(W1, W3)
H_W1_W3 = H_sub @ eye(len(W3), dtype=float64)
print(f"coupling block of the first and last weight: {H_sub.shape}")
assert H_W1_W3.allclose(H_dense[W1, :][:, W3])

# %%
# Off-diagonal blocks are not symmetric, and not even square. The adjoint of a
# sub-matrix is the transposed block, i.e. the sub-matrix with rows and columns
# swapped:

assert (H_sub.adjoint() @ eye(len(W1), dtype=float64)).allclose(H_W1_W3.T)

# %%
# Arbitrary entries
# -----------------
#
# The indices need not be contiguous or sorted. For instance, the rows that
# belong to the output layer's weights of class 0 (the first row of its weight
# matrix) and the columns of the first-layer biases, in reverse order:

rows = indices["4.weight"][:4]
cols = indices["0.bias"][::-1]
H_entries = SubmatrixLinearOperator(H, rows, cols) @ eye(len(cols), dtype=float64)
assert H_entries.allclose(H_dense[rows, :][:, cols])
print(H_entries)

# %%
# A picture
# ---------
#
# First, the magnitude of the Hessian's entries on a logarithmic scale, with the
# blocks we extracted framed. The entries that involve the last layer are the
# largest, those of the first layer much smaller.

fig, ax = plt.subplots(figsize=(5.5, 4.5))
magnitude = H_dense.abs().clamp(min=1e-12).log10()
image = ax.imshow(magnitude.numpy(), cmap="Greys", vmin=magnitude.max() - 4)
fig.colorbar(image, ax=ax, label=r"$\log_{10} |H_{ij}|$")
ax.set_title(
    "Hessian: first-layer weight (blue), second layer (green),\n"
    "first vs. last weight (orange)",
    fontsize=10,
)
frames = [(W1, W1, "C0"), (layer2, layer2, "C2"), (W1, W3, "C1")]
for rows, cols, color in frames:
    corner = (cols[0] - 0.5, rows[0] - 0.5)
    ax.add_patch(Rectangle(corner, len(cols), len(rows), fill=False, ec=color, lw=2))
fig.tight_layout()

# %%
# Then the blocks themselves, each on its own linear color scale, symmetric
# around zero (red: positive, blue: negative):


def show(ax, matrix, title):
    """Plot a matrix with a linear color scale that is symmetric around zero."""
    vmax = matrix.abs().max().item()
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)


fig, axes = plt.subplots(2, 2, figsize=(8, 7))
show(axes[0, 0], H_W1_mat, "first-layer weight")
show(axes[0, 1], H_W1_W3, "first vs. last weight")
show(axes[1, 0], H_layer2, "second layer")
show(axes[1, 1], H_entries, "selected entries")
fig.tight_layout()
