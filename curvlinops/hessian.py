"""Hessian of the empirical risk as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from torch import Tensor

from curvlinops._autodiff import DifferentiationModes, hvp, unpack_columns
from curvlinops._checks import check_block_sizes
from curvlinops._execution import autograd_enabled, lazy_attribute
from curvlinops._functional import bind_params
from curvlinops._losses import SUPPORTED_LOSSES, check_output_and_labels
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
    def _mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """The per-batch product, from :func:`make_batch_hessian_matrix_product`.

        Returns:
            ``mp(X, y, *M) -> tuple`` (see the builder).
        """
        return self._with_measurements(
            make_batch_hessian_matrix_product(
                self._model_func, self._loss_func, self._params, self._block_sizes
            )
        )

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
        return list(self._mp(X, y, *M))


def make_batch_hessian_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: tuple[Tensor, ...],
    block_sizes: list[int] | None = None,
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build the function that multiplies a mini-batch's Hessian onto a matrix.

    For a mini-batch :math:`(\mathbf{X}, \mathbf{y})` with loss
    :math:`\mathcal{L}_{\mathcal{B}} = \ell(f_{\mathbf{\theta}}(\mathbf{X}),
    \mathbf{y})` (with the loss's reduction), the function computes
    :math:`\nabla^2_{\mathbf{\theta}} \mathcal{L}_{\mathcal{B}} \mathbf{M}`, or
    its block-diagonal approximation for ``block_sizes``. It is the per-batch
    product of :class:`HessianLinearOperator`, which sums it over the data with the
    weights of the loss's reduction. All columns are processed in one batched
    backward pass; operations without second derivatives of the fused attention
    kernels fall back to the composite kernel.

    Args:
        model_func: Maps a mini-batch input to predictions (a module or a function).
        loss_func: Maps predictions and labels to a scalar.
        params: Parameters (requiring grad) that define the Hessian's rows and
            columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.
        block_sizes: Numbers of consecutive parameters that form the diagonal
            blocks. ``None`` (default): the full Hessian.

    Returns:
        ``mp(X, y, *M) -> tuple`` that takes the matrix as one tensor per parameter,
        of shape ``[*param.shape, K]`` (or as one tuple of them), and returns the
        product in the same format. Autograd is switched on inside.

    Example:
        >>> from torch import eye, kron, manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2, bias=False)
        >>> X, y = rand(5, 3), rand(5, 2)
        >>> mp = make_batch_hessian_matrix_product(
        ...     model, MSELoss(reduction="sum"), tuple(model.parameters()))
        >>> M = rand(2, 3, 4)  # four columns in the weight's shape
        >>> (HM,) = mp(X, y, M)
        >>> H = 2 * kron(eye(2), X.T @ X)  # linear model, square loss
        >>> HM.allclose((H @ M.reshape(6, 4)).reshape(2, 3, 4))
        True
    """
    model_func, params = bind_params(model_func, params)
    params = list(params)
    block_sizes = check_block_sizes(block_sizes, len(params))
    param_blocks = split_list(params, block_sizes)
    modes = DifferentiationModes(forward_mode_allowed=False)

    @autograd_enabled
    def batch_hessian_matrix_product(X, y, *M) -> tuple[Tensor, ...]:
        M = [m.movedim(-1, 0) for m in unpack_columns(M)]
        M_blocks = split_list(M, block_sizes)

        def compute(forward_mode: bool) -> list[Tensor]:
            output = model_func(X)
            if isinstance(loss_func, SUPPORTED_LOSSES):
                check_output_and_labels(loss_func, output, y)
            loss = loss_func(output, y)
            return hvp(loss, param_blocks, M_blocks, modes.columns)

        return tuple(r.movedim(0, -1) for r in modes(compute))

    batch_hessian_matrix_product.modes = modes  # what it remembers (operators, tests)
    return batch_hessian_matrix_product
