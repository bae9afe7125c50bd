r"""Batched Krylov solvers in PyTorch: CG and LSMR on many right-hand sides at once.

Both solvers treat the columns of a right-hand side :math:`\mathbf{B}` as
independent problems, but multiply the operator onto all columns with one product
per iteration. Scalars of the textbook algorithms become vectors with one entry per
column. Converged columns are frozen, so every column stops where a single-column
solver would. Everything stays on the operator's device.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import (
    Tensor,
    full_like,
    hypot,
    maximum,
    minimum,
    ones_like,
    where,
    zeros_like,
)
from torch.linalg import vector_norm

Matmat = Callable[[Tensor], Tensor]


def _normalize(X: Tensor) -> tuple[Tensor, Tensor]:
    """Normalize the columns of a matrix, leaving zero columns at zero.

    Args:
        X: Matrix ``[N, K]``.

    Returns:
        The normalized matrix and the column norms ``[K]``.
    """
    norm = vector_norm(X, dim=0)
    return X / where(norm > 0, norm, ones_like(norm)), norm


def conjugate_gradients(
    matmat: Matmat,
    B: Tensor,
    X0: Tensor | None,
    tol: float,
    atol: float,
    maxiter: int,
    preconditioner: Matmat | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`\mathbf{A}\mathbf{X} = \mathbf{B}` for SPD :math:`\mathbf{A}`.

    Column :math:`k` has converged once :math:`\lVert \mathbf{b}_k - \mathbf{A}
    \mathbf{x}_k \rVert_2 \le \max(\mathrm{tol} \lVert \mathbf{b}_k \rVert_2,
    \mathrm{atol})`, the criterion of :func:`scipy.sparse.linalg.cg`. Converged
    columns take steps of size zero.

    Args:
        matmat: Multiplies :math:`\mathbf{A}` onto a matrix ``[N, K]``.
        B: Right-hand sides ``[N, K]``.
        X0: Initial guess ``[N, K]``, or ``None`` for zeros.
        tol: Relative tolerance.
        atol: Absolute tolerance.
        maxiter: Maximum number of iterations.
        preconditioner: Multiplies an SPD approximation of :math:`\mathbf{A}^{-1}`
            onto a matrix. ``None`` means no preconditioning.
        callback: Called with the current iterate ``[N, K]`` after each iteration.

    Returns:
        The solution ``[N, K]`` and a boolean vector ``[K]`` of converged columns.
    """
    precondition = (lambda R: R) if preconditioner is None else preconditioner
    X = zeros_like(B) if X0 is None else X0.clone()
    R = B.clone() if X0 is None else B - matmat(X)
    threshold = (tol * vector_norm(B, dim=0)).clamp_min(atol)
    Z = precondition(R)
    P, rz = Z, (R * Z).sum(0)
    for _ in range(maxiter):
        done = vector_norm(R, dim=0) <= threshold
        if done.all():
            break
        AP = matmat(P)
        alpha = where(done, 0.0, rz / (P * AP).sum(0))
        X, R = X + alpha * P, R - alpha * AP
        if callback is not None:
            callback(X)
        Z = precondition(R)
        rz_new = (R * Z).sum(0)
        P = Z + where(done, 0.0, rz_new / rz) * P
        rz = rz_new
    return X, vector_norm(R, dim=0) <= threshold


