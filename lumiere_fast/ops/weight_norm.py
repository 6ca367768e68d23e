"""Forced weight normalisation of the magnitude-preserving layers (Karras et al. 2023, algorithm 1).

Each output row of the weight is scaled to norm sqrt(fan_in) (``normalize_weight``); the layer then uses
``normalize_weight(w) / sqrt(fan_in)``, a row of unit norm. In train mode the stored weight is itself
renormalised in place first (no grad), as upstream does.
"""

from __future__ import annotations

from math import sqrt

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend


def normalize_weight(weight: Tensor, eps: float = 1e-4) -> Tensor:
    """o ... -> o ...: every output row l2-normalised (``F.normalize`` with ``eps``) times sqrt(row size)."""
    flat = weight.reshape(weight.shape[0], -1)
    normed = F.normalize(flat, dim=-1, eps=eps) * sqrt(flat.shape[1])
    return normed.reshape(weight.shape)


def mp_weight_ref(weight: Tensor, eps: float = 1e-4) -> Tensor:
    fan_in = weight[0].numel()
    return normalize_weight(weight, eps) / sqrt(fan_in)


def mp_weight(weight: Tensor, eps: float = 1e-4) -> Tensor:
    """The weight an MP layer applies: ``normalize_weight(w, eps) / sqrt(fan_in)`` (fan_in = row size)."""
    if weight.ndim < 2:
        raise ValueError(f'mp_weight: expected a weight of shape (out, in, ...), got {tuple(weight.shape)}')
    backend.choose('mp_weight', weight, has_triton=False)
    return mp_weight_ref(weight, eps)


@torch.no_grad()
def renormalize_(weight: Tensor, eps: float = 1e-4) -> Tensor:
    """In place: ``weight <- normalize_weight(weight)``, as upstream's MP layers do each train-mode forward."""
    weight.copy_(normalize_weight(weight, eps))
    return weight
