"""Gradient surgery for the shared parameters of a multi-task model.

:func:`pcgrad` is PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task
Learning", Algorithm 1): for every task ``i`` the gradient ``g_i`` is
projected, one other task ``j`` at a time in a random order, onto the normal
plane of ``g_j`` whenever the two conflict (``g_i · g_j < 0``); the shared
update is the sum of the projected gradients. The projections use the
original gradients ``g_j`` and the running projected ``g_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pcgrad"]


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The PCGrad combination of per-task gradients.

    Args:
        grads: ``(n, P)`` per-task gradients of the shared parameters.
        generator: random source of the projection orders (``None``: torch's
            default generator).

    Returns:
        ``(P,)``: ``sum_i g_i^PC``.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> pcgrad(g)  # each loses its component along the other; here both conflict
        tensor([0.5000, 1.5000])
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must be (tasks, parameters), got shape {tuple(grads.shape)}")
    n = grads.shape[0]
    original = grads.double()
    norms = (original * original).sum(1)
    out = original.clone()
    for i in range(n):
        order = torch.randperm(n, generator=generator).tolist()
        g = out[i]
        for j in order:
            if j == i or norms[j] == 0:
                continue
            dot = torch.dot(g, original[j])
            if dot < 0:
                g = g - (dot / norms[j]) * original[j]
        out[i] = g
    return out.sum(0).to(grads.dtype)
