r"""Spectral densities of symmetric operators via Lanczos quadrature (Papyan, 2020).

The spectral density of a symmetric :math:`\mathbf{A} \in \mathbb{R}^{N \times N}`
with eigenvalues :math:`\lambda_i` is :math:`p(\lambda) = \frac{1}{N} \sum_{i=1}^N
\delta(\lambda - \lambda_i)`. Lanczos quadrature approximates it by a few weighted
nodes per random starting vector; smoothing each node with a Gaussian gives a
density that can be plotted. Algorithm 2 (``LanczosApproxSpec``) and Section C.7
(log-spectrum) of

- Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
  spectra. Journal of Machine Learning Research (JMLR).

The operator's spectrum is mapped to :math:`[-1, 1]` so that the width of the
Gaussians, set by :math:`\kappa`, is independent of the spectrum's scale. The
building blocks are public as in curvlinops 3.x: :func:`fast_lanczos` (one Lanczos
process), :func:`approximate_boundaries` and :func:`approximate_boundaries_abs` (the
extreme eigenvalues), and the densities of one process,
:func:`lanczos_approximate_spectrum_from_iter` and
:func:`lanczos_approximate_log_spectrum_from_iter`.
"""

from __future__ import annotations

from numpy import ndarray
from torch import Tensor, stack

from curvlinops._adapter import adapt_square
from curvlinops._checks import check_symmetry
from curvlinops.papyan2020traces._boundaries import (
    Boundaries,
    approximate_boundaries,
    approximate_boundaries_abs,
    check_boundaries,
    extreme_eigenvalue,
    fill_boundaries,
)
from curvlinops.papyan2020traces._quadrature import (
    check_int,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
    lanczos_iterations,
)


def fast_lanczos(
    A, ncv: int, use_eigh_tridiagonal: bool = False, check_symmetric: bool = True
) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
    r"""Run one Lanczos process and eigen-decompose its tridiagonal matrix.

    Starting from a random unit vector, ``ncv`` Lanczos steps (one product with
    :math:`\mathbf{A}` each) yield a tridiagonal matrix :math:`\mathbf{T} =
    \mathbf{U} \mathrm{diag}(\boldsymbol{\theta}) \mathbf{U}^\top` whose
    eigenvalues :math:`\theta_k` and squared first eigenvector entries
    :math:`U_{1k}^2` are the nodes and weights of a Gauss quadrature of the
    spectral density (Papyan, 2020, Algorithm 2). Unlike Papyan's version, the
    Lanczos vectors are fully re-orthogonalized, which keeps the quadrature free of
    spurious copies of converged eigenvalues at the cost of storing ``ncv``
    vectors. The result feeds :func:`lanczos_approximate_spectrum_from_iter` and
    :func:`lanczos_approximate_log_spectrum_from_iter`.

    Args:
        A: Symmetric operator of shape ``[N, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        ncv: Number of Lanczos vectors (quadrature nodes), an integer in
            :math:`[2, N]`.
        use_eigh_tridiagonal: Decompose :math:`\mathbf{T}` with SciPy's
            ``eigh_tridiagonal`` instead of a dense ``eigh``. Default: ``False``.
        check_symmetric: Probe that ``A`` is symmetric (one product with 8
            columns, skipped for operators with ``SELF_ADJOINT``) and raise a
            ``ValueError`` if it is not. Default: ``True``.

    Returns:
        Eigenvalues ``[ncv]`` and eigenvectors ``[ncv, ncv]`` (as columns) of
        :math:`\mathbf{T}`, in float64: tensors for torch inputs, NumPy arrays
        otherwise.

    Raises:
        ValueError: If ``ncv`` is not an integer in :math:`[2, N]` or ``A`` is not
            symmetric.

    Example:
        >>> from torch import float64, linspace, manual_seed
        >>> _ = manual_seed(0)
        >>> A = linspace(1, 10, 10, dtype=float64).diag()
        >>> evals, evecs = fast_lanczos(A, ncv=10)  # ncv = N: the exact spectrum
        >>> evals.allclose(linspace(1, 10, 10, dtype=float64))
        True
        >>> bool(abs((evecs[0] ** 2).sum() - 1) < 1e-12)  # weights sum to one
        True
    """
    A = adapt_square(A)
    if check_symmetric:
        check_symmetry(A.operator, "Lanczos (fast_lanczos)")
    ncv = check_int("ncv", ncv, 2, A.shape[0])
    evals, evecs = lanczos_iterations(A, ncv, 1, use_eigh_tridiagonal)
    return A.to_caller(evals[0]), A.to_caller(evecs[0])


