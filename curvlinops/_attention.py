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
The blockwise rules live in :mod:`curvlinops._attention_blocks`.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from math import sqrt

from torch import (
    Tensor,
    enable_grad,
    is_grad_enabled,
    no_grad,
    strided,
)
from torch._C import _are_functorch_transforms_active
from torch._C._nn import scaled_dot_product_attention
from torch.autograd import Function, grad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.ops import aten
from torch.overrides import TorchFunctionMode

from curvlinops._attention_blocks import Layout, jvp_blocks, vjp_blocks


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
    """Send ``scaled_dot_product_attention`` calls to :class:`Attention`.

    Attributes:
        routed: Number of attention calls (direct or inside another function of
            PyTorch) routed so far.
    """

    routed = 0

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
            self.routed += 1
            return _attention(*args, **kwargs)
        namespace = getattr(func, "__globals__", {})
        if namespace.get(_NAME) is scaled_dot_product_attention:
            namespace[_NAME] = partial(self._count, _attention)
            try:
                return func(*args, **kwargs)
            finally:
                namespace[_NAME] = scaled_dot_product_attention
        return func(*args, **kwargs)

    def _count(self, attention, *args, **kwargs) -> Tensor:
        """Count a routed attention call and evaluate it.

        Args:
            attention: The function that evaluates attention.
            args: Its positional arguments.
            kwargs: Its keyword arguments.

        Returns:
            The attention output.
        """
        self.routed += 1
        return attention(*args, **kwargs)


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
        The mode; its ``routed`` attribute counts the attention calls it routed.
    """
    with _AttentionRules() as mode:
        yield mode


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
        layout = Layout(*ctx.saved_tensors, ctx.causal, ctx.scale)
        dmask = dmask if ctx.mask_is_bias else None
        with no_grad():
            dq = None if dq is None else dq.contiguous()
            return jvp_blocks(layout, dq, dk, dv, dmask)

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
        layout = Layout(q, k, v, mask, ctx.causal, ctx.scale)
        dq, dk, dv, dmask = vjp_blocks(layout, grad_output)
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
