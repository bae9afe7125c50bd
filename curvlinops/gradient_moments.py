"""Uncentered gradient covariance (empirical Fisher) as a linear operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

from torch import Tensor, einsum

from curvlinops._checks import check_supported_loss
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    ignored_terms,
    loss_terms,
    reduction_factor,
    term_gradients,
    terms_to_output,
)
from curvlinops.ggn import _JacobianSandwichLinearOperator


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
    self-adjoint.

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
    """

    def __init__(
        self,
        model_func: Callable[[Tensor | MutableMapping], Tensor],
        loss_func: Callable[[Tensor, Tensor], Tensor],
        params: list[Tensor],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        process_group=None,
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
            num_data: Number of data points. Inferred with one pass if ``None``.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: A ``torch.distributed`` process group for data-parallel
                products over the union of all ranks' shards (see
                :class:`~curvlinops.CurvatureLinearOperator`). ``None``
                (default): single process.

        Raises:
            NotImplementedError: If the loss function is not supported.
        """
        check_supported_loss(loss_func, SUPPORTED_LOSSES, type(self).__name__)
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            process_group=process_group,
        )

    def _output_matmat(self, output: Tensor, y: Tensor, M: Tensor) -> Tensor:
        """Multiply the outer products of the terms' output gradients onto columns.

        Args:
            output: Detached model output on the mini-batch.
            y: Mini-batch labels.
            M: Columns ``[K, *output.shape]``.

        Returns:
            The product, of shape ``[K, *output.shape]``.
        """
        output_terms, y_terms = loss_terms(self._loss_func, output, y)
        gradients = term_gradients(self._loss_func, output_terms, y_terms)
        return _gradient_outer_product_matmat(
            self._loss_func, y, gradients.unsqueeze(0), M
        )


def _gradient_outer_product_matmat(
    loss_func, y: Tensor, gradients: Tensor, M: Tensor
) -> Tensor:
    r"""Multiply averaged outer products of loss-term gradients onto output columns.

    Computes :math:`\frac{1}{R S} \sum_{s=1}^S \sum_{t=1}^T \mathbf{g}_{s,t}
    \mathbf{g}_{s,t}^\top \mathbf{M}` in output space, where :math:`R` is the loss's
    reduction factor and :math:`\mathbf{g}_{s,t} \in \mathbb{R}^C` are gradients
    w.r.t. the outputs of term :math:`t` (true labels for the empirical Fisher,
    :math:`S` sampled labels for the Monte-Carlo Fisher).

    Args:
        loss_func: One of the supported loss functions.
        y: Mini-batch labels (to rearrange outputs into terms, and to leave out
            terms whose cross-entropy label is ``ignore_index`` from the average).
        gradients: Term gradients ``[S, T, C]``.
        M: Columns ``[K, *output.shape]``.

    Returns:
        The product, of shape ``[K, *output.shape]``.
    """
    num_samples, num_terms, num_outputs = gradients.shape
    rows, y_terms = loss_terms(loss_func, M.flatten(end_dim=1), y)
    M_terms = rows.reshape(M.shape[0], num_terms, num_outputs)
    if num_samples <= num_outputs:  # contract with one gradient at a time
        coefficients = einsum("ktc,stc->kst", M_terms, gradients)
        result = einsum("kst,std->ktd", coefficients, gradients)
    else:  # cheaper to form the per-term C x C matrices first
        per_term = einsum("stc,std->tcd", gradients, gradients)
        result = einsum("ktc,tcd->ktd", M_terms, per_term)
    ignored = ignored_terms(loss_func, y_terms)
    scale = 1.0 / (num_samples * reduction_factor(loss_func, M_terms[0], ignored))
    return terms_to_output(loss_func, result.mul_(scale), M.shape[1:])
