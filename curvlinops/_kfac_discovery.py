r"""Which parameters form KFAC's layers, found by watching one forward pass.

KFAC groups the parameters into *layers*: a weight (used as the weight of linear
maps or 2d convolutions) with the bias that every such call adds, or a bias alone.
For curvlinops 3.0.1's models (every parameter the weight or bias of one ``Linear``
or ``Conv2d`` module) the modules tell the layers, without running the model. For
anything else (functional models, weights shared by several modules, custom
modules) :func:`discover_mapping` runs the model once on a mini-batch under
:class:`CallLog`, a torch function mode (see :mod:`curvlinops._kfac_uses`), and
reads the layers off the calls. This is paid once per operator, not per batch and
not per batch size. Layers are named after their weight (after their bias if they
have no weight among the parameters): the dictionary key for functional models,
else the module that holds the parameter as ``weight`` (or ``bias``), preferring
``Linear`` and ``Conv2d`` modules (so that a tied unembedding is named after the
``Linear`` head), else the parameter's qualified name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, enable_grad, is_grad_enabled
from torch.nn import Conv2d, Linear, Module

from curvlinops._functional import FunctionalModel
from curvlinops._kfac_calls import op_name, unsupported_message
from curvlinops._kfac_uses import ParameterUses

_ROLE_ORDER = ("weight", "bias")
_PLURAL = {"weight": "weights", "bias": "biases"}


class CallLog(ParameterUses):
    """Log which parameters every linear map, convolution and lookup uses.

    Attributes:
        calls: ``(operation, weight, bias)`` per call, with the positions of the
            weight and bias among the parameters (``None`` if not a parameter).
        lookups: Positions of looked-up parameters mapped to the operation.
    """

    def __init__(self, params: list[Tensor], labels: list[str]):
        """Watch parameters.

        Args:
            params: The parameters.
            labels: Their names.
        """
        super().__init__(dict(zip(map(id, params), labels)), forced_grad=False)
        self._position = {id(p): i for i, p in enumerate(params)}
        self.calls: list[tuple[str, int | None, int | None]] = []
        self.lookups: dict[int, str] = {}

    def _on_linear_call(self, func, args: tuple, kwargs: dict, call: tuple):
        """Log the positions of a call's weight and bias.

        Args:
            func: The function.
            args: Positional arguments.
            kwargs: Keyword arguments.
            call: ``(kind, x, weight, bias, conv)``.

        Returns:
            The function's result.
        """
        if is_grad_enabled():  # calls inside the model's no_grad are no uses
            weight, bias = (self._position.get(id(t)) for t in call[2:4])
            self.calls.append((op_name(func), weight, bias))
        return func(*args, **kwargs)

    def _on_lookup(self, func, table: Tensor):
        """Log a lookup.

        Args:
            func: The function.
            table: The looked-up matrix.
        """
        self.lookups.setdefault(self._position[id(table)], op_name(func))


def discover_mapping(
    model_func: Callable, params: list[Tensor], labels: list[str], X
) -> dict[str, dict[str, int]]:
    """Find KFAC's layers by running the model once under :class:`CallLog`.

    Args:
        model_func: The model (a module, a :class:`FunctionalModel` or any callable
            ``X -> prediction``).
        params: The parameters.
        labels: Their names, for messages.
        X: A mini-batch input.

    Returns:
        Layer names mapped to ``{'weight': i, 'bias': j}`` (the roles present),
        layers in the order of their first parameter in ``params``. Parameters
        that no call uses but a ``Linear`` or ``Conv2d`` module holds form that
        module's layer (with zero factors until data reaches it).

    Raises:
        ValueError: If a parameter is neither used nor held by such a module.
    """
    log = CallLog(params, labels)
    with log, enable_grad():
        model_func(X)
    layers = layers_from_calls(log.calls, log.lookups, labels)
    mapping = dict(zip(layer_names(model_func, params, labels, layers), layers))
    used = {position for layer in layers for position in layer.values()}
    unused = [i for i in range(len(params)) if i not in used]
    unused_layers = _layers_of_modules(model_func, params, unused)
    missing = [labels[i] for i in unused if i not in _positions(unused_layers)]
    if missing or set(unused_layers) & set(mapping):
        raise ValueError(
            f"Parameters {missing or [labels[i] for i in unused]} are not used as "
            "weights or biases of linear maps or 2d convolutions on the first "
            "mini-batch; KFAC cannot tell their layers. Pass only parameters the "
            "model uses."
        )
    return dict(sorted((mapping | unused_layers).items(), key=_first_position))


def _positions(mapping: dict[str, dict[str, int]]) -> set[int]:
    """Return the parameter positions in a mapping."""
    return {position for roles in mapping.values() for position in roles.values()}


def _first_position(item: tuple[str, dict[str, int]]) -> int:
    """Sort key of a layer: its smallest parameter position."""
    return min(item[1].values())


def _layers_of_modules(
    model_func: Callable, params: list[Tensor], positions: list[int]
) -> dict[str, dict[str, int]]:
    """Find the ``Linear`` and ``Conv2d`` modules of parameters the data missed.

    As in curvlinops 3.0.1, such layers get zero factors until data reaches them.

    Args:
        model_func: The model.
        params: The parameters.
        positions: Positions of the parameters no call used.

    Returns:
        Module names mapped to ``{'weight': i, 'bias': j}`` for the parameters
        that are the weight or bias of a ``Linear`` or ``Conv2d`` module.
    """
    if not positions or not isinstance(model_func, Module):
        return {}
    position = {id(params[i]): i for i in positions}
    layers: dict[str, dict[str, int]] = {}
    for name, module in model_func.named_modules():
        if isinstance(module, (Linear, Conv2d)):
            for role in _ROLE_ORDER:
                found = position.get(id(module._parameters.get(role)))
                if found is not None:
                    layers.setdefault(name, {})[role] = found
    return layers


def layers_from_calls(
    calls: list[tuple[str, int | None, int | None]],
    lookups: dict[int, str],
    labels: list[str],
) -> list[dict[str, int]]:
    """Group parameters into layers: weights with the biases they are used with.

    Args:
        calls: ``(operation, weight, bias)`` per call, positions or ``None``.
        lookups: Positions of looked-up parameters mapped to the operation.
        labels: Names of the parameters.

    Returns:
        ``{'weight': i, 'bias': j}`` (the roles present) per layer, ordered by the
        smallest position in it.

    Raises:
        NotImplementedError: If a parameter is a weight and a bias, a weight is
            used with several biases (or with and without), a bias with several
            weights, or a parameter is only looked up.
    """
    partners: dict[str, dict[int, set]] = {"weight": {}, "bias": {}}
    for _, weight, bias in calls:
        if weight is not None:
            partners["weight"].setdefault(weight, set()).add(bias)
        if bias is not None:
            partners["bias"].setdefault(bias, set()).add(weight)
    _check_partners(partners, labels)
    layers = [
        {"weight": w} | ({} if None in bs else {"bias": next(iter(bs))})
        for w, bs in partners["weight"].items()
    ] + [{"bias": b} for b, ws in partners["bias"].items() if ws == {None}]
    for position, operation in lookups.items():
        if position not in partners["weight"]:
            raise NotImplementedError(unsupported_message(operation, labels[position]))
    return sorted(layers, key=lambda layer: min(layer.values()))


def _check_partners(partners: dict[str, dict[int, set]], labels: list[str]):
    """Verify that weights and biases pair up consistently.

    Args:
        partners: Per role, positions mapped to the positions of the partners they
            are used with (``None`` for none or an untracked one).
        labels: Names of the parameters.

    Raises:
        NotImplementedError: If the pairs are inconsistent.
    """
    for position in set(partners["weight"]) & set(partners["bias"]):
        raise NotImplementedError(
            f"Parameter {labels[position]!r} is used both as a weight and as a bias; "
            "KFAC supports only one role per parameter."
        )
    for role, other in [("weight", "bias"), ("bias", "weight")]:
        for position, found in partners[role].items():
            if len(found) > 1 and found != {None}:
                names = sorted("none" if p is None else repr(labels[p]) for p in found)
                raise NotImplementedError(
                    f"The {role} {labels[position]!r} is used with different "
                    f"{_PLURAL[other]}: {', '.join(names)}. KFAC needs every use of "
                    f"a {role} to use the same {other} (or none)."
                )


def layer_names(
    model_func: Callable,
    params: list[Tensor],
    labels: list[str],
    layers: list[dict[str, int]],
) -> list[str]:
    """Name layers after their first parameter (see the module description).

    Args:
        model_func: The model.
        params: The parameters.
        labels: Their names (dictionary keys or qualified names).
        layers: ``{'weight': i, 'bias': j}`` per layer.

    Returns:
        Unique layer names.
    """
    firsts = [next(layer[r] for r in _ROLE_ORDER if r in layer) for layer in layers]
    roles = [next(r for r in _ROLE_ORDER if r in layer) for layer in layers]
    if isinstance(model_func, FunctionalModel) or not isinstance(model_func, Module):
        return [labels[i] for i in firsts]
    names = [
        _module_name(model_func, params[i], role) or labels[i]
        for i, role in zip(firsts, roles)
    ]
    if len(set(names)) < len(names):  # e.g. custom modules: qualified names
        names = [labels[i] for i in firsts]
    return names


def _module_name(model: Module, param: Tensor, role: str) -> str | None:
    """Return the name of a module that holds a parameter as ``role``.

    Args:
        model: The model.
        param: The parameter.
        role: ``'weight'`` or ``'bias'``.

    Returns:
        The module's name, preferring ``Linear`` and ``Conv2d`` modules; ``None``
        if no module holds the parameter under the attribute name ``role``.
    """
    owners = [
        (not isinstance(module, (Linear, Conv2d)), name)
        for name, module in model.named_modules(remove_duplicate=False)
        if module._parameters.get(role) is param
    ]
    return min(owners, key=lambda owner: owner[0])[1] if owners else None
