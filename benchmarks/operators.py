"""Operators under benchmark: how to build each one for a problem.

Each entry maps a name to a function ``Problem -> PyTorchLinearOperator``.
Construction is not timed; operators that precompute something (KFAC) can list a
``precompute`` step in ``PRECOMPUTE``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from problems import Problem
from torch.nn.attention import SDPBackend, sdpa_kernel

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


class TorchHessian:
    """PyTorch's own Hessian product on one mini-batch, for comparison.

    Reverse-over-reverse differentiation with ``torch.autograd.grad`` (columns
    batched with ``is_grads_batched``), attention on the composite kernel: what a
    product costs without curvlinops, the floor of reverse-over-reverse.
    """

    def __init__(self, problem: Problem):
        self.problem = problem
        self.params = problem.params
        num_params = sum(p.numel() for p in self.params)
        self.shape, self.dtype = (num_params, num_params), self.params[0].dtype

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        p, columns = self.problem, v.reshape(v.shape[0], -1).T
        with sdpa_kernel(SDPBackend.MATH):
            loss = p.loss_func(p.model(p.X), p.y)
            gradient = torch.autograd.grad(loss, self.params, create_graph=True)
            shaped = [
                c.reshape(-1, *param.shape)
                for c, param in zip(
                    columns.split([q.numel() for q in self.params], 1), self.params
                )
            ]
            batched = columns.shape[0] > 1
            Hv = torch.autograd.grad(
                gradient,
                self.params,
                shaped if batched else [s.squeeze(0) for s in shaped],
                is_grads_batched=batched,
            )
        result = torch.cat([h.reshape(columns.shape[0], -1) for h in Hv], 1).T
        return result.reshape(v.shape)


OPERATORS: dict[str, Callable[[Problem], object]] = {
    "hessian": _curvature(HessianLinearOperator),
    "hessian (torch)": TorchHessian,
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
