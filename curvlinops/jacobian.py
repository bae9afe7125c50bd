"""The model's Jacobian over a data set, and its transpose, as linear operators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from functools import cached_property

from torch import Size, Tensor, cat, no_grad, zeros

from curvlinops._autodiff import ModelJacobian, vjp
from curvlinops._torch_base import CurvatureLinearOperator


class _ModelJacobianLinearOperator(CurvatureLinearOperator):
    """Shared set-up of the Jacobian and its transpose: no loss, stacked outputs.

    The rows of the Jacobian are the entries of the model's outputs, datum by datum.
    In tensor-list format they form one tensor ``[N, *output.shape[1:]]``, the
    outputs on the whole data set stacked along the batch axis.
    """

    # Whether products use forward-mode AD (Jacobian) or only reverse mode.
    _USES_FORWARD_MODE: bool = False

    def __init__(
        self,
        model_func: Callable[[Tensor | MutableMapping], Tensor],
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
    ):
        """Set up the operator and, by default, probe that it is deterministic.

        Args:
            model_func: Maps a mini-batch input ``X`` to outputs ``[B, *]``, usually
                a ``torch.nn.Module``.
            params: Parameters that define the Jacobian's columns.
            data: Mini-batches ``(X, y)`` in the same order on every pass; the labels
                are ignored. ``X`` may be a ``MutableMapping``; then
                ``batch_size_fn`` is required.
            progressbar: Show a progress bar during the passes over the data.
            check_deterministic: Probe at construction that two passes over data and
                model agree.
            num_data: Number of data points. Inferred with one pass if ``None``.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
        """
        self._transpose = None
        super().__init__(
            model_func,
            None,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )

    @cached_property
    def _stacked_output_shape(self) -> Size:
        """Return the shape of the outputs on all data, from one forward pass.

        Returns:
            ``[N, *output.shape[1:]]``.
        """
        X, _ = next(iter(self._loop_over_data(desc="output shape")))
        with no_grad():
            output = self._model_func(X)
        return Size([self._num_data, *output.shape[1:]])

    @cached_property
    def _jacobian(self) -> ModelJacobian:
        """Jacobian products of the model; forward mode only where it is used.

        Returns:
            The Jacobian helper.
        """
        return ModelJacobian(self._model_func, self._params, self._USES_FORWARD_MODE)

    def _check_num_rows(self, num_rows: int, partial: bool = False):
        """Verify that the data hold as many data points as the operator expects.

        Args:
            num_rows: Number of data points seen in a pass.
            partial: Whether the pass is not finished yet (then only too many data
                points are an error).

        Raises:
            ValueError: If the number differs from ``num_data``.
        """
        if num_rows > self._num_data or (num_rows < self._num_data and not partial):
            raise ValueError(
                f"The operator was built for num_data={self._num_data} data points, "
                f"but the data yielded {'at least ' if partial else ''}{num_rows}."
            )

    def _transposed(self, cls: type) -> _ModelJacobianLinearOperator:
        """Return the transposed operator, built once and linked both ways.

        Args:
            cls: Class of the transposed operator.

        Returns:
            The transposed operator on the same model, parameters, and data.
        """
        if self._transpose is None:
            self._transpose = cls(
                self._model_func,
                self._params,
                self._data,
                progressbar=self._progressbar,
                check_deterministic=False,
                num_data=self._num_data,
                batch_size_fn=self._batch_size_fn,
            )
            self._transpose._transpose = self
        return self._transpose


class JacobianLinearOperator(_ModelJacobianLinearOperator):
    r"""Jacobian of the model's outputs on a data set w.r.t. the parameters.

    For a model :math:`f_{\mathbf{\theta}}` with :math:`D` parameters and a data set
    :math:`\{(\mathbf{x}_n, \mathbf{y}_n)\}_{n=1}^N` (labels unused), this operator
    represents the :math:`NC \times D` matrix

    .. math::
        [\mathbf{J}_{\mathbf{\theta}} \mathbf{f}]_{(n, c), d}
        = \frac{\partial [f_{\mathbf{\theta}}(\mathbf{x}_n)]_c}{\partial \theta_d}\,,

    where :math:`C` is the number of entries of one datum's output (all axes but the
    batch axis, flattened in row-major order). Rows are ordered by datum, then by
    output entry; in tensor-list format the result is one tensor with the shape of
    the stacked outputs ``[N, *output.shape[1:]]``.

    A product costs one forward pass that carries the columns as tangents per
    mini-batch (forward-mode AD, falling back to reverse mode where derivatives are
    missing), for all columns at once. The adjoint is
    :class:`TransposedJacobianLinearOperator`. Data must come in the same order on
    every pass.

    Example:
        >>> from torch import einsum, eye, manual_seed, rand
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2, bias=False)
        >>> X = rand(5, 3)
        >>> data = [(X[:2], None), (X[2:], None)]  # labels are not used
        >>> J = JacobianLinearOperator(model, list(model.parameters()), data)
        >>> J.shape  # (N * C, D)
        (10, 6)
        >>> # for a linear layer, the Jacobian of datum n is I ⊗ xₙᵀ
        >>> dense = einsum("cd,nj->ncdj", eye(2), X).reshape(10, 6)
        >>> (J @ eye(6)).allclose(dense)
        True

    Attributes:
        SELF_ADJOINT: ``False``.
    """

    _USES_FORWARD_MODE = True

    def _infer_out_shape(self) -> list[Size]:
        """Return the range's format: the outputs stacked over all data.

        Returns:
            One shape, ``[N, *output.shape[1:]]``.
        """
        return [self._stacked_output_shape]

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the Jacobian onto columns, stacking the batches' products.

        Args:
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            One tensor ``[N, *output.shape[1:], K]``.
        """
        M = [m.movedim(-1, 0) for m in M]
        JM = cat([self._batch_jvp(X, M) for X, _ in self._loop_over_data("matmat")], 1)
        self._check_num_rows(JM.shape[1])
        return [JM.movedim(0, -1)]

    def _batch_jvp(self, X: Tensor | MutableMapping, M: list[Tensor]) -> Tensor:
        """Multiply a mini-batch's Jacobian onto columns.

        Args:
            X: Mini-batch input.
            M: Tensors of shape ``[K, *param.shape]``.

        Returns:
            ``[K, *output.shape]``.
        """

        def compute(jvp) -> Tensor:
            return jvp(X, M, output_graph=False)[1]

        return self._jacobian.run(compute).detach()

    def _adjoint(self) -> TransposedJacobianLinearOperator:
        """Return the transposed Jacobian.

        Returns:
            The transposed Jacobian on the same model, parameters, and data.
        """
        return self._transposed(TransposedJacobianLinearOperator)


