r"""Diagonal matrices as linear operators, with closed-form algebra."""

from __future__ import annotations

from torch import Tensor, cat

from curvlinops._checks import check_same_device_and_dtype
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.structured._base import (
    _ClosedFormMixin,
    check_damping,
    raise_singular,
    slogdet_of_eigenvalues,
)


class DiagonalLinearOperator(_ClosedFormMixin, PyTorchLinearOperator):
    r"""A diagonal matrix :math:`\mathbf{D} = \mathrm{diag}(\mathbf{d})` as operator.

    The diagonal :math:`\mathbf{d} \in \mathbb{R}^N` is a vector or a list of
    tensors, e.g. one per parameter of a network; the operator's tensor-list format
    is then that of the list, and ``D @ [x_1, x_2, ...]`` multiplies entry-wise,
    :math:`[\mathbf{d}_1 \odot \mathbf{x}_1, \mathbf{d}_2 \odot \mathbf{x}_2,
    \dots]`. Products cost :math:`\mathcal{O}(N)` per column. The closed forms are

    .. math::
        \mathrm{tr}(\mathbf{D}) = \sum_i d_i, \quad
        \det \mathbf{D} = \prod_i d_i, \quad
        \lVert \mathbf{D} \rVert_F = \lVert \mathbf{d} \rVert_2, \quad
        (\mathbf{D} + \delta \mathbf{I})^{-1}
        = \mathrm{diag}\left(\frac{1}{d_i + \delta}\right)

    (:attr:`trace`, :attr:`det`, :attr:`logdet`, :attr:`frobenius_norm`,
    :meth:`inverse`). The operator is self-adjoint.

    Example:
        >>> from torch import float64, ones, tensor
        >>> D = DiagonalLinearOperator([tensor([[1.0, 2.0]], dtype=float64),
        ...                             tensor([4.0], dtype=float64)])
        >>> D.shape
        (3, 3)
        >>> D @ [ones(1, 2, dtype=float64), ones(1, dtype=float64)]
        [tensor([[1., 2.]], dtype=torch.float64), tensor([4.], dtype=torch.float64)]
        >>> D.trace.item(), round(D.det.item(), 9), round(D.logdet.item(), 6)
        (7.0, 8.0, 2.079442)
        >>> D.inverse(damping=1.0) @ tensor([2.0, 3.0, 5.0], dtype=float64)
        tensor([1., 1., 1.], dtype=torch.float64)

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(self, diagonal: Tensor | list[Tensor]):
        """Store the diagonal.

        Args:
            diagonal: The diagonal entries, a vector ``[N]`` or a list of tensors
                (of any shapes, which become the operator's tensor-list format) on
                one device with one floating-point dtype.

        Raises:
            TypeError: If ``diagonal`` is neither a tensor nor a list of tensors.
            ValueError: If the list is empty, or devices or dtypes differ.
        """
        tensors = [diagonal] if isinstance(diagonal, Tensor) else diagonal
        if not isinstance(tensors, (list, tuple)) or not all(
            isinstance(d, Tensor) for d in tensors
        ):
            raise TypeError(
                "Expected the diagonal as a tensor or a list of tensors, got "
                f"{type(diagonal).__name__}."
            )
        if len(tensors) == 0:
            raise ValueError("Expected at least one diagonal tensor, got none.")
        check_same_device_and_dtype(tensors, "diagonal tensors")
        self._diagonal = list(tensors)
        shapes = [d.shape for d in tensors]
        super().__init__(shapes, shapes, tensors[0].device, tensors[0].dtype)

    @property
    def diagonal(self) -> list[Tensor]:
        """The diagonal in the operator's tensor-list format.

        Returns:
            One tensor per entry of the tensor-list format.
        """
        return self._diagonal

    def _flat_diagonal(self) -> Tensor:
        """Return the diagonal as one vector.

        Returns:
            The diagonal ``[N]``.
        """
        return cat([d.flatten() for d in self.diagonal])

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Scale the rows of a matrix in tensor-list format.

        Args:
            M: Tensors ``[*shape, K]``.

        Returns:
            The product in the same format.
        """
        return [d.unsqueeze(-1) * m for d, m in zip(self.diagonal, M)]

    @property
    def trace(self) -> Tensor:
        """The trace, the sum of the diagonal.

        Returns:
            A scalar tensor.
        """
        return self._flat_diagonal().sum()

    def _squared_frobenius_norm(self) -> Tensor:
        """Return the sum of the squared diagonal entries.

        Returns:
            A scalar tensor.
        """
        return (self._flat_diagonal() ** 2).sum()

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        """Return sign and log-absolute value of the product of the diagonal.

        Returns:
            Sign and logarithm of the determinant's absolute value.
        """
        return slogdet_of_eigenvalues(self._flat_diagonal())

    def inverse(self, damping: float = 0.0) -> DiagonalLinearOperator:
        r"""Return :math:`(\mathbf{D} + \delta \mathbf{I})^{-1}`, a diagonal operator.

        Args:
            damping: Damping :math:`\delta \ge 0`. Default: ``0``.

        Returns:
            The inverse, with the same tensor-list format.

        Raises:
            LinAlgError: If a damped diagonal entry is zero.
        """
        shifted = [d + check_damping(damping) for d in self.diagonal]
        if any((d == 0).any() for d in shifted):
            raise_singular("The diagonal matrix (plus damping)")
        return DiagonalLinearOperator([1 / d for d in shifted])
