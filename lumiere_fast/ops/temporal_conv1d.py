"""Temporal conv1d: channel-mixing convolution over the frame axis, odd kernel, 'same' padding.

    x (n, c_in, t)          or the folded video layout (b t) c_in h w with ``batch=b``
    weight (c_out, c_in, k), bias (c_out,) or None
    -> (n, c_out, t)         or (b t) c_out h w

Reference: ``F.conv1d(x, weight, bias, padding=k // 2)``. The frames form runs the same convolution as a
(k, 1) conv2d over a (b, c, t, h*w) view, which skips the fold/unfold copies.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import backend


def _check(x: Tensor, weight: Tensor, bias, batch):
    if weight.ndim != 3:
        raise ValueError(f'temporal_conv1d: expected weight of shape (c_out, c_in, k), got {tuple(weight.shape)}')
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f'temporal_conv1d: expected an odd kernel size, got {k}')
    if x.ndim not in (3, 4):
        raise ValueError(f'temporal_conv1d: expected x as (n, c, t) or (b t) c h w, got shape {tuple(x.shape)}')
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f'temporal_conv1d: x has {x.shape[1]} channels, weight expects {weight.shape[1]}')
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f'temporal_conv1d: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}')
    if x.ndim == 4:
        if batch is None:
            raise ValueError('temporal_conv1d: a (b t) c h w input needs batch=b')
        if batch < 1 or x.shape[0] % batch:
            raise ValueError(f'temporal_conv1d: leading dim {x.shape[0]} is not batch ({batch}) x frames')


def frames_as_time_major(x: Tensor, batch: int) -> Tensor:
    """(b t) c h w -> b c t (h w), a view (no copy)."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h * w).transpose(1, 2)


def time_major_as_frames(y: Tensor, height: int, width: int) -> Tensor:
    """b c t (h w) -> (b t) c h w (one copy)."""
    b, c, t, _ = y.shape
    return y.transpose(1, 2).reshape(b * t, c, height, width)


def frames_as_time_last(x: Tensor, batch: int) -> Tensor:
    """(b t) c h w -> b c (h w) t, a view (no copy)."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h * w).permute(0, 2, 3, 1)


def time_last_as_frames(y: Tensor, height: int, width: int) -> Tensor:
    """b c (h w) t -> (b t) c h w (one copy)."""
    b, c, _, t = y.shape
    return y.permute(0, 3, 1, 2).reshape(b * t, c, height, width)


def temporal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, batch: int | None = None) -> Tensor:
    k = weight.shape[-1]
    if x.ndim == 3:
        return F.conv1d(x, weight, bias, padding=k // 2)
    h, w = x.shape[-2:]
    y = F.conv2d(frames_as_time_major(x, batch), weight.unsqueeze(-1), bias, padding=(k // 2, 0))
    return time_major_as_frames(y, h, w)


def temporal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int | None = None) -> Tensor:
    _check(x, weight, bias, batch)
    backend.choose('temporal_conv1d', x, has_triton=False)
    return temporal_conv1d_ref(x, weight, bias, batch)
