r"""Ingredients of KFAC's pass over the data: layers, rows, vectors, and checks.

For every supported layer, KFAC needs two kinds of *rows*, one per example that
the Kronecker approximation sums over:

- input rows :math:`\mathbf{a}` (Linear inputs, Conv2d patches, with a trailing
  one if the bias joins the weight's block), and
- output-gradient rows :math:`\mathbf{g}` (gradients w.r.t. the layer output of
  the vectors that :func:`backpropagated_vectors` computes in output space),

both arranged as ``[..., B, P, D]`` with batch size ``B`` and ``P`` positions per
data point over which the weight is shared (sequence positions, output pixels, and
the positions of every further use of the layer in the same forward pass, see
:func:`input_rows`). With ``kfac_approx='reduce'`` the positions are collapsed to
``P = 1`` (inputs averaged, gradients summed). The uses themselves are recorded by
:class:`curvlinops._kfac_uses.LayerUses`.
"""

from __future__ import annotations

from typing import Any

from torch import Generator, Size, Tensor, cat, ones
from torch.nn import Conv2d, Linear, Module
from torch.nn.functional import unfold
from torch.nn.modules.utils import _pair

from curvlinops._checks import check_integer, check_params_in_model, is_integer
from curvlinops._kfac_calls import CONV2D, Use
from curvlinops._losses import (
    SUPPORTED_LOSSES,
    check_loss_options,
    hessian_sqrt,
    loss_terms,
    output_rows,
    sample_labels,
    scale_by_label_mass,
    term_gradients,
)
from curvlinops.kfac_utils import (
    FisherType,
    KFACType,
    _pad,
    extract_averaged_patches,
    extract_patches,
)

SUPPORTED_MODULES = (Linear, Conv2d)
LOSS_AVERAGES = (None, "batch", "batch+sequence")
_ROLES = {"weight": "W", "bias": "b"}  # role -> key in the canonical blocks


def supported_layer_mapping(
    model: Module, params: list[Tensor]
) -> dict[str, dict[str, int]]:
    """Find the layer of every parameter and check KFAC supports it.

    Args:
        model: The neural network.
        params: Parameters of the model.

    Returns:
        Names of the layers that hold parameters, mapped to dictionaries from role
        (``'weight'``, ``'bias'``, in this order) to the parameter's position in
        ``params``, e.g. ``{'0': {'weight': 0, 'bias': 1}}``. Layers follow the
        order of ``model.named_modules()``.

    Raises:
        TypeError: If ``model`` is not a ``torch.nn.Module``.
        NotImplementedError: If a parameter lives in an unsupported layer or is
            shared by several layers.
        ValueError: If a parameter is not part of the model or listed twice.
    """
    if not isinstance(model, Module):
        raise TypeError(
            f"KFAC needs the model as torch.nn.Module, got {type(model).__name__}."
        )
    position = {id(p): idx for idx, p in enumerate(params)}
    if len(position) != len(params):
        raise ValueError("`params` contains a parameter more than once.")
    check_params_in_model(model, params)
    mapping, owner = {}, {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in position:
                continue
            _check_supported(module, module_name, param_name, owner.get(id(param)))
            owner[id(param)] = module_name
            mapping.setdefault(module_name, {})[param_name] = position[id(param)]
    return {
        layer: {role: roles[role] for role in _ROLES if role in roles}
        for layer, roles in mapping.items()
    }


def _check_supported(module: Module, name: str, param_name: str, other: str | None):
    """Verify that a parameter's layer is supported and the parameter not shared.

    Args:
        module: Layer that holds the parameter.
        name: The layer's name.
        param_name: The parameter's name inside the layer.
        other: Name of another layer that holds the same parameter, if any.

    Raises:
        NotImplementedError: If the layer or parameter is not supported.
    """
    supported = isinstance(module, SUPPORTED_MODULES) and param_name in _ROLES
    if not supported:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODULES)
        raise NotImplementedError(
            f"KFAC supports the weights and biases of {names} layers, but parameter "
            f"{param_name!r} lives in layer {name!r} ({type(module).__name__}). Pass "
            "only parameters of supported layers."
        )
    if isinstance(module, Conv2d) and module.padding_mode != "zeros":
        raise NotImplementedError(
            f"KFAC supports Conv2d only with padding_mode='zeros', got "
            f"{module.padding_mode!r} in layer {name!r}."
        )
    if other is not None:
        raise NotImplementedError(
            f"KFAC does not support parameters shared by layers {other!r} and {name!r}."
        )


