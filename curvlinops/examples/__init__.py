"""Simple operators for examples and tests: dense, identity and low-rank matrices."""

from __future__ import annotations

from torch import Size, Tensor
from torch import device as torch_device
from torch import dtype as torch_dtype

from curvlinops._torch_base import PyTorchLinearOperator


class TensorLinearOperator(PyTorchLinearOperator):
    r"""A dense matrix :math:`\mathbf{A} \in \mathbb{R}^{M \times N}` as operator.

    Useful to test algorithms on small problems and to mix dense matrices with
    matrix-free operators in sums and chains. The adjoint is the transpose.

    Example:
        >>> from torch import tensor
        >>> A = TensorLinearOperator(tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        >>> A.shape
        (3, 2)
        >>> A @ tensor([1.0, 1.0])
        tensor([ 3.,  7., 11.])
        >>> A.adjoint() @ tensor([1.0, 0.0, 0.0])
        tensor([1., 2.])
    """

    def __init__(self, A: Tensor):
        """Store the matrix.

        Args:
            A: Matrix of shape ``[M, N]``.

        Raises:
            ValueError: If ``A`` is not a matrix.
        """
        if A.ndim != 2:
            raise ValueError(
                f"Expected a matrix, got a tensor of shape {list(A.shape)}."
            )
        self.tensor = A
        super().__init__([(A.shape[1],)], [(A.shape[0],)], A.device, A.dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the matrix onto columns.

        Args:
            M: One tensor ``[N, K]``.

        Returns:
            One tensor ``[M, K]``.
        """
        return [self.tensor @ M[0]]

    def _adjoint(self) -> TensorLinearOperator:
        """Return the transpose.

        Returns:
            The transposed matrix as operator.
        """
        return TensorLinearOperator(self.tensor.T)


class IdentityLinearOperator(PyTorchLinearOperator):
    r"""The identity :math:`\mathbf{I}` on a tensor-list space, as linear operator.

    Example:
        >>> from torch import float64, ones
        >>> identity = IdentityLinearOperator([(2, 3), (3,)], "cpu", float64)
        >>> identity.shape
        (9, 9)
        >>> x = [ones(2, 3, dtype=float64), ones(3, dtype=float64)]
        >>> [t.shape for t in identity @ x]
        [torch.Size([2, 3]), torch.Size([3])]
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self, shape: list[tuple[int, ...]], device: torch_device, dtype: torch_dtype
    ):
        """Store the space.

        Args:
            shape: Tensor shapes of the space, e.g. the parameters' shapes.
            device: Device of the tensors.
            dtype: Dtype of the tensors.
        """
        shape = [Size(s) for s in shape]
        super().__init__(shape, shape, device, dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Return a copy of the columns.

        Args:
            M: Tensors with trailing column axis.

        Returns:
            Copies of ``M``.
        """
        return [m.clone() for m in M]


class OuterProductLinearOperator(PyTorchLinearOperator):
    r"""A weighted sum of outer products of vectors, as operator.

    Represents :math:`\sum_{i=1}^K c_i \mathbf{a}_i \mathbf{a}_i^\top =
    \mathbf{A} \mathrm{diag}(\mathbf{c}) \mathbf{A}^\top`, a matrix of rank at most
    :math:`K` whose vectors :math:`\mathbf{a}_i` are the columns of
    :math:`\mathbf{A} \in \mathbb{R}^{D \times K}`. Products cost
    :math:`\mathcal{O}(DK)` per column, without forming the :math:`D \times D`
    matrix. Useful to test estimators on low-rank matrices. The operator is
    self-adjoint.

    Example:
        >>> from torch import eye, float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> c, A = rand(2, dtype=float64), rand(5, 2, dtype=float64)
        >>> B = OuterProductLinearOperator(c, A)
        >>> B.shape
        (5, 5)
        >>> (B @ eye(5, dtype=float64)).allclose(A @ c.diag() @ A.T)
        True
    """

    SELF_ADJOINT: bool = True

    def __init__(self, c: Tensor, A: Tensor):
        r"""Store the coefficients and vectors.

        Args:
            c: Coefficients :math:`c_i`, of shape ``[K]``.
            A: The vectors :math:`\mathbf{a}_i` as columns, of shape ``[D, K]``.

        Raises:
            ValueError: If the shapes do not fit or devices or dtypes differ.
        """
        if A.ndim != 2 or c.shape != A.shape[1:]:
            raise ValueError(
                f"Expected c of shape [K] and A of shape [D, K], got "
                f"{list(c.shape)} and {list(A.shape)}."
            )
        if (c.device, c.dtype) != (A.device, A.dtype):
            raise ValueError(
                f"c and A must share device and dtype, got ({c.device}, {c.dtype}) "
                f"and ({A.device}, {A.dtype})."
            )
        self._c, self._A = c, A
        super().__init__([(A.shape[0],)], [(A.shape[0],)], A.device, A.dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        r"""Multiply :math:`\mathbf{A} \mathrm{diag}(\mathbf{c}) \mathbf{A}^\top`.

        Args:
            M: One tensor ``[D, N]``.

        Returns:
            One tensor ``[D, N]``.
        """
        return [self._A @ (self._c.unsqueeze(-1) * (self._A.T @ M[0]))]

    def _adjoint(self) -> OuterProductLinearOperator:
        """Return the operator itself (it is symmetric).

        Returns:
            ``self``.
        """
        return self


__all__ = [
    "TensorLinearOperator",
    "IdentityLinearOperator",
    "OuterProductLinearOperator",
]
