"""The model's Jacobian over a data set, and its transpose, as linear operators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from functools import partial
from weakref import ref

from torch import Size, Tensor, cat, no_grad, zeros

from curvlinops._autodiff import ModelJacobian, unpack_columns, vjp
from curvlinops._distributed import (
    all_reduce_sum,
    first_over_ranks,
    gather_rows,
    mark_shared,
    row_range,
)
from curvlinops._execution import autograd_enabled, lazy_attribute, with_autograd
from curvlinops._functional import bind_params
from curvlinops._torch_base import CurvatureLinearOperator


class _ModelJacobianLinearOperator(CurvatureLinearOperator):
    """Shared set-up of the Jacobian and its transpose: no loss, stacked outputs.

    The rows of the Jacobian are the entries of the model's outputs, datum by datum.
    In tensor-list format they form one tensor ``[N, *output.shape[1:]]``, the
    outputs on the whole data set stacked along the batch axis.
    """

    # The rows are the data points in order: batches must come in the same order.
    FIXED_DATA_ORDER: bool = True
    # Whether products use forward-mode AD (Jacobian) or only reverse mode.
    _USES_FORWARD_MODE: bool = False
    # A copy builds its own transpose (see `_transposed`).
    _TRANSIENT = ("_transpose", "_transpose_of")

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
        shape: tuple[int, int] | None = None,
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
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group: each rank passes
                its shard of the data, and the operator is the Jacobian (transpose)
                of all ranks' data stacked in rank order (see the class
                description). ``None`` (default): single process.
            shape: Expected shape of the matrix (checked). ``None``: no check.
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
            shape=shape,
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
        with self._protected():
            for X, _ in self._loop_over_data("output shape", check_count=False):
                with no_grad():
                    output = self._model_func(X)
                _check_output(output, None)  # the first batch sets the shape
                trailing = tuple(output.shape[1:])
                break
            # ranks with an empty shard learn the shape from the others
            trailing = first_over_ranks(trailing, self._process_group, self.device)
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
        with self._protected():
            batches = self._loop_over_data("rows")
            num_rows = sum(self._batch_size(X) for X, _ in batches)
            return row_range(num_rows, self._process_group, self.device)

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
        Copies keep neither reference: a copy builds a transpose on its own model.

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
        FIXED_DATA_ORDER: ``True``.
    """

    @lazy_attribute
    def _mp(self) -> Callable[..., Tensor]:
        """The per-batch product, from :func:`make_batch_jacobian_matrix_product`.

        Returns:
            ``mp(X, *M) -> [B, *output.shape[1:], K]``.
        """
        check = partial(_check_output, stacked=self._out_shape[0])
        return self._with_measurements(
            _make_batch_jvp(self._model_func, self._params, check)
        )

    def _get_out_shape(self) -> list[Size]:
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
        JM = [self._mp(X, *M) for X, _ in self._loop_over_data("matmat")]
        JM = cat(JM) if JM else M[0].new_zeros(0, *self._out_shape[0][1:], num_cols)
        JM = gather_rows(JM, self._process_group)
        source = "" if self._process_group is None else "all ranks' "
        error = self._row_count_error(JM.shape[0], self._num_data, source=source)
        if error is not None:
            raise ValueError(error)
        return [JM]

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
        FIXED_DATA_ORDER: ``True``.
    """

    @lazy_attribute
    def _mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """The per-batch product, from the transposed-Jacobian builder.

        Returns:
            ``mp(X, M) -> tuple`` (see
            :func:`make_batch_transposed_jacobian_matrix_product`).
        """
        check = partial(_check_output, stacked=self._in_shape[0])
        return self._with_measurements(
            _make_batch_vjp(self._model_func, self._params, check)
        )

    def _get_in_shape(self) -> list[Size]:
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
        (V,) = M
        start, stop = self._row_range
        result = [
            zeros(*p.shape, V.shape[-1], device=self.device, dtype=self.dtype)
            for p in self._params
        ]
        row = start
        for X, _ in self._loop_over_data(desc="matmat"):
            row, previous = row + self._batch_size(X), row
            if row > stop:  # more data than expected: stop before slicing past it
                break
            for r, JTV in zip(result, self._mp(X, V[previous:row])):
                r.add_(JTV)
        source = "" if self._process_group is None else "this rank's "
        error = self._row_count_error(row - start, stop - start, row > stop, source)
        return self._all_reduce_or_raise(result, error)

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
            raise mark_shared(ValueError(error))
        if self._process_group is not None and num_failed.item() > 0:
            raise mark_shared(
                ValueError(
                    "Another rank's data did not match the operator: see its error."
                )
            )
        return result

    def _adjoint(self) -> JacobianLinearOperator:
        """Return the Jacobian.

        Returns:
            The Jacobian on the same model, parameters, and data.
        """
        return self._transposed(JacobianLinearOperator)


def _check_output(output: Tensor, stacked: Size | None):
    """Verify that a batch's output is a tensor with the stacked outputs' layout.

    Args:
        output: Model output on a mini-batch.
        stacked: Shape ``[N, *]`` of the outputs on all data, ``None`` if unknown.

    Raises:
        TypeError: If the output is not a tensor.
        ValueError: If its shape after the batch axis differs from ``stacked``'s
            (the rows of all batches are stacked).
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The model must return one tensor, got {type(output).__name__}."
        )
    if stacked is not None and output.shape[1:] != stacked[1:]:
        expected = "[" + ", ".join(["B", *map(str, stacked[1:])]) + "]"
        raise ValueError(
            f"The model's outputs must have the shape {expected} on every batch "
            f"(the Jacobian stacks their rows), got {list(output.shape)}."
        )


