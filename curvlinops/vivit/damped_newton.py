"""Newton steps with a separate damping along each GGN eigenvector."""

from __future__ import annotations

from torch import Tensor

from curvlinops.vivit._directional import DirectionalComputation
from curvlinops.vivit._gram import to_parameter_space


class DirectionalDampedNewtonComputation(DirectionalComputation):
    r"""BackPACK extensions and hook for directionally damped Newton steps.

    For the selected GGN eigenvectors :math:`\{\mathbf{e}_k\}_{k=1}^K` of a block,
    the step is

    .. math::
        \mathbf{s} = \sum_{k=1}^K \frac{-\gamma_k}{\lambda_k + \delta_k}
        \mathbf{e}_k\,,
        \qquad
        \gamma_k = \frac{1}{N_{\text{grad}}} \sum_n \gamma_{nk}\,,
        \qquad
        \lambda_k = \frac{1}{N_{\text{GGN}}} \sum_n \lambda_{nk}\,,

    with the per-sample slopes :math:`\gamma_{nk}` and curvatures
    :math:`\lambda_{nk}` of :class:`~curvlinops.vivit.DirectionalDerivativesComputation`
    (so :math:`\gamma_k = \nabla \mathcal{L}^\top \mathbf{e}_k` is the slope of the
    mean loss and, without Monte-Carlo approximation, :math:`\lambda_k` the
    eigenvalue) and a damping :math:`\delta_k \geq 0` per direction. Zero damping
    gives the Newton step in the selected eigenspace. The step is assembled from
    the Gram matrix; only the result lives in parameter space (Dangel et al., 2022,
    ViViT: Curvature access through the generalized Gauss-Newton's low-rank
    structure, TMLR). The model and the loss function must be extended with
    :func:`backpack.extend`, and the loss must use ``reduction='mean'``.

    Args:
        subsampling_grad: Indices of the samples whose gradients enter the slopes.
            ``None`` (default) uses the whole mini-batch.
        subsampling_ggn: Indices of the samples that enter the GGN (directions and
            curvatures). ``None`` (default) uses the whole mini-batch.
        mc_samples_ggn: ``0`` (default) for the exact GGN, otherwise the number of
            Monte-Carlo samples of the loss Hessian's square root.
        verbose: Print which parameter groups are computed during the backward
            pass. Default: ``False``.
        warn_small_eigvals: Warn (``UserWarning``) when a step uses an eigenvector
            whose eigenvalue has absolute value below this threshold, since its
            computation divides by the eigenvalue's square root. ``0`` disables the
            warning. Default: ``1e-4``.

    Example:
        >>> from backpack import backpack, extend
        >>> from torch import manual_seed, no_grad, ones_like, rand, randn
        >>> from torch.autograd import grad
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model, loss_func = extend(Linear(3, 2)), extend(MSELoss())
        >>> X, y = rand(10, 3), randn(10, 2)
        >>> computation = DirectionalDampedNewtonComputation()
        >>> group = {  # all directions, damping 0: the exact Newton step
        ...     "params": list(model.parameters()),
        ...     "criterion": lambda evals: list(range(12, 20)),  # top 8 of 20
        ...     "damping": lambda evals, evecs, gammas, lambdas: 0 * ones_like(evals),
        ... }
        >>> hook = computation.get_extension_hook([group])
        >>> with backpack(*computation.get_extensions(), extension_hook=hook):
        ...     loss_func(model(X), y).backward()
        >>> step = computation.get_result(group)
        >>> # the model is linear and the loss quadratic: one step lands at the minimum
        >>> with no_grad():
        ...     for p, s in zip(model.parameters(), step):
        ...         _ = p.add_(s)
        >>> gradient = grad(loss_func(model(X), y), list(model.parameters()))
        >>> max(g.abs().max() for g in gradient) < 1e-5
        tensor(True)
    """

    _GROUP_KEYS = ("criterion", "damping")
    _RESULTS = ("_newton_step",)

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
        r"""Create the hook that computes the damped Newton step of each block.

        Args:
            param_groups: Parameter groups in the format of ``torch.optim``. Each
                group's ``'params'`` form one diagonal block of the GGN (one group
                with all parameters: full GGN; one group per parameter:
                block-diagonal approximation). Its ``'criterion'``, a callable
                ``Tensor -> list[int]``, receives the Gram matrix eigenvalues in
                ascending order and returns the indices of the eigenvectors to step
                along. Its ``'damping'``, a callable ``(evals [K], gram_evecs
                [V * N_ggn, K], gammas [N_grad, K], lambdas [N_ggn, K]) -> [K]``,
                returns the dampings :math:`\delta_k`, e.g.
                ``lambda evals, evecs, gammas, lambdas: ones_like(evals)``.

        Returns:
            Hook to pass as ``extension_hook`` to :class:`backpack.backpack`. It stores
            the step under ``self._newton_step`` during the backward pass.
        """
        return super().get_extension_hook(param_groups)

    def get_result(self, group: dict) -> list[Tensor]:
        """Return the damped Newton step of a block after the backward pass.

        Args:
            group: A parameter group passed to :meth:`get_extension_hook`.

        Returns:
            The step in the format of ``group['params']`` (one tensor per parameter,
            of the same shape).
        """
        return self._lookup(group)[0]

    def _compute(self, group, factors, gradients, batch_size) -> tuple[list[Tensor]]:
        """Compute the damped Newton step of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: BackPACK's per-sample gradients of each parameter.
            batch_size: Size of the mini-batch.

        Returns:
            The step in parameter format.

        Raises:
            ValueError: If the damping has not one entry per direction.
        """
        evals, gram_evecs, gammas, lambdas = self._directional_derivatives(
            group, factors, gradients, batch_size
        )
        damping = group["damping"](evals, gram_evecs, gammas, lambdas)
        if damping.shape != evals.shape:
            raise ValueError(
                f"'damping' must return one value per direction, shape "
                f"{tuple(evals.shape)}, got {tuple(damping.shape)}."
            )
        coefficients = -gammas.mean(0) / (lambdas.mean(0) + damping)
        gram_step = gram_evecs @ (coefficients / evals.abs().sqrt())
        step = to_parameter_space(factors, gram_step.unsqueeze(1))
        return ([s.squeeze(0) for s in step],)
