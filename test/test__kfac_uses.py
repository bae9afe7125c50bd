"""Tests for curvlinops._kfac_uses: KFAC on reused layers, tied weights, functions.

The factors of every model are compared with their definition, computed with
:mod:`torch.func` in :mod:`test.shared_weights` (independently of the torch function
mode KFAC uses), for KFAC-expand and KFAC-reduce.
"""

import pytest
import torch
from torch import (
    Tensor,
    float64,
    manual_seed,
    no_grad,
    rand,
    randint,
    randn,
    stack,
    tanh,
)
from torch.nn import (
    Embedding,
    GRUCell,
    Linear,
    LSTMCell,
    Module,
    MSELoss,
    RNNCell,
    Sequential,
    Tanh,
)
from torch.nn.functional import embedding, layer_norm, linear

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from curvlinops._functional import bind_params
from curvlinops._kfac_calls import CELLS
from curvlinops.examples.functorch import functorch_ggn
from test.kfac_references import ekfac_dense, kfac_dense, restrict_to_blocks
from test.shared_weights import (
    TinyGPT,
    cnn,
    mlp,
    random_params,
    reference_factors,
    rnn,
    token_batch,
    twice,
)
from test.utils import assert_close, compare_matmat

APPROX = pytest.mark.parametrize("approx", ["expand", "reduce"])


class Elman(Module):
    """An Elman network whose three Linear layers are called at every step."""

    def __init__(self):
        super().__init__()
        self.ih, self.hh, self.out = Linear(3, 4), Linear(4, 4), Linear(4, 2, False)

    def forward(self, X: Tensor) -> Tensor:
        h, outputs = X.new_zeros(X.shape[0], 4), []
        for t in range(X.shape[1]):
            h = tanh(self.ih(X[:, t]) + self.hh(h))
            outputs.append(self.out(h))
        return stack(outputs, dim=1)

    def params(self) -> dict[str, Tensor]:
        names = ["w_ih", "b_ih", "w_hh", "b_hh", "w_out"]
        return dict(zip(names, self.parameters()))


def _kfac(model, params, X, approx, cls=KFACLinearOperator, **kwargs):
    y = randn(bind_params(model, params)[0](X).shape, dtype=float64)
    kwargs = {"fisher_type": "type-2", "kfac_approx": approx, **kwargs}
    return cls(model, MSELoss(reduction="sum"), params, [(X, y)], **kwargs)


def _compare_with_definition(K, run, approx):
    """Every layer's factors equal those of :func:`reference_factors`."""
    reference = reference_factors(run, approx)
    K.compute_kronecker_factors()
    for layer, roles in K._mapping.items():
        A, G = reference[id(K._params[roles["weight"]])]
        assert_close(K._input_covariances[layer], A, msg=f"A of {layer}")
        assert_close(K._gradient_covariances[layer], G, msg=f"G of {layer}")


@APPROX
def test_linear_called_twice(approx):
    """A module called twice; its functional twin gives the same operator."""
    manual_seed(0)
    layer = Linear(4, 4).to(float64)
    model, X = Sequential(layer, Tanh(), layer), rand(5, 2, 4, dtype=float64)
    params = {"w": layer.weight, "b": layer.bias}
    K = _kfac(model, list(params.values()), X, approx)
    assert K._mapping == {"0": {"weight": 0, "bias": 1}}
    _compare_with_definition(K, lambda taps: twice(params, X, taps), approx)
    K_functional = _kfac(twice, params, X, approx)
    assert K_functional._mapping == {"w": {"weight": 0, "bias": 1}}
    compare_matmat(K_functional, kfac_dense(K))


@APPROX
def test_unrolled_rnn_cell(approx):
    manual_seed(0)
    model, X = Elman().to(float64), rand(3, 4, 3, dtype=float64)
    K = _kfac(model, list(model.parameters()), X, approx)
    assert list(K._mapping) == ["ih", "hh", "out"]
    _compare_with_definition(K, lambda taps: rnn(model.params(), X, taps), approx)


