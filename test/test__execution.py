"""Tests for curvlinops._execution: products whatever the caller's context."""

import pytest
from torch import (
    Tensor,
    cat,
    float64,
    inference_mode,
    manual_seed,
    no_grad,
    rand,
    randn,
)
from torch.autograd.functional import hessian
from torch.func import functional_call
from torch.nn import BatchNorm1d, Linear, MSELoss, Sequential, Tanh

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)
from curvlinops._execution import lazy_attribute
from curvlinops.examples.functorch import (
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_jacobian,
)
from test.cases import Case
from test.utils import assert_close, compare_matmat


@pytest.mark.parametrize(
    "make",
    [
        lambda m, f, p, d: HessianLinearOperator(m, f, p, d),
        lambda m, f, p, d: GGNLinearOperator(m, f, p, d),
        lambda m, f, p, d: EFLinearOperator(m, f, p, d),
        lambda m, f, p, d: FisherMCLinearOperator(m, f, p, d),
        lambda m, f, p, d: JacobianLinearOperator(m, p, d),
        lambda m, f, p, d: JacobianLinearOperator(m, p, d).adjoint(),
        lambda m, f, p, d: KFACLinearOperator(m, f, p, d),
        lambda m, f, p, d: EKFACLinearOperator(m, f, p, d),
    ],
    ids=[
        "hessian",
        "ggn",
        "ef",
        "mc_fisher",
        "jacobian",
        "jacobian_t",
        "kfac",
        "ekfac",
    ],
)
def test_products_ignore_the_callers_grad_mode(make):
    """Products under ``no_grad`` or ``inference_mode`` equal normal ones.

    That includes an operator built in inference mode from data created there.
    """
    model, loss_func, params, data = Case("mlp", "ce").make()
    op = make(model, loss_func, params, data)
    v = randn(op.shape[1], dtype=float64)
    expected = op @ v
    for mode in (no_grad, inference_mode):
        with mode():
            assert_close(op @ v, expected)
    with inference_mode():
        inference_data = [(X.clone(), y.clone()) for X, y in data]
        inference_op = make(model, loss_func, params, inference_data)
        assert_close(inference_op @ v, expected)


def test_batchnorm_in_train_mode_uses_batch_statistics_and_is_left_unchanged():
    """Products of a train-mode BatchNorm model are those of batch statistics.

    The reference is the same model with a BatchNorm that keeps no running
    statistics (it always normalizes with the batch's). The running statistics
    of the tracked model are the same before and after the products.
    """
    manual_seed(0)

    def model_with(track: bool):
        manual_seed(1)
        norm = BatchNorm1d(3, track_running_stats=track)
        return Sequential(Linear(4, 3), norm, Tanh(), Linear(3, 2)).to(float64)

    model, stateless = model_with(True).train(), model_with(False)
    data = [(rand(8, 4, dtype=float64), rand(8, 2, dtype=float64)) for _ in range(2)]
    buffers = [b.clone() for b in model.buffers()]
    params, reference_params = list(model.parameters()), list(stateless.parameters())
    for operator, reference in [
        (GGNLinearOperator, functorch_ggn),
        (EFLinearOperator, functorch_empirical_fisher),
    ]:
        op = operator(model, MSELoss(), params, data)
        compare_matmat(op, reference(stateless, MSELoss(), reference_params, data))
    # torch.func's second derivatives of batch_norm with batch statistics are wrong
    # (torch 2.13; finite differences agree with autograd), so build the reference
    # Hessian with autograd.
    names = [name for name, _ in stateless.named_parameters()]
    sizes = [p.numel() for p in reference_params]

    def risk(theta: Tensor) -> Tensor:  # batches of equal size: mean of batch losses
        chunks = [c.reshape(p.shape) for c, p in zip(theta.split(sizes), params)]
        state = dict(zip(names, chunks))
        losses = [MSELoss()(functional_call(stateless, state, X), y) for X, y in data]
        return sum(losses) / len(data)

    H = hessian(risk, cat([p.detach().flatten() for p in reference_params]))
    compare_matmat(HessianLinearOperator(model, MSELoss(), params, data), H)
    J = JacobianLinearOperator(model, params, data)
    compare_matmat(J, functorch_jacobian(stateless, reference_params, data))
    assert all(b.equal(saved) for b, saved in zip(model.buffers(), buffers))


def test_lazy_attribute_computes_once_and_stores_on_the_instance():
    calls = []

    class Holder:
        @lazy_attribute
        def value(self):
            calls.append(1)
            return len(calls)

    holder = Holder()
    assert holder.value == 1 and holder.value == 1 and calls == [1]
    assert vars(holder)["value"] == 1
    assert isinstance(Holder.value, lazy_attribute)
