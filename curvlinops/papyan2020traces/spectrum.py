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
Gaussians, set by :math:`\kappa`, is independent of the spectrum's scale.
"""

from __future__ import annotations

from math import log

from numpy import ndarray
from torch import Tensor, cat

from curvlinops._adapter import adapt_square
from curvlinops._checks import check_symmetry
from curvlinops.papyan2020traces._quadrature import (
    check_boundaries,
    check_int,
    extreme_eigenvalue,
    lanczos_quadrature,
    smoothed_density,
)

Boundaries = tuple[float | None, float | None] | None


class _CachedLanczosQuadratures:
    """Operator, settings and cached Lanczos quadratures of the spectrum classes."""

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
        self._nodes, self._weights = None, None

    def _quadratures(self, num_repeats: int) -> tuple[Tensor, Tensor]:
        """Return cached quadratures, computing missing repeats in one batch.

        Args:
            num_repeats: Number of quadratures.

        Returns:
            Nodes and weights, each of shape ``[num_repeats, ncv]``.
        """
        num_repeats = check_int("num_repeats", num_repeats, 1)
        num_cached = 0 if self._nodes is None else self._nodes.shape[0]
        if num_repeats > num_cached:
            nodes, weights = lanczos_quadrature(
                self._A, self._ncv, num_repeats - num_cached
            )
            if self._nodes is not None:
                nodes, weights = (
                    cat([self._nodes, nodes]),
                    cat([self._weights, weights]),
                )
            self._nodes, self._weights = nodes, weights
        return self._nodes[:num_repeats], self._weights[:num_repeats]

    def _extreme_eigenvalue(self, which: str) -> float:
        """Estimate an extreme eigenvalue; fall back to the Lanczos nodes.

        If ARPACK does not converge, the extreme node of the first quadrature (an
        inner bound by eigenvalue interlacing) is used instead.

        Args:
            which: ``'SA'`` (smallest), ``'LA'`` (largest), or ``'LM'`` (largest
                magnitude).

        Returns:
            The estimate.
        """
        estimate = extreme_eigenvalue(self._A, which, self._boundaries_tol)
        if estimate is None:
            nodes = self._quadratures(1)[0][0]
            nodes = nodes.abs() if which == "LM" else nodes
            estimate = (nodes.min() if which == "SA" else nodes.max()).item()
        return estimate


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
        nodes, weights = self._quadratures(num_repeats)
        low, high = self._spectral_boundaries()
        grid, density = smoothed_density(
            nodes, weights, low, high, num_points, kappa, margin
        )
        return self._A.to_caller(grid), self._A.to_caller(density)

    def _spectral_boundaries(self) -> tuple[float, float]:
        """Return the extreme eigenvalues, estimating those not given (cached).

        Returns:
            Smallest and largest eigenvalue.
        """
        low, high = self._boundaries
        estimated = low is None and high is None
        if low is None:
            low = self._extreme_eigenvalue("SA")
        if high is None:
            high = self._extreme_eigenvalue("LA")
        if estimated and low > high:  # a zero-width spectrum, up to rounding
            low, high = high, low
        self._boundaries = (low, high)
        return low, high


class LanczosApproximateLogSpectrumCached(_CachedLanczosQuadratures):
    r"""Spectral density of :math:`\log(|\mathbf{A}| + \epsilon \mathbf{I})`.

    Curvature spectra of neural networks span many orders of magnitude, which a
    density over :math:`\log(|\lambda| + \epsilon)` resolves. The quadrature
    nodes :math:`\theta_k` of the Lanczos iterations on :math:`\mathbf{A}` are
    mapped to :math:`\log(|\theta_k| + \epsilon)` (natural logarithm) before
    smoothing (Papyan, 2020, Section C.7). As in
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
        >>> from math import log
        >>> bool(log(1e-3) < grid[density.argmax()] < log(1e3))
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
        kappa: float = 1.04,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> tuple[Tensor, Tensor] | tuple[ndarray, ndarray]:
        r"""Approximate the spectral density of :math:`\log(|\mathbf{A}| + \epsilon)`.

        Args:
            num_repeats: Number of quadratures (random starting vectors) to
                average. Default: ``1`` (Papyan, 2020, Section D.2).
            num_points: Number of grid points. Default: ``1024``.
            kappa: Width parameter of the Gaussians, greater than 1 (see
                :meth:`LanczosApproximateSpectrumCached.approximate_spectrum`).
                Default: ``1.04``, tuned to reproduce Figure 15b of Papyan (2020).
            margin: Relative margin added to either side of the boundaries in log
                space. Default: ``0.05`` (Papyan, 2020, Section D.2).
            epsilon: Positive shift :math:`\epsilon` that keeps the logarithm
                finite. Default: ``1e-5`` (Papyan, 2020, Section D.2).

        Returns:
            Grid points (values of :math:`\log(|\lambda| + \epsilon)`) and the
            density on them (normalized to integrate to one), each of shape
            ``[num_points]``: tensors for torch inputs, NumPy arrays otherwise.

        Raises:
            ValueError: If ``epsilon`` is not positive.
        """
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive, got {epsilon}.")
        nodes, weights = self._quadratures(num_repeats)
        low, high = (log(b + epsilon) for b in self._absolute_boundaries())
        grid, density = smoothed_density(
            (nodes.abs() + epsilon).log(), weights, low, high, num_points, kappa, margin
        )
        return self._A.to_caller(grid), self._A.to_caller(density)

    def _absolute_boundaries(self) -> tuple[float, float]:
        """Return the extreme eigenvalues of ``|A|``, estimating missing ones (cached).

        Returns:
            Smallest and largest eigenvalue of ``|A|``.
        """
        low, high = self._boundaries
        estimated = low is None and high is None
        if high is None:
            high = self._extreme_eigenvalue("LM")
        if low is None:
            low = self._quadratures(1)[0][0].abs().min().item()
        if estimated and low > high:  # a zero-width spectrum, up to rounding
            low, high = high, low
        self._boundaries = (low, high)
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
    r"""Approximate the spectral density of :math:`\log(|\mathbf{A}| + \epsilon)`.

    Follows Section C.7 of Papyan (2020): the Lanczos quadrature nodes of
    :math:`\mathbf{A}` are mapped to :math:`\log(|\theta| + \epsilon)` (natural
    logarithm) and smoothed with Gaussians. Use
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
        kappa: Width parameter of the Gaussians, greater than 1. Default: ``1.04``.
        boundaries: Estimates of the smallest and largest eigenvalue of
            :math:`|\mathbf{A}|`; ``None`` entries are estimated. Default: ``None``.
        margin: Relative margin added to either side of the boundaries in log
            space. Default: ``0.05``.
        boundaries_tol: Relative accuracy of estimated boundaries. Default:
            ``1e-2``.
        epsilon: Positive shift :math:`\epsilon`. Default: ``1e-5``.
        check_symmetric: Probe that ``A`` is symmetric (one product with 8
            columns, skipped for operators with ``SELF_ADJOINT``) and raise a
            ``ValueError`` if it is not. Default: ``True``.

    Returns:
        Grid points (values of :math:`\log(|\lambda| + \epsilon)`) and the
        density on them, each of shape ``[num_points]``: tensors for torch inputs,
        NumPy arrays otherwise.

    Example:
        >>> from torch import float64, logspace, manual_seed
        >>> _ = manual_seed(0)
        >>> A = logspace(-2, 2, 60, dtype=float64).diag()
        >>> grid, density = lanczos_approximate_log_spectrum(A, ncv=30)
        >>> grid.shape, density.shape
        (torch.Size([1024]), torch.Size([1024]))
    """
    spectrum = LanczosApproximateLogSpectrumCached(
        A, ncv, boundaries, boundaries_tol, check_symmetric
    )
    return spectrum.approximate_log_spectrum(
        num_repeats, num_points, kappa, margin, epsilon
    )
