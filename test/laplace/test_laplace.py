"""laplace-torch 0.3 as a client: its Laplace approximations on our curvlinops.

laplace-torch's curvlinops backends (``CurvlinopsGGN``, ``CurvlinopsEF``,
``CurvlinopsHessian``) call our operators: the dense ones multiplied by an identity
matrix, KFAC for its Kronecker factors, with summed losses and, for dict inputs,
``batch_size_fn``. Each test fits ``laplace.Laplace`` over two uneven mini-batches and
checks what laplace computes from them (curvature, Kronecker factors, posterior
precision, log marginal likelihood, predictive) against the closed forms of
``references``. Skipped when laplace-torch is not installed (``make install`` installs
it).
"""

from contextlib import contextmanager

import pytest
from torch import (
    LongTensor,
    float32,
    float64,
    get_default_dtype,
    manual_seed,
    rand,
    randint,
    randn,
    set_default_dtype,
)
from torch.nn import Linear, Module, Sequential, Tanh
from torch.utils.data import DataLoader, TensorDataset

from test.laplace.references import (
    curvature,
    flat,
    glm_predictive,
    jacobian,
    kron_factors,
    kron_to_dense,
    log_marginal_likelihood,
    posterior_precision,
)
from test.utils import assert_close

laplace = pytest.importorskip("laplace")
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian  # noqa: E402

BACKENDS = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF, "hessian": CurvlinopsHessian}
LIKELIHOODS = ["classification", "regression"]
PRIOR = 4.0  # prior precision (the Hessian's posterior precision stays positive)
SIGMA = {"classification": 1.0, "regression": 0.7}  # observation noise


@contextmanager
def default_dtype(dtype):
    previous = get_default_dtype()
    set_default_dtype(dtype)
    try:
        yield
    finally:
        set_default_dtype(previous)


@pytest.fixture(autouse=True)
def float64_by_default():
    """Float64 default: laplace builds ``torch.eye(D)`` with it (see the last test)."""
    with default_dtype(float64):
        yield


def mlp() -> Sequential:
    return Sequential(Linear(3, 4), Tanh(), Linear(4, 2))


def mlp_of(model: Module) -> Sequential:
    return model.net if isinstance(model, DictMLP) else model


