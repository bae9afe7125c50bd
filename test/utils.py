"""Shared test helpers: the conformance checker and small utilities."""

from __future__ import annotations

import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType

import numpy
from torch import Generator, Tensor, cat, float64, randn
from torch.linalg import matrix_norm

from curvlinops._torch_base import PyTorchLinearOperator

# Tolerances for float64 comparisons against dense references.
RTOL, ATOL = 1e-7, 1e-9


def assert_close(a, b, rtol: float = RTOL, atol: float = ATOL, msg: str = ""):
    """Assert two tensors, arrays, or tensor lists are close, with a helpful message."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{msg}: lengths {len(a)} vs {len(b)}"
        for idx, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rtol, atol, f"{msg}[{idx}]")
        return
    a, b = numpy.asarray(_to_numpy(a)), numpy.asarray(_to_numpy(b))
    assert a.shape == b.shape, f"{msg}: shapes {a.shape} vs {b.shape}"
    numpy.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=msg)


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def random_columns(num_rows: int, num_cols: int, like: PyTorchLinearOperator, seed=0):
    """Draw a seeded random matrix on the operator's device and dtype."""
    generator = Generator().manual_seed(seed)
    M = randn(num_rows, num_cols, generator=generator, dtype=float64)
    return M.to(like.device, like.dtype)


def to_tensor_list(M: Tensor, shapes) -> list[Tensor]:
    """Split a vector [N] or matrix [N, K] into tensor-list format."""
    trailing = M.shape[1:]
    blocks = M.split([s.numel() for s in shapes])
    return [b.reshape(*s, *trailing) for b, s in zip(blocks, shapes)]


def compare_matmat(
    op: PyTorchLinearOperator,
    dense: Tensor,
    rtol: float = RTOL,
    atol: float = ATOL,
    num_cols: int = 3,
):
    """Check an operator against its dense matrix in every input format.

    Covers vectors, matrices, tensor lists (vector and matrix), NumPy arrays, the
    SciPy export (matvec, matmat, rmatvec, rmatmat), multiplication from the left,
    the adjoint, and that two consecutive products agree.
    """
    scale = max(matrix_norm(dense).item(), 1.0)
    atol = atol * scale
    assert op.shape == tuple(dense.shape)
    M = random_columns(op.shape[1], num_cols, op, seed=1)
    v = M[:, 0]
    expected_M, expected_v = dense @ M, dense @ v

    assert_close(op @ v, expected_v, rtol, atol, "vector")
    first = op @ M
    assert_close(first, expected_M, rtol, atol, "matrix")
    assert_close(op @ M, first, rtol, atol, "second product")

    in_shapes, out_shapes = op._in_shape, op._out_shape
    result = op @ to_tensor_list(v, in_shapes)
    assert_close(result, to_tensor_list(expected_v, out_shapes), rtol, atol, "list vec")
    result = op @ to_tensor_list(M, in_shapes)
    assert_close(result, to_tensor_list(expected_M, out_shapes), rtol, atol, "list mat")

    M_np = M.cpu().numpy()
    result = op @ M_np
    assert isinstance(result, numpy.ndarray)
    assert_close(result, expected_M, rtol, atol, "numpy")

    scipy_op = op.to_scipy()
    assert_close(scipy_op @ M_np[:, 0], expected_v, rtol, atol, "scipy matvec")
    assert_close(scipy_op.matmat(M_np), expected_M, rtol, atol, "scipy matmat")

    W = random_columns(op.shape[0], num_cols, op, seed=2)
    expected_WT = dense.T @ W
    assert_close(W[:, 0] @ op, expected_WT[:, 0], rtol, atol, "left vector")
    assert_close(W.T @ op, expected_WT.T, rtol, atol, "left matrix")
    assert_close(W.cpu().numpy().T @ op, expected_WT.T, rtol, atol, "left numpy")
    assert_close(op.adjoint() @ W, expected_WT, rtol, atol, "adjoint")
    W_np = W.cpu().numpy()
    assert_close(scipy_op.rmatvec(W_np[:, 0]), expected_WT[:, 0], rtol, atol, "rmatvec")
    assert_close(scipy_op.rmatmat(W_np), expected_WT, rtol, atol, "rmatmat")


def diagonal_blocks(dense: Tensor, params, block_sizes) -> Tensor:
    """The block-diagonal part of a dense matrix, blocks over groups of parameters."""
    sizes, start = [], 0
    for size in block_sizes:
        sizes.append(sum(p.numel() for p in params[start : start + size]))
        start += size
    result, offset = dense.new_zeros(dense.shape), 0
    for n in sizes:
        block = slice(offset, offset + n)
        result[block, block] = dense[block, block]
        offset += n
    return result


def batch_matrix(params, num_cols: int = 3, seed: int = 0) -> list[Tensor]:
    """Seeded columns in tensor-list format ``[*param.shape, K]`` (float64)."""
    generator = Generator().manual_seed(seed)
    return [
        randn(*p.shape, num_cols, generator=generator, dtype=float64).to(p.device)
        for p in params
    ]


def flatten_matrix(M: list[Tensor]) -> Tensor:
    """Stack a tensor-list matrix ``[*shape, K]`` into ``[N, K]``."""
    return cat([m.reshape(-1, m.shape[-1]) for m in M])


def batched_columns(op):
    """Fix an operator's choice for products with several columns to batched passes.

    Operators measure whether batched or per-column passes are faster (see
    :class:`curvlinops._columns.ColumnPolicy`); both give the same numbers up to
    rounding. Operators built separately may choose differently, so tests that
    compare them bit for bit fix the choice.

    Args:
        op: An operator; those without a per-batch product (KFAC) are unchanged.

    Returns:
        The operator.
    """
    modes = getattr(getattr(op, "_mp", None), "modes", None)
    if modes is not None:
        modes.columns.force = "batched"
    return op


def load_docs_module(name: str) -> ModuleType:
    """Import a helper module of ``docs/`` (e.g. ``'_torchvision'``), once."""
    key = f"curvlinops_docs_{name.lstrip('_')}"
    if key not in sys.modules:
        path = Path(__file__).parents[1] / "docs" / f"{name}.py"
        spec = spec_from_file_location(key, path)
        module = module_from_spec(spec)
        sys.modules[key] = module  # keeps what the module defines alive
        spec.loader.exec_module(module)
    return sys.modules[key]
