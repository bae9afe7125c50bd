"""Shared base of the iterative inverses: solve on flat columns, report convergence."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy
from torch import Tensor, as_tensor

from curvlinops._adapter import adapt, adapt_square
from curvlinops._torch_base import (
    PyTorchLinearOperator,
    _flatten_columns,
    _split_columns,
)


class _InverseLinearOperator(PyTorchLinearOperator):
    """Operator that approximates the inverse of another operator on flat columns.

    Subclasses implement :meth:`_solve` on matrices ``[M, K]``.
    """

    def __init__(self, A):
        """Adapt the operator and take its range as domain and vice versa.

        Args:
            A: The operator to invert (any supported kind).
        """
        self._A = adapt(A).operator
        super().__init__(
            self._A._out_shape, self._A._in_shape, self._A.device, self._A.dtype
        )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        """Solve for all columns at once.

        Args:
            X: Right-hand sides in tensor-list format with trailing column axis.

        Returns:
            The solutions in tensor-list format.
        """
        return _split_columns(self._solve(_flatten_columns(X)), self._out_shape)

    def _solve(self, B: Tensor) -> Tensor:
        """Multiply the approximate inverse onto a matrix.

        Args:
            B: Right-hand sides ``[M, K]``.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError

    def _adapt_preconditioner(
        self, P
    ) -> PyTorchLinearOperator | Callable[[Tensor], Tensor] | None:
        """Adapt a preconditioner to the solver's shape, device and dtype.

        Args:
            P: ``None``, an operator of the solver's shape (any supported kind), or a
                function of a matrix ``[N, K]``.

        Returns:
            The operator as :class:`~curvlinops.PyTorchLinearOperator`, the
            function, or ``None``.

        Raises:
            ValueError: If an operator's shape differs from the solver's.
            TypeError: If ``P`` is neither an operator nor callable.
        """
        if P is None:
            return None
        try:
            P = adapt_square(P, self.device, self.dtype).operator
        except TypeError:
            if not callable(P):
                raise
            return P
        if P.shape != self.shape:
            raise ValueError(
                f"The preconditioner has shape {P.shape}, expected {self.shape}."
            )
        return P

    def _initial_guess(self, x0, num_columns: int) -> Tensor | None:
        """Return an initial guess for a number of columns.

        Args:
            x0: ``None``, a vector ``[N]`` (used for every column) or a matrix
                ``[N, K]`` (torch or NumPy).
            num_columns: Number of right-hand sides ``K``.

        Returns:
            The initial guess ``[N, K]``, or ``None`` for zeros.

        Raises:
            ValueError: If the initial guess has the wrong shape.
        """
        if x0 is None:
            return None
        x0 = x0 if isinstance(x0, Tensor) else numpy.asarray(x0)
        x0 = as_tensor(x0).to(self.device, self.dtype)
        x0 = x0.unsqueeze(-1) if x0.ndim == 1 else x0
        if x0.shape[0] != self.shape[0] or x0.shape[1] not in {1, num_columns}:
            raise ValueError(
                f"Expected x0 of shape [{self.shape[0]}] or [{self.shape[0]}, "
                f"{num_columns}], got {list(x0.shape)}."
            )
        return x0.expand(-1, num_columns)

    def _warn_if_unconverged(self, converged: Tensor, maxiter: int):
        """Warn if some columns did not converge.

        Args:
            converged: Boolean vector of converged columns.
            maxiter: The iteration limit.
        """
        if not converged.all():
            warnings.warn(
                f"{type(self).__name__}: {int((~converged).sum())} of "
                f"{converged.numel()} columns did not converge in {maxiter} "
                "iterations. Increase `maxiter` or relax the tolerances.",
                RuntimeWarning,
                stacklevel=6,  # the user's ``A_inv @ X``
            )
