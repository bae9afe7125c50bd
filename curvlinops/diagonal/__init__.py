"""Stochastic diagonal estimation: Hutchinson and XDiag."""

from curvlinops.diagonal.epperly2024xdiag import xdiag
from curvlinops.diagonal.hutchinson import HutchinsonDiagonalEstimator, hutchinson_diag

__all__ = ["hutchinson_diag", "xdiag", "HutchinsonDiagonalEstimator"]
