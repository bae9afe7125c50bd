"""Input validation shared across the library: clear, early errors for bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from operator import index

from torch import Generator, Tensor, finfo, float64, promote_types, randn
from torch import device as torch_device
from torch import dtype as torch_dtype

from curvlinops._losses import check_loss_options
from curvlinops.utils import assert_divisible_by


def check_params(params: list[Tensor]):
    """Verify that parameters are a non-empty list of differentiable tensors.

    Args:
        params: Candidate parameters.

    Raises:
        TypeError: If ``params`` is not a list or tuple of tensors.
        ValueError: If it is empty, a tensor does not require gradients or appears
            twice, or the tensors live on different devices or have different
            dtypes.
    """
    if not isinstance(params, (list, tuple)):
        raise TypeError(
            f"`params` must be a list of tensors, got {type(params).__name__}."
        )
    if len(params) == 0:
        raise ValueError("`params` is empty: expected at least one parameter.")
    for idx, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{idx}] must be a tensor, got {type(p).__name__}.")
        if not p.requires_grad:
            raise ValueError(
                f"params[{idx}] (shape {list(p.shape)}) must require grad."
            )
        if any(p is q for q in params[:idx]):
            raise ValueError(f"params[{idx}] appears twice in `params`.")
    check_same_device_and_dtype(params, "params")


def check_same_device_and_dtype(tensors: list[Tensor], what: str):
    """Verify that tensors share one device and one floating point dtype.

    Args:
        tensors: Tensors to check.
        what: Name of the tensors in the error message.

    Raises:
        ValueError: If devices or dtypes differ, or a dtype is not floating point.
    """
    devices = {t.device for t in tensors}
    dtypes = {t.dtype for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"All {what} must be on one device, got {devices}.")
    if len(dtypes) > 1:
        raise ValueError(f"All {what} must have one dtype, got {dtypes}.")
    if not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{what} must have a floating point dtype, got {dtypes}.")


def check_reduction(loss_func) -> str:
    """Verify that a loss function averages or sums its per-datum terms.

    Args:
        loss_func: Loss function, e.g. ``torch.nn.MSELoss``.

    Returns:
        The reduction, ``'mean'`` or ``'sum'``.

    Raises:
        ValueError: If the loss function has no ``reduction`` attribute or its value
            is neither ``'mean'`` nor ``'sum'``.
    """
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in {"mean", "sum"}:
        raise ValueError(
            f"Loss function must have `reduction` 'mean' or 'sum', got {reduction!r} "
            f"for {loss_func!r}."
        )
    return reduction


def check_supported_loss(loss_func, supported: tuple[type, ...], who: str):
    """Verify that a loss function is of a supported type, without extra options.

    Weights, ``pos_weight`` and label smoothing change the closed forms the
    operators rely on.

    Args:
        loss_func: Loss function.
        supported: Supported loss classes.
        who: Name of the caller for the error message.

    Raises:
        NotImplementedError: If the loss function is not supported.
    """
    if not isinstance(loss_func, supported):
        names = ", ".join(cls.__name__ for cls in supported)
        raise NotImplementedError(
            f"{who} supports the losses {names}; got {type(loss_func).__name__}."
        )
    check_loss_options(loss_func, who)


def check_block_sizes(block_sizes: list[int] | None, num_params: int) -> list[int]:
    """Verify a block structure over the parameters.

    Args:
        block_sizes: Numbers of consecutive parameters per block, or ``None``.
        num_params: Number of parameters.

    Returns:
        The block sizes; ``[num_params]`` (one block) if ``None``.

    Raises:
        ValueError: If the sizes are not positive integers summing to ``num_params``.
    """
    if block_sizes is None:
        return [num_params]
    if not isinstance(block_sizes, (list, tuple)):
        raise ValueError(
            f"`block_sizes` must be a list of integers, got {block_sizes!r}."
        )
    if any(not is_integer(b) or b <= 0 for b in block_sizes) or (
        sum(block_sizes) != num_params
    ):
        raise ValueError(
            f"`block_sizes` must be positive integers that sum to the number of "
            f"parameters ({num_params}), got {block_sizes}."
        )
    return [index(b) for b in block_sizes]


def check_data(data):
    """Verify that the data can be iterated over more than once.

    Args:
        data: Candidate data, e.g. a list of batches or a ``DataLoader``.

    Raises:
        TypeError: If ``data`` is an iterator (e.g. a generator), which one pass
            would exhaust.
    """
    if isinstance(data, Iterator):
        raise TypeError(
            "`data` must be iterable more than once, e.g. a list of batches or a "
            f"DataLoader; got a {type(data).__name__}, which one pass exhausts."
        )


def unpack_batch(batch) -> tuple:
    """Verify that a mini-batch is a pair ``(X, y)`` and return its entries.

    Args:
        batch: An entry of ``data``.

    Returns:
        The input ``X`` and the labels ``y``.

    Raises:
        TypeError: If the batch is not a tuple or list of two entries.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (
            f"a {type(batch).__name__} of {len(batch)} entries"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise TypeError(
            f"Every entry of `data` must be a mini-batch (X, y), got {what}. Pass "
            "e.g. a list of (X, y) pairs (one batch: [(X, y)]) or a DataLoader "
            "that yields them."
        )
    return batch[0], batch[1]


def check_batch_size(batch_size) -> int | Tensor:
    """Verify that a batch size is an integer (or an integer tensor).

    Args:
        batch_size: The batch size, e.g. returned by ``batch_size_fn``.

    Returns:
        The batch size; a Python ``int`` unless it is a tensor (not synchronized).

    Raises:
        TypeError: If the batch size is not an integer.
    """
    if isinstance(batch_size, Tensor) and not batch_size.is_floating_point():
        return batch_size
    if not is_integer(batch_size):
        raise TypeError(
            f"The batch size must be an integer, got {batch_size!r}; check "
            "`batch_size_fn`."
        )
    return index(batch_size)


def check_batch_input(X, batch_size_fn: Callable | None):
    """Verify that a mini-batch input is a tensor, or a mapping with a size function.

    Args:
        X: Mini-batch input.
        batch_size_fn: Function that returns the batch size of a mapping input.

    Raises:
        TypeError: If ``X`` is neither a tensor nor a ``MutableMapping``.
        ValueError: If ``X`` is a mapping and ``batch_size_fn`` is missing.
    """
    if isinstance(X, MutableMapping):
        if batch_size_fn is None:
            raise ValueError(
                "Inputs X are dict-like: pass `batch_size_fn` so the batch size can "
                "be determined, e.g. `batch_size_fn=lambda X: X['x'].shape[0]`."
            )
    elif not isinstance(X, Tensor):
        raise TypeError(
            "Inputs X must be a torch.Tensor or MutableMapping, got "
            f"{type(X).__name__}."
        )


def check_shape(shape, inferred: tuple[int, int], who: str):
    """Verify a matrix shape that the caller expects against the inferred one.

    Args:
        shape: The expected shape ``(rows, columns)``, or ``None`` for no check.
        inferred: The shape the operator has.
        who: Name of the operator for the error message.

    Raises:
        ValueError: If ``shape`` is given and differs from ``inferred``.
    """
    if shape is not None and tuple(shape) != tuple(inferred):
        raise ValueError(
            f"`shape={tuple(shape)}` was given, but {who} has shape {inferred}."
        )


def check_num_matvecs(num_matvecs: int, multiple_of: int = 1, minimum: int = 1):
    """Verify the number of matrix-vector products of a randomized estimator.

    Args:
        num_matvecs: Number of matrix-vector products.
        multiple_of: The number must be a multiple of this. Default: ``1``.
        minimum: The smallest allowed number. Default: ``1``.

    Raises:
        ValueError: If ``num_matvecs`` is not an integer, too small, or not a
            multiple of ``multiple_of``.
    """
    if not is_integer(num_matvecs) or num_matvecs < minimum:
        raise ValueError(
            f"`num_matvecs` must be an integer >= {minimum}, got {num_matvecs!r}."
        )
    assert_divisible_by(num_matvecs, multiple_of, "num_matvecs")


def is_integer(value) -> bool:
    """Return whether a value is an integer: Python, NumPy, or an integer tensor.

    Booleans are not integers here. Integer tensors with one entry count.

    Args:
        value: Candidate integer.

    Returns:
        Whether ``value`` is an integer.
    """
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.numel() != 1):
        return False
    try:
        index(value)
    except TypeError:
        return False
    return True