@APPROX
def test_functional_rnn_with_joint_bias_matches_the_module(approx):
    manual_seed(0)
    model, X = Elman().to(float64), rand(3, 4, 3, dtype=float64)
    kwargs = {"separate_weight_and_bias": False}
    K = _kfac(model, list(model.parameters()), X, approx, **kwargs)
    K_functional = _kfac(rnn, model.params(), X, approx, **kwargs)
    assert list(K_functional._mapping) == ["w_ih", "w_hh", "w_out"]
    compare_matmat(K_functional, kfac_dense(K))


@APPROX
def test_tiny_gpt_with_tied_embedding(approx):
    """The unembedding's factors; the lookup of the tied matrix is left out."""
    model = TinyGPT().to(float64)
    tokens, _ = token_batch()
    params = [
        p for name, p in model.named_parameters() if not name.startswith(("ln", "wpe"))
    ]
    K = _kfac(model, params, tokens, approx)
    assert list(K._mapping) == ["lm_head", "qkv", "proj", "fc", "fc_out"]
    assert K._mapping["lm_head"] == {"weight": 0}  # the tied matrix comes first
    _compare_with_definition(K, lambda taps: model(tokens, taps), approx)
    compare_matmat(K, kfac_dense(K))


SHAPES = {
    "mlp": {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "b2": (2,)},
    "cnn": {
        "c1": (3, 2, 3, 3),
        "cb1": (3,),
        "c2": (2, 3, 3, 3),
        "w": (2, 18),
        "b": (2,),
    },
}


@APPROX
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_functional_models(architecture, approx):
    """MLP and CNN written with torch.nn.functional on a parameter dictionary."""
    params = random_params(SHAPES[architecture])
    X = rand(4, *((3,) if architecture == "mlp" else (2, 6, 6)), dtype=float64)
    model = mlp if architecture == "mlp" else cnn
    K = _kfac(model, params, X, approx)
    assert list(K._mapping) == [n for n in params if not n.startswith(("b", "cb"))]
    _compare_with_definition(K, lambda taps: model(params, X, taps), approx)


class Looped(Module):
    """Applies a network to every position of ``[B, R, D]`` in a Python loop."""

    def __init__(self, net: Module):
        super().__init__()
        self.net = net

    def forward(self, X: Tensor) -> Tensor:
        return stack([self.net(X[:, r]) for r in range(X.shape[1])], dim=1)


@APPROX
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_calls_on_slices_equal_one_call_on_the_sequence(cls, approx):
    """Uses add to the shared axis, so a loop over positions changes nothing.

    A layer called R times on ``[B, D]`` slices gives the same factors as one call
    on ``[B, R, D]``; EKFAC follows.
    """
    manual_seed(0)
    net = Sequential(Linear(3, 4), Tanh(), Linear(4, 2)).to(float64)
    X = rand(5, 3, 3, dtype=float64)
    data = [(X, randn(5, 3, 2, dtype=float64))]
    kwargs = {"fisher_type": "type-2", "kfac_approx": approx}
    ops = [
        cls(model, MSELoss(), list(net.parameters()), data, **kwargs)
        for model in (net, Looped(net))
    ]
    dense = kfac_dense if cls is KFACLinearOperator else ekfac_dense
    assert_close(dense(ops[1]), dense(ops[0]))


def test_uses_inside_no_grad_are_not_uses():
    """A call the model makes without autograd does not depend on the weights."""
    manual_seed(0)
    layer, X = Linear(3, 3).to(float64), rand(4, 3, dtype=float64)

    def model(X):
        with no_grad():
            frozen = layer(X)
        return layer(X) + frozen

    frozen = layer(X).detach()
    params = list(layer.parameters())
    K = _kfac(model, params, X, "expand")
    K_constant = _kfac(lambda X: layer(X) + frozen, params, X, "expand")
    assert_close(kfac_dense(K), kfac_dense(K_constant))


