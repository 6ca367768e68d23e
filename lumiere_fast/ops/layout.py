"""Frame views: the one place that turns the image model's frames ``(b t) c h w`` into the time-major and
time-last layouts the references convolve over, and back.

The forward views are free (reshape + transpose of a contiguous frames tensor); the way back is one copy. The
references use them instead of ``fold_frames_ref`` (which copies into ``(b h w) c t``) where a conv2d over the
view gives the same numbers without the copy.
"""

from __future__ import annotations

from torch import Tensor


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