def check_integer(value, name: str, minimum: int | None = None) -> int:
    """Verify that a value is an integer (Python or NumPy) and return it as ``int``.

    Args:
        value: Candidate integer.
        name: Name of the value in the error message.
        minimum: Smallest allowed value, ``None`` for no limit.

    Returns:
        The value as Python ``int``.

    Raises:
        ValueError: If ``value`` is not an integer or smaller than ``minimum``.
    """
    if not is_integer(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"`{name}` must be an integer{bound}, got {value!r}.")
    return index(value)


def num_data_error(num_seen: int, num_data: int, more: bool = False) -> str | None:
    """Describe a mismatch between the data points of a pass and ``num_data``.

    Args:
        num_seen: Number of data points the pass yielded (of all ranks).
        num_data: Number of data points the operator was built for.
        more: Whether the pass was stopped early because it exceeded ``num_data``.

    Returns:
        The error message, or ``None`` if the numbers agree.
    """
    if num_seen == num_data:
        return None
    if more:
        return (
            f"`num_data={num_data}` was given, but the data yielded at least "
            f"{num_seen} data points (an endless stream?). Pass data that holds "
            "exactly `num_data` points, e.g. a list of batches or a DataLoader over "
            "a finite dataset."
        )
    return (
        f"`num_data={num_data}` was given, but the data yielded {num_seen} data "
        "points (summed over all ranks, if data-parallel)."
    )


