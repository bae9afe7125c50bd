"""Helpers to test algorithms that accept any operator: the four operator kinds.

An algorithm of curvlinops accepts a ``PyTorchLinearOperator``, a torch matrix, a
NumPy matrix, or a SciPy ``LinearOperator``. :func:`make_operator` builds each kind
from a dense float64 matrix, :class:`CountingOperator` records how many columns an
algorithm multiplies (to verify matrix-free use), and :func:`run_doctest` runs a
docstring example verbatim.
"""

from __future__ import annotations

import doctest
from collections.abc import Callable
from contextlib import contextmanager
from math import sqrt

import numpy
from scipy.sparse.linalg import aslinearoperator
from torch import (
    Generator,
    Tensor,
    arange,
    as_tensor,
    cat,
    float64,
    get_num_threads,
    manual_seed,
    randn,
    set_num_threads,
    stack,
)
from torch.linalg import qr

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.sampling import random_array, random_tensor

OPERATOR_KINDS = ("operator", "torch", "numpy", "scipy")
NUMPY_KINDS = ("numpy", "scipy")


class BlockFormatMatrix(PyTorchLinearOperator):
    """A dense matrix whose domain and range are split into two tensors each."""

    def __init__(self, A: Tensor):
        self.tensor = A
        super().__init__(_two_blocks(A.shape[1]), _two_blocks(A.shape[0]))

    device = property(lambda self: self.tensor.device)
    dtype = property(lambda self: self.tensor.dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        num_cols = M[0].shape[-1]
        flat = self.tensor @ cat([m.reshape(-1, num_cols) for m in M])
        rows = flat.split([s.numel() for s in self._out_shape])
        return [r.reshape(*s, num_cols) for r, s in zip(rows, self._out_shape)]

    def _adjoint(self) -> BlockFormatMatrix:
        return BlockFormatMatrix(self.tensor.T)


def _two_blocks(dim: int) -> list[tuple[int, ...]]:
    """Split a dimension into a matrix-shaped block and a vector block."""
    if dim < 4:
        return [(dim,)]
    return [(2, (dim - 1) // 2), (dim - 2 * ((dim - 1) // 2),)]


def make_operator(A: Tensor, kind: str):
    """Build an operator of the given kind from a dense matrix."""
    if kind == "operator":
        return BlockFormatMatrix(A)
    if kind == "torch":
        return A
    if kind == "numpy":
        return A.numpy()
    if kind == "scipy":
        return aslinearoperator(A.numpy())
    raise ValueError(f"Unknown kind {kind!r}.")


def to_tensor(x) -> Tensor:
    """Convert a result (tensor, array, or float) into a float64 tensor."""
    return as_tensor(numpy.asarray(x)) if not isinstance(x, Tensor) else x


def assert_world(result, kind: str, scalar: bool = False):
    """Assert that a result lives in the caller's world (torch in, torch out)."""
    if kind in NUMPY_KINDS:
        expected = float if scalar else numpy.ndarray
    else:
        expected = Tensor
    assert isinstance(result, expected), f"{kind}: got {type(result).__name__}"


class CountingOperator(PyTorchLinearOperator):
    """Wrap an operator and count the columns it (or its adjoint) multiplies."""

    def __init__(self, operator: PyTorchLinearOperator, counter=None):
        self.operator, self._counter = operator, counter or self
        self.num_columns = 0
        self.SELF_ADJOINT = operator.SELF_ADJOINT
        super().__init__(operator._in_shape, operator._out_shape)

    device = property(lambda self: self.operator.device)
    dtype = property(lambda self: self.operator.dtype)

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        self._counter.num_columns += M[0].shape[-1]
        return self.operator._matmat(M)

    def _adjoint(self) -> CountingOperator:
        return CountingOperator(self.operator.adjoint(), self._counter)


def run_doctest(source: str, globs: dict, legacy_numpy_print: bool = True):
    """Run a docstring example verbatim and assert that it passes.

    Args:
        source: The example, with ``>>>`` prompts and expected output.
        globs: Names the example may use.
        legacy_numpy_print: Print NumPy scalars as NumPy 1 did (``4.4575`` rather
            than ``np.float64(4.4575)``), as examples written for NumPy 1 expect.
    """
    test = doctest.DocTestParser().get_doctest(source, dict(globs), "example", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    legacy = "1.25" if legacy_numpy_print else False
    with numpy.printoptions(legacy=legacy):
        result = runner.run(test)
    assert result.failed == 0, f"{result.failed} of {result.attempted} lines failed"


def seed_everything(seed: int):
    """Seed NumPy's and PyTorch's global random number generators."""
    numpy.random.seed(seed)
    manual_seed(seed)


def seeded_call(kind: str, seed: int, func: Callable, *args, **kwargs):
    """Call a randomized algorithm with its random state fixed by a seed.

    NumPy and SciPy operators draw from NumPy's global generator, which is seeded;
    torch operators receive a seeded ``generator``.
    """
    if kind in NUMPY_KINDS:
        numpy.random.seed(seed)
        return func(*args, **kwargs)
    return func(*args, generator=Generator().manual_seed(seed), **kwargs)


def decaying_matrix(dim: int, decay: float, seed: int = 0) -> Tensor:
    """Symmetric PSD matrix with eigenvalues ``decay**k`` in a random basis."""
    Q, _ = qr(randn(dim, dim, dtype=float64, generator=Generator().manual_seed(seed)))
    return Q @ (decay ** arange(dim, dtype=float64)).diag() @ Q.T


@contextmanager
def single_threaded():
    """Run PyTorch on one thread: faster for many tiny decompositions (QR, SVD)."""
    num_threads = get_num_threads()
    set_num_threads(1)
    try:
        yield
    finally:
        set_num_threads(num_threads)


def assert_unbiased(draw: Callable[[Generator], object], truth, num_samples: int):
    """Assert the mean of independent estimates is within 4 standard errors."""
    generator = Generator().manual_seed(0)
    with single_threaded():
        samples = stack([to_tensor(draw(generator)) for _ in range(num_samples)])
    mean, std = samples.mean(0), samples.std(0)
    error = (mean - to_tensor(truth)).abs()
    assert (error <= 4 * std / sqrt(num_samples) + 1e-10).all(), (error, std)


def rms_error(
    estimate: Callable[[Generator], object], truth, num_seeds: int = 30
) -> float:
    """Root mean squared (Euclidean) error of an estimator over seeds."""
    with single_threaded():
        errors = [
            (to_tensor(estimate(Generator().manual_seed(seed))) - truth).norm() ** 2
            for seed in range(num_seeds)
        ]
    return sqrt(sum(errors) / num_seeds)


class ColumnDrawer:
    """Draw the random columns an algorithm draws after :func:`seeded_call`.

    With ``global_torch_rng``, replicate the draws of the estimator classes (which
    use PyTorch's global generator) after ``manual_seed(seed)``.
    """

    def __init__(self, kind: str, seed: int, global_torch_rng: bool = False):
        """Seed NumPy's global generator, PyTorch's global one, or a fresh one."""
        self.numpy_world = kind in NUMPY_KINDS
        if self.numpy_world:
            numpy.random.seed(seed)
        elif global_torch_rng:
            manual_seed(seed)
            self.generator = None
        else:
            self.generator = Generator().manual_seed(seed)

    def draw(self, num_columns: int, dim: int, distribution: str) -> Tensor:
        """Draw ``[dim, num_columns]`` float64 columns, one after another."""
        if self.numpy_world:
            return as_tensor(random_array((num_columns, dim), distribution).T)
        shape = (num_columns, dim)
        return random_tensor(shape, distribution, None, float64, self.generator).T
