"""Tests for curvlinops._kfac_pass: supported layers, rows, hooks."""

import pytest
from torch import (
    Tensor,
    arange,
    cat,
    einsum,
    float64,
    manual_seed,
    rand,
    randint,
    randn,
)
from torch.autograd import grad
from torch.nn import (
    BatchNorm1d,
    Conv2d,
    CrossEntropyLoss,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    MSELoss,
    Sequential,
)

from curvlinops import KFACLinearOperator
from curvlinops._kfac_pass import (
    layer_input_rows,
    layer_output_grad_rows,
    per_datum_input_rows,
    record_layers,
    supported_layer_mapping,
)
from curvlinops.examples.functorch import functorch_ggn
from test.utils import compare_matmat


class TokenClassifier(Module):
    """Embedding, LayerNorm and Linear layers on token sequences."""

    def __init__(self):
        super().__init__()
        self.embed = Embedding(7, 4)
        self.norm = LayerNorm(4)
        self.head = Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(tokens))).mean(1)


def test_mapping_names_layers_and_parameter_positions():
    """As in curvlinops 3.x: layer name -> role -> position in ``params``."""
    model = Sequential(Linear(3, 2), Conv2d(1, 1, 1, bias=False))
    params = [model[1].weight, model[0].bias, model[0].weight]
    expected = {"0": {"weight": 2, "bias": 1}, "1": {"weight": 0}}
    assert supported_layer_mapping(model, params) == expected
    assert list(expected["0"]) == ["weight", "bias"]  # roles in this order
    assert KFACLinearOperator.compute_parameter_mapping(params, model) == expected


@pytest.mark.parametrize("layer", ["norm", "embed"])
def test_unsupported_layer_raises_naming_it(layer):
    model = TokenClassifier()
    params = [getattr(model, layer).weight, model.head.weight]
    with pytest.raises(NotImplementedError, match=f"'{layer}'"):
        supported_layer_mapping(model, params)


def test_model_with_unsupported_layers_works_with_supported_params():
    """Embedding and LayerNorm are fine if only the Linear head's parameters enter.

    The head acts on token features that are then averaged, so 'reduce' is exact
    on one datum.
    """
    manual_seed(0)
    model = TokenClassifier().to(float64)
    data = [(randint(0, 7, (1, 5)), randint(0, 3, (1,)))]
    params = list(model.head.parameters())
    K = KFACLinearOperator(
        model,
        CrossEntropyLoss(),
        params,
        data,
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=False,
    )
    ggn = functorch_ggn(model, CrossEntropyLoss(), params, data)
    compare_matmat(K, ggn)


def test_batchnorm_parameters_raise():
    batchnorm = Sequential(Linear(3, 2), BatchNorm1d(2)).eval()
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        supported_layer_mapping(batchnorm, list(batchnorm.parameters()))


def test_foreign_and_shared_parameters_raise():
    model = Sequential(Linear(2, 2), Linear(2, 2))
    with pytest.raises(ValueError, match="not parameters"):
        supported_layer_mapping(model, [Linear(2, 2).weight])
    with pytest.raises(ValueError, match="more than once"):
        supported_layer_mapping(model, [model[0].weight, model[0].weight])
    model[1].weight = model[0].weight
    with pytest.raises(NotImplementedError, match="shared"):
        supported_layer_mapping(model, [model[0].weight])


def test_circular_padding_is_not_supported():
    model = Sequential(Conv2d(1, 1, 3, padding=1, padding_mode="circular"))
    with pytest.raises(NotImplementedError, match="padding_mode"):
        supported_layer_mapping(model, list(model.parameters()))


def test_layer_called_twice_raises():
    layer = Linear(2, 2).to(float64)
    model = Sequential(layer, layer)
    data = [(rand(3, 2, dtype=float64), rand(3, 2, dtype=float64))]
    with pytest.raises(NotImplementedError, match="twice"):
        KFACLinearOperator(model, MSELoss(), [layer.weight], data)


