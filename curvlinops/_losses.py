r"""Closed forms for the supported losses (square, softmax cross-entropy, sigmoid BCE).

A mini-batch loss of these types is a reduced sum of *terms*: one term per datum and
per position of any extra output axes (sequence, spatial). With the model output
rearranged into rows :math:`\mathbf{f}_t \in \mathbb{R}^C` (:func:`loss_terms`), the
mini-batch loss is

.. math::
    \ell = \frac{1}{R} \sum_{t=1}^T \ell_t(\mathbf{f}_t, \mathbf{y}_t),

with :math:`\ell_t` the un-reduced term summed over the :math:`C` outputs, and the
reduction factor :math:`R` of :func:`reduction_factor` (:math:`1` for
``reduction='sum'``; :math:`T` for cross-entropy and :math:`TC` for the other two with
``reduction='mean'``). Each :math:`\ell_t` is a negative log-likelihood
:math:`-\log q(\mathbf{y}_t \mid \mathbf{f}_t)` (up to a constant), so the helpers can
sample labels from the model's predictive distribution (:func:`sample_labels`),
differentiate terms (:func:`term_gradients`) and factorize their Hessians
(:func:`hessian_sqrt`), as the Fisher, empirical Fisher and KFAC need.

Cross-entropy with class probabilities :math:`\mathbf{y}_t` as labels has the term
:math:`\ell_t = -\sum_c y_{t,c} \log \mathrm{softmax}(\mathbf{f}_t)_c = m_t\,
\ell_t(\mathbf{f}_t, \mathbf{y}_t / m_t)` with the *label mass*
:math:`m_t = \sum_c y_{t,c}`, which need not be one. Its Hessian
:math:`m_t (\mathrm{diag}(\mathbf{p}_t) - \mathbf{p}_t \mathbf{p}_t^\top)` scales
with the mass (:func:`label_mass`). The Monte-Carlo Fisher treats the mass as it
treats the reduction factor, as a weight of the term: labels are drawn from
:math:`\mathrm{Cat}(\mathbf{p}_t)` and their gradients scaled by
:math:`\sqrt{m_t}`, so that the sampled outer products estimate the Hessian
(:func:`scale_by_label_mass`). Square roots and samples need :math:`m_t \ge 0`.
"""

from __future__ import annotations

from math import sqrt

from torch import Generator, Size, Tensor, eye, multinomial, randn, sigmoid
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.nn.functional import one_hot

SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)


_OPTIONS = {
    CrossEntropyLoss: ("weight", "label_smoothing"),
    BCEWithLogitsLoss: ("weight", "pos_weight"),
}


def unsupported_options(loss_func) -> list[str]:
    """Return the options of a supported loss that the closed forms do not model.

    Args:
        loss_func: The loss function.

    Returns:
        Names of the options that are set: class or entry ``weight``s,
        ``pos_weight`` (BCE) and ``label_smoothing`` (cross-entropy).
    """
    names = [
        n for cls, ns in _OPTIONS.items() if isinstance(loss_func, cls) for n in ns
    ]
    values = {name: getattr(loss_func, name) for name in names}
    return [name for name, value in values.items() if _is_set(value)]


def _is_set(value) -> bool:
    """Return whether a loss option differs from its default (``None`` or ``0``).

    Args:
        value: The option's value, e.g. a weight tensor or a smoothing factor.

    Returns:
        Whether it is set.
    """
    if isinstance(value, (int, float)):
        return value != 0
    return value is not None


def has_ignored_labels(loss_func, y: Tensor) -> bool:
    """Return whether cross-entropy labels contain the loss's ``ignore_index``.

    Args:
        loss_func: The loss function.
        y: Mini-batch labels.

    Returns:
        Whether some terms are ignored (never for other losses or class
        probabilities).
    """
    ignored = ignored_terms(loss_func, y)
    return ignored is not None and bool(ignored.any())


def check_loss_options(loss_func, who: str):
    """Raise if a loss sets options that the closed forms do not model.

    Args:
        loss_func: One of the supported losses.
        who: Name of the caller for the error message.

    Raises:
        NotImplementedError: If weights, ``pos_weight`` or label smoothing are set.
    """
    options = unsupported_options(loss_func)
    if options:
        raise NotImplementedError(
            f"{who} does not support {type(loss_func).__name__} with the options "
            f"{options}; use the loss without them."
        )


