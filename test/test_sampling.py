"""Tests for curvlinops.sampling."""

import numpy
import pytest
from torch import Generator, float16, float32, float64, get_default_dtype

from curvlinops.sampling import (
    normal,
    rademacher,
    random_array,
    random_tensor,
    random_vector,
)

DISTRIBUTIONS = ["rademacher", "normal"]


@pytest.mark.parametrize("dtype", [float16, float32, float64])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_random_vector_has_zero_mean_and_unit_variance(distribution, dtype):
    generator = Generator().manual_seed(0)
    v = random_vector(100_000, distribution, "cpu", dtype, generator)
    assert v.shape == (100_000,) and v.dtype == dtype and v.device.type == "cpu"
    v = v.double()
    assert abs(v.mean()) < 0.01 and abs(v.var() - 1) < 0.02
    if distribution == "rademacher":
        assert set(v.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_random_vector_is_reproducible(distribution):
    first, second = (
        random_vector(10, distribution, generator=Generator().manual_seed(3))
        for _ in range(2)
    )
    assert first.equal(second)
    assert first.dtype == get_default_dtype()


def test_random_tensor_draws_rows_one_after_another():
    """Drawing K vectors at once equals drawing them one by one."""
    generator = Generator().manual_seed(0)
    together = random_tensor((3, 5), "rademacher", generator=generator)
    generator = Generator().manual_seed(0)
    one_by_one = [random_vector(5, "rademacher", generator=generator) for _ in range(3)]
    for row, vector in zip(together, one_by_one):
        assert row.equal(vector)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_random_array_uses_numpys_global_generator(distribution):
    numpy.random.seed(0)
    v = random_array((2, 50_000), distribution)
    numpy.random.seed(0)
    assert numpy.array_equal(v, random_array((2, 50_000), distribution))
    assert v.dtype == numpy.float64
    assert abs(v.mean()) < 0.01 and abs(v.var() - 1) < 0.02
    if distribution == "rademacher":
        numpy.random.seed(0)
        expected = numpy.where(numpy.random.rand(2, 50_000) < 0.5, -1.0, 1.0)
        assert numpy.array_equal(v, expected)


def test_unknown_distribution():
    with pytest.raises(ValueError, match="Unknown distribution 'uniform'"):
        random_vector(3, "uniform")
    with pytest.raises(ValueError, match="Supported: 'rademacher', 'normal'"):
        random_array((3,), "uniform")


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_rademacher_and_normal_are_the_distributions_of_random_vector(distribution):
    """3.x's ``rademacher(dim, device, dtype)`` and ``normal(...)``."""
    draw = {"rademacher": rademacher, "normal": normal}[distribution]
    v = draw(50_000, "cpu", float64, Generator().manual_seed(1))
    assert v.shape == (50_000,) and v.dtype == float64
    assert abs(v.mean()) < 0.02 and abs(v.var() - 1) < 0.03
    if distribution == "rademacher":
        assert set(v.unique().tolist()) == {-1.0, 1.0}
    else:
        assert v.abs().max() > 3  # not bounded like Rademacher entries
    expected = random_vector(
        7, distribution, "cpu", float32, Generator().manual_seed(2)
    )
    assert draw(7, "cpu", float32, Generator().manual_seed(2)).equal(expected)
