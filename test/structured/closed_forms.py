"""The battery every structured operator passes against its dense float64 matrix."""

from __future__ import annotations

from math import inf, nan

from torch import Tensor, eye, tensor
from torch.linalg import inv, matrix_norm, slogdet

from curvlinops._torch_base import PyTorchLinearOperator
from test.utils import assert_close, compare_matmat

DAMPING = 0.7


def dense_logdet(dense: Tensor) -> Tensor:
    """``torch.logdet``'s convention from ``slogdet``: -inf if singular, nan if < 0."""
    sign, logabsdet = slogdet(dense)
    if sign > 0:
        return logabsdet
    return tensor(-inf if sign == 0 else nan, dtype=dense.dtype)


def check_closed_forms(
    op: PyTorchLinearOperator,
    dense: Tensor,
    inverse_type: type | None = None,
    damped_inverse_type: type | None = None,
):
    """Compare products, scalars and (damped) inverses with the dense matrix.

    ``inverse_type``/``damped_inverse_type``: the structured type the inverse must
    have (``None``: that inverse is not checked).
    """
    compare_matmat(op, dense)
    assert_close(op.trace, dense.trace(), msg="trace")
    sign, logabsdet = slogdet(dense)
    assert_close(op.det, sign * logabsdet.exp(), msg="det")
    assert_close(op.logdet, dense_logdet(dense), msg="logdet")
    assert_close(op.frobenius_norm, matrix_norm(dense), msg="frobenius_norm")
    identity = eye(len(dense), dtype=dense.dtype)
    for damping, kind in [(0.0, inverse_type), (DAMPING, damped_inverse_type)]:
        if kind is None:
            continue
        inverse = op.inverse(damping=damping)
        assert type(inverse) is kind
        compare_matmat(inverse, inv(dense + damping * identity))
        assert inverse._in_shape == op._out_shape
