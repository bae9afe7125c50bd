r"""Helpers for KFAC: option enums, loss Hessian roots, Conv2d patches, canonical form.

KFAC and EKFAC treat each supported layer's weight :math:`\mathbf{W} \in
\mathbb{R}^{D_\text{out} \times D_\text{in}}` (a Conv2d kernel flattened over its
input channels and kernel positions) and bias :math:`\mathbf{b} \in
\mathbb{R}^{D_\text{out}}` as one matrix :math:`(\mathbf{W}\ \mathbf{b}) \in
\mathbb{R}^{D_\text{out} \times (D_\text{in} + 1)}`, or as two blocks. Their
row-major flattening is the *canonical form*, on which a Kronecker factor pair
:math:`\mathbf{G} \otimes \mathbf{A}` acts as
:math:`(\mathbf{W}\ \mathbf{b}) \mapsto \mathbf{G} (\mathbf{W}\ \mathbf{b})
\mathbf{A}`. :class:`ToCanonicalLinearOperator` and
:class:`FromCanonicalLinearOperator` translate between the parameter-list format and
this form.

The enums :class:`FisherType` and :class:`KFACType` (with metaclass
:class:`MetaEnum`) are defined here and also importable from ``curvlinops`` and
``curvlinops.kfac``, whose name they carry (``__module__``), so that pickled KFAC
state dicts name them as curvlinops 3.x does.
"""

from __future__ import annotations

from enum import Enum, EnumMeta
from math import sqrt

from einconv import index_pattern
from einconv.utils import get_conv_paddings
from torch import Size, Tensor, cat, einsum, serialization
from torch import device as torch_device
from torch import dtype as torch_dtype
from torch.nn.functional import pad
from torch.nn.modules.utils import _pair

from curvlinops._losses import (
    SUPPORTED_LOSSES,
    check_loss_options,
    check_no_ignored_labels,
    check_output_and_labels,
    hessian_sqrt,
    loss_terms,
    reduction_factor,
)
from curvlinops._torch_base import PyTorchLinearOperator


class MetaEnum(EnumMeta):
    """Enum metaclass whose ``in`` operator also accepts the members' values.

    Example:
        >>> from enum import Enum
        >>> class Color(str, Enum, metaclass=MetaEnum):
        ...     RED = "red"
        >>> "red" in Color, Color.RED in Color, "blue" in Color
        (True, True, False)
    """

    def __contains__(cls, value) -> bool:
        """Return whether ``value`` is a member or the value of a member.

        Args:
            value: Candidate member or value, e.g. a string.

        Returns:
            Whether ``cls(value)`` succeeds.
        """
        try:
            cls(value)
        except (ValueError, TypeError):
            return False
        return True


class FisherType(str, Enum, metaclass=MetaEnum):
    """Which curvature KFAC's gradient covariance approximates.

    Example:
        >>> "mc" in FisherType, "foo" in FisherType
        (True, False)
        >>> FisherType("type-2") is FisherType.TYPE2
        True

    Attributes:
        TYPE2: ``'type-2'``: exact square roots of the loss Hessian w.r.t. the model
            output are backpropagated, one backward pass per output dimension (the
            number of classes for classification). Approximates the GGN.
        MC: ``'mc'``: gradients of ``mc_samples`` labels drawn from the model's
            predictive distribution are backpropagated (Monte-Carlo Fisher).
        EMPIRICAL: ``'empirical'``: gradients at the true labels are backpropagated
            (uncentered gradient covariance, the empirical Fisher).
        FORWARD_ONLY: ``'forward-only'``: no backward pass; the gradient covariance
            is the identity, as in FOOF (`Benzing, 2022
            <https://arxiv.org/abs/2201.12250>`_) and ISAAC (`Petersen et al., 2023
            <https://arxiv.org/abs/2305.00604>`_).
    """

    __module__ = "curvlinops.kfac"  # pickles name the class as curvlinops 3.x does

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum, metaclass=MetaEnum):
    """How KFAC treats layers whose weights are shared over extra input axes.

    Both variants are defined in `Eschenhagen et al., 2023
    <https://arxiv.org/abs/2311.00636>`_: Linear layers on sequences, or Conv2d
    layers, which share their weight over output positions.

    Example:
        >>> "reduce" in KFACType, KFACType.EXPAND.value
        (True, 'expand')

    Attributes:
        EXPAND: ``'expand'``: every position is an independent example.
        REDUCE: ``'reduce'``: inputs are averaged and output gradients summed over
            the positions of each data point before forming the factors.
    """

    __module__ = "curvlinops.kfac"  # pickles name the class as curvlinops 3.x does

    EXPAND = "expand"
    REDUCE = "reduce"


