"""Frame fold / unfold: the layout changes between the image model and the temporal layers.

    fold:   (b t) c h w -> (b h w) c t      (layout='c t', conv1d over time)
            (b t) c h w -> (b h w) t c      (layout='t c', attention over time)
    unfold: the inverse of each.

The references are einops rearranges (the spec). A later Triton kernel does them as tiled transposes.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from .. import backend

LAYOUTS = {
    'c t': ('(b t) c h w -> (b h w) c t', '(b h w) c t -> (b t) c h w'),
    't c': ('(b t) c h w -> (b h w) t c', '(b h w) t c -> (b t) c h w'),
}


def _pattern(layout: str, which: int) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f'layout: expected one of {sorted(LAYOUTS)}, got {layout!r}')
    return LAYOUTS[layout][which]


def fold_frames_ref(x: Tensor, batch: int, layout: str = 'c t') -> Tensor:
    return rearrange(x, _pattern(layout, 0), b=batch)


def unfold_frames_ref(x: Tensor, batch: int, height: int, width: int, layout: str = 'c t') -> Tensor:
    return rearrange(x, _pattern(layout, 1), b=batch, h=height, w=width)


def fold_frames(x: Tensor, batch: int, layout: str = 'c t') -> Tensor:
    """(b t) c h w -> (b h w) c t  (or (b h w) t c)."""
    if x.ndim != 4:
        raise ValueError(f'fold_frames: expected a 4-dim (b t) c h w tensor, got shape {tuple(x.shape)}')
    if batch < 1 or x.shape[0] % batch:
        raise ValueError(f'fold_frames: leading dim {x.shape[0]} must be batch ({batch}) x frames')
    backend.choose('fold_frames', x, has_triton=False)
    return fold_frames_ref(x, batch, layout)


def unfold_frames(x: Tensor, batch: int, height: int, width: int, layout: str = 'c t') -> Tensor:
    """(b h w) c t -> (b t) c h w  (or from (b h w) t c)."""
    if x.ndim != 3:
        raise ValueError(f'unfold_frames: expected a 3-dim (b h w) c t tensor, got shape {tuple(x.shape)}')
    if x.shape[0] != batch * height * width:
        raise ValueError(f'unfold_frames: leading dim {x.shape[0]} must be batch*height*width = '
                         f'{batch}*{height}*{width}')
    backend.choose('unfold_frames', x, has_triton=False)
    return unfold_frames_ref(x, batch, height, width, layout)
