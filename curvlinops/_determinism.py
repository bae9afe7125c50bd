"""The determinism probe: two passes over data and model must agree.

Curvature operators assume that every pass over the data yields the same batches in
the same order and that the model is deterministic; shuffled loaders, data
augmentation or Dropout in train mode would silently give products of a different
matrix every time. The probe summarizes every batch's inputs, labels and predictions
in a few numbers (:func:`batch_fingerprint`) and compares two passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

from torch import Tensor, cat, float64, linspace, no_grad, stack

from curvlinops.utils import allclose_report

# Two passes must agree up to floating point noise.
DETERMINISM_RTOL, DETERMINISM_ATOL = 1e-5, 1e-7


def batch_fingerprint(x: Tensor | MutableMapping | object) -> Tensor:
    """Summarize a tensor (or the tensors of a mapping) in a few float64 numbers.

    The summary contains the number of entries, their sum, their squared sum, and a
    position-weighted sum, so that changed values, changed sizes, and permutations
    change it. Non-tensor entries of a mapping are ignored.

    Args:
        x: Tensor or mapping of tensors.

    Returns:
        A 1d float64 tensor on the CPU.
    """
    if isinstance(x, MutableMapping):
        parts = [batch_fingerprint(x[k]) for k in sorted(x, key=str)]
        return cat([p for p in parts if p.numel() > 0] or [stack([])])
    if not isinstance(x, Tensor):
        return Tensor().to(float64)
    flat = x.detach().flatten().to(float64).cpu()
    weights = linspace(1.0, 2.0, flat.numel(), dtype=float64)
    return stack(
        [flat.new_tensor(flat.numel()), flat.sum(), flat.square().sum(), flat @ weights]
    )


@no_grad()
def fingerprint_pass(
    batches: Iterable, model_func: Callable
) -> list[dict[str, Tensor]]:
    """Summarize every batch's inputs, labels, and predictions in a few numbers.

    Args:
        batches: The mini-batches ``(X, y)`` of one pass over the data.
        model_func: The model.

    Returns:
        One dictionary of fingerprints per batch.
    """
    return [
        {
            "inputs": batch_fingerprint(X),
            "labels": batch_fingerprint(y),
            "predictions": batch_fingerprint(model_func(X)),
        }
        for X, y in batches
    ]


def compare_passes(first: list[dict], second: list[dict]) -> str | None:
    """Compare the fingerprints of two passes over the data.

    Args:
        first: Fingerprints of the first pass.
        second: Fingerprints of the second pass.

    Returns:
        A description of the first difference, or ``None`` if there is none.
    """
    if len(first) != len(second):
        return (
            f"The data yielded {len(first)} and then {len(second)} batches. "
            "Data must be identical on every pass."
        )
    for idx, (fp1, fp2) in enumerate(zip(first, second)):
        for what in ("inputs", "labels", "predictions"):
            if not fp1[what].isfinite().all():
                return (
                    f"The {what} of batch {idx} contain NaN or infinite values; "
                    "curvature products would be, too."
                )
            if not allclose_report(
                fp1[what], fp2[what], DETERMINISM_RTOL, DETERMINISM_ATOL
            ):
                return (
                    f"The {what} of batch {idx} changed between two passes. Data "
                    "and model must be deterministic: no shuffling, data "
                    "augmentation, or random layers like Dropout in train mode. "
                    "Use `check_deterministic=False` only if you know what you "
                    "are doing."
                )
    return None
