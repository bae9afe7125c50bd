"""Experimental features: their API may change or be deprecated in the future."""

from curvlinops.experimental.activation_hessian import ActivationHessianLinearOperator

__all__ = [
    # Curvature w.r.t. intermediate features
    "ActivationHessianLinearOperator",
]
