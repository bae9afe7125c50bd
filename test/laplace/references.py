r"""Dense references for laplace-torch's posteriors, built from :mod:`torch.func`.

laplace-torch trains against the summed torch losses ``MSELoss(reduction='sum')``
(regression) and ``CrossEntropyLoss(reduction='sum')`` (classification) and turns them
into negative log-likelihoods with its ``factor`` :math:`c` (1/2 and 1): every
curvature :math:`\mathbf{H}` it holds is :math:`c` times a curvature of the torch loss
:math:`\ell`. Here those curvatures are assembled from the model's Jacobian
:math:`\mathbf{J}_n = \partial \mathbf{f}_n / \partial \mathbf{\theta}` and closed
forms in the outputs, independently of curvlinops and of laplace's own backends:

.. math::
    \mathbf{G} = \sum_n \mathbf{J}_n^\top \nabla^2_{\mathbf{f}_n} \ell_n \mathbf{J}_n,
    \qquad
    \mathbf{F}_{\text{emp}} = \sum_n \mathbf{J}_n^\top \nabla_{\mathbf{f}_n} \ell_n
    (\nabla_{\mathbf{f}_n} \ell_n)^\top \mathbf{J}_n,

and the Hessian from :func:`torch.func.hessian`. The Gaussian posterior
:math:`\mathcal{N}(\mathbf{\theta}, \mathbf{P}^{-1})` with
:math:`\mathbf{P} = \mathbf{H} / \sigma^2 + \delta \mathbf{I}` then gives the log
marginal likelihood and the linearized predictive in closed form.
"""

from __future__ import annotations

from math import log, pi, sqrt

from torch import Tensor, block_diag, cat, diag_embed, einsum, eye, kron, softmax
from torch.func import functional_call, hessian, jacrev
from torch.nn import Module
from torch.nn.functional import cross_entropy, one_hot

# laplace-torch's conversion factor from its summed torch loss to a log-likelihood
FACTOR = {"regression": 0.5, "classification": 1.0}


def output_function(model: Module, params: list[Tensor]):
    """Return ``f(theta, x)``: the model's output with ``params`` set to ``theta``."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    shapes = [p.shape for p in params]

    def f(theta: Tensor, x) -> Tensor:
        chunks = theta.split([s.numel() for s in shapes])
        values = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, values, (x,))

    return f


def flat(params: list[Tensor]) -> Tensor:
    """Concatenate parameters into one detached vector."""
    return cat([p.detach().flatten() for p in params])


def jacobian(model: Module, params: list[Tensor], x) -> tuple[Tensor, Tensor]:
    """Model Jacobian ``[N, C, P]`` w.r.t. ``params`` and output ``[N, C]``."""
    f = output_function(model, params)
    theta = flat(params)
    return jacrev(f)(theta, x).detach(), f(theta, x).detach()


def torch_loss(likelihood: str, output: Tensor, y: Tensor) -> Tensor:
    """laplace-torch's summed torch loss."""
    if likelihood == "regression":
        return ((output - y) ** 2).sum()
    return cross_entropy(output, y, reduction="sum")


def loss_gradient(likelihood: str, output: Tensor, y: Tensor) -> Tensor:
    """Per-datum gradient ``[N, C]`` of the torch loss w.r.t. the output."""
    if likelihood == "regression":
        return 2 * (output - y)
    return softmax(output, dim=1) - one_hot(y, output.shape[1]).to(output.dtype)


def loss_hessian(likelihood: str, output: Tensor) -> Tensor:
    """Per-datum Hessian ``[N, C, C]`` of the torch loss w.r.t. the output."""
    N, C = output.shape
    if likelihood == "regression":
        return 2 * eye(C, dtype=output.dtype).expand(N, C, C)
    p = softmax(output, dim=1)
    return diag_embed(p) - einsum("nc,nk->nck", p, p)


