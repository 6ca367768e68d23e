"""Triton kernels of the temporal conv block core (``lumiere_fast/ops/conv_block.py`` holds the launchers).

Every tensor is read and written in the frames layout (b t) c H W through its strides: a tile is
[channels, pixels] of one frame, and the temporal conv is an implicit GEMM over (tap, input channel):

    y[co, p] (frame t) = sum_k sum_ci W[co, ci, k] * h[b, t + k - pad, ci, p]

so the (b t) c H W -> (b H W) c t fold of the reference never exists in memory: it happens in the loads. Tiles
are >= 16 on every dot axis (tl.dot's minimum); channel and pixel tails and out-of-clip taps are masked to 0.
Accumulation is fp32; fp16/bf16 operands go to tl.dot as they are and results are cast once on store.

Kernels (grid: everything on axis 0, decoded in the kernel):
  _conv_block_mp_forward_kernel   MP forward, all channels of a pixel tile in one program: conv -> mp_silu -> 1x1
                                  projection (tl.dot from registers) -> gain + mp_add with the residual
  _conv_block_forward_kernel      non-MP forward: one program sees all T frames of its pixels (the norm is over time)
  _conv_block_mp_backward_kernel  MP backward except the conv weight and grad_h: recompute y, a; grad residual, dy;
                                  fused (C <= BWD_FUSE_MAX_C): grad gain and grad proj from registers (per-program
                                  fp32 accumulators, one atomic flush); split: channel tiles, the activation to memory
  _conv_block_backward_kernel     the same for non-MP, through the time norm (three passes over the frames)
The generic conv tile with an epilogue (the split paths, grad_h) and the weight grads are the temporal conv1d's
kernels (``kernels/temporal_conv1d.py``); ``conv_tile`` there is the implicit GEMM every kernel here builds on.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grid import INTERPRET, configs, load_mat, pixel_offsets, tile_ptrs, unravel3
from .temporal_conv1d import conv_tile, silu

# Largest channel count whose full [C, BLOCK_P] activation tile (and the [C, C] projection weight) one program
# keeps in registers; above it the projection reads the activation back from memory (split path).
FUSE_MAX_C = 128
# The fused backward also holds the projection weight twice (wp and wp^T as dot operands) and a [C, C] fp32
# grad-proj accumulator per program, so it stops fusing earlier (64: ~100 registers/thread of those at 8 warps)
BWD_FUSE_MAX_C = 64
# channel tile of the split forward's activation stage (non-MP: all T frames of a [SPLIT_BLOCK_C, BLOCK_P] tile)
SPLIT_BLOCK_C = 16 if INTERPRET else 64


def _config_list(options):
    return [triton.Config(meta, num_warps=warps) for meta, warps in options]


# Choices from ptxas register reports for sm_90 (no spills in fp16 at these sizes): the fused kernels hold
# [BLOCK_C, BLOCK_P] fp32 tiles with BLOCK_C up to 128, so narrow pixel tiles and 8 warps are in the set.
_FUSED_CONFIGS = configs(_config_list([(dict(BLOCK_P=16), 8), (dict(BLOCK_P=32), 4), (dict(BLOCK_P=32), 8),
                                       (dict(BLOCK_P=64), 4), (dict(BLOCK_P=64), 8)]),
                         _config_list([(dict(BLOCK_P=16), 4)]))
# TILES_PER_PROG: pixel tiles one MP backward program walks, so its [C, C] grad-proj partial is flushed with
# atomics once per TILES_PER_PROG tiles instead of once per tile
_BWD_CONFIGS = configs(_config_list([(dict(BLOCK_P=16, TILES_PER_PROG=4), 8), (dict(BLOCK_P=32, TILES_PER_PROG=4), 4),
                                     (dict(BLOCK_P=32, TILES_PER_PROG=4), 8), (dict(BLOCK_P=64, TILES_PER_PROG=2), 8)]),
                       _config_list([(dict(BLOCK_P=16, TILES_PER_PROG=2), 4)]))
# the narrowest pixel tile of the non-MP backward: its deterministic variant's partial rows are sized by it
MIN_BLOCK_P = min(c.kwargs['BLOCK_P'] for c in _FUSED_CONFIGS)


# ---------------------------------------------------------------------------------------------- helpers


@triton.jit
def _conv_bias_tile(h_ptr, sh_n, sh_c, h_pix, p_mask, clip0, t, T, C, wc_ptr, swc_o, swc_i, swc_k, c, c_mask, bias,
                    K, PAD, BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """The non-MP block's temporal conv of frame t of the clip plus its bias, [BLOCK_C, BLOCK_P] fp32 (the forward
    and the backward's recompute both start from it)."""
    y = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    return conv_tile(y, h_ptr, sh_n, sh_c, h_pix, p_mask, clip0, t, T, C,
                      wc_ptr, swc_o, swc_i, swc_k, c, c_mask, K, PAD, BLOCK_CI, PREC) + bias[:, None]


