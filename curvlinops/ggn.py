"""Generalized Gauss-Newton matrix as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from functools import partial

from torch import Tensor, cat
from torch.autograd import grad
from torch.func import grad as func_grad
from torch.func import jvp as func_jvp
from torch.func import vjp as func_vjp

from curvlinops._autodiff import ModelJacobian, unpack_columns, vjp
from curvlinops._checks import check_block_sizes
from curvlinops._execution import autograd_enabled, lazy_attribute
from curvlinops._functional import bind_params
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    check_output_and_labels,
    hessian_matmat,
    unsupported_options,
)
from curvlinops._torch_base import CurvatureLinearOperator


class _JacobianSandwichLinearOperator(CurvatureLinearOperator):
    r"""Curvature :math:`\mathbf{J}^\top \mathbf{S} \mathbf{J}`, batch by batch.

    :math:`\mathbf{J}` is the Jacobian of the model's output on the mini-batch w.r.t.
    the parameters and :math:`\mathbf{S}` a symmetric matrix in output space (the loss
    Hessian for the GGN, outer products of output gradients for the Fisher variants).
    Subclasses build the per-batch product in :meth:`_make_mp` with their
    ``make_batch_*`` builder (see :func:`_make_batch_sandwich_product`).
    """

    SELF_ADJOINT: bool = True
    SUPPORTS_BLOCKS: bool = True

    @lazy_attribute
    def _mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """The per-batch product ``mp(X, y, *M) -> tuple``.

        Returns:
            The function built by the subclass's ``make_batch_*`` builder.
        """
        return self._with_measurements(self._make_mp())

    def _make_mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """Build the per-batch product.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError

    def _matmat_batch(
        self, X: Tensor | MutableMapping, y: Tensor, M: list[Tensor]
    ) -> list[Tensor]:
        """Multiply the mini-batch matrix onto a matrix in tensor-list format.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            The product, tensors of shape ``[*param.shape, K]``.
        """
        return list(self._mp(X, y, *M))


