"""Saving and loading the state of KFAC-type operators (``state_dict`` and back).

The state holds the model's ``state_dict``, the loss's type and reduction, the
hyperparameters, ``num_data`` and the cached factors, so an operator can be saved
with ``torch.save`` and rebuilt without another pass over the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.nn import Module

from curvlinops._kfac_pass import check_kfac_arguments

_HYPERPARAMETERS = (
    "seed",
    "fisher_type",
    "mc_samples",
    "kfac_approx",
    "loss_average",
    "num_per_example_loss_terms",
    "separate_weight_and_bias",
)


class _KFACStateMixin:
    """Saving and loading for KFAC-type operators.

    The operator class lists the factors to save in ``_FACTOR_STATE``: state key
    mapped to ``(attribute name, key kind)``, the kind as in :meth:`_factor_keys`.
    It provides ``_ensure_factors``, ``_set_hyperparameters``,
    ``_setup_canonical_form``, ``_mapping`` and ``_block_keys``.

    Attributes:
        _FACTOR_STATE: What to save, empty by default.
    """

    _FACTOR_STATE: dict[str, tuple[str, str]] = {}

    def _factor_keys(self, kind: str) -> list:
        """Return the expected keys of a factor dictionary.

        Args:
            kind: ``'weights'`` (layers whose weight is a parameter), ``'layers'``
                (all layers with parameters) or ``'blocks'`` (canonical blocks).

        Returns:
            The keys.
        """
        if kind == "blocks":
            return list(self._block_keys)
        return [k for k, r in self._mapping.items() if kind == "layers" or "W" in r]

    def state_dict(self) -> dict[str, Any]:
        """Return model state, loss, hyperparameters and factors for saving.

        Computes the factors if they are not cached.

        Returns:
            A dictionary for :meth:`load_state_dict` (and ``torch.save``).
        """
        self._ensure_factors()
        state = {name: getattr(self, f"_{name}") for name in _HYPERPARAMETERS}
        for name in ("fisher_type", "kfac_approx"):
            state[name] = state[name].value
        for key, (attribute, _) in self._FACTOR_STATE.items():
            state[key] = dict(getattr(self, attribute))
        return {
            "model_func_state_dict": self._model_func.state_dict(),
            "loss_type": type(self._loss_func).__name__,
            "loss_reduction": self._loss_func.reduction,
            "num_data": self._num_data,
            **state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]):
        """Load model state, hyperparameters and factors from :meth:`state_dict`.

        Args:
            state_dict: The dictionary to load.

        Raises:
            ValueError: If the loss function or the layers do not match.
        """
        loss = (state_dict["loss_type"], state_dict["loss_reduction"])
        if loss != (type(self._loss_func).__name__, self._loss_func.reduction):
            raise ValueError(
                f"The state is for {loss[0]}(reduction={loss[1]!r}), but the "
                f"operator's loss is {self._loss_func!r}."
            )
        hyperparameters = {name: state_dict[name] for name in _HYPERPARAMETERS}
        check_kfac_arguments(self._loss_func, hyperparameters)
        self._model_func.load_state_dict(state_dict["model_func_state_dict"])
        self._set_hyperparameters(hyperparameters)
        self._num_data = state_dict["num_data"]
        self._setup_canonical_form()
        for key, (attribute, kind) in self._FACTOR_STATE.items():
            factors, expected = state_dict[key], self._factor_keys(kind)
            if sorted(map(str, factors)) != sorted(map(str, expected)):
                raise ValueError(
                    f"The state's {key} are for {list(factors)}, expected {expected}."
                )
            loaded = {k: v.to(self.device, self.dtype) for k, v in factors.items()}
            setattr(self, attribute, loaded)
        self._factors_ready = True

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Any], model_func: Module, loss_func: Module,
        params: list[Tensor], data: Iterable, **kwargs,
    ):  # fmt: skip
        """Create an operator from :meth:`state_dict` without computing factors.

        Args:
            state_dict: The dictionary to load.
            model_func: The neural network.
            loss_func: The loss function.
            params: The parameters.
            data: The data.
            **kwargs: Further constructor arguments, e.g. ``batch_size_fn``.

        Returns:
            The operator with the loaded state.
        """
        kwargs = {"check_deterministic": False, **kwargs}
        kwargs.setdefault("num_data", state_dict["num_data"])
        operator = cls(model_func, loss_func, params, data, **kwargs)
        operator.load_state_dict(state_dict)
        return operator
