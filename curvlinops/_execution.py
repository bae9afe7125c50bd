"""How curvature computations run the model, whatever the caller's context.

Products differentiate the model, so they switch autograd on themselves (also inside
``torch.no_grad()`` or ``torch.inference_mode()``) and clone data created in
inference mode; normalization layers in train mode get their running statistics
back after every pass; and helpers built lazily avoid the lock of Python 3.11's
``functools.cached_property``, which ``torch.compile`` cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property, wraps

from torch import Tensor, enable_grad, inference_mode, no_grad
from torch.compiler import is_compiling
from torch.nn import Module
from torch.nn.modules.batchnorm import _NormBase


def with_autograd(method: Callable) -> Callable:
    """Run a method with autograd on, also inside ``no_grad`` or ``inference_mode``.

    Curvature products differentiate the model; a caller's ``torch.no_grad()``
    would otherwise make them wrong or fail. Tensor-list arguments created in
    inference mode are cloned into normal tensors.

    Args:
        method: A method whose computation needs autograd.

    Returns:
        The wrapped method.
    """

    @wraps(method)
    def wrapped(self, *args):
        with inference_mode(False), enable_grad():
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
