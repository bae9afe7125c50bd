r"""Backpropagation rules of the GGN factor through layers, from BackPACK's derivatives.

A layer :math:`\mathbf{z} = f(\mathbf{x}, \mathbf{w})` maps the factor w.r.t. its
output, :math:`\mathbf{S}_{\mathbf{z}}` (``[V, N, *z.shape[1:]]``), to the factor
w.r.t. its input, :math:`\mathbf{J}_{\mathbf{x}} \mathbf{z}^\top
\mathbf{S}_{\mathbf{z}}`, and stores the factor of each parameter,
:math:`\mathbf{J}_{\mathbf{w}} \mathbf{z}^\top \mathbf{S}_{\mathbf{z}}` per sample.
Both products come from BackPACK's derivative objects (for ``Pad``, a variant that
also crops). They cover every layer of BackPACK's second-order extensions
(``SqrtGGN*``, ``DiagGGN*``, ``DiagHessian``, ``KFAC``, ``KFLR``, ``KFRA``): those of
:mod:`torch.nn` listed in :data:`LAYERS` and BackPACK's custom modules for branching
(``Parallel`` with ``SumModule``), scaling, slicing, padding and permuting, which
``backpack.extend(model, use_converter=True)`` inserts for skip connections and
tensor operations. Containers (``Sequential``, ``Parallel``, ``ReduceTuple``, ...)
perform no operation and need no rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from backpack.core.derivatives.adaptive_avg_pool_nd import (
    AdaptiveAvgPool1dDerivatives,
    AdaptiveAvgPool2dDerivatives,
    AdaptiveAvgPool3dDerivatives,
)
from backpack.core.derivatives.avgpool1d import AvgPool1DDerivatives
from backpack.core.derivatives.avgpool2d import AvgPool2DDerivatives
from backpack.core.derivatives.avgpool3d import AvgPool3DDerivatives
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.conv_transpose1d import ConvTranspose1DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.conv_transpose3d import ConvTranspose3DDerivatives
from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.embedding import EmbeddingDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
from backpack.core.derivatives.lstm import LSTMDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.maxpool3d import MaxPool3DDerivatives
from backpack.core.derivatives.pad import PadDerivatives
from backpack.core.derivatives.permute import PermuteDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.rnn import RNNDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.core.derivatives.selu import SELUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.slicing import SlicingDerivatives
from backpack.core.derivatives.sum_module import SumModuleDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from backpack.core.derivatives.zeropad2d import ZeroPad2dDerivatives
from backpack.custom_module.branching import SumModule
from backpack.custom_module.pad import Pad
from backpack.custom_module.permute import Permute
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from backpack.utils.subsampling import subsample
from torch import Tensor, dtype, get_default_dtype, nn, set_default_dtype
from torch.nn.functional import pad as pad_tensor

from curvlinops.vivit._backprop import FactorRule
from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor


class _PadDerivatives(PadDerivatives):
    """BackPACK's derivatives of ``Pad``, with the transposed Jacobian as padding.

    Constant padding by ``pad`` is undone (transposed) by padding with ``-pad``: it
    crops what was added and adds zeros where negative values cropped. Unlike
    BackPACK's own version, this avoids indexing with a list of slices, which
    PyTorch deprecates, and supports negative padding.
    """

    @staticmethod
    def unpad(tensor: Tensor, pad: Sequence[int], mode: str, value: float) -> Tensor:
        """Apply the transposed Jacobian of padding to a tensor.

        Args:
            tensor: Tensor with the padded shape in its trailing axes.
            pad: Padding amounts, as for :func:`torch.nn.functional.pad`.
            mode: Padding mode.
            value: Fill value of constant padding (does not enter the Jacobian).

        Returns:
            The tensor with the unpadded shape in its trailing axes.

        Raises:
            NotImplementedError: If ``mode`` is not ``'constant'``.
        """
        if mode != "constant":
            raise NotImplementedError(
                f"Only mode='constant' is supported, got {mode!r}."
            )
        return pad_tensor(tensor, [-amount for amount in pad])


_WEIGHT_BIAS = ("weight", "bias")
_RECURRENT = ("bias_ih_l0", "bias_hh_l0", "weight_ih_l0", "weight_hh_l0")

# Module class -> (BackPACK derivatives, names of the parameters whose factor is stored)
LAYERS: dict[type[nn.Module], tuple[type[BaseDerivatives], tuple[str, ...]]] = {
    # layers with parameters
    nn.Linear: (LinearDerivatives, _WEIGHT_BIAS),
    nn.Conv1d: (Conv1DDerivatives, _WEIGHT_BIAS),
    nn.Conv2d: (Conv2DDerivatives, _WEIGHT_BIAS),
    nn.Conv3d: (Conv3DDerivatives, _WEIGHT_BIAS),
    nn.ConvTranspose1d: (ConvTranspose1DDerivatives, _WEIGHT_BIAS),
    nn.ConvTranspose2d: (ConvTranspose2DDerivatives, _WEIGHT_BIAS),
    nn.ConvTranspose3d: (ConvTranspose3DDerivatives, _WEIGHT_BIAS),
    nn.BatchNorm1d: (BatchNormNdDerivatives, _WEIGHT_BIAS),
    nn.BatchNorm2d: (BatchNormNdDerivatives, _WEIGHT_BIAS),
    nn.BatchNorm3d: (BatchNormNdDerivatives, _WEIGHT_BIAS),
    nn.Embedding: (EmbeddingDerivatives, ("weight",)),
    nn.RNN: (RNNDerivatives, _RECURRENT),
    nn.LSTM: (LSTMDerivatives, _RECURRENT),
    # activations
    nn.ReLU: (ReLUDerivatives, ()),
    nn.Sigmoid: (SigmoidDerivatives, ()),
    nn.Tanh: (TanhDerivatives, ()),
    nn.LeakyReLU: (LeakyReLUDerivatives, ()),
    nn.LogSigmoid: (LogSigmoidDerivatives, ()),
    nn.ELU: (ELUDerivatives, ()),
    nn.SELU: (SELUDerivatives, ()),
    # pooling
    nn.MaxPool1d: (MaxPool1DDerivatives, ()),
    nn.MaxPool2d: (MaxPool2DDerivatives, ()),
    nn.MaxPool3d: (MaxPool3DDerivatives, ()),
    nn.AvgPool1d: (AvgPool1DDerivatives, ()),
    nn.AvgPool2d: (AvgPool2DDerivatives, ()),
    nn.AvgPool3d: (AvgPool3DDerivatives, ()),
    nn.AdaptiveAvgPool1d: (AdaptiveAvgPool1dDerivatives, ()),
    nn.AdaptiveAvgPool2d: (AdaptiveAvgPool2dDerivatives, ()),
    nn.AdaptiveAvgPool3d: (AdaptiveAvgPool3dDerivatives, ()),
    # reshaping, padding, regularization
    nn.ZeroPad2d: (ZeroPad2dDerivatives, ()),
    nn.Flatten: (FlattenDerivatives, ()),
    nn.Dropout: (DropoutDerivatives, ()),
    nn.Identity: (ScaleModuleDerivatives, ()),
    # BackPACK's custom modules (branching, skip connections, tensor operations)
    ScaleModule: (ScaleModuleDerivatives, ()),
    SumModule: (SumModuleDerivatives, ()),
    Slicing: (SlicingDerivatives, ()),
    Pad: (_PadDerivatives, ()),
    Permute: (PermuteDerivatives, ()),
}


def unsupported_message(module: nn.Module, supported: list[type]) -> str:
    """Explain that a module has no backpropagation rule, and which models work.

    Args:
        module: The module without rule.
        supported: The module classes with rules (layers and losses).

    Returns:
        The message.
    """
    names = ", ".join(sorted({f"{c.__module__}.{c.__name__}" for c in supported}))
    if next(module.children(), None) is None:
        what = f"{module.__class__} ({module}): BackPACK has no derivatives for it."
    else:
        what = (
            f"{module.__class__}: it is a container whose forward() BackPACK cannot "
            "see through (only torch.nn.Sequential and BackPACK's containers are)."
        )
    return (
        f"ViViT cannot backpropagate the GGN factor through {what} Models built "
        f"from these modules work: {names}; combined with torch.nn.Sequential, "
        "backpack.custom_module's Parallel (branches merged by SumModule), or "
        "backpack.extend(model, use_converter=True) for skip connections, "
        "additions, scalings, flattening and permutations written in forward()."
    )


@contextmanager
def _default_dtype(new: dtype) -> Iterator[None]:
    """Temporarily change PyTorch's default floating point type.

    Some of BackPACK's derivatives (average pooling, embedding) create helper tensors
    in the default type; running them under the factor's type makes float64 work.

    Args:
        new: The default type inside the context.

    Yields:
        Nothing.
    """
    previous = get_default_dtype()
    set_default_dtype(new)
    try:
        yield
    finally:
        set_default_dtype(previous)


class _LayerFactor(FactorRule):
    """Backpropagate the factor through a layer; store it for the layer's parameters.

    The factor arrives as ``[V, N, *output.shape[1:]]`` (``V`` columns per sample,
    ``N`` active samples) and leaves as ``[V, N, *input.shape[1:]]``. A parameter's
    factor, ``[V, N, *param.shape]``, is the transposed-Jacobian product without the
    sum over samples.
    """

    def __init__(self, derivatives: BaseDerivatives, params: tuple[str, ...]):
        """Store the layer's derivatives and the names of its parameters.

        Args:
            derivatives: BackPACK derivatives of the layer.
            params: Names of the layer's parameters.
        """
        self.derivatives = derivatives
        for name in params:  # the base class looks these methods up by name
            if not hasattr(self, name):
                setattr(self, name, self._make_param_factor(name))
        super().__init__(params)

    def _make_param_factor(self, name: str):
        def param_factor(ext, module, g_inp, g_out, backproped: Tensor) -> DenseFactor:
            return self._dense_factor(name, ext, module, g_inp, g_out, backproped)

        return param_factor

    def _dense_factor(
        self, name: str, ext, module, g_inp, g_out, backproped: Tensor
    ) -> DenseFactor:
        """Multiply the factor with the transposed Jacobian w.r.t. a parameter.

        Args:
            name: Name of the parameter in the layer.
            ext: The running extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs.
            g_out: Gradients w.r.t. the layer output.
            backproped: Factor w.r.t. the layer output.

        Returns:
            The parameter's factor, ``[V, N, *param.shape]``, without sum over
            samples.
        """
        with _default_dtype(backproped.dtype):
            rows = self.derivatives.param_mjp(
                name,
                module,
                g_inp,
                g_out,
                backproped,
                sum_batch=False,
                subsampling=ext.get_subsampling(),
            )
        return DenseFactor(rows)

    def backpropagate(self, ext, module, g_inp, g_out, backproped: Tensor) -> Tensor:
        """Multiply the factor with the transposed Jacobian w.r.t. the layer input.

        Args:
            ext: The running extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs.
            g_out: Gradients w.r.t. the layer output.
            backproped: Factor w.r.t. the layer output.

        Returns:
            Factor w.r.t. the layer input.
        """
        with _default_dtype(backproped.dtype):
            return self.derivatives.jac_t_mat_prod(
                module, g_inp, g_out, backproped, subsampling=ext.get_subsampling()
            )


class _LinearFactor(_LayerFactor):
    """Linear layer: on ``[N, d_in]`` inputs, the weight's rows are outer products."""

    def weight(self, ext, module, g_inp, g_out, backproped: Tensor):
        """Represent the weight's factor without forming it, if possible.

        Args:
            ext: The running extension.
            module: The layer.
            g_inp: Gradients w.r.t. the layer inputs.
            g_out: Gradients w.r.t. the layer output.
            backproped: Factor w.r.t. the layer output.

        Returns:
            The weight's factor.
        """
        if module.input0.dim() != 2:  # extra axes: sums of outer products
            return self._dense_factor("weight", ext, module, g_inp, g_out, backproped)
        inputs = subsample(module.input0, subsampling=ext.get_subsampling())
        return LinearWeightFactor(backproped, inputs)


class _BatchNormFactor(_LayerFactor):
    """Batch normalization, only in evaluation mode (train mode couples samples)."""

    def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
        """Verify that the layer normalizes with its running statistics.

        Args:
            ext: The running extension.
            module: The batch normalization layer.
            g_inp: Gradients w.r.t. the layer inputs.
            g_out: Gradients w.r.t. the layer output.

        Raises:
            NotImplementedError: If the layer is in training mode.
        """
        if module.training:
            raise NotImplementedError(
                f"{module} is in training mode, which couples the samples of a "
                "mini-batch so that the GGN has no per-sample factor. Call .eval()."
            )


_SPECIAL = {
    nn.Linear: _LinearFactor,
    nn.BatchNorm1d: _BatchNormFactor,
    nn.BatchNorm2d: _BatchNormFactor,
    nn.BatchNorm3d: _BatchNormFactor,
}


def layer_extensions() -> dict[type[nn.Module], FactorRule]:
    """Create the module extensions that backpropagate the factor through layers.

    Returns:
        Mapping from the classes in :data:`LAYERS` to their module extensions.
    """
    return {
        layer: _SPECIAL.get(layer, _LayerFactor)(derivatives(), params)
        for layer, (derivatives, params) in LAYERS.items()
    }