UNSUPPORTED = {
    "transposed_weight": ((3, 3), lambda p, X: linear(X, p["w"].T), "linear"),
    "transpose_twice": ((3, 3), lambda p, X: X @ p["w"].T.T.T, "Tensor.T"),
    "matmul": ((3, 3), lambda p, X: X @ p["w"], "Tensor.matmul"),
    "bias_added": ((3,), lambda p, X: X + p["w"], "Tensor.add"),
    "layer_norm": ((3,), lambda p, X: layer_norm(X, (3,), p["w"]), "layer_norm"),
    "input": ((3, 3), lambda p, X: linear(p["w"], X), "linear"),
    "lookup_only": (
        (3, 3),
        lambda p, X: p["w"][X.long()].sum(-1),
        "Tensor.__getitem__",
    ),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED), ids=list(UNSUPPORTED))
def test_unsupported_uses_name_operation_and_parameter(case):
    shape, model, operation = UNSUPPORTED[case]
    params = {"w": randn(*shape, dtype=float64, requires_grad=True)}
    X = rand(4, 3, dtype=float64)
    data = [(X, randn(model(params, X).shape, dtype=float64))]
    with pytest.raises(NotImplementedError, match=f"'w' in '.*{operation}'"):
        KFACLinearOperator(model, MSELoss(), params, data)


@pytest.mark.parametrize(
    "product",
    [
        lambda X, W: X @ W.T,
        lambda X, W: torch.matmul(X, W.t()),
        lambda X, W: X.matmul(W.transpose(-1, -2)),
        lambda X, W: X @ W.mT,
    ],
    ids=["T", "t", "transpose", "mT"],
)
def test_products_with_the_transposed_weight_are_linear_maps(product):
    """``x @ W.T`` (functional code, tied heads) is recorded as ``linear(x, W)``."""
    params = random_params({"w": (2, 3), "v": (3, 3)})

    def model(p, X, taps=None):
        return product(tanh(linear(X, p["v"])), p["w"])

    X = rand(4, 5, 3, dtype=float64)
    K = _kfac(model, params, X, "expand")
    assert K._mapping == {"w": {"weight": 0}, "v": {"weight": 1}}
    K_linear = _kfac(
        lambda p, X: linear(tanh(linear(X, p["v"])), p["w"]), params, X, "expand"
    )
    assert_close(kfac_dense(K), kfac_dense(K_linear))


def _model_with(calls):
    def model(params, X):
        return sum(linear(X, params[w], params.get(b)).sum(-1) for w, b in calls)

    return model


INCONSISTENT = {
    "two_biases": ([("w", "b"), ("w", "c")], "different biases"),
    "with_and_without_bias": ([("w", "b"), ("w", None)], "different biases"),
    "bias_of_two_weights": ([("w", "b"), ("v", "b")], "different weights"),
    "weight_and_bias": ([("w", "c"), ("c", None)], "both as a weight and as a bias"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT), ids=list(INCONSISTENT))
def test_inconsistent_weights_and_biases_raise(case):
    calls, match = INCONSISTENT[case]
    manual_seed(0)
    shapes = {"w": (3, 3), "v": (3, 3), "b": (3,), "c": (3,)}
    params = {
        k: randn(*s, dtype=float64, requires_grad=True) for k, s in shapes.items()
    }
    used = {name for call in calls for name in call if name is not None}
    params = {k: v for k, v in params.items() if k in used}
    data = [(rand(4, 3, dtype=float64), randn(4, dtype=float64))]
    with pytest.raises(NotImplementedError, match=match):
        KFACLinearOperator(_model_with(calls), MSELoss(), params, data)


class TiedLinearLM(Module):
    """Lookup, a Linear layer, and the lookup's matrix as unembedding; linear."""

    def __init__(self, detach_lookup: bool = False):
        super().__init__()
        self.emb, self.mid = Embedding(5, 3), Linear(3, 3)
        self.head = Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.detach_lookup = detach_lookup

    def forward(self, tokens: Tensor) -> Tensor:
        table = self.emb.weight.detach() if self.detach_lookup else self.emb.weight
        return self.head(self.mid(embedding(tokens, table)))