def make_batch_jacobian_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor], params: tuple[Tensor, ...]
) -> Callable[..., Tensor]:
    r"""Build the function that multiplies a mini-batch's Jacobian onto a matrix.

    For a mini-batch input :math:`\mathbf{X}` with output :math:`\mathbf{F} =
    f_{\mathbf{\theta}}(\mathbf{X})`, the function computes
    :math:`\mathbf{J}_{\mathbf{\theta}} \mathbf{F}\, \mathbf{M}` with one forward
    pass that carries the columns as tangents (forward-mode AD, falling back to
    reverse mode where derivatives are missing). It is the per-batch product of
    :class:`JacobianLinearOperator`, which stacks it over the data.

    Args:
        model_func: Maps a mini-batch input to outputs (a module or a function).
        params: Parameters (requiring grad) that define the Jacobian's columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.

    Returns:
        ``mp(X, *M) -> Tensor`` that takes the matrix as one tensor per parameter of
        shape ``[*param.shape, K]`` (or as one tuple of them) and returns
        ``[*output.shape, K]``, detached. Autograd is switched on inside.

    Example:
        >>> from torch import einsum, manual_seed, rand
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2, bias=False)
        >>> mp = make_batch_jacobian_matrix_product(model, (model.weight,))
        >>> X, M = rand(4, 3), rand(2, 3, 5)  # five columns
        >>> JM = mp(X, M)
        >>> JM.shape
        torch.Size([4, 2, 5])
        >>> JM.allclose(einsum("nj,cjk->nck", X, M))  # f(X) = X Wᵀ
        True
    """
    return _make_batch_jvp(model_func, params)


