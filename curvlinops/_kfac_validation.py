"""Checks of a KFAC state dict against an operator, before anything is loaded.

Loading a state into an operator on another architecture must fail without
touching operator or model. These checks compare the state with what the
operator's layers need: the keys, the model's ``state_dict`` (keys, shapes and
dtypes, as ``torch.nn.Module.load_state_dict`` with ``strict=True`` requires),
and the shape of every factor under the hyperparameters being loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, can_cast

from curvlinops._kfac_pass import canonical_groups


def check_state_keys(state_dict: Mapping, required: list[str]):
    """Verify that a state dict is a mapping with all required keys.

    Args:
        state_dict: The state dict to load.
        required: Keys that must be present.

    Raises:
        ValueError: If ``state_dict`` is not a mapping or keys are missing.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"Expected a state dict (a mapping), got {type(state_dict).__name__}."
        )
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"The state dict lacks the keys {missing}.")


def check_model_state(model, state: Mapping):
    """Verify that the model could load ``state``, without loading it.

    Args:
        model: The model: a ``torch.nn.Module``, a functional model with bound
            parameters (:class:`~curvlinops._functional.FunctionalModel`), or a
            callable without state (whose saved state must be empty).
        state: The state to load into it.

    Raises:
        ValueError: If keys differ, or a value is no tensor, has another shape, or
            a dtype that cannot be cast to the model's.
    """
    state_dict = getattr(model, "state_dict", None)
    expected = {} if state_dict is None else state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(
            "The state's model_func_state_dict does not fit the model: missing "
            f"keys {missing}, unexpected keys {unexpected}."
        )
    for key, value in expected.items():
        saved = state[key]
        if not isinstance(saved, Tensor) or saved.shape != value.shape:
            shape = list(saved.shape) if isinstance(saved, Tensor) else saved
            raise ValueError(
                f"The state's model_func_state_dict[{key!r}] is {shape}, the "
                f"model's has shape {list(value.shape)}."
            )
        if not can_cast(saved.dtype, value.dtype):
            raise ValueError(
                f"The state's model_func_state_dict[{key!r}] has dtype "
                f"{saved.dtype}, which cannot be cast to the model's {value.dtype}."
            )


def block_keys(
    mapping: dict[str, dict[str, int]], params: list[Tensor], separate: bool
) -> list[tuple[str, str]]:
    """Return the canonical blocks ``(layer, 'W' | 'b' | 'Wb')`` of a KFAC operator.

    Args:
        mapping: Layer names mapped to their parameters' positions.
        params: The parameters.
        separate: ``separate_weight_and_bias``.

    Returns:
        The block keys, in block order.
    """
    joint = [] if separate else [k for k, roles in mapping.items() if len(roles) == 2]
    return canonical_groups(mapping, params, joint)[0]


def factor_shape(
    mapping: dict[str, dict[str, int]],
    params: list[Tensor],
    layer: str,
    kind: str,
    block: str | None,
    joint: bool,
) -> tuple[int, ...]:
    """Return the shape of a layer's factor.

    Args:
        mapping: Layer names mapped to their parameters' positions.
        params: The parameters.
        layer: The layer's name.
        kind: ``'weights'`` (input-side factors), ``'layers'`` (output-side
            factors) or ``'blocks'`` (eigenvalues of a block).
        block: The block's kind (``'W'``, ``'b'`` or ``'Wb'``) for ``'blocks'``.
        joint: Whether the layer's weight and bias share one block.

    Returns:
        The shape.
    """
    roles = mapping[layer]
    d_out = len(params[roles.get("weight", roles.get("bias"))])
    d_in = (params[roles["weight"]][0].numel() if "weight" in roles else 0) + joint
    if kind == "weights":
        return (d_in, d_in)
    if kind == "layers":
        return (d_out, d_out)
    return (d_out,) if block == "b" else (d_out, d_in)


def check_factor(key: str, name: Any, value, shape: tuple[int, ...]):
    """Verify that a saved factor is a real tensor (or number) of the right shape.

    Args:
        key: The state key, for the error message.
        name: The factor's key (layer or block), for the error message.
        value: The saved factor.
        shape: Its expected shape.

    Raises:
        ValueError: If the factor is not a real floating point tensor of the
            expected shape.
    """
    is_real = isinstance(value, Tensor) and value.is_floating_point()
    if not is_real or tuple(value.shape) != shape:
        found = (
            f"a {value.dtype} tensor of shape {list(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise ValueError(
            f"The state's {key}[{name!r}] is {found}; expected a floating point "
            f"tensor of shape {list(shape)}."
        )


def check_scalar(name: str, value):
    """Verify that a saved matrix function is ``None`` or a single number.

    Args:
        name: Its name, for the error message.
        value: The saved value.

    Raises:
        ValueError: If the value is neither ``None`` nor a single number.
    """
    if value is None:
        return
    number = isinstance(value, (float, int)) and not isinstance(value, bool)
    if not (number or isinstance(value, Tensor) and value.numel() == 1):
        raise ValueError(f"The state's {name} must be a number, got {value!r}.")


def inverted_factors_fit(A, A_inv, G_inv) -> bool:
    """Return whether saved inverted factors fit a KFAC operator's layers and shapes.

    Args:
        A: The KFAC operator.
        A_inv: Saved inverted input covariances by layer name.
        G_inv: Saved inverted gradient covariances by layer name.

    Returns:
        Whether keys and shapes are those of ``A``'s factors.
    """
    for saved, kind in [(A_inv, "weights"), (G_inv, "layers")]:
        if not isinstance(saved, dict) or sorted(saved) != sorted(A._factor_keys(kind)):
            return False
        for layer, value in saved.items():
            joint = A._has_joint_bias(layer)
            shape = factor_shape(A._mapping, A._params, layer, kind, None, joint)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                return False
    return True
