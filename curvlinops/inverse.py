r"""Inverses of linear operators: CG, LSMR, Neumann series, and KFAC's inverse.

Each class wraps an operator :math:`\mathbf{A}` (a
:class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a SciPy
``LinearOperator``) and is itself a :class:`~curvlinops.PyTorchLinearOperator` that
multiplies with an approximation of :math:`\mathbf{A}^{-1}`. Products run in
PyTorch on the operator's device, solve for all columns of a matrix at once, and
can be handed to SciPy via :meth:`~curvlinops.PyTorchLinearOperator.to_scipy`.
:class:`KFACInverseLinearOperator` inverts KFAC and EKFAC exactly through their
Kronecker factors (it lives in ``curvlinops/_kfac_inverse.py``, as
:class:`CGInverseLinearOperator` lives in ``curvlinops/_cg_inverse.py``).
"""

from __future__ import annotations

import warnings

from torch import Tensor, isfinite

from curvlinops._adapter import adapt_square
from curvlinops._cg_inverse import CGInverseLinearOperator
from curvlinops._checks import check_integer
from curvlinops._inverse_base import _InverseLinearOperator
from curvlinops._kfac_inverse import KFACInverseLinearOperator, KFACInvType
from curvlinops._krylov import lsmr
from curvlinops._torch_base import PyTorchLinearOperator


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
                :meth:`set_lsmr_hyperparameters`: those of
                :func:`scipy.sparse.linalg.lsmr` (``damp``, ``atol``, ``btol``,
                ``conlim``, ``maxiter``, ``show``, ``x0``).
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
        show: bool = False,
        x0=None,
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
            show: Print the progress of every iteration (running columns, largest
                residual and condition estimates) and a summary. Default:
                ``False``.
            x0: Initial guess, a vector ``[N]`` (used for every column) or a matrix
                ``[N, K]``. As in SciPy, LSMR then solves for the correction
                :math:`\mathbf{x} - \mathbf{x}_0` with right-hand side
                :math:`\mathbf{b} - \mathbf{A}\mathbf{x}_0` (for ``damp > 0``, the
                damping applies to the correction). Not used by the adjoint.
                Default: zeros.

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
            "show": show,
        }
        self._x0 = x0

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
        X0 = self._initial_guess(self._x0, B.shape[1])
        if X0 is not None:
            B = B - A @ X0
        X, converged = lsmr(A.__matmul__, A_adjoint.__matmul__, B, **hyperparameters)
        self._warn_if_unconverged(converged, hyperparameters["maxiter"])
        return X if X0 is None else X + X0

    def _adjoint(self) -> LSMRInverseLinearOperator:
        """Return the LSMR inverse of the adjoint, with the same hyperparameters.

        The initial guess ``x0`` (of the other dimension) is not passed on.

        Returns:
            The adjoint operator.
        """
        return LSMRInverseLinearOperator(self._A.adjoint(), **self._hyperparameters)


