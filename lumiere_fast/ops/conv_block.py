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

The Triton path (``kernels/conv_block.py``; design notes above the launchers below) registers
``lumiere_fast::mp_temporal_conv_block`` and ``lumiere_fast::temporal_conv_block`` (+ ``..._backward``) with
torch.library; forward and backward of every input and parameter are Triton kernels.
"""

from __future__ import annotations

from functools import cache

from math import sqrt

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import (NAMESPACE, autocast_inputs, cdiv, deterministic, device_guard, differentiable_backward, dot_block,
                      dot_precision, eager_or_op, grid_1d, launch, launch_tuned, new_output, register_eager, use_triton,
                      zeros32)
from .layout import frames_as_time_last, frames_as_time_major, time_last_as_frames, time_major_as_frames
from .mp_math import MP_SILU_DIVISOR, mp_add, mp_add_coeffs, mp_silu
from .temporal_conv1d import conv_frames, conv_weight_grad
from .weight_pack import packed


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


def temporal_conv_block_ref(h: Tensor, residual: Tensor, conv_weight: Tensor, conv_bias: Tensor, gamma: Tensor,
                            proj_weight: Tensor, proj_bias: Tensor, batch: int) -> Tensor:
    c, k = conv_weight.shape[0], conv_weight.shape[-1]
    # time-last view b c (h w) t: the norm over time is then over the contiguous last axis (torch's vector norm
    # over a strided axis is ~10x slower on CPU), and F.normalize keeps upstream's gradients bit for bit at t=1
    y = F.conv2d(frames_as_time_last(h, batch), conv_weight.unsqueeze(-2), conv_bias, padding=(0, k // 2))
    y = F.normalize(y, dim=-1) * sqrt(c) * gamma.view(-1, 1, 1)
    y = F.conv2d(F.silu(y), proj_weight.unsqueeze(-1), proj_bias)
    return time_last_as_frames(y, *h.shape[-2:]) + residual


# ------------------------------------------------------------------------------------------ Triton launchers
#
# Kernels: kernels/conv_block.py (lumiere_fast.kernels.conv_block, imported on first launch). Forward, all
# (b t) c H W tensors are read through their strides and the output is written contiguous (b t) c H W: no
# fold/unfold copies. Conv weights are packed once per call into [k, co, ci] in the compute dtype
# (ops/weight_pack.py: contiguous 16-byte runs of a weight tile's rows); every grid has a frame axis.
#   MP, C <= FUSE_MAX_C: one kernel (temporal conv, activation, 1x1 projection from registers, residual add);
#   non-MP: the time norm couples the frames, so conv + bias runs first (temporal_conv1d's frame-parallel kernel,
#       into a buffer in the activation dtype), then one frame-parallel kernel reads each tile's T frames for the
#       norm and applies silu, the projection, bias and residual (C <= FUSE_MAX_C);
#   C >  FUSE_MAX_C: the activation goes through one buffer in the activation dtype, because a pixel tile's
#                    [C, BLOCK_P] activation and the [C, C] projection weight no longer fit one program's
#                    registers; a second launch projects it and adds the residual.
# Backward recomputes the conv from h instead of saving the pre-activation (one (b t) c H W tensor less held
# between forward and backward, for a K-tap conv's worth of FLOPs), then:
#   one kernel: grad residual, dy (MP: through mp_silu; non-MP: down to the gradient of the normalised y, and a
#               second frame-parallel kernel through the norm), grad gain / proj bias / gamma,
#               and for C <= BWD_FUSE_MAX_C grad proj from registers (fp32 accumulators, one atomic flush per
#               program); above it the activation goes to a buffer and grad proj is reduced from it;
#   temporal_conv1d's weight-grad kernel (conv_weight_grad): grad conv weight (+ conv bias), split-K over
#       (frame, pixel), fp32 atomics, in the weight's own (co, ci, k) layout;
#   temporal_conv1d's conv kernel (conv_frames): grad h, the temporal conv of dy with the flipped, transposed
#       weight (packed as such), the non-MP conv + bias, and the split forward's second launch.
# Weight grads accumulate in fp32 and are cast to the parameter dtype at the end.

_NORM_EPS = 1e-12   # F.normalize's default eps (the non-MP time norm)


@cache
def _kernels():
    from ..kernels import conv_block as k
    return k


def _blocks(c: int) -> tuple[int, int]:
    """(BLOCK_C covering all c channels, BLOCK_CI the conv's input-channel step, up to 64: a 128-byte row of a
    bf16 weight tile); >= 16 for tl.dot."""
    return dot_block(c), dot_block(c, 64)


def _mp_temporal_conv_block_forward(h, residual, conv_weight, proj_weight, gain, batch: int, mp_add_t: float
                                    ) -> Tensor:
    kern = _kernels()
    n, c, _, width = h.shape
    frames, p, k = n // batch, h.shape[-2] * h.shape[-1], conv_weight.shape[-1]
    c_out, c_res = mp_add_coeffs(mp_add_t)
    out = new_output(h.shape, h)
    with device_guard(h):
        wc = packed(conv_weight, h.dtype)
        if c <= kern.FUSE_MAX_C:
            block_c, block_ci = _blocks(c)
            launch_tuned(
                kern._conv_block_mp_forward_kernel, lambda m: grid_1d(n * cdiv(p, m['BLOCK_P'])),
                (c, frames, k, p, h.dtype),
                h, *h.stride(), residual, *residual.stride(), out, *out.stride(),
                wc, *wc.stride(), proj_weight, proj_weight.stride(0), proj_weight.stride(1),
                gain, c_out, c_res, 1. / MP_SILU_DIVISOR, frames, c, p, width, k, k // 2,
                PREC=dot_precision(h), BLOCK_C=block_c, BLOCK_CI=block_ci)
        else:
            a = conv_frames(h, wc, new_output(h.shape, h), frames, 'mp_silu', silu_scale=1. / MP_SILU_DIVISOR)
            conv_frames(a, proj_weight, out, frames, 'mp_out', residual=residual, gain=gain, c_out=c_out, c_res=c_res)
    return out


def _bwd_blocks(kern, c: int) -> tuple[bool, int, int]:
    """(fused, BLOCK_C, BLOCK_CI) of the backward kernels: all channels per program up to BWD_FUSE_MAX_C. Never
    fused in deterministic mode: the fused grad proj flushes with atomics, the split one is a fixed-order sum."""
    if c <= kern.BWD_FUSE_MAX_C and not deterministic():
        return (True, *_blocks(c))
    return False, kern.SPLIT_BLOCK_C, _blocks(c)[1]


def _mp_temporal_conv_block_backward(grad, h, conv_weight, proj_weight, gain, batch: int, mp_add_t: float):
    kern = _kernels()
    n, c, _, width = h.shape
    frames, p, k = n // batch, h.shape[-2] * h.shape[-1], conv_weight.shape[-1]
    c_out, c_res = mp_add_coeffs(mp_add_t)
    d_res, dy = new_output(h.shape, h), new_output(h.shape, h)   # contiguous: the kernel writes them by own offsets
    d_proj, d_gain = zeros32(c, c, like=h), zeros32(1, like=h)
    fuse, block_c, block_ci = _bwd_blocks(kern, c)
    act = dy if fuse else new_output(h.shape, h)                # the split path's activation buffer
    n_ct = cdiv(c, block_c)
    with device_guard(h):
        wc = packed(conv_weight, h.dtype)
        launch_tuned(
            kern._conv_block_mp_backward_kernel,
            lambda m: grid_1d(n * cdiv(cdiv(p, m['BLOCK_P']), m['TILES_PER_PROG']) * n_ct),
            (c, frames, k, p, fuse, h.dtype),
            h, *h.stride(), grad, *grad.stride(), d_res, dy, act,
            wc, *wc.stride(), proj_weight, proj_weight.stride(0), proj_weight.stride(1),
            gain, d_proj, d_gain, c_out, c_res, 1. / MP_SILU_DIVISOR, frames, c, p, width, k, k // 2,
            FUSE_PROJ=fuse, PREC=dot_precision(h), BLOCK_C=block_c, BLOCK_CI=block_ci)
        if not fuse:
            # G = sum over frames and pixels of g a^T (Triton reduction); z = wp a is never formed: the gain's
            # grad sum(g * c_out * wp a) equals c_out * sum(wp * G), a C x C product
            g_act, _ = conv_weight_grad(grad, act, frames, 1, with_bias=False)
            d_proj = g_act.view(c, c) * (c_out * gain.float())
            d_gain = (proj_weight.float().view(c, c) * g_act.view(c, c)).sum() * c_out
        d_conv, _ = conv_weight_grad(dy, h, frames, k, with_bias=False)
        # grad h: the 'same' conv of dy with w'[ci, co, k] = w[co, ci, K-1-k]
        d_h = conv_frames(dy, packed(conv_weight, h.dtype, transpose=True, flip=True), new_output(h.shape, h), frames)
    return (d_h, d_res, d_conv.to(conv_weight.dtype), d_proj.view(c, c, 1).to(proj_weight.dtype),
            d_gain.view(gain.shape).to(gain.dtype))


def _temporal_conv_block_forward(h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias, batch: int
                                 ) -> Tensor:
    kern = _kernels()
    n, c, _, width = h.shape
    frames, p = n // batch, h.shape[-2] * h.shape[-1]
    out = new_output(h.shape, h)
    fuse = c <= kern.FUSE_MAX_C
    block_c = _blocks(c)[0] if fuse else kern.SPLIT_BLOCK_C
    act = out if fuse else new_output(h.shape, h)
    n_ct = cdiv(c, block_c)
    with device_guard(h):
        # y = conv + bias, frame-parallel, in the activation dtype (the norm sums what the next kernel reads)
        y = conv_frames(h, packed(conv_weight, h.dtype), new_output(h.shape, h), frames, 'bias', bias=conv_bias)
        launch_tuned(
            kern._conv_block_forward_kernel, lambda m: grid_1d(n * cdiv(p, m['BLOCK_P']) * n_ct),
            (c, frames, p, fuse, h.dtype),
            y, residual, *residual.stride(), act, *act.stride(), gamma,
            proj_weight, proj_weight.stride(0), proj_weight.stride(1), proj_bias,
            sqrt(c), _NORM_EPS, frames, c, p, width,
            FUSE_PROJ=fuse, PREC=dot_precision(h), BLOCK_C=block_c)
        if not fuse:
            conv_frames(act, proj_weight, out, frames, 'bias_residual', residual=residual, bias=proj_bias)
    return out


def _temporal_conv_block_backward(grad, h, conv_weight, conv_bias, gamma, proj_weight, batch: int):
    kern = _kernels()
    n, c, _, width = h.shape
    frames, p, k = n // batch, h.shape[-2] * h.shape[-1], conv_weight.shape[-1]
    d_res, du, d_h = new_output(h.shape, h), new_output(h.shape, h), new_output(h.shape, h)
    fuse, block_c, block_ci = _bwd_blocks(kern, c)
    act = du if fuse else new_output(h.shape, h)                # the split path's activation buffer
    n_ct = cdiv(c, block_c)
    exact_order = deterministic()
    # per-program partials of grad proj bias / gamma in deterministic mode, one row per program at the
    # narrowest pixel tile (rows of programs a wider tile does not launch stay zero)
    rows = n * cdiv(p, kern.MIN_BLOCK_P) * n_ct if exact_order else 1
    d_proj = zeros32(c, c, like=h)
    d_proj_bias, d_gamma = zeros32(rows, c, like=h), zeros32(rows, c, like=h)
    with device_guard(h):
        # y recomputed (frame-parallel) into d_h, free until the grad_h conv overwrites it
        y = conv_frames(h, packed(conv_weight, h.dtype), d_h, frames, 'bias', bias=conv_bias)
        launch_tuned(
            kern._conv_block_backward_kernel, lambda m: grid_1d(n * cdiv(p, m['BLOCK_P']) * n_ct),
            (c, frames, p, fuse, exact_order, h.dtype),
            y, grad, *grad.stride(), d_res, du, act, gamma, proj_weight, proj_weight.stride(0), proj_weight.stride(1),
            d_proj, d_proj_bias, d_gamma, sqrt(c), _NORM_EPS, frames, c, p, width,
            FUSE_PROJ=fuse, PREC=dot_precision(h), DETERMINISTIC=exact_order, BLOCK_C=block_c, BLOCK_CI=block_ci)
        d_proj_bias, d_gamma = d_proj_bias.sum(0), d_gamma.sum(0)
        if not fuse:
            d_proj = conv_weight_grad(grad, act, frames, 1, with_bias=False)[0]
        # the split path's activation buffer is free now: it takes dy
        dy = new_output(h.shape, h) if fuse else act
        nb_c, nb_p, nb_warps = kern.NORM_BWD_BLOCKS
        kern._conv_block_norm_backward_kernel[grid_1d(n * cdiv(p, nb_p) * cdiv(c, nb_c))](
            y, du, dy, _NORM_EPS, frames, c, p, BLOCK_C=nb_c, BLOCK_P=nb_p, num_warps=nb_warps)
        d_conv, d_conv_bias = conv_weight_grad(dy, h, frames, k, with_bias=True)
        conv_frames(dy, packed(conv_weight, h.dtype, transpose=True, flip=True), d_h, frames)
    return (d_h, d_res, d_conv.to(conv_weight.dtype), d_conv_bias.to(conv_bias.dtype), d_gamma.to(gamma.dtype),
            d_proj.view(c, c, 1).to(proj_weight.dtype), d_proj_bias.to(proj_weight.dtype))


# ------------------------------------------------------------------------------------------ custom ops
# real ops for torch.compile (fake impls give shapes), autograd by backward ops


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_conv_block', mutates_args=())
def _mp_temporal_conv_block_op(h: Tensor, residual: Tensor, conv_weight: Tensor, proj_weight: Tensor, gain: Tensor,
                               batch: int, mp_add_t: float) -> Tensor:
    return _mp_temporal_conv_block_forward(h, residual, conv_weight, proj_weight, gain, batch, mp_add_t)


@_mp_temporal_conv_block_op.register_fake
def _(h, residual, conv_weight, proj_weight, gain, batch, mp_add_t):
    return h.new_empty(h.shape)


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_conv_block_backward', mutates_args=())
def _mp_temporal_conv_block_backward_op(grad: Tensor, h: Tensor, conv_weight: Tensor, proj_weight: Tensor,
                                        gain: Tensor, batch: int, mp_add_t: float
                                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _mp_temporal_conv_block_backward(grad, h, conv_weight, proj_weight, gain, batch, mp_add_t)


@_mp_temporal_conv_block_backward_op.register_fake
def _(grad, h, conv_weight, proj_weight, gain, batch, mp_add_t):
    return (h.new_empty(h.shape), h.new_empty(h.shape), torch.empty_like(conv_weight),
            torch.empty_like(proj_weight), torch.empty_like(gain))


def _mp_setup_context(ctx, inputs, output):
    h, _, conv_weight, proj_weight, gain, batch, mp_add_t = inputs
    ctx.save_for_backward(h, conv_weight, proj_weight, gain)
    ctx.batch, ctx.mp_add_t = batch, mp_add_t


def _mp_autograd_backward(ctx, grad):
    h, conv_weight, proj_weight, gain = ctx.saved_tensors
    if torch.is_grad_enabled():     # create_graph: through the reference (the output is linear in the residual)
        residual = torch.zeros_like(h).requires_grad_(ctx.needs_input_grad[1])
        return differentiable_backward(mp_temporal_conv_block_ref, (h, residual, conv_weight, proj_weight, gain,
                                                                    ctx.batch, ctx.mp_add_t), grad)
    backward = eager_or_op(ctx, _mp_temporal_conv_block_backward, _mp_temporal_conv_block_backward_op)
    grads = backward(grad, h, conv_weight, proj_weight, gain, ctx.batch, ctx.mp_add_t)
    return (*grads, None, None)


_mp_temporal_conv_block_op.register_autograd(_mp_autograd_backward, setup_context=_mp_setup_context)
register_eager(_mp_temporal_conv_block_op, _mp_temporal_conv_block_forward, _mp_setup_context, _mp_autograd_backward)


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv_block', mutates_args=())
def _temporal_conv_block_op(h: Tensor, residual: Tensor, conv_weight: Tensor, conv_bias: Tensor, gamma: Tensor,
                            proj_weight: Tensor, proj_bias: Tensor, batch: int) -> Tensor:
    return _temporal_conv_block_forward(h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias, batch)


@_temporal_conv_block_op.register_fake
def _(h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias, batch):
    return h.new_empty(h.shape)


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv_block_backward', mutates_args=())
def _temporal_conv_block_backward_op(grad: Tensor, h: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                                     gamma: Tensor, proj_weight: Tensor, batch: int
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _temporal_conv_block_backward(grad, h, conv_weight, conv_bias, gamma, proj_weight, batch)


@_temporal_conv_block_backward_op.register_fake
def _(grad, h, conv_weight, conv_bias, gamma, proj_weight, batch):
    return (h.new_empty(h.shape), h.new_empty(h.shape), torch.empty_like(conv_weight), torch.empty_like(conv_bias),
            torch.empty_like(gamma), torch.empty_like(proj_weight), proj_weight.new_empty(proj_weight.shape[0]))


def _block_setup_context(ctx, inputs, output):
    h, _, conv_weight, conv_bias, gamma, proj_weight, _, batch = inputs
    ctx.save_for_backward(h, conv_weight, conv_bias, gamma, proj_weight)
    ctx.batch = batch


def _block_autograd_backward(ctx, grad):
    h, conv_weight, conv_bias, gamma, proj_weight = ctx.saved_tensors
    if torch.is_grad_enabled():     # create_graph: through the reference (linear in the residual and proj bias)
        residual = torch.zeros_like(h).requires_grad_(ctx.needs_input_grad[1])
        proj_bias = h.new_zeros(h.shape[1], dtype=proj_weight.dtype).requires_grad_(ctx.needs_input_grad[6])
        return differentiable_backward(temporal_conv_block_ref, (h, residual, conv_weight, conv_bias, gamma,
                                                                 proj_weight, proj_bias, ctx.batch), grad)
    backward = eager_or_op(ctx, _temporal_conv_block_backward, _temporal_conv_block_backward_op)
    d_h, d_res, d_conv, d_conv_bias, d_gamma, d_proj, d_proj_bias = backward(
        grad, h, conv_weight, conv_bias, gamma, proj_weight, ctx.batch)
    return d_h, d_res, d_conv, d_conv_bias, d_gamma, d_proj, d_proj_bias, None


_temporal_conv_block_op.register_autograd(_block_autograd_backward, setup_context=_block_setup_context)
register_eager(_temporal_conv_block_op, _temporal_conv_block_forward, _block_setup_context, _block_autograd_backward)


# ------------------------------------------------------------------------------------------------ dispatch


def mp_temporal_conv_block(h: Tensor, residual: Tensor, conv_weight: Tensor, proj_weight: Tensor, gain: Tensor, *,
                           batch: int, mp_add_t: float = 0.3, dropout: float = 0., training: bool = False) -> Tensor:
    """(b t) c H W -> (b t) c H W; see the module docstring.

    Triton path: forward and backward (every input and parameter) are Triton kernels, in the autocast dtype
    under autocast (``autocast_inputs``). Not taken (reference instead) for dropout > 0 in training (the kernels
    have no RNG), mixed dtypes outside autocast, a gain with more than one element, or an empty input.
    """
    _check('mp_temporal_conv_block', h, residual, conv_weight, proj_weight, batch)
    supported = not (training and dropout > 0) and gain.numel() == 1 and h.numel() > 0
    if use_triton('mp_temporal_conv_block', h, residual, conv_weight, proj_weight, gain, supported=supported):
        return launch(_mp_temporal_conv_block_op, *autocast_inputs(h, residual, conv_weight, proj_weight, gain), batch,
                                          float(mp_add_t))
    return mp_temporal_conv_block_ref(h, residual, conv_weight, proj_weight, gain, batch, mp_add_t, dropout, training)


def temporal_conv_block(h: Tensor, residual: Tensor, conv_weight: Tensor, conv_bias: Tensor, gamma: Tensor,
                        proj_weight: Tensor, proj_bias: Tensor, *, batch: int) -> Tensor:
    """(b t) c H W -> (b t) c H W; see the module docstring.

    Triton path: forward and backward (every input and parameter) are Triton kernels, in the autocast dtype
    under autocast (``autocast_inputs``). Not taken (reference instead) for mixed dtypes outside autocast or an
    empty input.
    """
    _check('temporal_conv_block', h, residual, conv_weight, proj_weight, batch)
    tensors = (h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias)
    if use_triton('temporal_conv_block', *tensors, supported=h.numel() > 0):
        return launch(_temporal_conv_block_op, *autocast_inputs(*tensors), batch)
    return temporal_conv_block_ref(h, residual, conv_weight, conv_bias, gamma, proj_weight, proj_bias, batch)
