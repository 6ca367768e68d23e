"""Triton kernels of the temporal conv block core (``lumiere_fast/ops/conv_block.py`` holds the launchers).

Every tensor is read and written in the frames layout (b t) c H W through its strides: a tile is
[channels, pixels] of one frame, and the temporal conv is an implicit GEMM over (tap, input channel):

    y[co, p] (frame t) = sum_k sum_ci W[co, ci, k] * h[b, t + k - pad, ci, p]

so the (b t) c H W -> (b H W) c t fold of the reference never exists in memory: it happens in the loads. Tiles
are >= 16 on every dot axis (tl.dot's minimum); channel and pixel tails and out-of-clip taps are masked to 0.
Accumulation is fp32; fp16/bf16 operands go to tl.dot as they are and results are cast once on store.

Kernels (grid: everything on axis 0, decoded in the kernel; every grid has a frame axis, so the coarse levels
(8x8, 16x16: a pixel tile or two per frame) still give the GPU batch x frames x tiles programs):
  _conv_block_mp_forward_kernel   MP forward, all channels of a pixel tile in one program: conv -> mp_silu -> 1x1
                                  projection (tl.dot from registers) -> gain + mp_add with the residual
  _conv_block_forward_kernel      non-MP forward after the conv (the temporal conv1d's kernel computes conv + bias
                                  frame-parallel into a buffer): time norm (each program reads its tile's T frames)
                                  -> silu -> projection + bias + residual (fused) or the activation (split)
  _conv_block_mp_backward_kernel  MP backward except the conv weight and grad_h: recompute y, a; grad residual, dy;
                                  fused (C <= BWD_FUSE_MAX_C): grad gain and grad proj from registers (per-program
                                  fp32 accumulators, one atomic flush); split: channel tiles, the activation to memory
  _conv_block_backward_kernel     the same for non-MP down to dL/d(normalised y), from the recomputed conv + bias
  _conv_block_norm_backward_kernel  the time norm's backward (needs that gradient of every frame: a launch of its own)
The generic conv tile with an epilogue (the split paths, grad_h, the non-MP conv + bias) and the weight grads are
the temporal conv1d's kernels (``kernels/temporal_conv1d.py``); ``conv_tile`` there is the implicit GEMM every
kernel here builds on. Conv weights arrive packed ([k, co, ci] contiguous in the compute dtype,
``ops/weight_pack.py``): the stride of their in-channel runs is 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grid import INTERPRET, configs, load_mat, pixel_offsets, tile_ptrs, unravel3, unravel4
from .temporal_conv1d import conv_tile, silu

# Largest channel count whose full [C, BLOCK_P] activation tile (and the [C, C] projection weight) one program
# keeps in registers; above it the projection reads the activation back from memory (split path).
FUSE_MAX_C = 128
# The fused backward also holds the projection weight twice (wp and wp^T as dot operands) and a [C, C] fp32
# grad-proj accumulator per program, so it stops fusing earlier (64: ~100 registers/thread of those at 8 warps)
BWD_FUSE_MAX_C = 64
# channel tile of the split forward's activation stage and the split backward
SPLIT_BLOCK_C = 16 if INTERPRET else 64
# (BLOCK_C, BLOCK_P, warps) of the non-MP norm backward: elementwise, 3T + 2 tile loads per output tile
NORM_BWD_BLOCKS = (16, 16, 4) if INTERPRET else (32, 64, 4)


def _config_list(options):
    return [triton.Config(meta, num_warps=warps) for meta, warps in options]


# Choices from ptxas register reports for sm_90: the fused kernels hold [BLOCK_C, BLOCK_P] fp32 tiles with BLOCK_C
# up to 128 (all channels), so narrow pixel tiles and 8 warps are in the set. The keys name the pixel count P: at
# 8x8 (P = 64) a 128-wide pixel tile is half masked, at 64x64 it is the widest tile that fills.
_FUSED_CONFIGS = configs(_config_list([(dict(BLOCK_P=16), 8), (dict(BLOCK_P=32), 4), (dict(BLOCK_P=32), 8),
                                       (dict(BLOCK_P=64), 4), (dict(BLOCK_P=64), 8)]),
                         _config_list([(dict(BLOCK_P=16), 4)]))
# The MP forward also convolves: BLOCK_P = 128 at 8 warps makes its conv a 128 x 128 tensor-core tile at C = 128
# (BLOCK_CI = 64 from the launcher: a 64-wide reduction step per packed weight tile). ptxas, bf16: 255 registers,
# 152 B of spills a thread on triton 3.8, 0.9 KiB on 3.6 (the conv, mp_silu and projection tiles live at once),
# 64 KiB shared; BLOCK_CI = 64 also makes the 4-warp configs spill 0.5-0.8 KiB (3.6: up to 2.1 KiB), their 8-warp
# twins none: the autotuner has both. The non-MP kernels (no conv of their own now: temporal_conv1d's kernel
# computes it frame-parallel) spill 0.5-0.9 KiB a thread at that width, so they keep BLOCK_P <= 64.
_MP_FORWARD_CONFIGS = _FUSED_CONFIGS + configs(_config_list([(dict(BLOCK_P=128), 8)]), [])
# TILES_PER_PROG: pixel tiles one MP backward program walks, so its [C, C] grad-proj partial is flushed with
# atomics once per TILES_PER_PROG tiles instead of once per tile; BLOCK_P = 128 (one tile) gives the conv
# recompute the 128-pixel tile (ptxas, bf16: 255 registers, 32 B of spills fused, 0.3 KiB split; triton 3.6:
# 0.7 / 1.2 KiB)
_BWD_CONFIGS = configs(_config_list([(dict(BLOCK_P=16, TILES_PER_PROG=4), 8), (dict(BLOCK_P=32, TILES_PER_PROG=4), 4),
                                     (dict(BLOCK_P=32, TILES_PER_PROG=4), 8), (dict(BLOCK_P=64, TILES_PER_PROG=2), 8),
                                     (dict(BLOCK_P=128, TILES_PER_PROG=1), 8)]),
                       _config_list([(dict(BLOCK_P=16, TILES_PER_PROG=2), 4)]))
# the narrowest pixel tile of the non-MP backward: its deterministic variant's partial rows are sized by it
MIN_BLOCK_P = min(c.kwargs['BLOCK_P'] for c in _FUSED_CONFIGS)


# ---------------------------------------------------------------------------------------------- helpers


@triton.jit
def _frame_tile(C, P, T, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The non-MP kernels' program -> (first frame of its clip, frame t in the clip, pixel tile, channel tile),
    channel tile fastest, then the frame: the T programs that read one tile's T frames (the norm over time) run
    side by side. With the tiles' indices, masks and offsets in a contiguous (b t) c P frame."""
    n_ct = tl.cdiv(C, BLOCK_C)
    ct, t, pt, clip = unravel4(tl.program_id(0), n_ct, T, tl.cdiv(P, BLOCK_P))
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    own = c[:, None].to(tl.int64) * P + p[None, :]
    return clip * T, t, p, p_mask, c, c_mask, c_mask[:, None] & p_mask[None, :], own


