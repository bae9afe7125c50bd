r"""Lanczos quadrature and the Gaussian-smoothed densities built from it.

:func:`lanczos_iterations` runs several independent Lanczos processes at once (one
per column, one product with the operator per step) with full
re-orthogonalization. The eigen-decomposition of each tridiagonal matrix gives the
nodes and weights of a Gauss quadrature of the operator's spectral density, which
:func:`lanczos_approximate_spectrum_from_iter` (and its logarithmic variant) smooth
with Gaussians.
"""

from __future__ import annotations

from collections.abc import Callable
from math import log, pi, sqrt

from numpy import ndarray
from scipy.linalg import eigh_tridiagonal
from torch import (
    Tensor,
    as_tensor,
    diag_embed,
    einsum,
    exp,
    finfo,
    float64,
    linspace,
    stack,
    where,
)
from torch.linalg import eigh, vector_norm

from curvlinops._adapter import AdaptedOperator
from curvlinops._checks import is_integer


def lanczos_iterations(
    A: AdaptedOperator, ncv: int, num_repeats: int, use_eigh_tridiagonal: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Run Lanczos processes and eigen-decompose their tridiagonal matrices.

    For a random unit vector :math:`\mathbf{v}`, ``ncv`` Lanczos steps yield a
    tridiagonal matrix :math:`\mathbf{T} = \mathbf{U} \mathrm{diag}(\theta_k)
    \mathbf{U}^\top`. With weights :math:`w_k = U_{1k}^2`, the nodes
    :math:`\theta_k` form a Gauss quadrature: :math:`\sum_k w_k p(\theta_k) =
    \mathbf{v}^\top p(\mathbf{A}) \mathbf{v}` for polynomials :math:`p` of degree
    below :math:`2 \cdot` ``ncv``. Averaged over random :math:`\mathbf{v}`, the
    measure :math:`\sum_k w_k \delta(\lambda - \theta_k)` is the spectral density
    :math:`\frac{1}{N} \sum_i \delta(\lambda - \lambda_i)` (Papyan, 2020).

    Args:
        A: Symmetric operator of shape ``[N, N]``.
        ncv: Number of Lanczos vectors (quadrature nodes), at most :math:`N`.
        num_repeats: Number of independent processes (starting vectors), run
            together with one product per step.
        use_eigh_tridiagonal: Decompose with SciPy's ``eigh_tridiagonal`` (on the
            CPU) instead of PyTorch's dense ``eigh``.

    Returns:
        Eigenvalues ``[num_repeats, ncv]`` and eigenvectors
        ``[num_repeats, ncv, ncv]`` (as columns) of the tridiagonal matrices, in
        float64.
    """
    alphas, betas = _lanczos(A, ncv, num_repeats)
    if not use_eigh_tridiagonal:
        T = diag_embed(alphas) + diag_embed(betas, 1) + diag_embed(betas, -1)
        return eigh(T)
    decompositions = [
        eigh_tridiagonal(a.cpu().numpy(), b.cpu().numpy())
        for a, b in zip(alphas, betas)
    ]
    evals, evecs = (
        stack([as_tensor(d[i]) for d in decompositions]).to(alphas.device)
        for i in range(2)
    )
    return evals, evecs


def _lanczos(A: AdaptedOperator, ncv: int, num_repeats: int):
    """Run Lanczos processes with full re-orthogonalization, one per column.

    If a Krylov space becomes invariant (tiny off-diagonal element), the process
    continues with a random vector orthogonal to all previous ones and a zero
    off-diagonal element, so the quadrature stays exact.

    Args:
        A: Symmetric operator of shape ``[N, N]``.
        ncv: Number of Lanczos steps, at most :math:`N`.
        num_repeats: Number of independent processes.

    Returns:
        Diagonals ``[num_repeats, ncv]`` and off-diagonals
        ``[num_repeats, ncv - 1]`` of the tridiagonal matrices, in float64.
    """
    dtype = A.operator.dtype
    tol = finfo(dtype).eps ** 0.5
    V = A.random_columns(num_repeats, "normal")
    basis = [V / vector_norm(V, dim=0)]
    alphas, betas = [], []
    for step in range(ncv):
        W = A.operator @ basis[-1]
        alphas.append(einsum("nr,nr->r", W, basis[-1]))
        if step == ncv - 1:
            break
        norm_W = vector_norm(W, dim=0)
        W = _orthogonalize(W, basis)
        beta = vector_norm(W, dim=0)
        invariant = beta <= tol * norm_W
        if invariant.any():
            fresh = _orthogonalize(A.random_columns(num_repeats, "normal"), basis)
            W = where(invariant, fresh, W)
            beta = beta.masked_fill(invariant, 0.0)
        basis.append(W / vector_norm(W, dim=0))
        betas.append(beta)
    if not betas:  # ncv = 1
        return stack(alphas, dim=1).to(float64), alphas[0].new_zeros(num_repeats, 0)
    return stack(alphas, dim=1).to(float64), stack(betas, dim=1).to(float64)


def _orthogonalize(W: Tensor, basis: list[Tensor]) -> Tensor:
    """Remove the components along orthonormal vectors, per column, twice.

    Args:
        W: Vectors ``[N, R]``, one per process.
        basis: Orthonormal vectors of each process, tensors ``[N, R]``.

    Returns:
        The orthogonalized vectors ``[N, R]``.
    """
    Q = stack(basis)  # [j, N, R]
    for _ in range(2):  # twice is enough (Kahan, Parlett)
        W = W - einsum("jnr,jr->nr", Q, einsum("jnr,nr->jr", Q, W))
    return W


def smoothed_density(
    nodes: Tensor,
    weights: Tensor,
    low: float,
    high: float,
    num_points: int,
    kappa: float,
    margin: float,
) -> tuple[Tensor, Tensor]:
    r"""Smooth quadratures with Gaussians and evaluate their average on a grid.

    The interval :math:`[\mathrm{low}, \mathrm{high}]`, widened by ``margin`` on
    both sides, is mapped to :math:`[-1, 1]`. There, each node carries a Gaussian
    of standard deviation :math:`\sigma = 2 / ((n - 1) \sqrt{8 \ln \kappa})` for
    :math:`n` nodes per quadrature. The density is mapped back with the Jacobian.

    Args:
        nodes: Quadrature nodes ``[R, n]``.
        weights: Quadrature weights ``[R, n]``.
        low: Lower boundary of the spectrum.
        high: Upper boundary of the spectrum.
        num_points: Number of grid points.
        kappa: Width parameter, greater than 1.
        margin: Relative margin, non-negative.

    Returns:
        Grid ``[num_points]`` and density ``[num_points]``, on the nodes' device.

    Raises:
        ValueError: If ``kappa``, ``margin`` or the boundaries are invalid.
    """
    num_points = check_int("num_points", num_points, 2)
    if kappa <= 1:
        raise ValueError(f"`kappa` must be greater than 1, got {kappa}.")
    if margin < 0:
        raise ValueError(f"`margin` must be >= 0, got {margin}.")
    if low > high:
        raise ValueError(f"Lower boundary {low} exceeds upper boundary {high}.")
    width = high - low if high > low else max(abs(high), 1.0)
    left, right = low - margin * width, high + margin * width
    center, half_width = (left + right) / 2, (right - left) / 2
    grid = linspace(left, right, num_points, dtype=float64, device=nodes.device)
    sigma = 2 / ((nodes.shape[1] - 1) * sqrt(8 * log(kappa)))
    distances = ((grid - center) / half_width)[:, None, None] - (
        (nodes - center) / half_width
    )
    gaussians = exp(-(distances**2) / (2 * sigma**2)) / sqrt(2 * pi * sigma**2)
    density = (gaussians * weights).sum(dim=2).mean(dim=1) / half_width
    return grid, density


def lanczos_approximate_spectrum_from_iter(
    lanczos_iter: tuple[Tensor, Tensor],
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
) -> tuple[Tensor, Tensor]:
    r"""Approximate the spectral density from one Lanczos process.

    The eigenvalues :math:`\theta_k` of the process's tridiagonal matrix are the
    quadrature nodes, the squared first entries :math:`U_{1k}^2` of its eigenvectors
    the weights (see :func:`~curvlinops.papyan2020traces.spectrum.fast_lanczos`).
    Each node carries a Gaussian whose width is set by ``kappa`` after the
    interval :math:`[\lambda_{\min}, \lambda_{\max}]`, widened by ``margin``, is
    mapped to :math:`[-1, 1]` (Papyan, 2020, Algorithm 2). Average the densities of
    several processes to reduce the variance.

    Args:
        lanczos_iter: Eigenvalues ``[ncv]`` and eigenvectors ``[ncv, ncv]`` of the
            tridiagonal matrix (tensors or NumPy arrays).
        boundaries: Smallest and largest eigenvalue of the operator (estimates).
        num_points: Number of grid points.
        kappa: Width parameter of the Gaussians, greater than 1.
        margin: Relative margin added to either side of the boundaries.

    Returns:
        Grid points :math:`\lambda` and the density :math:`p(\lambda)` (which
        integrates to one), each of shape ``[num_points]``; NumPy arrays if the
        eigenvalues are.

    Example:
        >>> from torch import float64, linspace, manual_seed, trapezoid
        >>> from curvlinops.papyan2020traces.spectrum import fast_lanczos
        >>> _ = manual_seed(0)
        >>> A = linspace(1, 2, 50, dtype=float64).diag()
        >>> grid, density = lanczos_approximate_spectrum_from_iter(
        ...     fast_lanczos(A, ncv=10), (1.0, 2.0), 200, 3.0, 0.2)
        >>> round(trapezoid(density, grid).item(), 3)
        1.0
    """
    evals, evecs, to_caller = _lanczos_iter_tensors(lanczos_iter)
    low, high = boundaries
    grid, density = smoothed_density(
        evals[None], evecs[None, 0] ** 2, low, high, num_points, kappa, margin
    )
    return to_caller(grid), to_caller(density)


def lanczos_approximate_log_spectrum_from_iter(
    lanczos_iter: tuple[Tensor, Tensor],
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: float,
) -> tuple[Tensor, Tensor]:
    r"""Approximate the log-scale spectral density from one Lanczos process.

    The density is that of :math:`|\mathbf{A}| + \epsilon\mathbf{I}` on a
    logarithmic grid.

    The nodes :math:`\theta_k` are mapped to :math:`u_k = \log(|\theta_k| +
    \epsilon)` (natural logarithm) and smoothed with Gaussians in :math:`u`, which
    resolves spectra that span many orders of magnitude (Papyan, 2020, Section
    C.7). The result is returned on the grid :math:`\lambda = e^u` with the
    density w.r.t. :math:`\lambda`, :math:`p(\lambda) = q(\log \lambda) /
    \lambda` for the density :math:`q` of :math:`u`, so that it integrates to one
    over :math:`\lambda` and is plotted with a logarithmic :math:`\lambda`-axis.

    Args:
        lanczos_iter: Eigenvalues ``[ncv]`` and eigenvectors ``[ncv, ncv]`` of the
            tridiagonal matrix (tensors or NumPy arrays).
        boundaries: Smallest and largest eigenvalue of :math:`|\mathbf{A}|`.
        num_points: Number of grid points.
        kappa: Width parameter of the Gaussians in :math:`u`, greater than 1.
        margin: Relative margin added to either side of the boundaries in
            :math:`u`.
        epsilon: Positive shift :math:`\epsilon`.

    Returns:
        Grid points :math:`\lambda` (eigenvalues of :math:`|\mathbf{A}| +
        \epsilon\mathbf{I}`, logarithmically spaced) and the density
        :math:`p(\lambda)`, each of shape ``[num_points]``; NumPy arrays if the
        eigenvalues are.

    Raises:
        ValueError: If ``epsilon`` is not positive.

    Example:
        >>> from torch import float64, logspace, manual_seed, trapezoid
        >>> from curvlinops.papyan2020traces.spectrum import fast_lanczos
        >>> _ = manual_seed(0)
        >>> A = logspace(-3, 3, 50, dtype=float64).diag()
        >>> grid, density = lanczos_approximate_log_spectrum_from_iter(
        ...     fast_lanczos(A, ncv=20), (1e-3, 1e3), 500, 3.0, 0.05, 1e-5)
        >>> bool(grid[0] < 1e-3 < 1e3 < grid[-1])
        True
        >>> round(trapezoid(density, grid).item(), 2)
        1.0
    """
    if epsilon <= 0:
        raise ValueError(f"`epsilon` must be positive, got {epsilon}.")
    evals, evecs, to_caller = _lanczos_iter_tensors(lanczos_iter)
    low, high = (log(b + epsilon) for b in boundaries)
    log_nodes = (evals.abs() + epsilon).log()
    log_grid, log_density = smoothed_density(
        log_nodes[None], evecs[None, 0] ** 2, low, high, num_points, kappa, margin
    )
    grid = log_grid.exp()
    return to_caller(grid), to_caller(log_density / grid)


def _lanczos_iter_tensors(lanczos_iter) -> tuple[Tensor, Tensor, Callable]:
    """Return a Lanczos process's decomposition as float64 tensors.

    Args:
        lanczos_iter: Eigenvalues and eigenvectors, tensors or NumPy arrays.

    Returns:
        Eigenvalues, eigenvectors, and a function that turns results back into the
        input's world (NumPy arrays for NumPy input).
    """
    evals, evecs = lanczos_iter
    is_numpy = isinstance(evals, ndarray)
    evals, evecs = (as_tensor(x).to(float64) for x in (evals, evecs))

    def to_caller(x: Tensor):
        return x.cpu().numpy() if is_numpy else x

    return evals, evecs, to_caller


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """Verify that a value is an integer (Python or NumPy) in a range.

    Args:
        name: Name of the value in the error message.
        value: The value.
        minimum: Smallest allowed value.
        maximum: Largest allowed value, ``None`` for no limit.

    Returns:
        The value as Python ``int``.

    Raises:
        ValueError: If the value is not an integer in the range.
    """
    is_int = is_integer(value)
    too_large = is_int and maximum is not None and value > maximum
    if not is_int or value < minimum or too_large:
        upper = "" if maximum is None else f", at most {maximum}"
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}{upper}, got {value!r}."
        )
    return int(value)
