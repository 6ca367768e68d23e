"""Magnitude-preserving elementwise math shared by the references (Karras et al. 2023, sec. 2.5, eq. 88).

Tiny and fused into the kernels of the other ops; here as the one written-down spec.
"""

from __future__ import annotations

from math import sqrt

import torch.nn.functional as F
from torch import Tensor

MP_SILU_DIVISOR = 0.596


def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / MP_SILU_DIVISOR


def mp_add(x: Tensor, res: Tensor, t: float) -> Tensor:
    """((1 - t) x + t res) / sqrt((1 - t)^2 + t^2)."""
    num = x * (1. - t) + res * t
    den = sqrt((1 - t) ** 2 + t ** 2)
    return num / den


def pixel_norm(x: Tensor, dim: int = -1, eps: float = 1e-4) -> Tensor:
    """l2-normalise along ``dim`` (``F.normalize`` with ``eps``) and rescale to norm sqrt(size)."""
    return F.normalize(x, dim=dim, eps=eps) * sqrt(x.shape[dim])


def mp_add_coeffs(t: float) -> tuple[float, float]:
    """(a, b) with ``mp_add(x, res, t) == a * x + b * res``: the two weights the kernels fold into their epilogues."""
    den = sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / den, t / den
