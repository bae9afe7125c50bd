r"""Derivative rules for ``scaled_dot_product_attention`` around the fused kernels.

PyTorch's fused attention kernels (flash attention on CPUs and GPUs) have a first
backward pass only: no forward-mode derivative, and a backward pass that cannot be
differentiated again. The composite (``MATH``) kernel has both, but stores the
attention matrices and spends elementwise passes on masks. :class:`Attention`
evaluates attention with the fused kernel and supplies the missing rules itself.
With :math:`\mathbf{S} = s\,\mathbf{Q}\mathbf{K}^\top + \mathbf{B}` (scale
:math:`s`, additive mask :math:`\mathbf{B}`, :math:`-\infty` where masked),
:math:`\mathbf{P} = \operatorname{softmax}(\mathbf{S})` row-wise and
:math:`\mathbf{O} = \mathbf{P}\mathbf{V}`:

- forward mode: :math:`\dot{\mathbf{S}} = s(\dot{\mathbf{Q}}\mathbf{K}^\top +
  \mathbf{Q}\dot{\mathbf{K}}^\top) + \dot{\mathbf{B}}` and
  :math:`\dot{\mathbf{O}} = \mathbf{P}\dot{\mathbf{V}} + (\mathbf{P} \odot
  (\dot{\mathbf{S}} - \mathbf{r}\mathbf{1}^\top))\mathbf{V}` with
  :math:`\mathbf{r} = (\mathbf{P} \odot \dot{\mathbf{S}})\mathbf{1}`,
- reverse mode: :math:`\bar{\mathbf{V}} = \mathbf{P}^\top \bar{\mathbf{O}}`,
  :math:`\bar{\mathbf{S}} = \mathbf{P} \odot (\bar{\mathbf{O}}\mathbf{V}^\top -
  \boldsymbol{\delta}\mathbf{1}^\top)` with :math:`\boldsymbol{\delta} =
  (\bar{\mathbf{O}} \odot \mathbf{O})\mathbf{1}`, :math:`\bar{\mathbf{Q}} =
  s\,\bar{\mathbf{S}}\mathbf{K}`, :math:`\bar{\mathbf{K}} = s\,\bar{\mathbf{S}}^\top
  \mathbf{Q}`, :math:`\bar{\mathbf{B}} = \bar{\mathbf{S}}` (summed over broadcast
  axes).

Both form :math:`\mathbf{P}` again, in blocks of query rows (a causal block skips
the keys it cannot see), and apply the softmax's Jacobian
:math:`\dot{\mathbf{S}} \mapsto \mathbf{P} \odot (\dot{\mathbf{S}} -
((\mathbf{P} \odot \dot{\mathbf{S}})\mathbf{1})\mathbf{1}^\top)` (symmetric, so
both directions use it) with PyTorch's fused softmax backward kernel. The
reverse-mode rule consists of differentiable operations, so that a backward pass
with ``create_graph=True`` can be differentiated again (Hessian products). Rows that
a mask hides completely give zeros, as in the composite kernel. Grouped-query
attention repeats keys and values over the query heads and sums their derivatives
back.

:func:`attention_rules` routes calls of ``scaled_dot_product_attention`` to
:class:`Attention` while active; calls with dropout go to the composite kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from math import sqrt

from torch import (
    Tensor,
    _softmax_backward_data,
    cat,
    enable_grad,
    is_grad_enabled,
    no_grad,
    ones,
    strided,
    zeros,
    zeros_like,
)
from torch import bool as torch_bool
from torch._C import _are_functorch_transforms_active
from torch._C._nn import scaled_dot_product_attention
from torch.autograd import Function, grad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.ops import aten
from torch.overrides import TorchFunctionMode

# Query rows per block: a block of the attention matrix holds at most this many
# entries (unless a single row has more).
BLOCK_ENTRIES = 2**18


def _sdpa_arguments(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple:
    """Bind the arguments of ``scaled_dot_product_attention`` by name.

    Args:
        query: Queries ``[*, H_q, L, E]``.
        key: Keys ``[*, H_k, S, E]``.
        value: Values ``[*, H_k, S, E_v]``.
        attn_mask: Boolean (``True``: attend) or additive mask, broadcastable to
            ``[*, H_q, L, S]``.
        dropout_p: Dropout probability.
        is_causal: Whether to apply the (top-left aligned) causal mask.
        scale: Scale of the logits; ``1 / sqrt(E)`` if ``None``.
        enable_gqa: Whether keys and values may have fewer heads than queries.

    Returns:
        All arguments in signature order.
    """
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _AttentionRules(TorchFunctionMode):
    """Send ``scaled_dot_product_attention`` calls to :class:`Attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Intercept attention; pass every other function through.

        A Python function of PyTorch that calls attention by its module's global
        name (``torch.nn.functional.multi_head_attention_forward``, used by
        ``torch.nn.MultiheadAttention``) runs with the name routed to the rules:
        the mode itself does not see calls made inside an intercepted function.

        Args:
            func: The called function.
            types: Types that define ``__torch_function__``.
            args: Positional arguments.
            kwargs: Keyword arguments.

        Returns:
            The function's result.
        """
        kwargs = kwargs or {}
        if func is scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        namespace = getattr(func, "__globals__", {})
        if namespace.get(_NAME) is scaled_dot_product_attention:
            namespace[_NAME] = _attention
            try:
                return func(*args, **kwargs)
            finally:
                namespace[_NAME] = scaled_dot_product_attention
        return func(*args, **kwargs)


_NAME = "scaled_dot_product_attention"


def _attention(*args, **kwargs) -> Tensor:
    """Evaluate ``scaled_dot_product_attention`` with the rules of :class:`Attention`.

    Calls with dropout, or with tensors other than dense strided ones, use the
    composite kernel.

    Args:
        args: Positional arguments of ``scaled_dot_product_attention``.
        kwargs: Its keyword arguments.

    Returns:
        The attention output.
    """
    q, k, v, mask, dropout_p, causal, scale, gqa = _sdpa_arguments(*args, **kwargs)
    if dropout_p > 0.0 or not _plain_tensors(q, k, v, mask):
        with sdpa_kernel(SDPBackend.MATH):
            return scaled_dot_product_attention(*args, **kwargs)
    return Attention.apply(q, k, v, mask, causal, scale, gqa)


def _plain_tensors(*tensors: Tensor | None) -> bool:
    """Return whether tensors are dense strided tensors (or ``None``).

    Args:
        tensors: Tensors to check.

    Returns:
        Whether the rules apply to them.
    """
    return all(
        t is None or (isinstance(t, Tensor) and t.layout == strided and not t.is_nested)
        for t in tensors
    )


@contextmanager
def attention_rules():
    """Route ``scaled_dot_product_attention`` to :class:`Attention` while active.

    Yields:
        Nothing.
    """
    with _AttentionRules():
        yield


class Attention(Function):
    """Fused attention with forward-mode and twice-differentiable reverse-mode rules.

    ``Attention.apply(q, k, v, mask, is_causal, scale, enable_gqa)`` takes the
    arguments of ``scaled_dot_product_attention`` without dropout; see the module
    description for the rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, causal, scale, gqa):
        """Evaluate attention with the fused kernel.

        Args:
            q: Queries ``[*, H_q, L, E]``.
            k: Keys ``[*, H_k, S, E]``.
            v: Values ``[*, H_k, S, E_v]``.
            mask: Boolean or additive mask broadcastable to ``[*, H_q, L, S]``, or
                ``None``.
            causal: Whether to apply the causal mask.
            scale: Scale of the logits, or ``None`` for ``1 / sqrt(E)``.
            gqa: Whether grouped-query attention is enabled.

        Returns:
            The output ``[*, H_q, L, E_v]``.
        """
        return scaled_dot_product_attention(
            q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=gqa
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Save what the rules need.

        Args:
            ctx: Context.
            inputs: The inputs of :meth:`forward`.
            output: Its output.
        """
        q, k, v, mask, causal, scale, gqa = inputs
        ctx.causal, ctx.gqa = causal, gqa
        ctx.scale = 1.0 / sqrt(q.shape[-1]) if scale is None else scale
        ctx.mask_is_bias = mask is not None and mask.dtype.is_floating_point
        ctx.save_for_backward(q, k, v, mask)
        ctx.save_for_forward(q, k, v, mask)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        """Multiply the Jacobian onto tangents of queries, keys, values and mask.

        Args:
            ctx: Context.
            dq: Tangent of the queries, or ``None``.
            dk: Tangent of the keys, or ``None``.
            dv: Tangent of the values, or ``None``.
            dmask: Tangent of an additive mask, or ``None``.
            _: Tangents of the other (non-tensor) arguments.

        Returns:
            The output's tangent ``[*, H_q, L, E_v]``.
        """
        layout = _Layout(*ctx.saved_tensors, ctx.causal, ctx.scale)
        dmask = dmask if ctx.mask_is_bias else None
        with no_grad():
            dq = None if dq is None else dq.contiguous()
            return _jvp_blocks(layout, dq, dk, dv, dmask)

    @staticmethod
    def backward(ctx, grad_output):
        """Multiply the transposed Jacobian onto the output's gradient.

        Differentiable if the backward pass records a graph.

        Args:
            ctx: Context.
            grad_output: Gradient of the output ``[*, H_q, L, E_v]``, or ``None``.

        Returns:
            Gradients of queries, keys, values and an additive mask, ``None`` for the
            other arguments.
        """
        if grad_output is None:
            return (None,) * 7
        q, k, v, mask = ctx.saved_tensors
        if not is_grad_enabled() and not _are_functorch_transforms_active():
            return _fused_backward(ctx, grad_output)
        layout = _Layout(q, k, v, mask, ctx.causal, ctx.scale)
        dq, dk, dv, dmask = _vjp_blocks(layout, grad_output)
        need = ctx.needs_input_grad
        if dmask is not None and ctx.mask_is_bias and need[3]:
            dmask = dmask.sum_to_size(mask.shape)
        else:
            dmask = None
        grads = (dq, layout.reduce(dk), layout.reduce(dv))
        return (
            *(g if n else None for g, n in zip(grads, need)),
            dmask,
            None,
            None,
            None,
        )


def _fused_backward(ctx, grad_output: Tensor) -> tuple:
    """Backward pass of PyTorch's own kernel, on the forward pass evaluated again.

    Without a graph to record, the fused kernels' backward pass (which forms the
    attention matrix tile by tile) beats the blockwise rule even with the extra
    forward pass.

    Args:
        ctx: Context of :class:`Attention`.
        grad_output: Gradient of the output.

    Returns:
        The gradients, as :meth:`Attention.backward` returns them.
    """
    need = ctx.needs_input_grad[:4]
    inputs = [
        None if x is None else x.detach().requires_grad_(n)
        for x, n in zip(ctx.saved_tensors, need)
    ]
    with enable_grad():
        output = aten.scaled_dot_product_attention(
            *inputs, 0.0, ctx.causal, scale=ctx.scale, enable_gqa=ctx.gqa
        )
        wanted = [x for x, n in zip(inputs, need) if n]
        grads = iter(grad(output, wanted, grad_output))
    return (*(next(grads) if n else None for n in need), None, None, None)


class _Layout:
    """Scaled queries, repeated keys and values, masks and blocks of one call."""

    def __init__(self, q, k, v, mask, causal, scale):
        """Expand keys and values over query groups and turn the mask into a bias.

        Args:
            q: Queries ``[*, H_q, L, E]``.
            k: Keys ``[*, H_k, S, E]``.
            v: Values ``[*, H_k, S, E_v]``.
            mask: Boolean or additive mask, or ``None``.
            causal: Whether the causal mask applies.
            scale: Scale of the logits.
        """
        self.groups = q.shape[-3] // k.shape[-3]
        # contiguous once, rather than a copy in every batched matrix product
        self.q, self.k, self.v = q, self.expand(k), self.expand(v)
        self.q_scaled = q * scale
        self.causal, self.scale = causal, scale
        self.num_queries, self.num_keys = q.shape[-2], k.shape[-2]
        self.bias, self.empty_rows = _bias(mask, q)

    def expand(self, x: Tensor | None) -> Tensor | None:
        """Repeat keys or values (or their tangents) for every query head of a group.

        Args:
            x: ``[*, H_k, S, D]`` or ``None``.

        Returns:
            ``[*, H_q, S, D]`` (contiguous) or ``None``.
        """
        if x is None:
            return None
        if self.groups == 1:
            return x.contiguous()
        return x.repeat_interleave(self.groups, dim=-3)

    def reduce(self, x: Tensor | None) -> Tensor | None:
        """Sum derivatives of repeated keys or values over each group.

        Args:
            x: ``[*, H_q, S, D]`` or ``None``.

        Returns:
            ``[*, H_k, S, D]`` or ``None``.
        """
        if x is None or self.groups == 1:
            return x
        shape = (*x.shape[:-3], -1, self.groups, *x.shape[-2:])
        return x.reshape(shape).sum(-3)

    def blocks(self) -> list[tuple[slice, slice]]:
        """Split the query rows into blocks; a causal block sees only earlier keys.

        Returns:
            Query rows and key columns of each block.
        """
        L, S = self.num_queries, self.num_keys
        per_row = max(self.q[..., 0, :1].numel() * S, 1)
        size = max(BLOCK_ENTRIES // per_row, 1)
        result = []
        for start in range(0, L, size):
            stop = min(start + size, L)
            keys = min(stop, S) if self.causal else S
            result.append((slice(start, stop), slice(0, keys)))
        return result

    def probabilities(self, rows: slice, keys: slice) -> Tensor:
        """Return a block of the attention matrix.

        Args:
            rows: Query rows.
            keys: Key columns.

        Returns:
            The attention probabilities ``[*, H_q, rows, keys]``.
        """
        S = _part(self.q_scaled, rows) @ _part(self.k, keys).mT
        bias = self._bias_block(rows, keys)
        if bias is not None:
            S = S + bias if is_grad_enabled() else S.add_(bias)
        P = S.softmax(-1)
        if self.empty_rows is not None:
            P = P.masked_fill(_part(self.empty_rows, rows), 0.0)
        return P

    def _bias_block(self, rows: slice, keys: slice) -> Tensor | None:
        """Return the additive mask of a block (causal or given).

        Args:
            rows: Query rows.
            keys: Key columns.

        Returns:
            Bias broadcastable to the block, or ``None``.
        """
        if self.causal:
            shape = (rows.stop - rows.start, keys.stop)
            hidden = ones(shape, dtype=torch_bool, device=self.q.device)
            hidden = hidden.triu(diagonal=rows.start + 1)
            return zeros(shape, dtype=self.q.dtype, device=self.q.device).masked_fill(
                hidden, float("-inf")
            )
        if self.bias is None:
            return None
        return _part(_part(self.bias, rows), keys, -1)

    def logit_tangent(self, rows, keys, dq, dk, dbias) -> Tensor | None:
        """Return the tangent of the logits of a block.

        Args:
            rows: Query rows.
            keys: Key columns.
            dq: Tangent of the queries, or ``None``.
            dk: Tangent of the (repeated) keys, or ``None``.
            dbias: Tangent of an additive mask, or ``None``.

        Returns:
            ``[*, H_q, rows, keys]``, or ``None`` if no tangent reaches the logits.
        """
        dS = None
        if dq is not None:
            dS = (_part(dq, rows) * self.scale) @ _part(self.k, keys).mT
        if dk is not None:
            term = _part(self.q_scaled, rows) @ _part(dk, keys).mT
            dS = term if dS is None else dS.add_(term)
        if dbias is not None:
            term = _part(_part(dbias, rows), keys, -1)
            dS = term if dS is None else dS.add_(term)
        return dS


def _jvp_blocks(layout: _Layout, dq, dk, dv, dbias) -> Tensor:
    """Forward-mode rule, block by block.

    Args:
        layout: The attention call.
        dq: Tangent of the queries, or ``None``.
        dk: Tangent of the keys, or ``None``.
        dv: Tangent of the values, or ``None``.
        dbias: Tangent of an additive mask, or ``None``.

    Returns:
        The output's tangent ``[*, H_q, L, E_v]``.
    """
    dk, dv = layout.expand(dk), layout.expand(dv)
    blocks = []
    for rows, keys in layout.blocks():
        P = layout.probabilities(rows, keys)
        dS = layout.logit_tangent(rows, keys, dq, dk, dbias)
        if dS is not None:
            dS = _softmax_jacobian(dS.expand_as(P), P)
        dO = None if dS is None else dS @ _part(layout.v, keys)
        if dv is not None:
            term = P @ _part(dv, keys)
            dO = term if dO is None else dO.add_(term)
        if dO is None:
            dO = P.new_zeros(*P.shape[:-1], layout.v.shape[-1])
        blocks.append(dO)
    return _cat_rows(blocks)


def _vjp_blocks(layout: _Layout, dO: Tensor):
    """Reverse-mode rule, block by block; differentiable if grad mode is on.

    Out of place where it matters, so that it also runs on batched gradients
    (``is_grads_batched``).

    Args:
        layout: The attention call.
        dO: Gradient of the output ``[*, H_q, L, E_v]``.

    Returns:
        Gradients of queries, repeated keys and values, and of the bias (``None``
        without a mask).
    """
    dq, dbias, dk, dv = [], [], None, None
    for rows, keys in layout.blocks():
        P = layout.probabilities(rows, keys)
        dO_rows, v, k = _part(dO, rows), _part(layout.v, keys), _part(layout.k, keys)
        dv = _accumulate(dv, P.mT @ dO_rows)
        dS = _softmax_jacobian(dO_rows @ v.mT, P)
        dq.append((dS @ k) * layout.scale)
        dk = _accumulate(dk, dS.mT @ _part(layout.q_scaled, rows))
        if layout.bias is not None:
            dbias.append(dS)
    dq, dk, dv = _cat_rows(dq), _pad_keys(dk, layout), _pad_keys(dv, layout)
    return dq, dk, dv, (None if layout.bias is None else _cat_rows(dbias))


def _softmax_jacobian(dS: Tensor, P: Tensor) -> Tensor:
    """Multiply the (symmetric) Jacobian of the row-wise softmax onto a block.

    Args:
        dS: Tangent or gradient w.r.t. logits or probabilities ``[*, rows, keys]``.
        P: Attention probabilities ``[*, rows, keys]``.

    Returns:
        ``P * (dS - (P * dS).sum(-1, keepdim=True))``.
    """
    return _softmax_backward_data(dS, P, -1, P.dtype)


def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    """Add a block's derivative for its keys to the sum over earlier blocks.

    Args:
        total: Sum over earlier blocks ``[*, H_q, S_1, D]``, or ``None``.
        term: Derivative for the first ``S_2 >= S_1`` keys ``[*, H_q, S_2, D]``
            (a fresh tensor, which this function may overwrite).

    Returns:
        The sum ``[*, H_q, S_2, D]``.
    """
    if total is None:
        return term
    term.narrow(-2, 0, total.shape[-2]).add_(total)
    return term


def _pad_keys(x: Tensor, layout: _Layout) -> Tensor:
    """Append zero rows for keys that no query sees (causal, fewer queries).

    Args:
        x: Derivative for the first keys ``[*, H_q, S_1, D]``.
        layout: The attention call.

    Returns:
        ``[*, H_q, S, D]``.
    """
    missing = layout.num_keys - x.shape[-2]
    if missing == 0:
        return x
    return cat([x, x.new_zeros(*x.shape[:-2], missing, x.shape[-1])], dim=-2)


def _bias(mask: Tensor | None, q: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Turn a mask into an additive bias and find the rows it hides completely.

    Args:
        mask: Boolean (``True``: attend) or additive mask, or ``None``.
        q: Queries (for dtype and device).

    Returns:
        The bias (``-inf`` where masked; completely masked rows set to zero, so
        that they stay finite) and a boolean ``[..., L or 1, 1]`` of the
        completely masked rows, each ``None`` without a mask.
    """
    if mask is None:
        return None, None
    if mask.dtype == torch_bool:
        empty = ~mask.any(-1, keepdim=True)
        bias = zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    else:
        empty = (mask == float("-inf")).all(-1, keepdim=True)
        bias = mask
    return bias.masked_fill(empty, 0.0), empty


def _part(x: Tensor, index: slice, dim: int = -2) -> Tensor:
    """Select a range along an axis along which a tensor may broadcast.

    Uses ``narrow`` (which batched gradients support) rather than indexing.

    Args:
        x: Tensor.
        index: Range of the axis.
        dim: The axis.

    Returns:
        The range (a view), or ``x`` if it broadcasts or the range is all of it.
    """
    size = x.shape[dim]
    if size == 1 or (index.start == 0 and index.stop >= size):
        return x
    return x.narrow(dim, index.start, index.stop - index.start)


def _cat_rows(blocks: list[Tensor]) -> Tensor:
    """Stack row blocks along the query axis.

    Args:
        blocks: Blocks ``[*, rows, D]``.

    Returns:
        ``[*, L, D]``.
    """
    return blocks[0] if len(blocks) == 1 else cat(blocks, dim=-2)
