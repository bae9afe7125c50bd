"""Hessian of the empirical risk as a linear operator."""

from __future__ import annotations

from collections.abc import MutableMapping

from torch import Tensor

from curvlinops._autodiff import DifferentiationModes, hvp
from curvlinops._execution import lazy_attribute
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.utils import split_list


class HessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian of the empirical risk w.r.t. the parameters, as linear operator.

    For the empirical risk

    .. math::
        \mathcal{L}(\mathbf{\theta})
        = c \sum_{n=1}^N \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)

    with :math:`c = 1/N` (``reduction='mean'``) or :math:`c = 1` (``'sum'``), this
    operator represents

    .. math::
        \mathbf{H} = \nabla^2_{\mathbf{\theta}} \mathcal{L}
        = c \sum_{n=1}^N \nabla^2_{\mathbf{\theta}}
        \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)\,.

    With ``block_sizes=[b_1, b_2, ...]`` it represents the block-diagonal
    approximation whose blocks are the Hessians w.r.t. the first :math:`b_1`
    parameters, the next :math:`b_2`, and so on.

    A product costs one forward pass and two backward passes per mini-batch
    (reverse-over-reverse differentiation, which every PyTorch operation with a
    twice-differentiable backward supports); the columns of a matrix are processed in
    one batched backward pass. The operator is self-adjoint.

    Example:
        >>> from torch import eye, kron, manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(4, 2, bias=False)
        >>> X, y = rand(10, 4), rand(10, 2)
        >>> data = list(zip(X.split(3), y.split(3)))  # 4 batches
        >>> H = HessianLinearOperator(model, MSELoss(reduction="sum"),
        ...                           list(model.parameters()), data)
        >>> # for a linear model and square loss, H = 2 I ⊗ XᵀX
        >>> v = rand(H.shape[1])
        >>> (H @ v).allclose(2 * kron(eye(2), X.T @ X) @ v)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTS_BLOCKS: ``True``.
    """

    SELF_ADJOINT: bool = True
    SUPPORTS_BLOCKS: bool = True

    @lazy_attribute
    def _modes(self) -> DifferentiationModes:
        """Differentiation modes: reverse-over-reverse, fused or composite attention.

        Returns:
            Mode selector.
        """
        return DifferentiationModes(forward_mode_allowed=False)

    def _matmat_batch(
        self, X: Tensor | MutableMapping, y: Tensor, M: list[Tensor]
    ) -> list[Tensor]:
        """Multiply the mini-batch Hessian onto a matrix in tensor-list format.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            Mini-batch Hessian times ``M``, tensors of shape ``[*param.shape, K]``.
        """
        param_blocks = split_list(self._params, self._block_sizes)
        M_blocks = split_list([m.movedim(-1, 0) for m in M], self._block_sizes)

        def compute(forward_mode: bool) -> list[Tensor]:
            loss = self._loss_func(self._model_func(X), y)
            return hvp(loss, param_blocks, M_blocks, self._modes.columns)

        return [r.movedim(0, -1) for r in self._modes(compute)]
