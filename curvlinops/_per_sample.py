r"""Sums of squared per-datum gradients, for many backpropagated vectors at once.

For a model :math:`f_{\mathbf{\theta}}`, a mini-batch :math:`\mathbf{x}_1, \dots,
\mathbf{x}_B` and :math:`K` output-space vectors :math:`\mathbf{v}_{k,n}` per datum,
:class:`SquaredGradientSums` computes, for every parameter,

.. math::
    \sum_{n=1}^B \sum_{k=1}^K \left(\mathbf{J}_n^\top \mathbf{v}_{k,n}\right)^{\odot 2},
    \qquad
    \mathbf{J}_n = \frac{\partial f_{\mathbf{\theta}}(\mathbf{x}_n)}
    {\partial \mathbf{\theta}},

the entry-wise squares of per-datum gradients (with :math:`\mathbf{v}_{k,n}` the
columns of a square root of the loss Hessian, this is the GGN's diagonal). The
data points must not interact (no BatchNorm in train mode). Two paths:

- *layers*: parameters that the forward pass uses only as weights or biases of
  linear maps and 2d convolutions (``torch.nn.functional.linear`` and ``conv2d``
  as in ``Linear`` and ``Conv2d`` layers, ``x @ W.T``, recurrent cells; also
  several times, by any module or function) take one forward pass, in which a
  torch function mode (:class:`LinearUses`, see :mod:`curvlinops._kfac_uses`)
  records every such call's input, and one backward pass batched over the
  :math:`K` vectors to the calls' outputs. A weight that multiplies each datum's
  input once (no sequence or spatial positions, one call) gets its per-datum
  gradients :math:`\mathbf{g}_{k,n} \mathbf{a}_n^\top` squared in closed form,
  :math:`\sum_{k,n} \mathbf{g}_{k,n}^{\odot 2} (\mathbf{a}_n^{\odot 2})^\top`,
  one matrix product (as in BackPACK's ``DiagGGN``, `Dangel et al., 2020
  <https://arxiv.org/abs/1912.10985>`_); with positions or several calls, the
  per-datum gradients (summed over the calls) are formed in chunks of data
  points and squared.
- *generic*: all other parameters (used by other functions, looked up, or not
  seen at all) get per-datum vector-Jacobian products from :func:`torch.func.vmap`
  over data points of :func:`torch.func.vjp`, batched over the :math:`K` vectors,
  in chunks of data points.

Every mini-batch's forward pass decides anew which parameters take which path.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from torch import Tensor, cat, einsum, is_grad_enabled, zeros, zeros_like
from torch.func import vjp as func_vjp
from torch.func import vmap
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

from curvlinops._autodiff import vjp
from curvlinops._functional import FunctionalModel, functional_form, parameter_labels
from curvlinops._kfac_calls import CONV2D, Use
from curvlinops._kfac_pass import output_grad_rows, per_datum_input_rows
from curvlinops._kfac_uses import ParameterUses
from curvlinops.utils import parameter_names

#: Most entries of per-datum gradients held at once (chunks of data points).
CHUNK_ENTRIES = 2**24


class LinearUses(ParameterUses):
    """Record the linear uses of parameters (with probes), and note all others.

    Attributes:
        calls: Per call of a linear map or 2d convolution with a parameter as
            weight or bias: the use (with a probe on its output) and the positions
            of weight and bias among the parameters (``None`` if not one).
        others: Positions of parameters that the pass also uses otherwise (other
            functions that depend on them, lookups, as a call's input).
    """

    def __init__(self, params: list[Tensor], labels: list[str]):
        """Watch parameters.

        Args:
            params: The parameters.
            labels: Their names.
        """
        super().__init__(dict(zip(map(id, params), labels)), forced_grad=False)
        self._position = {id(p): i for i, p in enumerate(params)}
        self.calls: list[tuple[Use, int | None, int | None]] = []
        self.others: set[int] = set()

    def _on_linear_call(self, func, args: tuple, kwargs: dict, call: tuple):
        """Record a use: its input, and a probe on its output.

        Args:
            func: The function.
            args: Positional arguments.
            kwargs: Keyword arguments.
            call: ``(kind, x, weight, bias, conv)``.

        Returns:
            The output, plus the probe.
        """
        kind, x, weight, bias, conv = call
        output = func(*args, **kwargs)
        if not is_grad_enabled():
            return output  # inside the model's no_grad: not a use
        probe = zeros_like(output, requires_grad=True)
        use = Use(kind, x.detach(), output.shape, conv, probe)
        self.calls.append((use, *(self._position.get(id(t)) for t in (weight, bias))))
        return output + probe

    def _on_lookup(self, func, table: Tensor):
        """Note a lookup (its gradient is not a linear map's).

        Args:
            func: The function.
            table: The looked-up matrix.
        """
        self.others.add(self._position[id(table)])

    def _unsupported(self, func, watched: list[Tensor]):
        """Note parameters that another function depends on.

        Args:
            func: The function.
            watched: The watched parameters (or transposes) it receives.
        """
        self.others.update(self._position[id(self.parameter(t))] for t in watched)

    def layer_uses(self, params: list[Tensor]) -> dict[int, list[tuple[Use, str]]]:
        """Return the parameters of the layer path with their uses and roles.

        Args:
            params: The parameters.

        Returns:
            Positions of the parameters used only as weights (2d for linear maps)
            or only as biases of linear maps and convolutions, with the same
            channel groups in all convolutions, mapped to their uses and role.
        """
        found: dict[int, list[tuple[Use, str]]] = {}
        for use, weight, bias in self.calls:
            for position, role in ((weight, "weight"), (bias, "bias")):
                if position is not None:
                    found.setdefault(position, []).append((use, role))
        return {
            position: uses
            for position, uses in found.items()
            if position not in self.others and _fits(uses, params[position])
        }


def _fits(uses: list[tuple[Use, str]], param: Tensor) -> bool:
    """Return whether the layer path computes a parameter's sums from its uses.

    Args:
        uses: The parameter's uses and roles.
        param: The parameter.

    Returns:
        Whether it has one role, is a matrix if it is a linear map's weight, and
        has the same channel groups in all convolutions.
    """
    roles = {role for _, role in uses}
    if len(roles) > 1 or len({use.kind for use, _ in uses}) > 1:
        return False
    if roles == {"weight"} and uses[0][0].kind != CONV2D:
        return param.ndim == 2
    return len({use.conv[-1] for use, _ in uses if use.conv is not None}) <= 1


class SquaredGradientSums:
    """Sums of squared per-datum gradients of a model's output along given vectors.

    Build once per model and parameters; call per mini-batch.
    """

    def __init__(self, model: Module | FunctionalModel, params: list[Tensor]):
        """Check the model.

        Args:
            model: The neural network: a ``torch.nn.Module``, or a functional
                model with bound parameters (see :mod:`curvlinops._functional`).
            params: Parameters of the model, in the order of the results.

        Raises:
            TypeError: If the model is neither.
            ValueError: If a parameter is not part of the model, or a BatchNorm
                layer is in train mode.
        """
        if not isinstance(model, (Module, FunctionalModel)):
            raise TypeError(
                "Per-datum gradients need the model as a torch.nn.Module, or as "
                "model_func(params, X) with a dictionary of parameters, got "
                f"{type(model).__name__}."
            )
        for name, module in model.named_modules() if isinstance(model, Module) else []:
            if isinstance(module, _BatchNorm) and module.training:
                raise ValueError(
                    f"BatchNorm layer {name!r} is in train mode, where it couples the "
                    "data points of a mini-batch; per-datum gradients need "
                    "`model.eval()`."
                )
        if isinstance(model, Module):
            parameter_names(model, params)  # raises for foreign parameters
        self._labels = parameter_labels(model, params)
        self._model, self._params = model, list(params)
        self._functionals: dict[tuple[int, ...], Callable] = {}
        #: Positions of the parameters the last call computed on the layer path.
        self.layer_params: set[int] = set()

    def __call__(
        self,
        X: Tensor | MutableMapping,
        batch_size: int,
        make_vectors: Callable[[Tensor], Tensor],
    ) -> list[Tensor]:
        r"""Sum the squared per-datum gradients along vectors made from the output.

        Args:
            X: Mini-batch input (a tensor or a mapping of tensors, whose entries
                with leading axis ``batch_size`` are split into data points).
            batch_size: Number of data points ``B``.
            make_vectors: Maps the model output (which it must not differentiate;
                it checks that it is a tensor) to the vectors
                ``[K, *output.shape]``; vector ``k`` holds :math:`\mathbf{v}_{k,n}`
                at datum ``n``.

        Returns:
            One tensor per parameter, of its shape.
        """
        recorder = LinearUses(self._params, self._labels)
        with recorder:
            output = self._model(X)
        V = make_vectors(output)
        layer_uses = recorder.layer_uses(self._params)
        self.layer_params = set(layer_uses)
        result = [zeros_like(p) for p in self._params]
        if layer_uses:
            self._layer_pass(output, V, layer_uses, batch_size, result)
        generic = [i for i in range(len(self._params)) if i not in layer_uses]
        if generic:
            for idx, s in zip(generic, self._generic_pass(X, batch_size, V, generic)):
                result[idx] = s
        return result

    def _layer_pass(
        self,
        output: Tensor,
        V: Tensor,
        layer_uses: dict[int, list[tuple[Use, str]]],
        batch_size: int,
        result: list[Tensor],
    ):
        """Backpropagate the vectors to the uses' outputs; fill the layer entries.

        Args:
            output: The model output (with the probes in its graph).
            V: The vectors ``[K, *output.shape]``.
            layer_uses: The parameters of the layer path, with uses and roles.
            batch_size: Number of data points.
            result: Per-parameter results, filled in place.
        """
        uses = list({id(u): u for us in layer_uses.values() for u, _ in us}.values())
        grads = vjp([output], [u.probe for u in uses], [V], retain_graph=False)
        grad_of = {id(u): g for u, g in zip(uses, grads)}
        for position, param_uses in layer_uses.items():
            calls = [u for u, _ in param_uses]
            g = output_grad_rows(
                calls, [grad_of[id(u)] for u in calls], batch_size, "expand"
            )
            if param_uses[0][1] == "bias":  # rows [K, B, R, C_out]
                result[position] = g.sum(2).square().sum((0, 1))
            else:
                result[position] = _weight_sum(
                    calls, g, batch_size, self._params[position]
                )

    def _generic_pass(
        self, X: Tensor | MutableMapping, batch_size: int, V: Tensor, generic: list[int]
    ) -> list[Tensor]:
        """Square per-datum vector-Jacobian products of the other parameters.

        Args:
            X: Mini-batch input.
            batch_size: Number of data points.
            V: Vectors ``[K, *output.shape]``.
            generic: Positions of the parameters.

        Returns:
            One sum per generic parameter.
        """
        params = [self._params[i] for i in generic]
        if tuple(generic) not in self._functionals:
            self._functionals[tuple(generic)] = functional_form(self._model, params)
        functional = self._functionals[tuple(generic)]
        num_entries = V.shape[0] * sum(p.numel() for p in params)
        chunk_size = max(1, CHUNK_ENTRIES // num_entries)

        dims = _datum_dims(X, batch_size)

        def per_datum(x, v: Tensor) -> list[Tensor]:
            def output(*ps: Tensor) -> Tensor:
                return functional(*ps, _with_batch_axis(x, dims))

            _, pullback = func_vjp(output, *params)
            grads = vmap(pullback)(v.unsqueeze(1))
            return [g.square().sum(0) for g in grads]

        X = dict(X) if isinstance(X, MutableMapping) else X
        sums = vmap(per_datum, in_dims=(dims, 1), chunk_size=chunk_size)(X, V)
        return [s.sum(0) for s in sums]


def _weight_sum(uses: list[Use], g: Tensor, batch_size: int, weight: Tensor) -> Tensor:
    """Sum a weight's squared per-datum gradients over its uses, data and vectors.

    Args:
        uses: The weight's uses (linear maps or convolutions).
        g: Their output-gradient rows ``[K, B, R, D_out]``, joined over the uses.
        batch_size: Number of data points ``B``.
        weight: The weight.

    Returns:
        The sums, of the weight's shape.
    """
    a = per_datum_input_rows(uses, batch_size, append_ones=False)
    if a.ndim == 3:  # [B, R, D_in]
        return squared_gradient_sum(a, g).reshape(weight.shape)
    groups = a.shape[1]  # [B, groups, R, D_in]: each group's channels, its patches
    g = g.unflatten(-1, (groups, -1))
    sums = [squared_gradient_sum(a[:, j], g[..., j, :]) for j in range(groups)]
    return cat(sums).reshape(weight.shape)


def squared_gradient_sum(inputs: Tensor, grads: Tensor) -> Tensor:
    r"""Sum the squares of per-datum weight gradients of a linear map with positions.

    The gradient of datum :math:`n` along vector :math:`k` is
    :math:`\mathbf{G}_{k,n} = \sum_p \mathbf{g}_{k,n,p} \mathbf{a}_{n,p}^\top`.

    Args:
        inputs: Inputs :math:`\mathbf{a}_{n,p}`, ``[B, P, I]``.
        grads: Output gradients :math:`\mathbf{g}_{k,n,p}`, ``[K, B, P, O]``.

    Returns:
        :math:`\sum_{k,n} \mathbf{G}_{k,n}^{\odot 2}`, ``[O, I]``. For ``P = 1``
        one matrix product; else the gradients are formed for chunks of data points.
    """
    num_vectors, batch_size, num_positions, out_dim = grads.shape
    if num_positions == 1:
        return grads[:, :, 0].square().sum(0).T @ inputs[:, 0].square()
    chunk = max(1, CHUNK_ENTRIES // (num_vectors * out_dim * inputs.shape[-1]))
    result = zeros(out_dim, inputs.shape[-1], dtype=inputs.dtype, device=inputs.device)
    for start in range(0, batch_size, chunk):
        stop = start + chunk
        per_datum = einsum("kbpo,bpi->kboi", grads[:, start:stop], inputs[start:stop])
        result += per_datum.square().sum((0, 1))
    return result


def _datum_dims(X: Tensor | MutableMapping, batch_size: int):
    """Return the ``in_dims`` that split an input into data points.

    Args:
        X: Mini-batch input: a tensor, or a mapping whose tensors with leading axis
            ``batch_size`` hold one entry per datum (other entries are shared).
        batch_size: Number of data points.

    Returns:
        ``0`` for a tensor; for a mapping, a dict with ``0`` or ``None`` per entry.
    """
    if isinstance(X, Tensor):
        return 0
    return {
        key: 0
        if isinstance(v, Tensor) and v.ndim > 0 and len(v) == batch_size
        else None
        for key, v in X.items()
    }


def _with_batch_axis(x, dims):
    """Give one datum's input (tensor or mapping) a batch axis of size one.

    Args:
        x: A datum's input inside :func:`torch.func.vmap`.
        dims: The ``in_dims`` of the input (see :func:`_datum_dims`).

    Returns:
        The input as a batch of one; shared mapping entries stay as they are.
    """
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    return {k: v if dims[k] is None else v.unsqueeze(0) for k, v in x.items()}
