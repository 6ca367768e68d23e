"""Temporal down/upsampling by 2 over the frames of a (b t) c h w activation.

    temporal_downsample     conv1d, k=3, stride 2, padding 1 (+ bias)              t -> ceil(t / 2)
    temporal_upsample       conv_transpose1d, k=3, stride 2, padding 1, out pad 1  t -> 2 t
    mp_temporal_downsample  linear interpolation to t // 2, then conv1d 'same' (MP weight)
    mp_temporal_upsample    linear interpolation to 2 t, then conv1d 'same' (MP weight)

The MP references run on a b c t (h w) view: the time convolution as a (k, 1) conv2d and the interpolation as
a bilinear resize whose second axis keeps its size (exactly upstream's (t, 1) bilinear resize, per pixel).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import backend
from .fold import fold_frames_ref, unfold_frames_ref
from .temporal_conv1d import frames_as_time_major, time_major_as_frames


def _check(name, x, weight, batch, down):
    if x.ndim != 4:
        raise ValueError(f'{name}: expected x as (b t) c h w, got shape {tuple(x.shape)}')
    if batch < 1 or x.shape[0] % batch:
        raise ValueError(f'{name}: leading dim {x.shape[0]} is not batch ({batch}) x frames')
    c = x.shape[1]
    if weight.ndim != 3 or weight.shape[:2] != (c, c):
        raise ValueError(f'{name}: expected weight ({c}, {c}, k), got {tuple(weight.shape)}')
    t = x.shape[0] // batch
    if down and (t < 2 or t % 2):
        raise ValueError(f'{name}: expected an even number of frames >= 2 to halve, got {t}')


# The strided (transposed) convolutions run on the folded (b h w) c t layout, as upstream does: a strided
# conv2d over a frames view is as fast on CPU but sums in another order, and a whole U-Net amplifies that past
# 1e-5 (measured: 1.6e-4 relative on gradients at 2 frames); on the folded layout the results are upstream's, bit
# for bit.
def temporal_downsample_ref(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    y = F.conv1d(fold_frames_ref(x, batch), weight, bias, stride=2, padding=1)
    return unfold_frames_ref(y, batch, *x.shape[-2:])


def temporal_upsample_ref(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    y = F.conv_transpose1d(fold_frames_ref(x, batch), weight, bias, stride=2, padding=1, output_padding=1)
    return unfold_frames_ref(y, batch, *x.shape[-2:])


def _mp_resample_ref(x: Tensor, weight: Tensor, batch: int, frames_out: int) -> Tensor:
    y = frames_as_time_major(x, batch)
    y = F.interpolate(y, size=(frames_out, y.shape[-1]), mode='bilinear')
    k = weight.shape[-1]
    y = F.conv2d(y, weight.unsqueeze(-1), padding=(k // 2, 0))
    return time_major_as_frames(y, *x.shape[-2:])


def mp_temporal_downsample_ref(x: Tensor, weight: Tensor, batch: int) -> Tensor:
    return _mp_resample_ref(x, weight, batch, x.shape[0] // batch // 2)


def mp_temporal_upsample_ref(x: Tensor, weight: Tensor, batch: int) -> Tensor:
    return _mp_resample_ref(x, weight, batch, x.shape[0] // batch * 2)


def temporal_downsample(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int) -> Tensor:
    """(b t) c h w -> (b t/2) c h w."""
    _check('temporal_downsample', x, weight, batch, down=True)
    backend.choose('temporal_downsample', x, has_triton=False)
    return temporal_downsample_ref(x, weight, bias, batch)


def temporal_upsample(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int) -> Tensor:
    """(b t) c h w -> (b 2t) c h w; ``weight`` is a ConvTranspose1d weight (c_in, c_out, 3)."""
    _check('temporal_upsample', x, weight, batch, down=False)
    backend.choose('temporal_upsample', x, has_triton=False)
    return temporal_upsample_ref(x, weight, bias, batch)


def mp_temporal_downsample(x: Tensor, weight: Tensor, *, batch: int) -> Tensor:
    """(b t) c h w -> (b t/2) c h w; ``weight`` already MP-normalised."""
    _check('mp_temporal_downsample', x, weight, batch, down=True)
    backend.choose('mp_temporal_downsample', x, has_triton=False)
    return mp_temporal_downsample_ref(x, weight, batch)


def mp_temporal_upsample(x: Tensor, weight: Tensor, *, batch: int) -> Tensor:
    """(b t) c h w -> (b 2t) c h w; ``weight`` already MP-normalised."""
    _check('mp_temporal_upsample', x, weight, batch, down=False)
    backend.choose('mp_temporal_upsample', x, has_triton=False)
    return mp_temporal_upsample_ref(x, weight, batch)
