"""Hutchinson-style stochastic diagonal estimation (Martens et al., 2012)."""

from __future__ import annotations

from numpy import ndarray
from torch import Generator, Tensor

from curvlinops._adapter import adapt_square
from curvlinops._checks import check_num_matvecs


def hutchinson_diag(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Generator | None = None,
) -> Tensor | ndarray:
    r"""Estimate the diagonal of a square operator with Hutchinson's method.

    Draws :math:`K` = ``num_matvecs`` random vectors :math:`\mathbf{v}_k` with
    :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] = \mathbf{I}` and averages

    .. math::
        \mathrm{diag}(\mathbf{A})
        \approx \frac{1}{K} \sum_{k=1}^K \mathbf{v}_k \odot \mathbf{A} \mathbf{v}_k\,,

    which is unbiased because :math:`\mathbb{E}[v_i [\mathbf{A}\mathbf{v}]_i] =
    \sum_j A_{ij} \mathbb{E}[v_i v_j] = A_{ii}`. Rademacher vectors give the lowest
    variance, :math:`\frac{1}{K} \sum_{j \neq i} A_{ij}^2` for entry :math:`i`. See

    - Bekas, C., Kokiopoulou, E., & Saad, Y. (2007). An estimator for the diagonal
      of a matrix. Applied Numerical Mathematics.
    - Martens, J., Sutskever, I., & Swersky, K. (2012). Estimating the Hessian by
      back-propagating curvature. International Conference on Machine Learning
      (ICML).

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
        The diagonal estimate of shape ``[N]``, a tensor for torch inputs and a
        NumPy array otherwise.

    Example:
        >>> from torch import float64, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> A = rand(20, 20, dtype=float64)
        >>> rough, fine = hutchinson_diag(A, 10), hutchinson_diag(A, 10_000)
        >>> bool((fine - A.diag()).norm() < (rough - A.diag()).norm())
        True
    """
    A = adapt_square(A)
    check_num_matvecs(num_matvecs)
    V = A.random_columns(num_matvecs, distribution, generator)
    return A.to_caller((V * (A.operator @ V)).mean(dim=1))


class HutchinsonDiagonalEstimator:
    r"""Draw single-sample estimates of an operator's diagonal with Hutchinson's method.

    Each call of :meth:`sample` multiplies the operator onto one random vector
    :math:`\mathbf{v}` with :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] =
    \mathbf{I}` and returns :math:`\mathbf{a} = \mathbf{v} \odot \mathbf{A}
    \mathbf{v}`, an unbiased estimate of :math:`\mathrm{diag}(\mathbf{A})`:

    .. math::
        \mathbb{E}[a_i]
        = \sum_j A_{ij} \mathbb{E}[v_i v_j]
        = \sum_j A_{ij} \delta_{ij}
        = A_{ii}\,.

    Average several samples to reduce the variance; :func:`hutchinson_diag` does so
    with one batched product. Reference:

    - Martens, J., Sutskever, I., & Swersky, K. (2012). Estimating the Hessian by
      back-propagating curvature. International Conference on Machine Learning
      (ICML).

    Example:
        With a NumPy matrix, the vectors come from NumPy's global generator (the
        printout is that of NumPy 2):

        >>> from numpy import diag, mean, round
        >>> from numpy.random import rand, seed
        >>> from numpy.linalg import norm
        >>> seed(0)  # fix NumPy's global random state
        >>> A = rand(10, 10)
        >>> diag_A = diag(A)  # ground truth
        >>> estimator = HutchinsonDiagonalEstimator(A)
        >>> # one sample versus the average of many samples
        >>> diag_A_low_precision = estimator.sample()
        >>> samples = [estimator.sample() for _ in range(1_000)]
        >>> diag_A_high_precision = mean(samples, axis=0)
        >>> # distances to the ground truth
        >>> error_low_precision = norm(diag_A - diag_A_low_precision)
        >>> error_high_precision = norm(diag_A - diag_A_high_precision)
        >>> assert error_low_precision > error_high_precision
        >>> round(error_low_precision, 4), round(error_high_precision, 4)
        (np.float64(5.7268), np.float64(0.1525))
    """

    def __init__(self, A):
        """Store the operator whose diagonal is estimated.

        Args:
            A: Square operator: a :class:`~curvlinops.PyTorchLinearOperator`, a
                torch or NumPy matrix, or a SciPy ``LinearOperator``.

        Raises:
            ValueError: If the operator is not square.
        """
        self._A = adapt_square(A)

    def sample(self, distribution: str = "rademacher") -> Tensor | ndarray:
        """Draw one sample of the diagonal estimator (one matrix-vector product).

        Args:
            distribution: Distribution of the random vector, ``'rademacher'`` or
                ``'normal'``. Default: ``'rademacher'``.

        Returns:
            The sample of shape ``[N]``, a NumPy array for NumPy/SciPy operators and
            a tensor otherwise.
        """
        return hutchinson_diag(self._A, 1, distribution)


__all__ = ["hutchinson_diag", "HutchinsonDiagonalEstimator"]