def test_input_rows_expand_reduce_and_bias_column():
    x = arange(24.0).reshape(2, 3, 4)
    linear = Linear(4, 5)
    expand = layer_input_rows(linear, x, 2, "expand", append_ones=True)
    assert expand.shape == (2, 3, 5) and (expand[..., -1] == 1).all()
    reduce = layer_input_rows(linear, x, 2, "reduce", append_ones=False)
    assert reduce.shape == (2, 1, 4)
    assert reduce.squeeze(1).allclose(x.mean(1))
    flat = layer_input_rows(linear, x.reshape(6, 4), 2, "expand", False)
    assert flat.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="batch axis"):
        layer_input_rows(linear, x[:, :, :4].reshape(24, 1), 5, "expand", False)


def test_conv_rows_expand_and_reduce_are_consistent():
    conv = Conv2d(2, 3, 3, stride=2, padding=1)
    x, g = rand(4, 2, 5, 5), rand(6, 4, 3, 3, 3)  # 6 vectors, 3x3 outputs
    a_expand = layer_input_rows(conv, x, 4, "expand", True)
    a_reduce = layer_input_rows(conv, x, 4, "reduce", True)
    assert a_expand.shape == (4, 9, 19)
    assert a_reduce.squeeze(1).allclose(a_expand.mean(1), atol=1e-6)
    g_expand = layer_output_grad_rows(conv, g, 4, "expand")
    assert g_expand.shape == (6, 4, 9, 3)
    assert g_expand[1, 2, 4].allclose(g[1, 2, :, 1, 1])
    g_reduce = layer_output_grad_rows(conv, g, 4, "reduce")
    assert g_reduce.squeeze(2).allclose(g_expand.sum(2))


def test_record_layers_probes_are_output_gradients_and_hooks_removed():
    model = Sequential(Linear(3, 2), Linear(2, 1))
    inputs = {}
    with record_layers(
        model, ["0", "1"], lambda n, m, x: inputs.update({n: x}), True
    ) as probes:
        output = model(randn(4, 3))
    assert set(inputs) == set(probes) == {"0", "1"}
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    output.sum().backward()
    assert probes["1"].grad.allclose(output.new_ones(4, 1))


class WithUnusedLayer(Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = Linear(3, 2), Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_layers_the_data_never_reach_have_zero_factors():
    model = WithUnusedLayer().to(float64)
    data = [(rand(4, 3, dtype=float64), rand(4, 2, dtype=float64))]
    K = KFACLinearOperator(model, MSELoss(), list(model.parameters()), data)
    K.compute_kronecker_factors()
    assert (K._input_covariances["unused"] == 0).all()
    assert (K._gradient_covariances["unused"] == 0).all()
    assert K._input_covariances["used"].abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "layer,in_shape",
    [
        (Linear(4, 6), (3, 4)),
        (Conv2d(4, 6, 3, stride=2, padding=1), (4, 5, 5)),
        (Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(1, 2), groups=2), (4, 5, 6)),
        (Conv2d(4, 6, 2, padding="same", groups=2), (4, 5, 5)),
    ],
    ids=["linear", "conv", "grouped_conv", "same_padding"],
)
def test_per_datum_rows_give_the_per_datum_gradients(layer, in_shape):
    layer = layer.to(float64)
    manual_seed(0)
    x = rand(3, *in_shape, dtype=float64)
    out_grad = randn(layer(x).shape, dtype=float64)
    a = per_datum_input_rows(layer, x, 3, append_ones=True)
    g = layer_output_grad_rows(layer, out_grad.unsqueeze(0), 3, "expand")[0]
    if a.ndim == 4:  # [N, groups, P, D_in + 1]: each group's channels, its patches
        gradients = einsum("npgc,ngpi->ngci", g.unflatten(-1, (2, -1)), a)
        gradients = gradients.flatten(1, 2)
    else:
        gradients = einsum("npo,npi->noi", g, a)
    for n in range(3):
        grad_W, grad_b = grad(
            (layer(x[n : n + 1]) * out_grad[n : n + 1]).sum(), layer.parameters()
        )
        assert gradients[n].allclose(cat([grad_W.flatten(1), grad_b[:, None]], 1))
