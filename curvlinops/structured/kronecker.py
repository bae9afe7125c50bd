r"""Kronecker products of square matrices as linear operators, never formed."""

from __future__ import annotations

from math import prod

from torch import Tensor, allclose, equal, tensordot
from torch.linalg import eigh, inv_ex, matrix_norm, slogdet

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.structured._base import (
    _ClosedFormMixin,
    check_damping,
    check_square_matrices,
    raise_singular,
)


class KroneckerProductLinearOperator(_ClosedFormMixin, PyTorchLinearOperator):
    r"""Kronecker product :math:`\mathbf{A}_1 \otimes \dots \otimes \mathbf{A}_k`.

    The factors :math:`\mathbf{A}_i \in \mathbb{R}^{d_i \times d_i}` are square;
    the operator has size :math:`N = \prod_i d_i`. It acts on one tensor
    :math:`\mathbf{X}` of shape ``[d_1, ..., d_k]`` whose row-major flattening is
    the vector it multiplies (the ordering of :func:`torch.kron`): factor
    :math:`i` multiplies axis :math:`i`,

    .. math::
        \left((\mathbf{A}_1 \otimes \dots \otimes \mathbf{A}_k)
        \mathrm{vec}(\mathbf{X})\right)_{j_1 \dots j_k}
        = \sum_{l_1, \dots, l_k} (\mathbf{A}_1)_{j_1 l_1} \cdots
        (\mathbf{A}_k)_{j_k l_k} X_{l_1 \dots l_k}\,,

    e.g. :math:`\mathbf{X} \mapsto \mathbf{A}_1 \mathbf{X} \mathbf{A}_2^\top` for
    two factors (KFAC's :math:`\mathbf{G} \otimes \mathbf{A}` on a weight matrix).
    A product costs :math:`\mathcal{O}(N \sum_i d_i)` per column instead of
    :math:`\mathcal{O}(N^2)`; the Kronecker product is never formed. The closed
    forms use the factors only (`Van Loan, 2000
    <https://doi.org/10.1016/S0377-0427(00)00393-9>`_):

    .. math::
        \mathrm{tr} = \prod_i \mathrm{tr}(\mathbf{A}_i), \quad
        \log |\det| = \sum_i \frac{N}{d_i} \log |\det \mathbf{A}_i|, \quad
        \lVert \cdot \rVert_F = \prod_i \lVert \mathbf{A}_i \rVert_F, \quad
        (\otimes_i \mathbf{A}_i)^{-1} = \otimes_i \mathbf{A}_i^{-1}.

    With damping, :math:`(\otimes_i \mathbf{A}_i + \delta \mathbf{I})^{-1}` is no
    Kronecker product; for symmetric factors with eigendecompositions
    :math:`\mathbf{A}_i = \mathbf{Q}_i \mathbf{\Lambda}_i \mathbf{Q}_i^\top` it is
    :math:`(\otimes_i \mathbf{Q}_i)\,(\otimes_i \mathbf{\Lambda}_i + \delta
    \mathbf{I})^{-1} (\otimes_i \mathbf{Q}_i)^\top`, an
    :class:`~curvlinops.EighDecomposedLinearOperator` (:meth:`inverse`). The
    adjoint is the Kronecker product of the transposed factors; the operator is
    self-adjoint if all factors are exactly symmetric.

    Example:
        >>> from torch import float64, kron, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> A, B = rand(3, 3, dtype=float64), rand(2, 2, dtype=float64)
        >>> K = KroneckerProductLinearOperator(A, B)
        >>> K.shape
        (6, 6)
        >>> x = rand(6, dtype=float64)
        >>> (K @ x).allclose(kron(A, B) @ x)
        True
        >>> K.logdet.allclose(kron(A, B).slogdet().logabsdet)  # det(A ⊗ B) > 0
        True
        >>> (K.inverse() @ (K @ x)).allclose(x)
        True
    """

    def __init__(self, *factors: Tensor):
        r"""Store the factors.

        Args:
            *factors: Square matrices :math:`\mathbf{A}_i` of shapes
                ``[d_i, d_i]`` on one device with one floating-point dtype.

        Raises:
            ValueError: If there is no factor, a factor is not square, or dtypes or
                devices differ.
        """
        check_square_matrices(factors, "factors")
        self._factors = list(factors)
        self.SELF_ADJOINT = all(equal(A, A.mT) for A in factors)
        shape = [tuple(len(A) for A in factors)]
        super().__init__(shape, shape, factors[0].device, factors[0].dtype)

    @property
    def factors(self) -> list[Tensor]:
        """The Kronecker factors, first (outermost) factor first.

        Returns:
            The factors.
        """
        return self._factors

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply every factor onto its axis of the columns.

        Args:
            M: One tensor ``[d_1, ..., d_k, K]``.

        Returns:
            The product, of the same shape.
        """
        return [kronecker_matmat(self._factors, M[0])]

    def _adjoint(self) -> KroneckerProductLinearOperator:
        """Return the Kronecker product of the transposed factors.

        Returns:
            The adjoint.
        """
        return KroneckerProductLinearOperator(*(A.mT for A in self._factors))

    @property
    def trace(self) -> Tensor:
        """The trace, the product of the factors' traces.

        Returns:
            A scalar tensor.
        """
        return prod(A.trace() for A in self._factors)

    def _squared_frobenius_norm(self) -> Tensor:
        """Return the product of the factors' squared Frobenius norms.

        Returns:
            A scalar tensor.
        """
        return prod(matrix_norm(A) ** 2 for A in self._factors)

    def _slogdet(self) -> tuple[Tensor, Tensor]:
        """Combine the factors' determinants, each to the power of its multiplicity.

        Returns:
            Sign and logarithm of the determinant's absolute value.
        """
        size = self.shape[0]
        sign, logabsdet = None, None
        for A in self._factors:
            multiplicity = size // len(A)
            s, log_abs = slogdet(A)
            s, log_abs = s**multiplicity, multiplicity * log_abs
            sign = s if sign is None else sign * s
            logabsdet = log_abs if logabsdet is None else logabsdet + log_abs
        return sign, logabsdet

    def inverse(self, damping: float = 0.0):
        r"""Return the damped inverse in closed form.

        That is :math:`(\otimes_i \mathbf{A}_i + \delta \mathbf{I})^{-1}`.

        Args:
            damping: Damping :math:`\delta \ge 0`. Default: ``0``.

        Returns:
            For ``damping=0``, the Kronecker product of the inverted factors; else
            an :class:`~curvlinops.EighDecomposedLinearOperator` with Kronecker
            eigenvectors (this needs symmetric factors).

        Raises:
            LinAlgError: If ``damping=0`` and a factor is singular, or the damped
                eigenvalues contain a zero.
            NotImplementedError: If ``damping > 0`` and a factor is not symmetric.
        """
        if check_damping(damping) > 0:
            return self._eigh().inverse(damping)
        inverses = []
        for idx, A in enumerate(self._factors):
            A_inv, info = inv_ex(A)
            if info.item() != 0:
                raise_singular(f"Kronecker factor {idx} ({len(A)}x{len(A)})")
            inverses.append(A_inv)
        return KroneckerProductLinearOperator(*inverses)

    def _eigh(self):
        r"""Eigendecompose the product through its symmetric factors.

        The eigenvalues of :math:`\otimes_i \mathbf{A}_i` are the products of the
        factors' eigenvalues, its eigenvectors the Kronecker products of theirs.

        Returns:
            The product as :class:`~curvlinops.EighDecomposedLinearOperator`.

        Raises:
            NotImplementedError: If a factor is not symmetric.
        """
        from curvlinops.structured.eigh import EighDecomposedLinearOperator

        eigenvalues, eigenvectors = None, []
        for idx, A in enumerate(self._factors):
            if not allclose(A, A.mT):
                raise NotImplementedError(
                    f"Kronecker factor {idx} is not symmetric: the damped inverse "
                    "of a Kronecker product has a closed form only for symmetric "
                    "factors (through their eigendecompositions)."
                )
            values, vectors = eigh(A)
            eigenvectors.append(vectors)
            eigenvalues = (
                values if eigenvalues is None else eigenvalues.unsqueeze(-1) * values
            )
        Q = KroneckerProductLinearOperator(*eigenvectors)
        return EighDecomposedLinearOperator(eigenvalues, Q, check_orthonormal=False)


def kronecker_matmat(factors: list[Tensor], X: Tensor) -> Tensor:
    r"""Multiply a Kronecker product onto columns, factor by factor.

    Args:
        factors: Matrices :math:`\mathbf{A}_i`, ``[d_i, d_i]``.
        X: Columns ``[d_1, ..., d_k, K]`` (row-major flattenings of the vectors).

    Returns:
        :math:`(\otimes_i \mathbf{A}_i) \mathbf{X}` in the same layout.
    """
    if len(factors) == 2:  # one batched product chain, as KFAC's products
        left, right = factors
        V = X.permute(2, 0, 1)
        return (left @ V @ right.mT).permute(1, 2, 0)
    for axis, A in enumerate(factors):
        X = tensordot(A, X, dims=([1], [axis])).movedim(0, axis)
    return X
