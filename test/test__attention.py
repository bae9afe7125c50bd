"""Tests for curvlinops._attention (and its blockwise rules, _attention_blocks).

Every rule is compared in float64 against the composite (``MATH``) kernel, whose
derivatives PyTorch composes from differentiable operations: values, forward- and
reverse-mode products (also batched over columns) and second derivatives, and then
every curvature operator on attention models against dense references.
"""

from __future__ import annotations

from itertools import chain, count

import pytest
import torch
from torch import float64, manual_seed, randn
from torch.autograd import forward_ad, grad
from torch.func import jvp as func_jvp
from torch.func import vmap
from torch.nn import Identity, Linear, Module, MSELoss, TransformerEncoderLayer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
    _attention_blocks,
)
from curvlinops._attention import attention_rules
from curvlinops._autodiff import DifferentiationModes, _Mode
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_hessian,
    functorch_jacobian,
)
from test.utils import assert_close

B, H, L, S, E, E_V = 2, 4, 5, 7, 3, 2


def _masks() -> dict:
    """Masks with a completely hidden row (bool and additive) and a padding mask."""
    manual_seed(1)
    hidden_row = torch.rand(L, S) > 0.3
    hidden_row[1] = False
    additive = randn(H, L, S, dtype=float64)
    additive[0, 2] = float("-inf")
    return {
        "bool": hidden_row,
        "padding": torch.rand(B, 1, 1, S) > 0.3,
        "additive": additive,
    }


CONFIGS = {
    "plain": ((H, H), {}),
    "causal, fewer queries": ((H, H), {"is_causal": True}),
    "causal, more queries": ((H, H), {"is_causal": True}, (S, L)),
    "scale": ((H, H), {"scale": 0.7}),
    "bool mask": ((H, H), {"attn_mask": "bool"}),
    "padding mask": ((H, H), {"attn_mask": "padding"}),
    "additive mask": ((H, H), {"attn_mask": "additive"}),
    "trainable additive mask": ((H, H), {"attn_mask": "trainable"}),
    "grouped-query": ((H, 2), {"enable_gqa": True}),
    "grouped-query, causal": ((H, 1), {"enable_gqa": True, "is_causal": True}),
}


def _inputs(config: str):
    """Queries, keys, values (and a trainable mask) and the keyword arguments."""
    heads, kwargs, *lengths = CONFIGS[config]
    num_queries, num_keys = lengths[0] if lengths else (L, S)
    kwargs = dict(kwargs)
    manual_seed(0)
    inputs = [
        randn(B, heads[0], num_queries, E, dtype=float64),
        randn(B, heads[1], num_keys, E, dtype=float64),
        randn(B, heads[1], num_keys, E_V, dtype=float64),
    ]
    mask = kwargs.get("attn_mask")
    if mask == "trainable":
        inputs.append(_masks()["additive"].clone())
        del kwargs["attn_mask"]
    elif mask is not None:
        kwargs["attn_mask"] = _masks()[mask]
    return [x.requires_grad_() for x in inputs], kwargs


def _derivatives(inputs: list, kwargs: dict) -> dict:
    """Value, VJPs (with a graph or not), JVPs, batched and second derivatives."""

    def f(*xs):
        mask = {"attn_mask": xs[3]} if len(xs) > 3 else {}
        return scaled_dot_product_attention(*xs[:3], **kwargs, **mask)

    manual_seed(2)
    out = f(*inputs)
    dO, dO_cols = randn(out.shape, dtype=float64), randn(3, *out.shape, dtype=float64)
    tangents = [randn(x.shape, dtype=float64) for x in inputs]
    cols = [randn(3, *x.shape, dtype=float64) for x in inputs]
    primals = tuple(x.detach() for x in inputs)
    gradient = grad(f(*inputs), inputs, dO, create_graph=True)
    with forward_ad.dual_level():
        dual = f(*[forward_ad.make_dual(x, t) for x, t in zip(primals, tangents)])
        dual_tangent = forward_ad.unpack_dual(dual).tangent
    return {
        "value": [out],
        "vjp": list(gradient),
        "second": list(grad(gradient, inputs, tangents, retain_graph=True)),
        "second, batched": list(grad(gradient, inputs, cols, is_grads_batched=True)),
        "vjp, no graph": list(grad(f(*inputs), inputs, dO)),
        "vjp, batched": list(grad(f(*inputs), inputs, dO_cols, is_grads_batched=True)),
        "jvp, dual tensors": [dual_tangent],
        "jvp": [func_jvp(f, primals, tuple(tangents))[1]],
        "jvp, batched": [
            vmap(lambda *ts: func_jvp(f, primals, ts)[1])(*cols),
        ],
    }


@pytest.mark.parametrize("blockwise", [False, True], ids=["one block", "blocks"])
@pytest.mark.parametrize("config", CONFIGS)
def test_rules_match_composite_kernel(config, blockwise, monkeypatch):
    """All derivatives agree with the composite kernel's, also block by block."""
    if blockwise:  # blocks of one or two query rows
        monkeypatch.setattr(_attention_blocks, "BLOCK_ENTRIES", 2 * S * B * H)
    inputs, kwargs = _inputs(config)
    with sdpa_kernel(SDPBackend.MATH):
        expected = _derivatives(inputs, kwargs)
    with attention_rules():
        result = _derivatives(inputs, kwargs)
    assert result.keys() == expected.keys()
    for key in expected:
        assert_close(result[key], expected[key], msg=key)


