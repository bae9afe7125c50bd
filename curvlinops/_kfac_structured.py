r"""KFAC-type operators through their structured form: products and closed forms.

KFAC, EKFAC and KFOC are block-diagonal in the canonical form of
:mod:`curvlinops.kfac_utils`: with the orthogonal permutation :math:`\mathbf{P}`
into it (:class:`~curvlinops.kfac_utils.ToCanonicalLinearOperator`), each is
:math:`\mathbf{P}^\top \mathrm{diag}(\mathbf{B}_1, \dots, \mathbf{B}_n)
\mathbf{P}` with structured blocks :math:`\mathbf{B}_j` (Kronecker products,
eigendecompositions). :class:`_KFACStructuredMixin` multiplies with that form and
reads ``trace``, ``det``, ``logdet`` and ``frobenius_norm`` from its closed forms,
cached until the factors change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.structured import BlockDiagonalLinearOperator

MATRIX_FUNCTIONS = ("trace", "det", "logdet", "frobenius_norm")


class _KFACStructuredMixin:
    """Products and matrix functions of KFAC-type operators from structured blocks.

    The operator implements ``to_structured()`` (a
    :class:`~curvlinops.BlockDiagonalLinearOperator` with one block per canonical
    block, in block order, each acting on one tensor) and provides ``_lock``
    (reentrant), ``_to_canonical`` and ``_from_canonical``, and sets
    ``_structured_form = None`` when set up. It publishes new factors with
    :meth:`_publish_factors`, so that the structured form, which is built once per
    set of factors, is rebuilt.
    """

    _TRANSIENT = ("_structured_form",)  # rebuilt from the factors after copying

    def _publish_factors(self, **factors: Any):
        """Replace cached factors at once and forget the structured form.

        Args:
            **factors: New values by attribute name.
        """
        with self._lock:  # products see either the old or the new factors
            for name, value in factors.items():
                setattr(self, name, value)
            self._structured_form = None
            self._factors_ready = True

    def _structured(self) -> BlockDiagonalLinearOperator:
        """Return ``to_structured()``, built once per set of factors.

        Returns:
            The block-diagonal operator on the canonical blocks.
        """
        with self._lock:
            if self._structured_form is None:
                self._structured_form = self.to_structured()
            return self._structured_form

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply the structured form onto a matrix, in the canonical form.

        Args:
            M: Tensors ``[*param.shape, K]``.

        Returns:
            The product, tensors ``[*param.shape, K]``.
        """
        return self._blockwise(M, self._structured().blocks)

    def _blockwise(self, M: list[Tensor], blocks: list[PyTorchLinearOperator]):
        """Apply one square operator per canonical block to a matrix.

        Args:
            M: Tensors ``[*param.shape, K]`` in parameter order.
            blocks: Operators on one tensor each (e.g. ``[D_out, D_in]`` for a
                Kronecker product), of the canonical blocks' sizes, in block order.

        Returns:
            The result in parameter format.
        """
        canonical = self._to_canonical._matmat(M)
        return self._from_canonical._matmat(
            [
                block._matmat([m.reshape(*block._in_shape[0], -1)])[0].reshape(m.shape)
                for block, m in zip(blocks, canonical)
            ]
        )

    def _cached(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """Return a cached matrix function, computing it if needed.

        The caches are cleared whenever the factors change.

        Args:
            name: One of ``MATRIX_FUNCTIONS``.
            compute: Computes the value from the factors.

        Returns:
            The value.
        """
        with self._lock:  # computed once, also if threads ask at the same time
            value = getattr(self, f"_{name}", None)
            if value is None:
                value = compute()  # may compute the factors, which clears the caches
                setattr(self, f"_{name}", value)
            return value

    def _forget_matrix_functions(self):
        """Clear the cached matrix functions."""
        for name in MATRIX_FUNCTIONS:
            setattr(self, f"_{name}", None)

    @property
    def trace(self) -> Tensor:
        """The trace, in closed form from the factors (cached until they change).

        Returns:
            A scalar tensor: the sum of the blocks' traces.
        """
        return self._cached("trace", lambda: self._structured().trace)

    @property
    def logdet(self) -> Tensor:
        """The log-determinant, in closed form from the factors (cached).

        Returns:
            A scalar tensor: the sum of the blocks' log-determinants; ``-inf`` if a
            block is singular.
        """
        return self._cached("logdet", lambda: self._structured().logdet)

    @property
    def det(self) -> Tensor:
        """The determinant, the exponential of :attr:`logdet` (cached).

        Returns:
            A scalar tensor.
        """
        return self._cached("det", lambda: self.logdet.exp())

    @property
    def frobenius_norm(self) -> Tensor:
        """The Frobenius norm, in closed form from the factors (cached).

        Returns:
            A scalar tensor: the root of the sum of the blocks' squared norms.
        """
        return self._cached("frobenius_norm", lambda: self._structured().frobenius_norm)
