"""Sub-matrices of linear operators, selected by row and column indices."""

from __future__ import annotations

from operator import index

from numpy import ndarray
from torch import Tensor, as_tensor, long, zeros

from curvlinops._adapter import adapt
from curvlinops._checks import is_integer
from curvlinops._torch_base import PyTorchLinearOperator


class SubmatrixLinearOperator(PyTorchLinearOperator):
    r"""The sub-matrix :math:`\mathbf{A}_{\mathcal{R}, \mathcal{C}}` of an operator.

    For row indices :math:`\mathcal{R}` and column indices :math:`\mathcal{C}`,
    represents the matrix with entries :math:`[\mathbf{A}]_{r, c}` for
    :math:`r \in \mathcal{R}, c \in \mathcal{C}` (in the order of the index lists),
    i.e. ``A[row_idxs, :][:, col_idxs]``. A product scatters the columns into
    zero-padded vectors of length :math:`N`, multiplies with :math:`\mathbf{A}`
    once, and gathers the selected rows, so the sub-matrix of a matrix-free
    operator stays matrix-free. The adjoint is the sub-matrix of
    :math:`\mathbf{A}^\top` with the index lists swapped.

    Example:
        >>> from torch import arange, eye, float64
        >>> A = arange(16, dtype=float64).reshape(4, 4)
        >>> A_sub = SubmatrixLinearOperator(A, [0, 2], [3, 1, 0])
        >>> A_sub.shape
        (2, 3)
        >>> A_sub @ eye(3, dtype=float64)
        tensor([[ 3.,  1.,  0.],
                [11.,  9.,  8.]], dtype=torch.float64)
    """

    def __init__(self, A, row_idxs: list[int], col_idxs: list[int]):
        """Store the operator and the indices of the sub-matrix.

        Args:
            A: An operator of shape ``[M, N]``: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            row_idxs: Row indices of the sub-matrix, unique integers in
                :math:`[0, M)` (a list, or a 1d integer tensor or NumPy array).
            col_idxs: Column indices of the sub-matrix, unique integers in
                :math:`[0, N)` (likewise).
        """
        self._A = adapt(A).operator
        self.set_submatrix(row_idxs, col_idxs)

    def set_submatrix(self, row_idxs: list[int], col_idxs: list[int]):
        """Select the rows and columns of the sub-matrix (this changes its shape).

        Args:
            row_idxs: Row indices of the sub-matrix, unique integers in
                :math:`[0, M)` (a list, or a 1d integer tensor or NumPy array).
            col_idxs: Column indices of the sub-matrix, unique integers in
                :math:`[0, N)` (likewise).
        """
        num_rows, num_cols = self._A.shape
        rows = _check_indices(row_idxs, num_rows, "row_idxs")
        cols = _check_indices(col_idxs, num_cols, "col_idxs")  # both checked first
        self._row_idxs, self._col_idxs = rows, cols
        super().__init__(
            [(len(self._col_idxs),)],
            [(len(self._row_idxs),)],
            self._A.device,
            self._A.dtype,
        )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        """Embed the columns, multiply with the operator, select the rows.

        Args:
            X: One tensor ``[len(col_idxs), K]``.

        Returns:
            One tensor ``[len(row_idxs), K]``.
        """
        (M,) = X
        embedded = zeros(self._A.shape[1], M.shape[1], device=M.device, dtype=M.dtype)
        embedded[self._col_idxs.to(M.device)] = M
        return [(self._A @ embedded)[self._row_idxs.to(M.device)]]

    def _adjoint(self) -> SubmatrixLinearOperator:
        """Return the sub-matrix of the adjoint with swapped indices.

        Returns:
            The adjoint operator.
        """
        return SubmatrixLinearOperator(
            self._A.adjoint(), self._col_idxs.tolist(), self._row_idxs.tolist()
        )


def _check_indices(idxs: list[int], dim: int, name: str) -> Tensor:
    """Verify indices of a sub-matrix and return them as tensor.

    Args:
        idxs: The indices: a list, or a 1d integer tensor or NumPy array.
        dim: The size of the indexed dimension.
        name: Name of the indices in error messages.

    Returns:
        The indices as a 1d integer tensor.

    Raises:
        ValueError: If the indices are empty, contain non-integers, duplicates, or
            values outside ``[0, dim)``.
    """
    if isinstance(idxs, (Tensor, ndarray)):  # entries become Python numbers
        idxs = idxs.tolist()
    idxs = list(idxs)
    if not idxs:
        raise ValueError(f"`{name}` is empty: expected at least one index.")
    non_int = [i for i in idxs if not is_integer(i)]
    if non_int:
        raise ValueError(f"`{name}` must contain integers, got {non_int}.")
    idxs = [index(i) for i in idxs]
    if len(set(idxs)) != len(idxs):
        raise ValueError(f"`{name}` must not contain duplicates, got {idxs}.")
    outside = [i for i in idxs if not 0 <= i < dim]
    if outside:
        raise ValueError(f"`{name}` must lie in [0, {dim}), got {outside}.")
    return as_tensor(idxs, dtype=long)


__all__ = ["SubmatrixLinearOperator"]
