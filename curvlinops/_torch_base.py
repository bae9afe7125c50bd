"""Base classes: the PyTorch linear operator and the curvature operator's data loop.

Layer one of the library. :class:`PyTorchLinearOperator` owns everything about
*formats* (vectors, matrices, tensor lists, NumPy arrays), the operator algebra
(sums, scalings, chains, adjoints) and the export to SciPy.
:class:`CurvatureLinearOperator` owns everything about *data*: it loops over
mini-batches, scales each batch's contribution for the loss's reduction, and probes
that model and data are deterministic. Concrete operators only supply products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from copy import deepcopy
from math import inf, isfinite
from numbers import Real

import numpy
from scipy.sparse.linalg import LinearOperator
from torch import (
    Generator,
    Size,
    Tensor,
    as_tensor,
    cat,
    enable_grad,
    float16,
    float32,
    float64,
    inference_mode,
    randn,
    zeros,
    zeros_like,
)
from torch import device as torch_device
from torch import dtype as torch_dtype
from torch.autograd import grad
from torch.compiler import is_compiling
from tqdm import tqdm

from curvlinops._checks import (
    check_batch_input,
    check_batch_size,
    check_block_sizes,
    check_data,
    check_input_dtype,
    check_integer,
    check_operand,
    check_params,
    check_params_in_model,
    check_reduction,
    check_shape,
    num_data_error,
    unpack_batch,
)
from curvlinops._determinism import (
    DETERMINISM_ATOL,
    DETERMINISM_RTOL,
    compare_passes,
    fingerprint_pass,
)
from curvlinops._distributed import (
    all_reduce_sum,
    check_process_group,
    first_error_over_ranks,
    mark_shared,
    shared_failure,
    sum_over_ranks,
)
from curvlinops._execution import (
    check_parameters_current,
    copyable_state,
    model_lock,
    normal_tensor,
    parameter_paths,
    restored_running_stats,
    transient_names,
    with_autograd,
)
from curvlinops._functional import bind_params
from curvlinops._losses import SUPPORTED_LOSSES, check_output_and_labels
from curvlinops.utils import allclose_report


class PyTorchLinearOperator:
    r"""Linear operator :math:`\mathbf{A} \in \mathbb{R}^{M \times N}` on tensors.

    Its domain and range are lists of tensors (*tensor-list format*), such as the
    parameters of a neural network. ``in_shape`` lists the tensor shapes the operator
    acts on and ``out_shape`` those it produces, so that
    ``A.shape == (sum(prod(s) for s in out_shape), sum(prod(s) for s in in_shape))``.

    ``A @ X`` accepts

    - a vector of shape ``[N]`` or a matrix of shape ``[N, K]`` (torch or NumPy),
    - a tensor list with the shapes of ``in_shape``, each optionally with a trailing
      axis of ``K`` columns,

    and returns the result in the same format (NumPy in, NumPy out). ``X @ A``
    multiplies from the left. Operators combine lazily with ``+``, ``-``, ``@`` and
    scalar ``*`` and ``/``; :meth:`to_scipy` exports to SciPy.

    A subclass implements :meth:`_matmat`, which receives and returns tensor lists
    whose tensors carry a trailing column axis, and either sets ``SELF_ADJOINT = True``
    or implements :meth:`_adjoint`. It passes ``device`` and ``dtype`` to
    ``__init__`` (or overrides the properties of the same names).

    Example:
        >>> from torch import eye, manual_seed, rand
        >>> from curvlinops.examples import TensorLinearOperator
        >>> _ = manual_seed(0)
        >>> A = TensorLinearOperator(rand(3, 3))
        >>> B = 2 * A - A.adjoint() @ A
        >>> B.shape
        (3, 3)
        >>> dense = 2 * A.tensor - A.tensor.T @ A.tensor
        >>> (B @ eye(3)).allclose(dense)
        True

    Attributes:
        SELF_ADJOINT: Whether the operator equals its adjoint. Default: ``False``.
    """

    SELF_ADJOINT: bool = False
    # Makes NumPy hand ``ndarray @ operator`` over to ``operator.__rmatmul__``.
    __array_ufunc__ = None

    def __init__(
        self,
        in_shape: list[tuple[int, ...]],
        out_shape: list[tuple[int, ...]],
        device: torch_device | str | None = None,
        dtype: torch_dtype | None = None,
    ):
        """Store the tensor-list formats of the operator's domain and range.

        Args:
            in_shape: Shapes of the tensors the operator acts on.
            out_shape: Shapes of the tensors the operator produces.
            device: Device of the tensors the operator acts on and produces.
                Subclasses either pass it here or override the ``device`` property.
            dtype: Dtype of those tensors (likewise).
        """
        self._device = None if device is None else torch_device(device)
        self._dtype = dtype
        self._in_shape = [Size(s) for s in in_shape]
        self._out_shape = [Size(s) for s in out_shape]
        # flattened sizes of the tensors, as in curvlinops 3.x
        self._in_shape_flat = [s.numel() for s in self._in_shape]
        self._out_shape_flat = [s.numel() for s in self._out_shape]
        self.shape = (sum(self._out_shape_flat), sum(self._in_shape_flat))

    @property
    def device(self) -> torch_device:
        """Return the device of the tensors the operator acts on and produces.

        Returns:
            The device given at construction.

        Raises:
            NotImplementedError: If the subclass neither passed a device to
                ``__init__`` nor overrides this property.
        """
        if self._device is None:
            raise NotImplementedError(
                f"{type(self).__name__} must pass `device` to "
                "PyTorchLinearOperator.__init__ or override the `device` property."
            )
        return self._device

    @property
    def dtype(self) -> torch_dtype:
        """Return the dtype of the tensors the operator acts on and produces.

        Returns:
            The dtype given at construction.

        Raises:
            NotImplementedError: If the subclass neither passed a dtype to
                ``__init__`` nor overrides this property.
        """
        if self._dtype is None:
            raise NotImplementedError(
                f"{type(self).__name__} must pass `dtype` to "
                "PyTorchLinearOperator.__init__ or override the `dtype` property."
            )
        return self._dtype

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply onto a matrix in tensor-list format.

        Args:
            M: Tensors of shapes ``[*in_shape[i], K]``.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `_matmat`.")

    def _adjoint(self) -> PyTorchLinearOperator:
        """Return the adjoint operator (only called if ``SELF_ADJOINT`` is ``False``).

        Raises:
            NotImplementedError: Must be implemented by non-self-adjoint subclasses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement `_adjoint`."
        )

    def adjoint(self) -> PyTorchLinearOperator:
        r"""Return the adjoint (transpose) :math:`\mathbf{A}^\top`.

        Returns:
            The adjoint operator; ``self`` if the operator is self-adjoint.
        """
        return self if self.SELF_ADJOINT else self._adjoint()

    # Products and format conversion

    def __matmul__(self, X):
        """Multiply the operator onto a vector, matrix, tensor list, or operator.

        Args:
            X: A torch or NumPy vector ``[N]`` or matrix ``[N, K]``, a tensor list
                with the shapes of ``in_shape`` (each optionally with a trailing
                column axis), or another :class:`PyTorchLinearOperator`. Tensors
                of a floating point dtype that converts to the operator's dtype
                without loss (e.g. float32 onto a float64 operator) are cast up.

        Returns:
            ``A @ X`` in the format of ``X`` and the operator's dtype; a lazy chain
            if ``X`` is an operator.

        Raises:
            TypeError: If ``X`` has an unsupported type.
        """
        if isinstance(X, PyTorchLinearOperator):
            from curvlinops._algebra import _ChainPyTorchLinearOperator

            return _ChainPyTorchLinearOperator(self, X)
        if isinstance(X, numpy.ndarray):
            return self._matmul_numpy(X)
        if isinstance(X, Tensor):
            return self._matmul_tensor(X)
        if isinstance(X, (list, tuple)):
            return self._matmul_tensor_list(list(X))
        raise TypeError(
            "Expected a torch.Tensor, numpy.ndarray, list of tensors or "
            f"PyTorchLinearOperator, got {type(X).__name__}."
        )

    def __rmatmul__(self, X):
        """Multiply a row vector ``[M]`` or matrix ``[K, M]`` onto the operator.

        Args:
            X: A torch or NumPy vector or matrix.

        Returns:
            ``X @ A`` in the format of ``X``.

        Raises:
            TypeError: If ``X`` is neither a tensor nor an array.
        """
        if not isinstance(X, (Tensor, numpy.ndarray)):
            raise TypeError(
                f"Expected a torch.Tensor or numpy.ndarray, got {type(X).__name__}."
            )
        if X.ndim == 1:
            return self.adjoint() @ X
        return (self.adjoint() @ X.T).T

    def _matmul_numpy(self, X: numpy.ndarray) -> numpy.ndarray:
        """Multiply onto a NumPy vector or matrix, computing in the operator's world.

        Args:
            X: NumPy vector ``[N]`` or matrix ``[N, K]``.

        Returns:
            NumPy result of the operator's dtype (float32 for dtypes that NumPy
            lacks, such as bfloat16).
        """
        X_torch = as_tensor(numpy.asarray(X)).to(self.device, self.dtype)
        return _to_numpy(self._matmul_tensor(X_torch))

    def _matmul_tensor(self, X: Tensor) -> Tensor:
        """Multiply onto a flat vector ``[N]`` or matrix ``[N, K]``.

        Args:
            X: Vector or matrix.

        Returns:
            The result as vector ``[M]`` or matrix ``[M, K]``.

        Raises:
            ValueError: If shape, device, or dtype of ``X`` do not fit.
        """
        X = check_operand(X, self.device, self.dtype)
        if X.ndim not in {1, 2} or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"Expected a vector of shape [{self.shape[1]}] or matrix of shape "
                f"[{self.shape[1]}, K], got {list(X.shape)}."
            )
        is_vec = X.ndim == 1
        M = X.unsqueeze(-1) if is_vec else X
        if M.shape[1] == 0:  # no columns, no products
            return M.new_zeros(self.shape[0], 0)
        AM = self._matmat(_split_columns(M, self._in_shape))
        AM = _flatten_columns(AM)
        return AM.squeeze(-1) if is_vec else AM

    def _matmul_tensor_list(self, X: list[Tensor]) -> list[Tensor]:
        """Multiply onto a vector or matrix in tensor-list format.

        Args:
            X: Tensors with the shapes of ``in_shape``, optionally all with a
                trailing column axis of the same size.

        Returns:
            The result in tensor-list format, with column axis if ``X`` has one.

        Raises:
            TypeError: If an entry is not a tensor (e.g. a NumPy array).
            ValueError: If number, shapes, devices or dtypes of the tensors mismatch.
        """
        if len(X) != len(self._in_shape):
            raise ValueError(f"Expected {len(self._in_shape)} tensors, got {len(X)}.")
        for idx, x in enumerate(X):
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"A tensor list must hold torch.Tensors, got {type(x).__name__} at "
                    f"index {idx}. Convert the entries with torch.as_tensor, or pass "
                    "a NumPy vector or matrix instead of a list."
                )
        X = [check_operand(x, self.device, self.dtype) for x in X]
        if all(x.shape == s for x, s in zip(X, self._in_shape)):
            return [r.squeeze(-1) for r in self._matmat([x.unsqueeze(-1) for x in X])]
        num_cols = {x.shape[-1] for x in X if x.ndim > 0}
        if len(num_cols) == 1 and all(
            x.shape[:-1] == s for x, s in zip(X, self._in_shape)
        ):
            if num_cols == {0}:  # no columns, no products
                return [X[0].new_zeros(*s, 0) for s in self._out_shape]
            return self._matmat(X)
        raise ValueError(
            f"Expected tensors of shapes {[list(s) for s in self._in_shape]}, "
            f"optionally with a shared trailing column axis, got "
            f"{[list(x.shape) for x in X]}."
        )

    # Algebra

    def __add__(self, other: PyTorchLinearOperator) -> PyTorchLinearOperator:
        """Return the lazy sum ``self + other``.

        Args:
            other: Operator of the same shape.

        Returns:
            The sum operator.
        """
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        from curvlinops._algebra import _SumPyTorchLinearOperator

        return _SumPyTorchLinearOperator(self, other)

    def __sub__(self, other: PyTorchLinearOperator) -> PyTorchLinearOperator:
        """Return the lazy difference ``self - other``.

        Args:
            other: Operator of the same shape.

        Returns:
            The difference operator.
        """
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        return self + (-1.0 * other)

    def __mul__(self, scalar: float) -> PyTorchLinearOperator:
        """Return the lazily scaled operator ``self * scalar``.

        Args:
            scalar: A real number.

        Returns:
            The scaled operator.

        Raises:
            ValueError: If ``scalar`` is not finite.
        """
        if not _is_real_scalar(scalar):
            return NotImplemented
        if not isfinite(float(scalar)):
            raise ValueError(f"Cannot scale a linear operator by {float(scalar)}.")
        from curvlinops._algebra import _ScaledPyTorchLinearOperator

        return _ScaledPyTorchLinearOperator(self, float(scalar))

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> PyTorchLinearOperator:
        """Return the lazily scaled operator ``self / scalar``.

        Args:
            scalar: A non-zero real number.

        Returns:
            The scaled operator.

        Raises:
            ZeroDivisionError: If ``scalar`` is zero.
        """
        if not _is_real_scalar(scalar):
            return NotImplemented
        if float(scalar) == 0.0:
            raise ZeroDivisionError("Cannot divide a linear operator by zero.")
        return self * (1.0 / float(scalar))

    def __neg__(self) -> PyTorchLinearOperator:
        """Return the lazily negated operator.

        Returns:
            The operator scaled by ``-1``.
        """
        return -1.0 * self

    # SciPy export

    def to_scipy(self, dtype: numpy.dtype | None = None) -> LinearOperator:
        """Wrap the operator as a SciPy ``LinearOperator`` (NumPy in, NumPy out).

        Use it to hand the operator to ``scipy.sparse.linalg`` (``eigsh``, ``cg``,
        ``lsmr``, ...). Computations still run in PyTorch on the operator's device.
        On a CPU, SciPy's OpenBLAS threads compete with PyTorch's for the cores;
        setting the environment variable ``OPENBLAS_NUM_THREADS=1`` before NumPy
        is imported can make such solvers several times faster.

        Args:
            dtype: NumPy dtype the SciPy operator reports and returns. Defaults to the
                NumPy equivalent of the operator's dtype; float32 for float16 and
                bfloat16 operators, whose products are upcast for SciPy (its solvers
                do not support half precision; inputs are cast to the operator's
                dtype).

        Returns:
            A SciPy linear operator with ``matvec``, ``matmat``, ``rmatvec`` and
            ``rmatmat``.

        Raises:
            ValueError: If ``dtype`` is not a floating point type (results would be
                truncated).
        """
        if dtype is None:
            dtype = _to_numpy(zeros(0, dtype=self.dtype)).dtype
            dtype = numpy.float32 if dtype == numpy.float16 else dtype
        if numpy.dtype(dtype).kind not in "fc":
            raise ValueError(f"`dtype` must be a floating point type, got {dtype}.")
        adjoint = self.adjoint()

        def apply(op: PyTorchLinearOperator, X: numpy.ndarray) -> numpy.ndarray:
            return op._matmul_numpy(X).astype(dtype, copy=False)

        return LinearOperator(
            shape=self.shape,
            dtype=dtype,
            matvec=lambda x: apply(self, x),
            matmat=lambda X: apply(self, X),
            rmatvec=lambda x: apply(adjoint, x),
            rmatmat=lambda X: apply(adjoint, X),
        )

    def __repr__(self) -> str:
        """Return a short description with shape, dtype and device.

        Returns:
            Description string.
        """
        return (
            f"<{type(self).__name__} of shape {self.shape}, dtype={self.dtype}, "
            f"device={self.device}>"
        )

    # Copies and pickles

    def __getstate__(self) -> dict:
        """Return the state to copy or pickle, without helpers rebuilt on use.

        Returns:
            The attributes, without lazily built helpers and those listed in the
            ``_TRANSIENT`` class attributes (see
            :func:`curvlinops._execution.copyable_state`).
        """
        return copyable_state(self)

    def __setstate__(self, state: dict):
        """Restore a copied or unpickled state; transient attributes become ``None``.

        Args:
            state: The state from :meth:`__getstate__`.
        """
        self.__dict__.update(state)
        for name in transient_names(type(self)):
            setattr(self, name, None)


