"""General-purpose helpers: list splitting, tensor comparison, functional models."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, allclose
from torch.func import functional_call
from torch.nn import Module

from curvlinops._checks import check_params_in_model


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
    names = parameter_names(model_func, params)

    def f(*args):
        *param_values, X = args
        return functional_call(model_func, dict(zip(names, param_values)), (X,))

    def c(prediction: Tensor, y: Tensor) -> Tensor:
        if isinstance(loss_func, Module):
            return functional_call(loss_func, {}, (prediction, y))
        return loss_func(prediction, y)

    return f, c


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
    check_params_in_model(model, params)
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [name_of[id(p)] for p in params]
