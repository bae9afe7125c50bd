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
low-rank structure, TMLR). The rules for the layers live in
:mod:`curvlinops.vivit._layers`; this module adds the loss functions and the
extension.
"""

from __future__ import annotations

from math import sqrt

from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.saved_quantities import SavedQuantities
from torch import Tensor, nn

from curvlinops._losses import (
    check_no_ignored_labels,
    label_rows,
    output_rows,
    scale_by_label_mass,
    terms_to_output,
)
from curvlinops.vivit._backprop import FactorRule
from curvlinops.vivit._layers import LAYERS, layer_extensions, unsupported_message

_LOSSES: dict[type[nn.Module], type[BaseDerivatives]] = {
    nn.MSELoss: MSELossDerivatives,
    nn.CrossEntropyLoss: CrossEntropyLossDerivatives,
    nn.BCEWithLogitsLoss: BCELossWithLogitsDerivatives,
}


class _LossFactor(FactorRule):
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
        the mean loss over the active samples :math:`\mathcal{S}`. BackPACK's
        cross-entropy factors assume labels of mass one; for class probabilities
        of mass :math:`m_t` they are scaled by :math:`\sqrt{m_t}`, as the Hessian
        scales with :math:`m_t`.

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
        return _scale_by_label_mass(module, factor, subsampling)


def _scale_by_label_mass(
    module: nn.Module, factor: Tensor, subsampling: list[int] | None
) -> Tensor:
    """Scale a cross-entropy factor by the root of its class probabilities' mass.

    Args:
        module: The loss function (with BackPACK's stored input and labels).
        factor: The loss Hessian's factor ``[V, |S|, *output.shape[1:]]``.
        subsampling: Indices of the active samples, ``None`` for all.

    Returns:
        The factor, scaled per loss term for cross-entropy with class
        probabilities; unchanged otherwise.
    """
    y = module.input1
    if not (isinstance(module, nn.CrossEntropyLoss) and y.is_floating_point()):
        return factor
    y = y if subsampling is None else y[subsampling]
    num_vectors, num_classes = factor.shape[0], factor.shape[2]
    rows = output_rows(module, factor.flatten(end_dim=1))
    rows = rows.reshape(num_vectors, -1, num_classes)
    rows = scale_by_label_mass(module, rows, label_rows(module, y))
    return terms_to_output(module, rows, factor.shape[1:])


def _module_extensions() -> dict[type[nn.Module], FactorRule]:
    """Create the module extensions of :class:`SqrtGGN`.

    Returns:
        Mapping from module classes (layers and losses) to their module extensions.
    """
    exts = layer_extensions()
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

    def __call__(self, module: nn.Module, g_inp, g_out):
        """Run the rule of a module; refuse modules without one with a clear error.

        Args:
            module: A module of the extended model or the loss function.
            g_inp: Gradients w.r.t. the module inputs.
            g_out: Gradients w.r.t. the module output.

        After an error, the factors backpropagated so far are discarded, so that
        the extension can be used for another backward pass.

        Raises:
            NotImplementedError: If the module has no rule.
        """
        try:
            if type(module) not in LAYERS and type(module) not in _LOSSES:
                supported = [*LAYERS, *_LOSSES]
                raise NotImplementedError(unsupported_message(module, supported))
            super().__call__(module, g_inp, g_out)
        except BaseException:
            self.saved_quantities = SavedQuantities()
            raise

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