def _make_batch_jvp(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    params: tuple[Tensor, ...],
    check_output: Callable[[Tensor], None] | None = None,
) -> Callable[..., Tensor]:
    """Build :func:`make_batch_jacobian_matrix_product`'s function.

    Args:
        model_func: Maps a mini-batch input to outputs (a module or a function).
        params: Parameters (requiring grad) that define the Jacobian's columns.
        check_output: Called with every mini-batch's output (e.g. to verify its
            shape). ``None``: no check.

    Returns:
        ``mp(X, *M) -> Tensor`` (see :func:`make_batch_jacobian_matrix_product`),
        with the differentiation modes it remembers (the working mode and the
        column policy, see :class:`~curvlinops._autodiff.DifferentiationModes`)
        as its attribute ``modes``.
    """
    model_func, params = bind_params(model_func, params)
    jacobian = ModelJacobian(model_func, list(params), forward_mode=True)

    @autograd_enabled
    def batch_jacobian_matrix_product(X, *M) -> Tensor:
        M = [m.movedim(-1, 0) for m in unpack_columns(M)]

        def compute(jvp) -> Tensor:
            output, JM = jvp(X, M, output_graph=False)
            if check_output is not None:
                check_output(output)
            return JM

        return jacobian.run(compute).detach().movedim(0, -1)

    batch_jacobian_matrix_product.modes = jacobian.modes
    return batch_jacobian_matrix_product


def make_batch_transposed_jacobian_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor], params: tuple[Tensor, ...]
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build the function that multiplies a mini-batch's transposed Jacobian.

    For a mini-batch input :math:`\mathbf{X}` with output :math:`\mathbf{F} =
    f_{\mathbf{\theta}}(\mathbf{X})`, the function computes
    :math:`(\mathbf{J}_{\mathbf{\theta}} \mathbf{F})^\top \mathbf{M}` for columns
    :math:`\mathbf{M}` in output space, with one forward and one batched backward
    pass. It is the per-batch product of :class:`TransposedJacobianLinearOperator`.

    Args:
        model_func: Maps a mini-batch input to outputs (a module or a function).
        params: Parameters (requiring grad) that define the Jacobian's columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.

    Returns:
        ``mp(X, M) -> tuple`` that takes the columns as one tensor
        ``[*output.shape, K]`` (or a one-element tuple of it) and returns one tensor
        ``[*param.shape, K]`` per parameter. Autograd is switched on inside.

    Example:
        >>> from torch import einsum, manual_seed, rand
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2, bias=False)
        >>> mp = make_batch_transposed_jacobian_matrix_product(model, (model.weight,))
        >>> X, M = rand(4, 3), rand(4, 2, 5)  # five columns in output space
        >>> (JTM,) = mp(X, M)
        >>> JTM.allclose(einsum("nj,nck->cjk", X, M))
        True
    """
    return _make_batch_vjp(model_func, params)


def _make_batch_vjp(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    params: tuple[Tensor, ...],
    check_output: Callable[[Tensor], None] | None = None,
) -> Callable[..., tuple[Tensor, ...]]:
    """Build :func:`make_batch_transposed_jacobian_matrix_product`'s function.

    Args:
        model_func: Maps a mini-batch input to outputs (a module or a function).
        params: Parameters (requiring grad) that define the Jacobian's columns.
        check_output: Called with every mini-batch's output (e.g. to verify its
            shape). ``None``: no check.

    Returns:
        ``mp(X, M) -> tuple`` (see
        :func:`make_batch_transposed_jacobian_matrix_product`), with the
        differentiation modes it remembers as its attribute ``modes``.
    """
    model_func, params = bind_params(model_func, params)
    params = list(params)
    jacobian = ModelJacobian(model_func, params, forward_mode=False)

    @autograd_enabled
    def batch_transposed_jacobian_matrix_product(X, *M) -> tuple[Tensor, ...]:
        (V,) = unpack_columns(M)
        V = V.movedim(-1, 0)

        def compute(_) -> list[Tensor]:
            output = model_func(X)
            if check_output is not None:
                check_output(output)
            return vjp([output], params, [V], False, jacobian.columns)

        return tuple(r.movedim(0, -1) for r in jacobian.run(compute))

    batch_transposed_jacobian_matrix_product.modes = jacobian.modes
    return batch_transposed_jacobian_matrix_product
