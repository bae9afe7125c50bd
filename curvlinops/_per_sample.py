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

- *layers*: parameters of ``Linear`` and ``Conv2d`` layers (of exactly these types,
  used only through their call) take one forward pass, hooked to record the
  layers' inputs, and one backward pass batched over the :math:`K` vectors to the
  layers' outputs. A layer that multiplies each datum's input once (no sequence
  or spatial positions) gets its per-datum gradients
  :math:`\mathbf{g}_{k,n} \mathbf{a}_n^\top` squared in closed form,
  :math:`\sum_{k,n} \mathbf{g}_{k,n}^{\odot 2} (\mathbf{a}_n^{\odot 2})^\top`,
  one matrix product (as in BackPACK's ``DiagGGN``, `Dangel et al., 2020
  <https://arxiv.org/abs/1912.10985>`_); with positions, the per-datum gradients
  are formed in chunks of data points and squared.
- *generic*: all other parameters get per-datum vector-Jacobian products from
  :func:`torch.func.vmap` over data points of :func:`torch.func.vjp`, batched
  over the :math:`K` vectors, in chunks of data points.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from torch import Tensor, cat, einsum, no_grad, zeros, zeros_like
from torch.func import vjp as func_vjp
from torch.func import vmap
from torch.nn import Conv2d, Linear, Module
from torch.nn.modules.batchnorm import _BatchNorm

from curvlinops._autodiff import vjp
from curvlinops.kfac_utils import extract_patches
from curvlinops.utils import make_functional_call, parameter_names

#: Most entries of per-datum gradients held at once (chunks of data points).
CHUNK_ENTRIES = 2**24


class SquaredGradientSums:
    """Sums of squared per-datum gradients of a model's output along given vectors.

    Build once per model and parameters; call per mini-batch.
    """

    def __init__(self, model: Module, params: list[Tensor]):
        """Assign every parameter to the layer path or the generic path.

        Args:
            model: The neural network.
            params: Parameters of the model, in the order of the results.

        Raises:
            TypeError: If the model is not a ``torch.nn.Module``.
            ValueError: If a parameter is not part of the model, or a BatchNorm
                layer is in train mode.
        """
        if not isinstance(model, Module):
            raise TypeError(
                "Per-datum gradients need the model as a torch.nn.Module, got "
                f"{type(model).__name__}."
            )
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and module.training:
                raise ValueError(
                    f"BatchNorm layer {name!r} is in train mode, where it couples the "
                    "data points of a mini-batch; per-datum gradients need "
                    "`model.eval()`."
                )
        names = parameter_names(model, params)
        self._model, self._params = model, list(params)
        self._layers = _layer_roles(model, self._params)
        in_layers = {i for roles in self._layers.values() for i in roles.values()}
        self._generic = [i for i in range(len(params)) if i not in in_layers]
        self._functional = make_functional_call(
            model, [names[i] for i in self._generic]
        )

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
        result = [zeros_like(p) for p in self._params]
        if self._layers:
            V = self._layer_pass(X, batch_size, make_vectors, result)
        else:
            with no_grad():
                V = make_vectors(self._model(X))
        if self._generic:
            sums = self._generic_pass(X, batch_size, V)
            for idx, s in zip(self._generic, sums):
                result[idx] = s
        return result

    def _layer_pass(self, X, batch_size, make_vectors, result) -> Tensor:
        """Run the hooked forward and the batched backward pass; fill layer entries.

        Args:
            X: Mini-batch input.
            batch_size: Number of data points.
            make_vectors: See :meth:`__call__`.
            result: Per-parameter results, filled in place.

        Returns:
            The vectors ``[K, *output.shape]``.
        """
        calls: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in self._layers}
        modules = dict(self._model.named_modules())

        def make_hook(name: str):
            def hook(module: Module, args: tuple, output: Tensor) -> Tensor:
                probe = zeros_like(output, requires_grad=True)
                calls[name].append((args[0].detach(), probe))
                return output + probe

            return hook

        handles = [
            modules[name].register_forward_hook(make_hook(name))
            for name in self._layers
        ]
        try:
            output = self._model(X)
        finally:
            for handle in handles:
                handle.remove()
        V = make_vectors(output)
        probes = [probe for layer in calls.values() for _, probe in layer]
        grads = iter(vjp([output], probes, [V], retain_graph=False) if probes else [])
        for name, layer_calls in calls.items():
            records = [(x, next(grads)) for x, _ in layer_calls]
            roles = self._layers[name]
            sums = _layer_sums(modules[name], records, batch_size, list(roles))
            for role, idx in roles.items():
                result[idx] = sums[role]
        return V

    def _generic_pass(
        self, X: Tensor | MutableMapping, batch_size: int, V: Tensor
    ) -> list[Tensor]:
        """Square per-datum vector-Jacobian products of the other parameters.

        Args:
            X: Mini-batch input.
            batch_size: Number of data points.
            V: Vectors ``[K, *output.shape]``.

        Returns:
            One sum per generic parameter.
        """
        params = [self._params[i] for i in self._generic]
        num_entries = V.shape[0] * sum(p.numel() for p in params)
        chunk_size = max(1, CHUNK_ENTRIES // num_entries)

        dims = _datum_dims(X, batch_size)

        def per_datum(x, v: Tensor) -> list[Tensor]:
            def output(*ps: Tensor) -> Tensor:
                return self._functional(*ps, _with_batch_axis(x, dims))

            _, pullback = func_vjp(output, *params)
            grads = vmap(pullback)(v.unsqueeze(1))
            return [g.square().sum(0) for g in grads]

        X = dict(X) if isinstance(X, MutableMapping) else X
        sums = vmap(per_datum, in_dims=(dims, 1), chunk_size=chunk_size)(X, V)
        return [s.sum(0) for s in sums]


def _layer_roles(model: Module, params: list[Tensor]) -> dict[str, dict[str, int]]:
    """Find the parameters that the layer path handles.

    Args:
        model: The neural network.
        params: The parameters.

    Returns:
        Layer names mapped to ``{'weight': i, 'bias': j}`` (positions in
        ``params``), for ``Linear`` and zero-padded ``Conv2d`` layers of exactly
        these types, without replaced ``forward``, whose parameters no other module
        shares.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    position = {id(p): i for i, p in enumerate(params)}
    layers = {}
    for name, module in model.named_modules():
        if not _is_supported_layer(module):
            continue
        roles = {
            role: position[id(p)]
            for role, p in module.named_parameters(recurse=False)
            if id(p) in position and owners[id(p)] == 1
        }
        if roles:
            layers[name] = roles
    return layers


def _is_supported_layer(module: Module) -> bool:
    """Return whether a module's per-datum gradients have the layer path's form.

    Args:
        module: A module.

    Returns:
        Whether it is a ``Linear`` or zero-padded ``Conv2d`` layer (exact types)
        with its class's ``forward``.
    """
    if "forward" in vars(module):
        return False
    if type(module) is Conv2d:
        return module.padding_mode == "zeros"
    return type(module) is Linear


def _layer_sums(
    module: Module,
    records: list[tuple[Tensor, Tensor]],
    batch_size: int,
    roles: list[str],
) -> dict[str, Tensor]:
    """Sum a layer's squared per-datum gradients over its calls, data and vectors.

    Args:
        module: A ``Linear`` or ``Conv2d`` layer.
        records: Per call, the input and the gradients ``[K, *output.shape]`` w.r.t.
            the output.
        batch_size: Number of data points ``B``.
        roles: The parameters to compute, ``'weight'`` and/or ``'bias'``.

    Returns:
        Squared sums by role, of the parameters' shapes (zeros if the layer was not
        called).
    """
    if not records:
        return {role: zeros_like(getattr(module, role)) for role in roles}
    if isinstance(module, Conv2d):
        grads = [g.flatten(start_dim=3).transpose(2, 3) for _, g in records]
        inputs = [x for x, _ in records]
    else:
        grads = [g.reshape(len(g), batch_size, -1, g.shape[-1]) for _, g in records]
        inputs = [x.reshape(batch_size, -1, x.shape[-1]) for x, _ in records]
    sums = {}
    if "bias" in roles:  # grads [K, B, P, C_out]
        sums["bias"] = sum(g.sum(2) for g in grads).square().sum((0, 1))
    if "weight" in roles:
        weight_sum = (
            _conv2d_weight_sum if isinstance(module, Conv2d) else _linear_weight_sum
        )
        sums["weight"] = weight_sum(module, inputs, grads)
    return sums


def _linear_weight_sum(module: Linear, inputs: list[Tensor], grads: list[Tensor]):
    """Sum a Linear layer's squared per-datum weight gradients.

    Args:
        module: The layer.
        inputs: Per call, inputs ``[B, P, D_in]``.
        grads: Per call, output gradients ``[K, B, P, D_out]``.

    Returns:
        ``[D_out, D_in]``.
    """
    return squared_gradient_sum(_join(inputs, 1), _join(grads, 2))


def _conv2d_weight_sum(module: Conv2d, inputs: list[Tensor], grads: list[Tensor]):
    """Sum a Conv2d layer's squared per-datum weight gradients, group by group.

    Args:
        module: The layer.
        inputs: Per call, inputs ``[B, C_in, I1, I2]``.
        grads: Per call, output gradients ``[K, B, P, C_out]`` (``P = O1 O2``).

    Returns:
        The weight's shape ``[C_out, C_in / groups, K1, K2]``.
    """
    groups = module.groups
    hyperparameters = (module.kernel_size, module.stride, module.padding)
    patches, outputs = [[] for _ in range(groups)], [[] for _ in range(groups)]
    for x, g in zip(inputs, grads):
        for j, (x_j, g_j) in enumerate(zip(x.chunk(groups, 1), g.chunk(groups, 3))):
            patches[j].append(
                extract_patches(x_j, *hyperparameters, module.dilation, 1)
            )
            outputs[j].append(g_j)
    weight = cat(
        [
            squared_gradient_sum(_join(a, 1), _join(g, 2))
            for a, g in zip(patches, outputs)
        ]
    )
    return weight.reshape(module.weight.shape)


def _join(tensors: list[Tensor], dim: int) -> Tensor:
    """Concatenate the records of a layer's calls (no copy for a single call).

    Args:
        tensors: One tensor per call.
        dim: The positions axis.

    Returns:
        The tensors joined along the positions axis.
    """
    return tensors[0] if len(tensors) == 1 else cat(tensors, dim)


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
