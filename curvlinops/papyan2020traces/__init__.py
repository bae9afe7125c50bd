"""Spectral density approximation with Lanczos quadrature (Papyan, 2020)."""

from curvlinops.papyan2020traces.spectrum import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    approximate_boundaries,
    approximate_boundaries_abs,
    fast_lanczos,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum,
    lanczos_approximate_spectrum_from_iter,
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