def test_rules_route_only_attention():
    """Attention runs in :class:`Attention`; dropout, and everything else, do not."""
    q, k, v = (randn(B, H, L, E, dtype=float64, requires_grad=True) for _ in range(3))
    with attention_rules():
        out = scaled_dot_product_attention(q, k, v)
        product = q @ k.mT
        manual_seed(3)
        dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert type(out.grad_fn).__name__ == "AttentionBackward"
    assert type(product.grad_fn).__name__ == "UnsafeViewBackward0"
    with sdpa_kernel(SDPBackend.MATH):
        manual_seed(3)
        assert_close(dropped, scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    assert scaled_dot_product_attention(q, k, v).grad_fn.name() != "AttentionBackward"


class _AttentionModel(Module):
    """Causal multi-head attention with grouped keys and values, mean-pooled."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.out = Linear(3, 4), Linear(3, 4), Linear(4, 2)

    def forward(self, x):
        batch, seq, _ = x.shape
        q = self.q(x).reshape(batch, seq, 2, 2).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, seq, 2, 1, 2).permute(2, 0, 3, 1, 4)
        attended = scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        return self.out(attended.transpose(1, 2).reshape(batch, seq, 4)).mean(1)


def _encoder_layer() -> Module:
    """PyTorch's transformer layer (``MultiheadAttention`` calls attention inside).

    Without its layer norms: ``torch.func`` differentiates ``layer_norm`` twice
    wrongly in torch 2.13 (an asymmetric Hessian), which would spoil the dense
    reference.
    """
    layer = TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
    layer.norm1, layer.norm2 = Identity(), Identity()

    class Pooled(Module):
        def __init__(self):
            super().__init__()
            self.embed, self.layer, self.out = Linear(3, 4), layer, Linear(4, 2)

        def forward(self, x):
            return self.out(self.layer(self.embed(x))).mean(1)

    return Pooled()


MODELS = {"causal grouped-query": _AttentionModel, "encoder layer": _encoder_layer}


def _problem(model_name: str):
    manual_seed(0)
    model = MODELS[model_name]().to(float64)
    data = [
        (torch.rand(n, 3, 3, dtype=float64), randn(n, 2, dtype=float64)) for n in (3, 2)
    ]
    return model, MSELoss(), [p for p in model.parameters()], data


def _modes(op):
    return op._mp.modes  # of the per-batch product


def _rules_runs(op) -> int:
    """How many computations ran with the rules."""
    return _modes(op)._rules_runs


def _keep_rules(*args):
    """Skip the comparison with the composite kernel (tests of the rules)."""


def _check_products(op, dense: torch.Tensor):
    """Products with a vector and a 3-column matrix match the dense matrix."""
    M = randn(op.shape[1], 3, dtype=float64, generator=torch.Generator().manual_seed(1))
    assert_close(op @ M[:, 0], dense @ M[:, 0])
    assert_close(op @ M, dense @ M)


@pytest.mark.parametrize("model_name", MODELS)
def test_operators_on_attention_models_match_dense(model_name, monkeypatch):
    """Products with the rules (reverse mode: the fused kernel) are right."""
    monkeypatch.setattr(DifferentiationModes, "_compare_with_composite", _keep_rules)
    model, loss_func, params, data = _problem(model_name)
    dense = {
        HessianLinearOperator: functorch_hessian(model, loss_func, params, data),
        GGNLinearOperator: functorch_ggn(model, loss_func, params, data),
        EFLinearOperator: functorch_empirical_fisher(model, loss_func, params, data),
    }
    for cls, matrix in dense.items():
        op = cls(model, loss_func, params, data, check_deterministic=False)
        _check_products(op, matrix)
        assert _rules_runs(op) == 2 * len(data)  # two products, per batch
    J = functorch_jacobian(model, params, data)
    for cls, matrix, runs in [
        (JacobianLinearOperator, J, 2 * len(data)),
        (TransposedJacobianLinearOperator, J.T, 0),  # the fused kernel suffices
    ]:
        op = cls(model, params, data, check_deterministic=False)
        _check_products(op, matrix)
        assert _rules_runs(op) == runs


def test_mc_fisher_with_rules_matches_composite_kernel():
    """The MC Fisher (no dense reference) gives the composite kernel's numbers."""
    model, loss_func, params, data = _problem("causal grouped-query")
    F = FisherMCLinearOperator(
        model, loss_func, params, data, check_deterministic=False
    )
    F_composite = FisherMCLinearOperator(model, loss_func, params, data)
    modes = _modes(F_composite)
    modes._modes, modes._current = [_Mode(True, "composite")], 0
    M = randn(F.shape[1], 3, dtype=float64)
    assert_close(F @ M, F_composite @ M)
    assert _rules_runs(F) == len(data)


def test_composite_kernel_replaces_the_rules_if_faster(monkeypatch):
    """The composite kernel is timed against the rules twice, and kept if faster."""
    model, loss_func, params, data = _problem("causal grouped-query")
    H = HessianLinearOperator(
        model, loss_func, params, data[:1], check_deterministic=False
    )
    # calls of the clock: product 1 (fused fails; rules start), products 2 and 3
    # (rules: start, end 1 s later; composite: start, end 0.5 s later), then more
    comparison = [10.0, 11.0, 20.0, 20.5]
    times = chain([0.0, 1.0], comparison, comparison, count(30.0))
    monkeypatch.setattr("curvlinops._autodiff.clock", lambda: next(times))
    v = randn(H.shape[1], dtype=float64)
    first = H @ v
    for _ in range(2):
        assert _attention_of(H) == "rules"
        assert_close(H @ v, first)
    assert _attention_of(H) == "composite"
    assert_close(H @ v, first)


def _attention_of(op) -> str:
    modes = _modes(op)
    return modes._modes[modes._current].attention
