"""One adapter that lets algorithms accept any operator and answer in its world.

The algorithms of the library (inverses, sub-matrices, trace, diagonal, norm and
spectrum estimation) accept

- a :class:`~curvlinops.PyTorchLinearOperator` or a torch matrix (*torch world*:
  results are tensors, random numbers come from PyTorch's generator), and
- a NumPy matrix, a SciPy sparse matrix, or a SciPy ``LinearOperator`` (*NumPy
  world*: results are NumPy arrays or Python floats, random numbers come from
  NumPy's global generator, so ``numpy.random.seed`` makes them reproducible).

:func:`adapt` turns each of them into a :class:`AdaptedOperator` that computes in
PyTorch and knows how to draw random test vectors and return results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator, aslinearoperator
from torch import Generator, Tensor, as_tensor, float64, from_numpy
from torch import device as torch_device
from torch import dtype as torch_dtype

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.examples import TensorLinearOperator
from curvlinops.sampling import random_array, random_tensor
from curvlinops.utils import assert_is_square


class _SciPyLinearOperator(PyTorchLinearOperator):
    """A SciPy ``LinearOperator`` seen as a PyTorch operator (products on the CPU).

    The adjoint uses the SciPy operator's ``rmatmat``.
    """

    def __init__(
        self,
        A: LinearOperator,
        device: torch_device | str | None = None,
        dtype: torch_dtype | None = None,
    ):
        """Store the SciPy operator and the device and dtype of results.

        Args:
            A: The SciPy linear operator.
            device: Device of the tensors the operator accepts and returns.
                Default: CPU.
            dtype: Dtype of the tensors the operator accepts and returns. Default:
                the SciPy operator's dtype if it is floating point, else float64.
        """
        self._scipy = A
        device = torch_device("cpu" if device is None else device)
        if dtype is None:
            np_dtype = numpy.dtype(A.dtype) if A.dtype is not None else None
            is_float = np_dtype is not None and np_dtype.kind == "f"
            dtype = from_numpy(numpy.zeros(0, np_dtype)).dtype if is_float else float64
        super().__init__([(A.shape[1],)], [(A.shape[0],)], device, dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Multiply with SciPy on the CPU and move the result back.

        Args:
            M: One tensor ``[N, K]``.

        Returns:
            One tensor ``[M, K]``.
        """
        AM = self._scipy.matmat(M[0].detach().cpu().numpy())
        return [as_tensor(numpy.asarray(AM)).to(self.device, self.dtype)]

    def _adjoint(self) -> _SciPyLinearOperator:
        """Return the adjoint, which multiplies with SciPy's ``rmatmat``.

        Returns:
            The adjoint operator.
        """
        return _SciPyLinearOperator(self._scipy.adjoint(), self.device, self.dtype)


@dataclass(frozen=True)
class AdaptedOperator:
    """An operator in PyTorch plus the world (torch or NumPy) of its caller.

    Attributes:
        operator: The operator as :class:`~curvlinops.PyTorchLinearOperator`.
        numpy_world: Whether the caller passed a NumPy or SciPy object; then results
            are returned as NumPy arrays or Python floats, and random numbers come
            from NumPy's global generator.
    """

    operator: PyTorchLinearOperator
    numpy_world: bool

    @property
    def shape(self) -> tuple[int, int]:
        """Return the operator's shape.

        Returns:
            ``(rows, columns)``.
        """
        return self.operator.shape

    def random_columns(
        self,
        num_columns: int,
        distribution: str,
        generator: Generator | None = None,
        dim: int | None = None,
    ) -> Tensor:
        """Draw a matrix of random columns on the operator's device and dtype.

        Columns are drawn one after another, so ``K`` columns at once equal ``K``
        consecutive single columns from the same random state.

        Args:
            num_columns: Number of columns ``K``.
            distribution: ``'rademacher'`` or ``'normal'``.
            generator: PyTorch generator. If given, it is used in both worlds.
                Default: NumPy's global generator in the NumPy world, PyTorch's
                global generator in the torch world.
            dim: Length of the columns. Default: number of columns of the operator.

        Returns:
            Matrix of shape ``[dim, K]``.
        """
        dim = self.shape[1] if dim is None else dim
        device, dtype = self.operator.device, self.operator.dtype
        if self.numpy_world and generator is None:
            rows = as_tensor(random_array((num_columns, dim), distribution))
            return rows.T.to(device, dtype)
        rows = random_tensor((num_columns, dim), distribution, device, dtype, generator)
        return rows.T

    def to_caller(self, x: Tensor) -> Tensor | numpy.ndarray:
        """Return a tensor in the caller's world.

        Args:
            x: A tensor.

        Returns:
            ``x`` as NumPy array in the NumPy world, else ``x`` itself.
        """
        return x.detach().cpu().numpy() if self.numpy_world else x

    def scalar_to_caller(self, x: Tensor) -> Tensor | float:
        """Return a scalar tensor in the caller's world.

        Args:
            x: A tensor with one element.

        Returns:
            A Python float in the NumPy world, else ``x`` itself.
        """
        return x.item() if self.numpy_world else x


def adapt(
    A,
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
) -> AdaptedOperator:
    """Turn any supported operator into an :class:`AdaptedOperator`.

    Args:
        A: A :class:`~curvlinops.PyTorchLinearOperator`, a torch matrix, a NumPy
            matrix, a SciPy sparse matrix or ``LinearOperator``, or an
            :class:`AdaptedOperator` (returned as is).
        device: Device to move a matrix or SciPy operator to. Default: the matrix's
            device (CPU for NumPy and SciPy). Ignored for PyTorch operators.
        dtype: Dtype to cast a matrix or SciPy operator to. Default: the matrix's
            floating point dtype, float64 for other dtypes. Ignored for PyTorch
            operators.

    Returns:
        The adapted operator.

    Raises:
        TypeError: If ``A`` has an unsupported type.
        ValueError: If a matrix is not two-dimensional.
    """
    if isinstance(A, AdaptedOperator):
        return A
    if isinstance(A, PyTorchLinearOperator):
        return AdaptedOperator(A, numpy_world=False)
    if isinstance(A, (Tensor, numpy.ndarray)):
        numpy_world = isinstance(A, numpy.ndarray)
        if A.ndim != 2:
            raise ValueError(f"Expected a matrix, got an array of shape {A.shape}.")
        A = as_tensor(A)
        if dtype is None and not A.is_floating_point():
            dtype = float64
        return AdaptedOperator(TensorLinearOperator(A.to(device, dtype)), numpy_world)
    if issparse(A) or isinstance(A, LinearOperator):
        operator = _SciPyLinearOperator(aslinearoperator(A), device, dtype)
        return AdaptedOperator(operator, numpy_world=True)
    raise TypeError(
        "Expected a PyTorchLinearOperator, torch.Tensor, numpy.ndarray, SciPy sparse "
        f"matrix or scipy.sparse.linalg.LinearOperator, got {type(A).__name__}."
    )


def adapt_square(
    A,
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
) -> AdaptedOperator:
    """Adapt an operator (see :func:`adapt`) and verify that it is square.

    Args:
        A: Any supported operator.
        device: See :func:`adapt`.
        dtype: See :func:`adapt`.

    Returns:
        The adapted operator.
    """
    A = adapt(A, device, dtype)
    assert_is_square(A)
    return A
