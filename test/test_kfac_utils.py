"""Tests for curvlinops.kfac_utils: enums, Conv2d patches, canonical converters."""

import pytest
from torch import Size, arange, cat, eye, float64, manual_seed, rand, tensor
from torch.func import hessian
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, L1Loss, MSELoss
from torch.nn.functional import conv2d, unfold

from curvlinops.kfac_utils import (
    FisherType,
    FromCanonicalLinearOperator,
    KFACType,
    MetaEnum,
    ToCanonicalLinearOperator,
    extract_averaged_patches,
    extract_patches,
    loss_hessian_matrix_sqrt,
)
from test.utils import assert_close, compare_matmat


def test_enums_support_value_membership():
    assert "mc" in FisherType and "forward-only" in FisherType
    assert "expand" in KFACType and "reduce" in KFACType
    assert "foo" not in FisherType and None not in KFACType and [1] not in KFACType
    assert FisherType.TYPE2 == "type-2" and KFACType("reduce") is KFACType.REDUCE
    assert [f.value for f in FisherType] == [
        "type-2",
        "mc",
        "empirical",
        "forward-only",
    ]


CONVS = [  # kernel_size, stride, padding, dilation
    (3, 1, 0, 1),
    ((3, 2), (2, 1), (1, 2), 1),
    (3, 2, 1, (2, 1)),
    (4, 1, "same", 1),  # unequal left/right padding
    ((2, 3), 1, "same", 2),
    (3, (1, 2), "valid", 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("hyperparameters", CONVS, ids=str)
def test_patches_reproduce_the_convolution(hyperparameters):
    manual_seed(0)
    kernel_size, stride, padding, dilation = hyperparameters
    x = rand(2, 3, 7, 8, dtype=float64)
    k1, k2 = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    weight = rand(4, 3, k1, k2, dtype=float64)
    expected = conv2d(x, weight, None, stride, padding, dilation)
    patches = extract_patches(x, kernel_size, stride, padding, dilation, 1)
    assert patches.shape == (2, expected.shape[2] * expected.shape[3], 3 * k1 * k2)
    out = (patches @ weight.flatten(start_dim=1).T).transpose(1, 2)
    assert_close(out.reshape(expected.shape), expected)
    averaged = extract_averaged_patches(x, kernel_size, stride, padding, dilation, 1)
    assert_close(averaged, patches.mean(1))


@pytest.mark.parametrize("groups", [2, 4])
def test_patches_average_channel_groups(groups):
    manual_seed(0)
    x = rand(2, 4, 5, 5, dtype=float64)
    patches = extract_patches(x, 3, 1, 1, 1, groups)
    group_mean = x.reshape(2, groups, 4 // groups, 5, 5).mean(1)
    assert_close(patches, unfold(group_mean, 3, padding=1).transpose(1, 2))
    averaged = extract_averaged_patches(x, 3, 1, 1, 1, groups)
    assert_close(averaged, patches.mean(1))


def _converters(groups):
    shapes = {"b1": (2,), "W1": (2, 3), "W2": (4, 1, 2, 2), "b2": (4,)}
    args = (shapes, groups, "cpu", float64)
    return ToCanonicalLinearOperator(*args), FromCanonicalLinearOperator(*args)


GROUPINGS = {
    "joint": [{"W": "W1", "b": "b1"}, {"W": "W2", "b": "b2"}],
    "separate": [{"b": "b2"}, {"W": "W1"}, {"W": "W2"}, {"b": "b1"}],
}


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_canonical_converters_are_adjoint_permutations(grouping):
    to_canonical, from_canonical = _converters(GROUPINGS[grouping])
    dense = to_canonical @ eye(to_canonical.shape[1], dtype=float64)
    assert (dense.sum(0) == 1).all() and (dense.sum(1) == 1).all()  # permutation
    compare_matmat(to_canonical, dense)
    compare_matmat(from_canonical, dense.T)
    assert isinstance(to_canonical.adjoint(), FromCanonicalLinearOperator)
    assert isinstance(from_canonical.adjoint(), ToCanonicalLinearOperator)


def test_joint_canonical_block_appends_bias_column():
    to_canonical, _ = _converters(GROUPINGS["joint"])
    values = [arange(n, dtype=float64) for n in (2, 6, 16, 4)]
    b1, W1, W2, b2 = [
        v.reshape(s) for v, s in zip(values, [(2,), (2, 3), (4, 1, 2, 2), (4,)])
    ]
    blocks = to_canonical @ [b1, W1, W2, b2]
    assert_close(blocks[0], cat([W1, b1.unsqueeze(1)], 1).flatten())
    assert_close(blocks[1], cat([W2.flatten(1), b2.unsqueeze(1)], 1).flatten())
    assert to_canonical._out_shape == [Size([8]), Size([20])]


@pytest.mark.parametrize(
    "groups,match",
    [
        ([{"W": "W1", "b": "b1"}, {"W": "W2"}], "exactly once"),
        ([{"W": "W1", "b": "b2"}, {"W": "W2", "b": "b1"}], "joint bias"),
        ([{"X": "W1", "b": "b1"}, {"W": "W2", "b": "b2"}], "'W' and/or 'b'"),
    ],
)
def test_invalid_groups_raise(groups, match):
    with pytest.raises(ValueError, match=match):
        _converters(groups)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce", "ce_probabilities", "bce"])
@pytest.mark.parametrize("batched", [True, False], ids=["1xC", "C"])
def test_loss_hessian_matrix_sqrt_factorizes_the_loss_hessian(loss, reduction, batched):
    manual_seed(0)
    output = rand(1, 4, dtype=float64)
    targets = {
        "mse": rand(1, 4, dtype=float64),
        "ce": tensor([2]),
        "ce_probabilities": rand(1, 4, dtype=float64),  # mass != 1 scales the Hessian
        "bce": rand(1, 4, dtype=float64),
    }
    losses = {"mse": MSELoss, "bce": BCEWithLogitsLoss}
    loss_func = losses.get(loss, CrossEntropyLoss)(reduction=reduction)
    target = targets[loss]
    if not batched:
        output, target = output[0], target[0]
    S = loss_hessian_matrix_sqrt(output, target, loss_func)
    H = hessian(lambda f: loss_func(f, target))(output).reshape(4, 4)
    assert S.shape == (4, 4)
    assert_close(S @ S.T, H)


def test_loss_hessian_matrix_sqrt_rejects_bad_input():
    f = rand(2, 3)
    with pytest.raises(ValueError, match="one datum"):
        loss_hessian_matrix_sqrt(f, tensor([0, 1]), CrossEntropyLoss())
    with pytest.raises(ValueError, match="L1Loss"):
        loss_hessian_matrix_sqrt(f[:1], f[:1], L1Loss())
    with pytest.raises(NotImplementedError, match="ignore_index"):
        loss_hessian_matrix_sqrt(f[:1], tensor([-100]), CrossEntropyLoss())


def test_meta_enum_and_the_enums_home():
    """The enums live in ``curvlinops.kfac`` for pickles, as in curvlinops 3.x."""
    import curvlinops
    import curvlinops.ekfac
    import curvlinops.kfac

    for enum in (FisherType, KFACType):
        assert type(enum) is MetaEnum and enum.__module__ == "curvlinops.kfac"
        for module in (curvlinops, curvlinops.kfac, curvlinops.ekfac):
            assert getattr(module, enum.__name__) is enum
    assert curvlinops.kfac.MetaEnum is MetaEnum
