"""Batched Jacobian and Hessian products that fall back when derivatives are missing.

Every curvature product is built from three primitives, each batched over ``K``
columns in one call (leading column axis here, unlike the trailing axis of the
public tensor-list format):

- :func:`vjp`: transposed-Jacobian products ``J^T V`` by one (batched) backward pass,
- :func:`jvp`: Jacobian products ``J M``, by forward-mode AD through
  :func:`torch.func.jvp`, or by the reverse-over-reverse trick
  ``J M = d/du <J^T u, M>``,
- :func:`hvp`: Hessian products by reverse-over-reverse differentiation.

Some operations lack forward-mode derivatives (user-defined ``autograd.Function``
without ``jvp``) or second derivatives (the fused CPU/GPU kernels of
``scaled_dot_product_attention``). :class:`DifferentiationModes` tries the fast mode
first and, when PyTorch reports a missing derivative, retries with our own rules for
the fused attention kernels (:mod:`curvlinops._attention`), with reverse mode, and
finally with the composite (``MATH``) attention kernel, remembering what worked.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from threading import RLock
from types import MethodType

from torch import Tensor, cat, no_grad, zeros, zeros_like
from torch.autograd import forward_ad, grad
from torch.compiler import is_compiling
from torch.func import jvp as func_jvp
from torch.func import vmap
from torch.nn import Conv1d, Conv2d, Conv3d, Linear, Module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import linear
from torch.nn.modules.conv import _ConvNd

from curvlinops._attention import attention_rules
from curvlinops._columns import LOOP_MARGIN, ColumnPolicy, clock, stack_columns
from curvlinops._functional import functional_form

# Forward-mode AD levels are global to the process: threads take turns.
_FORWARD_AD = RLock()


def unpack_columns(M: tuple) -> list[Tensor]:
    """Return the matrix a per-batch product function received, as a list.

    The functions of the ``make_batch_*`` builders take the matrix unpacked,
    ``mp(X, y, *M)``, or packed as one tuple or list, ``mp(X, y, M)``.

    Args:
        M: The positional arguments that hold the matrix.

    Returns:
        The tensors of the matrix in tensor-list format.

    Raises:
        TypeError: If the arguments are neither tensors nor one tuple of tensors.
    """
    if len(M) == 1 and isinstance(M[0], (tuple, list)):
        M = M[0]
    if not M or not all(isinstance(m, Tensor) for m in M):
        raise TypeError(
            "Expected the matrix as tensors (one per parameter, with a trailing "
            f"column axis), got {[type(m).__name__ for m in M]}."
        )
    return list(M)


def vjp(
    outputs: list[Tensor],
    inputs: list[Tensor],
    V: list[Tensor],
    retain_graph: bool = True,
    columns: ColumnPolicy | None = None,
    kind: str = "vjp",
) -> list[Tensor]:
    """Multiply the transposed Jacobian of ``outputs`` onto ``K`` columns.

    Args:
        outputs: Tensors that depend differentiably on ``inputs``.
        inputs: Tensors to differentiate with respect to.
        V: One tensor per output, of shape ``[K, *output.shape]``.
        retain_graph: Keep the graph for further backward passes.
        columns: Chooses between one batched backward pass and one pass per
            column (see :class:`ColumnPolicy`). ``None``: batched.
        kind: Name of the pass for ``columns`` (passes of different kinds may
            prefer different ways).

    Returns:
        One tensor per input, of shape ``[K, *input.shape]``; zeros for inputs the
        outputs do not depend on.
    """
    num_cols = V[0].shape[0]
    pairs = [(o, v) for o, v in zip(outputs, V) if o.requires_grad]
    if not pairs:
        return [
            zeros(num_cols, *x.shape, dtype=x.dtype, device=x.device) for x in inputs
        ]
    outs, vs = zip(*pairs)

    def batched() -> list[Tensor]:
        return _grad(outs, inputs, vs, retain_graph)

    def column(k: int, last: bool) -> list[Tensor]:
        return _grad(outs, inputs, [v[k : k + 1] for v in vs], retain_graph or not last)

    if columns is None or num_cols == 1:
        return batched()
    return columns.choose(kind, vs[0], batched, column, stack_columns)


def _grad(outs, inputs, vs, retain_graph: bool) -> list[Tensor]:
    """One (batched) backward pass for columns ``vs[i]`` of shape ``[K, *out.shape]``.

    Args:
        outs: Outputs that require grad.
        inputs: Tensors to differentiate with respect to.
        vs: Columns, one tensor per output.
        retain_graph: Keep the graph.

    Returns:
        One tensor ``[K, *input.shape]`` per input.
    """
    num_cols = vs[0].shape[0]
    batched = num_cols > 1
    result = grad(
        outs,
        inputs,
        vs if batched else [v.squeeze(0) for v in vs],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    # unused inputs (``None``) get zeros with the column axis
    return [
        zeros(num_cols, *x.shape, dtype=x.dtype, device=x.device)
        if r is None
        else (r if batched else r.unsqueeze(0))
        for r, x in zip(result, inputs)
    ]


def hvp(
    loss: Tensor,
    param_blocks: list[list[Tensor]],
    M_blocks: list[list[Tensor]],
    columns: ColumnPolicy | None = None,
):
    """Multiply the (block-diagonal) Hessian of a scalar onto ``K`` columns.

    One backward pass with ``create_graph=True`` gives the gradient; a second one per
    block differentiates the gradient's inner product with the columns.

    Args:
        loss: Scalar to differentiate twice.
        param_blocks: Parameters, grouped into the diagonal blocks.
        M_blocks: Columns per block, tensors of shape ``[K, *param.shape]``.
        columns: Chooses how the second backward pass treats the columns.

    Returns:
        Hessian-matrix products, one tensor ``[K, *param.shape]`` per parameter.
    """
    params = [p for block in param_blocks for p in block]
    gradient = grad(
        loss, params, create_graph=True, allow_unused=True, materialize_grads=True
    )
    result, start = [], 0
    for index, (ps, ms) in enumerate(zip(param_blocks, M_blocks)):
        block = gradient[start : start + len(ps)]
        last = index == len(param_blocks) - 1  # frees the graph as it goes
        result.extend(vjp(block, ps, ms, not last, columns, "hvp"))
        start += len(ps)
    return result


def jvp(
    f: Callable[..., Tensor],
    params: list[Tensor],
    M: list[Tensor],
    forward_mode: bool,
    fast_layers: list[Module] = (),
    columns: ColumnPolicy | None = None,
) -> tuple[Tensor, Tensor]:
    """Evaluate ``f(*params)`` and multiply its Jacobian onto ``K`` columns.

    Args:
        f: Function of the parameters, e.g. a functional model call.
        params: Parameters at which to linearize; they require grad.
        M: One tensor ``[K, *param.shape]`` per parameter.
        forward_mode: Use forward-mode AD (one forward pass that carries tangents)
            instead of the reverse-over-reverse trick.
        fast_layers: Linear and convolution layers of the model ``f`` evaluates
            (see :func:`fast_rule_layers`) that use hand-written forward-mode rules
            for one column (see :func:`_fast_layer_jvps`).
        columns: Chooses between one batched pass and one pass per column (see
            :class:`ColumnPolicy`). ``None``: batched.

    Returns:
        The output of ``f`` (still attached to the parameters' graph, if grad mode
        is on) and the Jacobian-matrix product ``[K, *output.shape]``.
    """
    if not forward_mode:
        output = f(*params)
        return output, _jvp_reverse(output, params, M, columns)
    num_cols = M[0].shape[0]
    if num_cols == 1 and is_compiling():  # dynamo traces torch.func, not duals
        output, JM = func_jvp(f, tuple(params), tuple(m.squeeze(0) for m in M))
        return output, JM.unsqueeze(0)
    if num_cols == 1:
        return _dual_jvp(f, params, M, fast_layers)

    def batched() -> tuple[Tensor, Tensor]:
        def tangents(*ms: Tensor) -> tuple[Tensor, Tensor]:
            return func_jvp(f, tuple(params), ms)

        with nullcontext() if is_compiling() else _FORWARD_AD:  # a level, too
            return vmap(tangents, out_dims=(None, 0))(*M)

    def column(k: int, last: bool) -> tuple[Tensor, Tensor]:
        # the output (and its graph) of the first column serves all columns
        with nullcontext() if k == 0 else no_grad():
            return _dual_jvp(f, params, [m[k : k + 1] for m in M], fast_layers)

    if columns is None:
        return batched()
    return columns.choose("jvp", M[0], batched, column, _combine_jvps)


def _dual_jvp(f, params, M, fast_layers) -> tuple[Tensor, Tensor]:
    """Jacobian product with one column by dual tensors (less overhead than vmap).

    Args:
        f: Function of the parameters.
        params: Parameters.
        M: One tensor ``[1, *param.shape]`` per parameter.
        fast_layers: Layers that use the lean forward-mode rules.

    Returns:
        The output and ``[1, *output.shape]`` (``None`` if the output is not a
        tensor).
    """
    with _FORWARD_AD, forward_ad.dual_level(), _fast_layer_jvps(fast_layers):
        duals = [forward_ad.make_dual(p, m.squeeze(0)) for p, m in zip(params, M)]
        output = f(*duals)
        if not isinstance(output, Tensor):  # for the caller to report
            return output, None
        output, JM = forward_ad.unpack_dual(output)
    return output, (zeros_like(output) if JM is None else JM).unsqueeze(0)


def _combine_jvps(results: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine per-column Jacobian products: the first output, stacked products.

    Args:
        results: Per column, the output and ``[1, *output.shape]``.

    Returns:
        The first column's output and ``[K, *output.shape]``.
    """
    output, JM = results[0]
    return output, (JM if JM is None else cat([JM for _, JM in results]))


