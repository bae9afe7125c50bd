"""Tests for curvlinops._kfac_pass: supported layers, rows of one or several uses."""

import pytest
from torch import (
    Size,
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
from curvlinops._kfac_calls import CONV2D, LINEAR, Use
from curvlinops._kfac_pass import (
    input_rows,
    output_grad_rows,
    per_datum_input_rows,
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


def _linear_use(x: Tensor, d_out: int) -> Use:
    return Use(LINEAR, x, Size([*x.shape[:-1], d_out]))


def _conv_use(x: Tensor, conv: Conv2d) -> Use:
    hyperparameters = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return Use(CONV2D, x, conv(x).shape, (*hyperparameters, conv.groups))


def test_input_rows_expand_reduce_and_bias_column():
    x = arange(24.0).reshape(2, 3, 4)
    use = _linear_use(x, 5)
    expand = input_rows([use], 2, "expand", append_ones=True)
    assert expand.shape == (2, 3, 5) and (expand[..., -1] == 1).all()
    reduce = input_rows([use], 2, "reduce", append_ones=False)
    assert reduce.shape == (2, 1, 4)
    assert reduce.squeeze(1).allclose(x.mean(1))
    flat = input_rows([_linear_use(x.reshape(6, 4), 5)], 2, "expand", False)
    assert flat.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="batch axis"):
        input_rows([_linear_use(x.reshape(24, 1), 5)], 5, "expand", False)


def test_uses_add_to_the_shared_axis():
    """Two uses with 3 and 1 positions: 4 rows per datum; reduce averages all 4."""
    x1, x2, g1, g2 = rand(2, 3, 4), rand(2, 4), rand(5, 2, 3, 6), rand(5, 2, 6)
    uses = [_linear_use(x1, 6), _linear_use(x2, 6)]
    joined = cat([x1, x2.unsqueeze(1)], dim=1)
    assert input_rows(uses, 2, "expand", False).equal(joined)
    reduce = input_rows(uses, 2, "reduce", True)
    assert reduce[:, 0, :4].allclose(joined.mean(1)) and (reduce[..., 4] == 1).all()
    g_joined = cat([g1, g2.unsqueeze(2)], dim=2)
    assert output_grad_rows(uses, [g1, g2], 2, "expand").equal(g_joined)
    g_reduce = output_grad_rows(uses, [g1, g2], 2, "reduce")
    assert g_reduce.squeeze(2).allclose(g_joined.sum(2))


def test_conv_rows_expand_and_reduce_are_consistent():
    conv = Conv2d(2, 3, 3, stride=2, padding=1)
    x, g = rand(4, 2, 5, 5), rand(6, 4, 3, 3, 3)  # 6 vectors, 3x3 outputs
    use = _conv_use(x, conv)
    a_expand = input_rows([use], 4, "expand", True)
    a_reduce = input_rows([use], 4, "reduce", True)
    assert a_expand.shape == (4, 9, 19)
    assert a_reduce.squeeze(1).allclose(a_expand.mean(1), atol=1e-6)
    g_expand = output_grad_rows([use], [g], 4, "expand")
    assert g_expand.shape == (6, 4, 9, 3)
    assert g_expand[1, 2, 4].allclose(g[1, 2, :, 1, 1])
    g_reduce = output_grad_rows([use], [g], 4, "reduce")
    assert g_reduce.squeeze(2).allclose(g_expand.sum(2))


def test_reduce_weights_conv_uses_by_their_positions():
    """A use with 9 output pixels and one with 1 pixel: weights 9/10 and 1/10."""
    conv, small = Conv2d(2, 3, 3, stride=2, padding=1), Conv2d(2, 3, 3)
    x, x_small = rand(4, 2, 5, 5), rand(4, 2, 3, 3)
    uses = [_conv_use(x, conv), _conv_use(x_small, small)]
    expand = input_rows(uses, 4, "expand", False)
    assert expand.shape == (4, 10, 18)
    reduce = input_rows(uses, 4, "reduce", False)
    assert reduce.squeeze(1).allclose(expand.mean(1), atol=1e-6)


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
    use = _conv_use(x, layer) if isinstance(layer, Conv2d) else _linear_use(x, 6)
    a = per_datum_input_rows([use], 3, append_ones=True)
    g = output_grad_rows([use], [out_grad.unsqueeze(0)], 3, "expand")[0]
    gradients = _per_datum_gradients(a, g)
    for n in range(3):
        grad_W, grad_b = grad(
            (layer(x[n : n + 1]) * out_grad[n : n + 1]).sum(), layer.parameters()
        )
        assert gradients[n].allclose(cat([grad_W.flatten(1), grad_b[:, None]], 1))


def _per_datum_gradients(a: Tensor, g: Tensor) -> Tensor:
    """Per-datum gradients ``[N, D_out, D_in]`` from per-datum rows (two groups)."""
    if a.ndim == 4:  # [N, groups, P, D_in + 1]: each group's channels, its patches
        gradients = einsum("npgc,ngpi->ngci", g.unflatten(-1, (2, -1)), a)
        return gradients.flatten(1, 2)
    return einsum("npo,npi->noi", g, a)


@pytest.mark.parametrize(
    "layer,in_shapes",
    [
        (Linear(4, 6), [(3, 4), (4,)]),
        (Conv2d(4, 6, 3, padding=1, groups=2), [(4, 5, 5), (4, 3, 3)]),
    ],
    ids=["linear", "grouped_conv"],
)
def test_per_datum_rows_of_several_uses_give_the_per_datum_gradients(layer, in_shapes):
    """A layer called twice: the rows of both uses give the summed gradients."""
    layer = layer.to(float64)
    manual_seed(0)
    xs = [rand(3, *shape, dtype=float64) for shape in in_shapes]
    out_grads = [randn(layer(x).shape, dtype=float64) for x in xs]
    conv = isinstance(layer, Conv2d)
    uses = [_conv_use(x, layer) if conv else _linear_use(x, 6) for x in xs]
    a = per_datum_input_rows(uses, 3, append_ones=True)
    g = output_grad_rows(uses, [o.unsqueeze(0) for o in out_grads], 3, "expand")[0]
    gradients = _per_datum_gradients(a, g)
    for n in range(3):
        loss = sum(
            (layer(x[n : n + 1]) * o[n : n + 1]).sum() for x, o in zip(xs, out_grads)
        )
        grad_W, grad_b = grad(loss, layer.parameters())
        assert gradients[n].allclose(cat([grad_W.flatten(1), grad_b[:, None]], 1))
