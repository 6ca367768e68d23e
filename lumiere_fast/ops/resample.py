"""Temporal down/upsampling by 2 over the frames of a (b t) c h w activation.

    temporal_downsample     conv1d, k=3, stride 2, padding 1 (+ bias)              t -> ceil(t / 2)
    temporal_upsample       conv_transpose1d, k=3, stride 2, padding 1, out pad 1  t -> 2 t
    mp_temporal_downsample  linear interpolation to t // 2, then conv1d 'same' (MP weight)
    mp_temporal_upsample    linear interpolation to 2 t, then conv1d 'same' (MP weight)

The MP references run on a b c t (h w) view: the time convolution as a (k, 1) conv2d and the interpolation as
a bilinear resize whose second axis keeps its size (exactly upstream's (t, 1) bilinear resize, per pixel).

Triton path (``kernels/resample.py``): one custom op ``lumiere_fast::temporal_resample`` for all four, each output
frame an implicit GEMM over (tap, in-channel) with the stride / transposition / interpolation folded into the input
loads of the frames layout (no fold copies), the weight packed once per call into [3, c_out, c_in] in the compute
dtype (``weight_pack.packed``: contiguous weight-tile rows; transposition and tap flips happen in the pack).
Backward, ``lumiere_fast::temporal_resample_backward``: grad input is the adjoint convolution (again one of the
kernel's modes), grad weight (and bias) a split (b, t, h w) reduction in the weight's own layout, whose splits
are summed in fp32 afterwards; each is computed only when autograd asks for it.
"""

from __future__ import annotations

from functools import cache

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import (NAMESPACE, autocast_inputs, cdiv, device_guard, differentiable_backward, dot_precision,
                      eager_or_op, grid_1d, launch, launch_tuned, new_output, register_eager, target_programs,
                      use_triton)
from .fold import fold_frames_ref, unfold_frames_ref
from .layout import frames_as_time_major, time_major_as_frames
from .weight_pack import packed


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


# ------------------------------------------------------------------------------------------ Triton launchers


@cache
def _kernels():
    from ..kernels import resample as k
    return k


def _frames_out(mode: str, t: int) -> int:
    return t // 2 if mode in ('down', 'mp_down') else t * 2


def _merged(t: Tensor) -> bool:
    """Pixels (h, w) walk with the single stride s_w (see kernels.grid.pixel_offsets)."""
    return t.shape[-2] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1)


def _forward_plan(mode: str, t_in: int):
    """(kernel MODE, NSRC, T_MID, scale) of the forward of ``mode`` on t_in frames.

    scale = t_in / t_out is F.interpolate's source-index step for a given output size (align_corners=False);
    it is 2 or 1/2 here, exact in fp32, so the kernel's blend weights equal PyTorch's.
    """
    k = _kernels()
    t_out = _frames_out(mode, t_in)
    if mode == 'down':
        return k.MODE_DOWN, 1, t_out, 1.0
    if mode == 'up':
        return k.MODE_UP, 1, t_out, 1.0
    return k.MODE_INTERP, 2, t_out, t_in / t_out


def _launch_gemm(src: Tensor, w: Tensor, bias: Optional[Tensor], batch: int, t_out: int,
                 kmode: int, nsrc: int, t_mid: int, scale: float) -> Tensor:
    """(b t_src) c h w -> (b t_out) c h w through _resample_kernel (see its docstring).

    w: W_k[o, i] for the kernel's output channel o and input channel i, as ``weight_pack.packed`` gives it (an
    (o, i, k) view of a contiguous [k, o, i] pack in src's dtype).
    """
    bt, c, h, wd = src.shape
    t_src = bt // batch
    p = h * wd
    y = new_output((batch * t_out, c, h, wd), src)

    def grid(meta):
        return grid_1d(batch * t_out * cdiv(p, meta['BLOCK_P']) * cdiv(c, meta['BLOCK_CO']))

    with device_guard(src):
        launch_tuned(
            _kernels()._resample_kernel, grid, (c, t_src, t_out, p, kmode, nsrc, src.dtype, w.dtype),
            src, w, bias if bias is not None else w, y,
            c, t_src, t_out, t_mid, p, wd, float(scale),
            *src.stride(), *w.stride(), *y.stride(),
            SRC_MERGED=_merged(src), Y_MERGED=_merged(y),
            MODE=kmode, NSRC=nsrc, HAS_BIAS=bias is not None, DOT_PREC=dot_precision(src))
    return y


