"""curvlinops: curvature matrices of neural networks as matrix-free linear operators."""

from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.inverse import KFACInverseLinearOperator
from curvlinops.kfac import KFACLinearOperator

__version__ = "3.0.0"

__all__ = [
    # Base classes
    "PyTorchLinearOperator",
    "CurvatureLinearOperator",
    # Curvature operators
    "HessianLinearOperator",
    "GGNLinearOperator",
    # Kronecker-factored approximations and their inverse
    "KFACLinearOperator",
    "EKFACLinearOperator",
    "KFACInverseLinearOperator",
]
