"""Tests for curvlinops._kfac_discovery: finding and naming KFAC's layers."""

import pytest
from torch import Tensor, float64, manual_seed, rand, randn
from torch.nn import Linear, Module, MSELoss, Parameter, Sequential
from torch.nn.functional import linear

from curvlinops import KFACLinearOperator
from curvlinops._kfac_discovery import layers_from_calls
from test.shared_weights import TinyGPT, token_batch


class Cell(Module):
    """A custom module that calls ``linear`` on parameters it holds directly."""

    def __init__(self):
        super().__init__()
        self.w_in = Parameter(randn(3, 3, dtype=float64))
        self.weight = Parameter(randn(3, 3, dtype=float64))
        self.bias = Parameter(randn(3, dtype=float64))

    def forward(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.w_in), self.weight, self.bias)


class Counting(Module):
    """Counts its forward passes."""

    def __init__(self, net: Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def _data(*batch_sizes: int, dim: int = 3):
    return [
        (rand(n, dim, dtype=float64), rand(n, dim, dtype=float64)) for n in batch_sizes
    ]


def test_layers_are_named_after_modules_or_parameters():
    """``weight``/``bias`` attributes give the module's name, others the parameter's.

    A tied matrix takes the name of the Linear head.
    """
    manual_seed(0)
    model = Sequential(Cell(), Linear(3, 3)).to(float64)
    params = list(model.parameters())
    K = KFACLinearOperator(model, MSELoss(), params, _data(4))
    assert K._mapping == {
        "0.w_in": {"weight": 0},
        "0": {"weight": 1, "bias": 2},
        "1": {"weight": 3, "bias": 4},
    }
    gpt = TinyGPT()
    tokens, y = token_batch()
    K = KFACLinearOperator(
        gpt, MSELoss(), [gpt.qkv.weight, gpt.wte.weight], [(tokens, y.float())]
    )
    assert K._mapping == {"qkv": {"weight": 0}, "lm_head": {"weight": 1}}


def test_layers_are_discovered_once_per_operator():
    """One forward pass finds the layers; other batch sizes need no new discovery."""
    manual_seed(0)
    layer = Linear(3, 3).to(float64)
    model = Counting(Sequential(layer, layer))  # reused: the modules cannot tell
    data = _data(4, 2, 5)
    kwargs = {"check_deterministic": False, "num_data": 11}
    K = KFACLinearOperator(model, MSELoss(), list(layer.parameters()), data, **kwargs)
    assert model.calls == 0  # the modules determine the layer
    model.net = Sequential(layer, Cell().to(float64))
    params = [layer.weight, layer.bias, model.net[1].weight, model.net[1].bias]
    K = KFACLinearOperator(model, MSELoss(), params, data, **kwargs)
    assert model.calls == 1
    K.compute_kronecker_factors()
    assert model.calls == 1 + len(data)


def test_calls_give_layers_bias_only_layers_and_order():
    labels = ["b", "w", "v", "c"]
    calls = [("linear", 1, None), ("linear", None, 0), ("linear", 2, 3)]
    calls += [("linear", 1, None), ("conv2d", None, 0)]
    layers = layers_from_calls(calls, {1: "embedding"}, labels)
    assert layers == [{"bias": 0}, {"weight": 1}, {"weight": 2, "bias": 3}]


def test_looked_up_only_parameters_raise():
    with pytest.raises(NotImplementedError, match="'e' in 'embedding'"):
        layers_from_calls([("linear", 0, None)], {1: "embedding"}, ["w", "e"])


def test_unused_parameters_raise_unless_a_module_tells_their_layer():
    """As in curvlinops 3.0.1, Linear layers the data never reach: zero factors."""
    manual_seed(0)
    model = Sequential(Cell(), Linear(3, 3)).to(float64)
    model.forward = lambda x: model[0](x)  # the Linear layer is never called
    params = list(model.parameters())
    K = KFACLinearOperator(model, MSELoss(), params, _data(4))
    assert list(K._mapping) == ["0.w_in", "0", "1"]
    K.compute_kronecker_factors()
    assert (K._gradient_covariances["1"] == 0).all()
    params = {
        "w": randn(3, 3, dtype=float64, requires_grad=True),
        "v": randn(3, dtype=float64, requires_grad=True),
    }
    with pytest.raises(ValueError, match=r"\['v'\] are not used"):
        KFACLinearOperator(lambda p, X: linear(X, p["w"]), MSELoss(), params, _data(4))


def test_module_layer_used_without_its_bias_raises():
    """The modules say the Linear has weight and bias; a call uses the weight only."""
    manual_seed(0)
    layer = Linear(3, 3).to(float64)
    model = Counting(layer)
    model.forward = lambda x: linear(x, layer.weight)
    with pytest.raises(NotImplementedError, match="without its bias"):
        KFACLinearOperator(model, MSELoss(), list(layer.parameters()), _data(4))