class TransposedJacobianLinearOperator(_ModelJacobianLinearOperator):
    r"""Transposed Jacobian of the model's outputs on a data set, as linear operator.

    Represents the :math:`D \times NC` matrix :math:`(\mathbf{J}_{\mathbf{\theta}}
    \mathbf{f})^\top` with entries

    .. math::
        [(\mathbf{J}_{\mathbf{\theta}} \mathbf{f})^\top]_{d, (n, c)}
        = \frac{\partial [f_{\mathbf{\theta}}(\mathbf{x}_n)]_c}{\partial \theta_d}

    (see :class:`JacobianLinearOperator` for the ordering of rows and the
    tensor-list format ``[N, *output.shape[1:]]`` of its domain). A product costs
    one forward and one backward pass per mini-batch, for all columns at once, like a
    gradient. The adjoint is :class:`JacobianLinearOperator`. Data must come in the
    same order on every pass.

    Example:
        >>> from torch import manual_seed, ones, rand
        >>> from torch.autograd import grad
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2)
        >>> params, X = list(model.parameters()), rand(5, 3)
        >>> JT = TransposedJacobianLinearOperator(model, params, [(X, None)])
        >>> JT.shape  # (D, N * C)
        (8, 10)
        >>> # multiplying onto the all-ones vector gives the gradient of the sum
        >>> JT_ones = JT @ [ones(5, 2)]
        >>> expected = grad(model(X).sum(), params)
        >>> all(a.allclose(b) for a, b in zip(JT_ones, expected))
        True

    Attributes:
        SELF_ADJOINT: ``False``.
    """

    def _infer_in_shape(self) -> list[Size]:
        """Return the domain's format: the outputs stacked over all data.

        Returns:
            One shape, ``[N, *output.shape[1:]]``.
        """
        return [self._stacked_output_shape]

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the transposed Jacobian onto columns, batch by batch.

        Args:
            M: One tensor ``[N, *output.shape[1:], K]``.

        Returns:
            Tensors of shape ``[*param.shape, K]``.
        """
        V = M[0].movedim(-1, 0)
        num_cols, start = V.shape[0], 0
        result = [
            zeros(num_cols, *p.shape, device=self.device, dtype=self.dtype)
            for p in self._params
        ]
        for X, _ in self._loop_over_data(desc="matmat"):
            stop = start + self._batch_size(X)
            self._check_num_rows(stop, partial=True)
            for r, JTV in zip(result, self._batch_vjp(X, V[:, start:stop])):
                r.add_(JTV)
            start = stop
        self._check_num_rows(start)
        return [r.movedim(0, -1) for r in result]

    def _batch_vjp(self, X: Tensor | MutableMapping, V: Tensor) -> list[Tensor]:
        """Multiply a mini-batch's transposed Jacobian onto columns.

        Args:
            X: Mini-batch input.
            V: Columns ``[K, *output.shape]``.

        Returns:
            Tensors of shape ``[K, *param.shape]``.
        """

        def compute(_) -> list[Tensor]:
            output = self._model_func(X)
            return vjp([output], self._params, [V], retain_graph=False)

        return self._jacobian.run(compute)

    def _adjoint(self) -> JacobianLinearOperator:
        """Return the Jacobian.

        Returns:
            The Jacobian on the same model, parameters, and data.
        """
        return self._transposed(JacobianLinearOperator)
