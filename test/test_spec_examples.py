"""The usage examples of the specification run unchanged (API compatibility).

Users' scripts written for curvlinops 3.x must keep working, so the examples of the
specification's Hessian and activation-Hessian documentation run verbatim here. (The
estimators' examples run in ``test/trace`` and ``test/diagonal``.)
"""

from curvlinops import HessianLinearOperator
from curvlinops.experimental import ActivationHessianLinearOperator
from test.operator_kinds import run_doctest

HESSIAN_EXAMPLE = """
>>> from torch import rand, eye, allclose, kron, manual_seed
>>> from torch.nn import Linear, MSELoss
>>> from curvlinops import HessianLinearOperator
>>>
>>> # Create a simple linear model without bias
>>> _ = manual_seed(0) # make deterministic
>>> D_in, D_out = 4, 2
>>> num_data, num_batches = 10, 3
>>> model = Linear(D_in, D_out, bias=False)
>>> params = list(model.parameters())
>>> loss_func = MSELoss(reduction='sum')
>>>
>>> # Generate synthetic dataset and chunk into batches
>>> X, y = rand(num_data, D_in), rand(num_data, D_out)
>>> data = list(zip(X.split(num_batches), y.split(num_batches)))
>>>
>>> # Create Hessian linear operator
>>> H_op = HessianLinearOperator(model, loss_func, params, data)
>>>
>>> # Compare with the known Hessian matrix 2 I ⊗ Xᵀ X
>>> H_mat = 2 * kron(eye(D_out), X.T @ X)
>>> P = sum(p.numel() for p in params)
>>> v = rand(P) # generate a random vector
>>> (H_mat @ v).allclose(H_op @ v)
True
"""

ACTIVATION_HESSIAN_EXAMPLE = """
>>> from numpy import eye, allclose
>>> from torch import manual_seed, rand
>>> from torch.nn import Linear, MSELoss, Sequential, ReLU
>>>
>>> loss_func = MSELoss()
>>> model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2))
>>> [name for name, _ in model.named_modules()] # available layer names
['', '0', '1', '2']
>>> data = [(rand(10, 4), rand(10, 2))]
>>>
>>> hessian = ActivationHessianLinearOperator( # Hessian w.r.t. ReLU input
...     model, loss_func, ("1", "input", 0), data
... )
>>> hessian.shape # batch size * feature dimension (10 * 3)
(30, 30)
>>>
>>> # The ReLU's input is the first Linear's output, let's check that
>>> hessian2 = ActivationHessianLinearOperator( # Hessian w.r.t. first output
...     model, loss_func, ("0", "output", 0), data
... )
>>> I = eye(hessian.shape[1])
>>> allclose(hessian @ I, hessian2 @ I)
True
"""


def test_hessian_example_runs_unchanged():
    run_doctest(HESSIAN_EXAMPLE, {"HessianLinearOperator": HessianLinearOperator})


def test_activation_hessian_example_runs_unchanged():
    globs = {"ActivationHessianLinearOperator": ActivationHessianLinearOperator}
    run_doctest(ACTIVATION_HESSIAN_EXAMPLE, globs)
