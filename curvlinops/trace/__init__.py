"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace."""

from curvlinops.trace.epperly2024xtrace import xtrace
from curvlinops.trace.hutchinson import HutchinsonTraceEstimator, hutchinson_trace
from curvlinops.trace.meyer2020hutch import HutchPPTraceEstimator, hutchpp_trace

__all__ = [
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "HutchinsonTraceEstimator",
    "HutchPPTraceEstimator",
]
