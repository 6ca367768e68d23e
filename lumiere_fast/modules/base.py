"""The TemporalModule base of the eight temporal modules: image-or-video inputs, channel-last, batch/time.

A temporal module takes either a video ``b c t h w`` or a stack of frames ``(b t) c h w`` with the batch
given by ``batch_size=`` on forward, by ``batch_dim`` (set by the Lumiere wrapper), or the frame count by
``time_dim`` on init. With ``channel_last=True`` the channel axis is last (``b t h w c`` / ``(b t) h w c``)
on the way in and on the way out. Everything runs on frames internally; these two helpers convert.
"""

from __future__ import annotations

from math import sqrt
from typing import NamedTuple

from torch import Tensor, nn


class Frames(NamedTuple):
    x: Tensor          # (b t) c h w
    batch: int
    is_video: bool


class TemporalModule(nn.Module):
    """Base of the temporal modules: upstream's ``batch_dim`` / ``time_dim`` / ``channel_last`` attributes."""

    def __init__(self, dim: int, time_dim: int | None, channel_last: bool):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f'{type(self).__name__}: expected dim as a positive int, got {dim!r}')
        if time_dim is not None and (not isinstance(time_dim, int) or time_dim < 1):
            raise ValueError(f'{type(self).__name__}: expected time_dim as a positive int or None, got {time_dim!r}')
        self.dim = dim
        self.batch_dim = None
        self.time_dim = time_dim
        self.channel_last = bool(channel_last)
        self.skip_rescale = None         # set by identity_init_(): the output is multiplied by it

    def identity_init_(self):
        """Make a freshly built block an exact identity map (in exact arithmetic), as the Lumiere paper intends.

        The MP blocks end in ``mp_add(branch, x, t) = ((1 - t) branch + t x) / sqrt((1 - t)^2 + t^2)`` with a zero
        branch at init (zero gain), i.e. ``0.394 x`` for t = 0.3. This rescales that add by
        ``sqrt((1 - t)^2 + t^2) / t``, so the block computes ``x + (1 - t) / t * branch``: the skip passes through
        unchanged and the branch trains from zero. The non-MP blocks are already an identity at init (zero
        projection, plain residual), and the temporal down/upsamples change the frame count, so neither changes.
        Not part of the state dict: a checkpoint trained with it needs it again on load."""
        add = getattr(self, 'residual_mp_add', None)
        if add is not None:
            t = float(add.t)
            if not 0. < t <= 1.:
                raise ValueError(f'{type(self).__name__}: identity init needs mp_add_t in (0, 1], got {t}')
            self.skip_rescale = sqrt((1 - t) ** 2 + t ** 2) / t
        return self

    def to_frames(self, x: Tensor, batch_size: int | None) -> Frames:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f'{name}: expected a tensor, got {type(x).__name__}')
        if x.ndim not in (4, 5):
            layout = '(b, t, h, w, c) or ((b t), h, w, c)' if self.channel_last else '(b, c, t, h, w) or ((b t), c, h, w)'
            raise ValueError(f'{name}: expected a 5-dim video or 4-dim frames tensor {layout}, '
                             f'got shape {tuple(x.shape)}')
        if self.channel_last:
            x = x.movedim(-1, 1)
        if x.shape[1] != self.dim:
            raise ValueError(f'{name}: expected {self.dim} channels, got {x.shape[1]} (input shape '
                             f'{tuple(x.movedim(1, -1).shape) if self.channel_last else tuple(x.shape)})')
        if x.ndim == 5:
            b, c, t, h, w = x.shape
            return Frames(x.transpose(1, 2).reshape(b * t, c, h, w), b, True)
        return Frames(x, self._batch_of_frames(x.shape[0], batch_size), False)

    def _batch_of_frames(self, bt: int, batch_size: int | None) -> int:
        name = type(self).__name__
        batch = batch_size if batch_size is not None else self.batch_dim
        if batch is not None:
            if not isinstance(batch, int) or batch < 1:
                raise ValueError(f'{name}: expected batch_size as a positive int, got {batch!r}')
            if bt % batch:
                raise ValueError(f'{name}: {bt} frames cannot be split into batch_size={batch} videos')
            if self.time_dim is not None and bt != batch * self.time_dim:
                raise ValueError(f'{name}: expected batch_size*time_dim = {batch}*{self.time_dim} frames, got {bt}')
            return batch
        if self.time_dim is not None:
            if bt % self.time_dim:
                raise ValueError(f'{name}: {bt} frames is not a multiple of time_dim={self.time_dim}')
            return bt // self.time_dim
        raise ValueError(f'{name}: a (b t) c h w input needs the batch: pass batch_size= on forward, or set '
                         f'time_dim on init (or pass a 5-dim video)')

    def from_frames(self, y: Tensor, frames: Frames) -> Tensor:
        if self.skip_rescale is not None:
            y = y * self.skip_rescale
        if frames.is_video:
            y = y.view(frames.batch, -1, *y.shape[1:]).transpose(1, 2)
        if self.channel_last:
            y = y.movedim(1, -1)
        return y
