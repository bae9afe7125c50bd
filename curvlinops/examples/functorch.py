r"""Dense reference matrices computed with :mod:`torch.func`, to verify operators.

Each function materializes a curvature matrix of the empirical risk

.. math::
    \mathcal{L}(\mathbf{\theta})
    = \sum_{\mathcal{B}} w_{\mathcal{B}}\, \ell_{\mathcal{B}}(\mathbf{\theta}),
    \qquad w_{\mathcal{B}} = \begin{cases} |\mathcal{B}| / N & \text{mean}\\
    1 & \text{sum}\end{cases}

over the mini-batches :math:`\mathcal{B}` of ``data`` as a dense ``[D, D]`` tensor,
with :math:`D` the total number of parameters (:func:`functorch_jacobian` gives the
model's ``[NC, D]`` Jacobian instead). They cost :math:`\mathcal{O}(D^2)`
memory, so they are meant for small models (tests, tutorials), not for production.
:func:`functorch_hessian` differentiates twice with plain autograd instead, since
:mod:`torch.func`'s second derivatives through normalization layers are wrong in
PyTorch 2.13 (see there).
Inputs ``X`` may be dict-like; then ``input_key`` names the entry whose leading axis
is the batch axis. ``params`` may be a dictionary ``{name: tensor}`` with a
functional ``model_func(params, X)``, as for the operators; the matrices then
follow the dictionary's order. Attention layers run on the composite (``MATH``)
kernel of ``scaled_dot_product_attention``, which supports all derivatives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from copy import copy
from functools import wraps
from math import isqrt

from torch import Tensor, cat, enable_grad, eye, zeros, zeros_like
from torch.autograd import grad
from torch.func import hessian, jacrev
from torch.nn import CrossEntropyLoss
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlinops._execution import restored_running_stats
from curvlinops._functional import FunctionalModel, bind_params, functional_form
from curvlinops.utils import make_functional_model_and_loss

Data = Iterable[tuple[Tensor | MutableMapping, Tensor]]


def composite_attention(func: Callable) -> Callable:
    """Run a function with the composite attention kernel, which has all derivatives.

    Args:
        func: Function to wrap.

    Returns:
        The wrapped function.
    """

    @wraps(func)
    def wrapped(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return func(*args, **kwargs)

    return wrapped


def _batch_size(X: Tensor | MutableMapping, input_key: str | None) -> int:
    """Return the batch size of an input.

    Args:
        X: Mini-batch input.
        input_key: Entry of a dict-like input that holds the batch axis.

    Returns:
        The batch size.

    Raises:
        ValueError: If ``X`` is dict-like and ``input_key`` is missing.
    """
    if isinstance(X, Tensor):
        return X.shape[0]
    if input_key is None:
        raise ValueError(
            "Dict-like inputs need `input_key` to determine the batch size."
        )
    return X[input_key].shape[0]


def _weighted_batches(loss_func, data: Data, input_key: str | None):
    """Yield each mini-batch with its weight in the empirical risk.

    Args:
        loss_func: Loss function; its reduction determines the weights.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Yields:
        Tuples ``(X, y, weight)``.
    """
    data = list(data)
    num_data = sum(_batch_size(X, input_key) for X, _ in data)
    mean = getattr(loss_func, "reduction", "sum") == "mean"
    for X, y in data:
        yield X, y, _batch_size(X, input_key) / num_data if mean else 1.0


def _flat_model(model_func, loss_func, params: list[Tensor]):
    """Make the model a function of one flat parameter vector.

    Args:
        model_func: The neural network, or ``model_func(params, X)`` for a
            parameter dictionary.
        loss_func: The loss function.
        params: The parameters, a list or a dictionary (then in its order).

    Returns:
        ``f(theta, X)``, ``c(prediction, y)`` and the flat parameter vector ``theta``.
    """
    model_func, params = bind_params(model_func, params)
    if isinstance(model_func, FunctionalModel):
        f, c = functional_form(model_func, params), loss_func
    else:
        f, c = make_functional_model_and_loss(model_func, loss_func, tuple(params))

    def f_flat(theta: Tensor, X):
        chunks = theta.split([p.numel() for p in params])
        return f(*(ch.reshape(p.shape) for ch, p in zip(chunks, params)), X)

    return f_flat, c, cat([p.detach().flatten() for p in params])


def _risk(model_func, loss_func, params, data, input_key) -> tuple[Callable, Tensor]:
    """Return the empirical risk as function of the flat parameters.

    Args:
        model_func: The neural network.
        loss_func: The loss function.
        params: The parameters.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Returns:
        The function ``theta -> risk`` and the flat parameters ``theta``.
    """
    f, c, theta = _flat_model(model_func, loss_func, params)
    batches = list(_weighted_batches(loss_func, data, input_key))

    def risk(theta: Tensor) -> Tensor:
        return sum(w * c(f(theta, X), y) for X, y, w in batches)

    return risk, theta


def blocks_to_matrix(blocks: dict[str, dict[str, Tensor]]) -> Tensor:
    """Assemble a matrix from the nested blocks that :mod:`torch.func` returns.

    ``torch.func.hessian`` (or ``jacrev(jacrev(...))``) of a function of a parameter
    dictionary returns ``blocks[row][col]`` of shape ``[*row.shape, *col.shape]``.
    The diagonal blocks are square, which determines every parameter's size; the
    blocks are flattened and placed in the order of the dictionary's keys.

    Args:
        blocks: Nested dictionary ``{row name: {column name: block}}`` with the same
            names, in the same order, on both levels.

    Returns:
        The matrix of shape ``[D, D]``, with :math:`D` the summed sizes.

    Raises:
        ValueError: If the names of the two levels differ or a diagonal block is not
            square.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.func import functional_call, hessian
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model, X = Linear(3, 1), rand(4, 3)
        >>> params = dict(model.named_parameters())
        >>> def loss(p):
        ...     return (functional_call(model, p, (X,)) ** 2).sum()
        >>> H = blocks_to_matrix(hessian(loss)(params))
        >>> H.shape  # weight (3 entries) and bias (1 entry)
        torch.Size([4, 4])
        >>> Xb = cat([X, X.new_ones(4, 1)], dim=1)
        >>> H.allclose(2 * Xb.T @ Xb)
        True
    """
    names = list(blocks)
    sizes = {}
    for name in names:
        if list(blocks[name]) != names:
            raise ValueError(
                f"blocks[{name!r}] has the keys {list(blocks[name])}, expected {names}."
            )
        numel = blocks[name][name].numel()
        size = isqrt(numel)
        if size * size != numel:
            raise ValueError(
                f"The diagonal block of {name!r} with {numel} entries is not square."
            )
        sizes[name] = size
    rows = [
        cat([blocks[r][c].reshape(sizes[r], sizes[c]) for c in names], dim=1)
        for r in names
    ]
    return cat(rows, dim=0)


@composite_attention
def functorch_hessian(
    model_func,
    loss_func,
    params: list[Tensor],
    data: Data,
    input_key: str | None = None,
) -> Tensor:
    r"""Compute the Hessian :math:`\nabla^2_{\mathbf{\theta}} \mathcal{L}` densely.

    Unlike the other references, it differentiates twice with plain autograd
    (reverse-over-reverse, the backward passes of all rows batched with
    ``is_grads_batched``), not with :mod:`torch.func`:
    in PyTorch 2.13, ``torch.func.hessian`` (and ``jacrev(jacrev(...))``,
    ``jacfwd(jacfwd(...))``) returns wrong, even non-symmetric Hessians through
    ``layer_norm`` (its mixed derivatives w.r.t. the normalized input and the
    scale are off; ``torch.func.grad`` composed with ``vmap`` is at fault, the
    same transforms without ``vmap`` agree with autograd), and through
    ``batch_norm`` with batch statistics. Plain autograd agrees with finite
    differences for both. Running statistics of normalization layers in train
    mode are left as they were.

    Args:
        model_func: The neural network (a ``torch.nn.Module``).
        loss_func: The loss function.
        params: The parameters.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Returns:
        The Hessian, of shape ``[D, D]``.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 1)
        >>> data = [(rand(4, 3), rand(4, 1))]
        >>> functorch_hessian(model, MSELoss(), list(model.parameters()), data).shape
        torch.Size([4, 4])
    """
    risk, theta = _risk(model_func, loss_func, params, data, input_key)
    theta.requires_grad_(True)
    with enable_grad(), restored_running_stats(model_func):
        (gradient,) = grad(risk(theta), theta, create_graph=True)
        if not gradient.requires_grad:  # the risk is linear in theta
            return zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
        rows = eye(theta.numel(), dtype=theta.dtype, device=theta.device)
        (H,) = grad(gradient, theta, rows, is_grads_batched=True, allow_unused=True)
    return zeros_like(rows) if H is None else H.detach()


@composite_attention
def functorch_gradient_and_loss(
    model_func,
    loss_func,
    params: list[Tensor],
    data: Data,
    input_key: str | None = None,
) -> tuple[list[Tensor], Tensor]:
    r"""Compute the empirical risk :math:`\mathcal{L}` and its gradient.

    Args:
        model_func: The neural network (a ``torch.nn.Module``).
        loss_func: The loss function.
        params: The parameters.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Returns:
        The gradient in tensor-list format (shapes of ``params``) and the loss.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 1)
        >>> X, y = rand(4, 3), rand(4, 1)
        >>> gradient, loss = functorch_gradient_and_loss(
        ...     model, MSELoss(), list(model.parameters()), [(X, y)]
        ... )
        >>> loss.allclose(MSELoss()(model(X), y))
        True
    """
    risk, theta = _risk(model_func, loss_func, params, data, input_key)
    gradient, loss = jacrev(risk)(theta), risk(theta)
    params = bind_params(model_func, params)[1]
    chunks = gradient.split([p.numel() for p in params])
    return [ch.reshape(p.shape) for ch, p in zip(chunks, params)], loss.detach()


@composite_attention
def functorch_ggn(
    model_func,
    loss_func,
    params: list[Tensor],
    data: Data,
    input_key: str | None = None,
) -> Tensor:
    r"""Compute the generalized Gauss-Newton matrix densely.

    .. math::
        \mathbf{G} = \sum_{\mathcal{B}} w_{\mathcal{B}}\,
        \mathbf{J}_{\mathcal{B}}^\top \mathbf{H}_{\mathcal{B}} \mathbf{J}_{\mathcal{B}}

    with :math:`\mathbf{J}_{\mathcal{B}}` the Jacobian of the batch's (flattened)
    model output w.r.t. the parameters and :math:`\mathbf{H}_{\mathcal{B}}` the batch
    loss's Hessian w.r.t. that output.

    Args:
        model_func: The neural network (a ``torch.nn.Module``).
        loss_func: The loss function.
        params: The parameters.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Returns:
        The GGN, of shape ``[D, D]``.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 1)  # linear model: the GGN is the Hessian
        >>> params, data = list(model.parameters()), [(rand(4, 3), rand(4, 1))]
        >>> G = functorch_ggn(model, MSELoss(), params, data)
        >>> G.allclose(functorch_hessian(model, MSELoss(), params, data))
        True
    """
    f, c, theta = _flat_model(model_func, loss_func, params)
    ggn = zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    for X, y, weight in _weighted_batches(loss_func, data, input_key):
        output = f(theta, X).detach()
        J = jacrev(f)(theta, X).reshape(output.numel(), theta.numel())
        H = hessian(c)(output, y).reshape(output.numel(), -1)
        ggn.add_(J.T @ H @ J, alpha=weight)
    return ggn


@composite_attention
def functorch_empirical_fisher(
    model_func,
    loss_func,
    params: list[Tensor],
    data: Data,
    input_key: str | None = None,
) -> Tensor:
    r"""Compute the empirical Fisher (uncentered gradient covariance) densely.

    .. math::
        \mathbf{E} = \sum_{\mathcal{B}} \frac{w_{\mathcal{B}}}{R_{\mathcal{B}}}
        \sum_{t \in \mathcal{B}} \nabla_{\mathbf{\theta}} \ell_t
        (\nabla_{\mathbf{\theta}} \ell_t)^\top

    The terms :math:`\ell_t` are the entries of the un-reduced loss
    (``reduction='none'``), summed over the output axis except for cross-entropy
    and one-dimensional outputs ``[B]``, whose un-reduced entries already are the
    terms. :math:`R_{\mathcal{B}}` is the number of un-reduced entries (for
    cross-entropy those whose label is not ``ignore_index``) for
    ``reduction='mean'`` and one for ``'sum'``. Per-term gradients come from the
    Jacobian of the terms w.r.t. the parameters.

    Args:
        model_func: The neural network (a ``torch.nn.Module``).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.
        data: Mini-batches ``(X, y)``.
        input_key: Entry of dict-like inputs that holds the batch axis.

    Returns:
        The empirical Fisher, of shape ``[D, D]``.

    Example:
        >>> from torch import autograd, manual_seed, outer, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model, loss_func = Linear(3, 1, bias=False), MSELoss()
        >>> X, y = rand(1, 3), rand(1, 1)
        >>> E = functorch_empirical_fisher(model, loss_func, [model.weight], [(X, y)])
        >>> (g,) = autograd.grad(loss_func(model(X), y), model.weight)
        >>> E.allclose(outer(g.flatten(), g.flatten()))  # one datum: g gᵀ
        True
    """
    f, _, theta = _flat_model(model_func, None, params)
    unreduced = copy(loss_func)
    unreduced.reduction = "none"
    per_entry_terms = isinstance(loss_func, CrossEntropyLoss)
    ef = zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    for X, y, weight in _weighted_batches(loss_func, data, input_key):
        losses = unreduced(f(theta, X), y).detach()

        def terms(theta: Tensor, X=X, y=y) -> Tensor:
            entries = unreduced(f(theta, X), y)
            one_per_term = per_entry_terms or entries.ndim == 1  # output [B]
            return (entries if one_per_term else entries.sum(-1)).flatten()

        G = jacrev(terms)(theta)
        averaged = losses.numel()
        if per_entry_terms and not y.is_floating_point():  # ignored labels do not count
            averaged = int((y != loss_func.ignore_index).sum())
        scale = 1.0 / averaged if loss_func.reduction == "mean" else 1.0
        ef.add_(G.T @ G, alpha=weight * scale)
    return ef


@composite_attention
def functorch_jacobian(
    model_func, params: list[Tensor], data: Data, input_key: str | None = None
) -> Tensor:
    r"""Compute the Jacobian of the model's outputs on all data densely.

    Rows are ordered by datum, then by the entries of the datum's output in
    row-major order; columns follow the flattened parameters.

    Args:
        model_func: The neural network (a ``torch.nn.Module``).
        params: The parameters.
        data: Mini-batches ``(X, y)``; the labels are not used.
        input_key: Unused; accepted for a uniform signature.

    Returns:
        The Jacobian, of shape ``[N * C, D]`` with ``C`` the number of entries of
        one datum's output.

    Example:
        >>> from torch import eye, manual_seed, rand
        >>> from torch.nn import Linear
        >>> _ = manual_seed(0)
        >>> model = Linear(3, 2)
        >>> J = functorch_jacobian(model, [model.bias], [(rand(4, 3), None)])
        >>> J.allclose(eye(2).repeat(4, 1))  # the bias shifts each output by one
        True
    """
    f, _, theta = _flat_model(model_func, None, params)
    return cat([jacrev(f)(theta, X).reshape(-1, theta.numel()) for X, _ in data])