# KFAC state dicts hold these enums; let ``torch.load`` (``weights_only=True``) rebuild
# them. The registration exists since torch 2.4.
if hasattr(serialization, "add_safe_globals"):
    serialization.add_safe_globals([FisherType, KFACType])


def loss_hessian_matrix_sqrt(
    output_one_datum: Tensor, target_one_datum: Tensor, loss_func
) -> Tensor:
    r"""Factorize the loss Hessian w.r.t. the output of one datum into a square root.

    For a datum with model output :math:`\mathbf{f} \in \mathbb{R}^C` and label
    :math:`\mathbf{y}`, returns :math:`\mathbf{S} \in \mathbb{R}^{C \times C}` with

    .. math::
        \mathbf{S} \mathbf{S}^\top = \nabla^2_{\mathbf{f}}
        \ell(\mathbf{f}, \mathbf{y}),

    where :math:`\ell` is ``loss_func`` with its reduction (``'mean'`` divides the
    square loss and BCE by :math:`C`). The closed forms are :math:`\sqrt{2 / R}\,
    \mathbf{I}` (square loss), :math:`\sqrt{m}\,(\mathrm{diag}(\sqrt{\mathbf{p}}) -
    \mathbf{p} \sqrt{\mathbf{p}}^\top)` with :math:`\mathbf{p} =
    \mathrm{softmax}(\mathbf{f})` and label mass :math:`m = \sum_c y_c` (:math:`m =
    1` for a class index; cross-entropy) and :math:`\mathrm{diag}(\sqrt{\mathbf{p}
    (1 - \mathbf{p}) / R})` with :math:`\mathbf{p} = \sigma(\mathbf{f})` (BCE),
    :math:`R` being :math:`C` for ``reduction='mean'`` and 1 otherwise. These are
    the vectors that type-2 KFAC backpropagates.

    Args:
        output_one_datum: Model output of one datum, ``[1, C]`` or ``[C]``.
        target_one_datum: Its label: a class index (``[1]`` or ``[]``) or class
            probabilities (cross-entropy), else of the output's shape.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.

    Returns:
        The square root :math:`\mathbf{S}`, ``[C, C]``.

    Raises:
        ValueError: If the loss is not supported or the output is not that of one
            datum.
        NotImplementedError: If the loss sets weights, ``pos_weight``, label
            smoothing, or the label is cross-entropy's ``ignore_index``.

    Example:
        >>> from torch import allclose, manual_seed, rand, tensor
        >>> from torch.func import hessian
        >>> from torch.nn import CrossEntropyLoss
        >>> _ = manual_seed(0)
        >>> f, y, loss_func = rand(1, 4), tensor([2]), CrossEntropyLoss()
        >>> S = loss_hessian_matrix_sqrt(f, y, loss_func)
        >>> H = hessian(lambda f: loss_func(f, y))(f).reshape(4, 4)
        >>> allclose(S @ S.T, H, atol=1e-7)
        True
    """
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise ValueError(f"Supported losses: {names}; got {type(loss_func).__name__}.")
    check_loss_options(loss_func, "loss_hessian_matrix_sqrt")
    output, target = output_one_datum.detach(), target_one_datum
    if output.ndim == 1:  # the loss functions' layout without batch axis
        output, target = output.unsqueeze(0), target.unsqueeze(0)
    if output.ndim != 2 or len(output) != 1:
        raise ValueError(
            "Expected the output of one datum, of shape [1, C] or [C], got "
            f"{list(output_one_datum.shape)}."
        )
    check_output_and_labels(loss_func, output, target)
    check_no_ignored_labels(loss_func, target, "loss_hessian_matrix_sqrt")
    output_terms, target_terms = loss_terms(loss_func, output, target)
    S = hessian_sqrt(loss_func, output_terms, target_terms)[0]
    return S / sqrt(reduction_factor(loss_func, output_terms))


