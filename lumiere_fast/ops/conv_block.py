"""The temporal conv block core: everything a conv inflation block does after its spatial conv.

MP (MPConvolutionInflationBlock), with ``h`` the spatial-conv output and ``x`` the block input, both
(b t) c H W, weights already MP-normalised (``weight_norm.mp_weight``):

    y = conv1d_t(h, conv_weight)                 # over frames, 'same' padding
    y = dropout(mp_silu(y))
    y = conv1d_t(y, proj_weight) * gain          # 1x1
    out = mp_add(y, x, t=mp_add_t)               # (b t) c H W

Non-MP (ConvolutionInflationBlock):

    y = silu(rmsnorm_t(conv1d_t(h, conv_weight) + conv_bias) * gamma)   # upstream's quirk: the norm runs
    out = conv1d_t(y, proj_weight) + proj_bias + x                      # over the last axis, i.e. time

The references work on a b c t (H W) (MP) or b c (H W) t (non-MP) view of the frames and run the time
convolutions as (k, 1) or (1, k) conv2d, which gives upstream's numbers without its fold and unfold copies.
"""

from __future__ import annotations

from math import sqrt

import torch.nn.functional as F
from torch import Tensor

from .. import backend
from .mp_math import mp_add, mp_silu
from .temporal_conv1d import frames_as_time_last, frames_as_time_major, time_last_as_frames, time_major_as_frames


def _check(name, h, residual, conv_weight, proj_weight, batch):
    if h.ndim != 4:
        raise ValueError(f'{name}: expected h as (b t) c h w, got shape {tuple(h.shape)}')
    if residual.shape != h.shape:
        raise ValueError(f'{name}: residual shape {tuple(residual.shape)} != h shape {tuple(h.shape)}')
    c = h.shape[1]
    if conv_weight.ndim != 3 or conv_weight.shape[:2] != (c, c) or conv_weight.shape[-1] % 2 == 0:
        raise ValueError(f'{name}: expected conv_weight ({c}, {c}, odd k), got {tuple(conv_weight.shape)}')
    if tuple(proj_weight.shape) != (c, c, 1):
        raise ValueError(f'{name}: expected proj_weight ({c}, {c}, 1), got {tuple(proj_weight.shape)}')
    if batch < 1 or h.shape[0] % batch:
        raise ValueError(f'{name}: leading dim {h.shape[0]} is not batch ({batch}) x frames')


def mp_temporal_conv_block_ref(h: Tensor, residual: Tensor, conv_weight: Tensor, proj_weight: Tensor, gain: Tensor,
                               batch: int, mp_add_t: float = 0.3, dropout: float = 0., training: bool = False
                               ) -> Tensor:
    k = conv_weight.shape[-1]
    y = F.conv2d(frames_as_time_major(h, batch), conv_weight.unsqueeze(-1), padding=(k // 2, 0))
    y = F.dropout(mp_silu(y), dropout, training)
    y = F.conv2d(y, proj_weight.unsqueeze(-1)) * gain
    return mp_add(time_major_as_frames(y, *h.shape[-2:]), residual, mp_add_t)


def mp_temporal_conv_block(h: Tensor, residual: Tensor, conv_weight: Tensor, proj_weight: Tensor, gain: Tensor, *,
                           batch: int, mp_add_t: float = 0.3, dropout: float = 0., training: bool = False) -> Tensor:
    """(b t) c H W -> (b t) c H W; see the module docstring."""
    _check('mp_temporal_conv_block', h, residual, conv_weight, proj_weight, batch)
    backend.choose('mp_temporal_conv_block', h, has_triton=False)
    return mp_temporal_conv_block_ref(h, residual, conv_weight, proj_weight, gain, batch, mp_add_t, dropout, training)


def temporal_conv_block_ref(h: Tensor, residual: Tensor, conv_weight: Tensor, conv_bias: Tensor, gamma: Tensor,
                            proj_weight: Tensor, proj_bias: Tensor, batch: int) -> Tensor:
    c, k = conv_weight.shape[0], conv_weight.shape[-1]
    # time-last view b c (h w) t: the norm over time is then over the contiguous last axis (torch's vector norm
    # over a strided axis is ~10x slower on CPU), and F.normalize keeps upstream's gradients bit for bit at t=1
    y = F.conv2d(frames_as_time_last(h, batch), conv_weight.unsqueeze(-2), conv_bias, padding=(0, k // 2))
    y = F.normalize(y, dim=-1) * sqrt(c) * gamma.view(-1, 1, 1)
    y = F.conv2d(F.silu(y), proj_weight.unsqueeze(-1), proj_bias)
    return time_last_as_frames(y, *h.shape[-2:]) + residual


def temporal_conv_block(h: Tensor, residual: Tensor, conv_weight: Tensor, conv_bias: Tensor, gamma: Tensor,
                        proj_weight: Tensor, proj_bias: Tensor, *, batch: int) -> Tensor:
    """(b t) c H W -> (b t) c H W; see the module docstring."""
    _check('temporal_conv_block', h, residual, conv_weight, proj_weight, batch)
    backend.choose('temporal_conv_block', h, has_triton=False)
    return temporal_conv_block_ref(h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias, batch)
