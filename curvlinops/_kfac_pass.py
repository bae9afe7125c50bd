r"""Ingredients of KFAC's pass over the data: layers, rows, vectors, and checks.

For every supported layer, KFAC needs two kinds of *rows*, one per example that
the Kronecker approximation sums over:

- input rows :math:`\mathbf{a}` (Linear inputs, Conv2d patches, with a trailing
  one if the bias joins the weight's block), and
- output-gradient rows :math:`\mathbf{g}` (gradients w.r.t. the layer output of
  the vectors that :func:`backpropagated_vectors` computes in output space),

both arranged as ``[..., B, P, D]`` with batch size ``B`` and ``P`` positions per
data point over which the weight is shared (sequence positions, output pixels).
With ``kfac_approx='reduce'`` the positions are collapsed to ``P = 1`` (inputs
averaged, gradients summed). :func:`record_layers` collects them with forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Generator, Size, Tensor, cat, ones, zeros_like
from torch.nn import Conv2d, Linear, Module
from torch.nn.functional import unfold

from curvlinops._checks import check_integer, check_params_in_model, is_integer
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


def layer_input_rows(
    module: Module,
    x: Tensor,
    batch_size: int,
    kfac_approx: str,
    append_ones: bool,
    name: str = "",
) -> Tensor:
    """Turn a layer's input into the rows of KFAC's input covariance.

    Args:
        module: A ``Linear`` or ``Conv2d`` layer.
        x: The layer's (detached) input.
        batch_size: Batch size ``B``.
        kfac_approx: ``'expand'`` or ``'reduce'``.
        append_ones: Append a one to every row (the bias joins the weight's block).
        name: Layer name for error messages.

    Returns:
        Rows ``[B, P, D_in]`` (``P = 1`` for ``'reduce'``), with ``D_in`` the
        flattened size of one output's weights (plus one if ``append_ones``).
    """
    reduce = kfac_approx == KFACType.REDUCE
    if isinstance(module, Conv2d):
        hyperparameters = (
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
        if reduce:
            rows = extract_averaged_patches(x, *hyperparameters).unsqueeze(1)
        else:
            rows = extract_patches(x, *hyperparameters)
    else:
        rows = _as_positions(x, batch_size, name)
        rows = rows.mean(1, keepdim=True) if reduce else rows
    rows = _as_positions(rows, batch_size, name)
    if append_ones:
        rows = cat(
            [rows, ones(*rows.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1
        )
    return rows


def layer_output_grad_rows(
    module: Module, g: Tensor, batch_size: int, kfac_approx: str, name: str = ""
) -> Tensor:
    """Turn gradients w.r.t. a layer's output into the rows of KFAC's second factor.

    Args:
        module: A ``Linear`` or ``Conv2d`` layer.
        g: Gradients ``[K, *output.shape]`` for ``K`` backpropagated vectors.
        batch_size: Batch size ``B``.
        kfac_approx: ``'expand'`` or ``'reduce'``.
        name: Layer name for error messages.

    Returns:
        Rows ``[K, B, P, D_out]`` (``P = 1`` and summed over positions for
        ``'reduce'``).
    """
    if isinstance(module, Conv2d):  # [K, B, C_out, O1, O2] -> [K, B, O1 * O2, C_out]
        g = g.flatten(start_dim=3).transpose(2, 3)
    rows = _as_positions(g.flatten(end_dim=1), g.shape[0] * batch_size, name)
    rows = rows.unflatten(0, (g.shape[0], batch_size))
    return rows.sum(2, keepdim=True) if kfac_approx == KFACType.REDUCE else rows


@contextmanager
def record_layers(
    model: Module,
    layer_names: list[str],
    on_input: Callable[[str, Module, Tensor], None],
    track_outputs: bool,
) -> Iterator[dict[str, Tensor]]:
    """Hook into layers to observe their inputs and, optionally, output gradients.

    On each forward pass of a hooked layer, ``on_input(name, module, input)``
    receives the detached input. With ``track_outputs``, the layer's output is
    replaced by ``output + probe`` with a zero tensor ``probe`` that requires
    grad; gradients w.r.t. the probes are gradients w.r.t. the layer outputs, even
    if later operations modify the output in place.

    Args:
        model: The neural network.
        layer_names: Names of the layers to hook.
        on_input: Callback for the layers' inputs.
        track_outputs: Whether to create the probes.

    Yields:
        A dictionary that the forward pass fills with the probes, by layer name.

    Raises:
        NotImplementedError: If a layer is called more than once per forward pass.
    """
    probes: dict[str, Tensor] = {}
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module: Module, args: tuple, output: Tensor):
            if name in seen:
                raise NotImplementedError(
                    f"Layer {name!r} ran twice in one forward pass; KFAC supports "
                    "each layer only once per forward pass."
                )
            seen.add(name)
            on_input(name, module, args[0].detach())
            if track_outputs:
                probes[name] = zeros_like(output, requires_grad=True)
                return output + probes[name]
            return None

        return hook

    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(make_hook(name)) for name in layer_names
    ]
    try:
        yield probes
    finally:
        for handle in handles:
            handle.remove()


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
    module: Module, x: Tensor, batch_size: int, append_ones: bool, name: str = ""
) -> Tensor:
    r"""Turn a layer's input into the rows of its per-datum weight gradients.

    The weight gradient of datum :math:`n` is :math:`\sum_p \mathbf{g}_{n,p}
    \mathbf{a}_{n,p}^\top` over all positions :math:`p`, whatever ``kfac_approx``
    says, with the rows :math:`\mathbf{a}_{n,p}` of ``'expand'``, except that a
    grouped convolution's output channels see their own group's patches.
    Convolution patches may come as a strided view (no copy beyond the unfolding).

    Args:
        module: A ``Linear`` or ``Conv2d`` layer.
        x: The layer's (detached) input.
        batch_size: Batch size ``B``.
        append_ones: Append a one to every row (the bias joins the weight's block).
        name: Layer name for error messages.

    Returns:
        Rows ``[B, P, D_in]``; for a convolution with ``groups > 1``, rows
        ``[B, groups, P, D_in]`` of each group's patches.
    """
    if isinstance(module, Conv2d):
        rows = _patches_per_group(module, x, batch_size)
    else:
        rows = layer_input_rows(
            module, x, batch_size, KFACType.EXPAND, append_ones=False, name=name
        )
    if append_ones:
        rows = cat(
            [rows, ones(*rows.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1
        )
    return rows


def _patches_per_group(module: Conv2d, x: Tensor, batch_size: int) -> Tensor:
    """Unfold a convolution's input into the patches of each channel group.

    Args:
        module: The convolution.
        x: Its input ``[B, C_in, I1, I2]``.
        batch_size: Batch size ``B``.

    Returns:
        Patches ``[B, P, C_in * K1 * K2]`` (one group), else ``[B, groups, P,
        C_in / groups * K1 * K2]``, flattened in the order ``(c, k1, k2)``.
    """
    groups, hyperparameters = module.groups, (module.kernel_size, module.stride)
    x = x.unflatten(1, (groups, -1)).flatten(end_dim=1)  # [B * groups, C / groups, ...]
    x = _pad(x, *hyperparameters, module.padding, module.dilation)
    patches = unfold(x, module.kernel_size, module.dilation, stride=module.stride)
    patches = patches.transpose(1, 2)  # [B * groups, P, D_in], a strided view
    return patches.unflatten(0, (batch_size, groups)) if groups > 1 else patches