class DictMLP(Module):
    """An MLP on laplace's default dict keys (``input_ids``; ``labels`` unused)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, batch: dict):
        return self.net(batch["input_ids"])


def problem(likelihood: str, inputs: str = "tensor"):
    """Seeded model, loader (batches of 4 and 2), all data and test inputs.

    Regression targets lie near the model's outputs, so that the Hessian's posterior
    precision is positive definite.
    """
    manual_seed(0)
    model = (DictMLP() if inputs == "dict" else mlp()).to(float64)
    X, X_test = rand(6, 3, dtype=float64), rand(3, 3, dtype=float64)
    if likelihood == "classification":
        y = randint(0, 2, (6,))
    else:
        y = mlp_of(model)(X).detach() + 0.3 * randn(6, 2, dtype=float64)
    if inputs == "dict":
        items = [{"input_ids": x, "labels": t} for x, t in zip(X, y)]
        X, X_test = {"input_ids": X}, {"input_ids": X_test}
        return model, DataLoader(items, batch_size=4), X, y, X_test
    return model, DataLoader(TensorDataset(X, y), batch_size=4), X, y, X_test


def fit(model, likelihood, loader, subset, structure, backend, subnet=None):
    kwargs = {} if subnet is None else {"subnetwork_indices": subnet}
    la = laplace.Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        sigma_noise=SIGMA[likelihood],
        prior_precision=PRIOR,
        **kwargs,
    )
    la.fit(loader)
    return la


def check_posterior(la, likelihood, H, model, params, x, y, x_test, subnet=None):
    """Posterior precision, log evidence and GLM predictive of ``la`` against ``H``."""
    sigma, P = SIGMA[likelihood], posterior_precision(H, PRIOR, SIGMA[likelihood])
    P_la = la.posterior_precision
    assert_close(P_la.to_matrix() if hasattr(P_la, "to_matrix") else P_la, P)
    theta, output = flat(params), model(x).detach()
    theta = theta if subnet is None else theta[subnet]
    expected = log_marginal_likelihood(likelihood, output, y, H, theta, PRIOR, sigma)
    assert_close(la.log_marginal_likelihood(), expected)
    J, output = jacobian(model, params, x_test)
    J = J if subnet is None else J[:, :, subnet]
    assert_close(la(x_test), glm_predictive(likelihood, J, output, P))
    if likelihood == "regression":
        _, f_var = glm_predictive(likelihood, J, output, P)
        marginals = la(x_test, diagonal_output=True)[1]
        assert_close(marginals, f_var.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("inputs", ["tensor", "dict"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("kind", BACKENDS)
def test_full(kind, likelihood, inputs):
    """All weights, dense GGN, EF or Hessian from our operators."""
    model, loader, x, y, x_test = problem(likelihood, inputs)
    la = fit(model, likelihood, loader, "all", "full", BACKENDS[kind])
    params = list(model.parameters())
    H = curvature(kind, likelihood, model, params, x, y)
    assert_close(la.H, H)
    check_posterior(la, likelihood, la.H, model, params, x, y, x_test)


@pytest.mark.parametrize("inputs", ["tensor", "dict"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_kron(kind, likelihood, inputs):
    """All weights, KFAC factors read from our operator, rescaled per batch."""
    model, loader, x, y, x_test = problem(likelihood, inputs)
    la = fit(model, likelihood, loader, "all", "kron", BACKENDS[kind])
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    factors = kron_factors(kind, likelihood, model, layers, x, y)
    assert_close(la.H_facs.kfacs, factors)
    H = kron_to_dense(factors)
    check_posterior(la, likelihood, H, model, list(model.parameters()), x, y, x_test)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kron_monte_carlo(likelihood):
    """Stochastic GGN (MC Fisher): laplace forwards ``mc_samples`` to our KFAC.

    Input factors are exact; the sampled gradient factors approach the GGN's.
    """
    model, loader, x, y, _ = problem(likelihood)
    la = laplace.Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": True},
        asdl_fisher_kwargs={"mc_samples": 2000},
    )
    la.fit(loader)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    factors = kron_factors("ggn", likelihood, model, layers, x, y)
    for sampled, exact in zip(la.H_facs.kfacs, factors):
        assert_close(sampled[1:], exact[1:])  # input factor
        error = (sampled[0] - exact[0]).norm() / exact[0].norm()
        assert error < 0.1, f"relative error {error:.3f} of the gradient factor"


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(
    "structure,kind",
    [("full", "ggn"), ("full", "ef"), ("full", "hessian"), ("kron", "ggn")]
    + [("kron", "ef")],
)
def test_last_layer(structure, kind, likelihood):
    """Last-layer weights: our operators on laplace's feature extractor."""
    model, loader, x, y, x_test = problem(likelihood)
    la = fit(model, likelihood, loader, "last_layer", structure, BACKENDS[kind])
    params = list(model[-1].parameters())
    if structure == "full":
        H = curvature(kind, likelihood, model, params, x, y)
        assert_close(la.H, H)
    else:
        factors = kron_factors(kind, likelihood, model, [model[-1]], x, y)
        assert_close(la.H_facs.kfacs, factors)
        H = kron_to_dense(factors)
    check_posterior(la, likelihood, H, model, params, x, y, x_test)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_subnetwork(kind, likelihood):
    """A subnetwork of weights and biases from both layers."""
    model, loader, x, y, x_test = problem(likelihood)
    subnet = LongTensor([0, 5, 13, 17, 20, 25])
    la = fit(model, likelihood, loader, "subnetwork", "full", BACKENDS[kind], subnet)
    params = list(model.parameters())
    H = curvature(kind, likelihood, model, params, x, y)[subnet][:, subnet]
    assert_close(la.H, H)
    check_posterior(la, likelihood, H, model, params, x, y, x_test, subnet=subnet)


def test_full_on_float64_model_with_float32_default_dtype():
    """A float32 identity for a float64 model: our operators cast it up.

    laplace materializes ``linop @ torch.eye(D)`` with the default dtype and casts
    the product to the model's dtype afterwards, so a float64 model under torch's
    float32 default hands our operators a float32 identity. It converts to float64
    without loss, so the operators accept it and answer in float64.
    """
    model, loader, x, y, _ = problem("regression")
    with default_dtype(float32):
        la = fit(model, "regression", loader, "all", "full", CurvlinopsGGN)
    assert_close(
        la.H, curvature("ggn", "regression", model, list(model.parameters()), x, y)
    )