def _as_positions(x: Tensor, batch_size: int, name: str) -> Tensor:
    """Reshape a layer tensor with features last into ``[B, P, D]``.

    Args:
        x: Tensor ``[B, *, D]`` (batch axis first).
        batch_size: Batch size ``B``.
        name: Layer name for the error message.

    Returns:
        View of shape ``[B, P, D]``.

    Raises:
        ValueError: If the tensor's size is not a multiple of ``B * D``.
    """
    if x.ndim < 2 or x.numel() % (batch_size * x.shape[-1]) != 0:
        raise ValueError(
            f"Layer {name!r} processes a tensor of shape {list(x.shape)}; expected "
            f"the batch axis (size {batch_size}) first and features last."
        )
    return x.reshape(batch_size, -1, x.shape[-1])


def num_positions(use: Use, batch_size: int) -> int:
    """Return the number of positions per data point of a use's output.

    Args:
        use: A use of a layer.
        batch_size: Batch size ``B``.

    Returns:
        Sequence positions or output pixels (``1`` for plain vectors).
    """
    features = use.out_shape[1 if use.kind == CONV2D else -1]
    return use.out_shape.numel() // (batch_size * features)


def _use_input_rows(use: Use, batch_size: int, reduce: bool, name: str) -> Tensor:
    """Turn one use's input into rows (averaged over positions for ``reduce``).

    Args:
        use: A use of a layer.
        batch_size: Batch size ``B``.
        reduce: Whether to average over positions.
        name: Layer name for error messages.

    Returns:
        Rows ``[B, P_u, D_in]`` (``P_u = 1`` for ``reduce``).
    """
    if use.kind == CONV2D:
        if reduce:
            rows = extract_averaged_patches(use.x, *use.conv).unsqueeze(1)
        else:
            rows = extract_patches(use.x, *use.conv)
    else:
        rows = _as_positions(use.x, batch_size, name)
        rows = rows.mean(1, keepdim=True) if reduce else rows
    return _as_positions(rows, batch_size, name)


def input_rows(
    uses: list[Use],
    batch_size: int,
    kfac_approx: str,
    append_ones: bool,
    name: str = "",
) -> Tensor:
    r"""Turn a layer's inputs in all its uses into the rows of KFAC's input factor.

    The uses of a layer in one forward pass add to its shared axis: a use
    :math:`u` with :math:`P_u` positions per data point (sequence positions, output
    pixels; one for plain vectors) contributes :math:`P_u` rows to each data point,
    :math:`R = \sum_u P_u` in total. ``'expand'`` keeps all :math:`R` rows;
    ``'reduce'`` averages them, :math:`\hat{\mathbf{a}}_n = \frac{1}{R} \sum_{u, p}
    \mathbf{a}_{n,u,p}`. Calling a layer once on ``[B, R, D]`` or :math:`R` times on
    ``[B, D]`` slices gives the same rows.

    Args:
        uses: The layer's uses in the forward pass, in call order.
        batch_size: Batch size ``B``.
        kfac_approx: ``'expand'`` or ``'reduce'``.
        append_ones: Append a one to every row (the bias joins the weight's block).
        name: Layer name for error messages.

    Returns:
        Rows ``[B, R, D_in]`` (``R = 1`` for ``'reduce'``), with ``D_in`` the
        flattened size of one output's weights (plus one if ``append_ones``).
    """
    reduce = kfac_approx == KFACType.REDUCE
    rows = [_use_input_rows(use, batch_size, reduce, name) for use in uses]
    if len(rows) > 1 and reduce:
        counts = [num_positions(use, batch_size) for use in uses]
        rows = [sum(r * (count / sum(counts)) for r, count in zip(rows, counts))]
    rows = rows[0] if len(rows) == 1 else cat(rows, dim=1)
    if append_ones:
        rows = cat(
            [rows, ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)], -1
        )
    return rows


