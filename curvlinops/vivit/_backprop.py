r"""Passing the GGN factor between modules during BackPACK's backward pass.

BackPACK hands a backpropagated quantity from a module to the modules that produced
its inputs through a table keyed by the tensor's ``data_ptr()``. A view that starts
at the same address as its base (``x[:, :3]``, ``x.permute(...)``, ``x.flatten(1)``)
gets the same key, so on branched graphs the factor w.r.t. the view and the factor
w.r.t. the base end up summed, which fails on their different shapes or, for
views of equal shape, silently gives a wrong GGN. :class:`FactorRule` keys the table
by address, shape and strides instead: tensors with equal keys then occupy the same
memory in the same layout, i.e. they are the same tensor, so summing their factors
is right. The rest follows BackPACK's module extensions: fetch the factor w.r.t. the
module output, store the factor of each parameter, and pass the factor w.r.t. the
inputs on.
"""

from __future__ import annotations

from backpack.extensions.module_extension import ModuleExtension
from backpack.utils.module_classification import is_loss
from torch import Tensor
from torch.nn import Module


def tensor_key(tensor: Tensor) -> tuple:
    """Identify a tensor by its memory: start address, shape and strides.

    Args:
        tensor: The tensor.

    Returns:
        The key.
    """
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride()


def _inputs(module: Module) -> list[Tensor]:
    """Return the inputs that BackPACK stored on a module during the forward pass.

    Args:
        module: The module.

    Returns:
        The tensors ``module.input0``, ``module.input1``, ...
    """
    inputs, idx = [], 0
    while hasattr(module, f"input{idx}"):
        inputs.append(getattr(module, f"input{idx}"))
        idx += 1
    return inputs


class FactorRule(ModuleExtension):
    """Module extension that moves the factor from a module's output to its inputs.

    Subclasses implement :meth:`backpropagate` and, for each name in ``params``, a
    method of the same signature that returns the parameter's factor. Errors about
    unsupported configurations are re-raised with the module's name.

    Args:
        params: Names of the module's parameters whose factor is stored.
    """

    def __init__(self, params: tuple[str, ...] = ()):
        """Store the parameter names."""
        self.param_names = tuple(params)
        super().__init__(params=list(params))

    def __call__(self, ext, module: Module, g_inp, g_out):
        """Run the rule on a module, naming the module in errors.

        Args:
            ext: The running extension.
            module: The module.
            g_inp: Gradients w.r.t. the module inputs.
            g_out: Gradients w.r.t. the module output.

        Raises:
            NotImplementedError: If the module's configuration is not supported
                (e.g. an ``RNN`` with ``batch_first=False``).
            ValueError: If the module's configuration is rejected (e.g. a
                ``Slicing`` of the batch axis).
        """
        try:
            self._apply(ext, module, g_inp, g_out)
        except (NotImplementedError, ValueError) as error:
            if repr(module) in str(error):
                raise
            raise type(error)(
                f"ViViT cannot backpropagate the GGN factor through {module}: {error}"
            ) from error

    def _apply(self, ext, module: Module, g_inp, g_out):
        """Fetch the output's factor, store the parameters', pass the inputs' on.

        Args:
            ext: The running extension.
            module: The module.
            g_inp: Gradients w.r.t. the module inputs.
            g_out: Gradients w.r.t. the module output.

        Raises:
            NotImplementedError: If no factor arrived at a layer's output: it reaches
                the loss only through operations outside modules.
        """
        self.check_hyperparameters_module_extension(ext, module, g_inp, g_out)
        output = module.output
        keep = output.grad_fn is None or getattr(output, "retains_grad", False)
        factor = ext.saved_quantities.retrieve_quantity(tensor_key(output), not keep)
        if factor is None and not is_loss(module):
            raise NotImplementedError(
                f"No GGN factor arrived at the output of {module}: it reaches the "
                "loss through operations that are not modules (e.g. torch.tanh or + "
                "in forward()), which BackPACK does not see. Use modules, or "
                "backpack.extend(model, use_converter=True)."
            )
        for name in self.param_names:
            param = getattr(module, name)
            if param is not None and param.requires_grad:
                value = getattr(self, name)(ext, module, g_inp, g_out, factor)
                setattr(param, ext.savefield, value)
        inputs = [x for x in _inputs(module) if x.requires_grad]
        if inputs:
            factor = self.backpropagate(ext, module, g_inp, g_out, factor)
            for x in inputs:
                ext.saved_quantities.save_quantity(
                    tensor_key(x), factor, ext.accumulate_backpropagated_quantities
                )