def curvature(kind: str, likelihood: str, model, params, x, y) -> Tensor:
    """Dense ``H`` of laplace: its factor times the torch loss's GGN, EF or Hessian."""
    if kind == "hessian":
        f = output_function(model, params)
        H = hessian(lambda t: torch_loss(likelihood, f(t, x), y))(flat(params))
    else:
        J, output = jacobian(model, params, x)
        if kind == "ggn":
            H = einsum("ncp,nck,nkq->pq", J, loss_hessian(likelihood, output), J)
        else:
            g = einsum("ncp,nc->np", J, loss_gradient(likelihood, output, y))
            H = einsum("np,nq->pq", g, g)
    return FACTOR[likelihood] * H.detach()


def kron_factors(kind: str, likelihood: str, model: Module, layers, x, y) -> list:
    r"""Kronecker factors of the ``Linear`` ``layers`` as laplace holds them.

    For a layer with inputs :math:`\mathbf{a}_n` and output Jacobians
    :math:`\mathbf{G}_n = \partial \mathbf{f}_n / \partial \mathbf{s}_n`, KFAC on a
    summed loss over :math:`N` data is
    :math:`\mathbf{B} \otimes \mathbf{A}` with
    :math:`\mathbf{A} = \frac{1}{N} \sum_n \mathbf{a}_n \mathbf{a}_n^\top` and
    :math:`\mathbf{B} = \sum_n \mathbf{G}_n^\top \mathbf{\Lambda}_n \mathbf{G}_n`
    (:math:`\mathbf{\Lambda}_n` the torch loss's Hessian w.r.t. the output, or the
    outer product of its gradient for the EF). laplace lists weight ``[B, A]``,
    then bias ``[B]`` per layer, multiplies both weight factors by :math:`\sqrt{c}`
    and the bias factor by :math:`c`.
    """
    inputs = {}

    def record_input(module, args, _):
        inputs[module] = args[0].detach()

    hooks = [m.register_forward_hook(record_input) for m in layers]
    output = model(x).detach()
    for hook in hooks:
        hook.remove()
    c, factors = FACTOR[likelihood], []
    for layer in layers:
        G, _ = jacobian(model, [layer.bias], x)
        if kind == "ggn":
            B = einsum("nco,nck,nkp->op", G, loss_hessian(likelihood, output), G)
        else:
            g = einsum("nco,nc->no", G, loss_gradient(likelihood, output, y))
            B = einsum("no,np->op", g, g)
        B = B.contiguous()  # torch.kron needs it
        A = einsum("ni,nj->ij", inputs[layer], inputs[layer]) / len(output)
        factors += [[sqrt(c) * B, sqrt(c) * A], [c * B]]
    return factors


def kron_to_dense(factors: list) -> Tensor:
    """Block-diagonal matrix of the blocks ``[B, A]`` (Kronecker) and ``[B]``."""
    return block_diag(*[kron(*F) if len(F) == 2 else F[0] for F in factors])


def log_marginal_likelihood(likelihood, output, y, H, theta, prior, sigma) -> Tensor:
    r"""Laplace's evidence for a zero prior mean and prior precision :math:`\delta`.

    .. math::
        \log p(\mathcal{D} \mid \mathbf{\theta})
        - \frac{1}{2} \left(\log\det \mathbf{P} - \log\det \delta\mathbf{I}
        + \delta \|\mathbf{\theta}\|^2\right)
    """
    nll = FACTOR[likelihood] * torch_loss(likelihood, output, y) / sigma**2
    if likelihood == "regression":
        nll = nll + output.numel() * log(sigma * sqrt(2 * pi))
    P = posterior_precision(H, prior, sigma)
    log_det_ratio = P.logdet() - len(theta) * log(prior)
    return -nll - 0.5 * (log_det_ratio + prior * theta @ theta)


def posterior_precision(H: Tensor, prior: float, sigma: float) -> Tensor:
    """``H / sigma**2 + prior * I``."""
    return H / sigma**2 + prior * eye(len(H), dtype=H.dtype)


def glm_predictive(likelihood: str, J: Tensor, output: Tensor, P: Tensor):
    """Linearized predictive: ``(mean, covariance)``, or probit class probabilities."""
    f_var = einsum("ncp,pq,nkq->nck", J, P.inverse(), J)
    if likelihood == "regression":
        return output, f_var
    kappa = 1 / (1 + pi / 8 * f_var.diagonal(dim1=1, dim2=2)).sqrt()
    return softmax(kappa * output, dim=1)
