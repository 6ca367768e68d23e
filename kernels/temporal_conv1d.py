"""Triton kernels of the temporal conv1d (``lumiere_fast/ops/temporal_conv1d.py`` holds the launchers).

The temporal conv over the frames of a (b t) c H W tensor as an implicit GEMM over (tap, input channel):

    y[co, p] (frame t) = sum_k sum_ci W[co, ci, k] * x[b, t + k - pad, ci, p]

read through the strides (the (b t) c H W -> (b H W) c t fold of the reference happens in the loads). Tiles are
>= 16 on every dot axis (tl.dot's minimum); channel and pixel tails and out-of-clip taps are masked to 0.
Accumulation is fp32; fp16/bf16 operands go to tl.dot as they are and results are cast once on store.

Kernels (grid: everything on axis 0, decoded in the kernel):
  _temporal_conv1d_kernel              conv tile (frame, pixel tile, co tile) + an epilogue: the op's forward
                                       (EPI_NONE / EPI_BIAS) and grad input (flipped weight), and the conv
                                       block's split path (EPI_MP_SILU, EPI_MP_OUT, EPI_BIAS_RESIDUAL)
  _temporal_conv1d_weight_grad_kernel  grad weight (+ bias): split-K over (frame, pixel), fp32 atomics; with
                                       K = 1 it is also every 1x1 projection's weight grad (conv block,
                                       attention)
``conv_tile`` is the implicit-GEMM tile the conv block's fused kernels build on.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grid import INTERPRET, configs, pixel_offsets, tile_ptrs, unravel3, unravel4

# _temporal_conv1d_weight_grad_kernel's tiles (co, ci, pixels) and warps: fixed, not autotuned, because its atomics
# would accumulate across autotuning runs; (64, 64, 32) at 8 warps compiles without register spills for sm_90 in
# fp16 and fp32
WGRAD_BLOCKS = (16, 16, 16) if INTERPRET else (64, 64, 32)
WGRAD_WARPS = 4 if INTERPRET else 8

EPI_NONE, EPI_MP_SILU, EPI_MP_OUT, EPI_BIAS_RESIDUAL, EPI_BIAS = 0, 1, 2, 3, 4

# Choices from ptxas register reports for sm_90 (no spills in fp16 at these sizes).
_CONV_CONFIGS = configs([triton.Config(dict(BLOCK_C=64, BLOCK_P=32), num_warps=4),
                         triton.Config(dict(BLOCK_C=64, BLOCK_P=64), num_warps=8),
                         triton.Config(dict(BLOCK_C=32, BLOCK_P=64), num_warps=4)],
                        [triton.Config(dict(BLOCK_C=16, BLOCK_P=16), num_warps=4)])


@triton.jit
def conv_tile(acc, x_ptr, s_n, s_c, x_pix, p_mask, clip0, t, T, C_in,
              w_ptr, s_wo, s_wi, s_wk, co, co_mask, K, PAD,
              BLOCK_CI: tl.constexpr, PREC: tl.constexpr):
    """acc[co, p] += sum_k sum_ci w[co, ci, k] * x[clip0 + t + k - PAD, ci, p]: one output frame of the temporal
    conv as an implicit GEMM; taps outside [0, T) are zero padding (masked loads)."""
    ci_base = tl.arange(0, BLOCK_CI)
    for k in range(0, K):
        tt = t + k - PAD
        frame_ok = (tt >= 0) & (tt < T)
        for c0 in range(0, C_in, BLOCK_CI):
            ci = c0 + ci_base
            ci_mask = ci < C_in
            xt = tl.load(tile_ptrs(x_ptr, clip0 + tt, s_n, s_c, ci, x_pix),
                         mask=ci_mask[:, None] & p_mask[None, :] & frame_ok, other=0.)
            wt = tl.load(w_ptr + co[:, None] * s_wo + ci[None, :] * s_wi + k * s_wk,
                         mask=co_mask[:, None] & ci_mask[None, :], other=0.)
            acc += tl.dot(wt.to(xt.dtype), xt, input_precision=PREC)
    return acc


@triton.jit
def silu(y):
    return y / (1. + tl.exp(-y))


@triton.autotune(configs=_CONV_CONFIGS, key=['C_in', 'C_out', 'T', 'K', 'P', 'EPI'])
@triton.jit
def _temporal_conv1d_kernel(
        x_ptr, sx_n, sx_c, sx_h, sx_w,
        w_ptr, sw_o, sw_i, sw_k,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, so_n, so_c, so_h, so_w,
        bias_ptr, gain_ptr, c_out, c_res, silu_scale,
        N, T, C_in, C_out, P, W, K, PAD,
        EPI: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CI: tl.constexpr,
        BLOCK_P: tl.constexpr):
    """out[n, co, p] = epilogue(conv(x)[n, co, p]); grid: (frame, pixel tile, co tile) flattened, co tile fastest
    so the programs sharing one pixel tile's input run together (L2 reuse)."""
    pid = tl.program_id(0)
    n_ct = tl.cdiv(C_out, BLOCK_C)
    n_pt = tl.cdiv(P, BLOCK_P)
    ct, pt, n = unravel3(pid, n_ct, n_pt)
    t = n % T
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    co = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    co_mask = co < C_out
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    acc = conv_tile(acc, x_ptr, sx_n, sx_c, pixel_offsets(p, W, sx_h, sx_w), p_mask, n - t, t, T, C_in,
                    w_ptr, sw_o, sw_i, sw_k, co, co_mask, K, PAD, BLOCK_CI, PREC)
    mask = co_mask[:, None] & p_mask[None, :]
    if EPI == 1:
        acc = silu(acc) * silu_scale
    elif EPI == 2:
        res = tl.load(tile_ptrs(r_ptr, n, sr_n, sr_c, co, pixel_offsets(p, W, sr_h, sr_w)), mask=mask, other=0.)
        acc = acc * (c_out * tl.load(gain_ptr).to(tl.float32)) + c_res * res.to(tl.float32)
    elif EPI == 3:
        res = tl.load(tile_ptrs(r_ptr, n, sr_n, sr_c, co, pixel_offsets(p, W, sr_h, sr_w)), mask=mask, other=0.)
        bias = tl.load(bias_ptr + co, mask=co_mask, other=0.).to(tl.float32)
        acc = acc + bias[:, None] + res.to(tl.float32)
    elif EPI == 4:
        acc = acc + tl.load(bias_ptr + co, mask=co_mask, other=0.).to(tl.float32)[:, None]
    out_ptrs = tile_ptrs(out_ptr, n, so_n, so_c, co, pixel_offsets(p, W, so_h, so_w))
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_conv1d_weight_grad_kernel(
        dy_ptr, sd_n, sd_c, sd_h, sd_w,
        x_ptr, sx_n, sx_c, sx_h, sx_w,
        dw_ptr, db_ptr,
        N, T, C_out, C_in, P, W, K, PAD, rows_per_prog,
        HAS_BIAS: tl.constexpr, PREC: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """dw[co, ci, k] += sum over (frame n, pixel p) of dy[n, co, p] * x[n + k - PAD, ci, p] (same clip), and
    db[co] += sum dy (HAS_BIAS). A GEMM whose reduction axis is every (frame, pixel): split-K, each program
    reduces ``rows_per_prog`` (frame, pixel tile) rows in fp32 and flushes one atomic add of its [co, ci] tile;
    DETERMINISTIC: each split stores its own partial instead (dw (splits, C_out, C_in, K), db (splits, C_out)),
    which the host sums in a fixed order (atomics add in whatever order programs finish).
    K = 1, PAD = 0: sum of dy (x) x over frames and pixels, a 1x1 projection's weight grad.
    Grid: (split, tap, co tile, ci tile) flattened."""
    pid = tl.program_id(0)
    n_co = tl.cdiv(C_out, BLOCK_CO)
    n_ci = tl.cdiv(C_in, BLOCK_CI)
    cit, cot, k, split = unravel4(pid, n_ci, n_co, K)
    co = cot * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = cit * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_mask = co < C_out
    ci_mask = ci < C_in
    n_pt = tl.cdiv(P, BLOCK_P)
    rows = N * n_pt
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], tl.float32)
    dbias = tl.zeros([BLOCK_CO], tl.float32)
    for i in range(0, rows_per_prog):
        row = split.to(tl.int64) * rows_per_prog + i
        n = row // n_pt
        p = (row % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = (p < P) & (row < rows)
        t = n % T
        tt = t + k - PAD
        frame_ok = (tt >= 0) & (tt < T)
        d = tl.load(tile_ptrs(dy_ptr, n, sd_n, sd_c, co, pixel_offsets(p, W, sd_h, sd_w)),
                    mask=co_mask[:, None] & p_mask[None, :], other=0.)
        # x tile loaded as [pixels, ci] (transposed by its pointers, no tl.trans)
        x_pix = pixel_offsets(p, W, sx_h, sx_w)
        xs = tl.load(x_ptr + (n - t + tt).to(tl.int64) * sx_n + x_pix[:, None] + ci.to(tl.int64)[None, :] * sx_c,
                     mask=p_mask[:, None] & ci_mask[None, :] & frame_ok, other=0.)
        acc += tl.dot(d.to(xs.dtype), xs, input_precision=PREC)
        if HAS_BIAS:
            dbias += tl.sum(d.to(tl.float32), axis=1)
    dw_off = co[:, None] * (C_in * K) + ci[None, :] * K + k
    if DETERMINISTIC:
        tl.store(dw_ptr + split.to(tl.int64) * (C_out * C_in * K) + dw_off, acc,
                 mask=co_mask[:, None] & ci_mask[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + split.to(tl.int64) * C_out + co, dbias, mask=co_mask & (k == 0) & (cit == 0))
    else:
        tl.atomic_add(dw_ptr + dw_off, acc, mask=co_mask[:, None] & ci_mask[None, :], sem='relaxed')
        if HAS_BIAS:
            tl.atomic_add(db_ptr + co, dbias, mask=co_mask & (k == 0) & (cit == 0), sem='relaxed')
