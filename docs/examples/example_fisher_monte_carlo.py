r"""Monte-Carlo Fisher: convergence, seeds, and the empirical Fisher
=================================================================

The Fisher information matrix of a network with a likelihood-based loss is an
expectation over labels drawn from the model's own predictive distribution.
:class:`~curvlinops.FisherMCLinearOperator` estimates this expectation with
``mc_samples`` sampled labels per datum. This tutorial shows how the estimate
converges to the exact Fisher, which for the cross-entropy and square losses is
the generalized Gauss-Newton matrix (GGN), how to combine operators with
different random seeds, and why the *empirical* Fisher, which uses the true
labels instead, is a different matrix altogether.

We start with the imports.
"""

import os

import matplotlib.pyplot as plt
import numpy
from torch import eye, float64, manual_seed, randint, randn, stack
from torch.linalg import eigvalsh, matrix_norm, matrix_rank
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator
from curvlinops.examples.functorch import functorch_ggn

# The test suite runs the tutorials with smaller problems.
FAST = os.environ.get("CURVLINOPS_FAST_TUTORIALS") == "1"

# %%
# Setup
# -----
#
# A small classifier on synthetic data, in double precision. The model is not
# trained: the Fisher is defined at any parameters.

manual_seed(0)
num_data, num_classes = 32, 4
X = randn(num_data, 6, dtype=float64)
y = randint(0, num_classes, (num_data,))
data = list(zip(X.split(16), y.split(16)))

model = Sequential(Linear(6, 10), Tanh(), Linear(10, num_classes)).to(float64)
loss_func = CrossEntropyLoss()
params = list(model.parameters())
num_params = sum(p.numel() for p in params)
identity = eye(num_params, dtype=float64)
print(f"{num_params} parameters, {num_data} data points, {num_classes} classes")

# %%
# The exact Fisher
# ----------------
#
# With the predictive distribution :math:`q(\mathbf{y} \mid \mathbf{f})` of the
# loss :math:`\ell(\mathbf{f}, \mathbf{y}) = -\log q(\mathbf{y} \mid
# \mathbf{f})` (a categorical distribution with logits :math:`\mathbf{f}` for the
# cross-entropy), the Fisher of the empirical risk
# :math:`\frac{1}{N}\sum_n \ell(f_\mathbf{\theta}(\mathbf{x}_n), \mathbf{y}_n)`
# is
#
# .. math::
#     \mathbf{F} = \frac{1}{N} \sum_{n=1}^N
#     \mathbb{E}_{\tilde{\mathbf{y}} \sim q(\cdot \mid \mathbf{f}_n)}\left[
#     \nabla_\mathbf{\theta} \ell(\mathbf{f}_n, \tilde{\mathbf{y}})
#     \nabla_\mathbf{\theta} \ell(\mathbf{f}_n, \tilde{\mathbf{y}})^\top
#     \right]
#     = \frac{1}{N} \sum_{n=1}^N \mathbf{J}_n^\top
#     \nabla^2_{\mathbf{f}_n} \ell(\mathbf{f}_n, \mathbf{y}_n) \mathbf{J}_n\,,
#
# because the expected outer product of the log-likelihood's gradient equals
# its expected negative Hessian, and the cross-entropy's Hessian w.r.t. the
# logits does not depend on the label. Hence the Fisher is the GGN, which we
# take as exact reference:

F_exact = GGNLinearOperator(model, loss_func, params, data) @ identity
assert F_exact.allclose(functorch_ggn(model, loss_func, params, data))


def relative_error(F):
    """Return the relative Frobenius-norm distance of a matrix to the Fisher."""
    return (matrix_norm(F - F_exact) / matrix_norm(F_exact)).item()


# %%
# One operator, one sample
# ------------------------
#
# A :class:`~curvlinops.FisherMCLinearOperator` draws its labels from a
# generator that is seeded with ``seed`` at the start of *every* product. So an
# operator is a fixed matrix, one draw of the random estimator, and repeated
# products agree. Different seeds give independent draws.


def mc_fisher(mc_samples, seed):
    """Return the dense MC Fisher with a number of samples and a seed."""
    F = FisherMCLinearOperator(
        model,
        loss_func,
        params,
        data,
        mc_samples=mc_samples,
        seed=seed,
        check_deterministic=False,  # skip the probe at construction, for speed
    )
    return F @ identity


F_a = mc_fisher(1, seed=0)
assert F_a.allclose(mc_fisher(1, seed=0))  # same seed, same matrix
assert not F_a.allclose(mc_fisher(1, seed=1))  # another seed, another matrix
print(f"one sample: relative error {relative_error(F_a):.3f}")

# %%
# Each sampled label contributes a rank-one term per datum, so with
# :math:`M` samples the estimate has rank at most :math:`NM`, while the exact
# Fisher has rank up to :math:`N(C - 1)` (the softmax ignores shifts of all
# logits):

print(f"rank with one sample: {matrix_rank(F_a)}, exact: {matrix_rank(F_exact)}")
assert matrix_rank(F_a) <= num_data < matrix_rank(F_exact)

# %%
# Convergence
# -----------
#
# The estimator is unbiased, and its error shrinks like :math:`1/\sqrt{M}`
# with the number of samples :math:`M`. We measure the relative error in the
# Frobenius norm for growing ``mc_samples``, averaged over a few seeds.
# A product's cost hardly depends on ``mc_samples``: the samples only enter the
# small :math:`C \times C` matrices in output space, not the passes through the
# network.

sample_sizes = [2**k for k in range(0, 9 if FAST else 13)]
seeds = range(3 if FAST else 10)
errors = numpy.array(
    [[relative_error(mc_fisher(M, seed)) for seed in seeds] for M in sample_sizes]
)
mean_errors = errors.mean(axis=1)
for M, error in zip(sample_sizes, mean_errors):
    print(f"mc_samples = {M:>4}: relative error {error:.4f}")