def test_tied_lookup_is_left_out_of_the_dense_ggn_block():
    """KFAC-expand is exact for the model whose lookup reads a constant matrix.

    The tied matrix gets the Kronecker factors of its linear use; the lookup's
    terms of the GGN (its own and the cross terms with the unembedding) are left
    out, and they are not zero.
    """
    manual_seed(0)
    model = TiedLinearLM().to(float64)
    tokens = randint(0, 5, (4, 3))
    data, loss_func = (
        [(tokens, randn(4, 3, 5, dtype=float64))],
        MSELoss(reduction="sum"),
    )
    params = list(model.parameters())  # tied matrix, mid.weight, mid.bias
    K = KFACLinearOperator(model, loss_func, params, data, fisher_type="type-2")
    assert list(K._mapping) == ["head", "mid"]
    ggn = functorch_ggn(model, loss_func, params, data)
    model.detach_lookup = True
    ggn_linear_use = functorch_ggn(model, loss_func, params, data)
    compare_matmat(K, restrict_to_blocks(ggn_linear_use, K))
    W, mid = slice(0, 15), slice(15, None)
    assert_close(ggn[mid, mid], ggn_linear_use[mid, mid])
    lookup_share = (ggn[W, W] - ggn_linear_use[W, W]).norm() / ggn[W, W].norm()
    assert lookup_share > 0.1
    # EKFAC follows: the same as for the model whose lookup reads a constant
    kwargs = {"fisher_type": "type-2"}
    E_constant = EKFACLinearOperator(model, loss_func, params, data, **kwargs)
    model.detach_lookup = False
    E = EKFACLinearOperator(model, loss_func, params, data, **kwargs)
    assert_close(ekfac_dense(E), ekfac_dense(E_constant))


def test_compiled_models_and_products():
    """Compiled models give the same factors; products compile."""
    manual_seed(0)
    model = TiedLinearLM().to(float64)
    data = [(randint(0, 5, (4, 3)), randn(4, 3, 5, dtype=float64))]
    params, kwargs = list(model.parameters()), {"fisher_type": "type-2"}
    K = KFACLinearOperator(model, MSELoss(), params, data, **kwargs)
    compiled = torch.compile(model, backend="aot_eager")
    K_compiled = KFACLinearOperator(compiled, MSELoss(), params, data, **kwargs)
    assert list(K_compiled._mapping) == ["_orig_mod.head", "_orig_mod.mid"]
    assert_close(kfac_dense(K_compiled), kfac_dense(K))
    v = randn(K.shape[1], dtype=float64)
    assert_close(torch.compile(lambda v: K @ v, backend="aot_eager")(v), K @ v)


class UnrolledCell(Module):
    """A recurrent cell unrolled over ``X [B, T, D_in]``, a Linear head per step."""

    def __init__(self, cell: Module, twin: bool = False):
        super().__init__()
        self.cell, self.head, self.twin = cell, Linear(4, 2), twin

    def step(self, x: Tensor, state):
        if not self.twin:
            return self.cell(x, state)
        name = {RNNCell: "rnn_tanh_cell", LSTMCell: "lstm_cell", GRUCell: "gru_cell"}
        cell = CELLS[f"torch.{name[type(self.cell)]}"]
        return cell(linear, x, state, *self.cell.parameters())

    def forward(self, X: Tensor) -> Tensor:
        h = X.new_zeros(X.shape[0], 4)
        state = (h, h) if isinstance(self.cell, LSTMCell) else h
        outputs = []
        for t in range(X.shape[1]):
            state = self.step(X[:, t], state)
            outputs.append(self.head(state[0] if isinstance(state, tuple) else state))
        return stack(outputs, dim=1)


@pytest.mark.parametrize("cell", [RNNCell, LSTMCell, GRUCell])
def test_fused_recurrent_cells_are_two_linear_uses(cell):
    """``RNNCell``, ``LSTMCell``, ``GRUCell``: as if written with ``linear``."""
    manual_seed(0)
    model, X = UnrolledCell(cell(3, 4)).to(float64), rand(3, 4, 3, dtype=float64)
    twin = UnrolledCell(model.cell, twin=True)
    twin.head = model.head
    assert_close(twin(X), model(X))  # the decomposition computes the cell
    params = list(model.parameters())
    K = _kfac(model, params, X, "expand")
    assert list(K._mapping) == ["cell.weight_ih", "cell.weight_hh", "head"]
    assert_close(kfac_dense(K), kfac_dense(_kfac(twin, params, X, "expand")))