def check_no_ignored_labels(loss_func, y: Tensor, who: str):
    """Raise if cross-entropy labels contain the loss's ``ignore_index``.

    Args:
        loss_func: One of the supported losses.
        y: Mini-batch labels.
        who: Name of the caller for the error message.

    Raises:
        NotImplementedError: If some labels equal ``ignore_index``.
    """
    if has_ignored_labels(loss_func, y):
        raise NotImplementedError(
            f"{who} does not support labels equal to CrossEntropyLoss's "
            f"ignore_index={loss_func.ignore_index}; remove those terms from the data."
        )


def check_output_and_labels(loss_func, output, y):
    """Raise a clear error if a model output or its labels do not fit the loss.

    Closed forms that do not read the labels (e.g. the square loss's Hessian)
    would otherwise accept any labels silently.

    Args:
        loss_func: The loss function.
        output: Model output on a mini-batch.
        y: The mini-batch's labels.

    Raises:
        TypeError: If the output is not a tensor, or a supported loss gets labels
            that are not a tensor (e.g. ``None`` or a NumPy array).
        ValueError: If the labels' shape does not fit the output's for a supported
            loss: the output's shape, or for cross-entropy ``[B, *]`` (integer class
            indices) or the output's shape (class probabilities); if cross-entropy
            gets an output without class axis ``[B, C, *]``; or if BCE gets
            labels that are not floating point.
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The model must return one tensor, got {type(output).__name__}."
        )
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        return
    name = type(loss_func).__name__
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} needs labels y as tensors, got {type(y).__name__}.")
    if isinstance(loss_func, BCEWithLogitsLoss) and not y.is_floating_point():
        raise ValueError(
            f"{name} needs floating point labels (probabilities), got {y.dtype}."
        )
    expected = [output.shape]
    if isinstance(loss_func, CrossEntropyLoss):
        _check_cross_entropy_output_and_labels(output, y)
        expected.insert(0, output.shape[:1] + output.shape[2:])
    if y.shape not in expected:
        shapes = " or ".join(str(list(shape)) for shape in expected)
        raise ValueError(
            f"{name} on model outputs of shape {list(output.shape)} expects labels "
            f"of shape {shapes}, got {list(y.shape)}."
        )


def _check_cross_entropy_output_and_labels(output: Tensor, y: Tensor):
    """Raise if cross-entropy gets no class axis, or float labels without one.

    Args:
        output: Model output.
        y: Labels.

    Raises:
        ValueError: If the output has fewer than two axes, or the labels are
            floating point but not laid out like the output (class probabilities).
    """
    if output.ndim < 2:
        raise ValueError(
            f"CrossEntropyLoss expects model outputs [B, C, *] with a class axis C, "
            f"got shape {list(output.shape)}."
        )
    if y.is_floating_point() and y.shape != output.shape:
        indices_shape = list(output.shape[:1] + output.shape[2:])
        raise ValueError(
            f"CrossEntropyLoss on model outputs of shape {list(output.shape)} expects "
            f"integer class indices of shape {indices_shape} or class probabilities "
            f"of shape {list(output.shape)}; got labels of dtype {y.dtype} and shape "
            f"{list(y.shape)} (use y.long() for indices)."
        )


def loss_terms(loss_func, output: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Rearrange a mini-batch's outputs and labels into one row per loss term.

    A one-dimensional output ``[B]`` (square loss or BCE) has one term per datum,
    each with one output (``C = 1``).

    Args:
        loss_func: The loss function.
        output: Model output; ``[B, C, *]`` for cross-entropy, else ``[B, *, C]``
            or ``[B]``.
        y: Labels; ``[B, *]`` class indices or ``[B, C, *]`` class probabilities
            for cross-entropy, else of the output's shape.

    Returns:
        Outputs ``[T, C]`` and labels (``[T]`` for class indices, else ``[T, C]``).
    """
    return output_rows(loss_func, output), label_rows(loss_func, y)


def output_rows(loss_func, output: Tensor) -> Tensor:
    """Rearrange a model output into one row per loss term.

    A one-dimensional output ``[B]`` (square loss or BCE) has one row per datum.

    Args:
        loss_func: The loss function.
        output: Model output; ``[B, C, *]`` for cross-entropy, else ``[B, *, C]``
            or ``[B]``.

    Returns:
        Outputs ``[T, C]``; unchanged if already of that form.
    """
    if isinstance(loss_func, CrossEntropyLoss):
        output = output.movedim(1, -1)
    num_outputs = 1 if output.ndim == 1 else output.shape[-1]
    return output.reshape(-1, num_outputs)