class _CachedLanczosQuadratures:
    """Operator, settings and cached Lanczos processes of the spectrum classes."""

    def __init__(
        self,
        A,
        ncv: int,
        boundaries: Boundaries,
        boundaries_tol: float,
        check_symmetric: bool = True,
    ):
        """Store the operator and the settings of the Lanczos iterations.

        Args:
            A: Symmetric operator of shape ``[N, N]`` (any supported kind).
            ncv: Number of Lanczos vectors, an integer in :math:`[2, N]`.
            boundaries: Boundaries of the spectrum; ``None`` entries are estimated.
            boundaries_tol: Relative accuracy of estimated boundaries.
            check_symmetric: Probe that the operator is symmetric.

        Raises:
            ValueError: If ``boundaries_tol`` is negative or the operator is not
                symmetric.
        """
        self._A = adapt_square(A)
        if check_symmetric:
            check_symmetry(self._A.operator, "Lanczos spectral density estimation")
        ncv = check_int("ncv", ncv, 2, self._A.shape[0])
        if boundaries_tol < 0:
            raise ValueError(f"`boundaries_tol` must be >= 0, got {boundaries_tol}.")
        self._ncv, self._boundaries_tol = ncv, boundaries_tol
        self._boundaries = check_boundaries(boundaries)
        self._lanczos_iters: list[tuple[Tensor, Tensor]] = []

    def _iterations(self, num_repeats: int) -> list[tuple[Tensor, Tensor]]:
        """Return cached Lanczos processes, running missing repeats in one batch.

        Args:
            num_repeats: Number of processes.

        Returns:
            ``num_repeats`` pairs of eigenvalues ``[ncv]`` and eigenvectors
            ``[ncv, ncv]`` of the tridiagonal matrices.
        """
        num_repeats = check_int("num_repeats", num_repeats, 1)
        missing = num_repeats - len(self._lanczos_iters)
        if missing > 0:
            evals, evecs = lanczos_iterations(self._A, self._ncv, missing)
            self._lanczos_iters.extend(zip(evals, evecs))
        return self._lanczos_iters[:num_repeats]

    def _nodes(self) -> Tensor:
        """Return the quadrature nodes of the first Lanczos process.

        Returns:
            The eigenvalues of its tridiagonal matrix, ``[ncv]``.
        """
        return self._iterations(1)[0][0]

    def _extreme_eigenvalue(self, which: str) -> float:
        """Estimate an extreme eigenvalue; fall back to the Lanczos nodes.

        If ARPACK does not converge, the extreme node of the first process (an
        inner bound by eigenvalue interlacing) is used instead.

        Args:
            which: ``'SA'`` (smallest), ``'LA'`` (largest), or ``'LM'`` (largest
                magnitude).

        Returns:
            The estimate.
        """
        estimate = extreme_eigenvalue(self._A, which, self._boundaries_tol)
        if estimate is None:
            nodes = self._nodes()
            nodes = nodes.abs() if which == "LM" else nodes
            estimate = (nodes.min() if which == "SA" else nodes.max()).item()
        return estimate

    def _average(self, densities: list[tuple[Tensor, Tensor]]):
        """Average the densities of several Lanczos processes on their shared grid.

        Args:
            densities: Pairs of grid and density, one per process.

        Returns:
            The grid and the averaged density, in the caller's world.
        """
        grid = densities[0][0]
        density = stack([d for _, d in densities]).mean(0)
        return self._A.to_caller(grid), self._A.to_caller(density)