def _make_batch_sandwich_product(
    model_func: Callable,
    loss_func,
    params: list[Tensor],
    output_matmat: Callable[..., Tensor],
    block_sizes: list[int] | None = None,
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build ``(X, y, M, *extra) -> J^T S J M`` for one mini-batch.

    A product is one forward pass that also carries the columns' tangents
    (:math:`\mathbf{J}\mathbf{M}`, forward mode where the model allows it), the
    output-space product ``output_matmat(output, y, JM, *extra)`` and one batched
    backward pass (:math:`\mathbf{J}^\top \cdot`). For ``block_sizes``, every
    block's columns are zero outside the block and travel as extra columns, so that
    the diagonal blocks :math:`\mathbf{J}_b^\top \mathbf{S} \mathbf{J}_b` come out
    of the same passes.

    Args:
        model_func: Maps a mini-batch input to predictions.
        loss_func: The loss function (to check model outputs and labels).
        params: Parameters that define the rows and columns.
        output_matmat: Multiplies :math:`\mathbf{S}` onto columns
            ``[K, *output.shape]``, given the detached output and the labels.
        block_sizes: Numbers of consecutive parameters per diagonal block, or
            ``None`` for one block.

    Returns:
        The product function; the matrix ``M`` is a list of tensors
        ``[*param.shape, K]`` and so is the result. Its attribute ``modes`` holds
        the differentiation modes it remembers (the working mode and the column
        policy, see :class:`~curvlinops._autodiff.DifferentiationModes`).
    """
    model_func, params = bind_params(model_func, params)
    params = list(params)
    block_sizes = check_block_sizes(block_sizes, len(params))
    blocks = [b for b, size in enumerate(block_sizes) for _ in range(size)]
    jacobian = ModelJacobian(model_func, params, forward_mode=True)

    @autograd_enabled
    def product(X, y, M: list[Tensor], *extra) -> tuple[Tensor, ...]:
        num_cols = M[0].shape[-1]
        M = _spread_over_blocks([m.movedim(-1, 0) for m in M], blocks)

        def compute(jvp) -> list[Tensor]:
            output, JM = jvp(X, M)
            check_output_and_labels(loss_func, output, y)
            SJM = output_matmat(output.detach(), y, JM, *extra)
            return vjp([output], params, [SJM], False, jacobian.columns)

        result = jacobian.run(compute)
        return tuple(
            r[b * num_cols : (b + 1) * num_cols].movedim(0, -1)
            for r, b in zip(result, blocks)
        )

    product.modes = jacobian.modes
    return product


def _spread_over_blocks(M: list[Tensor], blocks: list[int]) -> list[Tensor]:
    """Give every diagonal block its own columns, zero outside the block.

    Args:
        M: Columns ``[K, *param.shape]`` per parameter.
        blocks: The block of every parameter (consecutive, starting at 0).

    Returns:
        Columns ``[B * K, *param.shape]``; block ``b`` owns columns ``b * K`` to
        ``(b + 1) * K``. ``M`` itself for one block.
    """
    num_blocks = blocks[-1] + 1
    if num_blocks == 1:
        return M
    spread = []
    for m, b in zip(M, blocks):
        zeros_before = m.new_zeros(b * m.shape[0], *m.shape[1:])
        zeros_after = m.new_zeros((num_blocks - 1 - b) * m.shape[0], *m.shape[1:])
        spread.append(cat([zeros_before, m, zeros_after]))
    return spread


def _loss_hessian_matmat(loss_func, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
    """Multiply the Hessian of the mini-batch loss w.r.t. the output onto columns.

    Closed forms for the square, cross-entropy and BCE losses; any other loss,
    or one of these with weights or label smoothing, is differentiated twice
    with autograd.

    Args:
        loss_func: The loss function.
        output: Detached model output on the mini-batch.
        y: Mini-batch labels.
        M: Columns ``[K, *output.shape]``.

    Returns:
        Loss Hessian times ``M``, of shape ``[K, *output.shape]``.
    """
    if isinstance(loss_func, SUPPORTED_LOSSES) and not unsupported_options(loss_func):
        return hessian_matmat(loss_func, output, M, y)
    output.requires_grad_(True)
    (gradient,) = grad(loss_func(output, y), output, create_graph=True)
    (HM,) = vjp([gradient], [output], [M], retain_graph=False)
    return HM


def make_batch_ggn_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: tuple[Tensor, ...],
    block_sizes: list[int] | None = None,
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build the function that multiplies a mini-batch's GGN onto a matrix.

    For a mini-batch :math:`(\mathbf{X}, \mathbf{y})` with output
    :math:`\mathbf{F} = f_{\mathbf{\theta}}(\mathbf{X})` and loss
    :math:`\ell(\mathbf{F}, \mathbf{y})` (with the loss's reduction), the function
    computes :math:`\mathbf{J}^\top \nabla^2_{\mathbf{F}} \ell\, \mathbf{J}
    \mathbf{M}` with :math:`\mathbf{J}` the Jacobian of :math:`\mathbf{F}` w.r.t.
    the parameters. It is the per-batch product of :class:`GGNLinearOperator`:
    one forward pass carrying the columns as tangents, a product with the loss
    Hessian (closed forms for ``MSELoss``, ``CrossEntropyLoss``,
    ``BCEWithLogitsLoss``; autograd otherwise) and one batched backward pass.

    Args:
        model_func: Maps a mini-batch input to predictions (a module or a function).
        loss_func: Maps predictions and labels to a scalar.
        params: Parameters (requiring grad) that define the rows and columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.
        block_sizes: Numbers of consecutive parameters that form the diagonal
            blocks of a block-diagonal approximation. ``None`` (default): the GGN.

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
        >>> mp = make_batch_ggn_matrix_product(
        ...     model, MSELoss(reduction="sum"), tuple(model.parameters()))
        >>> M = rand(2, 3, 4)  # four columns in the weight's shape
        >>> (GM,) = mp(X, y, M)
        >>> G = 2 * kron(eye(2), X.T @ X)  # linear model: GGN = Hessian
        >>> GM.allclose((G @ M.reshape(6, 4)).reshape(2, 3, 4))
        True
    """
    product = _make_batch_sandwich_product(
        model_func,
        loss_func,
        params,
        partial(_loss_hessian_matmat, loss_func),
        block_sizes,
    )

    def batch_ggn_matrix_product(X, y, *M) -> tuple[Tensor, ...]:
        return product(X, y, unpack_columns(M))

    batch_ggn_matrix_product.modes = product.modes
    return batch_ggn_matrix_product


def make_ggn_vector_product(
    f: Callable[..., Tensor], c: Callable[..., Tensor], num_c_extra_args: int = 0
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build a GGN-vector product for a functional model and criterion.

    For :math:`\mathbf{z} = f(\mathbf{\theta}, \mathbf{X})` and a scalar
    :math:`c(\mathbf{z}, \dots)`, the generalized Gauss-Newton matrix is
    :math:`\mathbf{J}^\top \nabla^2_{\mathbf{z}} c\, \mathbf{J}`, with
    :math:`\mathbf{J}` the Jacobian of :math:`\mathbf{z}` w.r.t.
    :math:`\mathbf{\theta}` (Schraudolph, 2002). The product is composed of
    :mod:`torch.func` transforms (a Jacobian-vector product of :math:`f`, a
    Hessian-vector product of :math:`c` w.r.t. its first argument, a
    vector-Jacobian product of :math:`f`), so it can itself be transformed, e.g.
    batched over vectors with :func:`torch.func.vmap`.

    - Schraudolph, N. N. (2002). Fast curvature matrix-vector products for
      second-order gradient descent. Neural Computation.

    Args:
        f: ``f(*params, X) -> z``, e.g. from
            :func:`~curvlinops.utils.make_functional_model_and_loss`.
        c: ``c(z, *c_args) -> scalar``.
        num_c_extra_args: Number of arguments of ``c`` after ``z`` (e.g. ``1`` for
            the labels of a loss). Default: ``0``.

    Returns:
        ``ggnvp(*params, X, *c_args, *v) -> tuple`` whose vector ``v`` has one
        tensor per parameter (of its shape) and whose result has the same format.
        The parameters and the vector may also be passed as two tuples,
        ``ggnvp(params, X, *c_args, v)``.

    Example:
        >>> from torch import eye, kron, manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> from curvlinops.utils import make_functional_model_and_loss
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2, bias=False)
        >>> f, c = make_functional_model_and_loss(
        ...     model, MSELoss(reduction="sum"), (model.weight,))
        >>> ggnvp = make_ggn_vector_product(f, c, num_c_extra_args=1)
        >>> X, y, v = rand(5, 3), rand(5, 2), rand(2, 3)
        >>> (Gv,) = ggnvp(model.weight, X, y, v)
        >>> G = 2 * kron(eye(2), X.T @ X)
        >>> Gv.allclose((G @ v.flatten()).reshape(2, 3))
        True
    """

    def ggn_vector_product(*args) -> tuple[Tensor, ...]:
        params, X, c_args, v = _split_ggnvp_arguments(args, num_c_extra_args)

        def model(*ps):
            return f(*ps, X)

        output, pullback = func_vjp(model, *params)
        _, Jv = func_jvp(model, params, v)
        _, HJv = func_jvp(func_grad(lambda z: c(z, *c_args)), (output,), (Jv,))
        return tuple(pullback(HJv))

    return ggn_vector_product


def _split_ggnvp_arguments(args: tuple, num_c_extra_args: int):
    """Split the arguments of a GGN-vector product into their parts.

    Args:
        args: ``(*params, X, *c_args, *v)`` or ``(params, X, *c_args, v)``.
        num_c_extra_args: Number of criterion arguments.

    Returns:
        Parameters (tuple), input, criterion arguments (tuple), vector (tuple).

    Raises:
        ValueError: If the number of arguments does not fit.
    """
    if isinstance(args[0], (tuple, list)):
        params, X, *rest = args
        *c_args, v = rest
        v = tuple(v)
    else:
        num_params, remainder = divmod(len(args) - 1 - num_c_extra_args, 2)
        if remainder or num_params < 1:
            raise ValueError(
                f"Expected (*params, X, *c_args, *v) with {num_c_extra_args} c_args "
                f"and as many tensors in v as params, got {len(args)} arguments."
            )
        params, X = args[:num_params], args[num_params]
        c_args = args[num_params + 1 : num_params + 1 + num_c_extra_args]
        v = args[num_params + 1 + num_c_extra_args :]
    if len(c_args) != num_c_extra_args or len(v) != len(params):
        raise ValueError(
            f"Expected {num_c_extra_args} c_args and one vector tensor per parameter "
            f"({len(params)}), got {len(c_args)} and {len(v)}."
        )
    return tuple(params), X, tuple(c_args), v


class GGNLinearOperator(_JacobianSandwichLinearOperator):
    r"""Generalized Gauss-Newton (GGN) matrix of the empirical risk, as linear operator.

    For the empirical risk

    .. math::
        \mathcal{L}(\mathbf{\theta})
        = c \sum_{n=1}^N \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)

    with :math:`c = 1/N` (``reduction='mean'``) or :math:`c = 1` (``'sum'``), the GGN
    keeps the part of the Hessian that does not involve the model's second
    derivatives:

    .. math::
        \mathbf{G}
        = c \sum_{n=1}^N
        (\mathbf{J}_{\mathbf{\theta}} f_{\mathbf{\theta}}(\mathbf{x}_n))^\top
        \nabla^2_{f} \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)\,
        (\mathbf{J}_{\mathbf{\theta}} f_{\mathbf{\theta}}(\mathbf{x}_n))\,.

    It is positive semi-definite for convex losses (``MSELoss``,
    ``CrossEntropyLoss``, ``BCEWithLogitsLoss``), for which it equals the Fisher
    information matrix. Any loss that PyTorch differentiates twice works.

    A product costs one forward pass that carries the columns as tangents, a
    product with the loss Hessian, and one backward pass per mini-batch. The loss
    Hessian has closed forms for these three losses (cross-entropy terms labeled
    ``ignore_index`` are left out, as the loss leaves them out); other losses, and
    these with weights, ``pos_weight`` or label smoothing, are differentiated twice
    with autograd. Models whose
    operations lack forward-mode derivatives fall back to reverse mode. The operator
    is self-adjoint. With ``block_sizes=[b_1, b_2, ...]`` it represents the
    block-diagonal approximation whose blocks are the GGNs w.r.t. the first
    :math:`b_1` parameters, the next :math:`b_2`, and so on. The per-batch product
    is :func:`make_batch_ggn_matrix_product`.

    Example:
        >>> from torch import eye, kron, manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(4, 2, bias=False)
        >>> X, y = rand(10, 4), rand(10, 2)
        >>> data = list(zip(X.split(5), y.split(5)))
        >>> G = GGNLinearOperator(model, MSELoss(), list(model.parameters()), data)
        >>> # the mean square loss averages over N * C = 20 terms: G = 2/20 I ⊗ XᵀX
        >>> v = rand(G.shape[1])
        >>> (G @ v).allclose(kron(eye(2), X.T @ X) @ v / 10)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTS_BLOCKS: ``True``.
    """

    def _make_mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """Build the per-batch product with :func:`make_batch_ggn_matrix_product`.

        Returns:
            ``mp(X, y, *M) -> tuple``.
        """
        return make_batch_ggn_matrix_product(
            self._model_func, self._loss_func, self._params, self._block_sizes
        )
