"""Conv inflation blocks: a spatial conv (cuDNN), then the temporal conv block core (``ops.conv_block``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import TemporalModule
from .mp_layers import Gain, MPAdd, MPConv1d, MPConv2d, MPSiLU


def _check_odd(owner: str, **sizes):
    for name, k in sizes.items():
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f'{owner}: expected {name} as an odd positive int, got {k!r}')


class ChanFirstRMSNorm(nn.Module):
    """Upstream's norm, quirk kept: it normalises over the *last* axis (width, or time), not channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim <= 2:
            raise ValueError(f'ChanFirstRMSNorm: expected a (n, c, ...) tensor, got shape {tuple(x.shape)}')
        gamma = self.gamma.reshape(-1, *((1,) * (x.ndim - 2)))
        return F.normalize(x, dim=-1) * self.scale * gamma


class ConvolutionInflationBlock(TemporalModule):
    def __init__(self, *, dim, conv2d_kernel_size=3, conv1d_kernel_size=3, channel_last=False, time_dim=None):
        super().__init__(dim, time_dim, channel_last)
        _check_odd(type(self).__name__, conv2d_kernel_size=conv2d_kernel_size, conv1d_kernel_size=conv1d_kernel_size)
        self.spatial_conv = nn.Sequential(
            nn.Conv2d(dim, dim, conv2d_kernel_size, padding=conv2d_kernel_size // 2),
            ChanFirstRMSNorm(dim),
            nn.SiLU())
        self.temporal_conv = nn.Sequential(
            nn.Conv1d(dim, dim, conv1d_kernel_size, padding=conv1d_kernel_size // 2),
            ChanFirstRMSNorm(dim),
            nn.SiLU())
        self.proj_out = nn.Conv1d(dim, dim, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self.to_frames(x, batch_size)
        h = self.spatial_conv(f.x)
        conv, norm = self.temporal_conv[0], self.temporal_conv[1]
        out = ops.temporal_conv_block(h, f.x, conv.weight, conv.bias, norm.gamma, self.proj_out.weight,
                                      self.proj_out.bias, batch=f.batch)
        return self.from_frames(out, f)


class MPConvolutionInflationBlock(TemporalModule):
    def __init__(self, *, dim, conv2d_kernel_size=3, conv1d_kernel_size=3, channel_last=False, time_dim=None,
                 mp_add_t=0.3, dropout=0., identity_init=False):
        super().__init__(dim, time_dim, channel_last)
        _check_odd(type(self).__name__, conv2d_kernel_size=conv2d_kernel_size, conv1d_kernel_size=conv1d_kernel_size)
        # eps=3: upstream passes a positional 3 into the eps slot of both weight layers (a quirk kept for parity)
        self.spatial_conv = nn.Sequential(MPConv2d(dim, dim, conv2d_kernel_size, 3), MPSiLU())
        self.temporal_conv = nn.Sequential(MPConv1d(dim, dim, conv1d_kernel_size, 3), MPSiLU(), nn.Dropout(dropout))
        self.proj_out = nn.Sequential(MPConv1d(dim, dim, 1), Gain())
        self.residual_mp_add = MPAdd(t=mp_add_t)
        if identity_init:            # opt-in: an exact identity at init (see TemporalModule.identity_init_)
            self.identity_init_()

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self.to_frames(x, batch_size)
        h = self.spatial_conv(f.x)
        out = ops.mp_temporal_conv_block(
            h, f.x, self.temporal_conv[0].effective_weight(), self.proj_out[0].effective_weight(),
            self.proj_out[1].gain, batch=f.batch, mp_add_t=self.residual_mp_add.t, dropout=self.temporal_conv[2].p,
            training=self.training)
        return self.from_frames(out, f)
