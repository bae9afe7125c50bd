"""Targets of the performance issues, as multiples of one gradient evaluation.

``target(problem, operator, metric)`` returns the bound a figure should meet, or
``None``. Issue 18 sets the transformer's (both sequence lengths), the Hessian's on
the MLP and CNN, the per-column cost of 8 columns (at most 0.6 times a matvec's,
and never more than one), and peak memory (2.5 gradients). The remaining matvec
and precompute targets come from the first performance round.
"""

from __future__ import annotations

KRONECKER = {"kfac", "ekfac", "kfac_inverse"}  # products need no backpropagation
TRANSFORMERS = {"transformer", "transformer256"}

# first round, any problem
DEFAULTS = {
    "hessian": {"matvec": 2.0},
    "ggn": {"matvec": 1.6},
    "ef": {"matvec": 1.6},
    "mc_fisher": {"matvec": 1.6},
    "jacobian": {"matvec": 1.2},
    "transposed_jacobian": {"matvec": 1.2},
    "kfac": {"matvec": 0.2, "precompute": 1.5},
    "ekfac": {"precompute": 3.0},
}
# issue 18, per problem
PER_PROBLEM = {
    **{
        (problem, name): {"matvec": value}
        for problem in TRANSFORMERS
        for name, value in [
            ("hessian", 2.5),
            ("ggn", 2.0),
            ("ef", 2.0),
            ("mc_fisher", 2.0),
            ("jacobian", 1.3),
        ]
    },
    ("mlp", "hessian"): {"matvec": 2.0},
    ("cnn", "hessian"): {"matvec": 2.5},
}
COLUMNS_TARGET, MEMORY_TARGET = 0.6, 2.5


def target(problem: str, name: str, metric: str) -> float | None:
    """Return the target of a figure, if there is one.

    Args:
        problem: Problem name.
        name: Operator name.
        metric: ``precompute``, ``matvec``, ``per col.``, ``col/vec`` or ``memory``.

    Returns:
        The bound, or ``None``.
    """
    if name in KRONECKER and metric in ("col/vec", "memory"):
        return None
    if metric == "col/vec":
        return COLUMNS_TARGET
    if metric == "memory":
        return MEMORY_TARGET
    if (problem, name) in PER_PROBLEM:
        return PER_PROBLEM[problem, name].get(metric)
    return DEFAULTS.get(name, {}).get(metric)
