"""Hutchinson's stochastic trace estimator (Hutchinson, 1989)."""

from __future__ import annotations

from torch import Generator, Tensor, einsum

from curvlinops._adapter import adapt_square
from curvlinops._checks import check_num_matvecs


def hutchinson_trace(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Generator | None = None,
) -> Tensor | float:
    r"""Estimate the trace of a square operator with Hutchinson's method.

    Draws :math:`K` = ``num_matvecs`` random vectors :math:`\mathbf{v}_k` with
    :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] = \mathbf{I}` and averages the
    quadratic forms

    .. math::
        \mathrm{Tr}(\mathbf{A})
        \approx \frac{1}{K} \sum_{k=1}^K \mathbf{v}_k^\top \mathbf{A} \mathbf{v}_k\,.

    The estimator is unbiased, :math:`\mathbb{E}[\mathbf{v}^\top \mathbf{A}
    \mathbf{v}] = \mathrm{Tr}(\mathbf{A} \mathbb{E}[\mathbf{v} \mathbf{v}^\top])`,
    and its standard deviation decays as :math:`1/\sqrt{K}`. All products are done
    in one batched multiplication. See

    - Hutchinson, M. F. (1989). A stochastic estimator of the trace of the
      influence matrix for Laplacian smoothing splines. Communications in
      Statistics - Simulation and Computation.

    Args:
        A: Square operator of shape ``[N, N]``: a
            :class:`~curvlinops.PyTorchLinearOperator`, a torch or NumPy matrix, or a
            SciPy ``LinearOperator``.
        num_matvecs: Number of matrix-vector products :math:`K`.
        distribution: Distribution of the random vectors, ``'rademacher'`` or
            ``'normal'``. Default: ``'rademacher'``.
        generator: PyTorch random number generator. Default: PyTorch's global
            generator for torch inputs, NumPy's global generator for NumPy/SciPy
            inputs.

    Returns:
        The trace estimate, a scalar tensor for torch inputs and a float otherwise.

    Example:
        >>> from torch import float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> A = rand(50, 50, dtype=float64)
        >>> rough, fine = hutchinson_trace(A, 10), hutchinson_trace(A, 10_000)
        >>> bool(abs(fine - A.trace()) < abs(rough - A.trace()))
        True
    """
    A = adapt_square(A)
    check_num_matvecs(num_matvecs)
    V = A.random_columns(num_matvecs, distribution, generator)
    estimate = einsum("nk,nk->", V, A.operator @ V) / num_matvecs
    return A.scalar_to_caller(estimate)


class HutchinsonTraceEstimator:
    r"""Draw single-sample estimates of an operator's trace with Hutchinson's method.

    Each call of :meth:`sample` multiplies the operator onto one random vector
    :math:`\mathbf{v}` with :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] =
    \mathbf{I}` and returns :math:`a = \mathbf{v}^\top \mathbf{A} \mathbf{v}`, an
    unbiased estimate of :math:`\mathrm{Tr}(\mathbf{A})`:

    .. math::
        \mathbb{E}[a]
        = \mathrm{Tr}(\mathbf{A} \mathbb{E}[\mathbf{v} \mathbf{v}^\top])
        = \mathrm{Tr}(\mathbf{A})\,.

    Average several samples to reduce the variance; :func:`hutchinson_trace` does
    so with one batched product. Reference:

    - Hutchinson, M. F. (1989). A stochastic estimator of the trace of the
      influence matrix for Laplacian smoothing splines. Communications in
      Statistics - Simulation and Computation.

    Example:
        With a NumPy matrix, the vectors come from NumPy's global generator (the
        printout is that of NumPy 2):

        >>> from numpy import trace, mean, round
        >>> from numpy.random import rand, seed
        >>> seed(0)  # fix NumPy's global random state
        >>> A = rand(10, 10)
        >>> tr_A = trace(A)  # ground truth
        >>> estimator = HutchinsonTraceEstimator(A)
        >>> # average of one sample versus average of many samples
        >>> tr_A_low_precision = estimator.sample()
        >>> tr_A_high_precision = mean([estimator.sample() for _ in range(1_000)])
        >>> assert abs(tr_A - tr_A_low_precision) > abs(tr_A - tr_A_high_precision)
        >>> round(tr_A, 4), round(tr_A_low_precision, 4), round(tr_A_high_precision, 4)
        (np.float64(4.4575), np.float64(6.6796), np.float64(4.3886))
    """

    def __init__(self, A):
        """Store the operator whose trace is estimated.

        Args:
            A: Square operator: a :class:`~curvlinops.PyTorchLinearOperator`, a
                torch or NumPy matrix, or a SciPy ``LinearOperator``.

        Raises:
            ValueError: If the operator is not square.
        """
        self._A = adapt_square(A)

    def sample(self, distribution: str = "rademacher") -> Tensor | float:
        """Draw one sample of the trace estimator (one matrix-vector product).

        Args:
            distribution: Distribution of the random vector, ``'rademacher'`` or
                ``'normal'``. Default: ``'rademacher'``.

        Returns:
            The sample, a float for NumPy/SciPy operators and a scalar tensor otherwise.
        """
        return hutchinson_trace(self._A, 1, distribution)


__all__ = ["hutchinson_trace", "HutchinsonTraceEstimator"]