def output_grad_rows(
    uses: list[Use],
    grads: list[Tensor],
    batch_size: int,
    kfac_approx: str,
    name: str = "",
) -> Tensor:
    r"""Turn gradients w.r.t. a layer's outputs in all uses into KFAC's rows.

    As for the inputs (:func:`input_rows`), the uses add to the shared axis:
    ``'expand'`` keeps the :math:`R = \sum_u P_u` rows of every data point,
    ``'reduce'`` sums them, :math:`\hat{\mathbf{g}}_{n,k} = \sum_{u, p}
    \mathbf{g}_{n,u,p,k}`.

    Args:
        uses: The layer's uses, in call order.
        grads: Per use, gradients ``[K, *output.shape]`` for ``K`` vectors.
        batch_size: Batch size ``B``.
        kfac_approx: ``'expand'`` or ``'reduce'``.
        name: Layer name for error messages.

    Returns:
        Rows ``[K, B, R, D_out]`` (``R = 1`` for ``'reduce'``).
    """
    reduce = kfac_approx == KFACType.REDUCE
    rows = []
    for use, g in zip(uses, grads):
        if use.kind == CONV2D:  # [K, B, C_out, O1, O2] -> [K, B, O1 * O2, C_out]
            g = g.flatten(start_dim=3).transpose(2, 3)
        r = _as_positions(g.flatten(end_dim=1), g.shape[0] * batch_size, name)
        r = r.unflatten(0, (g.shape[0], batch_size))
        rows.append(r.sum(2, keepdim=True) if reduce else r)
    if len(rows) == 1:
        return rows[0]
    return sum(rows[1:], rows[0]) if reduce else cat(rows, dim=2)


def canonical_groups(
    mapping: dict[str, dict[str, int]],
    params: list[Tensor],
    joint_layers: list[str],
) -> tuple[list[tuple[str, str]], dict[str, Size], list[dict[str, str]]]:
    """Group the parameters into KFAC's blocks (see ``kfac_utils``' canonical form).

    Args:
        mapping: Layer names mapped to their parameters' roles and positions.
        params: The parameters, in the order of the parameter-list format.
        joint_layers: Layers whose weight and bias share one block.

    Returns:
        One key ``(layer, 'W' | 'b' | 'Wb')`` per block, the parameters' shapes
        keyed by their names in the model (in the order of ``params``), and the
        blocks' groups that map ``'W'`` and ``'b'`` to these names.
    """
    names = {
        position: f"{layer}.{role}" if layer else role
        for layer, roles in mapping.items()
        for role, position in roles.items()
    }
    keys, groups = [], []
    for layer, roles in mapping.items():
        group = {_ROLES[role]: names[position] for role, position in roles.items()}
        for block in (
            [group] if layer in joint_layers else [{r: n} for r, n in group.items()]
        ):
            keys.append((layer, "".join(block)))
            groups.append(block)
    return keys, {names[idx]: p.shape for idx, p in enumerate(params)}, groups


def terms_per_datum(
    loss_func, output: Tensor, batch_size: int, expected: int | None
) -> int:
    """Count the loss terms of every data point in a mini-batch.

    Args:
        loss_func: The loss function.
        output: Model output on the mini-batch (``[B, C, *]`` for cross-entropy,
            else ``[B, *, C]`` or ``[B]``).
        batch_size: Number of data points in the mini-batch.
        expected: Expected number of loss terms per data point, or ``None``.

    Returns:
        The number of loss terms per data point.

    Raises:
        ValueError: If the loss terms do not split evenly over the data points,
            or their number per data point differs from ``expected``.
    """
    num_terms = output_rows(loss_func, output).shape[0]
    per_datum, remainder = divmod(num_terms, batch_size)
    if remainder != 0 or (expected is not None and per_datum != expected):
        raise ValueError(
            f"A mini-batch of {batch_size} data points has {num_terms} loss terms; "
            f"expected {expected or 'the same number'} per data point "
            "(`num_per_example_loss_terms`)."
        )
    return per_datum


