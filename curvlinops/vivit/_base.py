"""Shared machinery of the ViViT computations: parameter groups, hook, results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from numbers import Real

from backpack import memory_cleanup
from torch import Tensor
from torch._C import _current_graph_task_id
from torch.autograd import Variable
from torch.nn import Module

from curvlinops._checks import is_integer
from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor
from curvlinops.vivit._sqrt_ggn import SqrtGGN

_INSTANCES = count()


def check_subsampling(subsampling: list[int] | None, name: str):
    """Verify sub-sampling indices.

    Args:
        subsampling: Indices of the active samples, or ``None`` (all samples).
        name: Argument name for the error message.

    Raises:
        ValueError: If ``subsampling`` is not ``None`` or a non-empty list of
            non-negative integers.
    """
    if subsampling is None:
        return
    if (
        not isinstance(subsampling, (list, tuple))
        or len(subsampling) == 0
        or any(not is_integer(i) or i < 0 for i in subsampling)
    ):
        raise ValueError(
            f"`{name}` must be None or a non-empty list of sample indices, got "
            f"{subsampling!r}."
        )


def check_non_negative(value, name: str, kind: type):
    """Verify that a hyperparameter is a non-negative number of a given type.

    Args:
        value: The hyperparameter.
        name: Its name for the error message.
        kind: The expected type (``int`` or ``float``).

    Raises:
        ValueError: If ``value`` has the wrong type or is negative.
    """
    number = is_integer(value) if kind is int else isinstance(value, Real)
    if isinstance(value, bool) or not number or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative {kind.__name__}, got {value!r}."
        )


@dataclass
class _BackwardPass:
    """What a hook knows about the backward pass it runs in.

    Attributes:
        task: Autograd's id of the backward pass, ``None`` before the first one.
        error: The error of a group's computation, raised when the pass ends.
    """

    task: int | None = None
    error: Exception | None = None


class ViViTComputation:
    """Base class: builds the extension hook and stores results per parameter group.

    Subclasses set ``_GROUP_KEYS`` (callables every group must provide besides
    ``'params'``), ``_NEEDS_GRADIENTS`` (whether they also use per-sample
    gradients), ``_RESULTS`` (names of the attributes that hold the results, dicts
    keyed by ``id(group)``), and implement :meth:`_compute`. Each instance stores
    its quantities on the parameters under its own attribute names, so that several
    computations can share one backward pass (a copy or unpickled instance gets
    names of its own).

    A hook computes the results of one backward pass at a time; each backward pass
    starts afresh. If a group's computation fails (e.g. its ``criterion`` raises),
    the results of the pass are discarded and the rest of the pass only cleans up
    (BackPACK's stored inputs and outputs on the modules, the quantities on the
    parameters); the error is raised when the backward pass ends. Interrupts
    (``KeyboardInterrupt``) are raised at once, after the same clean-up of the
    parameters and of the current module.
    """

    _GROUP_KEYS: tuple[str, ...] = ()
    _NEEDS_GRADIENTS: bool = False
    _RESULTS: tuple[str, ...] = ()

    def __init__(self, subsampling_ggn: list[int] | None, mc_samples: int, verbose):
        """Store and verify the GGN approximation shared by all computations.

        Args:
            subsampling_ggn: Indices of the samples in the GGN, ``None`` for all.
            mc_samples: ``0`` (exact GGN) or number of Monte-Carlo samples.
            verbose: Whether to print progress during backpropagation.
        """
        check_subsampling(subsampling_ggn, "subsampling")
        check_non_negative(mc_samples, "mc_samples", int)
        self._subsampling_ggn = subsampling_ggn
        self._mc_samples = int(mc_samples)
        self._verbose = verbose
        self._name_fields()
        self._clear_results()

    def _name_fields(self):
        """Choose the attribute names, unique to this instance, for the parameters."""
        uid = next(_INSTANCES)
        self._factor_field = f"_vivit_factor_{uid}"
        self._gradient_field = f"_vivit_gradients_{uid}"
        self._fields = [self._factor_field]
        if self._NEEDS_GRADIENTS:
            self._fields.append(self._gradient_field)

    def __setstate__(self, state: dict):
        """Restore a copied or unpickled instance, with attribute names of its own.

        Args:
            state: The instance's attributes.
        """
        self.__dict__.update(state)
        self._name_fields()

    def _clear_results(self):
        """Forget the results of all groups."""
        for name in self._RESULTS:
            setattr(self, name, {})

    def _sqrt_ggn_extension(self) -> SqrtGGN:
        """Create the extension that computes the GGN's symmetric factor.

        Returns:
            The extension.
        """
        return SqrtGGN(self._factor_field, self._mc_samples, self._subsampling_ggn)

    def get_extension_hook(self, param_groups: list[dict]) -> Callable[[Module], None]:
        """Create the hook that runs the computation for each parameter group.

        Args:
            param_groups: Parameter groups, see the subclass documentation.

        Returns:
            Hook to pass as ``extension_hook`` to :class:`backpack.backpack`.
        """
        self._check_param_groups(param_groups)
        group_of = {id(p): g for g in param_groups for p in g["params"]}
        group_params = [p for g in param_groups for p in g["params"]]
        self._clear_results()
        self._free(group_params)  # leftovers of an interrupted backward pass
        backward = _BackwardPass()

        def hook(module: Module):
            task = _current_graph_task_id()
            if task != backward.task:  # a new backward pass starts afresh
                self._start(backward, task, group_params)
            try:
                if backward.error is None:
                    self._visit(module, group_of)
            except Exception as error:
                self._abandon(group_params, module)
                if task == -1:  # called outside a backward pass
                    raise
                backward.error = error
            except BaseException:
                self._abandon(group_params, module)
                memory_cleanup(module)
                raise
            finally:
                if backward.error is not None:
                    self._free(list(module.parameters(recurse=False)))

        return hook

    def _start(self, backward: _BackwardPass, task: int, params: list[Tensor]):
        """Begin a backward pass: forget earlier results and leftovers.

        At the end of the pass, quantities on the parameters of groups that did not
        complete are freed, and a group's error is raised.

        Args:
            backward: The hook's record of the pass.
            task: Autograd's id of the pass (``-1`` outside a backward pass).
            params: The parameters of all groups.
        """
        backward.task, backward.error = task, None
        self._clear_results()
        self._free(params)

        def finish():
            self._free(params)
            error, backward.task, backward.error = backward.error, None, None
            if error is not None:
                raise error

        if task != -1:
            Variable._execution_engine.queue_callback(finish)

    def _visit(self, module: Module, group_of: dict[int, dict]):
        """Compute the groups that a module's parameters complete; free the others.

        Args:
            module: The module BackPACK just processed.
            group_of: Parameter ids mapped to their groups.
        """
        for param in module.parameters(recurse=False):
            group = group_of.get(id(param))
            if group is None:
                self._free([param])
            elif self._ready(group):
                self._run(group, module)

    def _abandon(self, params: list[Tensor], module: Module):
        """Discard all results and the quantities on the parameters after an error.

        Args:
            params: The parameters of all groups.
            module: The module being processed.
        """
        self._clear_results()
        self._free([*params, *module.parameters(recurse=False)])

    def _ready(self, group: dict) -> bool:
        """Return whether all quantities of a not yet computed group are available.

        Args:
            group: The parameter group.

        Returns:
            Whether the group can be computed.
        """
        done = id(group) in getattr(self, self._RESULTS[0])
        return not done and all(
            hasattr(p, field) for p in group["params"] for field in self._fields
        )

    def _run(self, group: dict, module: Module):
        """Compute and store the results of a group, then free the inputs.

        Args:
            group: The parameter group.
            module: The layer that completed the group; its input holds the batch
                size.
        """
        if self._verbose:
            sizes = [tuple(p.shape) for p in group["params"]]
            print(f"ViViT: {module.__class__.__name__} completes group {sizes}.")
        params = group["params"]
        factors = [getattr(p, self._factor_field) for p in params]
        gradients = (
            [getattr(p, self._gradient_field) for p in params]
            if self._NEEDS_GRADIENTS
            else None
        )
        results = self._compute(group, factors, gradients, module.input0.shape[0])
        for name, result in zip(self._RESULTS, results):
            getattr(self, name)[id(group)] = result
        self._free(group["params"])

    def _free(self, params: list[Tensor]):
        """Delete the quantities that the extensions stored on parameters.

        Args:
            params: The parameters.
        """
        for p in params:
            for field in self._fields:
                if hasattr(p, field):
                    delattr(p, field)

    def _compute(
        self,
        group: dict,
        factors: list[DenseFactor | LinearWeightFactor],
        gradients: list[Tensor] | None,
        batch_size: int,
    ) -> tuple:
        """Compute the results of a group.

        Args:
            group: The parameter group.
            factors: The GGN factor of each parameter in the group.
            gradients: BackPACK's per-sample gradients of each parameter (those of
                ``loss_n / N``), ``None`` unless ``_NEEDS_GRADIENTS``.
            batch_size: Size of the mini-batch.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError

    def _lookup(self, group: dict) -> tuple:
        """Return the stored results of a group.

        Args:
            group: The parameter group (the same ``dict`` passed to the hook).

        Returns:
            The results, in the order of ``_RESULTS``.

        Raises:
            KeyError: If the group has no results.
        """
        if id(group) not in getattr(self, self._RESULTS[0]):
            raise KeyError(
                "No results for this parameter group. Pass the same dict to "
                "`get_extension_hook` and run the backward pass inside `backpack(...)` "
                "first."
            )
        return tuple(getattr(self, name)[id(group)] for name in self._RESULTS)

    def _check_param_groups(self, param_groups: list[dict]):
        """Verify parameter groups: parameters, required callables, no overlaps.

        Args:
            param_groups: The parameter groups.

        Raises:
            ValueError: If ``param_groups`` is not a non-empty list, or groups share
                parameters.
        """
        if not isinstance(param_groups, (list, tuple)) or len(param_groups) == 0:
            raise ValueError(
                f"`param_groups` must be a non-empty list of dicts, got "
                f"{param_groups!r}."
            )
        seen = set()
        for idx, group in enumerate(param_groups):
            self._check_group(idx, group)
            ids = {id(p) for p in group["params"]}
            if seen & ids:
                raise ValueError(
                    f"param_groups[{idx}] shares parameters with an earlier group."
                )
            seen |= ids

    def _check_group(self, idx: int, group: dict):
        """Verify one parameter group.

        Args:
            idx: Position of the group.
            group: The group.

        Raises:
            ValueError: If the group has no non-empty list of tensors that require
                gradients under ``'params'``, or lacks a required callable.
        """
        params = group.get("params") if isinstance(group, dict) else None
        if (
            not isinstance(params, (list, tuple))
            or len(params) == 0
            or any(not isinstance(p, Tensor) for p in params)
        ):
            raise ValueError(
                f"param_groups[{idx}] must be a dict whose 'params' is a non-empty "
                "list of tensors."
            )
        if not all(p.requires_grad for p in params):
            raise ValueError(
                f"The parameters of param_groups[{idx}] must require gradients."
            )
        for key in self._GROUP_KEYS:
            if not callable(group.get(key)):
                raise ValueError(
                    f"param_groups[{idx}] needs a callable under {key!r}, see the "
                    f"documentation of {type(self).__name__}."
                )
