r"""ViViT: GGN eigenpairs and directionally damped Newton steps
===========================================================

The generalized Gauss-Newton matrix (GGN) of a mini-batch has low rank: with
:math:`N` samples and :math:`C` outputs, :math:`\mathbf{G} = \mathbf{V}
\mathbf{V}^\top` with a factor :math:`\mathbf{V}` of only :math:`NC` columns.
The non-zero eigenvalues of :math:`\mathbf{G}` are those of the small *Gram
matrix* :math:`\mathbf{V}^\top \mathbf{V}`, and its eigenvectors follow from
those of the Gram matrix. ViViT (Dangel et al., 2022) computes these
quantities during one backward pass with `BackPACK <https://backpack.pt>`_,
without ever forming a matrix in parameter space. This tutorial uses the
computations in :mod:`curvlinops.vivit` to

- compute the GGN's eigenvalues, of the whole network and per layer,
- compute leading eigenvectors, and the slopes and curvatures along them,
- take a Newton step with a separate damping along each eigenvector,
- and trade accuracy for speed with sub-sampling and Monte-Carlo approximation,

and checks every result against :class:`~curvlinops.GGNLinearOperator` and
dense matrices.

- Dangel, F., Tatzel, L., & Hennig, P. (2022). ViViT: Curvature access through
  the generalized Gauss-Newton's low-rank structure. Transactions on Machine
  Learning Research (TMLR).

We start with the imports.
"""

import os
import warnings
from copy import deepcopy

import matplotlib.pyplot as plt
import numpy
from backpack import backpack, extend
from scipy.sparse.linalg import eigsh
from torch import (
    cat,
    eye,
    float64,
    full_like,
    manual_seed,
    rand,
    randint,
    stack,
)
from torch.linalg import eigh, eigvalsh
from torch.nn import Conv2d, CrossEntropyLoss, Flatten, Linear, Sequential, Tanh

from curvlinops import GGNLinearOperator
from curvlinops.examples.functorch import functorch_ggn
from curvlinops.vivit import (
    DirectionalDampedNewtonComputation,
    DirectionalDerivativesComputation,
    EighComputation,
    EigvalshComputation,
)

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# BackPACK's module hooks make PyTorch warn if the input does not require
# gradients; the warning is harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

# %%
# Setup
# -----
#
# A small CNN classifies a mini-batch of random 6x6 images into four classes,
# in double precision. ViViT works on one mini-batch and requires a loss with
# ``reduction='mean'``.

manual_seed(0)
num_data, num_classes = (16, 4) if FAST else (32, 4)
X = rand(num_data, 1, 6, 6, dtype=float64)
y = randint(0, num_classes, (num_data,))

model = Sequential(
    Conv2d(1, 3, kernel_size=3),
    Tanh(),
    Flatten(),
    Linear(3 * 4 * 4, 8),
    Tanh(),
    Linear(8, num_classes),
).to(float64)
loss_func = CrossEntropyLoss()
params = list(model.parameters())
num_params = sum(p.numel() for p in params)
print(f"{num_params} parameters, Gram matrix {num_data * num_classes}^2")

# %%
# As references, the GGN operator, its dense matrix and eigen-decomposition
# (ascending eigenvalues), and the gradient:

data = [(X, y)]
G = GGNLinearOperator(model, loss_func, params, data)
G_dense = G @ eye(num_params, dtype=float64)
assert G_dense.allclose(functorch_ggn(model, loss_func, params, data))
G_evals, G_evecs = eigh(G_dense)
gradient, _ = G.gradient_and_loss()
g = cat([t.flatten() for t in gradient])

# %%
# BackPACK needs to *extend* the model and the loss function: it registers hooks
# that compute the GGN's factor during the backward pass. We extend a copy,
# which has its own parameters, and leave the original to the operator above.

vivit_model = extend(deepcopy(model))
vivit_loss_func = extend(deepcopy(loss_func))
vivit_params = list(vivit_model.parameters())

# %%
# GGN eigenvalues
# ---------------
#
# Every computation provides the BackPACK extension(s) and a hook that processes
# *parameter groups* (dictionaries with a ``'params'`` entry, as in
# ``torch.optim``). Each group defines a diagonal block of the GGN; one group
# with all parameters gives the whole GGN. After the backward pass inside the
# ``backpack`` context, the result of each group is available.

