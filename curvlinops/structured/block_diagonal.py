r"""Block-diagonal matrices of arbitrary operators, with blockwise closed forms."""

from __future__ import annotations

from torch import Tensor, eye, isnan, stack
from torch.linalg import inv_ex, matrix_norm, slogdet

from curvlinops._adapter import adapt
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.examples import TensorLinearOperator
from curvlinops.structured._base import (
    _ClosedFormMixin,
    check_damping,
    raise_singular,
)


class BlockDiagonalLinearOperator(_ClosedFormMixin, PyTorchLinearOperator):
    r"""Block-diagonal matrix :math:`\mathrm{diag}(\mathbf{B}_1, \dots, \mathbf{B}_n)`.

    The blocks may be operators of any kind: structured ones
    (:class:`~curvlinops.KroneckerProductLinearOperator`,
    :class:`~curvlinops.EighDecomposedLinearOperator`,
    :class:`~curvlinops.DiagonalLinearOperator`, block-diagonal ones), curvature
    operators, any other :class:`~curvlinops.PyTorchLinearOperator`, torch or
    NumPy matrices and SciPy operators (matrices become dense operators). The
    tensor-list format is the concatenation of the blocks' formats: block
    :math:`j` acts on the next ``len(B_j._in_shape)`` tensors of a list, so that
    e.g. blocks with the shapes of a network's parameters give an operator on the
    parameters. Products cost one product per block. The closed forms combine
    those of the (square) blocks,

    .. math::
        \mathrm{tr} = \sum_j \mathrm{tr}(\mathbf{B}_j), \quad
        \det = \prod_j \det \mathbf{B}_j, \quad
        \lVert \cdot \rVert_F^2 = \sum_j \lVert \mathbf{B}_j \rVert_F^2, \quad
        (\cdot + \delta \mathbf{I})^{-1}
        = \mathrm{diag}\left((\mathbf{B}_j + \delta \mathbf{I})^{-1}\right),

    and exist if every block has them: structured and dense blocks, and blocks
    with ``trace``, ``det``, ``logdet`` and ``frobenius_norm`` properties (e.g.
    :class:`~curvlinops.KFACLinearOperator`) for the scalars; :meth:`inverse`
    needs structured or dense blocks. The adjoint is the block-diagonal of the
    adjoints; the operator is self-adjoint if all blocks are.

    Example:
        >>> from torch import block_diag, float64, kron, manual_seed, rand
        >>> from curvlinops import (DiagonalLinearOperator,
        ...                         KroneckerProductLinearOperator)
        >>> _ = manual_seed(0)
        >>> A, B, C = (rand(n, n, dtype=float64) for n in (2, 3, 4))
        >>> A, B = A @ A.T, B @ B.T  # damped Kronecker inverses need symmetric factors
        >>> d = rand(5, dtype=float64) + 1
        >>> blocks = [KroneckerProductLinearOperator(A, B), C,
        ...           DiagonalLinearOperator(d)]
        >>> D = BlockDiagonalLinearOperator(blocks)
        >>> dense = block_diag(kron(A, B), C, d.diag())
        >>> x = rand(15, dtype=float64)
        >>> (D @ x).allclose(dense @ x), D.trace.allclose(dense.trace())
        (True, True)
        >>> D_inv = D.inverse(damping=1.0)
        >>> (D_inv @ (dense @ x + x)).allclose(x)
        True
    """

    def __init__(self, blocks: list):
        """Store the blocks.

        Args:
            blocks: The diagonal blocks, in order: operators of any supported kind
                (see the class description) on one device with one dtype.

        Raises:
            ValueError: If there is no block, or devices or dtypes differ.
        """
        if len(blocks) == 0:
            raise ValueError("Expected at least one block, got none.")
        self._blocks = [adapt(block).operator for block in blocks]
        for attr in ("device", "dtype"):
            values = {getattr(block, attr) for block in self._blocks}
            if len(values) != 1:
                raise ValueError(f"All blocks must share one {attr}, got {values}.")
        self.SELF_ADJOINT = all(block.SELF_ADJOINT for block in self._blocks)
        in_shape = [s for block in self._blocks for s in block._in_shape]
        out_shape = [s for block in self._blocks for s in block._out_shape]
        first = self._blocks[0]
        super().__init__(in_shape, out_shape, first.device, first.dtype)

    @property
    def blocks(self) -> list[PyTorchLinearOperator]:
        """The diagonal blocks (matrices as dense operators).

        Returns:
            The blocks, in order.
        """
        return self._blocks

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply every block onto its tensors.

        Args:
            M: Tensors ``[*in_shape[i], K]``.

        Returns:
            Tensors ``[*out_shape[i], K]``.
        """
        result, start = [], 0
        for block in self._blocks:
            stop = start + len(block._in_shape)
            result.extend(block._matmat(M[start:stop]))
            start = stop
        return result

    def _adjoint(self) -> BlockDiagonalLinearOperator:
        """Return the block-diagonal operator of the blocks' adjoints.

        Returns:
            The adjoint.
        """
        return BlockDiagonalLinearOperator([b.adjoint() for b in self._blocks])

    @property
    def trace(self) -> Tensor:
        """The trace, the sum of the blocks' traces (added in block order).

        Returns:
            A scalar tensor.
        """
        return sum(block_trace(b, j) for j, b in enumerate(self._blocks))

    def _squared_frobenius_norm(self) -> Tensor:
        """Return the sum of the blocks' squared Frobenius norms (in block order).

        Returns:
            A scalar tensor.
        """
        return sum(
            block_squared_frobenius_norm(b, j) for j, b in enumerate(self._blocks)
        )

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        """Multiply the blocks' determinants, as signs and log-absolute values.

        Returns:
            Sign and logarithm of the determinant's absolute value (the blocks'
            logarithms added in block order).
        """
        signs, logabsdets = zip(
            *(block_slogdet(b, j) for j, b in enumerate(self._blocks))
        )
        return stack(signs).prod(), sum(logabsdets)

    def inverse(self, damping: float = 0.0) -> BlockDiagonalLinearOperator:
        r"""Return :math:`(\mathbf{B} + \delta \mathbf{I})^{-1}`, block by block.

        Args:
            damping: Damping :math:`\delta \ge 0`. Default: ``0``.

        Returns:
            The block-diagonal operator of the blocks' damped inverses.
        """
        damping = check_damping(damping)
        return BlockDiagonalLinearOperator(
            [block_inverse(b, j, damping) for j, b in enumerate(self._blocks)]
        )


def _square(block: PyTorchLinearOperator, index: int, what: str):
    """Verify that a block is square.

    Args:
        block: The block.
        index: Its position, for the error message.
        what: The requested quantity, for the error message.

    Raises:
        ValueError: If the block is not square.
    """
    if block.shape[0] != block.shape[1]:
        raise ValueError(
            f"The {what} needs square blocks; block {index} is {block.shape}."
        )


def _closed_form(block: PyTorchLinearOperator, index: int, name: str) -> Tensor:
    """Read a closed-form scalar from a block that offers it.

    Args:
        block: A structured operator or one with the property ``name``.
        index: Its position, for the error message.
        name: ``'trace'``, ``'logdet'``, ``'det'`` or ``'frobenius_norm'``.

    Returns:
        The value.

    Raises:
        NotImplementedError: If the block has no such property.
    """
    value = getattr(block, name, None)
    if not isinstance(value, Tensor):
        raise NotImplementedError(
            f"Block {index} ({type(block).__name__}) has no closed-form `{name}`; "
            "use structured, dense, or KFAC-type blocks."
        )
    return value


def block_trace(block: PyTorchLinearOperator, index: int) -> Tensor:
    """Return the trace of a square block.

    Args:
        block: A dense, structured or KFAC-type operator.
        index: Its position, for error messages.

    Returns:
        The trace.
    """
    _square(block, index, "trace")
    if isinstance(block, TensorLinearOperator):
        return block.tensor.trace()
    return _closed_form(block, index, "trace")


def block_squared_frobenius_norm(block: PyTorchLinearOperator, index: int) -> Tensor:
    """Return the squared Frobenius norm of a block.

    Args:
        block: A dense, structured or KFAC-type operator.
        index: Its position, for error messages.

    Returns:
        The squared Frobenius norm.
    """
    if isinstance(block, TensorLinearOperator):
        return matrix_norm(block.tensor) ** 2
    if isinstance(block, _ClosedFormMixin):
        return block._squared_frobenius_norm()
    return _closed_form(block, index, "frobenius_norm") ** 2


def block_slogdet(block: PyTorchLinearOperator, index: int) -> tuple[Tensor, Tensor]:
    """Return sign and log-absolute value of the determinant of a square block.

    Args:
        block: A dense, structured or KFAC-type operator.
        index: Its position, for error messages.

    Returns:
        The sign and the logarithm of the determinant's absolute value.
    """
    _square(block, index, "determinant")
    if isinstance(block, TensorLinearOperator):
        return slogdet(block.tensor)
    if isinstance(block, _ClosedFormMixin):
        return block._slogdet()
    logdet = _closed_form(block, index, "logdet")
    if isnan(logdet):  # a negative determinant
        det = _closed_form(block, index, "det")
        return det.sign(), det.abs().log()
    return (logdet > -float("inf")).to(logdet.dtype), logdet


def block_inverse(
    block: PyTorchLinearOperator, index: int, damping: float
) -> PyTorchLinearOperator:
    """Return the damped inverse of a square block in closed form.

    Args:
        block: A dense or structured operator.
        index: Its position, for error messages.
        damping: Damping added to the block's diagonal.

    Returns:
        The inverse: a dense operator for a dense block, else a structured one.

    Raises:
        NotImplementedError: If the block is neither dense nor structured.
    """
    _square(block, index, "inverse")
    if isinstance(block, _ClosedFormMixin):
        return block.inverse(damping)
    if not isinstance(block, TensorLinearOperator):
        raise NotImplementedError(
            f"Block {index} ({type(block).__name__}) has no closed-form inverse; "
            "use structured or dense blocks, or CGInverseLinearOperator."
        )
    A = block.tensor
    inverse, info = inv_ex(A + damping * eye(len(A), dtype=A.dtype, device=A.device))
    if info.item() != 0:
        raise_singular(f"Block {index} (plus damping)")
    return TensorLinearOperator(inverse)
