"""Tests for curvlinops._kfac_state: saving and loading KFAC and EKFAC."""

from io import BytesIO

import pytest
import torch
from torch import float64, rand
from torch.nn import MSELoss

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from test.cases import Case
from test.kfac_references import ekfac_dense, kfac_dense
from test.utils import assert_close

OPERATORS = pytest.mark.parametrize(
    "cls", [KFACLinearOperator, EKFACLinearOperator], ids=["kfac", "ekfac"]
)


@OPERATORS
@pytest.mark.parametrize("separate", [True, False], ids=["sep", "joint"])
def test_state_dict_round_trip(cls, separate):
    model, loss_func, params, data = Case("cnn", "ce").make()
    kwargs = {"fisher_type": "mc", "mc_samples": 3, "kfac_approx": "reduce"}
    op = cls(
        model, loss_func, params, data, separate_weight_and_bias=separate, **kwargs
    )
    dense = (kfac_dense if cls is KFACLinearOperator else ekfac_dense)(op)
    buffer = BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    fresh = cls(model, loss_func, params, data, check_deterministic=False)
    fresh._data_pass = None  # loading must not recompute the factors
    fresh.load_state_dict(state)
    assert fresh._kfac_approx == "reduce" and fresh._mc_samples == 3
    assert fresh._separate_weight_and_bias == separate
    v = rand(op.shape[1], dtype=float64)
    assert_close(fresh @ v, dense @ v)
    loaded = cls.from_state_dict(state, model, params, data)
    assert_close(loaded @ v, dense @ v)


def test_load_state_dict_rejects_other_losses_and_layers():
    model, loss_func, params, data = Case("mlp", "ce").make()
    state = KFACLinearOperator(model, loss_func, params, data).state_dict()
    other_loss = KFACLinearOperator(
        model, MSELoss(), params, data, check_deterministic=False
    )
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        other_loss.load_state_dict(state)
    first_layer = KFACLinearOperator(model, loss_func, params[:2], data)
    with pytest.raises(ValueError, match="layers|for"):
        first_layer.load_state_dict(state)
