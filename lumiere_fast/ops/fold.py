"""Frame fold / unfold: the layout changes between the image model and the temporal layers.

    fold:   (b t) c h w -> (b h w) c t      (layout='c t', conv1d over time)
            (b t) c h w -> (b h w) t c      (layout='t c', attention over time)
    unfold: the inverse of each.

The references are einops rearranges (the spec). The Triton path (``kernels/fold.py``) does them as tiled
transposes from any input strides into a contiguous output; ``lumiere_fast::fold_frames`` and
``lumiere_fast::unfold_frames`` are each other's backward (a permutation's backward is its inverse), so neither
has a ``..._backward`` op of its own.
"""

from __future__ import annotations

from functools import cache

import torch
from einops import rearrange
from torch import Tensor

from ._triton import (NAMESPACE, cdiv, device_guard, grid_1d, launch, launch_tuned, new_output, register_eager,
                      use_triton)

LAYOUTS = {
    'c t': ('(b t) c h w -> (b h w) c t', '(b h w) c t -> (b t) c h w'),
    't c': ('(b t) c h w -> (b h w) t c', '(b h w) t c -> (b t) c h w'),
}


def _pattern(layout: str, which: int) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f'layout: expected one of {sorted(LAYOUTS)}, got {layout!r}')
    return LAYOUTS[layout][which]


def _check_fold(x: Tensor, batch: int, layout: str):
    if x.ndim != 4:
        raise ValueError(f'fold_frames: expected a 4-dim (b t) c h w tensor, got shape {tuple(x.shape)}')
    if batch < 1 or x.shape[0] % batch:
        raise ValueError(f'fold_frames: leading dim {x.shape[0]} must be batch ({batch}) x frames')
    _pattern(layout, 0)


def _check_unfold(x: Tensor, batch: int, height: int, width: int, layout: str):
    if x.ndim != 3:
        raise ValueError(f'unfold_frames: expected a 3-dim (b h w) c t tensor, got shape {tuple(x.shape)}')
    if x.shape[0] != batch * height * width:
        raise ValueError(f'unfold_frames: leading dim {x.shape[0]} must be batch*height*width = '
                         f'{batch}*{height}*{width}')
    _pattern(layout, 1)


def fold_frames_ref(x: Tensor, batch: int, layout: str = 'c t') -> Tensor:
    return rearrange(x, _pattern(layout, 0), b=batch)


def unfold_frames_ref(x: Tensor, batch: int, height: int, width: int, layout: str = 'c t') -> Tensor:
    return rearrange(x, _pattern(layout, 1), b=batch, h=height, w=width)


# ------------------------------------------------------------------------------------------ Triton launchers


@cache
def _kernels():
    from ..kernels import fold as k
    return k


def _folded_shape(n: int, c: int, t: int, layout: str) -> tuple[int, int, int]:
    return (n, c, t) if layout == 'c t' else (n, t, c)


def _folded_strides(folded: Tensor, layout: str) -> tuple[int, int, int]:
    """(b h w), c, t strides of a folded tensor in either layout."""
    s_n, s_1, s_2 = folded.stride()
    return (s_n, s_1, s_2) if layout == 'c t' else (s_n, s_2, s_1)


def _launch(frames: Tensor, folded: Tensor, batch: int, layout: str, to_folded: bool) -> None:
    """Copy frames (b t) c h w -> folded (to_folded) or folded -> frames; any strides on either side."""
    bt, c, h, w = frames.shape
    t, p = bt // batch, h * w
    s_bt, s_c, s_h, s_w = frames.stride()
    # h and w walk as one axis p = h*W + w when stepping w past its end lands on the next h: true for contiguous
    # and channels_last tensors, and always when H == 1 or W == 1. It lets the compiler see p's stride, so the
    # frames side gets vector loads/stores instead of a per-element (h, w) split.
    if w == 1:
        s_w = s_h
    hw_merged = h == 1 or w == 1 or s_h == w * s_w
    tile_t = layout == 'c t'
    q, r = (t, c) if tile_t else (c, t)

    def grid(meta):
        return grid_1d(batch * r * cdiv(q, meta['BLOCK_Q']) * cdiv(p, meta['BLOCK_P']))

    with device_guard(frames):
        launch_tuned(
            _kernels()._fold_frames_kernel, grid, (q, r, p, tile_t, to_folded, hw_merged, frames.dtype),
            frames if to_folded else folded, folded if to_folded else frames,
            t, w, p, q, r,
            s_bt, s_c, s_h, s_w, *_folded_strides(folded, layout),
            TILE_T=tile_t, TO_FOLDED=to_folded, HW_MERGED=hw_merged)


