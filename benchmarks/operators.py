"""Operators under benchmark: how to build each one for a problem.

Each entry maps a name to a function ``Problem -> PyTorchLinearOperator``.
Construction is not timed; operators that precompute something (KFAC) can list a
``precompute`` step in ``PRECOMPUTE``.
"""

from __future__ import annotations

from collections.abc import Callable

from problems import Problem

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
)


def _curvature(cls, kfac: bool = False, **kwargs) -> Callable[[Problem], object]:
    def build(problem: Problem):
        return cls(
            problem.model,
            problem.loss_func,
            problem.kfac_params if kfac else problem.params,
            problem.data,
            check_deterministic=False,
            **kwargs,
        )

    return build


def _kfac_inverse(problem: Problem) -> KFACInverseLinearOperator:
    kfac = _curvature(KFACLinearOperator, kfac=True)(problem)
    kfac.compute_kronecker_factors()
    return KFACInverseLinearOperator(kfac, damping=1e-3)


def _jacobian(cls) -> Callable[[Problem], object]:
    def build(problem: Problem):
        return cls(
            problem.model, problem.params, problem.data, check_deterministic=False
        )

    return build


OPERATORS: dict[str, Callable[[Problem], object]] = {
    "hessian": _curvature(HessianLinearOperator),
    "ggn": _curvature(GGNLinearOperator),
    "ef": _curvature(EFLinearOperator),
    "mc_fisher": _curvature(FisherMCLinearOperator),
    "jacobian": _jacobian(JacobianLinearOperator),
    "transposed_jacobian": _jacobian(TransposedJacobianLinearOperator),
    # Kronecker factors with 'mc' and one sample (defaults), of the Linear and
    # Conv2d layers
    "kfac": _curvature(KFACLinearOperator, kfac=True),
    "ekfac": _curvature(EKFACLinearOperator, kfac=True),
    "kfac_inverse": _kfac_inverse,
}

# name -> (operator -> None): one-off work before products (timed separately)
PRECOMPUTE: dict[str, Callable[[object], None]] = {
    # one pass over the data for the factors
    "kfac": lambda op: op.compute_kronecker_factors(),
    # factors, their eigendecompositions, and a second pass for the correction
    "ekfac": lambda op: op.compute_kronecker_factors(),
    # inverting the (damped) factors
    "kfac_inverse": lambda op: op._inverse_factors(),
}
