"""Temporal down/upsampling modules (by 2 over frames), both families; the math is in ``ops.resample``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .base import TemporalModule
from .mp_layers import MPConv1d


def init_bilinear_kernel_1d_(conv: nn.Module):
    """Identity-like init: each channel maps to itself with the kernel [0.5, 1, 0.5] (upstream's init)."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    with torch.no_grad():
        idx = torch.arange(conv.weight.shape[0])
        conv.weight[idx, idx] = torch.tensor([0.5, 1., 0.5])


class _Resample(TemporalModule):
    down: bool

    def _frames(self, x, batch_size):
        f = self.to_frames(x, batch_size)
        t = f.x.shape[0] // f.batch
        if self.down and (t < 2 or t % 2):
            raise ValueError(f'{type(self).__name__}: expected an even number of frames >= 2 to halve, got {t}')
        return f


class TemporalDownsample(_Resample):
    down = True

    def __init__(self, dim, channel_last=False, time_dim=None):
        super().__init__(dim, time_dim, channel_last)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        init_bilinear_kernel_1d_(self.conv)

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self._frames(x, batch_size)
        return self.from_frames(ops.temporal_downsample(f.x, self.conv.weight, self.conv.bias, batch=f.batch), f)


class TemporalUpsample(_Resample):
    down = False

    def __init__(self, dim, channel_last=False, time_dim=None):
        super().__init__(dim, time_dim, channel_last)
        self.conv = nn.ConvTranspose1d(dim, dim, kernel_size=3, stride=2, padding=1, output_padding=1)
        init_bilinear_kernel_1d_(self.conv)

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self._frames(x, batch_size)
        return self.from_frames(ops.temporal_upsample(f.x, self.conv.weight, self.conv.bias, batch=f.batch), f)


class MPTemporalDownsample(_Resample):
    down = True

    def __init__(self, dim, channel_last=False, time_dim=None):
        super().__init__(dim, time_dim, channel_last)
        self.conv = MPConv1d(dim, dim, 3, init_dirac=True)

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self._frames(x, batch_size)
        return self.from_frames(ops.mp_temporal_downsample(f.x, self.conv.effective_weight(), batch=f.batch), f)


class MPTemporalUpsample(_Resample):
    down = False

    def __init__(self, dim, channel_last=False, time_dim=None):
        super().__init__(dim, time_dim, channel_last)
        self.conv = MPConv1d(dim, dim, 3, init_dirac=True)

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self._frames(x, batch_size)
        return self.from_frames(ops.mp_temporal_upsample(f.x, self.conv.effective_weight(), batch=f.batch), f)
