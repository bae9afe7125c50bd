"""Tests for curvlinops.vivit._gram and ._factors on random factors (no BackPACK)."""

import pytest
from torch import Generator, cat, einsum, eye, float64, randn, tensor
from torch.linalg import eigvalsh

from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor
from curvlinops.vivit._gram import (
    directional_curvatures,
    directional_gradients,
    gram_eigh,
    gram_eigvalsh,
    gram_to_ggn_eigenvectors,
    to_parameter_space,
    warn_if_small,
)
from test.utils import assert_close
from test.vivit.utils import flatten_vectors as flat

V, N = 3, 4  # columns per sample, samples
SHAPES = [(2, 5), (5,), (3, 1, 2)]
ALL_SHAPES = [*SHAPES, (3, 2)]  # with the Linear weight


@pytest.fixture(params=[0, 1], ids=["seed0", "seed1"])
def factors(request):
    """Dense factors of three parameters and the structured one of a weight."""
    generator = Generator().manual_seed(request.param)
    dense = [randn(V, N, *s, generator=generator, dtype=float64) for s in SHAPES]
    output_factor = randn(V, N, 3, generator=generator, dtype=float64)
    inputs = randn(N, 2, generator=generator, dtype=float64)
    return [DenseFactor(d) for d in dense] + [LinearWeightFactor(output_factor, inputs)]


def as_matrix(factors):
    """The factor V as [D, V * N] matrix."""
    rows = [f.to_tensor().flatten(end_dim=1) for f in factors]
    return cat([r.flatten(start_dim=1) for r in rows], 1).T


def test_eigenpairs_from_gram_matrix(factors):
    Vmat = as_matrix(factors)
    G = Vmat @ Vmat.T  # D = 25 > V * N = 12: rank 12
    evals = gram_eigvalsh(factors)
    assert_close(evals, eigvalsh(G)[-V * N :])

    top, gram_evecs = gram_eigh(factors, lambda ev: [ev.numel() - 2, ev.numel() - 1])
    E = flat(gram_to_ggn_eigenvectors(factors, top, gram_evecs))
    assert_close(G @ E, E * top)
    assert_close(E.T @ E, eye(2, dtype=float64))


def test_directional_derivatives_from_gram_matrix(factors):
    Vmat = as_matrix(factors)
    evals, gram_evecs = gram_eigh(factors, lambda ev: list(range(ev.numel())))
    E = flat(gram_to_ggn_eigenvectors(factors, evals, gram_evecs))

    # G = (1/N) Σₙ Gₙ with Gₙ = N Vₙ Vₙᵀ
    per_sample = Vmat.reshape(-1, V, N)
    G_n = N * einsum("dcn,ecn->nde", per_sample, per_sample)
    lambdas = directional_curvatures(evals, gram_evecs, V)
    assert_close(lambdas, einsum("dk,nde,ek->nk", E, G_n, E))

    generator = Generator().manual_seed(2)
    grads = [randn(6, *s, generator=generator, dtype=float64) for s in ALL_SHAPES]
    gammas = directional_gradients(factors, grads, evals, gram_evecs)
    assert_close(gammas, flat(grads).T @ E)


def test_to_parameter_space(factors):
    C = randn(V * N, 2, generator=Generator().manual_seed(3), dtype=float64)
    result = to_parameter_space(factors, C)
    assert [tuple(r.shape[1:]) for r in result] == ALL_SHAPES
    assert_close(flat(result), as_matrix(factors) @ C)


def test_warn_if_small():
    with pytest.warns(UserWarning, match="2 eigenvalue"):
        warn_if_small(tensor([1e-5, 1.0, -1e-6]), 1e-4, "something")