def label_rows(loss_func, y: Tensor) -> Tensor:
    """Rearrange labels like :func:`output_rows` rearranges the output.

    Args:
        loss_func: The loss function.
        y: Labels; ``[B, *]`` class indices or ``[B, C, *]`` class probabilities
            for cross-entropy, else of the output's shape.

    Returns:
        Labels ``[T]`` (class indices) or ``[T, C]``; unchanged if already in rows.
    """
    if isinstance(loss_func, CrossEntropyLoss) and not y.is_floating_point():
        return y.reshape(-1)
    return output_rows(loss_func, y)


def terms_to_output(loss_func, terms: Tensor, output_shape: Size) -> Tensor:
    """Undo :func:`loss_terms` on columns: rows of terms back to the output's layout.

    Args:
        loss_func: The loss function.
        terms: Columns of terms, ``[K, T, C]``.
        output_shape: Shape of the model output, ``[B, C, *]`` for cross-entropy,
            else ``[B, *, C]``.

    Returns:
        Columns ``[K, *output_shape]``.
    """
    if isinstance(loss_func, CrossEntropyLoss):
        batch_size, num_classes, *rest = output_shape
        return terms.reshape(-1, batch_size, *rest, num_classes).movedim(-1, 2)
    return terms.reshape(-1, *output_shape)


def reduction_factor(
    loss_func, output_terms: Tensor, ignored: Tensor | None = None
) -> float | Tensor:
    """Return the factor :math:`R` by which the loss divides the sum of its terms.

    Args:
        loss_func: The loss function.
        output_terms: Outputs in rows, ``[T, C]``.
        ignored: Mask of the terms cross-entropy ignores (see
            :func:`ignored_terms`). If given, only the others are averaged.

    Returns:
        ``1`` for ``reduction='sum'``; the number of averaged entries otherwise (a
        tensor if it counts non-ignored labels, to avoid a host synchronization).
    """
    if loss_func.reduction == "sum":
        return 1.0
    num_terms, num_outputs = output_terms.shape
    if not isinstance(loss_func, CrossEntropyLoss):
        return float(num_terms * num_outputs)
    return float(num_terms) if ignored is None else (~ignored).sum().to(output_terms)


def ignored_terms(loss_func, y_terms: Tensor | None) -> Tensor | None:
    """Return which loss terms cross-entropy ignores (label ``ignore_index``).

    Args:
        loss_func: The loss function.
        y_terms: Labels in rows, possibly with leading axes, or ``None``.

    Returns:
        A boolean mask of the labels' shape for cross-entropy with class indices,
        else ``None``.
    """
    if (
        not isinstance(loss_func, CrossEntropyLoss)
        or y_terms is None
        or y_terms.is_floating_point()
    ):
        return None
    return y_terms == loss_func.ignore_index


def term_gradients(loss_func, output_terms: Tensor, y_terms: Tensor) -> Tensor:
    r"""Compute the gradients :math:`\nabla_{\mathbf{f}_t} \ell_t` of un-reduced terms.

    Args:
        loss_func: The loss function.
        output_terms: Outputs in rows, ``[T, C]``.
        y_terms: Labels in rows (see :func:`loss_terms`), optionally with leading
            sample axes, e.g. ``[M, T, C]`` or ``[M, T]`` for sampled labels.
            Cross-entropy takes class indices or (floating) class probabilities
            :math:`\mathbf{p}_t`, whose gradient is
            :math:`\mathrm{softmax}(\mathbf{f}_t) \sum_c p_{t,c} - \mathbf{p}_t`.

    Returns:
        Gradients of shape ``[*, T, C]`` (leading axes of ``y_terms``), with the
        outputs' dtype: labels of a wider dtype take part in that precision and
        the result is cast back, as autograd does for the loss itself.
    """
    return _term_gradients(loss_func, output_terms, y_terms).to(output_terms.dtype)


