r"""Functional models: ``model_func(params, X)`` with a dictionary of parameters.

Besides curvlinops 3.0.1's ``model_func`` (a ``torch.nn.Module`` or any callable
``X -> prediction``) with ``params`` as a list of tensors, every curvature operator
accepts ``params`` as a ``dict[str, Tensor]`` together with a function
``model_func(params, X) -> prediction``, in the style of JAX and
:func:`torch.func.functional_call`. The operator then acts on the tensor list
``list(params.values())``: its ``in_shape`` (and, for the square operators,
``out_shape``) follows the **dictionary's order**, and results in tensor-list format
come in that order.

:func:`bind_params` turns such a pair into a :class:`FunctionalModel` (a callable
``X -> prediction`` that calls ``model_func`` with the operator's parameters) and
the tensor list, so that the rest of the library sees the familiar model and list.
:func:`functional_form` gives any supported model as a function of explicit
parameters, ``f(*params, X)``, for forward-mode differentiation and dense
references.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, no_grad
from torch.nn import Module

from curvlinops.utils import make_functional_model_and_loss


class FunctionalModel:
    """A model ``model_func(params, X)`` with its parameter dictionary bound.

    Calling it with a mini-batch input ``X`` evaluates ``model_func(params, X)`` on
    a shallow copy of the dictionary (the same tensors), so ``model_func`` may
    modify the dictionary it receives without affecting later calls. Like a
    module, it has a ``state_dict`` (the parameter values by name) that
    ``load_state_dict`` copies back into the tensors in place.

    Attributes:
        model_func: The function ``model_func(params, X) -> prediction``.
        params: The parameters by name, in the order of the operator's tensor list.
    """

    def __init__(self, model_func: Callable, params: Mapping[str, Tensor]):
        """Store the function and the parameters.

        Args:
            model_func: The function ``model_func(params, X) -> prediction``.
            params: The parameters by name.
        """
        self.model_func = model_func
        self.params = dict(params)

    def __call__(self, X) -> Tensor:
        """Evaluate the model on a mini-batch.

        Args:
            X: Mini-batch input.

        Returns:
            ``model_func(params, X)``.
        """
        return self.model_func(dict(self.params), X)

    def functional(self, *args) -> Tensor:
        """Evaluate the model with other parameter values: ``f(*params, X)``.

        Args:
            *args: One tensor per parameter (in dictionary order), then ``X``.

        Returns:
            The prediction.
        """
        *values, X = args
        return self.model_func(dict(zip(self.params, values)), X)

    def functional_of(self, params: list[Tensor]) -> Callable | None:
        """Return the model as a function of some of its parameters.

        Args:
            params: Tensors among the bound parameters.

        Returns:
            ``f(*params, X)`` that replaces these parameters by the arguments and
            keeps the others; ``None`` if a tensor is not a bound parameter.
        """
        name_of = {id(p): name for name, p in self.params.items()}
        if any(id(p) not in name_of for p in params):
            return None
        if [name_of[id(p)] for p in params] == list(self.params):
            return self.functional
        names = [name_of[id(p)] for p in params]

        def f(*args) -> Tensor:
            *values, X = args
            return self.model_func(dict(self.params) | dict(zip(names, values)), X)

        return f

    def state_dict(self) -> dict[str, Tensor]:
        """Return the parameter values by name (detached, not copied).

        Returns:
            The state.
        """
        return {name: p.detach() for name, p in self.params.items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]):
        """Copy saved parameter values into the parameters, in place.

        Args:
            state_dict: Values by name, as returned by :meth:`state_dict`.

        Raises:
            ValueError: If the names or shapes differ from the parameters'.
        """
        if list(state_dict) != list(self.params):
            raise ValueError(
                f"The state holds the parameters {list(state_dict)}, expected "
                f"{list(self.params)}."
            )
        with no_grad():
            for name, p in self.params.items():
                if state_dict[name].shape != p.shape:
                    raise ValueError(
                        f"The state's {name!r} has shape {list(state_dict[name].shape)}"
                        f", expected {list(p.shape)}."
                    )
                p.copy_(state_dict[name])

    def __repr__(self) -> str:
        """Name the function and the parameters.

        Returns:
            A short description.
        """
        name = getattr(self.model_func, "__name__", type(self.model_func).__name__)
        return f"FunctionalModel({name}, params={list(self.params)})"


def bind_params(
    model_func: Callable, params: list[Tensor] | Mapping[str, Tensor]
) -> tuple[Callable, list[Tensor]]:
    """Turn a functional model with a parameter dictionary into model and list.

    Args:
        model_func: ``model_func(params, X)`` if ``params`` is a dictionary, else
            the model ``X -> prediction`` (returned unchanged).
        params: The parameters, a list (or tuple) of tensors or a dictionary
            ``{name: tensor}``.

    Returns:
        A :class:`FunctionalModel` and ``list(params.values())`` for a dictionary;
        ``model_func`` and ``params`` themselves otherwise.

    Raises:
        TypeError: If ``model_func`` is not callable, a name is not a string or a
            value not a tensor.
        ValueError: If the dictionary is empty or a tensor does not require grad.
    """
    if not isinstance(params, Mapping):
        return model_func, params
    if not callable(model_func):
        raise TypeError(
            f"`model_func` must be callable as model_func(params, X), got "
            f"{type(model_func).__name__}."
        )
    if not params:
        raise ValueError("`params` is empty: expected at least one parameter.")
    for name, p in params.items():
        if not isinstance(name, str):
            raise TypeError(f"`params` must have str keys, got {name!r}.")
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{name!r}] must be a tensor, got {type(p)}.")
        if not p.requires_grad:
            raise ValueError(f"params[{name!r}] must require grad.")
    return FunctionalModel(model_func, params), list(params.values())


def functional_form(
    model_func: Callable, params: list[Tensor] | Mapping[str, Tensor]
) -> Callable | None:
    """Return a model as a function of explicit parameters, ``f(*params, X)``.

    Args:
        model_func: A ``torch.nn.Module``, a :class:`FunctionalModel`, or
            ``model_func(params, X)`` if ``params`` is a dictionary.
        params: The parameters (list or dictionary).

    Returns:
        ``f(*params, X) -> prediction`` with the parameters in the order of
        ``params``; ``None`` for other callables, which hide their parameters.
    """
    model_func, params = bind_params(model_func, params)
    if isinstance(model_func, FunctionalModel):
        return model_func.functional_of(list(params))
    if isinstance(model_func, Module):
        return make_functional_model_and_loss(model_func, None, tuple(params))[0]
    return None


def parameter_labels(model_func: Callable, params: list[Tensor]) -> list[str]:
    """Name parameters for messages: dictionary keys, module names, or positions.

    Args:
        model_func: The (bound) model.
        params: Its parameters.

    Returns:
        One label per parameter: the dictionary key (:class:`FunctionalModel`), the
        first qualified name inside a module, else ``'params[i]'``.
    """
    if isinstance(model_func, FunctionalModel):
        return list(model_func.params)
    names = {}
    if isinstance(model_func, Module):
        for name, p in model_func.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
    return [names.get(id(p), f"params[{i}]") for i, p in enumerate(params)]