class NeumannInverseLinearOperator(_InverseLinearOperator):
    r"""Inverse of an operator via a truncated, scaled (preconditioned) Neumann series.

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

    A preconditioner :math:`\mathbf{P} \approx \mathbf{A}^{-1}` (any operator,
    e.g. a :class:`KFACInverseLinearOperator`, a
    :class:`~curvlinops.DiagonalLinearOperator` or a matrix) applies the series to
    :math:`\mathbf{P}\mathbf{A}`, whose eigenvalues cluster around one if
    :math:`\mathbf{P}` is good:

    .. math::
        \mathbf{A}^{-1} = (\mathbf{P}\mathbf{A})^{-1} \mathbf{P}
        \approx \alpha \sum_{k=0}^{K} (\mathbf{I} - \alpha \mathbf{P}
        \mathbf{A})^k \mathbf{P}\,,

    which converges if :math:`0 < \lambda(\mathbf{P}\mathbf{A}) < 2/\alpha` (for
    symmetric positive definite :math:`\mathbf{A}` and :math:`\mathbf{P}`, the
    eigenvalues of :math:`\mathbf{P}\mathbf{A}` are real and positive); each term
    costs one more product with :math:`\mathbf{P}`. The adjoint is the series of
    :math:`\mathbf{A}^\top` preconditioned with :math:`\mathbf{P}^\top`; the
    operator is self-adjoint if :math:`\mathbf{A}` and :math:`\mathbf{P}` are (a
    preconditioner given as a function is taken to be symmetric).

    Example:
        >>> from torch import float64, manual_seed, rand, eye
        >>> from curvlinops import DiagonalLinearOperator
        >>> _ = manual_seed(0)
        >>> X = rand(5, 5, dtype=float64)
        >>> A = X @ X.T / 10 + eye(5, dtype=float64)  # eigenvalues in [1, 1.7]
        >>> A_inv = NeumannInverseLinearOperator(A, num_terms=200, scale=0.5)
        >>> b = rand(5, dtype=float64)
        >>> (A @ (A_inv @ b)).allclose(b)
        True
        >>> # badly scaled rows and columns: a diagonal preconditioner fixes them
        >>> s = (10 ** rand(5, dtype=float64)).sqrt()
        >>> A_scaled = s.diag() @ A @ s.diag()  # eigenvalues in about [1, 17]
        >>> P = DiagonalLinearOperator(1 / A_scaled.diag())  # Jacobi
        >>> plain = NeumannInverseLinearOperator(A_scaled, num_terms=20, scale=0.1)
        >>> jacobi = NeumannInverseLinearOperator(
        ...     A_scaled, num_terms=20, scale=0.9, preconditioner=P)
        >>> def error(A_inv):
        ...     return (A_scaled @ (A_inv @ b) - b).norm() / b.norm()
        >>> bool(error(jacobi) < 1e-4 < error(plain))
        True
    """

    def __init__(
        self,
        A,
        num_terms: int = 100,
        scale: float = 1.0,
        check_nan: bool = True,
        preconditioner=None,
    ):
        r"""Store the operator and the hyperparameters of the series.

        Args:
            A: Square operator: a :class:`~curvlinops.PyTorchLinearOperator`, a
                torch or NumPy matrix, or a SciPy ``LinearOperator``.
            num_terms: Number of terms :math:`K` after the first. Default: ``100``.
            scale: Scale :math:`\alpha` of the operator in the series; choose it
                below :math:`2 / \lambda_{\max}(\mathbf{A})` (of
                :math:`\mathbf{P}\mathbf{A}` with a preconditioner). Default:
                ``1.0``.
            check_nan: Whether to raise an error if the series diverged to
                non-finite values. Default: ``True``.
            preconditioner: Approximation :math:`\mathbf{P}` of
                :math:`\mathbf{A}^{-1}`: an operator of :math:`\mathbf{A}`'s shape
                (any supported kind) or a function of a matrix ``[N, K]``.
                Default: none.

        Raises:
            ValueError: If the operator is not square.
        """
        super().__init__(adapt_square(A))
        self.set_neumann_hyperparameters(num_terms, scale, check_nan, preconditioner)

    def set_neumann_hyperparameters(
        self,
        num_terms: int = 100,
        scale: float = 1.0,
        check_nan: bool = True,
        preconditioner=None,
    ):
        r"""Set the hyperparameters of the truncated Neumann series.

        Args:
            num_terms: Number of terms :math:`K` after the first. Default: ``100``.
            scale: Scale :math:`\alpha`; the series converges if
                :math:`0 < \lambda(\mathbf{A}) < 2 / \alpha` (:math:`\lambda(\mathbf{P}
                \mathbf{A})` with a preconditioner). Default: ``1.0``.
            check_nan: Whether to raise an error if the series diverged to
                non-finite values. Default: ``True``.
            preconditioner: Approximation of :math:`\mathbf{A}^{-1}` (an operator
                of any supported kind or a function of a matrix ``[N, K]``), or
                ``None`` (default) for none.

        Raises:
            ValueError: If ``num_terms`` is negative, ``scale`` is not positive, or
                the preconditioner's shape differs from the operator's.
        """
        num_terms = check_integer(num_terms, "num_terms", minimum=0)
        if scale <= 0:
            raise ValueError(f"`scale` must be positive, got {scale}.")
        P = self._adapt_preconditioner(preconditioner)  # checked before any change
        self._num_terms, self._scale, self._check_nan = num_terms, scale, check_nan
        self._preconditioner = P
        symmetric_P = not isinstance(P, PyTorchLinearOperator) or P.SELF_ADJOINT
        self.SELF_ADJOINT = self._A.SELF_ADJOINT and symmetric_P

    def _precondition(self, X: Tensor) -> Tensor:
        r"""Multiply the preconditioner (if any) onto a matrix.

        Args:
            X: Matrix ``[N, K]``.

        Returns:
            :math:`\mathbf{P}\mathbf{X}`, or ``X`` without preconditioner.
        """
        P = self._preconditioner
        if P is None:
            return X
        return P @ X if isinstance(P, PyTorchLinearOperator) else P(X)

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
        first = self._precondition(B)
        term, result = first, first.clone()
        for _ in range(self._num_terms):
            term = term - self._scale * self._precondition(self._A @ term)
            result = result + term
        result = self._scale * result
        operator = "the operator" if self._preconditioner is None else "P @ A"
        advice = (
            f"It converges if 0 < scale * eigenvalue < 2 for every eigenvalue of "
            f"{operator}: decrease `scale` (now {self._scale}) below 2 / (largest "
            "eigenvalue), or use CGInverseLinearOperator."
        )
        if self._check_nan and not isfinite(result).all():
            raise RuntimeError(
                f"The Neumann series diverged to non-finite values. {advice}"
            )
        if not term.norm() <= first.norm():  # growing (or non-finite) terms
            warnings.warn(
                f"The Neumann series diverges (its last term outgrew the first). "
                f"{advice}",
                stacklevel=2,
            )
        return result

    def _adjoint(self) -> NeumannInverseLinearOperator:
        """Return the Neumann series of the adjoint, with the same hyperparameters.

        The preconditioner is replaced by its adjoint (a function stays as it is).

        Returns:
            The adjoint operator.
        """
        P = self._preconditioner
        if isinstance(P, PyTorchLinearOperator):
            P = P.adjoint()
        return NeumannInverseLinearOperator(
            self._A.adjoint(), self._num_terms, self._scale, self._check_nan, P
        )


__all__ = [
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "KFACInverseLinearOperator",
    "KFACInvType",
]