def _is_real_scalar(x) -> bool:
    """Return whether ``x`` is a real number (Python, NumPy, or 0-d tensor).

    Args:
        x: Candidate scalar.

    Returns:
        Whether ``x`` is a real scalar.
    """
    if isinstance(x, Tensor):
        return x.ndim == 0 and not x.is_complex()
    return isinstance(x, Real)


def _to_numpy(x: Tensor) -> numpy.ndarray:
    """Convert a tensor to NumPy, upcasting dtypes that NumPy lacks to float32.

    Args:
        x: A tensor.

    Returns:
        The NumPy array (float32 for, e.g., bfloat16 tensors).
    """
    x = x.detach().cpu()
    if x.is_floating_point() and x.dtype not in (float16, float32, float64):
        x = x.to(float32)
    return x.numpy()


def _split_columns(M: Tensor, shapes: list[Size]) -> list[Tensor]:
    """Split a matrix ``[N, K]`` into tensor-list format with trailing column axis.

    Args:
        M: Matrix whose rows are the stacked flattened tensors.
        shapes: Tensor shapes of the list format.

    Returns:
        Tensors of shapes ``[*shapes[i], K]`` (views of ``M``).
    """
    num_cols = M.shape[-1]
    blocks = M.split([s.numel() for s in shapes])
    return [b.reshape(*s, num_cols) for b, s in zip(blocks, shapes)]