def backpropagated_vectors(
    loss_func,
    fisher_type: FisherType,
    output: Tensor,
    y: Tensor,
    mc_samples: int,
    generator: Generator | None,
) -> tuple[Tensor, Tensor]:
    r"""Compute the output-space vectors whose backpropagation gives KFAC's gradients.

    The vectors are un-scaled: for each loss term :math:`\ell_t` with output
    :math:`\mathbf{f}_t`, the columns of :math:`\mathbf{S}_t` (``'type-2'``), the
    gradients :math:`\nabla_{\mathbf{f}_t} \ell_t` at sampled labels (``'mc'``) or
    at the true labels (``'empirical'``).

    Args:
        loss_func: The loss function.
        fisher_type: ``'type-2'``, ``'mc'`` or ``'empirical'``.
        output: Model output on the mini-batch.
        y: Mini-batch labels.
        mc_samples: Number of sampled labels per term for ``'mc'``.
        generator: Random number generator for the label sampling.

    Returns:
        The outputs in loss-term rows ``[T, C]`` (attached to the graph) and ``K``
        vectors ``[K, T, C]`` to backpropagate from them.
    """
    output_terms, y_terms = loss_terms(loss_func, output, y)
    f = output_terms.detach()
    if fisher_type == FisherType.TYPE2:
        return output_terms, hessian_sqrt(loss_func, f, y_terms).permute(2, 0, 1)
    if fisher_type == FisherType.MC:
        labels = sample_labels(loss_func, f, mc_samples, generator)
        gradients = term_gradients(loss_func, f, labels)
        return output_terms, scale_by_label_mass(loss_func, gradients, y_terms)
    return output_terms, term_gradients(loss_func, f, y_terms).unsqueeze(0)


def check_kfac_arguments(
    loss_func,
    hyperparameters: dict[str, Any],
    supported: dict[str, tuple] | None = None,
):
    """Verify KFAC's hyperparameters and their consistency with the loss function.

    Args:
        loss_func: The loss function.
        hyperparameters: Values of ``fisher_type``, ``mc_samples``,
            ``kfac_approx``, ``loss_average`` and ``num_per_example_loss_terms``
            (further entries are ignored).
        supported: The allowed values of ``fisher_type`` and ``kfac_approx``;
            default: all members of :class:`FisherType` and :class:`KFACType`.

    Raises:
        ValueError: If a value is invalid or inconsistent (see the messages).
        NotImplementedError: If the loss sets weights, ``pos_weight`` or label
            smoothing.
    """
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise ValueError(f"KFAC supports {names}; got {type(loss_func).__name__}.")
    check_loss_options(loss_func, "KFAC")
    supported = {"fisher_type": tuple(FisherType), "kfac_approx": tuple(KFACType)} | (
        supported or {}
    )
    for name, allowed in supported.items():
        if hyperparameters[name] not in allowed:
            raise ValueError(
                f"`{name}` must be one of {[e.value for e in allowed]}, got "
                f"{hyperparameters[name]!r}."
            )
    loss_average = hyperparameters["loss_average"]
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(
            f"`loss_average` must be in {LOSS_AVERAGES}, got {loss_average!r}."
        )
    if loss_average is not None and loss_func.reduction == "sum":
        raise ValueError(
            f"`loss_average={loss_average!r}` averages, but the loss's reduction is "
            "'sum'; use `loss_average=None` (the default: follow the reduction)."
        )
    _check_counts(hyperparameters)


