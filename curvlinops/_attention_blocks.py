r"""Blockwise derivative rules of attention, for :mod:`curvlinops._attention`.

With :math:`\mathbf{S} = s\,\mathbf{Q}\mathbf{K}^\top + \mathbf{B}`,
:math:`\mathbf{P} = \operatorname{softmax}(\mathbf{S})` row-wise and
:math:`\mathbf{O} = \mathbf{P}\mathbf{V}`, :func:`jvp_blocks` computes
:math:`\dot{\mathbf{O}}` and :func:`vjp_blocks` the gradients of
:math:`\mathbf{Q}, \mathbf{K}, \mathbf{V}, \mathbf{B}`, forming :math:`\mathbf{P}`
in blocks of query rows (:class:`Layout`). Both consist of differentiable
operations, on plain or batched (``vmap``) tensors.
"""

from __future__ import annotations

from torch import (
    Tensor,
    _softmax_backward_data,
    cat,
    is_grad_enabled,
    ones,
    zeros,
    zeros_like,
)
from torch import bool as torch_bool

# Query rows per block: a block of the attention matrix holds at most this many
# entries (unless a single row has more).
BLOCK_ENTRIES = 2**18


class Layout:
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


def jvp_blocks(layout: Layout, dq, dk, dv, dbias) -> Tensor:
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


def vjp_blocks(layout: Layout, dO: Tensor):
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


def _pad_keys(x: Tensor, layout: Layout) -> Tensor:
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