class LanczosApproximateSpectrumCached(_CachedLanczosQuadratures):
    r"""Spectral density of a symmetric operator; caches the Lanczos iterations.

    Approximates :math:`p(\lambda) = \frac{1}{N} \sum_i \delta(\lambda -
    \lambda_i)` of :math:`\mathbf{A} \in \mathbb{R}^{N \times N}`. The expensive
    part, the Lanczos iterations (``ncv`` products per starting vector, all starting
    vectors in one batch), runs once and is reused by every call of
    :meth:`approximate_spectrum`, so densities with other resolutions or widths
    cost no further products; more repeats than cached run only the missing ones.
    Implements Algorithm 2 (``LanczosApproxSpec``) of

    - Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
      spectra. Journal of Machine Learning Research (JMLR).

    Example:
        >>> from torch import cat, float64, full, linspace, manual_seed
        >>> _ = manual_seed(0)
        >>> eigenvalues = cat([full((90,), 0.0), linspace(9, 11, 10)])
        >>> A = eigenvalues.diag().to(float64)  # mass 0.9 at 0, 0.1 around 10
        >>> spectrum = LanczosApproximateSpectrumCached(A, ncv=30)
        >>> grid, density = spectrum.approximate_spectrum(num_repeats=5)
        >>> spacing = grid[1] - grid[0]
        >>> mass_near_zero = density[grid.abs() < 1].sum() * spacing
        >>> bool(abs(mass_near_zero - 0.9) < 0.05)
        True
    """

    def __init__(
        self,
        A,
        ncv: int,
        boundaries: Boundaries = None,
        boundaries_tol: float = 1e-2,
        check_symmetric: bool = True,
    ):
        r"""Store the operator and the settings of the Lanczos iterations.

        Args:
            A: Symmetric operator of shape ``[N, N]``: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            ncv: Number of Lanczos vectors, i.e. quadrature nodes per starting
                vector, an integer in :math:`[2, N]`.
            boundaries: Estimates ``(lambda_min, lambda_max)`` of the extreme
                eigenvalues. Entries that are ``None`` (all if ``boundaries=None``)
                are estimated with :func:`scipy.sparse.linalg.eigsh`.
            boundaries_tol: Relative accuracy of the estimated boundaries
                (``0``: machine precision). Default: ``1e-2``.
            check_symmetric: Probe that ``A`` is symmetric (one product with 8
                columns, skipped for operators with ``SELF_ADJOINT``) and raise a
                ``ValueError`` if it is not. Default: ``True``.
        """
        super().__init__(A, ncv, boundaries, boundaries_tol, check_symmetric)

    def approximate_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
    ) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
        r"""Approximate the spectral density :math:`p(\lambda)` on a grid.

        Args:
            num_repeats: Number of quadratures (random starting vectors) to
                average. Default: ``1`` (Papyan, 2020, Section D.2).
            num_points: Number of grid points. Default: ``1024``.
            kappa: Width parameter of the Gaussians that smooth the nodes, greater
                than 1: nodes spaced evenly over :math:`[-1, 1]` have Gaussians
                that fall to :math:`1/\kappa` of their peak half-way to the next
                node. Default: ``3.0`` (Papyan, 2020, Section D.2).
            margin: Relative margin added to either side of the spectral
                boundaries. Default: ``0.05`` (Papyan, 2020, Section D.2).

        Returns:
            Grid points :math:`\lambda` and the density :math:`p(\lambda)`
            (normalized to integrate to one), each of shape ``[num_points]``:
            tensors for torch inputs, NumPy arrays otherwise.
        """
        iterations = self._iterations(num_repeats)
        boundaries = self._spectral_boundaries()
        return self._average(
            [
                lanczos_approximate_spectrum_from_iter(
                    lanczos_iter, boundaries, num_points, kappa, margin
                )
                for lanczos_iter in iterations
            ]
        )

    def _spectral_boundaries(self) -> tuple[float, float]:
        """Return the extreme eigenvalues, estimating those not given (cached).

        Returns:
            Smallest and largest eigenvalue.
        """
        self._boundaries = _ordered(
            self._boundaries,
            fill_boundaries(self._boundaries, ("SA", "LA"), self._extreme_eigenvalue),
        )
        return self._boundaries