def _temporal_resample_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], batch: int, mode: str) -> Tensor:
    """(b t) c h w -> (b t') c h w for mode in ('down', 'up', 'mp_down', 'mp_up'); weight (c, c, 3) as the
    matching ``*_ref`` takes it (ConvTranspose1d layout (c_in, c_out, 3) for 'up'), bias (c,) or None."""
    t = x.shape[0] // batch
    kmode, nsrc, t_mid, scale = _forward_plan(mode, t)
    # the kernel's W_k[co, ci]: Conv1d stores (co, ci, k), ConvTranspose1d (ci, co, k)
    w = packed(weight, x.dtype, transpose=mode == 'up')
    return _launch_gemm(x, w, bias, batch, _frames_out(mode, t), kmode, nsrc, t_mid, scale)


def _grad_input(grad: Tensor, weight: Tensor, batch: int, mode: str, frames_in: int) -> Tensor:
    """d loss / d x: (b t') c h w -> (b frames_in) c h w.

    The adjoint is another mode of the same kernel, with each tap's weight transposed (W_k^T, by strides):
    down <-> up (a strided conv and its transpose), and for the MP pair the transposed 'same' conv (taps
    flipped) fused with the adjoint of the interpolation (MODE_INTERP_ADJ).
    """
    k = _kernels()
    t_g = grad.shape[0] // batch
    if mode == 'down':                          # W_k^T[ci, co] = w[co, ci, k]
        return _launch_gemm(grad, packed(weight, grad.dtype, transpose=True), None, batch, frames_in, k.MODE_UP,
                            1, frames_in, 1.0)
    if mode == 'up':                            # W_k^T[ci, co] = w[ci, co, k]
        return _launch_gemm(grad, packed(weight, grad.dtype), None, batch, frames_in, k.MODE_DOWN, 1, frames_in,
                            1.0)
    # taps flipped and transposed (the pack does both): W'_k[ci, co] = w[co, ci, 2 - k]
    w = packed(weight, grad.dtype, transpose=True, flip=True)
    # interpolated frames that touch one input frame: 1 when halving (m = i // 2), 4 when doubling (2i-1 .. 2i+2)
    nsrc = 1 if mode == 'mp_down' else 4
    return _launch_gemm(grad, w, None, batch, frames_in, k.MODE_INTERP_ADJ, nsrc, t_g, frames_in / t_g)