def _flatten_columns(M: list[Tensor]) -> Tensor:
    """Stack a tensor list with trailing column axis into a matrix ``[N, K]``.

    Args:
        M: Tensors of shapes ``[*s_i, K]``.

    Returns:
        Matrix of shape ``[sum_i prod(s_i), K]``.
    """
    return cat([m.reshape(-1, m.shape[-1]) for m in M])


class CurvatureLinearOperator(PyTorchLinearOperator):
    r"""Curvature matrix of an empirical risk, multiplied batch by batch.

    Consider the empirical risk over a data set :math:`\{(\mathbf{x}_n,
    \mathbf{y}_n)\}_{n=1}^N` that is split into mini-batches :math:`\mathcal{B}`,

    .. math::
        \mathcal{L}(\mathbf{\theta})
        = c \sum_{n=1}^N \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)
        = \sum_{\mathcal{B}} \frac{|\mathcal{B}|}{N} \mathcal{L}_{\mathcal{B}}
        (\mathbf{\theta})

    (the second form for ``reduction='mean'``, :math:`c = 1/N`; for
    ``reduction='sum'``, :math:`c = 1` and all batch weights are one). A curvature
    matrix :math:`\mathbf{C}` that is linear in the loss, such as the Hessian, is the
    same weighted sum of the mini-batch matrices :math:`\mathbf{C}_{\mathcal{B}}`.
    One product with :math:`\mathbf{C}` is one pass over the data that accumulates
    :math:`\frac{|\mathcal{B}|}{N} \mathbf{C}_{\mathcal{B}} \mathbf{M}`.

    Subclasses implement :meth:`_matmat_batch`, which multiplies the mini-batch
    matrix :math:`\mathbf{C}_{\mathcal{B}}` (of the batch loss, with its reduction)
    onto a matrix in tensor-list format, and set ``SELF_ADJOINT`` or implement
    ``_adjoint``. As in curvlinops 3.x, they may override the hooks
    ``_get_in_shape`` and ``_get_out_shape`` (the tensor shapes of domain and
    range; default: the parameters') and ``_get_normalization_factor(X, y)`` (the
    weight :math:`|\mathcal{B}|/N` or 1 of a mini-batch).

    Normalization layers in train mode (e.g. ``BatchNorm2d``) normalize with the
    statistics of each mini-batch, which couples the data points of a batch; the
    running statistics they update during a pass are restored afterwards (also when
    the pass fails or is interrupted), so products do not change the model.

    The operator holds the parameter tensors it was given. If the model's
    parameters are replaced by other tensors (``model.load_state_dict(sd,
    assign=True)``, or ``module.weight = torch.nn.Parameter(...)``), products
    raise a ``RuntimeError`` that names the parameter: create a new operator.
    Changing the values in place (e.g. an optimizer step) is fine. Operators copy
    (``copy.deepcopy``, also together with their model) and pickle; the copy
    computes with the copied model. Products of operators on one model run one at
    a time when called from several threads.

    Attributes:
        SELF_ADJOINT: Whether the operator is symmetric. Default: ``False``.
        SUPPORTS_BLOCKS: Whether the operator supports a block-diagonal approximation
            via ``block_sizes``. Default: ``False``.
        FIXED_DATA_ORDER: Whether products need the mini-batches in the same order
            on every pass (Jacobians, the Monte-Carlo Fisher). Default: ``False``.
    """

    SUPPORTS_BLOCKS: bool = False
    FIXED_DATA_ORDER: bool = False
    _TRANSIENT = ("_lock",)
    # Whether ``params`` must belong to the model (if it is a ``torch.nn.Module``).
    _PARAMS_OF_MODEL: bool = True

    def __init__(
        self,
        model_func: Callable[[Tensor | MutableMapping], Tensor],
        loss_func: Callable[[Tensor, Tensor], Tensor] | None,
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        block_sizes: list[int] | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        """Set up the operator and, by default, probe that it is deterministic.

        Args:
            model_func: Maps a mini-batch input ``X`` to predictions, usually a
                ``torch.nn.Module``. Its output's leading axis is the batch axis.
                With ``params`` as a dictionary: a function ``model_func(params,
                X)`` of the parameter dictionary and the input.
            loss_func: Maps predictions and labels to a scalar loss; needs a
                ``reduction`` of ``'mean'`` or ``'sum'``. ``None`` for operators that
                do not involve a loss (Jacobians).
            params: The parameters (tensors with ``requires_grad=True``) that define
                the curvature matrix's rows and columns, in this order: a list, or
                a ``dict[str, Tensor]`` (then in dictionary order; see
                :mod:`curvlinops._functional`).
            data: An iterable of mini-batches ``(X, y)``, e.g. a list or a
                ``DataLoader``, presented in the same order on every pass. ``X`` may
                be a tensor (floating point ones with the parameters' dtype) or a
                ``MutableMapping`` (then ``batch_size_fn`` is required and the model
                must move the dict's content to its device).
            progressbar: Show a progress bar during the passes over the data.
            check_deterministic: Probe at construction that two passes over data and
                model agree. Turn off only if you know both are deterministic.
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            block_sizes: Numbers of consecutive parameters that form the diagonal
                blocks of a block-diagonal approximation. ``None`` means one block.
                Only for operators with ``SUPPORTS_BLOCKS``.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group (e.g.
                ``torch.distributed.group.WORLD``) to compute products data-parallel:
                every rank passes its own shard of the data, and every product (and
                ``num_data``, ``gradient_and_loss``) is that of the union of all
                shards, available on every rank. ``None`` (default): single process.
            shape: Expected shape ``(rows, columns)`` of the represented matrix
                (spec 003); checked against the shape the operator infers. ``None``
                (default): no check.

        Raises:
            ValueError: If an argument is invalid (see the messages), e.g. a
                parameter does not belong to a ``torch.nn.Module`` model.
            RuntimeError: If the determinism probe fails.
        """
        model_func, params = bind_params(model_func, params)
        check_params(params)
        if self._PARAMS_OF_MODEL:
            check_params_in_model(model_func, params)
        check_data(data)
        check_process_group(process_group)
        self._process_group = process_group
        if loss_func is not None:
            check_reduction(loss_func)
        if block_sizes is not None and not self.SUPPORTS_BLOCKS:
            raise ValueError(f"{type(self).__name__} does not support `block_sizes`.")
        self._model_func = model_func
        self._loss_func = loss_func
        self._params = list(params)
        self._param_paths = parameter_paths(model_func, self._params)
        self._lock = model_lock(model_func)
        self._data = data
        self._progressbar = progressbar
        self._batch_size_fn = batch_size_fn
        self._block_sizes = check_block_sizes(block_sizes, len(self._params))
        self._num_data_verified = False  # by a pass over all ranks' data
        if num_data is not None:
            num_data = check_integer(num_data, "num_data", minimum=1)
        self._num_data = self._count_data() if num_data is None else num_data
        self._data_count = self._num_data  # what every pass must yield
        super().__init__(self._get_in_shape(), self._get_out_shape())
        check_shape(shape, self.shape, type(self).__name__)
        if check_deterministic:
            self._check_deterministic()

    @property
    def _N_data(self) -> int:  # noqa: N802 (curvlinops 3.x's name)
        """Return the number of data points (curvlinops 3.x's name of ``_num_data``).

        Returns:
            The number of data points.
        """
        return self._num_data

    @_N_data.setter
    def _N_data(self, value: int):  # noqa: N802
        """Set the number of data points that normalize ``'mean'`` losses (3.x).

        Only the batch weights ``|B| / N`` follow; passes over the data
        are still checked against the number the operator was built for.

        Args:
            value: The number of data points.
        """
        self._num_data = value

    def _get_in_shape(self) -> list[Size]:
        """Return the domain's tensor shapes (default: those of the parameters).

        Subclasses override this hook to act on other tensor lists.

        Returns:
            Tensor shapes.
        """
        return [p.shape for p in self._params]

    def _get_out_shape(self) -> list[Size]:
        """Return the range's tensor shapes (default: those of the parameters).

        Subclasses override this hook to produce other tensor lists.

        Returns:
            Tensor shapes.
        """
        return [p.shape for p in self._params]

    @property
    def device(self) -> torch_device:
        """Return the parameters' device.

        Returns:
            The device.
        """
        return self._params[0].device

    @property
    def dtype(self) -> torch_dtype:
        """Return the parameters' dtype.

        Returns:
            The dtype.
        """
        return self._params[0].dtype

    # Data loop

    def _loop_over_data(
        self, desc: str | None = None, check_count: bool = True
    ) -> Iterable:
        """Yield the mini-batches, moved to the operator's device.

        The batch sizes are summed as they come (Python integers, no
        synchronization) and compared with ``num_data``: a pass stops as soon as
        it exceeds ``num_data`` (endless data), and one that completes must match.
        Empty batches are skipped.

        Args:
            desc: Label of the progress bar.
            check_count: Raise a ``ValueError`` on a mismatch with ``num_data``. If
                ``False``, an exceeding pass just ends after the batch that exceeds
                (for callers that compare counts themselves).

        Yields:
            Mini-batches ``(X, y)``; tensor inputs and labels on ``self.device``.
            Run the pass inside :meth:`_protected`, which restores the running
            statistics of normalization layers in train mode.

        Raises:
            TypeError: If a batch is not a pair ``(X, y)``.
            ValueError: If a floating point input's dtype is not the parameters',
                or (with ``check_count``) the pass holds more or fewer data points
                than ``num_data``.
        """
        data = tqdm(self._data, desc=desc) if self._progressbar else self._data
        num_data, num_seen = self.__dict__.get("_data_count"), 0  # None: counting
        for batch in data:
            X, y = unpack_batch(batch)
            check_batch_input(X, self._batch_size_fn)
            batch_size = check_batch_size(self._batch_size(X))
            if isinstance(batch_size, int) and batch_size == 0:
                continue  # an empty batch contributes nothing
            num_seen = num_seen + batch_size
            exceeded = isinstance(num_seen, int) and num_seen > (num_data or inf)
            if exceeded and check_count:
                raise ValueError(num_data_error(num_seen, num_data, more=True))
            if isinstance(X, Tensor):
                check_input_dtype(X, self.dtype)
                X = normal_tensor(X.to(self.device))
            if isinstance(y, Tensor):
                y = normal_tensor(y.to(self.device))
            yield X, y
            if exceeded:
                return
        if check_count and num_data is not None:
            self._check_num_data(num_seen)

    def _check_num_data(self, num_seen: int | Tensor):
        """Compare the data points of a completed pass with ``num_data``.

        In a single process, every pass is checked (a comparison of integers).
        Data-parallel, the first completed pass sums the counts over the ranks
        (one all-reduce); later passes are not checked again.

        Args:
            num_seen: Number of data points this rank's pass yielded.

        Raises:
            ValueError: If the data (of all ranks) hold another number of points.
        """
        if self._process_group is not None:
            if self._num_data_verified:
                return
            num_seen = sum_over_ranks(num_seen, self._process_group, self.device)
        error = num_data_error(int(num_seen), self._data_count)
        if error is not None:
            raise ValueError(error)
        self._num_data_verified = True

    @contextmanager
    def _protected(self) -> Iterator[None]:
        """Run a computation over model and data as one protected unit.

        It holds the lock that all operators on the model share (threads take
        turns), checks that the model still holds the parameters, restores the
        running statistics of normalization layers in train mode however the
        computation ends (also on ``KeyboardInterrupt``), and reports an error to
        the other ranks of the process group, which then raise, too. Nested
        computations are fine.

        Yields:
            Nothing.
        """
        if is_compiling():  # dynamo traces neither locks nor the checks
            with restored_running_stats(self._model_func):
                yield
            return
        with self._lock, shared_failure(self._process_group, self.device):
            check_parameters_current(self._model_func, self._params, self._param_paths)
            with restored_running_stats(self._model_func):
                yield

    def __getstate__(self) -> dict:
        """Return the state to copy or pickle, with what the products measured.

        The per-batch product is rebuilt on use (it closes over the model), but a
        copy keeps its original's measurements (the working differentiation mode,
        the choices between batched and per-column passes), so that it computes
        the same numbers bit for bit (see :meth:`_with_measurements`).

        Returns:
            The attributes to copy.
        """
        state = super().__getstate__()
        modes = getattr(self.__dict__.get("_mp"), "modes", None)
        if modes is not None:
            state["_measured_modes"] = modes
        return state

    def _with_measurements(self, mp: Callable) -> Callable:
        """Give a (re)built per-batch product the measurements of the original.

        Args:
            mp: The per-batch product of a ``make_batch_*`` builder, with its
                :class:`~curvlinops._autodiff.DifferentiationModes` as ``modes``.

        Returns:
            ``mp``, whose modes took over those of the operator this one was
            copied from, if any.
        """
        measured = self.__dict__.pop("_measured_modes", None)
        if measured is not None:
            mp.modes.adopt(measured)
        return mp

    def __setstate__(self, state: dict):
        """Restore a copied or unpickled state, with the lock of its model.

        Args:
            state: The state from :meth:`__getstate__`.
        """
        super().__setstate__(state)
        self._lock = model_lock(self._model_func)

    def __deepcopy__(self, memo: dict) -> CurvatureLinearOperator:
        """Copy the operator (with model and data, unless copied along already).

        A process group is shared, not copied.

        Args:
            memo: ``copy.deepcopy``'s memo of the objects copied so far.

        Returns:
            The copy.
        """
        if self._process_group is not None:
            memo[id(self._process_group)] = self._process_group
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(deepcopy(self.__getstate__(), memo))
        return copied

    def _batch_size(self, X: Tensor | MutableMapping) -> int:
        """Return the number of data points in a mini-batch input.

        Args:
            X: Mini-batch input.

        Returns:
            Batch size.
        """
        return X.shape[0] if isinstance(X, Tensor) else self._batch_size_fn(X)

    def _count_data(self) -> int:
        """Count the data points (of all ranks) with one pass over the data.

        Returns:
            Number of data points.

        Raises:
            ValueError: If ``data`` contains no batch (on any rank).
        """
        with self._protected():
            batches = self._loop_over_data("num_data")
            num_data = sum(self._batch_size(X) for X, _ in batches)
            num_data = int(sum_over_ranks(num_data, self._process_group, self.device))
        if num_data == 0:
            raise ValueError("`data` is empty: expected at least one batch (X, y).")
        return num_data

    def _batch_weight(self, X: Tensor | MutableMapping) -> float:
        """Return the weight of a mini-batch's loss in the empirical risk.

        Args:
            X: Mini-batch input.

        Returns:
            ``|B| / N`` for ``reduction='mean'``, else ``1``.
        """
        if self._loss_func is not None and self._loss_func.reduction == "mean":
            return self._batch_size(X) / self._num_data
        return 1.0

    def _get_normalization_factor(self, X: Tensor | MutableMapping, y: Tensor) -> float:
        """Return the factor by which a mini-batch's product enters the data set's.

        Products, losses and gradients of every mini-batch are scaled by it. The
        default is :meth:`_batch_weight`; subclasses override this hook to change
        the scaling.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.

        Returns:
            ``|B| / N`` for ``reduction='mean'``, else ``1``.
        """
        return self._batch_weight(X)

    @with_autograd
    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Accumulate the weighted mini-batch products over the data.

        Args:
            M: Matrix in tensor-list format with trailing column axis.

        Returns:
            The product in tensor-list format.
        """
        result = None
        for X, y in self._loop_over_data(desc="matmat"):
            weight = self._get_normalization_factor(X, y)
            products = self._matmat_batch(X, y, M)
            if result is None:  # out of place: a product may alias ``M``
                result = [p * weight for p in products]
            else:
                for r, p in zip(result, products):
                    r.add_(p, alpha=weight)
        if result is None:  # this rank has no data
            num_cols = M[0].shape[-1]
            result = [
                zeros(*s, num_cols, device=self.device, dtype=self.dtype)
                for s in self._out_shape
            ]
        return all_reduce_sum(result, self._process_group)

    def _matmat_batch(
        self, X: Tensor | MutableMapping, y: Tensor, M: list[Tensor]
    ) -> list[Tensor]:
        """Multiply the mini-batch curvature matrix onto a matrix.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: Matrix in tensor-list format, tensors of shape ``[*in_shape[i], K]``.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `_matmat_batch`."
        )

    def data_prediction_loss_gradient(
        self, desc: str = "batch_prediction_loss_gradient"
    ) -> Iterator[tuple[tuple[Tensor | MutableMapping, Tensor], Tensor, Tensor, list]]:
        """Yield each mini-batch with the model's prediction, loss and gradient.

        Loss and gradient are those of the mini-batch's share of the empirical risk
        (scaled by :meth:`_get_normalization_factor`), so that they sum to the
        risk and its gradient over the data. Autograd is switched on for the pass.

        Args:
            desc: Label of the progress bar. Default:
                ``'batch_prediction_loss_gradient'``.

        Yields:
            ``((X, y), prediction, loss, gradient)`` per mini-batch; the tensors are
            detached, and loss and gradient (a list with the parameters' shapes) are
            ``None`` for operators without a loss function.
        """
        for X, y in self._loop_over_data(desc=desc):
            loss, gradient = None, None
            with inference_mode(False), enable_grad():
                prediction = self._model_func(X)
                if isinstance(self._loss_func, SUPPORTED_LOSSES):
                    check_output_and_labels(self._loss_func, prediction, y)
                if self._loss_func is not None:
                    weight = self._get_normalization_factor(X, y)
                    loss = self._loss_func(prediction, y) * weight
                    gradient = [g.detach() for g in grad(loss, self._params)]
                    loss = loss.detach()
            yield (X, y), prediction.detach(), loss, gradient

    @with_autograd
    def gradient_and_loss(self) -> tuple[list[Tensor], Tensor]:
        """Evaluate the empirical risk and its gradient over all data.

        Returns:
            The gradient in tensor-list format (shapes of the parameters) and the
            loss, both detached.

        Raises:
            ValueError: If the operator has no loss function.
        """
        if self._loss_func is None:
            raise ValueError(f"{type(self).__name__} has no loss function.")
        loss = zeros((), device=self.device, dtype=self.dtype)
        gradient = [zeros_like(p) for p in self._params]
        for _, _, batch_loss, batch_gradient in self.data_prediction_loss_gradient(
            desc="gradient_and_loss"
        ):
            for g, g_batch in zip(gradient, batch_gradient):
                g.add_(g_batch)
            loss.add_(batch_loss)
        *gradient, loss = all_reduce_sum([*gradient, loss], self._process_group)
        return gradient, loss

    # Determinism probe

    def _check_deterministic(self):
        """Probe that two passes over data and model, and two products, agree.

        Raises:
            RuntimeError: If data, model predictions, or products differ between two
                passes (on any rank).
            ValueError: If ``num_data`` differs from the number of data points.
        """
        batch_sizes = []

        def counted(batches: Iterable) -> Iterable:
            for X, y in batches:
                batch_sizes.append(self._batch_size(X))
                yield X, y

        with self._protected():
            passes = [
                fingerprint_pass(
                    counted(self._loop_over_data("check_deterministic", False)),
                    self._model_func,
                )
                for _ in range(2)
            ]
            error = first_error_over_ranks(
                compare_passes(*passes), self._process_group, self.device
            )
            if error is not None:
                raise mark_shared(RuntimeError(error))
            local = sum(batch_sizes) // 2  # two passes
            num_data = int(sum_over_ranks(local, self._process_group, self.device))
            more = num_data > self._data_count  # passes stop once they exceed it
        if num_data != self._data_count:
            raise ValueError(num_data_error(num_data, self._data_count, more))
        self._num_data_verified = True
        generator = Generator(device=self.device).manual_seed(0)
        M = randn(self.shape[1], 2, generator=generator, device=self.device)
        M = M.to(self.dtype)
        if not allclose_report(self @ M, self @ M, DETERMINISM_RTOL, DETERMINISM_ATOL):
            raise RuntimeError(
                f"Two products with the same matrix differ: {type(self).__name__} is "
                "not deterministic."
            )
