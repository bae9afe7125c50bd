r"""Basic usage: curvature-matrix products and top eigenvalues
===========================================================

This tutorial shows how to multiply with the Hessian and the generalized
Gauss-Newton matrix (GGN) of a neural network without building them, how the
operators accept different input formats, and how to find their top eigenvalues
with SciPy.

We start with the imports.
"""

import matplotlib.pyplot as plt
import numpy
from scipy.sparse.linalg import eigsh
from torch import float64, manual_seed, rand, randint
from torch.linalg import eigvalsh
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.examples.functorch import functorch_ggn, functorch_hessian

# %%
# Setup
# -----
#
# A small classifier on synthetic data. The data is a list of mini-batches
# ``(X, y)``; a :class:`torch.utils.data.DataLoader` works the same way, as long
# as it presents the batches in the same order every time (no shuffling).
# We work in double precision so that we can compare against dense matrices
# to many digits.

manual_seed(0)
num_data, batch_size = 128, 32
X, y = rand(num_data, 10, dtype=float64), randint(0, 3, (num_data,))
data = list(zip(X.split(batch_size), y.split(batch_size)))

model = Sequential(Linear(10, 8), Tanh(), Linear(8, 3)).to(float64)
loss_func = CrossEntropyLoss()
params = [p for p in model.parameters() if p.requires_grad]
num_params = sum(p.numel() for p in params)
print(f"{num_params} parameters, {len(data)} batches")

# %%
# Products
# --------
#
# An operator has the shape of the matrix it represents. Multiplying onto a
# vector is one pass over the data (one forward and backward pass per batch):

H = HessianLinearOperator(model, loss_func, params, data)
G = GGNLinearOperator(model, loss_func, params, data)
print(H.shape, G.shape)

v = rand(num_params, dtype=float64)
Hv, Gv = H @ v, G @ v

# %%
# On a small problem we can check the result against dense matrices computed
# with :mod:`torch.func`:

H_dense = functorch_hessian(model, loss_func, params, data)
G_dense = functorch_ggn(model, loss_func, params, data)
assert Hv.allclose(H_dense @ v)
assert Gv.allclose(G_dense @ v)

# %%
# Formats
# -------
#
# Besides flat vectors, the operators accept matrices (all columns are processed
# in one batched pass), lists of tensors shaped like the parameters, and NumPy
# arrays (the result is then a NumPy array, too).

V = rand(num_params, 5, dtype=float64)
print("matrix:", (G @ V).shape)

v_list = [rand(p.shape, dtype=float64) for p in params]
Gv_list = G @ v_list
print("tensor list:", [tuple(t.shape) for t in Gv_list])

print("NumPy:", type(G @ V.numpy()).__name__)

# %%
# Operators combine lazily: ``H + 0.1 * G`` is again an operator, and nothing is
# computed until it multiplies a vector.

damped = H + 0.1 * G
assert (damped @ v).allclose(H_dense @ v + 0.1 * G_dense @ v)

# %%
# Top eigenvalues with SciPy
# --------------------------
#
# :meth:`~curvlinops.PyTorchLinearOperator.to_scipy` wraps an operator as a
# :class:`scipy.sparse.linalg.LinearOperator`, so SciPy's Lanczos method
# :func:`scipy.sparse.linalg.eigsh` finds the leading eigenvalues from
# matrix-vector products alone.

k = 4
top_H = eigsh(H.to_scipy(), k=k, which="LA", return_eigenvectors=False)
top_G = eigsh(G.to_scipy(), k=k, which="LA", return_eigenvectors=False)
print("Hessian:", numpy.sort(top_H))
print("GGN:    ", numpy.sort(top_G))
assert numpy.allclose(numpy.sort(top_H), eigvalsh(H_dense)[-k:].numpy())
assert numpy.allclose(numpy.sort(top_G), eigvalsh(G_dense)[-k:].numpy())

# %%
# The GGN is positive semi-definite for the cross-entropy loss, while the
# Hessian may have negative eigenvalues:

print(f"smallest Hessian eigenvalue: {eigvalsh(H_dense)[0]:.3e}")
print(f"smallest GGN eigenvalue:     {eigvalsh(G_dense)[0]:.3e}")

# %%
# Here are both spectra in full, from the dense matrices, with the top
# eigenvalues that :func:`~scipy.sparse.linalg.eigsh` found from products alone
# (the axis is linear near zero and logarithmic beyond):

fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
for ax, dense, top, name in [
    (axes[0], H_dense, top_H, "Hessian"),
    (axes[1], G_dense, top_G, "GGN"),
]:
    ax.plot(eigvalsh(dense).numpy(), ".", label="all (dense eigvalsh)")
    top_index = range(num_params - k, num_params)
    ax.plot(top_index, numpy.sort(top), "o", mfc="none", label=f"top {k} (eigsh)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(name)
    ax.set_xlabel("eigenvalue index (ascending)")
axes[0].set_ylabel("eigenvalue")
axes[0].legend()
fig.tight_layout()
