"""Conjugate gradients as an inverse operator, with SciPy's or 3.x's hyperparameters.

:class:`CGInverseLinearOperator` is part of :mod:`curvlinops.inverse`, where it is
imported from.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from curvlinops._adapter import adapt_square
from curvlinops._checks import check_integer, check_symmetry, is_integer
from curvlinops._inverse_base import _InverseLinearOperator
from curvlinops._krylov import batched_conjugate_gradients, conjugate_gradients
from curvlinops._torch_base import PyTorchLinearOperator


class CGInverseLinearOperator(_InverseLinearOperator):
    r"""Inverse of a symmetric positive definite operator via conjugate gradients.

    Multiplying onto :math:`\mathbf{B}` solves :math:`\mathbf{A}\mathbf{X} =
    \mathbf{B}` with the method of conjugate gradients, for all columns at once
    (one product with :math:`\mathbf{A}` per iteration) and in PyTorch, so it runs
    on GPU. A preconditioner :math:`\mathbf{P} \approx \mathbf{A}^{-1}` (any
    operator, e.g. a :class:`KFACInverseLinearOperator`, a matrix, or a function
    of a matrix ``[N, K]``) turns it into preconditioned CG, which converges in
    fewer iterations when :math:`\mathbf{P}\mathbf{A}` is better conditioned than
    :math:`\mathbf{A}`. The operator is self-adjoint. Two sets of hyperparameters
    are accepted (not mixed in one call):

    - SciPy's (spec 003, :meth:`set_cg_hyperparameters`; also the default): column
      :math:`k` stops once :math:`\lVert \mathbf{b}_k - \mathbf{A}
      \mathbf{x}_k \rVert_2 \le \max(\mathrm{tol} \lVert \mathbf{b}_k \rVert_2,
      \mathrm{atol})`, as in :func:`scipy.sparse.linalg.cg`; a
      ``RuntimeWarning`` reports columns that do not converge within ``maxiter``
      iterations.
    - GPyTorch's batched CG, as curvlinops 3.x (:meth:`set_batched_cg_hyperparameters`;
      keywords ``tolerance``, ``max_iter``, ``eps``, ``stop_updating_after``,
      ``initial_guess``, ``preconditioner``, ``n_tridiag``,
      ``max_tridiag_iter``): the columns are normalized, a column stops updating
      once its relative residual norm is below ``stop_updating_after``, and all
      stop once the *mean* relative residual norm is below ``tolerance`` (after at
      least 11 iterations); a ``RuntimeWarning`` reports a mean above it.

    See

    - Hestenes, M. R., & Stiefel, E. (1952). Methods of conjugate gradients for
      solving linear systems. Journal of Research of the National Bureau of
      Standards.
    - Gardner, J. R., Pleiss, G., Bindel, D., Weinberger, K. Q., & Wilson, A. G.
      (2018). GPyTorch: Blackbox matrix-matrix Gaussian process inference with
      GPU acceleration. NeurIPS.

    Example:
        >>> from torch import eye, float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> X = rand(5, 5, dtype=float64)
        >>> A = X @ X.T + eye(5, dtype=float64)  # SPD
        >>> A_inv = CGInverseLinearOperator(A, tol=1e-10)  # SciPy's keywords
        >>> b = rand(5, dtype=float64)
        >>> (A @ (A_inv @ b)).allclose(b)
        True
        >>> A_inv = CGInverseLinearOperator(A, tolerance=1e-10, max_iter=50)  # 3.x's
        >>> (A @ (A_inv @ b)).allclose(b)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        tridiag_matrices: After a product with ``n_tridiag > 0``, the tridiagonal
            matrices ``[n_tridiag, m, m]`` of the Lanczos processes that CG ran on
            the first ``n_tridiag`` columns; else ``None``.
    """

    SELF_ADJOINT: bool = True

    def __init__(self, A, **cg_hyperparameters):
        """Store the operator and the hyperparameters of CG.

        Args:
            A: Symmetric positive definite operator: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            **cg_hyperparameters: Keyword arguments of either
                :meth:`set_cg_hyperparameters` (SciPy's names) or
                :meth:`set_batched_cg_hyperparameters` (curvlinops 3.x's names),
                and ``check_symmetric``: probe that ``A`` is symmetric (one
                product with 8 columns, skipped for operators with
                ``SELF_ADJOINT`` such as the curvature operators and their sums)
                and raise a ``ValueError`` if it is not, since CG silently returns
                wrong solutions for non-symmetric operators. Default: ``True``.

        Raises:
            ValueError: If the operator is not square or not symmetric, or keywords
                of both sets are mixed.
            TypeError: If a keyword belongs to neither set.
        """
        super().__init__(adapt_square(A))
        if cg_hyperparameters.pop("check_symmetric", True):
            check_symmetry(self._A, type(self).__name__)
        self.tridiag_matrices = None
        batched = set(cg_hyperparameters) & set(_BATCHED_CG_KEYWORDS)
        scipy = set(cg_hyperparameters) & set(_SCIPY_CG_KEYWORDS)
        unknown = set(cg_hyperparameters) - batched - scipy
        if unknown:
            raise TypeError(
                f"CGInverseLinearOperator got unexpected keyword arguments "
                f"{sorted(unknown)}; expected SciPy's {list(_SCIPY_CG_KEYWORDS)} or "
                f"curvlinops 3.x's {list(_BATCHED_CG_KEYWORDS)}."
            )
        if batched and scipy:
            raise ValueError(
                f"Do not mix SciPy-style CG keywords {sorted(scipy)} with curvlinops "
                f"3.x's (GPyTorch-style) keywords {sorted(batched)}: use one set."
            )
        if batched:
            self.set_batched_cg_hyperparameters(**cg_hyperparameters)
        else:
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
        r"""Set SciPy-style hyperparameters (names of :func:`scipy.sparse.linalg.cg`).

        Args:
            x0: Initial guess, a vector ``[N]`` (used for every column) or a matrix
                ``[N, K]`` (torch or NumPy). Default: zeros.
            tol: Relative tolerance on the residual norm. Default: ``1e-5``.
            maxiter: Maximum number of iterations. Default: ``10 * N``.
            M: Preconditioner that approximates :math:`\mathbf{A}^{-1}` and is
                symmetric positive definite: an operator (any supported kind, e.g.
                a :class:`KFACInverseLinearOperator`) or a function that multiplies
                it onto a matrix ``[N, K]``. Default: none.
            callback: Function called after each iteration with the current
                iterate, a tensor ``[N, K]``.
            atol: Absolute tolerance on the residual norm. Default: ``0``.

        Raises:
            ValueError: If a tolerance is negative or ``maxiter`` is not a positive
                integer.
        """
        if tol < 0 or (atol is not None and atol < 0):
            raise ValueError(f"Tolerances must be >= 0, got {tol=} and {atol=}.")
        maxiter = 10 * self.shape[0] if maxiter is None else maxiter
        self._set_common(x0, maxiter, M, "maxiter")
        self._batched = None
        self._tol, self._atol = tol, 0.0 if atol is None else atol
        self._callback = callback

    def set_batched_cg_hyperparameters(
        self,
        tolerance: float = 1.0,
        max_iter: int = 1000,
        eps: float = 1e-10,
        stop_updating_after: float = 1e-10,
        max_tridiag_iter: int = 20,
        initial_guess=None,
        preconditioner=None,
        n_tridiag: int = 0,
    ):
        r"""Set the hyperparameters of curvlinops 3.x's (GPyTorch-style) batched CG.

        The defaults are GPyTorch's: its loose ``tolerance`` of 1 relies on the
        minimum of 11 iterations; pass a small ``tolerance`` for accurate solves.

        Args:
            tolerance: Bound on the mean relative residual norm
                :math:`\lVert \mathbf{b}_k - \mathbf{A}\mathbf{x}_k \rVert /
                \lVert \mathbf{b}_k \rVert` over the columns. Default: ``1.0``.
            max_iter: Maximum number of iterations. Default: ``1000``.
            eps: Denominators of CG's coefficients below ``eps`` give zero
                coefficients (a guard against division by zero). Default:
                ``1e-10``.
            stop_updating_after: Relative residual norm below which a column stops
                updating. Default: ``1e-10``.
            max_tridiag_iter: Largest size of the tridiagonal matrices (see
                ``n_tridiag``). Default: ``20``.
            initial_guess: Initial guess, a vector ``[N]`` or a matrix ``[N, K]``.
                Default: zeros.
            preconditioner: Approximation of :math:`\mathbf{A}^{-1}` applied to
                the residuals: an operator (any supported kind) or a function of a
                matrix ``[N, K]``. Default: none.
            n_tridiag: Number of leading columns for which the tridiagonal
                matrices of the implicit Lanczos process are kept in
                :attr:`tridiag_matrices` (CG then runs at least
                ``max_tridiag_iter`` iterations). Default: ``0``.

        Raises:
            ValueError: If a value is out of range.
        """
        if min(tolerance, eps, stop_updating_after) < 0:
            raise ValueError(
                f"Expected non-negative values, got {tolerance=}, {eps=}, "
                f"{stop_updating_after=}."
            )
        if not (
            is_integer(n_tridiag)
            and n_tridiag >= 0
            and is_integer(max_tridiag_iter)
            and max_tridiag_iter >= 1
        ):
            raise ValueError(
                f"Expected n_tridiag >= 0 and max_tridiag_iter >= 1, got {n_tridiag=} "
                f"and {max_tridiag_iter=}."
            )
        self._set_common(initial_guess, max_iter, preconditioner, "max_iter")
        self._batched = {
            "tolerance": tolerance,
            "eps": eps,
            "stop_updating_after": stop_updating_after,
            "n_tridiag": int(n_tridiag),
            "max_tridiag_iter": int(max_tridiag_iter),
        }

    def _set_common(self, x0, maxiter: int, preconditioner, maxiter_name: str):
        """Store the initial guess, iteration limit and preconditioner of both styles.

        Args:
            x0: Initial guess or ``None``.
            maxiter: Maximum number of iterations.
            preconditioner: Preconditioner (operator or function) or ``None``.
            maxiter_name: Name of the iteration limit in error messages.

        Raises:
            ValueError: If the iteration limit is not a positive integer (Python or
                NumPy).
        """
        maxiter = check_integer(maxiter, maxiter_name, minimum=1)
        precondition = self._as_preconditioner(preconditioner)  # checked first
        self._x0, self._maxiter, self._preconditioner = x0, maxiter, precondition

    def _as_preconditioner(self, P) -> Callable[[Tensor], Tensor] | None:
        """Turn a preconditioner into a function of matrices ``[N, K]``.

        Args:
            P: ``None``, an operator of the solver's shape (any supported kind),
                or a function of a matrix ``[N, K]``.

        Returns:
            The function, or ``None``.
        """
        P = self._adapt_preconditioner(P)
        return P.__matmul__ if isinstance(P, PyTorchLinearOperator) else P

    def _solve(self, B: Tensor) -> Tensor:
        """Run CG on all columns.

        Args:
            B: Right-hand sides ``[N, K]``.

        Returns:
            The approximate solutions ``[N, K]``.
        """
        X0 = self._initial_guess(self._x0, B.shape[1])
        if self._batched is not None:
            return self._solve_batched(B, X0)
        X, converged, _ = conjugate_gradients(
            self._A.__matmul__,
            B,
            X0,
            self._tol,
            self._atol,
            self._maxiter,
            self._preconditioner,
            self._callback,
        )
        self._warn_if_unconverged(converged, self._maxiter)
        return X

    def _solve_batched(self, B: Tensor, X0: Tensor | None) -> Tensor:
        """Run GPyTorch-style batched CG on all columns.

        Args:
            B: Right-hand sides ``[N, K]``.
            X0: Initial guess ``[N, K]`` or ``None``.

        Returns:
            The approximate solutions ``[N, K]``.
        """
        X, converged, self.tridiag_matrices = batched_conjugate_gradients(
            self._A.__matmul__,
            B,
            X0,
            max_iter=self._maxiter,
            preconditioner=self._preconditioner,
            **self._batched,
        )
        if not converged:
            warnings.warn(
                f"{type(self).__name__}: the mean relative residual norm did not "
                f"fall below tolerance={self._batched['tolerance']} in "
                f"{self._maxiter} iterations. Increase `max_iter`.",
                RuntimeWarning,
                stacklevel=6,
            )
        return X


# The keywords of the two hyperparameter styles of CGInverseLinearOperator.
_SCIPY_CG_KEYWORDS = ("x0", "tol", "maxiter", "M", "callback", "atol")
_BATCHED_CG_KEYWORDS = (
    "tolerance",
    "max_iter",
    "eps",
    "stop_updating_after",
    "max_tridiag_iter",
    "initial_guess",
    "preconditioner",
    "n_tridiag",
)
