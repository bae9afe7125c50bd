"""GGN eigenpairs through the Gram matrix, computed during backpropagation."""

from __future__ import annotations

from torch import Tensor

from curvlinops.vivit._base import ViViTComputation, check_non_negative
from curvlinops.vivit._gram import gram_eigh, gram_to_ggn_eigenvectors, warn_if_small
from curvlinops.vivit._sqrt_ggn import SqrtGGN


class EighComputation(ViViTComputation):
    r"""BackPACK extension and hook to compute GGN eigenvalues and eigenvectors.

    With :math:`\mathbf{G} = \mathbf{V} \mathbf{V}^\top` (see
    :class:`~curvlinops.vivit.EigvalshComputation`), every eigenpair
    :math:`(\lambda_k, \tilde{\mathbf{e}}_k)` of the Gram matrix
    :math:`\mathbf{V}^\top \mathbf{V}` with :math:`\lambda_k \neq 0` gives a
    normalized GGN eigenvector

    .. math::
        \mathbf{e}_k = \frac{1}{\sqrt{\lambda_k}} \mathbf{V} \tilde{\mathbf{e}}_k\,,
        \qquad \mathbf{G} \mathbf{e}_k = \lambda_k \mathbf{e}_k\,,

    so only the selected eigenvectors are formed in parameter space (Dangel et al.,
    2022, ViViT: Curvature access through the generalized Gauss-Newton's low-rank
    structure, TMLR). Sub-sampling, Monte-Carlo approximation, the required
    ``backpack.extend`` and ``reduction='mean'``, and the supported layers are as
    for :class:`~curvlinops.vivit.EigvalshComputation`.

    Args:
        subsampling: Indices of the samples that enter the GGN. ``None`` (default)
            uses the whole mini-batch.
        mc_samples: ``0`` (default) for the exact GGN, otherwise the number of
            Monte-Carlo samples of the loss Hessian's square root.
        verbose: Print which parameter groups are computed during the backward
            pass. Default: ``False``.
        warn_small_eigvals: Warn (``UserWarning``) when an eigenvector is requested
            for an eigenvalue of absolute value below this threshold, since
            dividing by its square root amplifies round-off. ``0`` disables the
            warning. Default: ``1e-4``.

    Example:
        >>> from backpack import backpack, extend
        >>> from torch import cat, manual_seed, rand, randn
        >>> from torch.nn import Linear, MSELoss, Sequential, Sigmoid
        >>> from curvlinops.examples.functorch import functorch_ggn
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), Sigmoid(), Linear(3, 2))
        >>> loss_func = MSELoss()
        >>> X, y = rand(6, 4), randn(6, 2)
        >>> params = list(model.parameters())
        >>> # dense reference (before extension: torch.func ignores BackPACK's hooks)
        >>> G = functorch_ggn(model, loss_func, params, [(X, y)])
        >>> model, loss_func = extend(model), extend(loss_func)
        >>> computation = EighComputation()
        >>> top_two = {  # full GGN, keep the two largest eigenvalues
        ...     "params": params,
        ...     "criterion": lambda evals: [evals.numel() - 2, evals.numel() - 1],
        ... }
        >>> hook = computation.get_extension_hook([top_two])
        >>> with backpack(computation.get_extension(), extension_hook=hook):
        ...     loss_func(model(X), y).backward()
        >>> evals, evecs = computation.get_result(top_two)
        >>> [tuple(e.shape) for e in evecs]  # leading axis: eigenvectors
        [(2, 3, 4), (2, 3), (2, 2, 3), (2, 2)]
        >>> E = cat([e.flatten(start_dim=1) for e in evecs], dim=1).T  # [D, 2]
        >>> (G @ E).allclose(E * evals, atol=1e-6)
        True
    """

    _GROUP_KEYS = ("criterion",)
    _RESULTS = ("_evals", "_evecs")

    def __init__(
        self,
        subsampling: list[int] | None = None,
        mc_samples: int = 0,
        verbose: bool = False,
        warn_small_eigvals: float = 1e-4,
    ):
        """Store the GGN approximation and the warning threshold."""
        super().__init__(subsampling, mc_samples, verbose)
        check_non_negative(warn_small_eigvals, "warn_small_eigvals", float)
        self._warn_small_eigvals = warn_small_eigvals

    def get_extension(self) -> SqrtGGN:
        """Create the BackPACK extension that computes the GGN's factor.

        Returns:
            Extension to pass to :class:`backpack.backpack`.
        """
        return self._sqrt_ggn_extension()

    def get_extension_hook(self, param_groups: list[dict]):
        """Create the hook that computes the GGN eigenpairs of each block.

        Args:
            param_groups: Parameter groups in the format of ``torch.optim``. Each
                group's ``'params'`` form one diagonal block of the GGN (one group
                with all parameters: full GGN; one group per parameter:
                block-diagonal approximation). Its ``'criterion'``, a callable
                ``Tensor -> list[int]``, receives the Gram matrix eigenvalues in
                ascending order and returns the indices of those whose eigenvectors
                are computed, e.g. ``lambda evals: [evals.numel() - 1]`` for the
                leading one.

        Returns:
            Hook to pass as ``extension_hook`` to :class:`backpack.backpack`. It stores
            the results under ``self._evals`` and ``self._evecs`` during the
            backward pass.
        """
        return super().get_extension_hook(param_groups)

    def get_result(self, group: dict) -> tuple[Tensor, list[Tensor]]:
        """Return the selected eigenpairs of a GGN block after the backward pass.

        Args:
            group: A parameter group passed to :meth:`get_extension_hook`.

        Returns:
            The ``K`` selected eigenvalues ``[K]`` (in the criterion's order) and the
            eigenvectors in parameter format with a leading axis, tensors of shape
            ``[K, *p.shape]`` for ``p`` in ``group['params']``: the ``k``-th
            eigenvector is ``[e[k] for e in evecs]``.
        """
        return self._lookup(group)

    def _compute(
        self, group, factors, gradients, batch_size
    ) -> tuple[Tensor, list[Tensor]]:
        """Compute the selected eigenpairs of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: ``None``.
            batch_size: Size of the mini-batch.

        Returns:
            Eigenvalues and eigenvectors in parameter format.
        """
        evals, gram_evecs = gram_eigh(factors, group["criterion"])
        warn_if_small(evals, self._warn_small_eigvals, "GGN eigenvectors")
        return evals, gram_to_ggn_eigenvectors(factors, evals, gram_evecs)
