"""Comparing tensors the way floating point allows: relative error by norm, ‖a − b‖ / ‖b‖.

Element-wise tolerances fail on whichever coordinate happens to be ill-conditioned on a given
CPU (a reordered sum, a bf16 kernel); the norm of the whole difference does not care which
coordinates carry the rounding noise, only how much of it there is.
"""

from __future__ import annotations

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; 0 when both are zero, inf when only `b` is."""
    a, b = a.detach().double(), b.detach().double()
    diff, ref = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                    label: str) -> dict[str, float]:
    """`relative_error` of each tensor of `a` against the same-named one of `b`, keyed
    `<label>/<name>`, and of all of them as one vector, keyed `<label>`."""
    assert sorted(a) == sorted(b), (label, sorted(set(a) ^ set(b))[:5])
    errors = {f"{label}/{name}": relative_error(a[name], b[name]) for name in sorted(b)}
    flat = [torch.cat([t[name].detach().double().flatten() for name in sorted(b)]) for t in (a, b)]
    errors[label] = relative_error(*flat)
    return errors
