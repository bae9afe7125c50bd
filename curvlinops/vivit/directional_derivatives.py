"""Per-sample first- and second-order derivatives along GGN eigenvectors."""

from __future__ import annotations

from torch import Tensor

from curvlinops.vivit._directional import DirectionalComputation


class DirectionalDerivativesComputation(DirectionalComputation):
    r"""BackPACK extensions and hook for derivatives along GGN eigenvectors.

    For the selected GGN eigenvectors :math:`\mathbf{e}_k` of a block, computes the
    per-sample slopes :math:`\gamma_{nk}` and curvatures :math:`\lambda_{nk}`

    .. math::
        \gamma_{nk} = \nabla_{\mathbf{\theta}} \ell_n^\top \mathbf{e}_k\,,
        \qquad
        \lambda_{nk} = \mathbf{e}_k^\top \mathbf{G}_n \mathbf{e}_k\,,
        \qquad
        \mathbf{G}_n = \mathbf{J}_n^\top \nabla_f^2 \ell_n \mathbf{J}_n\,,

    where the mini-batch loss is the mean :math:`\mathcal{L} = \frac{1}{N}
    \sum_{n=1}^N \ell_n` of the per-sample losses. Hence ``gammas.mean(0)`` is the
    slope :math:`\nabla \mathcal{L}^\top \mathbf{e}_k` of the mini-batch loss (of the
    mean loss over ``subsampling_grad``), and ``lambdas.mean(0)`` the curvature
    :math:`\mathbf{e}_k^\top \mathbf{G} \mathbf{e}_k`, which equals the eigenvalue
    :math:`\lambda_k` without Monte-Carlo approximation. Both come from the Gram
    matrix without forming :math:`\mathbf{e}_k` (Dangel et al., 2022, ViViT:
    Curvature access through the generalized Gauss-Newton's low-rank structure,
    TMLR). The model and the loss function must be extended with
    :func:`backpack.extend`, and the loss must use ``reduction='mean'``.

    Args:
        subsampling_grad: Indices of the samples whose slopes are computed.
            ``None`` (default) uses the whole mini-batch.
        subsampling_ggn: Indices of the samples that enter the GGN (which defines
            the directions) and whose curvatures are computed. ``None`` (default)
            uses the whole mini-batch.
        mc_samples_ggn: ``0`` (default) for the exact GGN, otherwise the number of
            Monte-Carlo samples of the loss Hessian's square root (used for the
            directions and the curvatures).
        verbose: Print which parameter groups are computed during the backward
            pass. Default: ``False``.
        warn_small_eigvals: Warn (``UserWarning``) when slopes are requested along
            an eigenvector whose eigenvalue has absolute value below this threshold,
            since their computation divides by its square root. ``0`` disables the
            warning. Default: ``1e-4``.

    Example:
        >>> from backpack import backpack, extend
        >>> from torch import manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh
        >>> _ = manual_seed(0)
        >>> model = extend(Sequential(Linear(4, 3), Tanh(), Linear(3, 3)))
        >>> loss_func = extend(CrossEntropyLoss())
        >>> X, y = rand(6, 4), randint(0, 3, (6,))
        >>> computation = DirectionalDerivativesComputation(subsampling_grad=[0, 1])
        >>> group = {
        ...     "params": list(model.parameters()),
        ...     "criterion": lambda evals: [15, 16, 17],  # top 3 of N * C = 18
        ... }
        >>> hook = computation.get_extension_hook([group])
        >>> with backpack(*computation.get_extensions(), extension_hook=hook):
        ...     loss = loss_func(model(X), y)
        ...     loss.backward()
        >>> gammas, lambdas = computation.get_result(group)
        >>> gammas.shape, lambdas.shape  # [N_grad, K], [N_ggn, K]
        (torch.Size([2, 3]), torch.Size([6, 3]))
        >>> lambdas.min() >= 0  # convex loss: non-negative curvatures
        tensor(True)
    """

    _RESULTS = ("_gammas", "_lambdas")

    def __init__(
        self,
        subsampling_grad: list[int] | None = None,
        subsampling_ggn: list[int] | None = None,
        mc_samples_ggn: int | None = 0,
        verbose: bool | None = False,
        warn_small_eigvals: float = 1e-4,
    ):
        """Store the gradient and GGN approximations."""
        super().__init__(
            subsampling_grad,
            subsampling_ggn,
            mc_samples_ggn,
            verbose,
            warn_small_eigvals,
        )

    def get_extension_hook(self, param_groups: list[dict]):
        """Create the hook that computes the directional derivatives of each block.

        Args:
            param_groups: Parameter groups in the format of ``torch.optim``. Each
                group's ``'params'`` form one diagonal block of the GGN (one group
                with all parameters: full GGN; one group per parameter:
                block-diagonal approximation). Its ``'criterion'``, a callable
                ``Tensor -> list[int]``, receives the Gram matrix eigenvalues in
                ascending order and returns the indices of the eigenvectors to use
                as directions, e.g. ``lambda evals: [evals.numel() - 1]`` for the
                leading one.

        Returns:
            Hook to pass as ``extension_hook`` to :class:`backpack.backpack`. It stores
            the results under ``self._gammas`` and ``self._lambdas`` during the
            backward pass.
        """
        return super().get_extension_hook(param_groups)

    def get_result(self, group: dict) -> tuple[Tensor, Tensor]:
        """Return the slopes and curvatures along a block's GGN eigenvectors.

        Args:
            group: A parameter group passed to :meth:`get_extension_hook`.

        Returns:
            Slopes ``gammas`` of shape ``[N_grad, K]``, with ``gammas[n, k]`` the
            slope of the loss of sample ``n`` (``subsampling_grad[n]``) along
            direction ``k``, and curvatures ``lambdas`` of shape ``[N_ggn, K]``,
            with ``lambdas[n, k]`` that of sample ``n`` (``subsampling_ggn[n]``).
        """
        return self._lookup(group)

    def _compute(self, group, factors, gradients, batch_size) -> tuple[Tensor, Tensor]:
        """Compute the slopes and curvatures of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: BackPACK's per-sample gradients of each parameter.
            batch_size: Size of the mini-batch.

        Returns:
            Slopes and curvatures.
        """
        _, _, gammas, lambdas = self._directional_derivatives(
            group, factors, gradients, batch_size
        )
        return gammas, lambdas
