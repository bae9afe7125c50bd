"""Saving and loading the state of KFAC-type operators, in curvlinops 3.x's layout.

The state holds the model's ``state_dict``, the loss's type and reduction, the
hyperparameters, ``num_data``, the factors (dictionaries keyed by layer name) and the
cached matrix functions, so that an operator can be saved with ``torch.save`` and
rebuilt without another pass over the data. Keys and value types are those of
curvlinops 3.0.1, so state dicts travel both ways between the two libraries:

- ``model_func_state_dict``, ``loss_type`` (e.g. ``'MSELoss'``), ``loss_reduction``,
  ``progressbar``, ``seed``, ``fisher_type`` (a ``str``), ``mc_samples``,
  ``kfac_approx`` (a :class:`~curvlinops.kfac.KFACType`),
  ``num_per_example_loss_terms`` (as seen in the data), ``separate_weight_and_bias``,
  ``num_data``;
- ``input_covariances``, ``gradient_covariances``: ``{layer: factor}``;
- ``trace``, ``det``, ``logdet``, ``frobenius_norm``: cached values or ``None``;
- subclasses' factors after these (EKFAC: eigenvectors by layer,
  ``cached_activations`` and the corrected eigenvalues by layer, a tensor for a
  joint weight-and-bias block, else ``{'weight': ..., 'bias': ...}``).

One key is ours: ``loss_average``, written only if the operator was built with an
explicit ``loss_average`` (a scaling that 3.0.1 cannot express). Without it, the
scaling follows the loss's reduction, as in 3.0.1. Empty factor dictionaries mean
"not computed yet": the operator then computes its factors when first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from torch import Tensor, as_tensor
from torch.nn import Module

from curvlinops._checks import is_integer
from curvlinops._functional import bind_params
from curvlinops._kfac_pass import check_kfac_arguments
from curvlinops._kfac_structured import MATRIX_FUNCTIONS
from curvlinops._kfac_validation import (
    block_keys,
    check_factor,
    check_model_state,
    check_scalar,
    check_state_keys,
    factor_shape,
)
from curvlinops._losses import SUPPORTED_LOSSES

_HYPERPARAMETERS = (
    "seed",
    "fisher_type",
    "mc_samples",
    "kfac_approx",
    "num_per_example_loss_terms",
    "separate_weight_and_bias",
)
_BLOCK_ROLES = {"W": "weight", "b": "bias"}


class _KFACStateMixin:
    """Saving and loading for KFAC-type operators.

    The operator class lists its factors in ``_FACTOR_STATE`` (saved before the
    matrix functions) and ``_EXTRA_STATE`` (after them): state key mapped to
    ``(attribute name, kind)``, the kind as in :meth:`_factor_keys`, or
    ``'empty'`` for an entry that is always saved empty and ignored when loading.
    It provides ``_ensure_factors``, ``_set_hyperparameters``,
    ``_setup_canonical_form``, ``_mapping``, ``_block_keys`` and
    ``_SUPPORTED_FISHER_TYPE``, ``_SUPPORTED_KFAC_APPROX``.

    Attributes:
        _FACTOR_STATE: KFAC's two factors.
        _EXTRA_STATE: Further factors of a subclass, empty by default.
    """

    _FACTOR_STATE: dict[str, tuple[str, str]] = {
        "input_covariances": ("_input_covariances", "weights"),
        "gradient_covariances": ("_gradient_covariances", "layers"),
    }
    _EXTRA_STATE: dict[str, tuple[str, str]] = {}

    def _factor_keys(self, kind: str) -> list:
        """Return the expected keys of a factor dictionary.

        Args:
            kind: ``'weights'`` (layers whose weight is a parameter), ``'layers'``
                (all layers with parameters) or ``'blocks'`` (layers, with the
                canonical blocks inside).

        Returns:
            The keys.
        """
        return [
            k
            for k, roles in self._mapping.items()
            if kind != "weights" or "weight" in roles
        ]

    def state_dict(self) -> dict[str, Any]:
        """Return model state, loss, hyperparameters and factors for saving.

        The layout is that of curvlinops 3.0.1 (see :mod:`curvlinops._kfac_state`).
        Computes the factors if they are not cached.

        Returns:
            A dictionary for :meth:`load_state_dict` and :meth:`from_state_dict`
            (and ``torch.save``).
        """
        self._ensure_factors()
        state = {
            "model_func_state_dict": _model_state(self._model_func),
            "loss_type": type(self._loss_func).__name__,
            "loss_reduction": self._loss_func.reduction,
            "progressbar": self._progressbar,
            "seed": self._seed,
            "fisher_type": self._fisher_type.value,
            "mc_samples": self._mc_samples,
            "kfac_approx": self._kfac_approx,
            "num_per_example_loss_terms": self._observed_terms_per_datum(),
            "separate_weight_and_bias": self._separate_weight_and_bias,
            "num_data": self._num_data,
        }
        state |= self._save_factors(self._FACTOR_STATE)
        state |= {name: getattr(self, f"_{name}") for name in MATRIX_FUNCTIONS}
        state |= self._save_factors(self._EXTRA_STATE)
        if self._loss_average is not None:
            state["loss_average"] = self._loss_average
        return state

    def _save_factors(self, entries: dict[str, tuple[str, str]]) -> dict[str, Any]:
        """Return factor dictionaries in the saved layout.

        Args:
            entries: State keys mapped to attribute name and kind.

        Returns:
            The state entries.
        """
        saved = {}
        for key, (attribute, kind) in entries.items():
            if kind == "empty":
                saved[key] = {}
            elif kind == "blocks":
                saved[key] = _blocks_to_layers(getattr(self, attribute))
            else:
                saved[key] = dict(getattr(self, attribute))
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]):
        """Load model state, hyperparameters and factors from a state dict.

        Accepts the state dicts of :meth:`state_dict` and of curvlinops 3.0.1.
        Everything is checked before anything is loaded: if the state does not fit
        (another loss, architecture or layers), neither the operator nor the
        model changes.

        Args:
            state_dict: The dictionary to load.

        Raises:
            ValueError: If keys are missing, or the loss function, the
                hyperparameters, the model's state or the factors do not fit.
        """
        with self._lock:
            hyperparameters, factors, functions = self._checked_state(state_dict)
            saved = dict(self.__dict__)
            try:
                _load_model_state(self._model_func, state_dict["model_func_state_dict"])
                self._set_hyperparameters(hyperparameters)
                self._progressbar = state_dict.get("progressbar", self._progressbar)
                self._num_data = state_dict["num_data"]
                self._setup_canonical_form()
                if factors is None:
                    return  # not computed when saved: compute when first needed
                for name, value in (factors | functions).items():
                    setattr(self, name, value)
                self._factors_ready = True
            except BaseException:
                self.__dict__.clear()
                self.__dict__.update(saved)
                raise

    def _checked_state(self, state_dict: dict[str, Any]) -> tuple[dict, dict, dict]:
        """Check a state dict against the operator and convert its factors.

        Args:
            state_dict: The dictionary to load.

        Returns:
            The hyperparameters; the factors by attribute name, on the operator's
            device and dtype (``None`` if they were not computed when saved); the
            cached matrix functions by attribute name.

        Raises:
            ValueError: If keys are missing, or the loss function, the
                hyperparameters, the model's state, ``num_data`` or the factors do
                not fit.
        """
        entries = self._FACTOR_STATE | self._EXTRA_STATE
        fixed = ["model_func_state_dict", "loss_type", "loss_reduction", "num_data"]
        check_state_keys(state_dict, [*fixed, *_HYPERPARAMETERS, *entries])
        loss = (state_dict["loss_type"], state_dict["loss_reduction"])
        if loss != (type(self._loss_func).__name__, self._loss_func.reduction):
            raise ValueError(
                f"The state is for {loss[0]}(reduction={loss[1]!r}), but the "
                f"operator's loss is {self._loss_func!r}."
            )
        hyperparameters = _hyperparameters(state_dict)
        check_kfac_arguments(self._loss_func, hyperparameters, self._supported())
        check_model_state(self._model_func, state_dict["model_func_state_dict"])
        num_data = state_dict["num_data"]
        if not is_integer(num_data) or num_data < 1:
            raise ValueError(
                f"The state's num_data must be a positive integer, got {num_data!r}."
            )
        separate = hyperparameters["separate_weight_and_bias"]
        factors = {
            attribute: self._load_factors(key, kind, state_dict[key], separate)
            for key, (attribute, kind) in entries.items()
            if kind != "empty"
        }
        if any(value is None for value in factors.values()):
            return hyperparameters, None, {}
        functions = {}
        for name in MATRIX_FUNCTIONS:
            value = state_dict.get(name)
            check_scalar(name, value)
            functions[f"_{name}"] = (
                None if value is None else self._to_operator(value).reshape(())
            )
        return hyperparameters, factors, functions

    def _load_factors(
        self, key: str, kind: str, factors: dict, separate: bool
    ) -> dict | None:
        """Check a saved factor dictionary and move it to the operator.

        Args:
            key: The state key, for error messages.
            kind: The kind of keys, as in :meth:`_factor_keys`.
            factors: The saved dictionary.
            separate: The loaded ``separate_weight_and_bias``.

        Returns:
            The factors on the operator's device and dtype (keyed by block for
            ``'blocks'``), or ``None`` if the dictionary is empty but should not be.

        Raises:
            ValueError: If the dictionary's keys or a factor's shape are not the
                expected ones.
        """
        expected = self._factor_keys(kind)
        if not isinstance(factors, dict):
            raise ValueError(f"The state's {key} must be a dict, got {factors!r}.")
        if not factors and expected:
            return None
        if sorted(map(str, factors)) != sorted(map(str, expected)):
            raise ValueError(
                f"The state's {key} are for {list(factors)}, expected {expected}."
            )
        blocks = block_keys(self._mapping, self._params, separate)
        if kind == "blocks":
            factors = _layers_to_blocks(factors, blocks, key)
        joint = {layer for layer, block in blocks if block == "Wb"}
        for name, value in factors.items():
            layer, block = name if kind == "blocks" else (name, None)
            shape = factor_shape(
                self._mapping, self._params, layer, kind, block, layer in joint
            )
            check_factor(key, name, value, shape)
        return {k: self._to_operator(v) for k, v in factors.items()}

    def _to_operator(self, value: Tensor | float) -> Tensor:
        """Move a saved tensor (or number) to the operator's device and dtype.

        Args:
            value: The tensor or number.

        Returns:
            The tensor on the operator's device, with its dtype.
        """
        return as_tensor(value, device=self.device, dtype=self.dtype)

    def _supported(self) -> dict[str, tuple]:
        """Return the allowed values of ``fisher_type`` and ``kfac_approx``.

        Returns:
            Argument names mapped to allowed values.
        """
        return {
            "fisher_type": tuple(self._SUPPORTED_FISHER_TYPE),
            "kfac_approx": tuple(self._SUPPORTED_KFAC_APPROX),
        }

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Any],
        model_func: Module,
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        check_deterministic: bool = True,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        *,
        process_group=None,
    ):
        """Create an operator from a state dict, without computing its factors.

        The loss function is rebuilt from ``loss_type`` and ``loss_reduction``, the
        model's parameters are loaded from the state (after the operator was built
        and the state checked, so that a failure leaves the model unchanged).

        Args:
            state_dict: A state dict of :meth:`state_dict` or of curvlinops 3.0.1.
            model_func: The neural network, or ``model_func(params, X)`` for a
                parameter dictionary (whose values the state then holds).
            params: The parameters, a list or a dictionary.
            data: The data.
            check_deterministic: Check at construction that model and data are
                deterministic (computes the factors twice, for the model's current
                state, before loading the saved ones).
            batch_size_fn: Batch size of a ``MutableMapping`` input.
            process_group: See the constructor.

        Returns:
            The operator with the loaded state.

        Raises:
            ValueError: If the state's loss is not supported or the state does not
                fit the model.
        """
        required = ["model_func_state_dict", "loss_type", "loss_reduction", "num_data"]
        check_state_keys(state_dict, [*required, *_HYPERPARAMETERS])
        check_model_state(
            bind_params(model_func, params)[0], state_dict["model_func_state_dict"]
        )
        losses = {loss.__name__: loss for loss in SUPPORTED_LOSSES}
        if state_dict["loss_type"] not in losses:
            raise ValueError(
                f"The state's loss {state_dict['loss_type']!r} is not one of "
                f"{list(losses)}."
            )
        loss_func = losses[state_dict["loss_type"]](
            reduction=state_dict["loss_reduction"]
        )
        hyperparameters = _hyperparameters(state_dict)
        operator = cls(
            model_func,
            loss_func,
            params,
            data,
            progressbar=state_dict.get("progressbar", False),
            check_deterministic=check_deterministic,
            num_data=state_dict["num_data"],
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            **hyperparameters,
        )
        operator.load_state_dict(state_dict)
        return operator


def _model_state(model_func) -> dict[str, Any]:
    """Return the model's state: a module's (or functional model's) state dict.

    Args:
        model_func: The model.

    Returns:
        Its ``state_dict()``; empty for callables without one.
    """
    state_dict = getattr(model_func, "state_dict", None)
    return {} if state_dict is None else state_dict()


def _load_model_state(model_func, state: dict[str, Any]):
    """Load a saved model state into a model.

    Args:
        model_func: The model.
        state: The state of :func:`_model_state`.

    Raises:
        ValueError: If a non-empty state is given for a callable without
            ``load_state_dict``.
    """
    load = getattr(model_func, "load_state_dict", None)
    if load is not None:
        load(state)
    elif state:
        raise ValueError(
            f"The state holds model parameters, but {model_func!r} has no "
            "`load_state_dict`."
        )


def _hyperparameters(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Read the constructor's hyperparameters from a state dict.

    Args:
        state_dict: The state dict.

    Returns:
        The hyperparameters by argument name.
    """
    hyperparameters = {name: state_dict[name] for name in _HYPERPARAMETERS}
    hyperparameters["loss_average"] = state_dict.get("loss_average")
    return hyperparameters


def _blocks_to_layers(values: dict[tuple[str, str], Tensor]) -> dict[str, Any]:
    """Re-key per-block values by layer, as curvlinops 3.0.1 saves them.

    Args:
        values: Values keyed by ``(layer, 'W' | 'b' | 'Wb')``.

    Returns:
        ``{layer: value}`` for joint weight-and-bias blocks, else
        ``{layer: {'weight': value, 'bias': value}}`` (the roles present).
    """
    layers: dict[str, Any] = {}
    for (layer, kind), value in values.items():
        if kind == "Wb":
            layers[layer] = value
        else:
            layers.setdefault(layer, {})[_BLOCK_ROLES[kind]] = value
    return layers


def _layers_to_blocks(
    layers: dict[str, Any], block_keys: list[tuple[str, str]], key: str
) -> dict[tuple[str, str], Tensor]:
    """Undo :func:`_blocks_to_layers` for the operator's blocks.

    Args:
        layers: Values keyed by layer, as saved.
        block_keys: The operator's blocks ``(layer, kind)``.
        key: The state key, for error messages.

    Returns:
        Values keyed by block.

    Raises:
        ValueError: If the saved values do not have the operator's blocks.
    """
    values = {}
    for layer, kind in block_keys:
        saved = layers[layer]
        joint = isinstance(saved, Tensor)
        if joint != (kind == "Wb") or not (joint or _BLOCK_ROLES[kind] in saved):
            raise ValueError(
                f"The state's {key}[{layer!r}] does not hold the block {kind!r} "
                "(is `separate_weight_and_bias` the same?)."
            )
        values[(layer, kind)] = saved if joint else saved[_BLOCK_ROLES[kind]]
    return values
