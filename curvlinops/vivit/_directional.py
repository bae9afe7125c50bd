r"""Shared part of the computations along GGN eigenvectors: slopes and curvatures.

Conventions for a loss :math:`\mathcal{L} = \frac{1}{N} \sum_{n=1}^N \ell_n` with
``reduction='mean'`` (for ``MSELoss``, :math:`\ell_n` averages over the output
entries of sample :math:`n`; for ``CrossEntropyLoss`` with extra axes, over those
axes):

- :math:`\gamma_{nk} = \nabla \ell_n^\top \mathbf{e}_k` is the slope of the
  per-sample loss (not of :math:`\ell_n / N`), so the mean over all ``N`` samples is
  the slope of the mini-batch loss, :math:`\nabla \mathcal{L}^\top \mathbf{e}_k`.
- :math:`\lambda_{nk} = \mathbf{e}_k^\top \mathbf{G}_n \mathbf{e}_k` with the
  per-sample GGN :math:`\mathbf{G}_n = \mathbf{J}_n^\top \nabla^2_f \ell_n
  \mathbf{J}_n`, so the mean over the GGN samples is the eigenvalue
  :math:`\lambda_k` (exactly, without Monte-Carlo approximation).

With sub-sampling, the means run over the active samples.
"""

from __future__ import annotations

from backpack.extensions import BatchGrad
from torch import Tensor

from curvlinops.vivit._base import (
    ViViTComputation,
    check_non_negative,
    check_subsampling,
)
from curvlinops.vivit._gram import (
    directional_curvatures,
    directional_gradients,
    gram_eigh,
    warn_if_small,
)
from curvlinops.vivit._sqrt_ggn import SqrtGGN


class PerSampleGradients(BatchGrad):
    r"""BackPACK's per-sample gradients, stored under a separate attribute.

    With ``reduction='mean'``, ``param.<savefield>[n]`` is
    :math:`\frac{1}{N} \nabla \ell_n` for the active sample :math:`n`.

    Args:
        savefield: Name of the attribute that stores the gradients.
        subsampling: Indices of the active samples; ``None`` activates all.
    """

    def __init__(self, savefield: str, subsampling: list[int] | None = None):
        """Set up BackPACK's per-sample gradient extension and the attribute."""
        super().__init__(subsampling=subsampling)
        self.savefield = savefield


class DirectionalComputation(ViViTComputation):
    """Base class of the computations that need slopes and curvatures.

    Args:
        subsampling_grad: Indices of the samples whose gradients enter.
        subsampling_ggn: Indices of the samples that enter the GGN.
        mc_samples_ggn: ``0`` or number of Monte-Carlo samples for the GGN.
        verbose: Whether to print progress during backpropagation.
        warn_small_eigvals: Threshold for the small eigenvalue warning.
    """

    _GROUP_KEYS = ("criterion",)
    _NEEDS_GRADIENTS = True

    def __init__(
        self,
        subsampling_grad: list[int] | None,
        subsampling_ggn: list[int] | None,
        mc_samples_ggn: int | None,
        verbose: bool | None,
        warn_small_eigvals: float,
    ):
        """Store and verify the gradient and GGN approximations."""
        super().__init__(subsampling_ggn, mc_samples_ggn or 0, bool(verbose))
        check_subsampling(subsampling_grad, "subsampling_grad")
        check_non_negative(warn_small_eigvals, "warn_small_eigvals", float)
        self._subsampling_grad = subsampling_grad
        self._warn_small_eigvals = warn_small_eigvals

    def get_extensions(self) -> list[PerSampleGradients | SqrtGGN]:
        """Create the BackPACK extensions for per-sample gradients and GGN factor.

        Returns:
            Extensions to pass to :class:`backpack.backpack`, e.g. as
            ``backpack(*computation.get_extensions(), extension_hook=hook)``.
        """
        grads = PerSampleGradients(self._gradient_field, self._subsampling_grad)
        return [grads, self._sqrt_ggn_extension()]

    def _directional_derivatives(
        self, group: dict, factors: list, gradients: list[Tensor], batch_size: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Compute eigenvalues, Gram eigenvectors, slopes and curvatures of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: BackPACK's per-sample gradients (those of ``loss_n / N``).
            batch_size: Size of the mini-batch.

        Returns:
            Selected eigenvalues ``[K]``, Gram eigenvectors ``[V * N_ggn, K]``,
            slopes ``[N_grad, K]`` and curvatures ``[N_ggn, K]``.
        """
        grads = [batch_size * g for g in gradients]  # of the per-sample losses
        evals, gram_evecs = gram_eigh(factors, group["criterion"])
        warn_if_small(evals, self._warn_small_eigvals, "directional gradients")
        gammas = directional_gradients(factors, grads, evals, gram_evecs)
        num_columns = factors[0].num_columns
        lambdas = directional_curvatures(evals, gram_evecs, num_columns)
        return evals, gram_evecs, gammas, lambdas
