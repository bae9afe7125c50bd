r"""Inverses of linear operators: CG, LSMR, Neumann series, and KFAC's inverse.

Each class wraps an operator :math:`\mathbf{A}` (a
:class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a SciPy
``LinearOperator``) and is itself a :class:`~curvlinops.PyTorchLinearOperator` that
multiplies with an approximation of :math:`\mathbf{A}^{-1}`. Products run in
PyTorch on the operator's device, solve for all columns of a matrix at once, and
can be handed to SciPy via :meth:`~curvlinops.PyTorchLinearOperator.to_scipy`.
:class:`KFACInverseLinearOperator` inverts KFAC and EKFAC exactly through their
Kronecker factors (it lives in ``curvlinops/_kfac_inverse.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy
from torch import Tensor, as_tensor, isfinite

from curvlinops._adapter import adapt, adapt_square
from curvlinops._checks import check_integer, check_symmetry
from curvlinops._kfac_inverse import KFACInverseLinearOperator
from curvlinops._krylov import conjugate_gradients, lsmr
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

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Solve for all columns at once.

        Args:
            M: Right-hand sides in tensor-list format with trailing column axis.

        Returns:
            The solutions in tensor-list format.
        """
        return _split_columns(self._solve(_flatten_columns(M)), self._out_shape)

    def _solve(self, B: Tensor) -> Tensor:
        """Multiply the approximate inverse onto a matrix.

        Args:
            B: Right-hand sides ``[M, K]``.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError

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


class CGInverseLinearOperator(_InverseLinearOperator):
    r"""Inverse of a symmetric positive definite operator via conjugate gradients.

    Multiplying onto :math:`\mathbf{B}` solves :math:`\mathbf{A}\mathbf{X} =
    \mathbf{B}` with the method of conjugate gradients, for all columns at once
    (one product with :math:`\mathbf{A}` per iteration) and in PyTorch, so it runs
    on GPU. Column :math:`k` stops once :math:`\lVert \mathbf{b}_k - \mathbf{A}
    \mathbf{x}_k \rVert_2 \le \max(\mathrm{tol} \lVert \mathbf{b}_k \rVert_2,
    \mathrm{atol})`, as in :func:`scipy.sparse.linalg.cg`; a ``RuntimeWarning``
    reports columns that do not converge within ``maxiter`` iterations. The operator
    is self-adjoint. See

    - Hestenes, M. R., & Stiefel, E. (1952). Methods of conjugate gradients for
      solving linear systems. Journal of Research of the National Bureau of
      Standards.

    Example:
        >>> from torch import eye, float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> X = rand(5, 5, dtype=float64)
        >>> A = X @ X.T + eye(5, dtype=float64)  # SPD
        >>> A_inv = CGInverseLinearOperator(A, tol=1e-10)
        >>> b = rand(5, dtype=float64)
        >>> (A @ (A_inv @ b)).allclose(b)
        True
    """

    SELF_ADJOINT: bool = True

    def __init__(self, A, *, check_symmetric: bool = True, **cg_hyperparameters):
        """Store the operator and the hyperparameters of CG.

        Args:
            A: Symmetric positive definite operator: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            check_symmetric: Probe that ``A`` is symmetric (one product with 8
                columns, skipped for operators with ``SELF_ADJOINT`` such as the
                curvature operators) and raise a ``ValueError`` if it is not; CG
                silently returns wrong solutions for non-symmetric operators.
                Default: ``True``.
            **cg_hyperparameters: Keyword arguments of
                :meth:`set_cg_hyperparameters`.

        Raises:
            ValueError: If the operator is not square or not symmetric.
        """
        super().__init__(adapt_square(A))
        if check_symmetric:
            check_symmetry(self._A, "CGInverseLinearOperator")
        self.set_cg_hyperparameters(**cg_hyperparameters)

    def set_cg_hyperparameters(
        self,
        x0=None,
        tol: float = 1e-5,
        maxiter: int | None = None,
        M=None,
        callback: Callable[[Tensor], None] | None = None,
        atol: float | None = None,
    ):
        r"""Set the hyperparameters of CG (names follow :func:`scipy.sparse.linalg.cg`).

        Args:
            x0: Initial guess, a vector ``[N]`` (used for every column) or a matrix
                ``[N, K]`` (torch or NumPy). Default: zeros.
            tol: Relative tolerance on the residual norm. Default: ``1e-5``.
            maxiter: Maximum number of iterations. Default: ``10 * N``.
            M: Preconditioner, an operator (any supported kind) that approximates
                :math:`\mathbf{A}^{-1}` and is symmetric positive definite.
                Default: none.
            callback: Function called after each iteration with the current
                iterate, a tensor ``[N, K]``.
            atol: Absolute tolerance on the residual norm. Default: ``0``.

        Raises:
            ValueError: If a tolerance is negative or ``maxiter`` is not positive.
        """
        if tol < 0 or (atol is not None and atol < 0):
            raise ValueError(f"Tolerances must be >= 0, got {tol=} and {atol=}.")
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"`maxiter` must be positive, got {maxiter}.")
        self._x0 = x0
        self._tol, self._atol = tol, 0.0 if atol is None else atol
        self._maxiter = 10 * self.shape[0] if maxiter is None else maxiter
        self._preconditioner = None
        if M is not None:
            self._preconditioner = adapt_square(M, self.device, self.dtype).operator
        self._callback = callback

    def _initial_guess(self, num_columns: int) -> Tensor | None:
        """Return the initial guess for a number of columns.

        Args:
            num_columns: Number of right-hand sides.

        Returns:
            The initial guess ``[N, K]``, or ``None`` for zeros.

        Raises:
            ValueError: If the initial guess has the wrong shape.
        """
        if self._x0 is None:
            return None
        x0 = self._x0 if isinstance(self._x0, Tensor) else numpy.asarray(self._x0)
        x0 = as_tensor(x0).to(self.device, self.dtype)
        x0 = x0.unsqueeze(-1) if x0.ndim == 1 else x0
        if x0.shape[0] != self.shape[0] or x0.shape[1] not in {1, num_columns}:
            raise ValueError(
                f"Expected x0 of shape [{self.shape[0]}] or [{self.shape[0]}, "
                f"{num_columns}], got {list(x0.shape)}."
            )
        return x0.expand(-1, num_columns)

    def _solve(self, B: Tensor) -> Tensor:
        """Run CG on all columns.

        Args:
            B: Right-hand sides ``[N, K]``.

        Returns:
            The approximate solutions ``[N, K]``.
        """
        precondition = None
        if self._preconditioner is not None:
            precondition = self._preconditioner.__matmul__
        X, converged = conjugate_gradients(
            self._A.__matmul__,
            B,
            self._initial_guess(B.shape[1]),
            self._tol,
            self._atol,
            self._maxiter,
            precondition,
            self._callback,
        )
        self._warn_if_unconverged(converged, self._maxiter)
        return X


class LSMRInverseLinearOperator(_InverseLinearOperator):
    r"""(Pseudo-)inverse of an operator via the least-squares solver LSMR.

    Multiplying onto :math:`\mathbf{B}` solves, for every column, the damped
    least-squares problem :math:`\min_{\mathbf{x}} \lVert \mathbf{A}\mathbf{x} -
    \mathbf{b} \rVert_2^2 + \lambda^2 \lVert \mathbf{x} \rVert_2^2`, i.e.
    multiplies with :math:`(\mathbf{A}^\top \mathbf{A} + \lambda^2
    \mathbf{I})^{-1} \mathbf{A}^\top` (the pseudo-inverse :math:`\mathbf{A}^+` for
    :math:`\lambda = 0`). :math:`\mathbf{A}` may be non-square, singular or
    indefinite, but needs an adjoint. All columns are solved at once in PyTorch
    (two products per iteration); the stopping rules are those of
    :func:`scipy.sparse.linalg.lsmr`, and a ``RuntimeWarning`` reports columns
    that do not meet them within ``maxiter`` iterations. The adjoint is the LSMR
    inverse of :math:`\mathbf{A}^\top`. See

    - Fong, D. C.-L., & Saunders, M. (2011). LSMR: An iterative algorithm for sparse
      least-squares problems. SIAM Journal on Scientific Computing.

    Example:
        >>> from torch import float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> A = rand(6, 4, dtype=float64)  # tall: least-squares solutions
        >>> A_pinv = LSMRInverseLinearOperator(A, atol=1e-12, btol=1e-12, maxiter=50)
        >>> b = rand(6, dtype=float64)
        >>> (A_pinv @ b).allclose(A.pinverse() @ b)
        True
    """

    def __init__(self, A, **lsmr_hyperparameters):
        """Store the operator and the hyperparameters of LSMR.

        Args:
            A: Operator of shape ``[M, N]``: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            **lsmr_hyperparameters: Keyword arguments of
                :meth:`set_lsmr_hyperparameters`.
        """
        super().__init__(A)
        self.SELF_ADJOINT = self._A.SELF_ADJOINT
        self.set_lsmr_hyperparameters(**lsmr_hyperparameters)

    def set_lsmr_hyperparameters(
        self,
        damp: float = 0.0,
        atol: float = 1e-6,
        btol: float = 1e-6,
        conlim: float = 1e8,
        maxiter: int | None = None,
    ):
        r"""Set the hyperparameters of LSMR (as in :func:`scipy.sparse.linalg.lsmr`).

        Args:
            damp: Damping :math:`\lambda \ge 0`. Default: ``0``.
            atol: Relative tolerance on :math:`\lVert \mathbf{A}^\top \mathbf{r}
                \rVert` and on the residual's part due to :math:`\mathbf{x}`.
                Default: ``1e-6``.
            btol: Relative tolerance on the residual's part due to
                :math:`\mathbf{b}`. Default: ``1e-6``.
            conlim: Stop once the condition number estimate exceeds this value;
                ``0`` disables this rule. Default: ``1e8``.
            maxiter: Maximum number of iterations. Default: ``min(M, N)``.

        Raises:
            ValueError: If a value is negative or ``maxiter`` is not positive.
        """
        if min(damp, atol, btol, conlim) < 0:
            raise ValueError(
                f"Expected non-negative values, got {damp=}, {atol=}, {btol=}, "
                f"{conlim=}."
            )
        if maxiter is not None:
            maxiter = check_integer(maxiter, "maxiter", minimum=1)
        self._hyperparameters = {
            "damp": damp,
            "atol": atol,
            "btol": btol,
            "conlim": conlim,
            "maxiter": maxiter,
        }

    def _solve(self, B: Tensor) -> Tensor:
        """Run LSMR on all columns.

        Args:
            B: Right-hand sides ``[M, K]``.

        Returns:
            The approximate solutions ``[N, K]``.
        """
        hyperparameters = dict(self._hyperparameters)
        if hyperparameters["maxiter"] is None:
            hyperparameters["maxiter"] = min(self.shape)
        A, A_adjoint = self._A, self._A.adjoint()
        X, converged = lsmr(A.__matmul__, A_adjoint.__matmul__, B, **hyperparameters)
        self._warn_if_unconverged(converged, hyperparameters["maxiter"])
        return X

    def _adjoint(self) -> LSMRInverseLinearOperator:
        """Return the LSMR inverse of the adjoint, with the same hyperparameters.

        Returns:
            The adjoint operator.
        """
        return LSMRInverseLinearOperator(self._A.adjoint(), **self._hyperparameters)


class NeumannInverseLinearOperator(_InverseLinearOperator):
    r"""Inverse of an operator via a truncated, scaled Neumann series.

    If all eigenvalues of :math:`\alpha \mathbf{A}` lie in :math:`(0, 2)`, i.e.
    :math:`0 < \lambda(\mathbf{A}) < 2/\alpha`, the Neumann series converges:

    .. math::
        \mathbf{A}^{-1}
        = \alpha (\alpha \mathbf{A})^{-1}
        = \alpha \sum_{k=0}^{\infty} (\mathbf{I} - \alpha \mathbf{A})^k
        \approx \alpha \sum_{k=0}^{K} (\mathbf{I} - \alpha \mathbf{A})^k\,.

    Multiplying onto a matrix costs :math:`K` = ``num_terms`` products with
    :math:`\mathbf{A}`. Convergence can be slow (the error decays as
    :math:`|1 - \alpha \lambda|^{K+1}` along each eigenvector), and for eigenvalues
    outside the above interval the series diverges until it overflows to
    ``inf``/``NaN``; ``check_nan`` turns this into an error. For accurate solves of
    SPD systems, use :class:`CGInverseLinearOperator`. The series was popularized
    for implicit differentiation by

    - Lorraine, J., Vicol, P., & Duvenaud, D. (2020). Optimizing millions of
      hyperparameters by implicit differentiation. International Conference on
      Artificial Intelligence and Statistics (AISTATS).

    Example:
        >>> from torch import float64, manual_seed, rand, eye
        >>> _ = manual_seed(0)
        >>> X = rand(5, 5, dtype=float64)
        >>> A = X @ X.T / 10 + eye(5, dtype=float64)  # eigenvalues in [1, 1.7]
        >>> A_inv = NeumannInverseLinearOperator(A, num_terms=200, scale=0.5)
        >>> b = rand(5, dtype=float64)
        >>> (A @ (A_inv @ b)).allclose(b)
        True
    """

    def __init__(
        self, A, num_terms: int = 100, scale: float = 1.0, check_nan: bool = True
    ):
        r"""Store the operator and the hyperparameters of the series.

        Args:
            A: Square operator: a :class:`~curvlinops.PyTorchLinearOperator`, a
                torch or NumPy matrix, or a SciPy ``LinearOperator``.
            num_terms: Number of terms :math:`K` after the first. Default: ``100``.
            scale: Scale :math:`\alpha` of the operator in the series; choose it
                below :math:`2 / \lambda_{\max}(\mathbf{A})`. Default: ``1.0``.
            check_nan: Whether to raise an error if the series diverged to
                non-finite values. Default: ``True``.

        Raises:
            ValueError: If the operator is not square.
        """
        super().__init__(adapt_square(A))
        self.SELF_ADJOINT = self._A.SELF_ADJOINT
        self.set_neumann_hyperparameters(num_terms, scale, check_nan)

    def set_neumann_hyperparameters(
        self, num_terms: int = 100, scale: float = 1.0, check_nan: bool = True
    ):
        r"""Set the hyperparameters of the truncated Neumann series.

        Args:
            num_terms: Number of terms :math:`K` after the first. Default: ``100``.
            scale: Scale :math:`\alpha`; the series converges if
                :math:`0 < \lambda(\mathbf{A}) < 2 / \alpha`. Default: ``1.0``.
            check_nan: Whether to raise an error if the series diverged to
                non-finite values. Default: ``True``.

        Raises:
            ValueError: If ``num_terms`` is negative or ``scale`` is not positive.
        """
        num_terms = check_integer(num_terms, "num_terms", minimum=0)
        if scale <= 0:
            raise ValueError(f"`scale` must be positive, got {scale}.")
        self._num_terms, self._scale, self._check_nan = num_terms, scale, check_nan

    def _solve(self, B: Tensor) -> Tensor:
        r"""Sum the truncated series, multiplied onto the right-hand sides.

        Args:
            B: Right-hand sides ``[N, K]``.

        Returns:
            The truncated series ``[N, K]``.

        Raises:
            RuntimeError: If ``check_nan`` and the result is not finite.

        Warns:
            UserWarning: If the last term is larger than the first, i.e. the series
                diverges (in either case).
        """
        term, result = B, B.clone()
        for _ in range(self._num_terms):
            term = term - self._scale * (self._A @ term)
            result = result + term
        result = self._scale * result
        advice = (
            "It converges if 0 < scale * eigenvalue < 2 for every eigenvalue of the "
            f"operator: decrease `scale` (now {self._scale}) below 2 / (largest "
            "eigenvalue), or use CGInverseLinearOperator."
        )
        if self._check_nan and not isfinite(result).all():
            raise RuntimeError(
                f"The Neumann series diverged to non-finite values. {advice}"
            )
        if not term.norm() <= B.norm():  # growing (or non-finite) terms: diverging
            warnings.warn(
                f"The Neumann series diverges (its last term outgrew the first). "
                f"{advice}",
                stacklevel=2,
            )
        return result

    def _adjoint(self) -> NeumannInverseLinearOperator:
        """Return the Neumann series of the adjoint, with the same hyperparameters.

        Returns:
            The adjoint operator.
        """
        return NeumannInverseLinearOperator(
            self._A.adjoint(), self._num_terms, self._scale, self._check_nan
        )


__all__ = [
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "KFACInverseLinearOperator",
]