computation = EigvalshComputation()
full = {"params": vivit_params}
hook = computation.get_extension_hook([full])
with backpack(computation.get_extension(), extension_hook=hook):
    vivit_loss_func(vivit_model(X), y).backward()
vivit_evals = computation.get_result(full)

# %%
# These are the :math:`NC` eigenvalues of the Gram matrix, in ascending order,
# and hence the :math:`NC` largest eigenvalues of the GGN (all others are zero).
# SciPy's Lanczos method on the GGN operator finds the leading ones, too, with a
# few dozen GGN-vector products:

num_gram = num_data * num_classes
print("ViViT, top 4:", vivit_evals[-4:].numpy())
print("dense, top 4:", G_evals[-4:].numpy())
assert vivit_evals.allclose(G_evals[-num_gram:], atol=1e-10)
assert G_evals[:-num_gram].abs().max() < 1e-10

top = eigsh(G.to_scipy(), k=4, which="LA", return_eigenvectors=False)
assert numpy.allclose(numpy.sort(top), vivit_evals[-4:].numpy())

# %%
# Per-layer blocks
# ~~~~~~~~~~~~~~~~
#
# With one group per layer, we get the eigenvalues of the GGN's diagonal blocks,
# a block-diagonal approximation that is popular for optimizers. All groups are
# processed during the same backward pass.

layers = [layer for layer in vivit_model if list(layer.parameters())]
groups = [{"params": list(layer.parameters())} for layer in layers]
computation = EigvalshComputation()
hook = computation.get_extension_hook(groups)
with backpack(computation.get_extension(), extension_hook=hook):
    vivit_loss_func(vivit_model(X), y).backward()

start = 0
for layer, group in zip(layers, groups):
    size = sum(p.numel() for p in group["params"])
    block = G_dense[start : start + size, start : start + size]
    start += size
    evals = computation.get_result(group)
    num = min(size, num_gram)  # a block has at most min(D_block, NC) non-zeros
    assert evals[-num:].allclose(eigvalsh(block)[-num:], atol=1e-10)
    print(f"{type(layer).__name__:>6} ({size:>3} parameters): top {evals[-1]:.4f}")

# %%
# Eigenvectors
# ------------
#
# :class:`~curvlinops.vivit.EighComputation` also computes eigenvectors, but only
# those that the group's ``'criterion'`` selects: it receives the Gram matrix's
# eigenvalues (ascending) and returns the indices to keep. Each eigenvector
# comes in the format of the parameters, with a leading axis over the selected
# eigenvectors. We keep the top three and check that they are eigenvectors of
# the GGN operator:


def top(k):
    """Return a criterion that selects the ``k`` largest eigenvalues."""
    return lambda evals: list(range(len(evals) - k, len(evals)))


k = 3
computation = EighComputation()
full = {"params": vivit_params, "criterion": top(k)}
hook = computation.get_extension_hook([full])
with backpack(computation.get_extension(), extension_hook=hook):
    vivit_loss_func(vivit_model(X), y).backward()
evals, evecs = computation.get_result(full)
print("shapes:", [tuple(e.shape) for e in evecs])

E = cat([e.flatten(start_dim=1) for e in evecs], dim=1).T  # [D, k]
assert (G @ E).allclose(E * evals)
assert (E.T @ E).allclose(eye(k, dtype=float64))

# %%
# Slopes and curvatures along eigenvectors
# ----------------------------------------
#
# :class:`~curvlinops.vivit.DirectionalDerivativesComputation` computes, for
# each selected eigenvector :math:`\mathbf{e}_k` and each sample :math:`n`, the
# slope :math:`\gamma_{nk} = \nabla \ell_n^\top \mathbf{e}_k` and the
# curvature :math:`\lambda_{nk} = \mathbf{e}_k^\top \mathbf{G}_n
# \mathbf{e}_k` of the sample's loss :math:`\ell_n`, again from the Gram
# matrix and without forming the eigenvectors. It needs per-sample gradients,
# so it comes with two extensions. The means over the samples are the slope of
# the mini-batch loss and the eigenvalue:

