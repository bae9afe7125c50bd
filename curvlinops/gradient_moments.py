"""Uncentered gradient covariance (empirical Fisher) as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from functools import partial

from torch import Tensor, einsum

from curvlinops._autodiff import unpack_columns
from curvlinops._checks import check_supported_loss
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    ignored_terms,
    loss_terms,
    output_rows,
    reduction_factor,
    term_gradients,
    terms_to_output,
)
from curvlinops.ggn import _JacobianSandwichLinearOperator, _make_batch_sandwich_product


class EFLinearOperator(_JacobianSandwichLinearOperator):
    r"""Uncentered gradient covariance ('empirical Fisher'), as linear operator.

    For the empirical risk

    .. math::
        \mathcal{L}(\mathbf{\theta})
        = c \sum_{n=1}^N \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)

    with :math:`c = 1/N` (``reduction='mean'``) or :math:`c = 1` (``'sum'``), the
    empirical Fisher (EF) sums the outer products of the per-datum gradients,

    .. math::
        \mathbf{E}
        = c \sum_{n=1}^N
        \nabla_{\mathbf{\theta}} \ell_n (\nabla_{\mathbf{\theta}} \ell_n)^\top,
        \qquad
        \ell_n = \ell(f_{\mathbf{\theta}}(\mathbf{x}_n), \mathbf{y}_n)\,.

    If the model's output has extra axes (sequence, spatial; ``[N, C, *]`` for
    ``CrossEntropyLoss``, ``[N, *, C]`` otherwise), every position is a loss term of
    its own with its own gradient, and :math:`c` is the factor by which the loss's
    reduction scales the sum of all terms: :math:`1/(N S)` for cross-entropy with
    :math:`S` positions and ``'mean'``, :math:`1/(N S C)` for the square loss and
    BCE with :math:`C` outputs per position, since these average over all entries.

    Writing :math:`\mathbf{g}_t = \nabla_{\mathbf{f}_t} \ell_t` for the gradient of
    term :math:`t` w.r.t. its model output :math:`\mathbf{f}_t` and
    :math:`\mathbf{J}_t` for that output's Jacobian, the EF is the Jacobian sandwich
    :math:`c \sum_t \mathbf{J}_t^\top \mathbf{g}_t \mathbf{g}_t^\top \mathbf{J}_t`.
    A product therefore costs about one GGN product: one forward pass carrying the
    columns as tangents and one backward pass per mini-batch, for all columns at
    once. Supported losses are ``MSELoss``, ``CrossEntropyLoss`` (labels are class
    indices ``[N, *]``, where terms labeled ``ignore_index`` are left out as the
    loss leaves them out, or class probabilities ``[N, C, *]``) and
    ``BCEWithLogitsLoss``, without weights or label smoothing. The operator is
    self-adjoint. With ``block_sizes=[b_1, b_2, ...]`` it represents the
    block-diagonal approximation whose blocks are the EFs of the gradients w.r.t.
    the first :math:`b_1` parameters, the next :math:`b_2`, and so on (the EF's
    diagonal blocks). The per-batch product is :func:`make_batch_ef_matrix_product`.

    The EF is cheap but can differ a lot from the Fisher; see

    - Kunstner, F., Balles, L., & Hennig, P. (2019). Limitations of the empirical
      Fisher approximation for natural gradient descent. NeurIPS.
    - Martens, J. (2020). New insights and perspectives on the natural gradient
      method. JMLR.

    Example:
        >>> from torch import autograd, cat, manual_seed, outer, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model, loss_func = Linear(3, 2), MSELoss(reduction="sum")
        >>> params = list(model.parameters())
        >>> X, y = rand(4, 3), rand(4, 2)
        >>> E = EFLinearOperator(model, loss_func, params, [(X[:3], y[:3]),
        ...                                                 (X[3:], y[3:])])
        >>> def datum_gradient(x, t):  # flattened gradient of one datum's loss
        ...     gradient = autograd.grad(loss_func(model(x), t), params)
        ...     return cat([g.flatten() for g in gradient])
        >>> grads = [datum_gradient(x, t) for x, t in zip(X.split(1), y.split(1))]
        >>> v = rand(E.shape[1])
        >>> (E @ v).allclose(sum(outer(g, g) for g in grads) @ v, atol=1e-6)
        True

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTS_BLOCKS: ``True``.
        SUPPORTED_LOSSES: The supported loss classes.
    """

    SUPPORTED_LOSSES = SUPPORTED_LOSSES

    def __init__(
        self,
        model_func: Callable[[Tensor | MutableMapping], Tensor],
        loss_func: Callable[[Tensor, Tensor], Tensor],
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        block_sizes: list[int] | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        """Set up the empirical Fisher and, by default, probe determinism.

        Args:
            model_func: Maps a mini-batch input ``X`` to predictions, usually a
                ``torch.nn.Module``; outputs are ``[B, C]``, or ``[B, C, *]`` for
                cross-entropy and ``[B, *, C]`` otherwise.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction`` ``'mean'`` or ``'sum'``.
            params: Parameters that define the matrix's rows and columns.
            data: Mini-batches ``(X, y)`` in a deterministic order. ``X`` may be a
                ``MutableMapping``; then ``batch_size_fn`` is required.
            progressbar: Show a progress bar during the passes over the data.
            check_deterministic: Probe at construction that two passes over data and
                model agree.
            num_data: Number of data points (an integer, also a NumPy one). Inferred
                with one pass if ``None`` (then ``data`` must be finite). Every
                pass over the data counts its points and raises a ``ValueError``
                if they are not ``num_data``; data that yield more (e.g. an
                endless stream) stop with it as soon as they do.
            block_sizes: Numbers of consecutive parameters that form the diagonal
                blocks of a block-diagonal approximation (the EFs of the blocks'
                gradients). ``None`` (default): the EF.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group for data-parallel
                products over the union of all ranks' shards (see
                :class:`~curvlinops.CurvatureLinearOperator`). ``None``
                (default): single process.
            shape: Expected shape of the matrix (checked). ``None``: no check.

        Raises:
            NotImplementedError: If the loss function is not supported.
        """
        check_supported_loss(loss_func, self.SUPPORTED_LOSSES, type(self).__name__)
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            block_sizes=block_sizes,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
            shape=shape,
        )

    def _make_mp(self) -> Callable[..., tuple[Tensor, ...]]:
        """Build the per-batch product with :func:`make_batch_ef_matrix_product`.

        Returns:
            ``mp(X, y, *M) -> tuple``.
        """
        return make_batch_ef_matrix_product(
            self._model_func, self._loss_func, self._params, self._block_sizes
        )


def make_batch_ef_matrix_product(
    model_func: Callable[[Tensor | MutableMapping], Tensor],
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: tuple[Tensor, ...],
    block_sizes: list[int] | None = None,
) -> Callable[..., tuple[Tensor, ...]]:
    r"""Build the function that multiplies a mini-batch's EF onto a matrix.

    For a mini-batch whose loss :math:`\frac{1}{R} \sum_t \ell_t` has terms
    :math:`\ell_t` (one per datum and position of extra output axes) and reduction
    factor :math:`R` (``1`` for ``'sum'``), the function computes
    :math:`\frac{1}{R} \sum_t \nabla_{\mathbf{\theta}} \ell_t
    (\nabla_{\mathbf{\theta}} \ell_t)^\top \mathbf{M}` as the Jacobian sandwich
    :math:`\frac{1}{R} \sum_t \mathbf{J}_t^\top \mathbf{g}_t \mathbf{g}_t^\top
    \mathbf{J}_t \mathbf{M}` with the output gradients :math:`\mathbf{g}_t`: one
    forward pass carrying the columns as tangents and one batched backward pass. It
    is the per-batch product of :class:`EFLinearOperator`.

    Args:
        model_func: Maps a mini-batch input to predictions (a module or a function).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters (requiring grad) that define the rows and columns.
            A ``dict[str, Tensor]`` goes with ``model_func(params, X)``.
        block_sizes: Numbers of consecutive parameters that form the diagonal
            blocks of a block-diagonal approximation. ``None`` (default): the EF.

    Returns:
        ``mp(X, y, *M) -> tuple`` that takes the matrix as one tensor per parameter,
        of shape ``[*param.shape, K]`` (or as one tuple of them), and returns the
        product in the same format. Autograd is switched on inside.

    Raises:
        NotImplementedError: If the loss function is not supported.

    Example:
        >>> from torch import autograd, manual_seed, outer, rand
        >>> from torch.nn import Linear, MSELoss
        >>> _ = manual_seed(0)
        >>> model, loss_func = Linear(3, 2, bias=False), MSELoss(reduction="sum")
        >>> X, y = rand(4, 3), rand(4, 2)
        >>> mp = make_batch_ef_matrix_product(model, loss_func, (model.weight,))
        >>> M = rand(2, 3, 5)  # five columns in the weight's shape
        >>> (EM,) = mp(X, y, M)
        >>> grads = [autograd.grad(loss_func(model(x), t), model.weight)[0].flatten()
        ...          for x, t in zip(X.split(1), y.split(1))]
        >>> E = sum(outer(g, g) for g in grads)
        >>> EM.allclose((E @ M.reshape(6, 5)).reshape(2, 3, 5), atol=1e-6)
        True
    """
    check_supported_loss(loss_func, SUPPORTED_LOSSES, "make_batch_ef_matrix_product")
    output_matmat = partial(_ef_output_matmat, loss_func)
    product = _make_batch_sandwich_product(
        model_func, loss_func, params, output_matmat, block_sizes
    )

    def batch_ef_matrix_product(X, y, *M) -> tuple[Tensor, ...]:
        return product(X, y, unpack_columns(M))

    batch_ef_matrix_product.modes = product.modes
    return batch_ef_matrix_product


def _ef_output_matmat(loss_func, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
    """Multiply the outer products of the terms' output gradients onto columns.

    Args:
        loss_func: One of the supported loss functions.
        output: Detached model output on the mini-batch.
        y: Mini-batch labels.
        M: Columns ``[K, *output.shape]``.

    Returns:
        The product, of shape ``[K, *output.shape]``.
    """
    output_terms, y_terms = loss_terms(loss_func, output, y)
    gradients = scaled_term_gradients(loss_func, output_terms, y_terms, y_terms)
    return gradient_outer_product_matmat(loss_func, gradients.unsqueeze(0), M)


def scaled_term_gradients(
    loss_func, output_terms: Tensor, labels: Tensor, y_terms: Tensor | None
) -> Tensor:
    r"""Output gradients of the loss terms, scaled by the loss's reduction.

    Returns :math:`\mathbf{g}_t / \sqrt{R}` with :math:`\mathbf{g}_t =
    \nabla_{\mathbf{f}_t} \ell_t`, so that :math:`\sum_t \mathbf{g}_t
    \mathbf{g}_t^\top / R` is a sum of outer products of the returned rows. Terms
    that cross-entropy ignores (label ``ignore_index`` in ``y_terms``) get zero
    gradients and do not count in :math:`R`.

    Args:
        loss_func: One of the supported loss functions.
        output_terms: Outputs in rows, ``[T, C]``.
        labels: Labels in rows at which to differentiate (the true or sampled ones),
            optionally with leading sample axes.
        y_terms: The true labels in rows (for the ignored terms), or ``None``.

    Returns:
        Gradients ``[*, T, C]`` (leading axes of ``labels``).
    """
    gradients = term_gradients(loss_func, output_terms, labels)
    ignored = ignored_terms(loss_func, y_terms)
    if ignored is not None:  # terms that cross-entropy ignores do not count
        gradients = gradients.masked_fill(ignored.unsqueeze(-1), 0.0)
    return gradients / reduction_factor(loss_func, output_terms, ignored) ** 0.5


def gradient_outer_product_matmat(loss_func, gradients: Tensor, M: Tensor) -> Tensor:
    r"""Multiply averaged per-term outer products of output gradients onto columns.

    Computes :math:`\frac{1}{S} \sum_{s=1}^S \sum_{t=1}^T \mathbf{g}_{s,t}
    \mathbf{g}_{s,t}^\top \mathbf{M}_t` in output space, where
    :math:`\mathbf{g}_{s,t} \in \mathbb{R}^C` are (scaled) gradients w.r.t. the
    outputs of term :math:`t` (true labels for the empirical Fisher, :math:`S`
    sampled labels for the Monte-Carlo Fisher).

    Args:
        loss_func: One of the supported loss functions.
        gradients: Term gradients ``[S, T, C]``.
        M: Columns ``[K, *output.shape]``.

    Returns:
        The product, of shape ``[K, *output.shape]``.
    """
    num_samples, num_terms, num_outputs = gradients.shape
    rows = output_rows(loss_func, M.flatten(end_dim=1))
    M_terms = rows.reshape(M.shape[0], num_terms, num_outputs)
    if num_samples <= num_outputs:  # contract with one gradient at a time
        coefficients = einsum("ktc,stc->kst", M_terms, gradients)
        result = einsum("kst,std->ktd", coefficients, gradients)
    else:  # cheaper to form the per-term C x C matrices first
        per_term = einsum("stc,std->tcd", gradients, gradients)
        result = einsum("ktc,tcd->ktd", M_terms, per_term)
    return terms_to_output(loss_func, result.div_(num_samples), M.shape[1:])
