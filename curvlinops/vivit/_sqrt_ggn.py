r"""BackPACK extension that backpropagates the GGN's symmetric factor.

For a loss averaged over a mini-batch of :math:`N` samples,

.. math::
    \mathcal{L}(\mathbf{\theta}) = \frac{1}{N} \sum_{n=1}^N \ell_n(\mathbf{\theta}),
    \qquad
    \mathbf{G} = \frac{1}{N} \sum_{n=1}^N \mathbf{J}_n^\top \mathbf{H}_n \mathbf{J}_n,

where :math:`\mathbf{J}_n` is the Jacobian of the model output on sample :math:`n`
w.r.t. the parameters and :math:`\mathbf{H}_n = \mathbf{S}_n \mathbf{S}_n^\top` the
Hessian of :math:`\ell_n` w.r.t. that output. :class:`SqrtGGN` starts from the loss
Hessian's factors :math:`\mathbf{S}_n` (exact, or a Monte-Carlo estimate) and
multiplies them with transposed Jacobians layer by layer, which yields the columns
of :math:`\mathbf{V}` with :math:`\mathbf{G} = \mathbf{V} \mathbf{V}^\top`
(Dangel et al., 2022, ViViT: Curvature access through the generalized Gauss-Newton's
low-rank structure, TMLR). :class:`PerSampleGradients` stores per-sample gradients
under a separate attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import sqrt

from backpack.core.derivatives.avgpool1d import AvgPool1DDerivatives
from backpack.core.derivatives.avgpool2d import AvgPool2DDerivatives
from backpack.core.derivatives.avgpool3d import AvgPool3DDerivatives
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.conv_transpose1d import ConvTranspose1DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.conv_transpose3d import ConvTranspose3DDerivatives
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.embedding import EmbeddingDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.logsigmoid import LogSigmoidDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from backpack.core.derivatives.maxpool3d import MaxPool3DDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.core.derivatives.selu import SELUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.sum_module import SumModuleDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from backpack.core.derivatives.zeropad2d import ZeroPad2dDerivatives
from backpack.custom_module.branching import SumModule
from backpack.custom_module.scale_module import ScaleModule
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.utils.subsampling import subsample
from torch import Tensor, dtype, get_default_dtype, nn, set_default_dtype

from curvlinops._losses import check_no_ignored_labels
from curvlinops.vivit._factors import DenseFactor, LinearWeightFactor

# Module class -> (derivatives, names of the parameters whose factor is stored)
_LAYERS: dict[type[nn.Module], tuple[type[BaseDerivatives], tuple[str, ...]]] = {
    nn.Linear: (LinearDerivatives, ("weight", "bias")),
    nn.Conv1d: (Conv1DDerivatives, ("weight", "bias")),
    nn.Conv2d: (Conv2DDerivatives, ("weight", "bias")),
    nn.Conv3d: (Conv3DDerivatives, ("weight", "bias")),
    nn.ConvTranspose1d: (ConvTranspose1DDerivatives, ("weight", "bias")),
    nn.ConvTranspose2d: (ConvTranspose2DDerivatives, ("weight", "bias")),
    nn.ConvTranspose3d: (ConvTranspose3DDerivatives, ("weight", "bias")),
    nn.BatchNorm1d: (BatchNormNdDerivatives, ("weight", "bias")),
    nn.BatchNorm2d: (BatchNormNdDerivatives, ("weight", "bias")),
    nn.BatchNorm3d: (BatchNormNdDerivatives, ("weight", "bias")),
    nn.Embedding: (EmbeddingDerivatives, ("weight",)),
    nn.ReLU: (ReLUDerivatives, ()),
    nn.Sigmoid: (SigmoidDerivatives, ()),
    nn.Tanh: (TanhDerivatives, ()),
    nn.LeakyReLU: (LeakyReLUDerivatives, ()),
    nn.LogSigmoid: (LogSigmoidDerivatives, ()),
    nn.ELU: (ELUDerivatives, ()),
    nn.SELU: (SELUDerivatives, ()),
    nn.Dropout: (DropoutDerivatives, ()),
    nn.Flatten: (FlattenDerivatives, ()),
    nn.MaxPool1d: (MaxPool1DDerivatives, ()),
    nn.MaxPool2d: (MaxPool2DDerivatives, ()),
    nn.MaxPool3d: (MaxPool3DDerivatives, ()),
    nn.AvgPool1d: (AvgPool1DDerivatives, ()),
    nn.AvgPool2d: (AvgPool2DDerivatives, ()),
    nn.AvgPool3d: (AvgPool3DDerivatives, ()),
    nn.ZeroPad2d: (ZeroPad2dDerivatives, ()),
    nn.Identity: (ScaleModuleDerivatives, ()),
    ScaleModule: (ScaleModuleDerivatives, ()),
    SumModule: (SumModuleDerivatives, ()),
}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LOSSES: dict[type[nn.Module], type[BaseDerivatives]] = {
    nn.MSELoss: MSELossDerivatives,
    nn.CrossEntropyLoss: CrossEntropyLossDerivatives,
    nn.BCEWithLogitsLoss: BCELossWithLogitsDerivatives,
}


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


class _LayerFactor(ModuleExtension):
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
        super().__init__(params=list(params))

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


class _LossFactor(ModuleExtension):
    """Start the factor at the loss: a (sampled) square root of the loss Hessian."""

    def __init__(self, derivatives: BaseDerivatives):
        """Store the loss function's derivatives.

        Args:
            derivatives: BackPACK derivatives of the loss.
        """
        self.derivatives = derivatives
        super().__init__()

    def backpropagate(self, ext: SqrtGGN, module, g_inp, g_out, backproped) -> Tensor:
        r"""Factorize the Hessian of the loss w.r.t. the model output.

        BackPACK normalizes by the full batch; with sub-sampling, the factor is
        rescaled by :math:`\sqrt{N / |\mathcal{S}|}` so that it factorizes the GGN of
        the mean loss over the active samples :math:`\mathcal{S}`.

        Args:
            ext: The running extension.
            module: The loss function.
            g_inp: Gradients w.r.t. the loss inputs.
            g_out: Gradients w.r.t. the loss output.
            backproped: ``None``.

        Returns:
            Factor of shape ``[V, |S|, *output.shape[1:]]``.
        """
        batch_size = ext.check_loss(module)
        subsampling = ext.get_subsampling()
        if ext.mc_samples == 0:
            factor = self.derivatives.sqrt_hessian(
                module, g_inp, g_out, subsampling=subsampling
            )
        else:
            factor = self.derivatives.sqrt_hessian_sampled(
                module, g_inp, g_out, mc_samples=ext.mc_samples, subsampling=subsampling
            )
        if subsampling is not None:
            factor = factor * sqrt(batch_size / len(subsampling))
        return factor


_SPECIAL = {
    nn.Linear: _LinearFactor,
    **{batch_norm: _BatchNormFactor for batch_norm in _BATCH_NORMS},
}


def _module_extensions() -> dict[type[nn.Module], ModuleExtension]:
    """Create the module extensions of :class:`SqrtGGN`.

    Returns:
        Mapping from module classes to their module extensions.
    """
    exts = {}
    for layer, (derivatives, params) in _LAYERS.items():
        factor_class = _SPECIAL.get(layer, _LayerFactor)
        exts[layer] = factor_class(derivatives(), params)
    exts.update({loss: _LossFactor(d()) for loss, d in _LOSSES.items()})
    return exts


class SqrtGGN(BackpropExtension):
    r"""BackPACK extension that stores the GGN's symmetric factor on each parameter.

    After the backward pass, ``param.<savefield>`` holds the parameter's rows of
    :math:`\mathbf{V}^\top`, a factor object from :mod:`curvlinops.vivit._factors`
    (``Linear`` weights keep the rows as outer products) whose ``to_tensor()`` has
    shape ``[V, N, *param.shape]``, with ``V = C`` (model output dimension, exact
    loss Hessian factor) or ``V = M`` (Monte-Carlo samples) and ``N`` the number of
    active samples. Flattened to ``[V * N, D]`` and concatenated over parameters, the
    rows form :math:`\mathbf{V}^\top` with :math:`\mathbf{G} = \mathbf{V}
    \mathbf{V}^\top` the GGN of the mean loss over the active samples. The loss
    function must use ``reduction='mean'``, and the model and loss function must be
    extended with :func:`backpack.extend`.

    Args:
        savefield: Name of the attribute that stores the factor on each parameter.
        mc_samples: ``0`` for the exact loss Hessian factor, otherwise the number of
            Monte-Carlo samples of its estimate.
        subsampling: Indices of the active samples; ``None`` activates all.

    Example:
        >>> from backpack import backpack, extend
        >>> from torch import manual_seed, rand, randint
        >>> from torch.nn import CrossEntropyLoss, Linear
        >>> _ = manual_seed(0)
        >>> model, loss_func = extend(Linear(4, 3)), extend(CrossEntropyLoss())
        >>> X, y = rand(5, 4), randint(0, 3, (5,))
        >>> with backpack(SqrtGGN("sqrt_ggn", subsampling=[0, 2])):
        ...     loss_func(model(X), y).backward()
        >>> model.weight.sqrt_ggn.to_tensor().shape
        torch.Size([3, 2, 3, 4])
    """

    def __init__(
        self, savefield: str, mc_samples: int = 0, subsampling: list[int] | None = None
    ):
        """Set up the module extensions, the Hessian approximation and sub-sampling."""
        self.mc_samples = mc_samples
        super().__init__(savefield, _module_extensions(), subsampling=subsampling)

    def expects_backpropagation_quantities(self) -> bool:
        """Return that the factor is backpropagated.

        Returns:
            ``True``.
        """
        return True

    def accumulate_backpropagated_quantities(
        self, existing: Tensor, other: Tensor
    ) -> Tensor:
        """Sum the factors of tensors that enter several operations.

        Args:
            existing: Factor accumulated so far.
            other: Factor of another branch.

        Returns:
            Their sum.
        """
        return existing + other

    def check_loss(self, module: nn.Module) -> int:
        """Verify reduction and sub-sampling of the loss function and the batch size.

        Args:
            module: The loss function (with BackPACK's stored input).

        Returns:
            The batch size.

        Raises:
            ValueError: If the reduction is not ``'mean'`` or a sub-sampling index is
                out of range.
            NotImplementedError: If cross-entropy labels equal ``ignore_index``.
        """
        if module.reduction != "mean":
            raise ValueError(
                f"ViViT computations need a loss with reduction='mean', got "
                f"{module.reduction!r} for {module}."
            )
        check_no_ignored_labels(module, module.input1, "ViViT")
        batch_size = module.input0.shape[0]
        if self._subsampling is not None and any(
            not 0 <= idx < batch_size for idx in self._subsampling
        ):
            raise ValueError(
                f"Sub-sampling indices must lie in [0, {batch_size}) (the batch size), "
                f"got {self._subsampling}."
            )
        return batch_size
