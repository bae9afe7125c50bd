r"""Every use of KFAC's parameters in a forward pass, seen by a torch function mode.

KFAC needs, for each weight, the inputs and output gradients of *every* linear map
or convolution that uses it: a ``Linear`` layer called twice, a recurrent cell
unrolled over time, an unembedding tied to an embedding, or a plain function that
calls :func:`torch.nn.functional.linear` on tensors from a parameter dictionary.
A :class:`~torch.overrides.TorchFunctionMode` sees every call of a PyTorch function
together with its arguments, whichever module or function makes it, so one
mechanism covers modules and plain callables:

- ``torch.nn.functional.linear(x, W, b)`` and ``conv2d(x, W, b, ...)`` with a
  parameter as ``W`` or ``b`` are *uses*: the mode keeps the (detached) input
  ``x`` and, for the backward pass, adds a zero *probe* to the output, whose
  gradient is the gradient w.r.t. the output of this call. A matrix product with
  the transpose of a 2d parameter, ``x @ W.T`` (also ``W.t()``, ``W.mT``,
  ``W.transpose(0, 1)``, ``torch.matmul``), is the use ``linear(x, W)``.
- ``torch.nn.functional.embedding(idx, W)`` and ``W[idx]`` with an integer tensor
  ``idx`` are *lookups*. They are left out of KFAC if ``W`` is the weight of linear
  uses (tied embedding and unembedding), see :class:`curvlinops.KFACLinearOperator`.
- Any other function that receives a parameter (or its transpose) and returns a
  tensor that depends on it differentiably (e.g. ``x @ W``, ``x + b``,
  ``layer_norm(x, (D,), W)``) raises an error that names the function and the
  parameter.

The mode costs a Python call per PyTorch function call of the forward pass (a few
microseconds) and needs no tracing: it works for every batch size and for
data-dependent control flow. ``benchmarks/discovery.py`` measures it against
tracing the model with ``make_fx`` and ``torch.export``.
"""

from __future__ import annotations

from torch import Tensor, enable_grad, is_grad_enabled, zeros_like
from torch.compiler import disable as torch_compiler_disable
from torch.nn import functional
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from curvlinops._kfac_calls import (
    CELLS,
    LINEAR,
    MATMULS,
    TRANSPOSES,
    Use,
    linear_call,
    looked_up,
    op_name,
    unsupported_message,
)