class LanczosApproximateLogSpectrumCached(_CachedLanczosQuadratures):
    r"""Spectral density of :math:`|\mathbf{A}| + \epsilon \mathbf{I}` on a log scale.

    Curvature spectra of neural networks span many orders of magnitude, which a
    density smoothed over :math:`\log(|\lambda| + \epsilon)` resolves. The
    quadrature nodes :math:`\theta_k` of the Lanczos iterations on
    :math:`\mathbf{A}` are mapped to :math:`\log(|\theta_k| + \epsilon)` (natural
    logarithm) before smoothing (Papyan, 2020, Section C.7); the density is then
    returned on the logarithmically spaced grid :math:`\lambda = |\lambda_i| +
    \epsilon` itself, w.r.t. :math:`\lambda` (see
    :func:`lanczos_approximate_log_spectrum_from_iter`), to be plotted with a
    logarithmic :math:`\lambda`-axis. As in
    :class:`LanczosApproximateSpectrumCached`, the Lanczos iterations are cached.
    See

    - Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
      spectra. Journal of Machine Learning Research (JMLR).

    Example:
        >>> from torch import float64, logspace, manual_seed
        >>> _ = manual_seed(0)
        >>> A = logspace(-3, 3, 100, dtype=float64).diag()  # |eigenvalues| span 1e6
        >>> spectrum = LanczosApproximateLogSpectrumCached(A, ncv=40)
        >>> grid, density = spectrum.approximate_log_spectrum(num_repeats=3)
        >>> bool(grid[-1] > 1e3)  # λ, not log λ
        True
        >>> from torch import trapezoid
        >>> round(trapezoid(density, grid).item(), 2)  # a density w.r.t. λ
        1.0
    """

    def __init__(
        self,
        A,
        ncv: int,
        boundaries: Boundaries = None,
        boundaries_tol: float = 1e-2,
        check_symmetric: bool = True,
    ):
        r"""Store the operator and the settings of the Lanczos iterations.

        Args:
            A: Symmetric operator of shape ``[N, N]``: a
                :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix,
                or a SciPy ``LinearOperator``.
            ncv: Number of Lanczos vectors, i.e. quadrature nodes per starting
                vector, an integer in :math:`[2, N]`.
            boundaries: Estimates of the smallest and largest eigenvalue of
                :math:`|\mathbf{A}|`. If ``None`` (or ``boundaries=None``), the
                largest is estimated with :func:`scipy.sparse.linalg.eigsh` and the
                smallest is taken from the Lanczos nodes of the first quadrature.
            boundaries_tol: Relative accuracy of the estimated boundaries
                (``0``: machine precision). Default: ``1e-2``.
            check_symmetric: Probe that ``A`` is symmetric (one product with 8
                columns, skipped for operators with ``SELF_ADJOINT``) and raise a
                ``ValueError`` if it is not. Default: ``True``.

        Raises:
            ValueError: If a given boundary is negative.
        """
        super().__init__(A, ncv, boundaries, boundaries_tol, check_symmetric)
        if any(b is not None and b < 0 for b in self._boundaries):
            raise ValueError(
                f"`boundaries` bound the eigenvalues of |A| and must be >= 0, got "
                f"{boundaries}."
            )

    def approximate_log_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
        r"""Approximate the density of :math:`|\mathbf{A}| + \epsilon`, log scale.

        Args:
            num_repeats: Number of quadratures (random starting vectors) to
                average. Default: ``1`` (Papyan, 2020, Section D.2).
            num_points: Number of grid points. Default: ``1024``.
            kappa: Width parameter of the Gaussians in log space, greater than 1
                (see :meth:`LanczosApproximateSpectrumCached.approximate_spectrum`).
                Default: ``3.0`` (as in curvlinops 3.x; the function
                :func:`lanczos_approximate_log_spectrum` defaults to ``1.04``).
            margin: Relative margin added to either side of the boundaries in log
                space. Default: ``0.05`` (Papyan, 2020, Section D.2).
            epsilon: Positive shift :math:`\epsilon` that keeps the logarithm
                finite. Default: ``1e-5`` (Papyan, 2020, Section D.2).

        Returns:
            Grid points :math:`\lambda` (logarithmically spaced eigenvalues of
            :math:`|\mathbf{A}| + \epsilon\mathbf{I}`) and the density
            :math:`p(\lambda)` w.r.t. :math:`\lambda` (it integrates to one over
            the grid), each of shape ``[num_points]``: tensors for torch inputs,
            NumPy arrays otherwise.

        Raises:
            ValueError: If ``epsilon`` is not positive.
        """
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive, got {epsilon}.")
        iterations = self._iterations(num_repeats)
        boundaries = self._absolute_boundaries()
        return self._average(
            [
                lanczos_approximate_log_spectrum_from_iter(
                    lanczos_iter, boundaries, num_points, kappa, margin, epsilon
                )
                for lanczos_iter in iterations
            ]
        )

    def _absolute_boundaries(self) -> tuple[float, float]:
        """Return the extreme eigenvalues of ``|A|``, estimating missing ones (cached).

        The smallest magnitude is that of the first Lanczos process's nodes: cheaper
        and more robust than ARPACK's ``'SM'``, though the nodes lie inside the
        spectrum (interlacing), so it can overestimate the smallest magnitude.

        Returns:
            Smallest and largest eigenvalue of ``|A|``.
        """

        def estimate(which: str) -> float:
            if which == "SM":
                return self._nodes().abs().min().item()
            return self._extreme_eigenvalue(which)

        self._boundaries = _ordered(
            self._boundaries, fill_boundaries(self._boundaries, ("SM", "LM"), estimate)
        )
        return self._boundaries


