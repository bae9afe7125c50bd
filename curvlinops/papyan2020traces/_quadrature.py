r"""Lanczos quadrature, Gaussian smoothing and spectral boundaries.

:func:`lanczos_quadrature` runs several independent Lanczos processes at once (one
per column, one product with the operator per step) with full
re-orthogonalization. The eigen-decomposition of each tridiagonal matrix gives the
nodes and weights of a Gauss quadrature of the operator's spectral density.
"""

from __future__ import annotations

from math import isfinite, log, pi, sqrt

from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import (
    Tensor,
    diag_embed,
    einsum,
    exp,
    eye,
    finfo,
    float64,
    linspace,
    stack,
    where,
)
from torch.linalg import eigh, eigvalsh, vector_norm

from curvlinops._adapter import AdaptedOperator
from curvlinops._checks import is_integer

# Up to this dimension, extreme eigenvalues are computed from the dense matrix.
_DENSE_BOUNDARIES_MAX_DIM = 20


def lanczos_quadrature(
    A: AdaptedOperator, ncv: int, num_repeats: int
) -> tuple[Tensor, Tensor]:
    r"""Compute Gauss quadratures of a symmetric operator's spectral density.

    For a random unit vector :math:`\mathbf{v}`, ``ncv`` Lanczos steps yield a
    tridiagonal matrix :math:`\mathbf{T} = \mathbf{U} \mathrm{diag}(\theta_k)
    \mathbf{U}^\top` such that :math:`\sum_k w_k \delta(\lambda - \theta_k)`, with
    :math:`w_k = U_{1k}^2`, integrates polynomials :math:`p` of degree below
    :math:`2 \cdot` ``ncv`` exactly against :math:`\mathbf{v}`'s spectral measure,
    :math:`\sum_k w_k p(\theta_k) = \mathbf{v}^\top p(\mathbf{A}) \mathbf{v}`.
    Averaged over random :math:`\mathbf{v}`, this measure is the spectral density
    :math:`\frac{1}{N} \sum_i \delta(\lambda - \lambda_i)` (Papyan, 2020).

    Args:
        A: Symmetric operator of shape ``[N, N]``.
        ncv: Number of Lanczos vectors (quadrature nodes), at most :math:`N`.
        num_repeats: Number of independent quadratures (starting vectors).

    Returns:
        Nodes and weights, each of shape ``[num_repeats, ncv]``, in float64.
    """
    alphas, betas = _lanczos(A, ncv, num_repeats)
    T = diag_embed(alphas) + diag_embed(betas, 1) + diag_embed(betas, -1)
    nodes, U = eigh(T)
    return nodes, U[:, 0, :] ** 2


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


def extreme_eigenvalue(A: AdaptedOperator, which: str, tol: float) -> float | None:
    """Estimate an extreme eigenvalue of a symmetric operator.

    Small operators are multiplied onto the identity and decomposed densely; others
    are handed to :func:`scipy.sparse.linalg.eigsh` (ARPACK).

    Args:
        A: Symmetric operator.
        which: ``'SA'`` (smallest), ``'LA'`` (largest), or ``'LM'`` (largest
            magnitude).
        tol: Relative accuracy (``0``: machine precision).

    Returns:
        The eigenvalue (its magnitude for ``'LM'``), or ``None`` if ARPACK did not
        converge.
    """
    dim = A.shape[0]
    if dim <= _DENSE_BOUNDARIES_MAX_DIM:
        identity = eye(dim, device=A.operator.device, dtype=A.operator.dtype)
        eigenvalues = eigvalsh(A.operator @ identity)
        eigenvalues = eigenvalues.abs().sort().values if which == "LM" else eigenvalues
        return (eigenvalues[0] if which == "SA" else eigenvalues[-1]).item()
    v0 = A.random_columns(1, "normal")[:, 0].detach().cpu().numpy()
    try:
        eigenvalue = eigsh(A.operator.to_scipy(), k=1, which=which, tol=tol, v0=v0)[0]
    except ArpackNoConvergence:
        return None
    return abs(float(eigenvalue[0])) if which == "LM" else float(eigenvalue[0])


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


def _is_finite_number(value) -> bool:
    """Return whether a value is a finite real number (Python, NumPy or 0-d tensor).

    Args:
        value: Candidate number.

    Returns:
        Whether ``value`` is a finite real number.
    """
    try:
        return isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_boundaries(boundaries: tuple | None) -> tuple[float | None, float | None]:
    """Verify boundaries of a spectrum.

    Args:
        boundaries: ``None`` or a pair whose entries are numbers or ``None``.

    Returns:
        The pair of boundaries.

    Raises:
        ValueError: If ``boundaries`` is not such a pair, has entries that are not
            finite numbers, or is decreasing.
    """
    if boundaries is None:
        return (None, None)
    if len(boundaries) != 2:
        raise ValueError(f"`boundaries` must be a pair, got {boundaries}.")
    if any(b is not None and not _is_finite_number(b) for b in boundaries):
        raise ValueError(
            f"`boundaries` must hold finite numbers or None, got {boundaries}."
        )
    low, high = boundaries
    if low is not None and high is not None and low > high:
        raise ValueError(f"`boundaries` must be increasing, got {boundaries}.")
    return (low, high)
