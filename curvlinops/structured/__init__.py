"""Structured linear operators with closed-form algebra.

Kronecker products, block-diagonal matrices, eigendecomposed symmetric matrices and
diagonal matrices, each with products that exploit the structure and exact
``trace``, ``det``, ``logdet``, ``frobenius_norm`` and ``inverse(damping=...)``,
whose results are structured operators again.
"""

from curvlinops.structured.block_diagonal import BlockDiagonalLinearOperator
from curvlinops.structured.diagonal import DiagonalLinearOperator
from curvlinops.structured.eigh import EighDecomposedLinearOperator
from curvlinops.structured.kronecker import KroneckerProductLinearOperator

__all__ = [
    "KroneckerProductLinearOperator",
    "BlockDiagonalLinearOperator",
    "EighDecomposedLinearOperator",
    "DiagonalLinearOperator",
]
