"""Input validation shared across the library: clear, early errors for bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping

from torch import Tensor

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
    if any(not isinstance(b, int) or b <= 0 for b in block_sizes) or (
        sum(block_sizes) != num_params
    ):
        raise ValueError(
            f"`block_sizes` must be positive integers that sum to the number of "
            f"parameters ({num_params}), got {block_sizes}."
        )
    return list(block_sizes)


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
    is_int = isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool)
    if not is_int or num_matvecs < minimum:
        raise ValueError(
            f"`num_matvecs` must be an integer >= {minimum}, got {num_matvecs!r}."
        )
    assert_divisible_by(num_matvecs, multiple_of, "num_matvecs")