def _ordered(
    given: tuple[float | None, float | None], filled: tuple[float, float]
) -> tuple[float, float]:
    """Order estimated boundaries of a zero-width spectrum.

    Two estimates of the same eigenvalue can come out in the wrong order by
    rounding; given boundaries are left as they are (they were checked).

    Args:
        given: The boundaries before estimation; ``None`` entries were estimated.
        filled: The boundaries after estimation.

    Returns:
        ``filled``, swapped if both entries were estimated and are decreasing.
    """
    low, high = filled
    if given == (None, None) and low > high:
        return high, low
    return low, high


def lanczos_approximate_spectrum(
    A,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 3.0,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    check_symmetric: bool = True,
) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
    r"""Approximate the spectral density of a symmetric operator (Papyan, 2020).

    Runs ``num_repeats`` Lanczos quadratures of :math:`\mathbf{A} \in
    \mathbb{R}^{N \times N}` with ``ncv`` nodes each and smooths the nodes with
    Gaussians to approximate :math:`p(\lambda) = \frac{1}{N} \sum_i \delta(\lambda
    - \lambda_i)`. Use :class:`LanczosApproximateSpectrumCached` to compute several
    densities from the same Lanczos iterations. See

    - Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
      spectra. Journal of Machine Learning Research (JMLR).

    Args:
        A: Symmetric operator of shape ``[N, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        ncv: Number of Lanczos vectors (quadrature nodes), in :math:`[2, N]`.
        num_points: Number of grid points. Default: ``1024``.
        num_repeats: Number of quadratures to average. Default: ``1``.
        kappa: Width parameter of the Gaussians, greater than 1. Default: ``3.0``.
        boundaries: Estimates ``(lambda_min, lambda_max)`` of the extreme
            eigenvalues; ``None`` entries are estimated. Default: ``None``.
        margin: Relative margin added to either side of the spectral boundaries.
            Default: ``0.05``.
        boundaries_tol: Relative accuracy of estimated boundaries. Default:
            ``1e-2``.
        check_symmetric: Probe that ``A`` is symmetric (one product with 8
            columns, skipped for operators with ``SELF_ADJOINT``) and raise a
            ``ValueError`` if it is not. Default: ``True``.

    Returns:
        Grid points :math:`\lambda` and the density :math:`p(\lambda)`, each of
        shape ``[num_points]``: tensors for torch inputs, NumPy arrays otherwise.

    Example:
        >>> from numpy import diag, linspace
        >>> from numpy.random import seed
        >>> seed(0)
        >>> A = diag(linspace(-1.0, 1.0, 50))
        >>> grid, density = lanczos_approximate_spectrum(A, ncv=20, num_points=200)
        >>> type(density).__name__, density.shape
        ('ndarray', (200,))
    """
    spectrum = LanczosApproximateSpectrumCached(
        A, ncv, boundaries, boundaries_tol, check_symmetric
    )
    return spectrum.approximate_spectrum(num_repeats, num_points, kappa, margin)


