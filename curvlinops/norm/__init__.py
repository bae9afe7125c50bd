"""Stochastic norm estimation."""

from curvlinops.norm.hutchinson import hutchinson_squared_fro

__all__ = ["hutchinson_squared_fro"]