def _check_counts(hyperparameters: dict[str, Any]):
    """Verify ``mc_samples`` and ``num_per_example_loss_terms``.

    Args:
        hyperparameters: KFAC's hyperparameters.

    Raises:
        ValueError: If a count is not a positive integer, ``seed`` not an integer,
            or ``mc_samples`` is not 1 for a ``fisher_type`` other than ``'mc'``.
    """
    for name in ("mc_samples", "num_per_example_loss_terms"):
        value = hyperparameters[name]
        if (value is not None or name == "mc_samples") and (
            not is_integer(value) or value < 1
        ):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        hyperparameters[name] = None if value is None else int(value)
    hyperparameters["seed"] = check_integer(hyperparameters["seed"], "seed")
    fisher_type, mc_samples = (
        hyperparameters["fisher_type"],
        hyperparameters["mc_samples"],
    )
    if FisherType(fisher_type) != FisherType.MC and mc_samples != 1:
        raise ValueError(
            f"`mc_samples` must be 1 for fisher_type={fisher_type!r}, got {mc_samples}."
        )


def per_datum_input_rows(
    uses: list[Use], batch_size: int, append_ones: bool, name: str = ""
) -> Tensor:
    r"""Turn a layer's inputs in all its uses into the rows of per-datum gradients.

    The weight gradient of datum :math:`n` is :math:`\sum_{u, p} \mathbf{g}_{n,u,p}
    \mathbf{a}_{n,u,p}^\top` over all positions :math:`p` of all uses :math:`u`,
    whatever ``kfac_approx`` says, with the rows :math:`\mathbf{a}_{n,u,p}` of
    ``'expand'`` (aligned with :func:`output_grad_rows`), except that a grouped
    convolution's output channels see their own group's patches. Convolution
    patches of a single use may come as a strided view (no copy beyond the
    unfolding).

    Args:
        uses: The layer's uses in the forward pass, in call order.
        batch_size: Batch size ``B``.
        append_ones: Append a one to every row (the bias joins the weight's block).
        name: Layer name for error messages.

    Returns:
        Rows ``[B, R, D_in]``; for convolutions with ``groups > 1``, rows
        ``[B, groups, R, D_in]`` of each group's patches.

    Raises:
        NotImplementedError: If the uses of a convolution's weight have different
            numbers of channel groups.
    """
    if uses[0].kind == CONV2D:
        if len({use.conv[-1] for use in uses}) > 1:
            raise NotImplementedError(
                f"Layer {name!r} is used as a convolution with different numbers of "
                "channel groups; per-datum gradients need the same groups in all "
                "uses."
            )
        rows = [_patches_per_group(use.x, use.conv, batch_size) for use in uses]
    else:
        rows = [_use_input_rows(use, batch_size, False, name) for use in uses]
    rows = rows[0] if len(rows) == 1 else cat(rows, dim=-2)
    if append_ones:
        rows = cat(
            [rows, ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)], -1
        )
    return rows


def _patches_per_group(x: Tensor, conv: tuple, batch_size: int) -> Tensor:
    """Unfold a convolution's input into the patches of each channel group.

    Args:
        x: The convolution's input ``[B, C_in, I1, I2]``.
        conv: ``(kernel_size, stride, padding, dilation, groups)`` (see
            :class:`~curvlinops._kfac_calls.Use`).
        batch_size: Batch size ``B``.

    Returns:
        Patches ``[B, P, C_in * K1 * K2]`` (one group), else ``[B, groups, P,
        C_in / groups * K1 * K2]``, flattened in the order ``(c, k1, k2)``.
    """
    kernel_size, stride, padding, dilation, groups = conv
    kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
    x = x.unflatten(1, (groups, -1)).flatten(end_dim=1)  # [B * groups, C / groups, ...]
    x = _pad(x, kernel_size, stride, padding, dilation)
    patches = unfold(x, kernel_size, dilation, stride=stride)
    patches = patches.transpose(1, 2)  # [B * groups, P, D_in], a strided view
    return patches.unflatten(0, (batch_size, groups)) if groups > 1 else patches
