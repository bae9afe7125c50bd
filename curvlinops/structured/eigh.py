r"""Symmetric matrices given by their eigendecomposition, as linear operators."""

from __future__ import annotations

from torch import Tensor

from curvlinops._checks import check_same_device_and_dtype
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.examples import TensorLinearOperator
from curvlinops.structured._base import (
    _ClosedFormMixin,
    check_damping,
    check_orthonormal,
    check_square_matrices,
    raise_singular,
    slogdet_of_eigenvalues,
)
from curvlinops.structured.kronecker import KroneckerProductLinearOperator


class EighDecomposedLinearOperator(_ClosedFormMixin, PyTorchLinearOperator):
    r"""A symmetric matrix given by its eigenvalues and orthonormal eigenvectors.

    Built from real eigenvalues :math:`\mathbf{\lambda} \in \mathbb{R}^N` and
    orthonormal eigenvectors :math:`\mathbf{Q} \in \mathbb{R}^{N \times N}`
    (:math:`\mathbf{Q}^\top \mathbf{Q} = \mathbf{I}`), e.g. from
    :func:`torch.linalg.eigh`. The eigenvectors are a matrix, or a
    :class:`~curvlinops.KroneckerProductLinearOperator` of orthonormal factors
    :math:`\mathbf{Q} = \otimes_i \mathbf{Q}_i` (EKFAC's eigenbasis,
    `George et al., 2018 <https://arxiv.org/abs/1806.03884>`_): then a product
    costs two Kronecker products and the eigenvalues may come in the shape
    ``[d_1, ..., d_k]`` of the Kronecker operator's tensor, which is also this
    operator's tensor-list format. The closed forms are

    .. math::
        \mathrm{tr} = \sum_i \lambda_i, \quad
        \det = \prod_i \lambda_i, \quad
        \lVert \cdot \rVert_F = \lVert \mathbf{\lambda} \rVert_2, \quad
        (\mathbf{Q} \mathrm{diag}(\mathbf{\lambda}) \mathbf{Q}^\top
        + \delta \mathbf{I})^{-1}
        = \mathbf{Q} \mathrm{diag}\left(\frac{1}{\lambda_i + \delta}\right)
        \mathbf{Q}^\top.

    The orthonormality of the eigenvectors is checked at construction (one
    product :math:`\mathbf{Q}^\top \mathbf{Q}`, per factor for Kronecker
    eigenvectors); ``check_orthonormal=False`` skips it. The operator is
    self-adjoint.

    Example:
        >>> from torch import float64, kron, manual_seed, rand
        >>> from torch.linalg import eigh
        >>> _ = manual_seed(0)
        >>> X = rand(4, 4, dtype=float64)
        >>> values, vectors = eigh(X @ X.T)
        >>> A = EighDecomposedLinearOperator(values, vectors)
        >>> x = rand(4, dtype=float64)
        >>> (A @ x).allclose(X @ X.T @ x)
        True
        >>> A.logdet.allclose((X @ X.T).logdet())
        True
        >>> # eigenvectors as a Kronecker product, eigenvalues in its shape [2, 3]
        >>> QL, QR = eigh(X[:2, :2] + X[:2, :2].T)[1], eigh(X[:3, :3] + X[:3, :3].T)[1]
        >>> Q = KroneckerProductLinearOperator(QL, QR)
        >>> E = EighDecomposedLinearOperator(rand(2, 3, dtype=float64), Q)
        >>> dense = kron(QL, QR) @ E.eigenvalues.flatten().diag() @ kron(QL, QR).T
        >>> v = rand(6, dtype=float64)
        >>> (E @ v).allclose(dense @ v), E.trace.allclose(dense.trace())
        (True, True)

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        eigenvalues: Tensor,
        eigenvectors: Tensor | KroneckerProductLinearOperator,
        check_orthonormal: bool = True,
    ):
        """Store eigenvalues and eigenvectors.

        Args:
            eigenvalues: Real eigenvalues, ``N`` numbers of any shape (a vector
                ``[N]``, or ``[d_1, ..., d_k]`` for Kronecker eigenvectors);
                eigenvalue ``i`` of the row-major flattening belongs to column ``i``
                of the eigenvectors.
            eigenvectors: Orthonormal eigenvectors as columns of a matrix ``[N, N]``
                or as a Kronecker product of square matrices with orthonormal
                columns.
            check_orthonormal: Verify that the eigenvectors are orthonormal.
                Default: ``True``.

        Raises:
            TypeError: If the eigenvectors are neither a tensor nor a Kronecker
                product.
            ValueError: If the shapes do not fit, devices or dtypes differ, or the
                eigenvectors are not orthonormal.
        """
        Q = _eigenvector_operator(eigenvectors, check_orthonormal)
        if not isinstance(eigenvalues, Tensor) or eigenvalues.numel() != Q.shape[0]:
            raise ValueError(
                f"Expected {Q.shape[0]} eigenvalues for eigenvectors of shape "
                f"{Q.shape}, got {getattr(eigenvalues, 'shape', eigenvalues)}."
            )
        check_same_device_and_dtype(
            [eigenvalues, *_eigenvector_tensors(Q)], "eigenvalues and eigenvectors"
        )
        self._eigenvectors = eigenvectors
        self._Q, self._QT = Q, Q.adjoint()
        self._eigenvalues = eigenvalues.reshape(Q._in_shape[0])
        super().__init__(Q._in_shape, Q._in_shape, Q.device, Q.dtype)

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues, in the shape of the operator's tensor format.

        Returns:
            ``[N]`` for matrix eigenvectors, ``[d_1, ..., d_k]`` for Kronecker ones.
        """
        return self._eigenvalues

    @property
    def eigenvectors(self) -> Tensor | KroneckerProductLinearOperator:
        """The eigenvectors, as given at construction.

        Returns:
            The matrix or Kronecker product of orthonormal eigenvectors.
        """
        return self._eigenvectors

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Rotate into the eigenbasis, scale, and rotate back.

        Args:
            M: One tensor ``[*shape, K]``.

        Returns:
            The product, of the same shape.
        """
        (rotated,) = self._QT._matmat(M)
        return self._Q._matmat([self._eigenvalues.unsqueeze(-1) * rotated])

    @property
    def trace(self) -> Tensor:
        """The trace, the sum of the eigenvalues.

        Returns:
            A scalar tensor.
        """
        return self._eigenvalues.sum()

    def _squared_frobenius_norm(self) -> Tensor:
        """Return the sum of the squared eigenvalues.

        Returns:
            A scalar tensor.
        """
        return (self._eigenvalues**2).sum()

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        """Return sign and log-absolute value of the product of the eigenvalues.

        Returns:
            Sign and logarithm of the determinant's absolute value.
        """
        return slogdet_of_eigenvalues(self._eigenvalues)

    def inverse(self, damping: float = 0.0) -> EighDecomposedLinearOperator:
        r"""Return the damped inverse, with the same eigenvectors.

        That is :math:`(\mathbf{Q}\mathrm{diag}(\mathbf{\lambda})\mathbf{Q}^\top +
        \delta\mathbf{I})^{-1}`.

        Args:
            damping: Damping :math:`\delta \ge 0`. Default: ``0``.

        Returns:
            The inverse, with the same eigenvectors and eigenvalues
            :math:`1 / (\lambda_i + \delta)`.

        Raises:
            LinAlgError: If a damped eigenvalue is zero.
        """
        shifted = self._eigenvalues + check_damping(damping)
        if (shifted == 0).any():
            raise_singular("The eigendecomposed matrix (plus damping)")
        return EighDecomposedLinearOperator(
            1 / shifted, self._eigenvectors, check_orthonormal=False
        )


def _eigenvector_operator(
    eigenvectors: Tensor | KroneckerProductLinearOperator, check: bool
) -> PyTorchLinearOperator:
    """Turn eigenvectors into an operator, checking that they are orthonormal.

    Args:
        eigenvectors: A square matrix or a Kronecker product of square matrices.
        check: Whether to verify that the columns are orthonormal.

    Returns:
        The eigenvectors as operator (a Kronecker product stays one).

    Raises:
        TypeError: If the eigenvectors are neither a tensor nor a Kronecker product.
    """
    if isinstance(eigenvectors, Tensor):
        check_square_matrices((eigenvectors,), "eigenvectors")
        Q = TensorLinearOperator(eigenvectors)
    elif isinstance(eigenvectors, KroneckerProductLinearOperator):
        Q = eigenvectors
    else:
        raise TypeError(
            "Expected the eigenvectors as a square tensor or a "
            f"KroneckerProductLinearOperator, got {type(eigenvectors).__name__}."
        )
    if check:
        for idx, factor in enumerate(_eigenvector_tensors(Q)):
            check_orthonormal(factor, f"eigenvector factor {idx}")
    return Q


def _eigenvector_tensors(Q: PyTorchLinearOperator) -> list[Tensor]:
    """Return the matrices that make up an eigenvector operator.

    Args:
        Q: A dense or Kronecker-product operator.

    Returns:
        The matrix, or the Kronecker factors.
    """
    return Q.factors if isinstance(Q, KroneckerProductLinearOperator) else [Q.tensor]
