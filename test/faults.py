"""Fault injection and model-state snapshots for the fault-tolerance tests.

:func:`model_state` records everything a computation on a model might leave
changed (parameter objects and values, gradients, flags, buffers, hooks, extra
attributes on modules and parameters); :func:`assert_same_state` compares two
records bit by bit. :class:`FaultyData` and :class:`Faulty` raise an error at a
chosen batch or call, :class:`Rendezvous` holds a thread inside the forward pass
until a second one arrives, so that races happen deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Event, Lock

from torch import Tensor, equal
from torch.autograd import forward_ad
from torch.nn import Module
from torch.nn.modules import module as module_globals

INJECTED = "injected fault"


@dataclass
class _TensorState:
    """A tensor's identity, value, flags, gradient and Python attributes."""

    tensor: Tensor
    value: Tensor
    requires_grad: bool
    grad: Tensor | None
    attributes: list[str]


def _tensor_state(tensor: Tensor | None) -> _TensorState | None:
    if tensor is None:
        return None
    grad = None if tensor.grad is None else tensor.grad.detach().clone()
    return _TensorState(
        tensor,
        tensor.detach().clone(),
        tensor.requires_grad,
        grad,
        sorted(vars(tensor)),
    )


def model_state(model: Module) -> dict:
    """Record a model's state: parameters, gradients, buffers, flags, hooks, attributes.

    Args:
        model: The model.

    Returns:
        A record for :func:`assert_same_state`.
    """
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):
        state[name, "attributes"] = sorted(vars(module))
        state[name, "training"] = module.training
        for attribute, value in vars(module).items():
            if "hooks" in attribute and isinstance(value, dict):
                state[name, attribute] = list(value.items())
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                state[name, kind, key] = _tensor_state(tensor)
    for attribute, value in vars(module_globals).items():
        if attribute.startswith("_global") and isinstance(value, dict):
            state["global", attribute] = list(value.items())
    return state


def assert_same_state(before: dict, after: dict):
    """Assert that two records of :func:`model_state` agree bit by bit.

    Args:
        before: The first record.
        after: The second record.
    """
    assert before.keys() == after.keys(), before.keys() ^ after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, _TensorState):
            assert new is not None, key
            assert new.tensor is old.tensor, f"{key}: replaced"
            assert new.value.dtype == old.value.dtype, key
            assert equal(new.value, old.value), f"{key}: value changed"
            assert new.requires_grad == old.requires_grad, key
            assert new.attributes == old.attributes, key
            assert (new.grad is None) == (old.grad is None), f"{key}: grad"
            assert old.grad is None or equal(new.grad, old.grad), f"{key}: grad"
        else:
            assert new == old, key
    assert_forward_ad_usable()


def assert_forward_ad_usable():
    """Assert that no forward-mode AD level leaked (a new one can be entered)."""
    with forward_ad.dual_level():
        pass


class FaultyData:
    """Mini-batches that raise an error once, at a chosen batch after arming.

    Args:
        batches: The mini-batches.
        error: The exception to raise.
    """

    def __init__(self, batches: list, error: BaseException | None = None):
        self.batches = batches
        self.error = RuntimeError(INJECTED) if error is None else error
        self.countdown = None
        self.passes = 0

    def arm(self, at: int = 1) -> FaultyData:
        """Raise at the ``at``-th batch (from 0) drawn from now on, once."""
        self.countdown = at
        return self

    def __iter__(self):
        self.passes += 1
        for batch in self.batches:
            if self.countdown == 0:
                self.countdown = None
                raise self.error
            if self.countdown is not None:
                self.countdown -= 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


class Faulty(Module):
    """An identity layer that raises an error once, at a chosen call after arming.

    Args:
        error: The exception to raise.
    """

    def __init__(self, error: BaseException | None = None):
        super().__init__()
        self.error = RuntimeError(INJECTED) if error is None else error
        self.countdown = None

    def arm(self, at: int = 0) -> Faulty:
        """Raise at the ``at``-th call (from 0) from now on, once."""
        self.countdown = at
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.countdown == 0:
            self.countdown = None
            raise self.error
        if self.countdown is not None:
            self.countdown -= 1
        return x


class Rendezvous(Module):
    """An identity layer that holds the first caller until a second one arrives.

    Once armed, the first call waits until another thread calls, or ``timeout``
    seconds pass; then both go on. Computations that take turns therefore run one
    after the other (the first one after the timeout), others overlap for sure.

    Args:
        timeout: Longest wait in seconds.
    """

    def __init__(self, timeout: float = 0.5):
        super().__init__()
        self.timeout = timeout
        self.armed = False

    def arm(self) -> Rendezvous:
        """Hold the next caller until a second one arrives (or the timeout)."""
        self.arrivals, self.both, self.lock = 0, Event(), Lock()
        self.armed = True
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            with self.lock:
                self.arrivals += 1
                first = self.arrivals == 1
            if first:
                self.both.wait(self.timeout)
            else:
                self.both.set()
                self.armed = False
        return x


def object_state(obj) -> dict:
    """Record an object's attributes: the objects held and copies of their tensors.

    Args:
        obj: The object, e.g. an operator.

    Returns:
        A record for :func:`assert_same_object_state`.
    """
    return {name: (value, _cloned(value)) for name, value in vars(obj).items()}


def _cloned(value):
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cloned(v) for v in value]
    return None


def _same_tree(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a is None and b is None


def assert_same_object_state(before: dict, after: dict):
    """Assert that an object holds the same objects, with the same tensor values.

    Args:
        before: The first record of :func:`object_state`.
        after: The second record.
    """
    assert before.keys() == after.keys(), before.keys() ^ after.keys()
    for name, (value, tree) in before.items():
        new_value, new_tree = after[name]
        assert new_value is value, f"{name}: replaced"
        assert _same_tree(tree, new_tree), f"{name}: changed"