def _average_channel_groups(x: Tensor, groups: int) -> Tensor:
    """Average a convolution input over its channel groups.

    Args:
        x: Input of shape ``[B, C_in, I1, I2]``.
        groups: Number of channel groups, a divisor of ``C_in``.

    Returns:
        Tensor of shape ``[B, C_in // groups, I1, I2]``.
    """
    if groups == 1:
        return x
    batch_size, channels, *spatial = x.shape
    return x.reshape(batch_size, groups, channels // groups, *spatial).mean(1)


def _pad(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | int | str,
    dilation: tuple[int, int],
) -> Tensor:
    """Zero-pad a convolution input explicitly (string paddings maybe unequally).

    Args:
        x: Input of shape ``[B, C, I1, I2]``.
        kernel_size: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        padding: Padding as integer(s) or ``'same'``/``'valid'``.
        dilation: Dilation per spatial dimension.

    Returns:
        The padded input.
    """
    paddings = (padding, padding) if isinstance(padding, str) else _pair(padding)
    (top, bottom), (left, right) = [
        get_conv_paddings(k, s, p, d)
        for k, s, p, d in zip(kernel_size, stride, paddings, dilation)
    ]
    return pad(x, (left, right, top, bottom))


def extract_patches(
    x: Tensor,
    kernel_size: tuple[int, int] | int,
    stride: tuple[int, int] | int,
    padding: tuple[int, int] | int | str,
    dilation: tuple[int, int] | int,
    groups: int,
) -> Tensor:
    r"""Extract the input patches a 2d convolution multiplies with its kernel.

    A convolution with ``groups=1`` computes ``out[b, :, o] = W_flat @ patches[b,
    o]`` with ``W_flat = weight.flatten(start_dim=1)``. For ``groups > 1`` the
    patches are averaged over the channel groups, so they have the size of one
    group's flattened kernel (KFAC's input factor for grouped convolutions).

    Args:
        x: Convolution input of shape ``[B, C_in, I1, I2]``.
        kernel_size: Kernel size, an integer or a pair.
        stride: Stride, an integer or a pair.
        padding: Padding, an integer, a pair, ``'valid'`` or ``'same'`` (also with
            unequal padding on both sides, as PyTorch does for even kernels).
        dilation: Dilation, an integer or a pair.
        groups: Number of channel groups.

    Returns:
        Patches of shape ``[B, O1 * O2, C_in // groups * K1 * K2]``; entry
        ``[b, o, :]`` is the patch of sample ``b`` at output location ``o``
        (row-major over ``(o1, o2)``), flattened in the order ``(c, k1, k2)``.

    Example:
        >>> from torch import allclose, manual_seed, rand
        >>> from torch.nn.functional import conv2d
        >>> _ = manual_seed(0)
        >>> x, weight = rand(2, 3, 5, 5), rand(4, 3, 3, 3)
        >>> patches = extract_patches(x, 3, 2, 1, 1, 1)
        >>> patches.shape
        torch.Size([2, 9, 27])
        >>> out = (patches @ weight.flatten(start_dim=1).T).transpose(1, 2)
        >>> allclose(out.reshape(2, 4, 3, 3), conv2d(x, weight, stride=2, padding=1))
        True
    """
    (k1, k2), (s1, s2), (d1, d2) = _pair(kernel_size), _pair(stride), _pair(dilation)
    x = _average_channel_groups(x, groups)
    x = _pad(x, (k1, k2), (s1, s2), padding, (d1, d2))
    # strided views [B, C, O1, O2, K1, K2] of the dilated windows, then one copy
    windows = x.unfold(2, d1 * (k1 - 1) + 1, s1).unfold(3, d2 * (k2 - 1) + 1, s2)
    windows = windows[..., ::d1, ::d2]
    batch_size, channels, out1, out2 = windows.shape[:4]
    patches = windows.permute(0, 2, 3, 1, 4, 5)
    return patches.reshape(batch_size, out1 * out2, channels * k1 * k2)


def extract_averaged_patches(
    x: Tensor,
    kernel_size: tuple[int, int] | int,
    stride: tuple[int, int] | int,
    padding: tuple[int, int] | int | str,
    dilation: tuple[int, int] | int,
    groups: int,
) -> Tensor:
    r"""Average a 2d convolution's input patches over output locations, cheaply.

    Equals ``extract_patches(...).mean(1)``, but never unfolds the input: each
    spatial dimension's connectivity pattern (an index tensor :math:`\Pi \in
    \{0, 1\}^{K \times O \times I}`, see `Dangel, 2023
    <https://arxiv.org/abs/2307.02275>`_, computed by :mod:`einconv`) is averaged
    over the output locations and contracted with the input.

    Args:
        x: Convolution input of shape ``[B, C_in, I1, I2]``.
        kernel_size: Kernel size, an integer or a pair.
        stride: Stride, an integer or a pair.
        padding: Padding, an integer, a pair, ``'valid'`` or ``'same'``.
        dilation: Dilation, an integer or a pair.
        groups: Number of channel groups (the patches are averaged over them).

    Returns:
        Averaged patches of shape ``[B, C_in // groups * K1 * K2]``.

    Example:
        >>> from torch import allclose, manual_seed, rand
        >>> _ = manual_seed(0)
        >>> x = rand(2, 4, 6, 6)
        >>> averaged = extract_averaged_patches(x, 3, 1, "same", 2, 2)
        >>> averaged.shape
        torch.Size([2, 18])
        >>> allclose(averaged, extract_patches(x, 3, 1, "same", 2, 2).mean(1))
        True
    """
    x = _average_channel_groups(x, groups)
    paddings = (padding, padding) if isinstance(padding, str) else _pair(padding)
    patterns = [
        index_pattern(
            i, k, stride=s, padding=p, dilation=d, dtype=x.dtype, device=x.device
        ).mean(1)
        for i, k, s, p, d in zip(
            x.shape[2:], _pair(kernel_size), _pair(stride), paddings, _pair(dilation)
        )
    ]
    return einsum("bcij,ki,lj->bckl", x, *patterns).flatten(start_dim=1)


class _CanonicalFormLinearOperator(PyTorchLinearOperator):
    """Common set-up of the two converters between parameter and canonical form."""

    def __init__(
        self,
        param_shapes: dict[str, Size | tuple[int, ...]],
        param_groups: list[dict[str, str]],
        device: torch_device,
        dtype: torch_dtype,
    ):
        """Store the parameter shapes and their grouping into KFAC blocks.

        Args:
            param_shapes: Parameter names mapped to their shapes, in the order of
                the parameter-list format.
            param_groups: One dictionary per canonical block that maps roles to
                parameter names: ``{'W': w, 'b': b}`` (weight and bias form one
                block), ``{'W': w}`` or ``{'b': b}``. Every parameter belongs to
                exactly one group.
            device: Device of the tensors.
            dtype: Dtype of the tensors.
        """
        self._param_shapes = {name: Size(s) for name, s in param_shapes.items()}
        self._param_groups = [dict(group) for group in param_groups]
        _check_param_groups(self._param_shapes, self._param_groups)
        self._position = {name: idx for idx, name in enumerate(self._param_shapes)}
        parameter_format = list(self._param_shapes.values())
        canonical_format = [
            Size([sum(self._param_shapes[n].numel() for n in group.values())])
            for group in self._param_groups
        ]
        in_shape, out_shape = self._domain_and_range(parameter_format, canonical_format)
        super().__init__(in_shape, out_shape, device, dtype)

    def _domain_and_range(self, parameter_format, canonical_format):
        """Order the two formats into domain and range.

        Args:
            parameter_format: Shapes of the parameter-list format.
            canonical_format: Shapes of the canonical blocks.

        Raises:
            NotImplementedError: Must be implemented by the subclass.
        """
        raise NotImplementedError

    def _converter_arguments(self) -> tuple:
        """Return the arguments that build the adjoint converter.

        Returns:
            Shapes, groups, device and dtype.
        """
        return self._param_shapes, self._param_groups, self._device, self._dtype


def _check_param_groups(param_shapes: dict[str, Size], groups: list[dict[str, str]]):
    """Verify that the groups partition the parameters into valid blocks.

    Args:
        param_shapes: Parameter names mapped to shapes.
        groups: Role-to-name dictionaries.

    Raises:
        ValueError: If a group is empty or has unknown roles, if names are unknown
            or not covered exactly once, or if a joint bias does not fit its weight.
    """
    names = [name for group in groups for name in group.values()]
    if sorted(names) != sorted(param_shapes):
        raise ValueError(
            f"`param_groups` must contain each parameter of `param_shapes` exactly "
            f"once; got {names} for parameters {list(param_shapes)}."
        )
    for group in groups:
        if not group or not set(group) <= {"W", "b"}:
            raise ValueError(f"Groups map 'W' and/or 'b' to names, got {group}.")
        if len(group) == 2:
            w_shape, b_shape = param_shapes[group["W"]], param_shapes[group["b"]]
            if len(w_shape) < 1 or b_shape != w_shape[:1]:
                raise ValueError(
                    f"A joint bias must have shape [{list(w_shape[:1])}] of the "
                    f"weight's first axis, got {list(b_shape)} (group {group})."
                )


class ToCanonicalLinearOperator(_CanonicalFormLinearOperator):
    r"""Map parameter-list tensors into KFAC's canonical form (a permutation).

    Each group of ``param_groups`` becomes one flat block: a weight is flattened
    into a matrix ``[D_out, D_in]`` and, in a joint group, its bias appended as
    last column, ``[D_out, D_in + 1]``; the matrix is flattened row-major. Blocks
    follow the order of ``param_groups``. The operator is orthogonal; its adjoint
    (and inverse) is :class:`FromCanonicalLinearOperator`.

    Example:
        >>> from torch import arange, float64
        >>> to_canonical = ToCanonicalLinearOperator(
        ...     {"b": (2,), "W": (2, 3)}, [{"W": "W", "b": "b"}], "cpu", float64
        ... )
        >>> to_canonical.shape
        (8, 8)
        >>> b, W = arange(2.0, dtype=float64), arange(6.0, dtype=float64)
        >>> to_canonical @ [b, W.reshape(2, 3)]
        [tensor([0., 1., 2., 0., 3., 4., 5., 1.], dtype=torch.float64)]
        >>> to_canonical.adjoint() @ (to_canonical @ [b, W.reshape(2, 3)])
        [tensor([0., 1.], dtype=torch.float64), tensor([[0., 1., 2.],
                [3., 4., 5.]], dtype=torch.float64)]
    """

    def _domain_and_range(self, parameter_format, canonical_format):
        """Map from the parameter format to the canonical format.

        Args:
            parameter_format: Shapes of the parameter-list format.
            canonical_format: Shapes of the canonical blocks.

        Returns:
            Domain and range shapes.
        """
        return parameter_format, canonical_format

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Flatten and reorder parameter-shaped columns into canonical blocks.

        Args:
            M: Tensors ``[*param_shape, K]`` in parameter order.

        Returns:
            Canonical blocks ``[block_size, K]``.
        """
        num_cols = M[0].shape[-1]
        blocks = []
        for group in self._param_groups:
            rows = [
                M[self._position[group[role]]].reshape(
                    self._param_shapes[group[role]][0], -1, num_cols
                )
                for role in ("W", "b")
                if role in group
            ]
            blocks.append(cat(rows, dim=1).reshape(-1, num_cols))
        return blocks

    def _adjoint(self) -> FromCanonicalLinearOperator:
        """Return the map back to the parameter format.

        Returns:
            The inverse permutation.
        """
        return FromCanonicalLinearOperator(*self._converter_arguments())


class FromCanonicalLinearOperator(_CanonicalFormLinearOperator):
    """Map KFAC's canonical blocks back into parameter-list tensors (a permutation).

    The adjoint (and inverse) of :class:`ToCanonicalLinearOperator`; see there for
    the canonical form and an example.
    """

    def _domain_and_range(self, parameter_format, canonical_format):
        """Map from the canonical format to the parameter format.

        Args:
            parameter_format: Shapes of the parameter-list format.
            canonical_format: Shapes of the canonical blocks.

        Returns:
            Domain and range shapes.
        """
        return canonical_format, parameter_format

    def _matmat(self, M: list[Tensor]) -> list[Tensor]:
        """Split canonical blocks into parameter-shaped tensors in parameter order.

        Args:
            M: Canonical blocks ``[block_size, K]``.

        Returns:
            Tensors ``[*param_shape, K]`` in parameter order.
        """
        num_cols = M[0].shape[-1]
        result = [None] * len(self._param_shapes)
        for block, group in zip(M, self._param_groups):
            shapes = {role: self._param_shapes[name] for role, name in group.items()}
            num_rows = next(iter(shapes.values()))[0]
            roles = [role for role in ("W", "b") if role in group]
            widths = [shapes[role].numel() // num_rows for role in roles]
            parts = block.reshape(num_rows, sum(widths), num_cols)
            parts = parts.split(widths, 1) if len(widths) > 1 else [parts]
            for role, part in zip(roles, parts):
                result[self._position[group[role]]] = part.reshape(
                    *shapes[role], num_cols
                )
        return result

    def _adjoint(self) -> ToCanonicalLinearOperator:
        """Return the map into the canonical format.

        Returns:
            The inverse permutation.
        """
        return ToCanonicalLinearOperator(*self._converter_arguments())