computation = DirectionalDerivativesComputation()
full = {"params": vivit_params, "criterion": top(k)}
hook = computation.get_extension_hook([full])
with backpack(*computation.get_extensions(), extension_hook=hook):
    vivit_loss_func(vivit_model(X), y).backward()
gammas, lambdas = computation.get_result(full)
print(f"gammas: {tuple(gammas.shape)}, lambdas: {tuple(lambdas.shape)}")

top_evals, top_evecs = G_evals[-k:], G_evecs[:, -k:]
assert lambdas.mean(0).allclose(top_evals)
# eigenvectors have a sign ambiguity; compare the magnitude of the slopes
assert gammas.mean(0).abs().allclose((g @ top_evecs).abs())

# %%
# The spread of the per-sample values tells how noisy the mini-batch's estimate
# of slope and curvature is, e.g. through their standard errors:

for name, values in [("slope", gammas), ("curvature", lambdas)]:
    mean, error = values.mean(0), values.std(0) / num_data**0.5
    print(
        f"{name:>9}s: " + ", ".join(f"{m:+.3f} ± {e:.3f}" for m, e in zip(mean, error))
    )

# %%
# Directionally damped Newton steps
# ---------------------------------
#
# In the space of the selected eigenvectors, the Newton step of the quadratic
# model :math:`\mathcal{L}(\mathbf{\theta} + \mathbf{s}) \approx \mathcal{L} +
# \mathbf{g}^\top \mathbf{s} + \frac{1}{2} \mathbf{s}^\top \mathbf{G}
# \mathbf{s}` is :math:`-\sum_k \gamma_k / \lambda_k\, \mathbf{e}_k`.
# :class:`~curvlinops.vivit.DirectionalDampedNewtonComputation` adds a damping
# :math:`\delta_k` per direction,
#
# .. math::
#     \mathbf{s} = -\sum_{k} \frac{\gamma_k}{\lambda_k + \delta_k}
#     \mathbf{e}_k\,,
#
# chosen by the group's ``'damping'``, a function of the eigenvalues, the Gram
# eigenvectors and the per-sample slopes and curvatures. A constant damping
# gives the familiar damped Newton step restricted to the eigenspace. Using
# the per-sample values, we can instead damp each direction by how uncertain
# its curvature estimate is, here by twice the curvature's standard error, so
# that noisy directions get shorter steps:


def constant_damping(evals, gram_evecs, gammas, lambdas):
    """Damp every direction by the same amount."""
    return full_like(evals, 1e-2)


def uncertainty_damping(evals, gram_evecs, gammas, lambdas):
    """Damp every direction by twice the standard error of its curvature."""
    return 2 * lambdas.std(0) / lambdas.shape[0] ** 0.5


k = 5
steps = {}
for damping in [constant_damping, uncertainty_damping]:
    computation = DirectionalDampedNewtonComputation()
    full = {
        "params": vivit_params,
        "criterion": top(k),
        "damping": damping,
    }
    hook = computation.get_extension_hook([full])
    with backpack(*computation.get_extensions(), extension_hook=hook):
        vivit_loss_func(vivit_model(X), y).backward()
    steps[damping.__name__] = cat([s.flatten() for s in computation.get_result(full)])

# %%
# We check both steps with the dense eigen-decomposition (the sign ambiguity
# of eigenvectors cancels in :math:`\gamma_k \mathbf{e}_k`). The uncertainty
# damping needs the per-sample curvatures :math:`\mathbf{e}_k^\top
# \mathbf{G}_n \mathbf{e}_k`, which we get from the GGN operators of single
# samples.

top_evals, top_evecs = G_evals[-k:], G_evecs[:, -k:]
slopes = g @ top_evecs
per_sample_curvatures = stack(
    [
        (
            top_evecs
            * (GGNLinearOperator(model, loss_func, params, [(x, t)]) @ top_evecs)
        ).sum(0)
        for x, t in zip(X.split(1), y.split(1))
    ]
)
for name, dampings in [
    ("constant_damping", full_like(top_evals, 1e-2)),
    ("uncertainty_damping", 2 * per_sample_curvatures.std(0) / num_data**0.5),
]:
    expected = -top_evecs @ (slopes / (top_evals + dampings))
    assert steps[name].allclose(expected)
    print(f"{name}: step length {steps[name].norm():.3f}")

