"""Tests for curvlinops.vivit._layers: one tiny model per layer with a rule."""

from collections.abc import Callable

import pytest
from backpack.custom_module.branching import Parallel, SumModule
from backpack.custom_module.pad import Pad
from backpack.custom_module.permute import Permute
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from backpack.extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchDiagHessian,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
)
from torch import float64, manual_seed, rand, randint
from torch.nn import (
    ELU,
    GELU,
    GRU,
    LSTM,
    RNN,
    SELU,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BCEWithLogitsLoss,
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    CrossEntropyLoss,
    Dropout,
    Embedding,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    LogSigmoid,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    Module,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    ZeroPad2d,
)

from curvlinops.vivit import EigvalshComputation
from curvlinops.vivit._layers import LAYERS
from test.cases import Case
from test.vivit.utils import (
    BranchedCase,
    assert_same_spectrum,
    dense_ggn,
    extended_problem,
    make_problem,
    run,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

NUM_SAMPLES = 4


def _between(layer: Module) -> Callable[[], Module]:
    """A layer between two linear layers (activations, scalings, dropout)."""
    return lambda: Sequential(Linear(3, 3), layer, Linear(3, 2))


def _conv_pool(conv: type, pool: Module, features: int) -> Callable[[], Module]:
    """A pooling layer after a convolution (so that its input has a factor)."""
    return lambda: Sequential(conv(1, 1, 2), pool, Flatten(), Linear(features, 2))


def _batch_norm(layer: Module, before: Module, features: int) -> Callable[[], Module]:
    """Batch normalization in evaluation mode with non-trivial running statistics."""
    layer.running_mean.uniform_(-0.5, 0.5)
    layer.running_var.uniform_(0.5, 1.5)
    return lambda: Sequential(before, layer, Flatten(), Linear(features, 2)).eval()


def _recurrent(layer: type) -> Callable[[], Module]:
    """A recurrent layer after a linear layer, its output sequence flattened."""
    return lambda: Sequential(
        Linear(2, 2),
        layer(2, 3, batch_first=True),
        ReduceTuple(0),
        Flatten(),
        Linear(6, 2),
    )


# Layer class -> (tiny model that contains it, input shape without batch axis)
LAYER_MODELS: dict[type[Module], tuple[Callable[[], Module], tuple[int, ...]]] = {
    Linear: (lambda: Sequential(Linear(3, 2)), (3,)),
    Conv1d: (lambda: Sequential(Conv1d(2, 2, 2), Flatten(), Linear(4, 2)), (2, 3)),
    Conv2d: (lambda: Sequential(Conv2d(1, 2, 2), Flatten(), Linear(8, 2)), (1, 3, 3)),
    Conv3d: (
        lambda: Sequential(Conv3d(1, 1, 2), Flatten(), Linear(8, 2)),
        (1, 3, 3, 3),
    ),
    ConvTranspose1d: (
        lambda: Sequential(ConvTranspose1d(2, 1, 2), Flatten(), Linear(4, 2)),
        (2, 3),
    ),
    ConvTranspose2d: (
        lambda: Sequential(
            ConvTranspose2d(1, 1, 2, stride=2), Flatten(), Linear(16, 2)
        ),
        (1, 2, 2),
    ),
    ConvTranspose3d: (
        lambda: Sequential(ConvTranspose3d(1, 1, 2), Flatten(), Linear(27, 2)),
        (1, 2, 2, 2),
    ),
    BatchNorm1d: (_batch_norm(BatchNorm1d(3), Linear(3, 3), 3), (3,)),
    BatchNorm2d: (_batch_norm(BatchNorm2d(2), Conv2d(1, 2, 1), 8), (1, 2, 2)),
    BatchNorm3d: (_batch_norm(BatchNorm3d(1), Conv3d(1, 1, 1), 8), (1, 2, 2, 2)),
    Embedding: (lambda: Sequential(Embedding(5, 2), Flatten(), Linear(6, 2)), (3,)),
    RNN: (_recurrent(RNN), (2, 2)),
    LSTM: (_recurrent(LSTM), (2, 2)),
    ReLU: (_between(ReLU()), (3,)),
    Sigmoid: (_between(Sigmoid()), (3,)),
    Tanh: (_between(Tanh()), (3,)),
    LeakyReLU: (_between(LeakyReLU(0.3)), (3,)),
    LogSigmoid: (_between(LogSigmoid()), (3,)),
    ELU: (_between(ELU()), (3,)),
    SELU: (_between(SELU()), (3,)),
    MaxPool1d: (_conv_pool(Conv1d, MaxPool1d(2), 2), (1, 5)),
    MaxPool2d: (_conv_pool(Conv2d, MaxPool2d(2), 4), (1, 5, 5)),
    MaxPool3d: (_conv_pool(Conv3d, MaxPool3d(2), 1), (1, 3, 3, 3)),
    AvgPool1d: (_conv_pool(Conv1d, AvgPool1d(2), 2), (1, 5)),
    AvgPool2d: (_conv_pool(Conv2d, AvgPool2d(2), 4), (1, 5, 5)),
    AvgPool3d: (_conv_pool(Conv3d, AvgPool3d(2), 1), (1, 3, 3, 3)),
    AdaptiveAvgPool1d: (_conv_pool(Conv1d, AdaptiveAvgPool1d(2), 2), (1, 5)),
    AdaptiveAvgPool2d: (_conv_pool(Conv2d, AdaptiveAvgPool2d(2), 4), (1, 5, 5)),
    AdaptiveAvgPool3d: (_conv_pool(Conv3d, AdaptiveAvgPool3d(1), 1), (1, 3, 3, 3)),
    ZeroPad2d: (_conv_pool(Conv2d, ZeroPad2d((1, 0, 0, 1)), 9), (1, 3, 3)),
    Flatten: (lambda: Sequential(Linear(2, 2), Flatten(), Linear(4, 2)), (2, 2)),
    Dropout: (lambda: _between(Dropout(0.4))().eval(), (3,)),
    Identity: (_between(Identity()), (3,)),
    ScaleModule: (_between(ScaleModule(-0.5)), (3,)),
    SumModule: (_between(Parallel(Tanh(), Identity())), (3,)),
    Slicing: (
        lambda: Sequential(
            Linear(3, 4), Slicing((slice(None), slice(1, 3))), Tanh(), Linear(2, 2)
        ),
        (3,),
    ),
    Pad: (  # positive padding, then negative padding (cropping)
        lambda: Sequential(
            Linear(3, 2), Pad((1, 2)), Tanh(), Pad((-1, 0)), Linear(4, 2)
        ),
        (3,),
    ),
    Permute: (
        lambda: Sequential(Linear(2, 3), Permute(0, 2, 1), Flatten(), Linear(6, 2)),
        (2, 2),
    ),
}


def _layer_problem(layer: type[Module]):
    """Seeded problem with a layer's tiny model, cross-entropy loss, float64."""
    manual_seed(0)
    factory, in_shape = LAYER_MODELS[layer]
    model = factory().to(float64)
    if layer is Embedding:
        X = randint(0, 5, (NUM_SAMPLES, *in_shape))
    else:
        X = rand(NUM_SAMPLES, *in_shape, dtype=float64)
    y = randint(0, 2, (NUM_SAMPLES,))
    return extended_problem(model, CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("layer", list(LAYER_MODELS), ids=lambda c: c.__name__)
def test_layer_ggn_eigenvalues_match_dense(layer: type[Module]):
    """Each layer's model: Gram eigenvalues = dense GGN eigenvalues (+ sub-sampled)."""
    problem = _layer_problem(layer)
    assert any(type(m) is layer for m in problem.model.modules())
    group = {"params": problem.params}
    for subsampling in [None, [3, 0, 2]]:
        computation = EigvalshComputation(subsampling=subsampling)
        run(problem, computation, [group])
        G = dense_ggn(problem, group, subsampling)
        assert_same_spectrum(computation.get_result(group), G)


def test_every_backpack_second_order_layer_has_a_rule_and_a_test():
    """The rules cover BackPACK's second-order extensions; each rule has a model."""
    extensions = [
        SqrtGGNExact(),
        DiagGGNExact(),
        BatchDiagGGNExact(),
        DiagHessian(),
        BatchDiagHessian(),
        KFAC(),
        KFLR(),
        KFRA(),
    ]
    # BackPACK keeps its module-to-rule tables private
    backpack_layers = {
        module
        for ext in extensions
        for module in ext._BackpropExtension__module_extensions
    }
    losses = {MSELoss, CrossEntropyLoss, BCEWithLogitsLoss}
    assert backpack_layers - losses <= set(LAYERS)
    assert set(LAYERS) == set(LAYER_MODELS)


def _problem_around(layer: Module):
    """A linear layer, then ``layer``, then a linear classifier, on sequences."""
    manual_seed(0)
    X = rand(2, 2, 3, dtype=float64)
    reduce = [ReduceTuple(0)] if isinstance(layer, (RNN, GRU)) else []
    body = Sequential(Linear(3, 3), layer, *reduce, Flatten()).to(float64)
    output = body(X)
    model = Sequential(*body, Linear(output.shape[1], 2))
    y = randint(0, 2, (output.shape[0],))
    return extended_problem(model.to(float64), CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("layer", [GELU(), GRU(3, 3, batch_first=True)], ids=str)
def test_layer_without_rule_names_it_and_the_working_models(layer: Module):
    problem = _problem_around(layer)
    with pytest.raises(NotImplementedError) as info:
        run(problem, EigvalshComputation(), [{"params": problem.params}])
    message = str(info.value)
    assert type(layer).__name__ in message
    for works in ["torch.nn.modules.conv.Conv2d", "Slicing", "use_converter=True"]:
        assert works in message


@pytest.mark.parametrize(
    "layer, error, match",
    [
        (RNN(3, 3), NotImplementedError, "Batch axis must be first"),
        (Slicing((slice(0, 1),)), ValueError, "batch axis"),
        (Pad((1, 1), mode="reflect"), NotImplementedError, "mode='constant'"),
    ],
    ids=["rnn_time_first", "slice_batch", "pad_reflect"],
)
def test_unsupported_configuration_names_the_layer(layer, error, match):
    """BackPACK's derivatives reject a configuration: the error names the layer."""
    problem = _problem_around(layer)
    with pytest.raises(error, match=match) as info:
        run(problem, EigvalshComputation(), [{"params": problem.params}])
    assert repr(layer) in str(info.value)


def test_operations_outside_modules_raise():
    """A functional operation between extended modules cuts the factor's path."""
    problem = make_problem(Case("mlp", "ce"))
    problem.model[0].register_forward_hook(lambda module, inputs, output: 2 * output)
    with pytest.raises(NotImplementedError, match="not modules"):
        run(problem, EigvalshComputation(), [{"params": problem.params}])


def test_custom_container_without_converter_raises():
    """BackPACK hooks a custom container itself; the error points to the converter."""
    model, loss_func, _, [(X, y)] = BranchedCase("resnet").make()
    problem = extended_problem(model, loss_func, X, y)  # no converter
    with pytest.raises(NotImplementedError, match="container") as info:
        run(problem, EigvalshComputation(), [{"params": problem.params}])
    assert "use_converter=True" in str(info.value)