def _fold_frames_forward(x: Tensor, batch: int, layout: str) -> Tensor:
    """(b t) c h w (any strides) -> contiguous (b h w) c t or (b h w) t c."""
    bt, c, h, w = x.shape
    out = new_output(_folded_shape(batch * h * w, c, bt // batch, layout), x)
    if out.numel():
        _launch(x, out, batch, layout, to_folded=True)
    return out


def _unfold_frames_forward(x: Tensor, batch: int, height: int, width: int, layout: str) -> Tensor:
    """(b h w) c t or (b h w) t c (any strides) -> contiguous (b t) c h w."""
    _, d1, d2 = x.shape
    c, t = (d1, d2) if layout == 'c t' else (d2, d1)
    out = new_output((batch * t, c, height, width), x)
    if out.numel():
        _launch(out, x, batch, layout, to_folded=False)
    return out


# ------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f'{NAMESPACE}::fold_frames', mutates_args=())
def _fold_frames_op(x: Tensor, batch: int, layout: str) -> Tensor:
    return _fold_frames_forward(x, batch, layout)


@_fold_frames_op.register_fake
def _(x, batch, layout):
    bt, c, h, w = x.shape
    return x.new_empty(_folded_shape(batch * h * w, c, bt // batch, layout))


@torch.library.custom_op(f'{NAMESPACE}::unfold_frames', mutates_args=())
def _unfold_frames_op(x: Tensor, batch: int, height: int, width: int, layout: str) -> Tensor:
    return _unfold_frames_forward(x, batch, height, width, layout)


@_unfold_frames_op.register_fake
def _(x, batch, height, width, layout):
    _, d1, d2 = x.shape
    c, t = (d1, d2) if layout == 'c t' else (d2, d1)
    return x.new_empty((batch * t, c, height, width))


def _fold_setup(ctx, inputs, output):
    x, batch, layout = inputs
    ctx.batch, ctx.layout, ctx.hw = batch, layout, tuple(x.shape[-2:])


def _fold_backward(ctx, grad):
    # the backward of a pure permutation is its inverse: unfold, through the op so double backward works too
    return launch(_unfold_frames_op, grad, ctx.batch, *ctx.hw, ctx.layout), None, None


def _unfold_setup(ctx, inputs, output):
    _, batch, _, _, layout = inputs
    ctx.batch, ctx.layout = batch, layout


def _unfold_backward(ctx, grad):
    return launch(_fold_frames_op, grad, ctx.batch, ctx.layout), None, None, None, None


_fold_frames_op.register_autograd(_fold_backward, setup_context=_fold_setup)
_unfold_frames_op.register_autograd(_unfold_backward, setup_context=_unfold_setup)
register_eager(_fold_frames_op, _fold_frames_forward, _fold_setup, _fold_backward)
register_eager(_unfold_frames_op, _unfold_frames_forward, _unfold_setup, _unfold_backward)


# ------------------------------------------------------------------------------------------------ dispatch


def fold_frames(x: Tensor, batch: int, layout: str = 'c t') -> Tensor:
    """(b t) c h w -> (b h w) c t  (or (b h w) t c)."""
    _check_fold(x, batch, layout)
    if use_triton('fold_frames', x):
        return launch(_fold_frames_op, x, batch, layout)
    return fold_frames_ref(x, batch, layout)


def unfold_frames(x: Tensor, batch: int, height: int, width: int, layout: str = 'c t') -> Tensor:
    """(b h w) c t -> (b t) c h w  (or from (b h w) t c)."""
    _check_unfold(x, batch, height, width, layout)
    if use_triton('unfold_frames', x):
        return launch(_unfold_frames_op, x, batch, height, width, layout)
    return unfold_frames_ref(x, batch, height, width, layout)
