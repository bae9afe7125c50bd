"""Generalized Gauss-Newton matrix as a linear operator."""

from __future__ import annotations

from collections.abc import MutableMapping

from torch import Tensor
from torch.autograd import grad

from curvlinops._autodiff import ModelJacobian, vjp
from curvlinops._execution import lazy_attribute
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
    A product is one forward pass that also carries the columns' tangents
    (:math:`\mathbf{J}\mathbf{M}`), the output-space product of :meth:`_output_matmat`,
    and one batched backward pass (:math:`\mathbf{J}^\top \cdot`).

    Subclasses implement :meth:`_output_matmat`.
    """

    SELF_ADJOINT: bool = True

    @lazy_attribute
    def _jacobian(self) -> ModelJacobian:
        """Jacobian products of the model, forward mode first where possible.

        Returns:
            The Jacobian helper.
        """
        return ModelJacobian(self._model_func, self._params, forward_mode=True)

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
        M = [m.movedim(-1, 0) for m in M]

        def compute(jvp) -> list[Tensor]:
            output, JM = jvp(X, M)
            check_output_and_labels(self._loss_func, output, y)
            SJM = self._output_matmat(output.detach(), y, JM)
            columns = self._jacobian.columns
            return vjp([output], self._params, [SJM], False, columns)

        return [r.movedim(0, -1) for r in self._jacobian.run(compute)]

    def _output_matmat(self, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
        """Multiply the output-space matrix onto columns.

        Args:
            output: Detached model output on the mini-batch.
            y: Mini-batch labels.
            M: Columns ``[K, *output.shape]``.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError


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
    is self-adjoint.

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
    """

    def _output_matmat(self, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
        """Multiply the Hessian of the mini-batch loss w.r.t. the output onto columns.

        Closed forms for the square, cross-entropy and BCE losses; any other loss,
        or one of these with weights or label smoothing, is differentiated twice
        with autograd.

        Args:
            output: Detached model output on the mini-batch.
            y: Mini-batch labels.
            M: Columns ``[K, *output.shape]``.

        Returns:
            Loss Hessian times ``M``, of shape ``[K, *output.shape]``.
        """
        loss = self._loss_func
        if isinstance(loss, SUPPORTED_LOSSES) and not unsupported_options(loss):
            return hessian_matmat(self._loss_func, output, M, y)
        output.requires_grad_(True)
        (gradient,) = grad(self._loss_func(output, y), output, create_graph=True)
        (HM,) = vjp([gradient], [output], [M], retain_graph=False)
        return HM
