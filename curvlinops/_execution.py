"""How curvature computations run the model, whatever the caller's context.

Products differentiate the model, so they switch autograd on themselves (also inside
``torch.no_grad()`` or ``torch.inference_mode()``) and clone data created in
inference mode. Every computation over model and data runs protected by its
operator (see ``CurvatureLinearOperator._protected``): under a lock that all
operators on one model share, so that threads take turns; with the model's
parameters checked; and with the running statistics of normalization layers in
train mode restored however the computation ends. Helpers built lazily avoid the
lock of Python 3.11's ``functools.cached_property``, which ``torch.compile`` cannot
trace, and are left out of copies and pickles (:func:`copyable_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property, wraps
from threading import Lock, RLock
from weakref import WeakKeyDictionary

from torch import Tensor, enable_grad, inference_mode, no_grad
from torch.compiler import is_compiling
from torch.nn import Module
from torch.nn.modules.batchnorm import _NormBase

from curvlinops._functional import FunctionalModel


def with_autograd(method: Callable) -> Callable:
    """Run an operator's computation protected, with autograd on.

    Curvature products differentiate the model; a caller's ``torch.no_grad()``
    or ``torch.inference_mode()`` would otherwise make them wrong or fail.
    Tensor-list arguments created in inference mode are cloned into normal
    tensors. The computation runs inside the operator's ``_protected()`` context
    (lock, parameter check, restored running statistics, failures shared over
    ranks).

    Args:
        method: A method of a ``CurvatureLinearOperator`` that passes over model
            and data.

    Returns:
        The wrapped method.
    """

    @wraps(method)
    def wrapped(self, *args):
        with self._protected(), inference_mode(False), enable_grad():
            args = [
                [normal_tensor(t) for t in a] if isinstance(a, list) else a
                for a in args
            ]
            return method(self, *args)

    return wrapped


def autograd_enabled(function: Callable) -> Callable:
    """Run a function with autograd on, also inside ``no_grad`` or ``inference_mode``.

    The function counterpart of :func:`with_autograd`, for the per-batch product
    functions that the ``make_batch_*`` builders return. Tensor arguments created
    in inference mode are cloned into normal tensors.

    Args:
        function: A function whose computation needs autograd.

    Returns:
        The wrapped function.
    """

    @wraps(function)
    def wrapped(*args, **kwargs):
        with inference_mode(False), enable_grad():
            args = [normal_tensor(a) if isinstance(a, Tensor) else a for a in args]
            return function(*args, **kwargs)

    return wrapped


def normal_tensor(tensor: Tensor) -> Tensor:
    """Return a tensor that autograd can use: a clone of one from inference mode.

    Args:
        tensor: A tensor.

    Returns:
        The tensor itself, or (if created in inference mode) a normal copy.
    """
    if is_compiling():  # dynamo cannot trace ``is_inference``
        return tensor
    return tensor.clone() if tensor.is_inference() else tensor


@contextmanager
def restored_running_stats(model):
    """Restore the running statistics of normalization layers in train mode.

    Use it in the ``with`` statement of the function that runs the model, not
    inside a generator: an exception in the caller leaves a generator suspended
    (for as long as the traceback lives), and its clean-up with it.

    Args:
        model: The model; anything but a ``torch.nn.Module`` has none.

    Yields:
        Nothing.
    """
    modules = model.modules() if isinstance(model, Module) else []
    layers = [m for m in modules if isinstance(m, _NormBase) and m.training]
    saved = [
        (buffer, buffer.clone())
        for layer in layers
        for buffer in layer.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class lazy_attribute(cached_property):  # noqa: N801 (used like a decorator)
    """:func:`functools.cached_property` without the lock of Python 3.11.

    Python 3.12 dropped that lock; ``torch.compile`` cannot trace it and breaks
    the graph on the first access inside a compiled function.
    """

    def __get__(self, instance, owner=None):
        """Compute the value once and store it on the instance.

        Args:
            instance: The object, or ``None`` for access through the class.
            owner: The class.

        Returns:
            The value (the descriptor itself for access through the class).
        """
        if instance is None:
            return self
        value = self.func(instance)
        instance.__dict__[self.attrname] = value
        return value


# One lock per model, shared by all operators on it: the model's state (parameters
# swapped by ``functional_call``, patched ``forward`` methods, hooks, running
# statistics) must only be touched by one computation at a time.
_MODEL_LOCKS: WeakKeyDictionary = WeakKeyDictionary()
_MODEL_LOCKS_LOCK = Lock()


def parameter_paths(model, params: list[Tensor]) -> list[tuple[int, list[str]]]:
    """Locate the parameters a model holds: the module path and name of each.

    Args:
        model: The model; anything but a ``torch.nn.Module`` holds none.
        params: The operator's parameters.

    Returns:
        Pairs of a position in ``params`` and the parameter's name in the model,
        split at the dots, for the parameters the model holds.
    """
    if not isinstance(model, Module):
        return []
    name_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        name_of.setdefault(id(param), name)
    return [
        (idx, name_of[id(p)].split("."))
        for idx, p in enumerate(params)
        if id(p) in name_of
    ]


def check_parameters_current(
    model, params: list[Tensor], paths: list[tuple[int, list[str]]]
):
    """Verify that the model still holds the parameters where they were.

    ``model.load_state_dict(..., assign=True)`` or assigning a new
    ``torch.nn.Parameter`` (or module) replaces a parameter object; products
    would then differentiate w.r.t. tensors the model no longer uses. Costs a few
    dictionary look-ups per parameter, no computation on the device.

    Args:
        model: The model.
        params: The operator's parameters.
        paths: Their locations in the model, from :func:`parameter_paths`.

    Raises:
        RuntimeError: If the model holds another tensor (or none) at a location.
    """
    for idx, path in paths:
        module = model
        for name in path[:-1]:
            module = module._modules.get(name)
            if module is None:  # the module was removed
                break
        current = None if module is None else module._parameters.get(path[-1])
        if current is not params[idx]:
            raise RuntimeError(
                f"params[{idx}] is no longer the model's parameter "
                f"{'.'.join(path)!r}: it was replaced (e.g. by "
                "`load_state_dict(..., assign=True)` or by assigning a new "
                "`torch.nn.Parameter`), so products would not use the model's "
                "values. Create a new operator with the model's current parameters."
            )


def model_lock(model) -> RLock:
    """Return the reentrant lock of a model, shared by all operators on it.

    Args:
        model: The model (a ``torch.nn.Module`` or any callable). Functional models
            with bound parameters share the lock of their function (which may,
            e.g., swap a module's parameters with ``functional_call``).

    Returns:
        The model's lock; a new one if the model cannot be referenced weakly.
    """
    if isinstance(model, FunctionalModel):
        model = model.model_func
    with _MODEL_LOCKS_LOCK:
        try:
            return _MODEL_LOCKS.setdefault(model, RLock())
        except TypeError:  # not weakly referenceable or not hashable
            return RLock()


def copyable_state(obj) -> dict:
    """Return an object's attributes without those rebuilt after copying.

    Left out are the values of :class:`lazy_attribute` helpers (rebuilt on use:
    they may hold closures over the original model) and the names listed in the
    ``_TRANSIENT`` class attributes along the class hierarchy (locks, weak
    references, scratch state of a running computation).

    Args:
        obj: The object to copy or pickle.

    Returns:
        A shallow copy of its ``__dict__`` without the transient attributes.
    """
    dropped = set(transient_names(type(obj)))
    dropped |= {
        name
        for cls in type(obj).__mro__
        for name, value in vars(cls).items()
        if isinstance(value, lazy_attribute)
    }
    return {k: v for k, v in obj.__dict__.items() if k not in dropped}


def transient_names(cls: type) -> list[str]:
    """Collect the names in the ``_TRANSIENT`` class attributes of a class hierarchy.

    Args:
        cls: The class.

    Returns:
        The names, from all classes that define ``_TRANSIENT``.
    """
    return [name for c in cls.__mro__ for name in vars(c).get("_TRANSIENT", ())]