# %%
# On a log-log scale, the errors follow a line of slope :math:`-1/2`:

slope = numpy.polyfit(numpy.log(sample_sizes), numpy.log(mean_errors), 1)[0]
print(f"fitted slope: {slope:.3f}")
assert -0.6 < slope < -0.4

fig, ax = plt.subplots(figsize=(6, 4))
for j in range(errors.shape[1]):
    ax.loglog(sample_sizes, errors[:, j], ".", color="C0", alpha=0.3)
ax.loglog(sample_sizes, mean_errors, "o-", color="C0", label="mean over seeds")
reference = mean_errors[0] / numpy.sqrt(sample_sizes)
ax.loglog(sample_sizes, reference, "k--", label=r"$\propto 1/\sqrt{M}$")
ax.set_xlabel(r"Monte-Carlo samples per datum $M$")
ax.set_ylabel(r"$\|\hat{\mathbf{F}} - \mathbf{F}\|_F \,/\, \|\mathbf{F}\|_F$")
ax.set_title("MC Fisher: relative error")
ax.legend()
fig.tight_layout()

# %%
# Averaging operators with different seeds
# ----------------------------------------
#
# Another way to reduce the variance is to average operators with different
# seeds. Operators combine lazily, so the average is again an operator, whose
# product runs one product per term. It is an estimator of the same quality as
# one operator with the summed number of samples, but costs a pass over the
# data per operator, so a larger ``mc_samples`` is cheaper. Averaging is
# useful to add samples to an existing estimate, or to estimate the variance.

num_operators = 8
operators = [
    FisherMCLinearOperator(
        model, loss_func, params, data, seed=seed, check_deterministic=False
    )
    for seed in range(100, 100 + num_operators)
]
F_average = sum(operators[1:], operators[0]) / num_operators
F_average_dense = F_average @ identity
assert F_average_dense.allclose(stack([F @ identity for F in operators]).mean(0))

single_error = numpy.mean(
    [relative_error(F @ identity) for F in operators]
)  # one sample each
average_error = relative_error(F_average_dense)
print(f"error of one operator (mean over the {num_operators}): {single_error:.3f}")
print(f"error of their average: {average_error:.3f}")
same_samples = mean_errors[sample_sizes.index(num_operators)]
print(f"error of mc_samples={num_operators} (mean over seeds): {same_samples:.3f}")
assert average_error < 0.6 * single_error

# %%
# The empirical Fisher is not the Fisher
# --------------------------------------
#
# The empirical Fisher (EF) uses the outer products of the gradients with the
# *true* labels :math:`\mathbf{y}_n` instead of sampled ones:
#
# .. math::
#     \mathbf{E} = \frac{1}{N} \sum_{n=1}^N
#     \nabla_\mathbf{\theta} \ell(\mathbf{f}_n, \mathbf{y}_n)
#     \nabla_\mathbf{\theta} \ell(\mathbf{f}_n, \mathbf{y}_n)^\top\,.
#
# It is cheap and popular (e.g. in adaptive optimizers), but it is not an
# estimate of the Fisher, and more samples do not bring it closer
# (Kunstner et al., 2019). It depends on the labels, while the Fisher and the
# MC Fisher only depend on the model's predictions: with random new labels,
# the GGN and the MC Fisher (same seed) do not change, but the EF does.

E = EFLinearOperator(model, loss_func, params, data) @ identity
print(f"EF: relative distance to the Fisher {relative_error(E):.3f}")
assert relative_error(E) > 10 * mean_errors[-1]

new_labels = randint(0, num_classes, (num_data,))
new_data = list(zip(X.split(16), new_labels.split(16)))
G_new = GGNLinearOperator(model, loss_func, params, new_data) @ identity
F_new = FisherMCLinearOperator(model, loss_func, params, new_data, seed=0)
E_new = EFLinearOperator(model, loss_func, params, new_data) @ identity
assert G_new.allclose(F_exact)
assert (F_new @ identity).allclose(F_a)
assert not E_new.allclose(E)

# %%
# The difference shows in the spectra. The EF's rank is at most :math:`N`, and
# its eigenvalues follow the size of the per-datum gradients, i.e. how well the
# model fits the true labels. For the square loss, the contrast is extreme: the
# Fisher :math:`\frac{1}{N}\sum_n \mathbf{J}_n^\top \mathbf{J}_n` (up to the
# loss's scaling) does not depend on the residuals at all, while the EF vanishes
# at a model that fits the data perfectly.

spectra = {
    "Fisher (= GGN)": eigvalsh(F_exact),
    f"MC Fisher, $M = {sample_sizes[-1]}$": eigvalsh(mc_fisher(sample_sizes[-1], 0)),
    "MC Fisher, $M = 1$": eigvalsh(F_a),
    "empirical Fisher": eigvalsh(E),
}

fig, ax = plt.subplots(figsize=(6, 4))
for (label, evals), style in zip(spectra.items(), ["k-", "C0--", "C1:", "C3-."]):
    positive = evals.flip(0).clamp(min=1e-12).numpy()
    ax.semilogy(numpy.arange(1, num_params + 1), positive, style, label=label)
ax.set_ylim(1e-7, None)
ax.set_xlabel("index (descending)")
ax.set_ylabel("eigenvalue")
ax.set_title("Spectra")
ax.legend()
fig.tight_layout()

# %%
# References:
#
# - Kunstner, F., Balles, L., & Hennig, P. (2019). Limitations of the empirical
#   Fisher approximation for natural gradient descent. NeurIPS.
# - Martens, J. (2020). New insights and perspectives on the natural gradient
#   method. JMLR.