def check_input_dtype(X: Tensor, dtype):
    """Verify that a floating point mini-batch input has the parameters' dtype.

    Integer inputs (e.g. token indices) are not checked.

    Args:
        X: Mini-batch input tensor.
        dtype: The parameters' dtype.

    Raises:
        ValueError: If ``X`` is floating point with another dtype.
    """
    if X.is_floating_point() and X.dtype != dtype:
        raise ValueError(
            f"Inputs X have dtype {X.dtype}, but the parameters have dtype {dtype}. "
            f"Cast the data (or the model) so that both agree, e.g. X.to({dtype})."
        )


def check_operand(X: Tensor, device: torch_device, dtype: torch_dtype) -> Tensor:
    """Verify a tensor an operator multiplies onto; cast it up if that is lossless.

    A floating point tensor whose dtype promotes to the operator's dtype without
    loss (``torch.promote_types(X.dtype, dtype) == dtype``, e.g. float32 for a
    float64 operator) is cast to ``dtype``, so the product comes back in the
    operator's dtype. laplace-torch relies on this: it multiplies the operators of
    float64 models onto ``torch.eye`` of the default dtype (float32). Lossy casts
    (float64 onto a float32 operator) are the caller's decision and are rejected,
    as are tensors that are not floating point.

    Args:
        X: Tensor to multiply onto.
        device: The operator's device.
        dtype: The operator's dtype.

    Returns:
        ``X`` in ``dtype`` (``X`` itself if it has that dtype already).

    Raises:
        ValueError: If ``X`` lives on another device, or its dtype is not floating
            point or does not convert to ``dtype`` without loss.
    """
    if X.device != device:
        raise ValueError(f"Expected device {device}, got {X.device}.")
    if X.dtype == dtype:
        return X
    if not X.is_floating_point() or promote_types(X.dtype, dtype) != dtype:
        raise ValueError(
            f"Expected dtype {dtype} (or a floating point dtype that converts to it "
            f"without loss), got {X.dtype}. Cast the input, e.g. X.to({dtype})."
        )
    return X.to(dtype)


def check_params_in_model(model, params: list[Tensor]):
    """Verify that parameters belong to a model (if it is a ``torch.nn.Module``).

    Args:
        model: The model; anything but a ``torch.nn.Module`` is not checked.
        params: The parameters.

    Raises:
        ValueError: If a parameter is not among ``model.parameters()``; the message
            names its position in ``params`` and its shape.
    """
    if not hasattr(model, "named_parameters"):
        return
    owned = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
    foreign = [
        f"params[{idx}] (shape {list(p.shape)})"
        for idx, p in enumerate(params)
        if id(p) not in owned
    ]
    if foreign:
        raise ValueError(
            f"Entries of `params` are not parameters of the model "
            f"({type(model).__name__}): {', '.join(foreign)}. All parameters must be "
            "part of `model_func.parameters()`."
        )


# Columns per side of the symmetry probe (``K**2`` bilinear forms from ``2 K``).
_SYMMETRY_PROBES = 4


def check_symmetry(A, who: str):
    r"""Verify cheaply that an operator is symmetric, unless it is self-adjoint.

    Compares the bilinear forms :math:`\mathbf{U}^\top (\mathbf{A} \mathbf{V})` and
    :math:`(\mathbf{A} \mathbf{U})^\top \mathbf{V}` for seeded random
    :math:`\mathbf{U}, \mathbf{V} \in \mathbb{R}^{N \times 4}` (one product with
    eight columns). They agree for symmetric :math:`\mathbf{A}`; the check fails if
    their difference exceeds :math:`\epsilon^{1/3}` relative to their Frobenius
    norm (:math:`\epsilon` the machine precision of ``A.dtype``: about ``5e-3``
    for float32, ``6e-6`` for float64), far above rounding errors. Operators with
    ``SELF_ADJOINT`` are skipped without products. The global random number
    generators are left untouched.

    Args:
        A: Square :class:`~curvlinops.PyTorchLinearOperator`.
        who: Name of the algorithm that needs symmetry, for the error message.

    Raises:
        ValueError: If the operator is (clearly) not symmetric.
    """
    if A.SELF_ADJOINT:
        return
    generator = Generator(device=A.device).manual_seed(0)
    UV = randn(A.shape[1], 2 * _SYMMETRY_PROBES, generator=generator, device=A.device)
    UV = UV.to(A.dtype)
    AUV = (A @ UV).to(float64)
    UV = UV.to(float64)
    U, V = UV.split(_SYMMETRY_PROBES, dim=1)
    AU, AV = AUV.split(_SYMMETRY_PROBES, dim=1)
    UtAV, AUtV = U.T @ AV, AU.T @ V
    scale = max(UtAV.norm().item(), AUtV.norm().item())
    difference = (UtAV - AUtV).norm().item()
    if difference > finfo(A.dtype).eps ** (1 / 3) * scale:
        raise ValueError(
            f"{who} needs a symmetric operator, but this one is not: for random "
            f"u, v, u^T A v and v^T A u differ by {difference / scale:.1e} "
            "(relative). Pass `check_symmetric=False` to skip this check (one "
            "product with 8 columns)."
        )