@triton.jit
def _clip_pixel_channel_tile(C, P, T, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The non-MP kernels' program -> (first frame of its clip, pixel tile, channel tile), channel tile fastest;
    with the tiles' indices and masks."""
    pid = tl.program_id(0)
    n_ct = tl.cdiv(C, BLOCK_C)
    n_pt = tl.cdiv(P, BLOCK_P)
    ct, pt, clip = unravel3(pid, n_ct, n_pt)
    clip0 = clip * T
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    return clip0, p, p_mask, c, c_mask, c_mask[:, None] & p_mask[None, :]


@triton.jit
def _silu_parts(y):
    """(silu(y), silu'(y)), fp32."""
    sig = 1. / (1. + tl.exp(-y))
    return y * sig, sig * (1. + y * (1. - sig))


# ---------------------------------------------------------------------------------------------- forward


@triton.autotune(configs=_FUSED_CONFIGS, key=['C', 'T', 'K', 'P'])
@triton.jit
def _conv_block_mp_forward_kernel(
        h_ptr, sh_n, sh_c, sh_h, sh_w,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, so_n, so_c, so_h, so_w,
        wc_ptr, swc_o, swc_i, swc_k,
        wp_ptr, swp_o, swp_i,
        gain_ptr, c_out, c_res, silu_scale,
        T, C, P, W, K, PAD,
        PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: one frame x one pixel tile x ALL channels (BLOCK_C >= C), so the 1x1 projection consumes the
    activation straight from registers; grid (frame, pixel tile) flattened."""
    pid = tl.program_id(0)
    n_pt = tl.cdiv(P, BLOCK_P)
    pt = pid % n_pt
    n = pid // n_pt
    t = n % T
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    y = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    y = conv_tile(y, h_ptr, sh_n, sh_c, pixel_offsets(p, W, sh_h, sh_w), p_mask, n - t, t, T, C,
                   wc_ptr, swc_o, swc_i, swc_k, c, c_mask, K, PAD, BLOCK_CI, PREC)
    a = silu(y) * silu_scale
    dt = h_ptr.dtype.element_ty
    wp = load_mat(wp_ptr, swp_o, swp_i, c, c_mask, c, c_mask).to(dt)
    z = tl.dot(wp, a.to(dt), input_precision=PREC)
    mask = c_mask[:, None] & p_mask[None, :]
    res = tl.load(tile_ptrs(r_ptr, n, sr_n, sr_c, c, pixel_offsets(p, W, sr_h, sr_w)), mask=mask, other=0.)
    out = z * (c_out * tl.load(gain_ptr).to(tl.float32)) + c_res * res.to(tl.float32)
    tl.store(tile_ptrs(out_ptr, n, so_n, so_c, c, pixel_offsets(p, W, so_h, so_w)),
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_FUSED_CONFIGS, key=['C', 'T', 'K', 'P', 'FUSE_PROJ'])
@triton.jit
def _conv_block_forward_kernel(
        h_ptr, sh_n, sh_c, sh_h, sh_w,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, so_n, so_c, so_h, so_w,
        wc_ptr, swc_o, swc_i, swc_k, bc_ptr, gamma_ptr,
        wp_ptr, swp_o, swp_i, bp_ptr,
        norm_scale, eps,
        T, C, P, W, K, PAD,
        FUSE_PROJ: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr,
        BLOCK_P: tl.constexpr):
    """Non-MP forward. One program: one clip x one pixel tile x one channel tile, walking all T frames twice
    because the norm is over time per (pixel, channel): pass 1 stores y = conv + bias into ``out`` as scratch
    (cheaper than recomputing the K-tap conv) while summing y^2 over frames; pass 2 reads y back, normalises,
    applies silu and either (FUSE_PROJ, BLOCK_C >= C) projects + adds bias and residual, or stores the activation
    (split path: ``out`` is then the activation buffer and temporal_conv1d's kernel projects it).
    Grid (clip, pixel tile, channel tile) flattened."""
    clip0, p, p_mask, c, c_mask, mask = _clip_pixel_channel_tile(C, P, T, BLOCK_C, BLOCK_P)
    h_pix = pixel_offsets(p, W, sh_h, sh_w)
    o_pix = pixel_offsets(p, W, so_h, so_w)
    bias = tl.load(bc_ptr + c, mask=c_mask, other=0.).to(tl.float32)
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for t in range(0, T):
        y = _conv_bias_tile(h_ptr, sh_n, sh_c, h_pix, p_mask, clip0, t, T, C, wc_ptr, swc_o, swc_i, swc_k, c, c_mask,
                            bias, K, PAD, BLOCK_C, BLOCK_CI, BLOCK_P, PREC)
        y = y.to(out_ptr.dtype.element_ty)       # the scratch's rounding, so the norm sums what pass 2 reads
        ss += y.to(tl.float32) * y.to(tl.float32)
        tl.store(tile_ptrs(out_ptr, clip0 + t, so_n, so_c, c, o_pix), y, mask=mask)
    # F.normalize: y / max(||y||_t, eps), a division as in torch: at t = 1 it then gives exactly +-1, which needs
    # round-to-nearest sqrt and division (a GPU compiles tl.sqrt and `/` to approximations, off by an ulp or two)
    nrm = tl.maximum(tl.sqrt_rn(ss), eps)
    gscale = (norm_scale * tl.load(gamma_ptr + c, mask=c_mask, other=0.).to(tl.float32))[:, None]
    dt = h_ptr.dtype.element_ty
    if FUSE_PROJ:
        wp = load_mat(wp_ptr, swp_o, swp_i, c, c_mask, c, c_mask).to(dt)
        bp = tl.load(bp_ptr + c, mask=c_mask, other=0.).to(tl.float32)
        r_pix = pixel_offsets(p, W, sr_h, sr_w)
    tl.debug_barrier()       # pass 2 reads scratch that other threads of this program wrote
    for t in range(0, T):
        o_ptrs = tile_ptrs(out_ptr, clip0 + t, so_n, so_c, c, o_pix)
        y = tl.load(o_ptrs, mask=mask, other=0.).to(tl.float32)
        a = silu(tl.div_rn(y, nrm) * gscale)
        if FUSE_PROJ:
            res = tl.load(tile_ptrs(r_ptr, clip0 + t, sr_n, sr_c, c, r_pix), mask=mask, other=0.)
            a = tl.dot(wp, a.to(dt), input_precision=PREC) + bp[:, None] + res.to(tl.float32)
        tl.store(o_ptrs, a.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _proj_t_tile(g_ptr, sg_n, sg_c, g_pix, p_mask, n, C, wp_ptr, swp_o, swp_i, c, c_mask,
                 BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """da[c, p] = sum_co wp[co, c] * g[n, co, p]: the 1x1 projection's input gradient for a channel tile, reading
    all of g's channels from memory (split path); a K=1 conv with the transposed weight."""
    da = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    return conv_tile(da, g_ptr, sg_n, sg_c, g_pix, p_mask, n, 0, 1, C, wp_ptr, swp_i, swp_o, 0, c, c_mask, 1, 0,
                      BLOCK_CI, PREC)


@triton.autotune(configs=_BWD_CONFIGS, key=['C', 'T', 'K', 'P', 'FUSE_PROJ'], reset_to_zero=['dwp_ptr', 'dgain_ptr'])
@triton.jit
def _conv_block_mp_backward_kernel(
        h_ptr, sh_n, sh_c, sh_h, sh_w,
        g_ptr, sg_n, sg_c, sg_h, sg_w,
        dres_ptr, dy_ptr, a_ptr,
        wc_ptr, swc_o, swc_i, swc_k,
        wp_ptr, swp_o, swp_i,
        gain_ptr, dwp_ptr, dgain_ptr, c_out, c_res, silu_scale,
        T, C, P, W, K, PAD,
        FUSE_PROJ: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr,
        BLOCK_P: tl.constexpr, TILES_PER_PROG: tl.constexpr):
    """MP backward except the conv weight and grad_h. y is recomputed from h (the conv is cheaper than keeping a
    (b t) c H W pre-activation alive between forward and backward). Writes grad residual and dy (contiguous
    (b t) c H W). FUSE_PROJ (BLOCK_C >= C): the projection's grads come from registers, grad proj [C, C] and
    grad gain flushed with one atomic add per program. Split (channel tiles): the activation goes to ``a_ptr``
    for a later reduction (grad proj = c_out * gain * G, grad gain = c_out * sum(wp * G), G = sum g a^T) and the
    projection's input grad reads all of g's channels from memory.
    Grid: (frame, group of TILES_PER_PROG pixel tiles, channel tile) flattened."""
    pid = tl.program_id(0)
    n_ct = tl.cdiv(C, BLOCK_C)
    n_grp = tl.cdiv(tl.cdiv(P, BLOCK_P), TILES_PER_PROG)
    ct, grp, n = unravel3(pid, n_ct, n_grp)
    t = n % T
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dt = h_ptr.dtype.element_ty
    gain = tl.load(gain_ptr).to(tl.float32)
    if FUSE_PROJ:
        wp = load_mat(wp_ptr, swp_o, swp_i, c, c_mask, c, c_mask).to(dt)
        wp_t = load_mat(wp_ptr, swp_i, swp_o, c, c_mask, c, c_mask).to(dt)
    dwp = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    dgain = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for i in range(0, TILES_PER_PROG):
        p = (grp * TILES_PER_PROG + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        mask = c_mask[:, None] & p_mask[None, :]
        y = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        y = conv_tile(y, h_ptr, sh_n, sh_c, pixel_offsets(p, W, sh_h, sh_w), p_mask, n - t, t, T, C,
                       wc_ptr, swc_o, swc_i, swc_k, c, c_mask, K, PAD, BLOCK_CI, PREC)
        act, dact = _silu_parts(y)
        a = (act * silu_scale).to(dt)
        g_pix = pixel_offsets(p, W, sg_h, sg_w)
        g = tl.load(tile_ptrs(g_ptr, n, sg_n, sg_c, c, g_pix), mask=mask, other=0.).to(tl.float32)
        own = n.to(tl.int64) * C * P + c[:, None].to(tl.int64) * P + p[None, :]     # contiguous outputs
        tl.store(dres_ptr + own, (c_res * g).to(dres_ptr.dtype.element_ty), mask=mask)
        if FUSE_PROJ:
            dgain += g * tl.dot(wp, a, input_precision=PREC)
            dz = (g * (c_out * gain)).to(dt)
            dwp += tl.dot(dz, tl.trans(a), input_precision=PREC)
            da = tl.dot(wp_t, dz, input_precision=PREC)
        else:
            tl.store(a_ptr + own, a, mask=mask)
            da = _proj_t_tile(g_ptr, sg_n, sg_c, g_pix, p_mask, n, C, wp_ptr, swp_o, swp_i, c, c_mask,
                              BLOCK_C, BLOCK_CI, BLOCK_P, PREC) * (c_out * gain)
        tl.store(dy_ptr + own, (da * (dact * silu_scale)).to(dy_ptr.dtype.element_ty), mask=mask)
    if FUSE_PROJ:
        # relaxed: these sums need atomicity, not ordering (the default acq_rel fences every add); the kernel's end
        # makes them visible to the next launch
        tl.atomic_add(dwp_ptr + c[:, None] * C + c[None, :], dwp, mask=c_mask[:, None] & c_mask[None, :], sem='relaxed')
        tl.atomic_add(dgain_ptr, tl.sum(tl.sum(dgain, axis=1), axis=0) * c_out, sem='relaxed')


@triton.autotune(configs=_FUSED_CONFIGS, key=['C', 'T', 'K', 'P', 'FUSE_PROJ'],
                 reset_to_zero=['dwp_ptr', 'dbp_ptr', 'dgamma_ptr'])
@triton.jit
def _conv_block_backward_kernel(
        h_ptr, sh_n, sh_c, sh_h, sh_w,
        g_ptr, sg_n, sg_c, sg_h, sg_w,
        dres_ptr, dy_ptr, y_ptr, a_ptr,
        wc_ptr, swc_o, swc_i, swc_k, bc_ptr, gamma_ptr,
        wp_ptr, swp_o, swp_i,
        dwp_ptr, dbp_ptr, dgamma_ptr,
        norm_scale, eps,
        T, C, P, W, K, PAD,
        FUSE_PROJ: tl.constexpr, PREC: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """Non-MP backward, all T frames of one pixel tile x one channel tile per program (the time norm couples the
    frames). y is recomputed (pass 1, also the norm) and parked in ``y_ptr`` (the grad_h buffer, free until
    grad_h is computed from dy); pass 2 goes down to du = dL/d(normalised y) into ``dy_ptr`` while summing
    du * u over time; pass 3 applies the normalisation's backward
        dy = (du - u * sum_t(du * u)) / ||y||      (||y|| > eps; else du / eps, F.normalize's clamp)
    and overwrites du with dy. Grad proj bias and gamma: per-program fp32 sums, one atomic add each
    (DETERMINISTIC: stored as row program_id of (programs, C) partials, summed by the host in a fixed order; the
    launcher then never fuses the projection, whose grad would need atomics too).
    FUSE_PROJ (BLOCK_C >= C): grad proj from registers (atomic flush); split: the activation goes to ``a_ptr``
    (grad proj is reduced from it afterwards) and the projection's input grad reads all of g from memory.
    Grid: (clip, pixel tile, channel tile) flattened."""
    clip0, p, p_mask, c, c_mask, mask = _clip_pixel_channel_tile(C, P, T, BLOCK_C, BLOCK_P)
    h_pix = pixel_offsets(p, W, sh_h, sh_w)
    g_pix = pixel_offsets(p, W, sg_h, sg_w)
    own = c[:, None].to(tl.int64) * P + p[None, :]          # the contiguous buffers, frame offset added below
    dt = h_ptr.dtype.element_ty
    bias = tl.load(bc_ptr + c, mask=c_mask, other=0.).to(tl.float32)
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for t in range(0, T):
        y = _conv_bias_tile(h_ptr, sh_n, sh_c, h_pix, p_mask, clip0, t, T, C, wc_ptr, swc_o, swc_i, swc_k, c, c_mask,
                            bias, K, PAD, BLOCK_C, BLOCK_CI, BLOCK_P, PREC)
        y = y.to(y_ptr.dtype.element_ty)
        ss += y.to(tl.float32) * y.to(tl.float32)
        tl.store(y_ptr + (clip0 + t).to(tl.int64) * C * P + own, y, mask=mask)
    norm = tl.sqrt_rn(ss)
    # divide by the norm rather than multiply by its reciprocal: at t = 1, u = y / |y| is then exactly +-1 and
    # the exact-zero gradient through the norm comes out as 0 rather than rounding noise (round-to-nearest sqrt
    # and division, as torch computes them: the approximate ones are not exact there)
    nrm = tl.maximum(norm, eps)
    gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.).to(tl.float32)
    gscale = (norm_scale * gamma)[:, None]
    if FUSE_PROJ:
        wp_t = load_mat(wp_ptr, swp_i, swp_o, c, c_mask, c, c_mask).to(dt)
    dwp = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    dbp = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    dgamma = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    du_u = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    tl.debug_barrier()
    for t in range(0, T):
        frame = (clip0 + t).to(tl.int64) * C * P
        u = tl.div_rn(tl.load(y_ptr + frame + own, mask=mask, other=0.).to(tl.float32), nrm)
        s = u * gscale
        act, dact = _silu_parts(s)
        g = tl.load(tile_ptrs(g_ptr, clip0 + t, sg_n, sg_c, c, g_pix), mask=mask, other=0.)
        tl.store(dres_ptr + frame + own, g.to(dres_ptr.dtype.element_ty), mask=mask)
        if FUSE_PROJ:
            gd = g.to(dt)
            dwp += tl.dot(gd, tl.trans(act.to(dt)), input_precision=PREC)
            da = tl.dot(wp_t, gd, input_precision=PREC)
        else:
            tl.store(a_ptr + frame + own, act.to(a_ptr.dtype.element_ty), mask=mask)
            da = _proj_t_tile(g_ptr, sg_n, sg_c, g_pix, p_mask, clip0 + t, C, wp_ptr, swp_o, swp_i, c, c_mask,
                              BLOCK_C, BLOCK_CI, BLOCK_P, PREC)
        dbp += g.to(tl.float32)
        ds = da * dact
        dgamma += ds * u
        du = ds * gscale
        du_u += du * u
        tl.store(dy_ptr + frame + own, du.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    for t in range(0, T):
        frame = (clip0 + t).to(tl.int64) * C * P
        u = tl.div_rn(tl.load(y_ptr + frame + own, mask=mask, other=0.).to(tl.float32), nrm)
        du = tl.load(dy_ptr + frame + own, mask=mask, other=0.).to(tl.float32)
        dy = tl.div_rn(tl.where(norm > eps, du - u * du_u, du), nrm)
        tl.store(dy_ptr + frame + own, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if FUSE_PROJ:
        tl.atomic_add(dwp_ptr + c[:, None] * C + c[None, :], dwp, mask=c_mask[:, None] & c_mask[None, :], sem='relaxed')
    if DETERMINISTIC:
        row = tl.program_id(0).to(tl.int64) * C
        tl.store(dbp_ptr + row + c, tl.sum(dbp, axis=1), mask=c_mask)
        tl.store(dgamma_ptr + row + c, tl.sum(dgamma, axis=1) * norm_scale, mask=c_mask)
    else:
        tl.atomic_add(dbp_ptr + c, tl.sum(dbp, axis=1), mask=c_mask, sem='relaxed')
        tl.atomic_add(dgamma_ptr + c, tl.sum(dgamma, axis=1) * norm_scale, mask=c_mask, sem='relaxed')