# %%
# Sub-sampling and Monte-Carlo approximation
# ------------------------------------------
#
# The Gram matrix has :math:`NC` rows, which grows with the batch size and the
# number of classes. Two approximations shrink it:
#
# - ``subsampling``: only the listed samples enter the GGN, which becomes the
#   mean of their GGNs (Gram matrix :math:`|\mathcal{S}|C \times
#   |\mathcal{S}|C`);
# - ``mc_samples``: the loss Hessian's square root is replaced by a
#   Monte-Carlo estimate with :math:`M` sampled labels (Gram matrix
#   :math:`NM \times NM`, independent of :math:`C`); BackPACK draws them from
#   PyTorch's global random number generator.
#
# The directional computations take ``subsampling_grad``, ``subsampling_ggn``
# and ``mc_samples_ggn`` instead. Sub-sampling gives the exact eigenvalues of
# the sub-sampled GGN:

subset = list(range(num_data // 4))


def vivit_eigenvalues(computation):
    """Return the GGN eigenvalues of a computation after one backward pass."""
    full = {"params": vivit_params}
    hook = computation.get_extension_hook([full])
    with backpack(computation.get_extension(), extension_hook=hook):
        vivit_loss_func(vivit_model(X), y).backward()
    return computation.get_result(full)


approx_evals = {
    f"sub-sampled ({len(subset)} samples)": vivit_eigenvalues(
        EigvalshComputation(subsampling=subset)
    ),
    "MC, 1 sample": vivit_eigenvalues(EigvalshComputation(mc_samples=1)),
}
for name, evals in approx_evals.items():
    print(f"{name}: {len(evals)} eigenvalues")

G_subset = functorch_ggn(model, loss_func, params, [(X[subset], y[subset])])
sub_evals = approx_evals[f"sub-sampled ({len(subset)} samples)"]
assert sub_evals.allclose(eigvalsh(G_subset)[-len(sub_evals) :], atol=1e-10)

# %%
# Both approximations are unbiased estimators of the GGN, but not of its
# eigenvalues. We compare the leading eigenvalues with the exact ones, for the
# Monte-Carlo approximation averaged over a few draws and for an increasing
# number of samples. (Monte-Carlo pays off for many classes, :math:`M \ll C`;
# here :math:`C = 4`, so it is only for illustration.)

k = 4


def top_error(evals):
    """Return the relative error of the top ``k`` eigenvalues."""
    return ((evals[-k:] - G_evals[-k:]).norm() / G_evals[-k:].norm()).item()


print(f"relative errors of the top {k} eigenvalues:")
print(f"sub-sampled:    {top_error(sub_evals):.3f}")
mc_errors = {}
for M in [1, 4, 16]:
    draws = [vivit_eigenvalues(EigvalshComputation(mc_samples=M)) for _ in range(5)]
    mc_errors[M] = numpy.mean([top_error(evals) for evals in draws])
    print(f"MC, {M:>2} samples: {mc_errors[M]:.3f} (mean over {len(draws)} draws)")
assert mc_errors[16] < mc_errors[1]

# %%
# The spectra of one draw of each approximation:

fig, ax = plt.subplots(figsize=(6, 4))
index = numpy.arange(1, num_gram + 1)
ax.semilogy(index, G_evals.flip(0)[:num_gram].numpy(), "k-", label="exact")
ax.semilogy(index, vivit_evals.flip(0).numpy(), "ko", mfc="none", label="ViViT")
for (name, evals), marker in zip(approx_evals.items(), ["s", "^"]):
    evals = evals.flip(0).clamp(min=1e-12)
    ax.semilogy(index[: len(evals)], evals.numpy(), marker, ms=4, label=name)
ax.set_ylim(1e-6, None)
ax.set_xlabel("index (descending)")
ax.set_ylabel("eigenvalue")
ax.set_title("GGN eigenvalues")
ax.legend()
fig.tight_layout()