@triton.jit
def _time_norm(y_ptr, clip0, T, C, P, own, mask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """||y||_t of a [BLOCK_C, BLOCK_P] tile over the T frames of its clip (y contiguous (b t) c P), fp32, with a
    round-to-nearest sqrt (at t = 1 the norm is then exactly |y|)."""
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for s in range(0, T):
        y = tl.load(y_ptr + (clip0 + s).to(tl.int64) * C * P + own, mask=mask, other=0.).to(tl.float32)
        ss += y * y
    return tl.sqrt_rn(ss)


@triton.jit
def _silu_parts(y):
    """(silu(y), silu'(y)), fp32."""
    sig = 1. / (1. + tl.exp(-y))
    return y * sig, sig * (1. + y * (1. - sig))


# ---------------------------------------------------------------------------------------------- forward


@triton.autotune(configs=_MP_FORWARD_CONFIGS, key=['C', 'T', 'K', 'P'])
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


@triton.autotune(configs=_FUSED_CONFIGS, key=['C', 'T', 'P', 'FUSE_PROJ'])
@triton.jit
def _conv_block_forward_kernel(
        y_ptr,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, so_n, so_c, so_h, so_w,
        gamma_ptr, wp_ptr, swp_o, swp_i, bp_ptr,
        norm_scale, eps,
        T, C, P, W,
        FUSE_PROJ: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Non-MP forward after the conv: y = conv + bias (contiguous (b t) c P, the activation dtype: the temporal
    conv1d's frame-parallel kernel wrote it) -> time norm -> silu -> either (FUSE_PROJ, BLOCK_C >= C) the 1x1
    projection + bias + residual, or the activation (split path: temporal_conv1d's kernel projects it).
    One program: one frame x one pixel tile x one channel tile; it reads its tile in all T frames of the clip for
    the norm (adjacent programs read the same T tiles: L2 hits). Grid (channel tile, frame, pixel tile, clip)
    flattened."""
    clip0, t, p, p_mask, c, c_mask, mask, own = _frame_tile(C, P, T, BLOCK_C, BLOCK_P)
    n = clip0 + t
    # F.normalize: y / max(||y||_t, eps), a division as in torch: at t = 1 it then gives exactly +-1, which needs
    # round-to-nearest sqrt and division (a GPU compiles tl.sqrt and `/` to approximations, off by an ulp or two)
    nrm = tl.maximum(_time_norm(y_ptr, clip0, T, C, P, own, mask, BLOCK_C, BLOCK_P), eps)
    gscale = (norm_scale * tl.load(gamma_ptr + c, mask=c_mask, other=0.).to(tl.float32))[:, None]
    y = tl.load(y_ptr + n.to(tl.int64) * C * P + own, mask=mask, other=0.).to(tl.float32)
    a = silu(tl.div_rn(y, nrm) * gscale)
    dt = y_ptr.dtype.element_ty
    if FUSE_PROJ:
        wp = load_mat(wp_ptr, swp_o, swp_i, c, c_mask, c, c_mask).to(dt)
        bp = tl.load(bp_ptr + c, mask=c_mask, other=0.).to(tl.float32)
        res = tl.load(tile_ptrs(r_ptr, n, sr_n, sr_c, c, pixel_offsets(p, W, sr_h, sr_w)), mask=mask, other=0.)
        a = tl.dot(wp, a.to(dt), input_precision=PREC) + bp[:, None] + res.to(tl.float32)
    tl.store(tile_ptrs(out_ptr, n, so_n, so_c, c, pixel_offsets(p, W, so_h, so_w)), a.to(out_ptr.dtype.element_ty),
             mask=mask)


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


@triton.autotune(configs=_FUSED_CONFIGS, key=['C', 'T', 'P', 'FUSE_PROJ'],
                 reset_to_zero=['dwp_ptr', 'dbp_ptr', 'dgamma_ptr'])
@triton.jit
def _conv_block_backward_kernel(
        y_ptr,
        g_ptr, sg_n, sg_c, sg_h, sg_w,
        dres_ptr, du_ptr, a_ptr,
        gamma_ptr, wp_ptr, swp_o, swp_i,
        dwp_ptr, dbp_ptr, dgamma_ptr,
        norm_scale, eps,
        T, C, P, W,
        FUSE_PROJ: tl.constexpr, PREC: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """Non-MP backward down to du = dL/d(normalised y), one frame x one pixel tile x one channel tile per program
    (the norm over time reads the tile's T frames of y; the norm's own backward, which needs du of every frame,
    is _conv_block_norm_backward_kernel). y = conv + bias is recomputed by the caller into ``y_ptr`` (contiguous
    (b t) c P) rather than kept from the forward. Writes grad residual and du (contiguous). Grad proj bias and
    gamma: per-program fp32 sums, one atomic add each (DETERMINISTIC: stored as row program_id of (programs, C)
    partials, summed by the host in a fixed order; the launcher then never fuses the projection, whose grad
    would need atomics too). FUSE_PROJ (BLOCK_C >= C): grad proj from registers (atomic flush); split: the
    activation goes to ``a_ptr`` (grad proj is reduced from it afterwards) and the projection's input grad reads
    all of g from memory. Grid (channel tile, frame, pixel tile, clip) flattened."""
    clip0, t, p, p_mask, c, c_mask, mask, own = _frame_tile(C, P, T, BLOCK_C, BLOCK_P)
    n = clip0 + t
    frame = n.to(tl.int64) * C * P
    dt = y_ptr.dtype.element_ty
    # divide by the norm rather than multiply by its reciprocal: at t = 1, u = y / |y| is then exactly +-1 and
    # the exact-zero gradient through the norm comes out as 0 rather than rounding noise (round-to-nearest sqrt
    # and division, as torch computes them: the approximate ones are not exact there)
    nrm = tl.maximum(_time_norm(y_ptr, clip0, T, C, P, own, mask, BLOCK_C, BLOCK_P), eps)
    gscale = (norm_scale * tl.load(gamma_ptr + c, mask=c_mask, other=0.).to(tl.float32))[:, None]
    u = tl.div_rn(tl.load(y_ptr + frame + own, mask=mask, other=0.).to(tl.float32), nrm)
    act, dact = _silu_parts(u * gscale)
    g_pix = pixel_offsets(p, W, sg_h, sg_w)
    g = tl.load(tile_ptrs(g_ptr, n, sg_n, sg_c, c, g_pix), mask=mask, other=0.)
    tl.store(dres_ptr + frame + own, g.to(dres_ptr.dtype.element_ty), mask=mask)
    if FUSE_PROJ:
        gd = g.to(dt)
        dwp = tl.dot(gd, tl.trans(act.to(dt)), input_precision=PREC)
        da = tl.dot(load_mat(wp_ptr, swp_i, swp_o, c, c_mask, c, c_mask).to(dt), gd, input_precision=PREC)
        # relaxed: these sums need atomicity, not ordering; the kernel's end makes them visible
        tl.atomic_add(dwp_ptr + c[:, None] * C + c[None, :], dwp, mask=c_mask[:, None] & c_mask[None, :],
                      sem='relaxed')
    else:
        tl.store(a_ptr + frame + own, act.to(a_ptr.dtype.element_ty), mask=mask)
        da = _proj_t_tile(g_ptr, sg_n, sg_c, g_pix, p_mask, n, C, wp_ptr, swp_o, swp_i, c, c_mask,
                          BLOCK_C, BLOCK_CI, BLOCK_P, PREC)
    ds = da * dact
    tl.store(du_ptr + frame + own, (ds * gscale).to(du_ptr.dtype.element_ty), mask=mask)
    dbp = tl.sum(g.to(tl.float32), axis=1)
    dgamma = tl.sum(ds * u, axis=1) * norm_scale
    if DETERMINISTIC:
        row = tl.program_id(0).to(tl.int64) * C
        tl.store(dbp_ptr + row + c, dbp, mask=c_mask)
        tl.store(dgamma_ptr + row + c, dgamma, mask=c_mask)
    else:
        tl.atomic_add(dbp_ptr + c, dbp, mask=c_mask, sem='relaxed')
        tl.atomic_add(dgamma_ptr + c, dgamma, mask=c_mask, sem='relaxed')


@triton.jit
def _conv_block_norm_backward_kernel(y_ptr, du_ptr, dy_ptr, eps, T, C, P,
                                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The time norm's backward, one frame x one pixel tile x one channel tile per program (all contiguous
    (b t) c P):
        dy = (du - u * sum_t(du * u)) / ||y||      (||y|| > eps; else du / eps, F.normalize's clamp)
    reading the tile's T frames of y (the norm, then u) and du (L2 hits: adjacent programs read the same
    tiles). Grid (channel tile, frame, pixel tile, clip) flattened."""
    clip0, t, p, p_mask, c, c_mask, mask, own = _frame_tile(C, P, T, BLOCK_C, BLOCK_P)
    norm = _time_norm(y_ptr, clip0, T, C, P, own, mask, BLOCK_C, BLOCK_P)
    nrm = tl.maximum(norm, eps)
    du_u = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for s in range(0, T):
        frame = (clip0 + s).to(tl.int64) * C * P
        u = tl.div_rn(tl.load(y_ptr + frame + own, mask=mask, other=0.).to(tl.float32), nrm)
        du_u += tl.load(du_ptr + frame + own, mask=mask, other=0.).to(tl.float32) * u
    frame = (clip0 + t).to(tl.int64) * C * P
    u = tl.div_rn(tl.load(y_ptr + frame + own, mask=mask, other=0.).to(tl.float32), nrm)
    du = tl.load(du_ptr + frame + own, mask=mask, other=0.).to(tl.float32)
    dy = tl.div_rn(tl.where(norm > eps, du - u * du_u, du), nrm)
    tl.store(dy_ptr + frame + own, dy.to(dy_ptr.dtype.element_ty), mask=mask)