def _dw_split(bt_out: int, p: int, c: int, x: Tensor):
    """(SPLIT_BJ, SPLIT_P, P_PER): how the (b t', h w) reduction of the weight gradient is cut across programs.

    Enough programs to fill the GPU (about 4 per SM) when the channel tiles alone are few; each split writes its
    own fp32 partial, so the splits stay bounded (memory: splits * 3 c^2 floats). Pixel chunks are multiples of
    the widest BLOCK_P so that only the last chunk has a tail. Under the interpreter: few programs, but still
    split, so tests cover both split axes.
    """
    target, granule = target_programs(x, interpreted=12), (128 if x.is_cuda else 16)
    tiles = 3 * cdiv(c, 64) ** 2
    splits = max(1, min(256, target // tiles))
    split_bj = min(bt_out, splits)
    split_p = min(cdiv(p, granule), max(1, splits // split_bj))
    p_per = cdiv(cdiv(p, split_p), granule) * granule
    split_p = cdiv(p, p_per)
    return split_bj, split_p, p_per


def _grad_weight(grad: Tensor, x: Tensor, weight: Tensor, batch: int, mode: str,
                 has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """(d loss / d weight in weight's layout, d loss / d bias (c,) or None)."""
    bt, c, h, wd = x.shape
    t = bt // batch
    t_out = _frames_out(mode, t)
    p = h * wd
    kmode, nsrc, t_mid, scale = _forward_plan(mode, t)
    split_bj, split_p, p_per = _dw_split(batch * t_out, p, c, x)
    n_split = split_bj * split_p
    part = new_output((n_split, *weight.shape), x, torch.float32)
    part_b = new_output((n_split, c), x, torch.float32) if has_bias else part
    d_s, d0, d1, d2 = part.stride()
    d_o, d_i = (d1, d0) if mode == 'up' else (d0, d1)      # ConvTranspose1d weight: (ci, co, k)

    def grid(meta):
        return grid_1d(n_split * 3 * cdiv(c, meta['BLOCK_CO']) * cdiv(c, meta['BLOCK_CI']))

    with device_guard(x):
        launch_tuned(
            _kernels()._resample_weight_grad_kernel, grid, (c, t, t_out, p, kmode, nsrc, x.dtype, grad.dtype),
            x, grad, part, part_b,
            c, t, t_out, t_mid, p, wd, float(scale),
            batch * t_out, cdiv(batch * t_out, split_bj), p_per, split_p,
            *x.stride(), *grad.stride(), d_s, d_o, d_i, d2,
            SRC_MERGED=_merged(x), G_MERGED=_merged(grad),
            MODE=kmode, NSRC=nsrc, HAS_BIAS=has_bias, DOT_PREC=dot_precision(x))
    gw = part.sum(0).to(weight.dtype)
    gb = part_b.sum(0).to(weight.dtype) if has_bias else None
    return gw, gb


def _temporal_resample_backward(grad: Tensor, x: Tensor | None, weight: Tensor, batch: int, mode: str,
                                frames_in: int, has_bias: bool, need_input: bool, need_weight: bool):
    """(grad x or None, grad weight or None, grad bias or None); ``need_weight`` covers the bias too (one
    reduction computes both), and x is only read by it."""
    gx = _grad_input(grad, weight, batch, mode, frames_in) if need_input else None
    gw, gb = _grad_weight(grad, x, weight, batch, mode, has_bias) if need_weight else (None, None)
    return gx, gw, gb


# ------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f'{NAMESPACE}::temporal_resample', mutates_args=())
def _temporal_resample_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], batch: int, mode: str) -> Tensor:
    return _temporal_resample_forward(x, weight, bias, batch, mode)


@_temporal_resample_op.register_fake
def _(x, weight, bias, batch, mode):
    return x.new_empty((batch * _frames_out(mode, x.shape[0] // batch), *x.shape[1:]))


@torch.library.custom_op(f'{NAMESPACE}::temporal_resample_backward', mutates_args=())
def _temporal_resample_backward_op(grad: Tensor, x: Optional[Tensor], weight: Tensor, batch: int, mode: str,
                                   frames_in: int, has_bias: bool, need_input: bool, need_weight: bool
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias), each an empty (0,) tensor where not asked for (a custom op returns
    tensors, not None)."""
    grads = _temporal_resample_backward(grad, x, weight, batch, mode, frames_in, has_bias, need_input, need_weight)
    return tuple(g if g is not None else weight.new_empty((0,)) for g in grads)


@_temporal_resample_backward_op.register_fake
def _(grad, x, weight, batch, mode, frames_in, has_bias, need_input, need_weight):
    empty = weight.new_empty((0,))
    gx = grad.new_empty((batch * frames_in, *grad.shape[1:])) if need_input else empty
    gw = torch.empty_like(weight) if need_weight else empty.clone()
    gb = weight.new_empty((weight.shape[0],)) if need_weight and has_bias else empty.clone()
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, batch, mode = inputs
    # x is only read by the weight/bias gradient: a frozen layer need not keep its input alive
    ctx.save_for_backward(x if any(ctx.needs_input_grad[1:3]) else None, weight)
    ctx.x_shape = x.shape
    ctx.batch, ctx.mode, ctx.has_bias = batch, mode, bias is not None


def _resample_ref(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int, mode: str) -> Tensor:
    """The reference of one mode of the op."""
    if mode == 'down':
        return temporal_downsample_ref(x, weight, bias, batch)
    if mode == 'up':
        return temporal_upsample_ref(x, weight, bias, batch)
    if mode == 'mp_down':
        return mp_temporal_downsample_ref(x, weight, batch)
    return mp_temporal_upsample_ref(x, weight, batch)


def _autograd_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    if torch.is_grad_enabled():     # create_graph: through the reference (linear in x, where x was not saved, and b)
        if x is None:
            x = weight.new_zeros(ctx.x_shape).requires_grad_(need_x)
        bias = weight.new_zeros(weight.shape[1 if ctx.mode == 'up' else 0]).requires_grad_(need_b) \
            if ctx.has_bias else None
        return differentiable_backward(_resample_ref, (x, weight, bias, ctx.batch, ctx.mode), grad)
    backward = eager_or_op(ctx, _temporal_resample_backward, _temporal_resample_backward_op)
    gx, gw, gb = backward(grad, x, weight, ctx.batch, ctx.mode, ctx.x_shape[0] // ctx.batch, ctx.has_bias, need_x,
                          need_w or need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None)


_temporal_resample_op.register_autograd(_autograd_backward, setup_context=_setup_context)
register_eager(_temporal_resample_op, _temporal_resample_forward, _setup_context, _autograd_backward)


# ------------------------------------------------------------------------------------------------ dispatch


def _supported(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """The kernel handles 3-tap weights and a (c,) bias (of x's dtype, or all cast under autocast: see
    ``use_triton``); anything else takes the reference."""
    c = x.shape[1]
    return weight.shape[-1] == 3 and x.numel() > 0 and (bias is None or tuple(bias.shape) == (c,))


def _dispatch(name: str, mode: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], batch: int, ref):
    if use_triton(name, x, weight, bias, supported=_supported(x, weight, bias)):
        return launch(_temporal_resample_op, *autocast_inputs(x, weight, bias), batch, mode)
    return ref()


def temporal_downsample(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int) -> Tensor:
    """(b t) c h w -> (b t/2) c h w."""
    _check('temporal_downsample', x, weight, batch, down=True)
    return _dispatch('temporal_downsample', 'down', x, weight, bias, batch,
                     lambda: temporal_downsample_ref(x, weight, bias, batch))


def temporal_upsample(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int) -> Tensor:
    """(b t) c h w -> (b 2t) c h w; ``weight`` is a ConvTranspose1d weight (c_in, c_out, 3)."""
    _check('temporal_upsample', x, weight, batch, down=False)
    return _dispatch('temporal_upsample', 'up', x, weight, bias, batch,
                     lambda: temporal_upsample_ref(x, weight, bias, batch))


def mp_temporal_downsample(x: Tensor, weight: Tensor, *, batch: int) -> Tensor:
    """(b t) c h w -> (b t/2) c h w; ``weight`` already MP-normalised."""
    _check('mp_temporal_downsample', x, weight, batch, down=True)
    return _dispatch('mp_temporal_downsample', 'mp_down', x, weight, None, batch,
                     lambda: mp_temporal_downsample_ref(x, weight, batch))


def mp_temporal_upsample(x: Tensor, weight: Tensor, *, batch: int) -> Tensor:
    """(b t) c h w -> (b 2t) c h w; ``weight`` already MP-normalised."""
    _check('mp_temporal_upsample', x, weight, batch, down=False)
    return _dispatch('mp_temporal_upsample', 'mp_up', x, weight, None, batch,
                     lambda: mp_temporal_upsample_ref(x, weight, batch))