def lanczos_approximate_log_spectrum(
    A,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 1.04,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    epsilon: float = 1e-5,
    check_symmetric: bool = True,
) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
    r"""Approximate the spectral density of :math:`|\mathbf{A}| + \epsilon`, log scale.

    Follows Section C.7 of Papyan (2020): the Lanczos quadrature nodes of
    :math:`\mathbf{A}` are mapped to :math:`\log(|\theta| + \epsilon)` (natural
    logarithm) and smoothed with Gaussians there. The density is returned on the
    grid :math:`\lambda = e^u` of the log-space grid :math:`u`, w.r.t.
    :math:`\lambda` (see :func:`lanczos_approximate_log_spectrum_from_iter`). Use
    :class:`LanczosApproximateLogSpectrumCached` to compute several densities from
    the same Lanczos iterations. See

    - Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
      spectra. Journal of Machine Learning Research (JMLR).

    Args:
        A: Symmetric operator of shape ``[N, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        ncv: Number of Lanczos vectors (quadrature nodes), in :math:`[2, N]`.
        num_points: Number of grid points. Default: ``1024``.
        num_repeats: Number of quadratures to average. Default: ``1``.
        kappa: Width parameter of the Gaussians in log space, greater than 1.
            Default: ``1.04``, tuned to reproduce Figure 15b of Papyan (2020).
        boundaries: Estimates of the smallest and largest eigenvalue of
            :math:`|\mathbf{A}|`; ``None`` entries are estimated (the smallest
            from the Lanczos nodes, the largest with ARPACK). Default: ``None``.
        margin: Relative margin added to either side of the boundaries in log
            space. Default: ``0.05``.
        boundaries_tol: Relative accuracy of estimated boundaries. Default:
            ``1e-2``.
        epsilon: Positive shift :math:`\epsilon`. Default: ``1e-5``.
        check_symmetric: Probe that ``A`` is symmetric (one product with 8
            columns, skipped for operators with ``SELF_ADJOINT``) and raise a
            ``ValueError`` if it is not. Default: ``True``.

    Returns:
        Grid points :math:`\lambda` (logarithmically spaced eigenvalues of
        :math:`|\mathbf{A}| + \epsilon\mathbf{I}`) and the density
        :math:`p(\lambda)` w.r.t. :math:`\lambda`, each of shape ``[num_points]``:
        tensors for torch inputs, NumPy arrays otherwise.

    Example:
        >>> from torch import float64, logspace, manual_seed
        >>> _ = manual_seed(0)
        >>> A = logspace(-2, 2, 60, dtype=float64).diag()
        >>> grid, density = lanczos_approximate_log_spectrum(A, ncv=30)
        >>> grid.shape, density.shape
        (torch.Size([1024]), torch.Size([1024]))
        >>> bool(grid[-1] > 1e2)  # λ, not log λ
        True
    """
    spectrum = LanczosApproximateLogSpectrumCached(
        A, ncv, boundaries, boundaries_tol, check_symmetric
    )
    return spectrum.approximate_log_spectrum(
        num_repeats, num_points, kappa, margin, epsilon
    )


__all__ = [
    "lanczos_approximate_spectrum",
    "lanczos_approximate_log_spectrum",
    "LanczosApproximateSpectrumCached",
    "LanczosApproximateLogSpectrumCached",
    "fast_lanczos",
    "approximate_boundaries",
    "approximate_boundaries_abs",
    "lanczos_approximate_spectrum_from_iter",
    "lanczos_approximate_log_spectrum_from_iter",
]
