"""curvlinops: curvature matrices of neural networks as matrix-free linear operators."""

from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator
from curvlinops._version import __version__ as __version__
from curvlinops.diagonal import HutchinsonDiagonalEstimator, hutchinson_diag, xdiag
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.fisher import FisherMCLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.ggn_diagonal import GGNDiagonalLinearOperator
from curvlinops.gradient_moments import EFLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.inverse import (
    CGInverseLinearOperator,
    KFACInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.jacobian import JacobianLinearOperator, TransposedJacobianLinearOperator
from curvlinops.kfac import FisherType, KFACLinearOperator, KFACType
from curvlinops.kfoc import KFOCLinearOperator
from curvlinops.norm import hutchinson_squared_fro
from curvlinops.papyan2020traces import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.structured import (
    BlockDiagonalLinearOperator,
    DiagonalLinearOperator,
    EighDecomposedLinearOperator,
    KroneckerProductLinearOperator,
)
from curvlinops.submatrix import SubmatrixLinearOperator
from curvlinops.trace import (
    HutchinsonTraceEstimator,
    HutchPPTraceEstimator,
    hutchinson_trace,
    hutchpp_trace,
    xtrace,
)

__all__ = [
    # Base classes
    "PyTorchLinearOperator",
    "CurvatureLinearOperator",
    # Curvature operators
    "HessianLinearOperator",
    "GGNLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "JacobianLinearOperator",
    "TransposedJacobianLinearOperator",
    "GGNDiagonalLinearOperator",
    # Kronecker-factored approximations
    "KFACLinearOperator",
    "EKFACLinearOperator",
    "KFOCLinearOperator",
    "FisherType",
    "KFACType",
    # Structured operators with closed-form algebra
    "KroneckerProductLinearOperator",
    "BlockDiagonalLinearOperator",
    "EighDecomposedLinearOperator",
    "DiagonalLinearOperator",
    # Algorithms on any operator: inverses, sub-matrices
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "KFACInverseLinearOperator",
    "SubmatrixLinearOperator",
    # Algorithms on any operator: trace, diagonal and norm estimation
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "HutchinsonTraceEstimator",
    "HutchPPTraceEstimator",
    "hutchinson_diag",
    "xdiag",
    "HutchinsonDiagonalEstimator",
    "hutchinson_squared_fro",
    # Algorithms on any operator: spectral density (Papyan, 2020)
    "lanczos_approximate_spectrum",
    "lanczos_approximate_log_spectrum",
    "LanczosApproximateSpectrumCached",
    "LanczosApproximateLogSpectrumCached",
]
