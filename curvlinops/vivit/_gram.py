r"""GGN eigen-decomposition through the Gram matrix of its symmetric factor.

Let :math:`\mathbf{G} = \mathbf{V} \mathbf{V}^\top \in \mathbb{R}^{D \times D}` with
:math:`\mathbf{V} \in \mathbb{R}^{D \times VN}` (``V`` columns for each of the ``N``
active samples). The Gram matrix :math:`\tilde{\mathbf{G}} = \mathbf{V}^\top
\mathbf{V}` has the same non-zero eigenvalues. If :math:`\tilde{\mathbf{G}}
\tilde{\mathbf{e}}_k = \lambda_k \tilde{\mathbf{e}}_k` with
:math:`\|\tilde{\mathbf{e}}_k\| = 1`, then :math:`\mathbf{e}_k = \mathbf{V}
\tilde{\mathbf{e}}_k / \sqrt{\lambda_k}` is a normalized GGN eigenvector, and
:math:`\mathbf{V}^\top \mathbf{e}_k = \sqrt{\lambda_k} \tilde{\mathbf{e}}_k`. The
helpers below only touch :math:`\mathbf{V}` in parameter space where unavoidable.

The factor of a parameter block is a list of factors (see
:mod:`curvlinops.vivit._factors`), one per parameter; Gram indices run over
``(v, n)`` in row-major order, i.e. ``v * N + n``.
"""

from __future__ import annotations

from collections.abc import Callable
from warnings import warn

from torch import Tensor, tensor
from torch.linalg import eigh, eigvalsh

from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor

Factor = DenseFactor | LinearWeightFactor


def gram_matrix(factors: list[Factor]) -> Tensor:
    r"""Compute the Gram matrix :math:`\mathbf{V}^\top \mathbf{V}` of a block.

    Args:
        factors: The block's factor, one per parameter.

    Returns:
        The Gram matrix, of shape ``[V * N, V * N]``.
    """
    return sum(f.gram() for f in factors)


def gram_eigvalsh(factors: list[Factor]) -> Tensor:
    """Compute the Gram matrix eigenvalues of a block.

    Args:
        factors: The block's factor, one per parameter.

    Returns:
        Eigenvalues in ascending order, of shape ``[V * N]``.
    """
    return eigvalsh(gram_matrix(factors))


def gram_eigh(
    factors: list[Factor], criterion: Callable[[Tensor], list[int]]
) -> tuple[Tensor, Tensor]:
    """Eigen-decompose the Gram matrix of a block and keep the selected eigenpairs.

    Args:
        factors: The block's factor, one per parameter.
        criterion: Receives all eigenvalues in ascending order and returns the
            indices of those to keep.

    Returns:
        The ``K`` selected eigenvalues ``[K]`` and Gram eigenvectors ``[V * N, K]``.
    """
    evals, evecs = eigh(gram_matrix(factors))
    idx = tensor(list(criterion(evals)), dtype=int, device=evals.device)
    return evals[idx], evecs[:, idx]


def warn_if_small(evals: Tensor, threshold: float, task: str):
    """Warn if a computation divides by the square root of tiny eigenvalues.

    Args:
        evals: Eigenvalues that enter the computation.
        threshold: Eigenvalues with absolute value below this trigger the warning.
        task: What is computed, for the message.
    """
    small = evals[evals.abs() < threshold]
    if small.numel() > 0:
        warn(
            f"Computing {task} divides by the square root of {small.numel()} "
            f"eigenvalue(s) with absolute value below {threshold} "
            f"(e.g. {small[0].item():.3e}); the result may be inaccurate. Exclude "
            "them via the group's 'criterion', or set `warn_small_eigvals=0`.",
            UserWarning,
            stacklevel=2,
        )


def to_parameter_space(factors: list[Factor], coefficients: Tensor) -> list[Tensor]:
    r"""Multiply the factor onto Gram-space vectors: :math:`\mathbf{V} \mathbf{C}`.

    Args:
        factors: The block's factor, one per parameter.
        coefficients: Gram-space vectors, of shape ``[V * N, K]``.

    Returns:
        Parameter-space vectors with a leading axis, ``[K, *param.shape]``.
    """
    return [f.combine(coefficients) for f in factors]


def gram_to_ggn_eigenvectors(
    factors: list[Factor], evals: Tensor, gram_evecs: Tensor
) -> list[Tensor]:
    r"""Turn Gram eigenvectors into normalized GGN eigenvectors.

    Computes :math:`\mathbf{e}_k = \mathbf{V} \tilde{\mathbf{e}}_k /
    \sqrt{|\lambda_k|}`.

    Args:
        factors: The block's factor, one per parameter.
        evals: Eigenvalues, of shape ``[K]``.
        gram_evecs: Gram eigenvectors, of shape ``[V * N, K]``.

    Returns:
        GGN eigenvectors in parameter format, tensors ``[K, *param.shape]``.
    """
    return to_parameter_space(factors, gram_evecs / evals.abs().sqrt())


def directional_curvatures(
    evals: Tensor, gram_evecs: Tensor, num_columns: int
) -> Tensor:
    r"""Compute per-sample curvatures along GGN eigenvectors.

    The curvature of sample :math:`n` along :math:`\mathbf{e}_k` is
    :math:`\mathbf{e}_k^\top \mathbf{G}_n \mathbf{e}_k`. The GGN is the mean
    :math:`\frac{1}{N} \sum_n \mathbf{G}_n` over the ``N`` active samples, so
    :math:`\mathbf{G}_n = N \mathbf{V}_n \mathbf{V}_n^\top` with
    :math:`\mathbf{V}_n` the columns of sample :math:`n`. With :math:`\mathbf{V}^\top
    \mathbf{e}_k = \sqrt{\lambda_k} \tilde{\mathbf{e}}_k`, this gives
    :math:`N \lambda_k \sum_v [\tilde{\mathbf{e}}_k]_{v, n}^2`, whose mean over
    samples is :math:`\lambda_k`. No parameter-space quantity is needed.

    Args:
        evals: Eigenvalues, of shape ``[K]``.
        gram_evecs: Gram eigenvectors, of shape ``[V * N, K]``.
        num_columns: Number of columns per sample, ``V``.

    Returns:
        The curvatures, of shape ``[N, K]``.
    """
    per_sample = gram_evecs.reshape(num_columns, -1, gram_evecs.shape[1])
    num_samples = per_sample.shape[1]
    return num_samples * evals.abs() * per_sample.square().sum(0)


def directional_gradients(
    factors: list[Factor],
    sample_gradients: list[Tensor],
    evals: Tensor,
    gram_evecs: Tensor,
) -> Tensor:
    r"""Compute per-sample slopes along GGN eigenvectors.

    The slope of sample :math:`n` along :math:`\mathbf{e}_k` is
    :math:`\nabla \ell_n^\top \mathbf{e}_k = (\mathbf{V}^\top \nabla
    \ell_n)^\top \tilde{\mathbf{e}}_k / \sqrt{\lambda_k}`, computed without forming
    :math:`\mathbf{e}_k`.

    Args:
        factors: The block's factor, one per parameter.
        sample_gradients: Gradients :math:`\nabla \ell_n` of the per-sample losses,
            tensors of shape ``[N_grad, *param.shape]``.
        evals: Eigenvalues, of shape ``[K]``.
        gram_evecs: Gram eigenvectors, of shape ``[V * N, K]``.

    Returns:
        The slopes, of shape ``[N_grad, K]``.
    """
    projected = sum(f.project(g) for f, g in zip(factors, sample_gradients))
    return projected @ gram_evecs / evals.abs().sqrt()
