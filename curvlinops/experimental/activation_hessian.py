"""Hessian of the loss w.r.t. an intermediate feature of the network."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from contextlib import contextmanager
from functools import cached_property

from torch import Tensor, no_grad
from torch.autograd import grad
from torch.nn import Module

from curvlinops._autodiff import DifferentiationModes, hvp
from curvlinops._checks import check_input_dtype, is_integer, unpack_batch
from curvlinops._execution import restored_running_stats, with_autograd
from curvlinops._losses import SUPPORTED_LOSSES, check_output_and_labels
from curvlinops._torch_base import CurvatureLinearOperator


class ActivationHessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian of the loss w.r.t. an intermediate feature, as linear operator.

    For one mini-batch :math:`(\mathbf{X}, \mathbf{y})` with loss
    :math:`\mathcal{L} = \ell(f_{\mathbf{\theta}}(\mathbf{X}), \mathbf{y})` (with
    the loss's reduction), let :math:`\mathbf{Z}` be a tensor that the forward pass
    produces inside the network, e.g. the output of a hidden layer, with shape
    ``[B, *]``. This operator represents the Hessian w.r.t. its flattened entries,

    .. math::
        \nabla^2_{\mathbf{Z}} \mathcal{L}
        = \nabla^2_{\mathbf{Z}} \ell(f_{\mathbf{\theta}}(\mathbf{X}), \mathbf{y})\,,

    a square matrix of dimension :math:`\mathrm{dim}(\mathbf{Z})`. The feature is
    named by ``activation = (layer_name, io, index)``: the module
    ``model_func.get_submodule(layer_name)`` (a name from ``named_modules()``;
    ``''`` is the whole model), whether the feature is among the module's positional
    ``'input'`` tensors or its ``'output'`` tensors, and the position ``index`` in
    that tuple (``0`` for a module with one input and one output). Only the graph
    from :math:`\mathbf{Z}` onwards is differentiated: for an ``'input'``, other
    uses of the same tensor elsewhere in the network are held fixed.

    Products use reverse-over-reverse differentiation (falling back to the composite
    attention kernel where derivatives are missing) and cost one forward and two
    backward passes, for all columns at once. The operator is self-adjoint. Its
    tensor-list format is one tensor of the feature's shape, which one forward pass
    with :class:`store_activation` determines. The Hessian is defined for exactly
    one mini-batch.

    Example:
        >>> from numpy import allclose, eye
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, MSELoss, ReLU, Sequential
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2))
        >>> [name for name, _ in model.named_modules()]
        ['', '0', '1', '2']
        >>> data = [(rand(10, 4), rand(10, 2))]
        >>> H = ActivationHessianLinearOperator(  # w.r.t. the ReLU's input
        ...     model, MSELoss(), ("1", "input", 0), data
        ... )
        >>> H.shape  # batch size times feature dimension
        (30, 30)
        >>> # the ReLU's input is the first layer's output
        >>> H_out = ActivationHessianLinearOperator(
        ...     model, MSELoss(), ("0", "output", 0), data
        ... )
        >>> allclose(H @ eye(30), H_out @ eye(30))
        True

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True
    _PARAMS_OF_MODEL: bool = False  # the feature is no parameter of the model

    def __init__(
        self,
        model_func: Module,
        loss_func: Callable[[Tensor, Tensor], Tensor],
        activation: tuple[str, str, int],
        data: Iterable[tuple[Tensor | MutableMapping, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        batch_size_fn: Callable[[MutableMapping], int] | None = None,
        process_group=None,
        shape: tuple[int, int] | None = None,
    ):
        """Locate the feature, evaluate it once, and by default probe determinism.

        Args:
            model_func: The neural network, a ``torch.nn.Module``.
            loss_func: Maps predictions and labels to a scalar loss; needs a
                ``reduction`` of ``'mean'`` or ``'sum'``.
            activation: ``(layer_name, io, index)``: a name from
                ``model_func.named_modules()``, ``'input'`` or ``'output'``, and the
                position of the tensor among the module's inputs or outputs.
            data: Exactly one mini-batch ``(X, y)``, e.g. ``[(X, y)]``. ``X`` may be
                a ``MutableMapping``; then ``batch_size_fn`` is required.
            progressbar: Show a progress bar during the passes over the data.
            check_deterministic: Probe at construction that two passes over data and
                model agree.
            batch_size_fn: Returns the batch size of a ``MutableMapping`` input.
            process_group: Must be ``None``: the Hessian is defined on one
                mini-batch, so there is nothing to distribute.
            shape: Expected shape of the matrix (checked against the feature's
                size, which one forward pass determines). ``None``: no check.

        Raises:
            ValueError: If ``data`` does not hold exactly one batch, if
                ``activation`` does not name a tensor the forward pass produces, or
                if a ``process_group`` is given.
            TypeError: If ``model_func`` is not a ``torch.nn.Module``.
        """
        if process_group is not None:
            raise ValueError(
                "The activation Hessian is defined on one mini-batch and cannot be "
                "computed data-parallel: `process_group` must be None."
            )
        self._module, self._io, self._index = _locate(model_func, activation)
        num_batches = sum(1 for _ in data)
        if num_batches != 1:
            raise ValueError(
                "The activation Hessian is defined for exactly one mini-batch, but "
                f"`data` holds {num_batches}."
            )
        X, _ = unpack_batch(next(iter(data)))
        if isinstance(X, Tensor) and any(True for _ in model_func.parameters()):
            check_input_dtype(X, next(model_func.parameters()).dtype)
        features = []
        with no_grad(), restored_running_stats(model_func):
            with store_activation(
                model_func, activation[0], self._io, self._index, features
            ):
                model_func(X)
        _check_ran_once(features)
        super().__init__(
            model_func,
            loss_func,
            [features[0].requires_grad_(True)],
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            batch_size_fn=batch_size_fn,
            shape=shape,
        )

    @cached_property
    def _modes(self) -> DifferentiationModes:
        """Differentiation modes: reverse-over-reverse, fused or composite attention.

        Returns:
            Mode selector.
        """
        return DifferentiationModes(forward_mode_allowed=False)

    def _forward(
        self, model_func: Module, X: Tensor | MutableMapping
    ) -> tuple[Tensor, Tensor]:
        """Run the model with the feature replaced by a fresh leaf tensor.

        Args:
            model_func: The neural network.
            X: Mini-batch input.

        Returns:
            The model's output and the leaf that holds the feature's values; the
            output depends on the feature only through the leaf.

        Raises:
            ValueError: If the module does not run exactly once, or the named entry
                is not a tensor.
        """
        with _leaf_feature(self._module, self._io, self._index) as leaves:
            output = model_func(X)
        _check_ran_once(leaves)
        return output, leaves[0]

    def _matmat_batch(
        self, X: Tensor | MutableMapping, y: Tensor, M: list[Tensor]
    ) -> list[Tensor]:
        """Multiply the Hessian w.r.t. the feature onto columns.

        Args:
            X: Mini-batch input.
            y: Mini-batch labels.
            M: One tensor ``[*feature.shape, K]``.

        Returns:
            One tensor ``[*feature.shape, K]``.
        """
        M_leading = M[0].movedim(-1, 0)

        def compute(forward_mode: bool) -> list[Tensor]:
            output, feature = self._forward(self._model_func, X)
            if isinstance(self._loss_func, SUPPORTED_LOSSES):
                check_output_and_labels(self._loss_func, output, y)
            loss = self._loss_func(output, y)
            return hvp(loss, [[feature]], [[M_leading]])

        return [r.movedim(0, -1) for r in self._modes(compute)]

    @with_autograd
    def gradient_and_loss(self) -> tuple[list[Tensor], Tensor]:
        """Evaluate the loss on the mini-batch and its gradient w.r.t. the feature.

        Returns:
            The gradient (one tensor of the feature's shape) and the loss, detached.
        """
        ((X, y),) = list(self._loop_over_data(desc="gradient_and_loss"))
        output, feature = self._forward(self._model_func, X)
        loss = self._loss_func(output, y)
        return list(grad(loss, feature)), loss.detach()


class store_activation:  # noqa: N801 (3.x's name)
    """Context manager that records an input or output tensor of a layer.

    While active, a forward hook on the layer appends the named tensor (detached)
    to ``destination`` every time the layer runs.

    Example:
        >>> from torch import manual_seed, rand
        >>> from torch.nn import Linear, ReLU, Sequential
        >>> _ = manual_seed(0)
        >>> model = Sequential(Linear(4, 3), ReLU())
        >>> X, stored = rand(2, 4), []
        >>> with store_activation(model, "1", "input", 0, stored):
        ...     _ = model(X)
        >>> stored[0].allclose(model[0](X))
        True

    Attributes:
        SUPPORTED_IO_TYPES: ``{'input', 'output'}``.
    """

    SUPPORTED_IO_TYPES = {"input", "output"}

    def __init__(
        self,
        model: Module,
        module_name: str,
        io_type: str,
        io_idx: int,
        destination: list,
    ) -> None:
        """Locate the layer whose tensor is recorded.

        Args:
            model: The neural network.
            module_name: Name of the layer (from ``model.named_modules()``; ``''`` is
                the whole model).
            io_type: ``'input'`` (a positional input) or ``'output'``.
            io_idx: Position of the tensor among the inputs or outputs (``0`` for a
                layer with one input and one output).
            destination: List to which the tensors are appended.

        Raises:
            TypeError: If ``model`` is not a module.
            ValueError: If the layer or ``io_type`` or ``io_idx`` is invalid.
        """
        self._module, self._io_type, self._io_idx = _locate(
            model, (module_name, io_type, io_idx)
        )
        self._destination = destination
        self._handle = None

    def hook(
        self, module: Module, inputs: tuple[Tensor], output: Tensor | tuple[Tensor]
    ):
        """Append the layer's tensor to the destination (a forward hook).

        Args:
            module: The layer.
            inputs: The layer's positional inputs.
            output: The layer's output (a tensor or a tuple).
        """
        tensors = inputs if self._io_type == "input" else _as_tuple(output)
        self._destination.append(_pick(tensors, self._io_type, self._io_idx).detach())

    def __enter__(self) -> store_activation:
        """Install the hook.

        Returns:
            The context manager itself.
        """
        self._handle = self._module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc_info):
        """Remove the hook.

        Args:
            *exc_info: Exception information (ignored).
        """
        self._handle.remove()


def _as_tuple(output) -> tuple:
    """Return a layer's output as a tuple.

    Args:
        output: A tensor or a tuple.

    Returns:
        The output in a tuple of its own unless it is one.
    """
    return output if isinstance(output, tuple) else (output,)


def _pick(tensors: tuple, io: str, index: int) -> Tensor:
    """Return the tensor at a position among a layer's inputs or outputs.

    Args:
        tensors: The inputs or outputs.
        io: ``'input'`` or ``'output'`` (for the error message).
        index: The position.

    Returns:
        The tensor.

    Raises:
        ValueError: If there is no tensor at that position.
    """
    if index >= len(tensors) or not isinstance(tensors[index], Tensor):
        raise ValueError(
            f"The layer's {io}s have no tensor at index {index}; they are "
            f"{[type(t).__name__ for t in tensors]}."
        )
    return tensors[index]


def _check_ran_once(tensors: list):
    """Verify that the layer ran exactly once during a forward pass.

    Args:
        tensors: The tensors recorded during the pass.

    Raises:
        ValueError: If the layer ran not exactly once.
    """
    if len(tensors) != 1:
        raise ValueError(
            f"The layer must run exactly once per forward pass, it ran "
            f"{len(tensors)} times."
        )


@contextmanager
def _leaf_feature(module: Module, io: str, index: int):
    """Replace a module's input or output tensor by a fresh leaf while active.

    Args:
        module: The module whose input or output is replaced.
        io: ``'input'`` or ``'output'``.
        index: Position of the tensor among the module's inputs or outputs.

    Yields:
        The list of leaves, one per call of the module.
    """
    leaves = []

    def replace(tensors: tuple) -> tuple:
        leaves.append(_pick(tensors, io, index).detach().requires_grad_(True))
        return (*tensors[:index], leaves[-1], *tensors[index + 1 :])

    def replace_output(_, __, output):
        is_tuple = isinstance(output, tuple)
        return replace(output) if is_tuple else replace((output,))[0]

    if io == "input":
        handle = module.register_forward_pre_hook(lambda _, args: replace(args))
    else:
        handle = module.register_forward_hook(replace_output)
    try:
        yield leaves
    finally:
        handle.remove()


def _locate(model_func: Module, activation: tuple[str, str, int]):
    """Check the feature's description and find the module that produces it.

    Args:
        model_func: The neural network.
        activation: ``(layer_name, io, index)``.

    Returns:
        The module, ``'input'`` or ``'output'``, and the index.

    Raises:
        TypeError: If ``model_func`` is not a module.
        ValueError: If ``activation`` is malformed or names no module.
    """
    if not isinstance(model_func, Module):
        raise TypeError(
            f"`model_func` must be a torch.nn.Module, got {type(model_func).__name__}."
        )
    if not (isinstance(activation, (tuple, list)) and len(activation) == 3):
        raise ValueError(
            f"`activation` must be (layer_name, 'input'|'output', index), got "
            f"{activation!r}."
        )
    name, io, index = activation
    modules = dict(model_func.named_modules())
    if name not in modules:
        raise ValueError(f"No layer named {name!r}; available names: {list(modules)}.")
    if io not in store_activation.SUPPORTED_IO_TYPES:
        raise ValueError(f"`activation[1]` must be 'input' or 'output', got {io!r}.")
    if not is_integer(index) or index < 0:
        raise ValueError(
            f"`activation[2]` must be a non-negative integer, got {index!r}."
        )
    return modules[name], io, int(index)