def fast_rule_layers(model) -> list[Module]:
    """Return the layers of a model that get the lean forward-mode rule.

    Args:
        model: A ``torch.nn.Module`` or any other callable (which has none).

    Returns:
        Its modules of exactly the types ``Linear`` and ``Conv1d/2d/3d``.
    """
    if not isinstance(model, Module):
        return []
    return [m for m in model.modules() if type(m) in (Linear, Conv1d, Conv2d, Conv3d)]


@contextmanager
def _fast_layer_jvps(layers: list[Module]):
    r"""Give linear and convolution layers a lean forward-mode rule while active.

    PyTorch's forward-mode rules for ``linear`` and ``convolution`` treat a missing
    input tangent as zeros and multiply them anyway, and copy tangents to fit
    layouts. The first layer of every network (its input has no tangent) then does
    a wasted matrix product as large as its forward pass. For a layer
    :math:`\mathbf{z} = g(\mathbf{x}, \mathbf{W}) + \mathbf{b}` that is bilinear in
    input and weight, these rules compute only the terms that exist:
    :math:`\dot{\mathbf{z}} = g(\dot{\mathbf{x}}, \mathbf{W}) + g(\mathbf{x},
    \dot{\mathbf{W}}) + \dot{\mathbf{b}}`. Only modules of exactly the types
    ``Linear`` and ``Conv1d/2d/3d`` are affected (not subclasses, which may change
    ``forward``; nor layers whose ``forward`` was replaced), and only until the
    context exits.

    Args:
        layers: Layers from :func:`fast_rule_layers`.

    Yields:
        Nothing.
    """
    layers = [layer for layer in layers if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = MethodType(_bilinear_layer_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _bilinear_layer_forward(layer: Module, x: Tensor) -> Tensor:
    """Evaluate a linear or convolution layer, carrying tangents term by term.

    Args:
        layer: A ``Linear`` or ``Conv1d/2d/3d`` layer (``self``).
        x: The layer input, possibly a dual tensor.

    Returns:
        The output; a dual tensor if any of input, weight, or bias is one.
    """
    apply = layer._conv_forward if isinstance(layer, _ConvNd) else linear
    (x, x_t), (w, w_t) = forward_ad.unpack_dual(x), forward_ad.unpack_dual(layer.weight)
    b, b_t = (
        forward_ad.unpack_dual(layer.bias) if layer.bias is not None else (None,) * 2
    )
    output = apply(x, w, b)
    terms = [] if x_t is None else [apply(x_t, w, None)]
    if w_t is not None:
        terms.append(apply(x, w_t, b_t))
    elif b_t is not None:
        terms.append((b_t.reshape(-1, *[1] * (output.ndim - 2))).expand_as(output))
    if not terms:
        return output
    return forward_ad.make_dual(output, terms[0] if len(terms) == 1 else sum(terms))


def _jvp_reverse(
    output: Tensor,
    params: list[Tensor],
    M: list[Tensor],
    columns: ColumnPolicy | None = None,
) -> Tensor:
    """Jacobian-matrix product with reverse mode only: ``J M = d/du <J^T u, M>``.

    Args:
        output: Function value, attached to the parameters' graph.
        params: Parameters.
        M: One tensor ``[K, *param.shape]`` per parameter.
        columns: Chooses how the second backward pass treats the columns.

    Returns:
        ``[K, *output.shape]``.
    """
    if not output.requires_grad:
        return zeros(
            M[0].shape[0], *output.shape, dtype=output.dtype, device=output.device
        )
    u = zeros_like(output, requires_grad=True)
    JTu = grad(
        output, params, u, create_graph=True, allow_unused=True, materialize_grads=True
    )
    (JM,) = vjp(list(JTu), [u], M, True, columns, "jvp by reverse mode")
    return JM


def is_missing_derivative(error: Exception) -> bool:
    """Return whether an error says that another differentiation mode may work.

    That is a derivative PyTorch has not implemented, or an in-place update of a
    tensor the model captures (e.g. BatchNorm's running statistics in train mode),
    which ``torch.func`` transforms refuse but plain autograd allows.

    Args:
        error: Error raised during differentiation.

    Returns:
        Whether a different differentiation mode may succeed.
    """
    message = str(error).lower()
    return (
        isinstance(error, NotImplementedError)
        or ("derivative" in message and "not implemented" in message)
        or "forward ad" in message
        or "mutate a captured tensor" in message
    )


@dataclass(frozen=True)
class _Mode:
    """A way to differentiate: forward or reverse mode, and the attention kernels.

    ``attention`` is ``"fused"`` (PyTorch's choice of kernel), ``"rules"`` (fused
    kernels with our derivative rules) or ``"composite"`` (the ``MATH`` kernel).
    """

    forward: bool
    attention: str

    def context(self):
        """Return the context manager that selects the attention kernels.

        Returns:
            Context manager.
        """
        if self.attention == "rules":
            return attention_rules()
        if self.attention == "composite":
            return sdpa_kernel(SDPBackend.MATH)
        return nullcontext()


class DifferentiationModes:
    """Run a computation in the fastest differentiation mode that works; remember it.

    The candidate modes, in order: forward mode (only if allowed) with PyTorch's
    attention kernels, then with the fused kernels and our derivative rules
    (:func:`attention_rules`); the same two for reverse mode; last, both directions
    with the composite attention kernel, whose operations all have forward and
    second derivatives. Where the rules work, the composite kernel is timed against
    them once, and kept if it is faster (short sequences, Hessian products). Under
    ``torch.compile`` there is no fallback: the current direction runs with the
    composite attention kernel.

    Attributes:
        columns: The operator's :class:`ColumnPolicy`, which computations pass to
            the primitives.
    """

    def __init__(self, forward_mode_allowed: bool):
        """Set up the candidate modes.

        Args:
            forward_mode_allowed: Whether forward-mode AD may be tried at all (it
                needs a functional form of the model: a ``torch.nn.Module`` or a
                parameter dictionary with ``model_func(params, X)``).
        """
        directions = [True, False] if forward_mode_allowed else [False]
        self._modes = [
            *(_Mode(d, a) for d in directions for a in ("fused", "rules")),
            *(_Mode(d, "composite") for d in directions),
        ]
        self._current, self._rules_runs, self._composite_votes = 0, 0, []
        self.columns = ColumnPolicy()

    def adopt(self, other: DifferentiationModes):
        """Take over what another instance found (for a copy of its operator).

        Args:
            other: Modes of the same model and parameters (e.g. a deep copy).
        """
        vars(self).update(vars(other))

    def __call__(self, computation: Callable[[bool], object]):
        """Run ``computation(forward_mode)`` in the first mode that succeeds.

        Args:
            computation: Function of a flag that selects forward mode.

        Returns:
            The computation's result.

        Raises:
            RuntimeError: Re-raised if the error is not a missing derivative.
            NotImplementedError: Re-raised if no mode succeeds.
        """
        if is_compiling():
            # Dynamo cannot trace the fallback, so choose the composite attention
            # kernel up front (the compiler fuses it anyway).
            forward = self._modes[self._current].forward
            with _Mode(forward, "composite").context():
                return computation(forward)
        while True:
            mode = self._modes[self._current]
            start = clock()
            try:
                with mode.context() as rules:
                    result = computation(mode.forward)
            except (RuntimeError, NotImplementedError) as error:
                last = self._current == len(self._modes) - 1
                if last or not is_missing_derivative(error):
                    raise
                self._current += 1
                continue
            if mode.attention == "rules" and rules.routed > 0:
                self._rules_runs += 1
                if self._rules_runs in (2, 3):  # the first run warmed the rules up
                    self._compare_with_composite(computation, mode, clock() - start)
            return result

    def _compare_with_composite(self, computation, mode: _Mode, seconds: float):
        """Time the composite attention kernel against the rules; keep the faster.

        With short sequences, the rules' fixed costs can exceed what they save
        (reverse-over-reverse products). The computation runs again with the
        composite kernel; if it saved a tenth of the time in both of two
        comparisons, the composite kernel is kept.

        Args:
            computation: The computation just run with the rules.
            mode: The rules' mode.
            seconds: The time the computation took with the rules.
        """
        composite = _Mode(mode.forward, "composite")
        start = clock()
        try:
            with composite.context():
                computation(mode.forward)
        except (RuntimeError, NotImplementedError) as error:
            if not is_missing_derivative(error):
                raise
            return
        self._composite_votes.append(clock() - start < seconds / LOOP_MARGIN)
        if self._composite_votes == [True, True]:
            self._current = self._modes.index(composite)


class ModelJacobian:
    """Products with the Jacobian of a model's output w.r.t. parameters, on any model.

    Bundles the model, its functional form (for forward mode) and the
    :class:`DifferentiationModes` that remember which mode works for it.
    """

    def __init__(self, model_func: Callable, params: list[Tensor], forward_mode: bool):
        """Store the model and parameters.

        Args:
            model_func: The model; forward mode needs a ``torch.nn.Module`` or a
                functional model (:mod:`curvlinops._functional`).
            params: Parameters that define the Jacobian's columns.
            forward_mode: Whether to try forward mode first (for ``J M``; products
                that only need ``J^T`` use reverse mode).
        """
        self._model_func, self._params = model_func, params
        self._functional = functional_form(model_func, params) if forward_mode else None
        self._modes = DifferentiationModes(self._functional is not None)
        self._fast_layers = fast_rule_layers(model_func)

    @property
    def modes(self) -> DifferentiationModes:
        """Return the differentiation modes, which remember what works and is fast.

        Returns:
            The differentiation modes.
        """
        return self._modes

    @property
    def columns(self) -> ColumnPolicy:
        """Return the policy for products with several columns.

        Returns:
            The column policy of the differentiation modes.
        """
        return self._modes.columns

    def run(self, computation: Callable[[Callable], object]):
        """Run a computation that uses Jacobian products, in a mode that works.

        Args:
            computation: Receives ``jvp(X, M, output_graph=True) -> (output, J M)``
                (columns leading; the output is attached to the parameters' graph
                unless ``output_graph=False``) and returns the result.

        Returns:
            The computation's result.
        """
        return self._modes(lambda forward: computation(partial(self._jvp, forward)))

    def _jvp(
        self, forward_mode: bool, X, M: list[Tensor], output_graph: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Evaluate the model on ``X`` and multiply its Jacobian onto columns.

        Args:
            forward_mode: Whether to use forward-mode AD.
            X: Mini-batch input.
            M: One tensor ``[K, *param.shape]`` per parameter.
            output_graph: Whether the output must stay attached to the graph (for
                a following ``J^T`` product). Forward mode skips recording it if not.

        Returns:
            The output and ``[K, *output.shape]``.
        """
        columns = self._modes.columns
        if not forward_mode:
            model = self._model_func
            return jvp(lambda *_: model(X), self._params, M, False, columns=columns)
        f, layers = self._functional, self._fast_layers
        with nullcontext() if output_graph else no_grad():
            return jvp(lambda *ps: f(*ps, X), self._params, M, True, layers, columns)
