"""Smoke test of an installed curvlinops wheel, run by ``test_packaging.py``.

Runs in a fresh virtual environment, from a directory outside the repository, so
that ``import curvlinops`` finds the installed wheel and nothing else. Checks that
every operator multiplies on a tiny model (the exact ones against dense references),
that every public module imports (a module missing from the wheel fails here), and
that the demo runs.
"""

import pkgutil
import sys
from importlib import import_module
from pathlib import Path

import torch
from torch import nn

import curvlinops
from curvlinops.examples import IdentityLinearOperator
from curvlinops.examples.functorch import functorch_ggn, functorch_hessian


def check_installed_outside(repository: Path):
    """The imported package is the installed wheel, not the repository's sources."""
    location = Path(curvlinops.__file__).resolve()
    assert "site-packages" in location.parts, location
    assert repository not in location.parents, location


def check_every_module_imports():
    """Import every module of the package, as a user's script may."""
    names = [
        info.name
        for info in pkgutil.walk_packages(curvlinops.__path__, "curvlinops.")
        if info.name != "curvlinops.demo"
    ]
    for name in names:
        import_module(name)
    assert len(names) >= 30, names


def tiny_problem():
    """A small classifier in float64 with two batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.rand(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def check_every_operator():
    """One product of every operator; the exact ones against dense references."""
    model, loss, params, data = tiny_problem()
    dim = sum(p.numel() for p in params)
    v = torch.rand(dim, dtype=torch.float64)
    H = curvlinops.HessianLinearOperator(model, loss, params, data)
    G = curvlinops.GGNLinearOperator(model, loss, params, data)
    assert torch.allclose(H @ v, functorch_hessian(model, loss, params, data) @ v)
    assert torch.allclose(G @ v, functorch_ggn(model, loss, params, data) @ v)
    others = [
        curvlinops.EFLinearOperator(model, loss, params, data),
        curvlinops.FisherMCLinearOperator(model, loss, params, data),
        curvlinops.KFACLinearOperator(model, loss, params, data),
        curvlinops.EKFACLinearOperator(model, loss, params, data),
        curvlinops.SubmatrixLinearOperator(H, [0, 1], [2, 3, 4]),
    ]
    kfac = others[2]
    others.append(curvlinops.KFACInverseLinearOperator(kfac, damping=1e-2))
    for op in others:
        result = op @ torch.rand(op.shape[1], dtype=torch.float64)
        assert result.shape == (op.shape[0],) and torch.isfinite(result).all(), op
    identity = IdentityLinearOperator([(dim,)], v.device, v.dtype)
    G_dense = functorch_ggn(model, loss, params, data)
    damped = torch.linalg.solve(G_dense + torch.eye(dim, dtype=v.dtype), v)
    cg = curvlinops.CGInverseLinearOperator(G + identity)
    assert torch.allclose(cg @ v, damped, atol=1e-4)
    J = curvlinops.JacobianLinearOperator(model, params, data)
    JT = curvlinops.TransposedJacobianLinearOperator(model, params, data)
    w = torch.rand(J.shape[0], dtype=torch.float64)
    assert torch.allclose(w @ (J @ v), (JT @ w) @ v)


def main():
    check_installed_outside(Path(sys.argv[1]).resolve())
    check_every_module_imports()
    check_every_operator()
    print("wheel smoke test passed, curvlinops", curvlinops.__version__)


if __name__ == "__main__":
    main()
