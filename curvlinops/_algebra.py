"""Lazy sums, scalings and chains of linear operators.

``A + B``, ``c * A`` and ``A @ B`` on :class:`~curvlinops.PyTorchLinearOperator`
build these private composites. They hold their operands, check compatibility when
built, define adjoints algebraically, fold nested scalings and flatten nested sums
and chains, so a long expression costs one product per operand and no more.
"""

from __future__ import annotations

from torch import Size, Tensor

from curvlinops._torch_base import (
    PyTorchLinearOperator,
    _flatten_columns,
    _split_columns,
)


def _convert_format(M: list[Tensor], shapes: list[Size]) -> list[Tensor]:
    """Convert a tensor list with trailing column axis into another list format.

    Args:
        M: Tensors with trailing column axis.
        shapes: Target tensor shapes (same total size).

    Returns:
        The same numbers in the target format.
    """
    if [m.shape[:-1] for m in M] == shapes:
        return M
    return _split_columns(_flatten_columns(M), shapes)


class _CompositePyTorchLinearOperator(PyTorchLinearOperator):
    """Operator built from other operators, which it checks for compatibility.

    Device and dtype are those of the operands, which must all agree.
    """

    def __init__(self, operators: list[PyTorchLinearOperator], in_shape, out_shape):
        """Store the operands after checking they share device and dtype.

        Args:
            operators: The operands.
            in_shape: Tensor shapes of the composite's domain.
            out_shape: Tensor shapes of the composite's range.

        Raises:
            ValueError: If the operands live on different devices or have
                different dtypes.
        """
        self._operators = operators
        for attr in ("device", "dtype"):
            values = {getattr(op, attr) for op in operators}
            if len(values) != 1:
                raise ValueError(f"Operands must share one {attr}, got {values}.")
        super().__init__(in_shape, out_shape, operators[0].device, operators[0].dtype)


class _SumPyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """Lazy sum of operators of the same shape; nested sums are flattened."""

    def __init__(self, *operators: PyTorchLinearOperator):
        """Store the summands.

        Args:
            *operators: Operators of identical shape.

        Raises:
            ValueError: If the shapes differ.
        """
        flat = []
        for op in operators:
            is_sum = isinstance(op, _SumPyTorchLinearOperator)
            flat.extend(op._operators if is_sum else [op])
        if len({op.shape for op in flat}) != 1:
            raise ValueError(
                f"Summands must have the same shape, got {[op.shape for op in flat]}."
            )
        super().__init__(flat, flat[0]._in_shape, flat[0]._out_shape)
        self.SELF_ADJOINT = all(op.SELF_ADJOINT for op in flat)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Add the summands' products.

        Args:
            M: Matrix in tensor-list format.

        Returns:
            Sum of the products in tensor-list format.
        """
        result = None
        for op in self._operators:
            AM = _convert_format(
                op._matmat(_convert_format(M, op._in_shape)), self._out_shape
            )
            # Out of place: an operand may return its input or a cached tensor.
            result = AM if result is None else [r + a for r, a in zip(result, AM)]
        return result

    def _adjoint(self) -> PyTorchLinearOperator:
        """Return the sum of the adjoints.

        Returns:
            The adjoint operator.
        """
        return _SumPyTorchLinearOperator(*(op.adjoint() for op in self._operators))


class _ScaledPyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """Lazy scalar multiple of an operator; nested scalings are folded into one."""

    def __init__(self, operator: PyTorchLinearOperator, scale: float):
        """Store the operator and the scale.

        Args:
            operator: The operator to scale.
            scale: The real scale factor.
        """
        if isinstance(operator, _ScaledPyTorchLinearOperator):
            operator, scale = operator._operators[0], operator._scale * scale
        self._scale = scale
        super().__init__([operator], operator._in_shape, operator._out_shape)
        self.SELF_ADJOINT = operator.SELF_ADJOINT

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Scale the operand's product.

        Args:
            M: Matrix in tensor-list format.

        Returns:
            Scaled product in tensor-list format.
        """
        # Out of place: the operand may return its input or a cached tensor.
        return [r * self._scale for r in self._operators[0]._matmat(M)]

    def _adjoint(self) -> PyTorchLinearOperator:
        """Return the scaled adjoint.

        Returns:
            The adjoint operator.
        """
        return _ScaledPyTorchLinearOperator(self._operators[0].adjoint(), self._scale)


class _ChainPyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """Lazy product ``A_1 @ A_2 @ ... @ A_n``; nested chains are flattened."""

    def __init__(self, *operators: PyTorchLinearOperator):
        """Store the factors (leftmost first).

        Args:
            *operators: Operators whose inner dimensions match.

        Raises:
            ValueError: If the inner dimensions of neighbours differ.
        """
        flat = []
        for op in operators:
            is_chain = isinstance(op, _ChainPyTorchLinearOperator)
            flat.extend(op._operators if is_chain else [op])
        for left, right in zip(flat[:-1], flat[1:]):
            if left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"Cannot chain operators of shapes {left.shape} and {right.shape}."
                )
        super().__init__(flat, flat[-1]._in_shape, flat[0]._out_shape)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Apply the factors from right to left.

        Args:
            M: Matrix in tensor-list format.

        Returns:
            Product in tensor-list format.
        """
        for op in reversed(self._operators):
            M = op._matmat(_convert_format(M, op._in_shape))
        return M

    def _adjoint(self) -> PyTorchLinearOperator:
        """Return the reversed chain of adjoints.

        Returns:
            The adjoint operator.
        """
        return _ChainPyTorchLinearOperator(
            *(op.adjoint() for op in reversed(self._operators))
        )
