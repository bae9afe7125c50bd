r"""Which calls of PyTorch functions are uses of KFAC's layers.

KFAC's torch function mode (:mod:`curvlinops._kfac_uses`) sees every PyTorch call
of the forward pass. This module recognizes the calls that matter:

- :func:`linear_call`: ``torch.nn.functional.linear`` and ``conv2d`` (the uses),
- :func:`looked_up`: embedding lookups ``embedding(idx, W)`` and ``W[idx]``,
- transposes of a 2d parameter and matrix products ``x @ W.T`` with them
  (``TRANSPOSES``, ``MATMULS``), which are the use ``linear(x, W)``,
- :data:`CELLS`: the fused recurrent cells of ``RNNCell``, ``LSTMCell`` and
  ``GRUCell`` (``torch.rnn_tanh_cell``, ``rnn_relu_cell``, ``lstm_cell``,
  ``gru_cell``), which it evaluates as two uses each, ``linear(x, W_ih, b_ih)``
  and ``linear(h, W_hh, b_hh)``, and the cell's nonlinearities,

and names functions and parameters in error messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import (
    Size,
    Tensor,
    conv2d,
    embedding,
    int8,
    int16,
    int32,
    int64,
    relu,
    sigmoid,
    tanh,
    uint8,
)
from torch.nn import functional

LINEAR, CONV2D = "linear", "conv2d"
#: Functions that transpose a matrix (``transpose`` with the dimensions 0 and 1).
TRANSPOSES = frozenset(
    ["Tensor.T", "Tensor.mT", "Tensor.t", "torch.t", "Tensor.transpose"]
    + ["torch.transpose"]
)
#: Matrix products; ``x @ W.T`` with a parameter ``W`` is ``linear(x, W)``.
MATMULS = frozenset(["Tensor.matmul", "torch.matmul", "Tensor.__matmul__"])
_INDEX_DTYPES = (int64, int32, int16, int8, uint8)
_LINEAR_ARGS = (("input", None), ("weight", None), ("bias", None))
_CONV2D_ARGS = (
    *_LINEAR_ARGS,
    ("stride", 1),
    ("padding", 0),
    ("dilation", 1),
    ("groups", 1),
)


@dataclass
class Use:
    """One call of a linear map or 2d convolution with a layer's parameters.

    Attributes:
        kind: ``'linear'`` or ``'conv2d'``.
        x: The call's input, detached.
        out_shape: Shape of the call's output.
        conv: ``(kernel_size, stride, padding, dilation, groups)`` of a convolution,
            else ``None``.
        probe: Zero tensor of the output's shape whose gradient is the gradient
            w.r.t. the output, or ``None`` if there is no backward pass.
    """

    kind: str
    x: Tensor
    out_shape: Size
    conv: tuple | None = None
    probe: Tensor | None = None


def op_name(func: Callable) -> str:
    """Return a readable name of a PyTorch function for messages.

    Args:
        func: A function as a torch function mode receives it.

    Returns:
        E.g. ``'Tensor.t'``, ``'Tensor.T'``, ``'torch.matmul'`` or
        ``'torch.nn.functional.layer_norm'``.
    """
    if func is functional.linear:
        return "torch.nn.functional.linear"
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property such as ``Tensor.T``
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', name)}"
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if qualname.startswith("_VariableFunctionsClass."):
        return f"torch.{name}"
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


def unsupported_message(operation: str, label: str) -> str:
    """Explain that a parameter enters an operation KFAC does not support.

    Args:
        operation: Name of the operation.
        label: Name of the parameter.

    Returns:
        The message.
    """
    return (
        f"KFAC does not support parameter {label!r} in {operation!r}: KFAC's "
        "parameters must be weights or biases of linear maps or 2d convolutions "
        "(torch.nn.functional.linear or conv2d, as in Linear and Conv2d layers, "
        "or x @ W.T); such weights may also be looked up (embedding, tied "
        "weights). Pass only such parameters."
    )


def _bind(names: tuple, args: tuple, kwargs: dict) -> list:
    """Match positional and keyword arguments to a signature with defaults.

    Args:
        names: ``(name, default)`` pairs in positional order.
        args: Positional arguments.
        kwargs: Keyword arguments.

    Returns:
        The argument values in the order of ``names``.
    """
    values = list(args) + [None] * (len(names) - len(args))
    return [
        kwargs.get(name, default) if i >= len(args) else values[i]
        for i, (name, default) in enumerate(names)
    ]


def linear_call(func: Callable, args: tuple, kwargs: dict) -> tuple | None:
    """Recognize a call of a linear map or 2d convolution.

    Args:
        func: The called function.
        args: Its positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        ``(kind, x, weight, bias, conv)`` (``conv`` as in :class:`Use`), or
        ``None`` for other functions.
    """
    if func is functional.linear:
        x, weight, bias = _bind(_LINEAR_ARGS, args, kwargs)
        return LINEAR, x, weight, bias, None
    if func is conv2d:
        x, weight, bias, *hyperparameters = _bind(_CONV2D_ARGS, args, kwargs)
        return CONV2D, x, weight, bias, (tuple(weight.shape[2:]), *hyperparameters)
    return None


def looked_up(func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
    """Return the table of an embedding lookup.

    Args:
        func: The called function.
        args: Its positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        The looked-up matrix for ``functional.embedding(idx, W)``,
        ``torch.embedding(W, idx)`` and ``W[idx]`` with an integer tensor ``idx``;
        else ``None``.
    """
    if func is functional.embedding:
        return _bind(_LINEAR_ARGS[:2], args, kwargs)[1]
    if func is embedding:
        return _bind((("weight", None),), args, kwargs)[0]
    if getattr(func, "__name__", "") == "__getitem__" and len(args) == 2:
        index = args[1]
        if isinstance(index, Tensor) and index.dtype in _INDEX_DTYPES:
            return args[0]
    return None


Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _rnn_cell(
    nonlinearity: Callable,
    linear: Linear,
    input: Tensor,  # noqa: A002 (PyTorch's name)
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    r"""Elman cell with the given linear maps.

    Computes :math:`\sigma(\mathbf{W}_{ih} \mathbf{x} + \mathbf{b}_{ih} +
    \mathbf{W}_{hh} \mathbf{h} + \mathbf{b}_{hh})`.

    Args:
        nonlinearity: :math:`\sigma`, ``tanh`` or ``relu``.
        linear: Evaluates (and records) a linear map ``linear(x, W, b)``.
        input: Input ``[B, D_in]``.
        hx: Hidden state ``[B, D_h]``.
        w_ih: Input weight.
        w_hh: Hidden weight.
        b_ih: Input bias, or ``None``.
        b_hh: Hidden bias, or ``None``.

    Returns:
        The new hidden state.
    """
    return nonlinearity(linear(input, w_ih, b_ih) + linear(hx, w_hh, b_hh))


def _lstm_cell(
    linear: Linear,
    input: Tensor,  # noqa: A002 (PyTorch's name)
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """LSTM cell with the given linear maps (gates in PyTorch's order i, f, g, o).

    Args:
        linear: Evaluates (and records) a linear map ``linear(x, W, b)``.
        input: Input ``[B, D_in]``.
        hx: Hidden and cell state, each ``[B, D_h]``.
        w_ih: Input weight ``[4 D_h, D_in]``.
        w_hh: Hidden weight ``[4 D_h, D_h]``.
        b_ih: Input bias, or ``None``.
        b_hh: Hidden bias, or ``None``.

    Returns:
        The new hidden and cell state.
    """
    h, c = hx
    gates = linear(input, w_ih, b_ih) + linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=1)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    return sigmoid(o) * tanh(c), c


def _gru_cell(
    linear: Linear,
    input: Tensor,  # noqa: A002 (PyTorch's name)
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """GRU cell with the given linear maps (gates in PyTorch's order r, z, n).

    Args:
        linear: Evaluates (and records) a linear map ``linear(x, W, b)``.
        input: Input ``[B, D_in]``.
        hx: Hidden state ``[B, D_h]``.
        w_ih: Input weight ``[3 D_h, D_in]``.
        w_hh: Hidden weight ``[3 D_h, D_h]``.
        b_ih: Input bias, or ``None``.
        b_hh: Hidden bias, or ``None``.

    Returns:
        The new hidden state.
    """
    i_r, i_z, i_n = linear(input, w_ih, b_ih).chunk(3, dim=1)
    h_r, h_z, h_n = linear(hx, w_hh, b_hh).chunk(3, dim=1)
    r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
    n = tanh(i_n + r * h_n)
    return (1 - z) * n + z * hx


#: Fused recurrent cells by function name, as ``cell(linear, *args, **kwargs)``.
CELLS: dict[str, Callable] = {
    "torch.rnn_tanh_cell": partial(_rnn_cell, tanh),
    "torch.rnn_relu_cell": partial(_rnn_cell, relu),
    "torch.lstm_cell": _lstm_cell,
    "torch.gru_cell": _gru_cell,
}