def _term_gradients(loss_func, output_terms: Tensor, y_terms: Tensor) -> Tensor:
    """Compute the gradients of un-reduced terms, in the promoted dtype.

    Args:
        loss_func: The loss function.
        output_terms: Outputs in rows, ``[T, C]``.
        y_terms: Labels in rows, optionally with leading sample axes.

    Returns:
        Gradients of shape ``[*, T, C]``.
    """
    if isinstance(loss_func, MSELoss):
        return 2 * (output_terms - y_terms)
    if isinstance(loss_func, CrossEntropyLoss):
        if y_terms.is_floating_point():  # class probabilities
            targets = y_terms
            mass = targets.sum(-1, keepdim=True)
            return output_terms.softmax(-1) * mass - targets
        ignored = ignored_terms(loss_func, y_terms)
        indices = y_terms.masked_fill(ignored, 0).long()  # also uint8 labels
        targets = one_hot(indices, output_terms.shape[-1]).to(output_terms.dtype)
        gradients = output_terms.softmax(-1) - targets
        return gradients.masked_fill(ignored.unsqueeze(-1), 0.0)  # ignored: zero
    return sigmoid(output_terms) - y_terms


def sample_labels(
    loss_func, output_terms: Tensor, num_samples: int, generator: Generator | None
) -> Tensor:
    r"""Draw labels from the predictive distribution :math:`q(\cdot \mid \mathbf{f}_t)`.

    The distributions are :math:`\mathcal{N}(\mathbf{f}_t, \frac{1}{2}\mathbf{I})` for
    the square loss, :math:`\mathrm{Cat}(\mathrm{softmax}(\mathbf{f}_t))` for
    cross-entropy and :math:`\mathrm{Bernoulli}(\sigma(\mathbf{f}_t))` for BCE.

    Args:
        loss_func: The loss function.
        output_terms: Outputs in rows, ``[T, C]``.
        num_samples: Number of samples :math:`M` per term.
        generator: Random number generator on the outputs' device.

    Returns:
        Labels ``[M, T]`` (cross-entropy) or ``[M, T, C]``.
    """
    output_terms = output_terms.detach()
    if isinstance(loss_func, MSELoss):
        noise = randn(
            num_samples,
            *output_terms.shape,
            generator=generator,
            device=output_terms.device,
            dtype=output_terms.dtype,
        )
        return output_terms + noise / sqrt(2)
    if isinstance(loss_func, CrossEntropyLoss):
        probs = output_terms.softmax(-1)
        return multinomial(probs, num_samples, replacement=True, generator=generator).T
    probs = sigmoid(output_terms).expand(num_samples, *output_terms.shape)
    return probs.bernoulli(generator=generator)


def hessian_sqrt(
    loss_func, output_terms: Tensor, y_terms: Tensor | None = None
) -> Tensor:
    r"""Factorize each term's Hessian into a square root :math:`\mathbf{S}_t`.

    The factorization is :math:`\nabla^2_{\mathbf{f}_t}\ell_t = \mathbf{S}_t
    \mathbf{S}_t^\top`. The factors are :math:`\sqrt{2}\mathbf{I}` (square loss),
    :math:`\sqrt{m_t}\,(\mathrm{diag}(\sqrt{\mathbf{p}}) - \mathbf{p}
    \sqrt{\mathbf{p}}^\top)` with :math:`\mathbf{p} = \mathrm{softmax}(\mathbf{f}_t)`
    (cross-entropy; it uses :math:`\sum_c p_c = 1`; :math:`m_t` is the label mass,
    one for class indices), and :math:`\mathrm{diag}(\sqrt{\mathbf{p}(1-\mathbf{p})})`
    with :math:`\mathbf{p} = \sigma(\mathbf{f}_t)` (BCE).

    Args:
        loss_func: The loss function.
        output_terms: Outputs in rows, ``[T, C]``.
        y_terms: Labels in rows (see :func:`loss_terms`); only cross-entropy's
            class probabilities matter (their mass). ``None``: mass one.

    Returns:
        Square roots ``[T, C, C]``; the last axis indexes the factor's columns.
    """
    output_terms = output_terms.detach()
    num_terms, num_outputs = output_terms.shape
    identity = eye(num_outputs, dtype=output_terms.dtype, device=output_terms.device)
    if isinstance(loss_func, MSELoss):
        return sqrt(2) * identity.expand(num_terms, -1, -1)
    if isinstance(loss_func, CrossEntropyLoss):
        p = output_terms.softmax(-1)
        sqrt_p = p.sqrt()
        S = sqrt_p.unsqueeze(-1) * identity - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        S = scale_by_label_mass(loss_func, S.movedim(0, -2), y_terms)  # [C, T, C]
        return S.movedim(-2, 0)
    p = sigmoid(output_terms)
    return (p * (1 - p)).sqrt().unsqueeze(-1) * identity


