"""Hutchinson-style estimation of the squared Frobenius norm."""

from __future__ import annotations

from torch import Generator, Tensor

from curvlinops._adapter import adapt
from curvlinops._checks import check_num_matvecs


def hutchinson_squared_fro(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Generator | None = None,
) -> Tensor | float:
    r"""Estimate the squared Frobenius norm of an operator with Hutchinson's method.

    The squared Frobenius norm is the trace of :math:`\mathbf{A}^\top \mathbf{A}`.
    With :math:`K` = ``num_matvecs`` random vectors :math:`\mathbf{v}_k`,
    :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] = \mathbf{I}`, Hutchinson's trace
    estimator of :math:`\mathbf{A}^\top \mathbf{A}` needs only products with
    :math:`\mathbf{A}`:

    .. math::
        \lVert \mathbf{A} \rVert_\mathrm{F}^2
        = \mathrm{Tr}(\mathbf{A}^\top \mathbf{A})
        \approx \frac{1}{K} \sum_{k=1}^K \lVert \mathbf{A} \mathbf{v}_k \rVert_2^2\,.

    The estimate is unbiased and never negative. The operator need not be square.
    See

    - Hutchinson, M. F. (1989). A stochastic estimator of the trace of the
      influence matrix for Laplacian smoothing splines. Communications in
      Statistics - Simulation and Computation.

    Args:
        A: Operator of shape ``[M, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        num_matvecs: Number of matrix-vector products :math:`K`.
        distribution: Distribution of the random vectors, ``'rademacher'`` or
            ``'normal'``. Default: ``'rademacher'``.
        generator: PyTorch random number generator. Default: PyTorch's global
            generator for torch inputs, NumPy's global generator for NumPy/SciPy
            inputs.

    Returns:
        The estimate, a scalar tensor for torch inputs and a float otherwise.

    Example:
        >>> from torch import float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> A = rand(30, 20, dtype=float64)
        >>> exact = (A**2).sum()
        >>> rough = hutchinson_squared_fro(A, 10)
        >>> fine = hutchinson_squared_fro(A, 10_000)
        >>> bool(abs(fine - exact) < abs(rough - exact))
        True
    """
    A = adapt(A)
    check_num_matvecs(num_matvecs)
    V = A.random_columns(num_matvecs, distribution, generator)
    estimate = (A.operator @ V).square().sum() / num_matvecs
    return A.scalar_to_caller(estimate)


__all__ = ["hutchinson_squared_fro"]
