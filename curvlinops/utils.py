"""General-purpose helpers: list splitting, tensor comparison, functional models."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, allclose
from torch.func import functional_call
from torch.nn import Module

from curvlinops._losses import label_rows, output_rows


def split_list(x: list, sizes: list[int]) -> list[list]:
    """Split a list into consecutive sub-lists of given lengths.

    Args:
        x: The list to split.
        sizes: Lengths of the sub-lists; must sum to ``len(x)``.

    Returns:
        The sub-lists.

    Raises:
        ValueError: If the sizes do not sum to the list's length.

    Example:
        >>> split_list(["a", "b", "c", "d"], [1, 3])
        [['a'], ['b', 'c', 'd']]
    """
    if sum(sizes) != len(x):
        raise ValueError(f"Sizes {sizes} do not sum to the list's length {len(x)}.")
    boundaries = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [x[start:end] for start, end in zip(boundaries[:-1], boundaries[1:])]


def allclose_report(
    tensor1: Tensor | list[Tensor],
    tensor2: Tensor | list[Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> bool:
    r"""Compare two tensors (or tensor lists) and print where they differ.

    Entries are close if :math:`|a - b| \le \mathrm{atol} + \mathrm{rtol} |b|`, as in
    :func:`torch.allclose`. Unlike it, shape mismatches return ``False`` and the
    largest deviations are printed to help debugging.

    Args:
        tensor1: First tensor or list of tensors.
        tensor2: Second tensor or list of tensors.
        rtol: Relative tolerance.
        atol: Absolute tolerance.

    Returns:
        Whether all entries are close.

    Example:
        >>> from torch import tensor
        >>> allclose_report(tensor([1.0, 2.0]), tensor([1.0, 2.0 + 1e-9]))
        True
        >>> allclose_report(tensor([1.0, 2.0]), tensor([1.0, 2.5]))
        Not close: max |a - b| = 5.0000e-01 at index 1 (a=2.0, b=2.5), 1/2 entries off.
        False
    """
    if isinstance(tensor1, (list, tuple)) or isinstance(tensor2, (list, tuple)):
        if len(tensor1) != len(tensor2):
            print(f"Lists have different lengths: {len(tensor1)} vs {len(tensor2)}.")
            return False
        return all(allclose_report(a, b, rtol, atol) for a, b in zip(tensor1, tensor2))
    if tensor1.shape != tensor2.shape:
        print(f"Shapes differ: {list(tensor1.shape)} vs {list(tensor2.shape)}.")
        return False
    if allclose(tensor1, tensor2, rtol=rtol, atol=atol):
        return True
    diff = (tensor1 - tensor2).abs()
    off = diff > atol + rtol * tensor2.abs()
    idx = diff.flatten().argmax().item()
    a, b = tensor1.flatten()[idx].item(), tensor2.flatten()[idx].item()
    print(
        f"Not close: max |a - b| = {diff.max().item():.4e} at index {idx} "
        f"(a={a}, b={b}), {off.sum().item()}/{off.numel()} entries off."
    )
    return False


def assert_is_square(A) -> int:
    r"""Verify that an operator or matrix is square and return its dimension.

    Args:
        A: Anything with a ``shape`` attribute, e.g. a
            :class:`~curvlinops.PyTorchLinearOperator`, a tensor or an array.

    Returns:
        The dimension :math:`N` of the :math:`N \times N` operator.

    Raises:
        ValueError: If ``A`` is not a square matrix.

    Example:
        >>> from torch import zeros
        >>> assert_is_square(zeros(3, 3))
        3
    """
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"Expected a square operator, got shape {shape}.")
    return shape[0]


def assert_matvecs_subseed_dim(A, num_matvecs: int):
    """Verify that a randomized method uses fewer products than the dimension.

    A sketch with as many matrix-vector products as the operator has rows or
    columns costs as much as multiplying onto the identity, which gives the exact
    answer ("subseed" as in 3.x: the number must stay below the dimension).

    Args:
        A: Anything with a ``shape`` attribute of length two.
        num_matvecs: Number of matrix-vector products.

    Raises:
        ValueError: If ``num_matvecs`` is not smaller than every dimension of ``A``.

    Example:
        >>> from torch import zeros
        >>> assert_matvecs_subseed_dim(zeros(5, 5), 4)  # fine
        >>> assert_matvecs_subseed_dim(zeros(5, 5), 5)
        Traceback (most recent call last):
        ...
        ValueError: num_matvecs (5) must be smaller than the dimensions of A (5, 5).
    """
    if any(num_matvecs >= dim for dim in A.shape):
        raise ValueError(
            f"num_matvecs ({num_matvecs}) must be smaller than the dimensions of A "
            f"{tuple(A.shape)}."
        )


def assert_divisible_by(num: int, divisor: int, name: str):
    """Verify that an integer is a multiple of another.

    Args:
        num: The integer to check.
        divisor: The required divisor.
        name: Name of ``num`` in the error message.

    Raises:
        ValueError: If ``num`` is not divisible by ``divisor``.

    Example:
        >>> assert_divisible_by(6, 3, "num_matvecs")
        >>> assert_divisible_by(7, 2, "num_matvecs")
        Traceback (most recent call last):
        ...
        ValueError: num_matvecs (7) must be divisible by 2.
    """
    if num % divisor != 0:
        raise ValueError(f"{name} ({num}) must be divisible by {divisor}.")


def make_functional_call(module: Module, free_param_names: list[str]) -> Callable:
    """Turn a module into a function of some of its parameters and its inputs.

    The parameters named in ``free_param_names`` become the function's leading
    arguments; all other parameters and buffers keep their current values. The
    function can be transformed with :mod:`torch.func` (``jvp``, ``vmap``, ...).

    Args:
        module: The module, e.g. a neural network or a loss function.
        free_param_names: Fully qualified names (as in ``module.named_parameters()``)
            of the parameters that become arguments, in the order of the arguments.

    Returns:
        ``f(*free_params, *inputs)``, which evaluates ``module(*inputs)`` with the
        free parameters replaced by the given tensors.

    Raises:
        ValueError: If a name is not a parameter of the module.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> layer = Linear(3, 2)
        >>> f = make_functional_call(layer, ["weight"])
        >>> X = rand(4, 3)
        >>> f(2 * layer.weight, X).allclose(X @ (2 * layer.weight).T + layer.bias)
        True
    """
    known = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    unknown = [name for name in free_param_names if name not in known]
    if unknown:
        raise ValueError(f"{unknown} are not parameters of {type(module).__name__}.")
    names = list(free_param_names)

    def functional(*args):
        values, inputs = args[: len(names)], args[len(names) :]
        return functional_call(module, dict(zip(names, values)), inputs)

    return functional


def make_functional_model_and_loss(
    model_func: Module, loss_func: Module | Callable, params: tuple[Tensor, ...]
) -> tuple[Callable, Callable]:
    """Turn a model and loss into functions of explicit parameters.

    All other parameters and buffers of the model stay as they are, so the returned
    function can be transformed with :mod:`torch.func` (``jvp``, ``vmap``, ...).

    Args:
        model_func: The neural network.
        loss_func: The loss function (a module or a plain function).
        params: Parameters of ``model_func`` that become explicit arguments.

    Returns:
        ``f(*params, X) -> prediction`` and ``c(prediction, y) -> loss``.

    Raises:
        ValueError: If a parameter is not part of ``model_func``.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model, loss_func = Linear(3, 2), MSELoss()
        >>> f, c = make_functional_model_and_loss(model, loss_func, (model.weight,))
        >>> X, y = rand(5, 3), rand(5, 2)
        >>> c(f(2 * model.weight, X), y) == loss_func(X @ (2 * model.weight).T
        ...                                           + model.bias, y)
        tensor(True)
    """
    f = make_functional_call(model_func, parameter_names(model_func, params))
    if isinstance(loss_func, Module):
        c = make_functional_call(loss_func, [])
    else:
        c = loss_func
    return f, c


def make_functional_flattened_model_and_loss(
    model_func: Module, loss_func: Module, params: tuple[Tensor, ...]
) -> tuple[Callable, Callable]:
    r"""Functional model and loss whose output has one row per loss term.

    ``MSELoss``, ``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` treat every position
    of extra output axes (sequence, spatial) as a loss term of its own. The returned
    model rearranges its output ``[B, C, *]`` (cross-entropy) or ``[B, *, C]``
    (others) into rows ``[T, C]``, one per term (:math:`T = B \cdot \prod *`), and
    the returned loss rearranges the labels alike, so that ``c_flat(f_flat(*params,
    X), y)`` equals ``loss_func(model_func(X), y)`` for either reduction.

    Args:
        model_func: The neural network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters of ``model_func`` that become explicit arguments.

    Returns:
        ``f_flat(*params, X) -> [T, C]`` and ``c_flat(output_rows, y) -> loss``,
        where ``y`` are the labels in the model's layout or already in rows.

    Example:
        >>> from torch import manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Conv1d
        >>> _ = manual_seed(0)
        >>> model, loss_func = Conv1d(2, 4, 1), CrossEntropyLoss()
        >>> X, y = rand(3, 2, 5), randint(0, 4, (3, 5))  # 3 sequences of length 5
        >>> f_flat, c_flat = make_functional_flattened_model_and_loss(
        ...     model, loss_func, tuple(model.parameters()))
        >>> rows = f_flat(*model.parameters(), X)
        >>> rows.shape
        torch.Size([15, 4])
        >>> c_flat(rows, y).allclose(loss_func(model(X), y))
        True
    """
    f, c = make_functional_model_and_loss(model_func, loss_func, params)

    def f_flat(*args) -> Tensor:
        return output_rows(loss_func, f(*args))

    def c_flat(rows: Tensor, y: Tensor) -> Tensor:
        return c(rows, label_rows(loss_func, y))

    return f_flat, c_flat


def parameter_names(
    model: Module, params: list[Tensor] | tuple[Tensor, ...]
) -> list[str]:
    """Find the names under which parameters are registered inside a model.

    Args:
        model: The neural network.
        params: Parameters of the model.

    Returns:
        The parameters' fully qualified names, in the order of ``params``.

    Raises:
        ValueError: If a parameter is not part of the model.
    """
    from curvlinops._checks import check_params_in_model  # imports this module

    check_params_in_model(model, params)
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [name_of[id(p)] for p in params]