class ParameterUses(TorchFunctionMode):
    """Base of the modes that watch a set of parameters during a forward pass.

    Subclasses handle the calls of linear maps and convolutions
    (:meth:`_on_linear_call`) and lookups (:meth:`_on_lookup`); every other
    function that receives a watched parameter and depends on it differentiably
    goes to :meth:`_unsupported`, which raises (KFAC) unless a subclass records
    it instead.
    """

    def __init__(self, labels: dict[int, str], forced_grad: bool):
        """Watch parameters.

        Args:
            labels: ``id`` of every watched parameter mapped to its name.
            forced_grad: Whether autograd is off for the whole pass (then every
                other function of a parameter is checked with autograd on);
                otherwise functions called while the model itself turned
                autograd off are no uses.
        """
        super().__init__()
        self._labels = labels
        self._forced_grad = forced_grad
        self._views: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (param, W.T)

    def watched(self, tensor) -> bool:
        """Return whether an object is a watched parameter.

        Args:
            tensor: Any object.

        Returns:
            Whether it is one of the watched tensors.
        """
        return isinstance(tensor, Tensor) and id(tensor) in self._labels

    def label(self, tensor: Tensor) -> str:
        """Return the name of a watched parameter (or of a transpose's parameter).

        Args:
            tensor: A watched parameter, or the transpose of one.

        Returns:
            The parameter's name.
        """
        return self._labels[id(self.parameter(tensor))]

    def parameter(self, tensor: Tensor) -> Tensor:
        """Return the watched parameter of a transpose (or the parameter itself).

        Args:
            tensor: A watched parameter, or the transpose of one.

        Returns:
            The parameter.
        """
        return self._views[id(tensor)][0] if id(tensor) in self._views else tensor

    @torch_compiler_disable
    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Dispatch a PyTorch function call: use, lookup, or other function.

        Args:
            func: The called function.
            types: Tensor subclasses of the arguments (unused).
            args: Positional arguments.
            kwargs: Keyword arguments.

        Returns:
            The function's result (with a probe added for uses).
        """
        kwargs = kwargs or {}
        call = linear_call(func, args, kwargs)
        if call is not None and (self.watched(call[2]) or self.watched(call[3])):
            if self.watched(call[1]):
                self._unsupported(func, [call[1]])
            return self._on_linear_call(func, args, kwargs, call)
        watched = self._watched_among(args, kwargs)
        if not watched:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in CELLS:  # recurrent cells: two linear maps each
            return CELLS[name](self._linear, *args, **kwargs)
        call = self._transposed_weight_call(name, args, kwargs)
        if call is not None:  # x @ W.T
            return self._on_linear_call(func, args, kwargs, call)
        if self._transposes(name, args, watched):
            result = func(*args, **kwargs)
            self._views[id(result)] = (args[0], result)  # keeps the id unique
            return result
        table = looked_up(func, args, kwargs)
        if table is not None and self.watched(table) and len(watched) == 1:
            self._on_lookup(func, table)
            return func(*args, **kwargs)
        return self._other(func, args, kwargs, watched)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Evaluate ``linear(x, weight, bias)`` as a call the mode sees.

        Args:
            x: Input.
            weight: Weight.
            bias: Bias, or ``None``.

        Returns:
            The output (with a probe added for uses).
        """
        return self.__torch_function__(functional.linear, (), (x, weight, bias))

    def _watched_among(self, args: tuple, kwargs: dict) -> list[Tensor]:
        """Return the watched parameters among a call's arguments.

        Tensors and lists or tuples of tensors are checked directly (the common
        case, and fast), other containers through their leaves.

        Args:
            args: Positional arguments.
            kwargs: Keyword arguments.

        Returns:
            The watched parameters, in argument order.
        """
        found = []
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                if id(value) in self._labels or id(value) in self._views:
                    found.append(value)
            elif isinstance(value, (list, tuple, dict)):
                found.extend(
                    t
                    for t in tree_leaves(value)
                    if self.watched(t)
                    or (isinstance(t, Tensor) and id(t) in self._views)
                )
        return found

    def _transposes(self, name: str, args: tuple, watched: list[Tensor]) -> bool:
        """Return whether a call transposes a 2d parameter (``W.T``, ``W.t()``).

        Args:
            name: Name of the function.
            args: Positional arguments.
            watched: The watched tensors among the arguments.

        Returns:
            Whether the call is a transpose of one watched matrix.
        """
        if name not in TRANSPOSES or len(watched) != 1 or watched[0] is not args[0]:
            return False
        if not self.watched(args[0]):  # a transpose of a transpose
            return False
        dims = args[1:] if name.endswith("transpose") else (0, 1)
        return args[0].ndim == 2 and {d % 2 for d in dims} == {0, 1}

    def _transposed_weight_call(self, name: str, args: tuple, kwargs: dict):
        """Recognize ``x @ W.T`` (``matmul``) as the linear map ``linear(x, W)``.

        Args:
            name: Name of the function.
            args: Positional arguments.
            kwargs: Keyword arguments.

        Returns:
            ``(kind, x, weight, bias, conv)`` as :func:`linear_call` returns it,
            or ``None`` for other calls.
        """
        if name not in MATMULS or len(args) != 2 or kwargs:
            return None
        x, view = args
        if not isinstance(view, Tensor) or id(view) not in self._views:
            return None
        if self.watched(x) or id(x) in self._views:
            return None
        return LINEAR, x, self._views[id(view)][0], None, None

    def _other(self, func, args: tuple, kwargs: dict, watched: list[Tensor]):
        """Run a function that receives parameters; report it if it depends on them.

        Args:
            func: The function.
            args: Positional arguments.
            kwargs: Keyword arguments.
            watched: The watched parameters (or transposes) among the arguments.

        Returns:
            The result (after :meth:`_unsupported` if an output tensor requires
            grad).
        """
        if not (self._forced_grad or is_grad_enabled()):
            return func(*args, **kwargs)  # the model turned autograd off itself
        with enable_grad():
            result = func(*args, **kwargs)
        if any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(result)):
            self._unsupported(func, watched)
        return result

    def _unsupported(self, func, watched: list[Tensor]):
        """Handle a function other than a linear map that depends on parameters.

        Args:
            func: The function.
            watched: The watched parameters (or transposes) it receives.

        Raises:
            NotImplementedError: Naming the function and the first parameter.
        """
        raise NotImplementedError(
            unsupported_message(op_name(func), self.label(watched[0]))
        )

    def _on_linear_call(self, func, args: tuple, kwargs: dict, call: tuple):
        """Handle a linear map or convolution with a watched weight or bias.

        Args:
            func: The function.
            args: Positional arguments.
            kwargs: Keyword arguments.
            call: ``(kind, x, weight, bias, conv)`` from :func:`linear_call`.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError

    def _on_lookup(self, func, table: Tensor):
        """Handle a lookup of a watched matrix.

        Args:
            func: The function.
            table: The looked-up matrix.

        Raises:
            NotImplementedError: Must be implemented by subclasses.
        """
        raise NotImplementedError


class LayerUses(ParameterUses):
    """Record the uses of KFAC's layers in a forward pass (inputs and probes).

    After the forward pass, ``uses`` maps every layer that was used to its uses in
    call order.
    """

    def __init__(
        self,
        mapping: dict[str, dict[str, int]],
        params: list[Tensor],
        labels: list[str],
        probes: bool,
    ):
        """Watch the parameters of KFAC's layers.

        Args:
            mapping: Layer names mapped to ``{'weight': i, 'bias': j}`` (positions in
                ``params``, the roles present).
            params: The parameters.
            labels: Names of the parameters, for messages.
            probes: Whether to add probes (for a backward pass); without, autograd
                is off for the pass.
        """
        super().__init__(
            {id(p): label for p, label in zip(params, labels)}, forced_grad=not probes
        )
        self._mapping, self._probes = mapping, probes
        self._roles = {
            id(params[position]): (layer, role)
            for layer, roles in mapping.items()
            for role, position in roles.items()
        }
        self.uses: dict[str, list[Use]] = {}

    def _on_linear_call(self, func, args: tuple, kwargs: dict, call: tuple):
        """Record a use: input and output shape, and a probe on the output.

        Args:
            func: The function.
            args: Positional arguments.
            kwargs: Keyword arguments.
            call: ``(kind, x, weight, bias, conv)``.

        Returns:
            The output, plus the probe.
        """
        kind, x, weight, bias, conv = call
        layer = self._layer(func, weight, bias)
        output = func(*args, **kwargs)
        if self._probes and not is_grad_enabled():
            return output  # inside the model's no_grad: not a use
        use = Use(kind, x.detach(), output.shape, conv)
        self.uses.setdefault(layer, []).append(use)
        if self._probes:
            use.probe = zeros_like(output, requires_grad=True)
            output = output + use.probe
        return output

    def _layer(self, func, weight: Tensor, bias: Tensor | None) -> str:
        """Find the layer of a call and check its parameters' roles.

        Args:
            func: The called function (named in messages).
            weight: The call's weight.
            bias: The call's bias, or ``None``.

        Returns:
            The layer's name.

        Raises:
            NotImplementedError: If the call's weight and bias are not those of one
                layer of the mapping.
        """
        found = [
            (self._roles.get(id(t)), role, t)
            for t, role in ((weight, "weight"), (bias, "bias"))
            if self.watched(t)
        ]
        layer = found[0][0][0]
        for (owner, owner_role), role, tensor in found:
            if (owner, owner_role) != (layer, role):
                raise NotImplementedError(
                    f"Parameter {self.label(tensor)!r} is the {owner_role} of KFAC's "
                    f"layer {owner!r}, but a call of {op_name(func)!r} uses it as "
                    f"{role} with the parameters of layer {layer!r}."
                )
        missing = set(self._mapping[layer]) - {role for _, role, _ in found}
        if missing:
            raise NotImplementedError(
                f"A call of {op_name(func)!r} uses KFAC's layer {layer!r} without its "
                f"{missing.pop()}: every use of a layer must use all its parameters."
            )
        return layer

    def _on_lookup(self, func, table: Tensor):
        """Accept lookups of layer weights (left out of KFAC), reject others.

        Args:
            func: The function.
            table: The looked-up matrix.

        Raises:
            NotImplementedError: If the matrix is not the weight of a layer.
        """
        if self._roles[id(table)][1] != "weight":
            raise NotImplementedError(
                unsupported_message(op_name(func), self.label(table))
            )
