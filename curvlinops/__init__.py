"""curvlinops: curvature matrices of neural networks as matrix-free linear operators."""

from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator
from curvlinops.fisher import FisherMCLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient_moments import EFLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.jacobian import JacobianLinearOperator, TransposedJacobianLinearOperator

__version__ = "3.0.0"

__all__ = [
    # Base classes
    "PyTorchLinearOperator",
    "CurvatureLinearOperator",
    # Curvature operators
    "HessianLinearOperator",
    "GGNLinearOperator",
    # Fisher variants and Jacobians
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "JacobianLinearOperator",
    "TransposedJacobianLinearOperator",
]