def _rotation(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Return plane rotations that map :math:`(a, b)` onto :math:`(r, 0)`.

    Args:
        a: First components ``[K]``.
        b: Second components ``[K]``.

    Returns:
        Cosines :math:`c`, sines :math:`s` and :math:`r = \sqrt{a^2 + b^2}`, with
        :math:`(c, s) = (1, 0)` where :math:`r = 0`.
    """
    r = hypot(a, b)
    safe_r = where(r > 0, r, ones_like(r))
    return where(r > 0, a / safe_r, ones_like(r)), b / safe_r, r


def lsmr(
    matmat: Matmat,
    rmatmat: Matmat,
    B: Tensor,
    damp: float,
    atol: float,
    btol: float,
    conlim: float,
    maxiter: int,
) -> tuple[Tensor, Tensor]:
    r"""Solve damped least-squares problems, one per column, with LSMR.

    Column :math:`k` solves :math:`\min_{\mathbf{x}} \lVert \mathbf{A}\mathbf{x} -
    \mathbf{b}_k \rVert^2 + \lambda^2 \lVert \mathbf{x} \rVert^2`. LSMR runs the
    Golub-Kahan bidiagonalization of :math:`\mathbf{A}` and minimizes
    :math:`\lVert \mathbf{A}^\top \mathbf{r} \rVert` over its Krylov subspace with
    two sequences of plane rotations (Fong & Saunders, 2011). A column stops with
    the rules of :func:`scipy.sparse.linalg.lsmr`: (1) :math:`\lVert \mathbf{r}
    \rVert \le \mathrm{btol} \lVert \mathbf{b} \rVert + \mathrm{atol} \lVert
    \mathbf{A} \rVert \lVert \mathbf{x} \rVert`, (2) :math:`\lVert \mathbf{A}^\top
    \mathbf{r} \rVert \le \mathrm{atol} \lVert \mathbf{A} \rVert \lVert \mathbf{r}
    \rVert`, (3) the condition number estimate exceeds ``conlim``, or the same rules
    at machine precision, based on the paper's cheap estimates of these norms.

    - Fong, D. C.-L., & Saunders, M. (2011). LSMR: An iterative algorithm for sparse
      least-squares problems. SIAM Journal on Scientific Computing.

    Args:
        matmat: Multiplies :math:`\mathbf{A} \in \mathbb{R}^{M \times N}` onto a
            matrix ``[N, K]``.
        rmatmat: Multiplies :math:`\mathbf{A}^\top` onto a matrix ``[M, K]``.
        B: Right-hand sides ``[M, K]``.
        damp: Damping :math:`\lambda`.
        atol: Tolerance of rules 1 and 2.
        btol: Tolerance of rule 1.
        conlim: Limit of the condition number estimate; ``0`` disables rule 3.
        maxiter: Maximum number of iterations.

    Returns:
        The solution ``[N, K]`` and a boolean vector ``[K]`` of the columns that met
        a stopping rule within ``maxiter`` iterations.
    """
    u, beta = _normalize(B)
    v, alpha = _normalize(rmatmat(u))
    state = _LSMRState(alpha, beta, v)
    done = alpha * beta == 0  # x = 0 solves these columns
    for _ in range(maxiter):
        if done.all():
            break
        u, beta = _normalize(matmat(v) - alpha * u)
        v, alpha = _normalize(rmatmat(u) - beta * v)
        X_new = state.step(alpha, beta, v, damp)
        stop = state.should_stop(X_new, atol, btol, conlim)
        state.X = where(done, state.X, X_new)
        done = done | stop
        # finished columns multiply zeros from now on, so they cannot produce NaNs
        u, v = where(done, 0.0, u), where(done, 0.0, v)
    return state.X, done


class _LSMRState:
    r"""Iterate, search directions and scalar recurrences of LSMR, per column.

    Notation of Fong & Saunders (2011): the bidiagonalization yields
    :math:`\alpha_k, \beta_k`; rotations :math:`\hat{Q}` (damping), :math:`Q` and
    :math:`\bar{Q}` turn the bidiagonal system into upper-triangular ones with
    entries :math:`\rho, \theta` and :math:`\bar{\rho}, \bar{\theta}`; :math:`\zeta,
    \bar{\zeta}` are the transformed right-hand sides. A third rotation
    :math:`\tilde{Q}` tracks :math:`\lVert \mathbf{r} \rVert`.
    """

    def __init__(self, alpha: Tensor, beta: Tensor, v: Tensor):
        r"""Initialize the recurrences with the first bidiagonalization step.

        Args:
            alpha: :math:`\alpha_1` ``[K]``.
            beta: :math:`\beta_1 = \lVert \mathbf{b} \rVert` ``[K]``.
            v: :math:`\mathbf{v}_1` ``[N, K]``.
        """
        one, zero = ones_like(alpha), zeros_like(alpha)
        self.X, self.h, self.hbar = zeros_like(v), v.clone(), zeros_like(v)
        self.alphabar, self.zetabar, self.zeta = alpha, alpha * beta, zero
        self.rho, self.rhobar, self.cbar, self.sbar = one, one, one, zero
        # for the estimate of ||r||
        self.betadd, self.betad, self.rhodold, self.d = beta, zero, one, zero
        self.tautildeold, self.thetatilde = zero, zero
        # for the estimates of ||A|| and cond(A)
        self.normb, self.normA_sq = beta, alpha**2
        self.maxrbar, self.minrbar = zero, full_like(alpha, float("inf"))
        self.normr, self.normA, self.condA = beta, alpha, one
        self.first = True

    def step(self, alpha: Tensor, beta: Tensor, v: Tensor, damp: float) -> Tensor:
        r"""Advance the rotations by one step and return the new iterate.

        Args:
            alpha: :math:`\alpha_{k+1}` ``[K]``.
            beta: :math:`\beta_{k+1}` ``[K]``.
            v: :math:`\mathbf{v}_{k+1}` ``[N, K]``.
            damp: Damping :math:`\lambda`.

        Returns:
            The new iterate :math:`\mathbf{x}_k` ``[N, K]``.
        """
        chat, shat, alphahat = _rotation(self.alphabar, full_like(alpha, damp))
        rho_old, rhobar_old, zeta_old = self.rho, self.rhobar, self.zeta
        c, s, self.rho = _rotation(alphahat, beta)
        theta_new, self.alphabar = s * alpha, c * alpha
        thetabar, rho_temp = self.sbar * self.rho, self.cbar * self.rho
        self.cbar, self.sbar, self.rhobar = _rotation(rho_temp, theta_new)
        self.zeta, self.zetabar = self.cbar * self.zetabar, -self.sbar * self.zetabar
        self.hbar = self.h - thetabar * self.rho / (rho_old * rhobar_old) * self.hbar
        X_new = self.X + self.zeta / (self.rho * self.rhobar) * self.hbar
        self.h = v - theta_new / self.rho * self.h
        self._estimate_residual_norm(chat, shat, c, s, thetabar, zeta_old)
        self._estimate_operator_norms(alpha, beta, rhobar_old, rho_temp)
        return X_new

    def _estimate_residual_norm(self, chat, shat, c, s, thetabar, zeta_old):
        r"""Update the estimate of :math:`\lVert \mathbf{r}_k \rVert`.

        Args:
            chat: Cosines of the damping rotation :math:`\hat{Q}`.
            shat: Sines of the damping rotation :math:`\hat{Q}`.
            c: Cosines of the rotation :math:`Q`.
            s: Sines of the rotation :math:`Q`.
            thetabar: :math:`\bar{\theta}_k`.
            zeta_old: :math:`\zeta_{k-1}`.
        """
        betaacute, betacheck = chat * self.betadd, -shat * self.betadd
        betahat, self.betadd = c * betaacute, -s * betaacute
        thetatilde_old = self.thetatilde
        ctilde, stilde, rhotilde = _rotation(self.rhodold, thetabar)
        self.thetatilde, self.rhodold = stilde * self.rhobar, ctilde * self.rhobar
        self.betad = -stilde * self.betad + ctilde * betahat
        self.tautildeold = (zeta_old - thetatilde_old * self.tautildeold) / rhotilde
        taud = (self.zeta - self.thetatilde * self.tautildeold) / self.rhodold
        self.d = self.d + betacheck**2
        self.normr = (self.d + (self.betad - taud) ** 2 + self.betadd**2).sqrt()

    def _estimate_operator_norms(self, alpha, beta, rhobar_old, rho_temp):
        r"""Update the estimates of the operator's Frobenius norm and condition.

        Args:
            alpha: :math:`\alpha_{k+1}`.
            beta: :math:`\beta_{k+1}`.
            rhobar_old: :math:`\bar{\rho}_{k-1}`.
            rho_temp: :math:`\bar{c}_{k-1} \rho_k`.
        """
        self.normA = (self.normA_sq + beta**2).sqrt()
        self.normA_sq = self.normA_sq + beta**2 + alpha**2
        self.maxrbar = maximum(self.maxrbar, rhobar_old)
        if not self.first:  # the first rhobar is the initial value 1
            self.minrbar = minimum(self.minrbar, rhobar_old)
        self.first = False
        largest = maximum(self.maxrbar, rho_temp)
        self.condA = largest / minimum(self.minrbar, rho_temp)

    def should_stop(self, X: Tensor, atol: float, btol: float, conlim: float):
        """Evaluate the stopping rules for every column.

        Args:
            X: Current iterate ``[N, K]``.
            atol: Tolerance of rules 1 and 2.
            btol: Tolerance of rule 1.
            conlim: Limit of the condition number estimate (``0``: no limit).

        Returns:
            Boolean vector ``[K]`` of columns that meet a stopping rule.
        """
        normx = vector_norm(X, dim=0)
        normAx = self.normA * normx
        residual = self.normr / self.normb
        normal = (self.zetabar.abs() / (self.normA * self.normr)).nan_to_num(
            nan=float("inf")
        )
        inverse_cond = 1 / self.condA
        ctol = 1 / conlim if conlim > 0 else 0.0
        return (
            (residual <= btol + atol * normAx / self.normb)
            | (normal <= atol)
            | (inverse_cond <= ctol)
            | (1 + residual / (1 + normAx / self.normb) <= 1)
            | (1 + normal <= 1)
            | (1 + inverse_cond <= 1)
        )