def label_mass(loss_func, y_terms: Tensor | None) -> Tensor | None:
    r"""Return the mass :math:`m_t = \sum_c y_{t,c}` of cross-entropy's soft labels.

    The Hessian of a cross-entropy term scales with the mass of its label.

    Args:
        loss_func: The loss function.
        y_terms: Labels in rows (see :func:`loss_terms`), or ``None``.

    Returns:
        Masses ``[T]`` for cross-entropy with (floating point) class probabilities;
        ``None`` otherwise (the mass is one).
    """
    if (
        not isinstance(loss_func, CrossEntropyLoss)
        or y_terms is None
        or not y_terms.is_floating_point()
    ):
        return None
    return y_terms.sum(-1)


def scale_by_label_mass(loss_func, x: Tensor, y_terms: Tensor | None) -> Tensor:
    r"""Scale per-term vectors by :math:`\sqrt{m_t}`, the root of the label mass.

    Square roots of cross-entropy's Hessians and gradients at sampled labels carry
    this factor so that their outer products scale with the mass, as the Hessian
    does.

    Args:
        loss_func: The loss function.
        x: Vectors ``[*, T, C]`` (leading axes, e.g. samples or columns).
        y_terms: Labels in rows (see :func:`loss_terms`), or ``None``.

    Returns:
        ``x`` scaled per term; unchanged unless cross-entropy gets class
        probabilities.

    Raises:
        ValueError: If a term's class probabilities have negative mass: its
            Hessian is negative semi-definite and has no real square root.
    """
    mass = label_mass(loss_func, y_terms)
    if mass is None:
        return x
    if bool((mass < 0).any()):
        raise ValueError(
            "CrossEntropyLoss's class probabilities must have non-negative mass "
            "(sum over classes) for square roots of its Hessian and for sampled "
            f"labels; got a mass of {mass.min().item():.3g}."
        )
    return x * mass.sqrt().to(x.dtype).unsqueeze(-1)


def hessian_matmat(
    loss_func, output: Tensor, M: Tensor, y: Tensor | None = None
) -> Tensor:
    r"""Multiply the mini-batch loss's Hessian w.r.t. the model output onto columns.

    Uses the closed forms :math:`\frac{2}{R}\mathbf{I}` (square loss),
    :math:`\frac{1}{R}(\mathrm{diag}(\mathbf{p}) - \mathbf{p}\mathbf{p}^\top)` per term
    (cross-entropy) and :math:`\frac{1}{R}\mathrm{diag}(\mathbf{p} \odot (1 -
    \mathbf{p}))` (BCE), which are much cheaper than differentiating the loss twice.
    Cross-entropy terms labeled ``ignore_index`` have zero Hessian and do not count
    in :math:`R`; terms labeled with class probabilities of mass :math:`m_t` have
    :math:`m_t` times the Hessian.

    Args:
        loss_func: The loss function.
        output: Model output on the mini-batch (``[B, C, *]`` for cross-entropy,
            else ``[B, *, C]``).
        M: Columns ``[K, *output.shape]``.
        y: Mini-batch labels; only cross-entropy's ignored labels and the mass of
            its class probabilities matter. ``None``: neither.

    Returns:
        The product, ``[K, *output.shape]``.
    """
    output = output.detach()
    is_ce = isinstance(loss_func, CrossEntropyLoss)
    num_outputs = output.shape[1 if is_ce else -1]
    ignored = None if y is None else ignored_terms(loss_func, y)
    num_terms = output.numel() // num_outputs
    scale = 1.0 / reduction_factor(
        loss_func, output.reshape(num_terms, num_outputs), ignored
    )
    if isinstance(loss_func, MSELoss):
        return (2 * scale) * M
    if isinstance(loss_func, BCEWithLogitsLoss):
        p = sigmoid(output)
        return (scale * p * (1 - p)) * M
    p = output.softmax(1)
    if ignored is not None:  # [B, *] -> [B, 1, *]
        p = p.masked_fill(ignored.unsqueeze(1), 0.0)
    pM = p * M
    HM = pM - p * pM.sum(2, keepdim=True)
    if y is not None and y.is_floating_point():  # class probabilities of any mass
        scale = scale * y.sum(1, keepdim=True).to(HM.dtype)
    return scale * HM
