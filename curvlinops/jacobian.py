"""The model's Jacobian over a data set, and its transpose, as linear operators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from weakref import ref

from torch import Size, Tensor, cat, no_grad, zeros

from curvlinops._autodiff import ModelJacobian, vjp
from curvlinops._distributed import (
    all_reduce_sum,
    first_over_ranks,
    gather_rows,
    row_range,
)
from curvlinops._execution import lazy_attribute, with_autograd
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
        process_group=None,
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
            process_group: A ``torch.distributed`` process group: each rank passes
                its shard of the data, and the operator is the Jacobian (transpose)
                of all ranks' data stacked in rank order (see the class
                description). ``None`` (default): single process.
        """
        self._transpose, self._transpose_of = None, None
        super().__init__(
            model_func,
            None,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
        )

    @lazy_attribute
    def _stacked_output_shape(self) -> Size:
        """Return the shape of the outputs on all data, from one forward pass.

        Returns:
            ``[N, *output.shape[1:]]``.

        Raises:
            ValueError: If no rank has data.
        """
        trailing = None
        for X, _ in self._loop_over_data(desc="output shape"):
            with no_grad():
                trailing = tuple(self._model_func(X).shape[1:])
            break
        # ranks with an empty shard learn the shape from the others
        trailing = first_over_ranks(trailing, self._process_group)
        if trailing is None:
            raise ValueError("`data` is empty: expected at least one batch (X, y).")
        return Size([self._num_data, *trailing])

    @lazy_attribute
    def _row_range(self) -> tuple[int, int]:
        """Return the rows of this rank's data among the stacked outputs.

        Returns:
            ``(start, stop)``; ``(0, N)`` in a single process.
        """
        if self._process_group is None:
            return 0, self._num_data
        num_rows = sum(self._batch_size(X) for X, _ in self._loop_over_data("rows"))
        return row_range(num_rows, self._process_group)

    @lazy_attribute
    def _jacobian(self) -> ModelJacobian:
        """Jacobian products of the model; forward mode only where it is used.

        Returns:
            The Jacobian helper.
        """
        return ModelJacobian(self._model_func, self._params, self._USES_FORWARD_MODE)

    def _row_count_error(
        self, num_rows: int, expected: int, at_least: bool = False, source: str = ""
    ) -> str | None:
        """Describe a mismatch between the data points a pass yields and those expected.

        Args:
            num_rows: Number of data points the pass yielded.
            expected: The number expected.
            at_least: Whether the pass stopped early at too many data points.
            source: Whose data the pass went over, e.g. ``"this rank's "``.

        Returns:
            The error message, or ``None`` if the numbers agree.
        """
        if num_rows == expected:
            return None
        scope = f" ({expected} in {source}data)" if source else ""
        return (
            f"The operator was built for num_data={self._num_data} data "
            f"points{scope}, but the data yielded "
            f"{'at least ' if at_least else ''}{num_rows}."
        )

    def _transposed(self, cls: type) -> _ModelJacobianLinearOperator:
        """Return the transposed operator, built once and shared by both.

        The operator holds the transpose it built; the transpose refers back only
        weakly. A reference cycle would keep both, and their process group, alive
        until the interpreter exits, where tearing down a gloo group can abort.

        Args:
            cls: Class of the transposed operator.

        Returns:
            The transposed operator on the same model, parameters, and data.
        """
        owner = None if self._transpose_of is None else self._transpose_of()
        if owner is not None:
            return owner
        if self._transpose is None:
            self._transpose = cls(
                self._model_func,
                self._params,
                self._data,
                progressbar=self._progressbar,
                check_deterministic=False,
                num_data=self._num_data,
                batch_size_fn=self._batch_size_fn,
                process_group=self._process_group,
            )
            self._transpose._transpose_of = ref(self)
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

    Data-parallel (``process_group``), each rank passes its shard of the data, and
    the rows are those of all ranks' data points stacked in rank order (rank 0's
    first), so :math:`N` counts all data points. Every rank receives the whole
    product ``[N, *output.shape[1:], K]`` (the ranks' rows are gathered once per
    product).

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

    @with_autograd
    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the Jacobian onto columns, stacking the batches' products.

        Args:
            M: Tensors of shape ``[*param.shape, K]``.

        Returns:
            One tensor ``[N, *output.shape[1:], K]``.
        """
        num_cols = M[0].shape[-1]
        M = [m.movedim(-1, 0) for m in M]
        JM = [  # [B, *output.shape[1:], K] per batch
            self._batch_jvp(X, M).movedim(0, -1)
            for X, _ in self._loop_over_data("matmat")
        ]
        JM = cat(JM) if JM else M[0].new_zeros(0, *self._out_shape[0][1:], num_cols)
        JM = gather_rows(JM, self._process_group)
        source = "" if self._process_group is None else "all ranks' "
        error = self._row_count_error(JM.shape[0], self._num_data, source=source)
        if error is not None:
            raise ValueError(error)
        return [JM]

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

    Data-parallel (``process_group``), the domain's rows are all ranks' data points
    stacked in rank order, as for :class:`JacobianLinearOperator`. Every rank passes
    the same whole input ``[N, *output.shape[1:], K]``, multiplies the slice of its
    own data points, and the ranks' results are summed with one all-reduce per
    product.

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

    @with_autograd
    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the transposed Jacobian onto columns, batch by batch.

        Args:
            M: One tensor ``[N, *output.shape[1:], K]``.

        Returns:
            Tensors of shape ``[*param.shape, K]``.
        """
        V = M[0].movedim(-1, 0)
        start, stop = self._row_range
        result = [
            zeros(V.shape[0], *p.shape, device=self.device, dtype=self.dtype)
            for p in self._params
        ]
        row = start
        for X, _ in self._loop_over_data(desc="matmat"):
            row, previous = row + self._batch_size(X), row
            if row > stop:  # more data than expected: stop before slicing past it
                break
            for r, JTV in zip(result, self._batch_vjp(X, V[:, previous:row])):
                r.add_(JTV)
        source = "" if self._process_group is None else "this rank's "
        error = self._row_count_error(row - start, stop - start, row > stop, source)
        result = self._all_reduce_or_raise(result, error)
        return [r.movedim(0, -1) for r in result]

    def _all_reduce_or_raise(self, result: list[Tensor], error: str | None):
        """Sum the ranks' results, unless a rank met an error; then all ranks raise.

        The error flag travels in the same collective as the results.

        Args:
            result: This rank's partial results.
            error: This rank's error message, or ``None``.

        Returns:
            The results summed over the ranks.

        Raises:
            ValueError: If any rank met an error.
        """
        flag = zeros(1, device=self.device, dtype=self.dtype) + (error is not None)
        *result, num_failed = all_reduce_sum([*result, flag], self._process_group)
        if error is not None:
            raise ValueError(error)
        if self._process_group is not None and num_failed.item() > 0:
            raise ValueError(
                "Another rank's data did not match the operator: see its error."
            )
        return result

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
            return vjp([output], self._params, [V], False, self._jacobian.columns)

        return self._jacobian.run(compute)

    def _adjoint(self) -> JacobianLinearOperator:
        """Return the Jacobian.

        Returns:
            The Jacobian on the same model, parameters, and data.
        """
        return self._transposed(JacobianLinearOperator)
