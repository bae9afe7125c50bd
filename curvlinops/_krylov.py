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
    diag_embed,
    full_like,
    hypot,
    maximum,
    minimum,
    ones_like,
    stack,
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
    eps: float = 0.0,
    stop: Callable[[int, Tensor], bool] | None = None,
    record: list | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`\mathbf{A}\mathbf{X} = \mathbf{B}` for SPD :math:`\mathbf{A}`.

    Column :math:`k` has converged once :math:`\lVert \mathbf{b}_k - \mathbf{A}
    \mathbf{x}_k \rVert_2 \le \max(\mathrm{tol} \lVert \mathbf{b}_k \rVert_2,
    \mathrm{atol})`, the criterion of :func:`scipy.sparse.linalg.cg`. Converged
    columns take steps of size zero. With a preconditioner :math:`\mathbf{P}
    \approx \mathbf{A}^{-1}`, this is preconditioned CG: the search directions
    are built from :math:`\mathbf{P}\mathbf{r}` instead of the residuals.

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
        eps: Guard of the divisions: a column whose denominator
            :math:`\mathbf{p}^\top \mathbf{A} \mathbf{p}` (for the step) or
            :math:`\mathbf{r}^\top \mathbf{P} \mathbf{r}` (for the next direction)
            is below ``eps`` gets a zero coefficient. ``0`` (default): no guard.
        stop: Optional extra stopping rule, called before each iteration with the
            number of iterations done and the residual norms ``[K]``.
        record: If a list, the step sizes :math:`\alpha` and direction
            coefficients :math:`\beta` (each ``[K]``) of every iteration are
            appended to it as pairs.

    Returns:
        The solution ``[N, K]``, a boolean vector ``[K]`` of converged columns, and
        the residual norms ``[K]``.
    """
    precondition = (lambda R: R) if preconditioner is None else preconditioner
    X = zeros_like(B) if X0 is None else X0.clone()
    R = B.clone() if X0 is None else B - matmat(X)
    threshold = (tol * vector_norm(B, dim=0)).clamp_min(atol)
    Z = precondition(R)
    P, rz = Z, (R * Z).sum(0)
    for iteration in range(maxiter):
        norms = vector_norm(R, dim=0)
        done = norms <= threshold
        if done.all() or (stop is not None and stop(iteration, norms)):
            break
        AP = matmat(P)
        pAp = (P * AP).sum(0)
        alpha = where(done | ((pAp < eps) & (eps > 0)), 0.0, rz / pAp)
        X, R = X + alpha * P, R - alpha * AP
        if callback is not None:
            callback(X)
        Z = precondition(R)
        rz_new = (R * Z).sum(0)
        beta = where(done | ((rz < eps) & (eps > 0)), 0.0, rz_new / rz)
        P, rz = Z + beta * P, rz_new
        if record is not None:
            record.append((alpha, beta))
    norms = vector_norm(R, dim=0)
    return X, norms <= threshold, norms


def batched_conjugate_gradients(
    matmat: Matmat,
    B: Tensor,
    X0: Tensor | None,
    tolerance: float,
    max_iter: int,
    eps: float,
    stop_updating_after: float,
    preconditioner: Matmat | None = None,
    n_tridiag: int = 0,
    max_tridiag_iter: int = 20,
) -> tuple[Tensor, bool, Tensor | None]:
    r"""Solve SPD systems with the stopping rules of GPyTorch's batched CG.

    The columns of :math:`\mathbf{B}` are normalized to unit norm, so residuals
    are relative. A column stops updating once its residual norm falls below
    ``stop_updating_after``; all stop once the *mean* residual norm is below
    ``tolerance`` after at least :math:`\min(11, \text{max\_iter})` iterations
    (and, for ``n_tridiag > 0``, enough iterations for the tridiagonal matrices).
    The tridiagonal matrices are those of the Lanczos process that CG runs
    implicitly on the first ``n_tridiag`` columns (Saad, 2003, Section 6.7.3):
    :math:`T_{jj} = 1/\alpha_j + \beta_{j-1}/\alpha_{j-1}`, :math:`T_{j,j+1} =
    \sqrt{\beta_j}/\alpha_j`.

    - Gardner, J. R., Pleiss, G., Bindel, D., Weinberger, K. Q., & Wilson, A. G.
      (2018). GPyTorch: Blackbox matrix-matrix Gaussian process inference with
      GPU acceleration. NeurIPS.
    - Saad, Y. (2003). Iterative methods for sparse linear systems. SIAM.

    Args:
        matmat: Multiplies :math:`\mathbf{A}` onto a matrix ``[N, K]``.
        B: Right-hand sides ``[N, K]``.
        X0: Initial guess ``[N, K]``, or ``None`` for zeros.
        tolerance: Bound on the mean relative residual norm.
        max_iter: Maximum number of iterations.
        eps: Denominators below ``eps`` give zero coefficients.
        stop_updating_after: Relative residual norm below which a column freezes.
        preconditioner: Multiplies an approximation of :math:`\mathbf{A}^{-1}`
            onto a matrix, or ``None``.
        n_tridiag: Number of leading columns whose tridiagonal matrices to return.
        max_tridiag_iter: Largest size of the tridiagonal matrices.

    Returns:
        The solution ``[N, K]``, whether the mean residual norm met ``tolerance``,
        and the tridiagonal matrices ``[n_tridiag, m, m]`` (``None`` if
        ``n_tridiag == 0``).
    """
    norms = vector_norm(B, dim=0)
    scale = where(norms > 0, norms, ones_like(norms))
    X0 = None if X0 is None else X0 / scale
    num_tridiag_iter = min(max_tridiag_iter, B.shape[0])
    min_iter = min(11, max_iter)
    if n_tridiag:
        min_iter = max(min_iter, min(num_tridiag_iter, max_iter))

    def stop(iteration: int, residual_norms: Tensor) -> bool:
        return iteration >= min_iter and bool(residual_norms.mean() < tolerance)

    record = []
    X, _, residual_norms = conjugate_gradients(
        matmat,
        B / scale,
        X0,
        0.0,
        stop_updating_after,
        max_iter,
        preconditioner,
        eps=eps,
        stop=stop,
        record=record,
    )
    tridiag = None
    if n_tridiag:
        steps = record[:num_tridiag_iter]
        tridiag = _cg_tridiagonal(
            [a[:n_tridiag] for a, _ in steps], [b[:n_tridiag] for _, b in steps]
        )
    return X * scale, bool(residual_norms.mean() < tolerance), tridiag


def _cg_tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    """Assemble the Lanczos tridiagonal matrices from CG's coefficients.

    Args:
        alphas: Step sizes of the iterations, each ``[n]`` (zero once frozen).
        betas: Direction coefficients of the iterations, each ``[n]``.

    Returns:
        The matrices ``[n, m, m]`` for ``m`` iterations.
    """
    alpha, beta = stack(alphas, dim=-1), stack(betas, dim=-1)  # [n, m]
    inverse = where(alpha != 0, 1 / where(alpha != 0, alpha, ones_like(alpha)), 0.0)
    diagonal = inverse.clone()
    diagonal[:, 1:] += beta[:, :-1] * inverse[:, :-1]
    off_diagonal = beta[:, :-1].clamp_min(0).sqrt() * inverse[:, :-1]
    return (
        diag_embed(diagonal)
        + diag_embed(off_diagonal, 1)
        + diag_embed(off_diagonal, -1)
    )


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
    show: bool = False,
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
        show: Print one line per iteration: the number of columns still running and
            the largest estimates of :math:`\lVert \mathbf{r} \rVert` and of
            the condition number among them.

    Returns:
        The solution ``[N, K]`` and a boolean vector ``[K]`` of the columns that met
        a stopping rule within ``maxiter`` iterations.
    """
    u, beta = _normalize(B)
    v, alpha = _normalize(rmatmat(u))
    state = _LSMRState(alpha, beta, v)
    done = alpha * beta == 0  # x = 0 solves these columns
    for iteration in range(maxiter):
        if done.all():
            break
        if show:
            _show_lsmr_iteration(iteration, state, done)
        u, beta = _normalize(matmat(v) - alpha * u)
        v, alpha = _normalize(rmatmat(u) - beta * v)
        X_new = state.step(alpha, beta, v, damp)
        stop = state.should_stop(X_new, atol, btol, conlim)
        state.X = where(done, state.X, X_new)
        done = done | stop
        # finished columns multiply zeros from now on, so they cannot produce NaNs
        u, v = where(done, 0.0, u), where(done, 0.0, v)
    if show:
        print(f"LSMR: {int(done.sum())} of {done.numel()} columns met a stopping rule.")
    return state.X, done


def _show_lsmr_iteration(iteration: int, state: _LSMRState, done: Tensor):
    """Print the progress of LSMR's running columns.

    Args:
        iteration: Number of iterations done.
        state: The recurrences.
        done: Boolean vector ``[K]`` of finished columns.
    """
    running = ~done
    normr, condA = state.normr[running].max(), state.condA[running].max()
    print(
        f"LSMR iteration {iteration}: {int(running.sum())} columns running, "
        f"max ||r|| = {normr.item():.4e}, max cond(A) = {condA.item():.2e}"
    )


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
