"""Estimates of the extreme eigenvalues that bound a spectral density's grid."""

from __future__ import annotations

from collections.abc import Callable
from math import isfinite

from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import eye
from torch.linalg import eigvalsh

from curvlinops._adapter import AdaptedOperator, adapt_square

# Up to this dimension, extreme eigenvalues are computed from the dense matrix.
_DENSE_BOUNDARIES_MAX_DIM = 20

Boundaries = tuple[float | None, float | None] | None


def approximate_boundaries(
    A, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    r"""Estimate the smallest and largest eigenvalue of a symmetric operator.

    Entries of ``boundaries`` that are given are returned as they are; the others
    are computed with :func:`scipy.sparse.linalg.eigsh` (ARPACK), or densely for
    operators of dimension at most 20.

    Args:
        A: Symmetric operator of shape ``[N, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        tol: Relative accuracy of the estimates (``0``: machine precision).
            Default: ``1e-2``.
        boundaries: Known values ``(lambda_min, lambda_max)``; ``None`` entries (all
            if ``None``) are estimated. Default: ``None``.

    Returns:
        :math:`(\lambda_{\min}, \lambda_{\max})`.

    Raises:
        RuntimeError: If ARPACK does not converge.

    Example:
        >>> from torch import float64, linspace
        >>> A = linspace(-1.0, 3.0, 50, dtype=float64).diag()
        >>> low, high = approximate_boundaries(A, tol=1e-8)
        >>> round(low, 6), round(high, 6)
        (-1.0, 3.0)
    """
    A = adapt_square(A)
    return fill_boundaries(boundaries, ("SA", "LA"), _arpack_or_raise(A, tol))


def approximate_boundaries_abs(
    A, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    r"""Estimate the smallest and largest eigenvalue magnitude of a symmetric operator.

    These bound the spectrum of :math:`|\mathbf{A}|`. Entries of ``boundaries``
    that are given are returned as they are; the others are computed with
    :func:`scipy.sparse.linalg.eigsh` (``which='SM'`` and ``'LM'``), or densely for
    operators of dimension at most 20. ARPACK converges slowly to the smallest
    magnitudes of large operators; pass a lower bound where one is known.

    Args:
        A: Symmetric operator of shape ``[N, N]`` (any supported kind).
        tol: Relative accuracy of the estimates (``0``: machine precision).
            Default: ``1e-2``.
        boundaries: Known values ``(|lambda|_min, |lambda|_max)``; ``None`` entries
            (all if ``None``) are estimated. Default: ``None``.

    Returns:
        :math:`(\min_i |\lambda_i|, \max_i |\lambda_i|)`.

    Raises:
        RuntimeError: If ARPACK does not converge.

    Example:
        >>> from torch import float64, tensor
        >>> A = tensor([-4.0, 0.5, 2.0], dtype=float64).diag()
        >>> approximate_boundaries_abs(A)
        (0.5, 4.0)
    """
    A = adapt_square(A)
    return fill_boundaries(boundaries, ("SM", "LM"), _arpack_or_raise(A, tol))


def fill_boundaries(
    boundaries: Boundaries, which: tuple[str, str], estimate: Callable[[str], float]
) -> tuple[float, float]:
    """Check boundaries and estimate their missing entries.

    Args:
        boundaries: ``None`` or a pair of numbers or ``None`` entries.
        which: The eigenvalues the two entries are, e.g. ``('SA', 'LA')``.
        estimate: Returns the eigenvalue of a kind in ``which``.

    Returns:
        Both boundaries.
    """
    low, high = check_boundaries(boundaries)
    low = estimate(which[0]) if low is None else low
    high = estimate(which[1]) if high is None else high
    return low, high


def _arpack_or_raise(A: AdaptedOperator, tol: float) -> Callable[[str], float]:
    """Return an estimator of extreme eigenvalues that raises if ARPACK fails.

    Args:
        A: Symmetric operator.
        tol: Relative accuracy.

    Returns:
        ``estimate(which) -> float``.
    """

    def estimate(which: str) -> float:
        eigenvalue = extreme_eigenvalue(A, which, tol)
        if eigenvalue is None:
            raise RuntimeError(
                f"ARPACK did not converge to the eigenvalue {which!r}; pass it in "
                "`boundaries` or relax `tol`."
            )
        return eigenvalue

    return estimate


def extreme_eigenvalue(A: AdaptedOperator, which: str, tol: float) -> float | None:
    """Estimate an extreme eigenvalue of a symmetric operator.

    Small operators are multiplied onto the identity and decomposed densely; others
    are handed to :func:`scipy.sparse.linalg.eigsh` (ARPACK).

    Args:
        A: Symmetric operator.
        which: ``'SA'`` (smallest), ``'LA'`` (largest), ``'SM'`` (smallest
            magnitude) or ``'LM'`` (largest magnitude).
        tol: Relative accuracy (``0``: machine precision).

    Returns:
        The eigenvalue (its magnitude for ``'SM'`` and ``'LM'``), or ``None`` if
        ARPACK did not converge.
    """
    magnitude = which in ("SM", "LM")
    dim = A.shape[0]
    if dim <= _DENSE_BOUNDARIES_MAX_DIM:
        identity = eye(dim, device=A.operator.device, dtype=A.operator.dtype)
        eigenvalues = eigvalsh(A.operator @ identity)
        eigenvalues = eigenvalues.abs().sort().values if magnitude else eigenvalues
        return (eigenvalues[0] if which[0] == "S" else eigenvalues[-1]).item()
    v0 = A.random_columns(1, "normal")[:, 0].detach().cpu().numpy()
    try:
        eigenvalue = eigsh(A.operator.to_scipy(), k=1, which=which, tol=tol, v0=v0)[0]
    except ArpackNoConvergence:
        return None
    return abs(float(eigenvalue[0])) if magnitude else float(eigenvalue[0])


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
