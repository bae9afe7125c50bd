r"""Random test vectors for randomized linear algebra (trace, diagonal, norm, ...).

Randomized estimators probe an operator with vectors :math:`\mathbf{v}` that
satisfy :math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] = \mathbf{I}`. Two
distributions are supported:

- ``'rademacher'``: i.i.d. entries that are :math:`\pm 1` with equal probability,
- ``'normal'``: i.i.d. standard normal entries.
"""

from __future__ import annotations

from operator import index

import numpy
from torch import Generator, Tensor, float32, get_default_dtype, rand, randn, where
from torch import device as torch_device
from torch import dtype as torch_dtype

from curvlinops._checks import is_integer

SUPPORTED_DISTRIBUTIONS = ("rademacher", "normal")


def check_distribution(distribution: str):
    """Verify that a distribution of random vectors is supported.

    Args:
        distribution: Name of the distribution.

    Raises:
        ValueError: If the distribution is not ``'rademacher'`` or ``'normal'``.
    """
    if distribution not in SUPPORTED_DISTRIBUTIONS:
        raise ValueError(
            f"Unknown distribution {distribution!r}. Supported: "
            f"{', '.join(repr(d) for d in SUPPORTED_DISTRIBUTIONS)}."
        )


def rademacher(
    dim: int | tuple[int, ...],
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
    generator: Generator | None = None,
) -> Tensor:
    r"""Draw i.i.d. Rademacher entries: :math:`\pm 1`, each with probability 1/2.

    Args:
        dim: Length of the vector, or the shape of a tensor.
        device: Device of the result. Default: PyTorch's default device.
        dtype: Floating point type of the result. Default: PyTorch's default dtype.
        generator: Random number generator. Default: PyTorch's global generator.

    Returns:
        Vector of shape ``[dim]`` (or a tensor of shape ``dim``).

    Example:
        >>> from torch import manual_seed
        >>> _ = manual_seed(0)
        >>> v = rademacher(1000, "cpu", None)
        >>> bool((v.abs() == 1).all()), abs(v.mean().item()) < 0.1
        (True, True)
    """
    shape = (index(dim),) if is_integer(dim) else tuple(dim)
    uniform = rand(shape, generator=generator, device=device, dtype=float32)
    return where(uniform < 0.5, -1.0, 1.0).to(dtype or get_default_dtype())


def normal(
    dim: int | tuple[int, ...],
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
    generator: Generator | None = None,
) -> Tensor:
    """Draw i.i.d. standard normal entries.

    Args:
        dim: Length of the vector, or the shape of a tensor.
        device: Device of the result. Default: PyTorch's default device.
        dtype: Floating point type of the result. Default: PyTorch's default dtype.
        generator: Random number generator. Default: PyTorch's global generator.

    Returns:
        Vector of shape ``[dim]`` (or a tensor of shape ``dim``).

    Example:
        >>> from torch import float64, manual_seed
        >>> _ = manual_seed(0)
        >>> v = normal(10_000, "cpu", float64)
        >>> v.dtype, abs(v.std().item() - 1) < 0.05
        (torch.float64, True)
    """
    shape = (index(dim),) if is_integer(dim) else tuple(dim)
    return randn(shape, generator=generator, device=device, dtype=dtype)


_DRAW = {"rademacher": rademacher, "normal": normal}


def random_vector(
    dim: int,
    distribution: str,
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
    generator: Generator | None = None,
) -> Tensor:
    r"""Draw a random vector whose entries are i.i.d. with zero mean and unit variance.

    Args:
        dim: Length of the vector.
        distribution: ``'rademacher'`` (entries :math:`\pm 1`, see
            :func:`rademacher`) or ``'normal'`` (see :func:`normal`).
        device: Device of the vector. Default: PyTorch's default device.
        dtype: Floating point type of the vector. Default: PyTorch's default dtype.
        generator: Random number generator. Default: PyTorch's global generator.

    Returns:
        Vector of shape ``[dim]``.

    Example:
        >>> from torch import float64, manual_seed
        >>> _ = manual_seed(0)
        >>> v = random_vector(5, "rademacher", dtype=float64)
        >>> v.shape, v.dtype, bool((v.abs() == 1).all())
        (torch.Size([5]), torch.float64, True)
    """
    return random_tensor((dim,), distribution, device, dtype, generator)


def random_tensor(
    shape: tuple[int, ...],
    distribution: str,
    device: torch_device | str | None = None,
    dtype: torch_dtype | None = None,
    generator: Generator | None = None,
) -> Tensor:
    """Draw a tensor with i.i.d. zero-mean unit-variance entries from PyTorch's RNG.

    Args:
        shape: Shape of the tensor.
        distribution: ``'rademacher'`` or ``'normal'``.
        device: Device of the tensor.
        dtype: Floating point type of the tensor.
        generator: Random number generator. Default: PyTorch's global generator.

    Returns:
        The random tensor.

    Raises:
        TypeError: If ``generator`` is neither ``None`` nor a ``torch.Generator``.
    """
    check_distribution(distribution)
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}."
        )
    return _DRAW[distribution](shape, device, dtype, generator)


def random_array(shape: tuple[int, ...], distribution: str) -> numpy.ndarray:
    r"""Draw a float64 array with i.i.d. zero-mean unit-variance entries.

    Uses NumPy's global random number generator, so that results are reproducible
    with ``numpy.random.seed``. Rademacher entries are :math:`-1` where a uniform
    draw is below :math:`1/2` and :math:`+1` otherwise.

    Args:
        shape: Shape of the array.
        distribution: ``'rademacher'`` or ``'normal'``.

    Returns:
        The random array.
    """
    check_distribution(distribution)
    if distribution == "normal":
        return numpy.random.randn(*shape)
    return numpy.where(numpy.random.rand(*shape) < 0.5, -1.0, 1.0)
