"""Magnitude-preserving layers (Karras et al. 2023), same parameters and state-dict keys as upstream.

Each weight layer keeps its raw ``weight``; forward uses ``ops.mp_weight(weight)`` and, in train mode,
first renormalises the stored weight in place (no grad), exactly as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class _MPWeight(nn.Module):
    def __init__(self, shape, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))
        self.eps = eps
        self.fan_in = int(torch.Size(shape[1:]).numel())

    def effective_weight(self) -> Tensor:
        """The weight the layer applies; renormalises the stored one first in train mode.

        The train-mode renormalisation writes the stored weight in place, so a later forward (a second
        micro-batch before one backward, a ``no_grad`` forward in between) would invalidate what this forward's
        normalisation saved for backward. Upstream's ``pack`` happens to copy the weight first; here the copy is
        explicit, and only taken when autograd will save it (a few KiB: temporal weights only)."""
        if self.training:
            ops.renormalize_(self.weight, self.eps)
        weight = self.weight
        if weight.requires_grad and torch.is_grad_enabled():
            weight = weight.clone()
        return ops.mp_weight(weight, self.eps)


class MPLinear(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, eps: float = 1e-4):
        super().__init__((dim_out, dim_in), eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight())


class MPConv2d(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, eps: float = 1e-4):
        super().__init__((dim_out, dim_in, kernel_size, kernel_size), eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), padding='same')


class MPConv1d(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, eps: float = 1e-4, init_dirac: bool = False):
        super().__init__((dim_out, dim_in, kernel_size), eps)
        if init_dirac:
            nn.init.dirac_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.effective_weight(), padding='same')


class MPSiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.mp_silu(x)


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class MPAdd(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        return ops.mp_add(x, res, self.t)
