"""Triton kernels for temporal down/upsampling by 2 (``lumiere_fast/ops/resample.py`` holds the launchers).

Every variant, forward and backward-for-the-input, is one temporal 3-tap convolution whose taps read a blend of
source frames:

    out[b, j][co, p] = sum_{k<3} sum_ci W_k[co, ci] * in_k(b, j)[ci, p]
    in_k(b, j)       = sum_{s<NSRC} coef(j, k, s) * src[b, frame(j, k, s)]     (zero outside [0, T_SRC))

``MODE`` says which source frames feed tap k of output frame j (``_tap_source``):

    MODE_DOWN        conv1d stride 2, padding 1:            frame 2j - 1 + k
    MODE_UP          conv_transpose1d stride 2, padding 1:  frame (j + 1 - k) / 2 when that is an integer
    MODE_INTERP      linear interpolation (align_corners=False) to T_MID frames, then a 'same' conv:
                     interpolated frame m = j - 1 + k, a blend of two source frames
    MODE_INTERP_ADJ  the input-gradient of MODE_INTERP: sum_m A[m, j] * g[m - 1 + k] over the NSRC
                     interpolated frames m whose blend touches input frame j (A = the interpolation matrix)

The backward for the input of DOWN is UP (and vice versa) with the weight taps transposed. The launcher packs the
weight once per call as W_k[co, ci] in a contiguous [3, co, ci] buffer of the compute dtype (transposition, the
ConvTranspose1d (c_in, c_out, k) layout and tap flips happen in the pack), so w_i == 1 and each row of a weight tile
is one contiguous run (16-byte vector loads) instead of 2-byte loads at stride 3.

All tensors are frames ``(b t) c h w`` with arbitrary strides: the fold to time-major happens in the pointer
math (frame * s_f + channel * s_c + h * s_h + w * s_w), never as a copy.
"""

import triton
import triton.language as tl

from .grid import configs, pixel_offsets, unravel3, unravel4

MODE_DOWN = 0
MODE_UP = 1
MODE_INTERP = 2
MODE_INTERP_ADJ = 3

# Autotune keys: the channel/time sizes, the pixel count and the variant. The best tile depends on C (the GEMM
# shape) and on P (a 128-pixel tile is half masked at 8x8, and at the coarse levels a smaller tile gives the
# grid enough programs); the batch only scales the number of programs.
_KEY = ['C', 'T_SRC', 'T_OUT', 'P', 'MODE', 'NSRC']

# Under the interpreter: tiles small enough that tests with C = 19 or h*w = 35 exercise the tails (several
# channel and pixel tiles).
_INTERPRET_CONFIGS = [triton.Config({'BLOCK_CO': 16, 'BLOCK_CI': 16, 'BLOCK_P': 32}, num_warps=1)]
GEMM_CONFIGS = configs([
    triton.Config({'BLOCK_CO': 16, 'BLOCK_CI': 16, 'BLOCK_P': 128}, num_warps=4, num_stages=2),
    triton.Config({'BLOCK_CO': 32, 'BLOCK_CI': 32, 'BLOCK_P': 128}, num_warps=4, num_stages=3),
    triton.Config({'BLOCK_CO': 64, 'BLOCK_CI': 32, 'BLOCK_P': 128}, num_warps=4, num_stages=3),
    triton.Config({'BLOCK_CO': 64, 'BLOCK_CI': 64, 'BLOCK_P': 64}, num_warps=4, num_stages=3),
    triton.Config({'BLOCK_CO': 128, 'BLOCK_CI': 32, 'BLOCK_P': 128}, num_warps=8, num_stages=3),
    triton.Config({'BLOCK_CO': 128, 'BLOCK_CI': 64, 'BLOCK_P': 64}, num_warps=8, num_stages=3),
    # the full tensor-core tile: 128 x 128 outputs, 64-wide reduction steps (see bench_resample.py's numbers)
    triton.Config({'BLOCK_CO': 128, 'BLOCK_CI': 64, 'BLOCK_P': 128}, num_warps=8, num_stages=2),
], _INTERPRET_CONFIGS)
DW_CONFIGS = configs([
    triton.Config({'BLOCK_CO': 16, 'BLOCK_CI': 16, 'BLOCK_P': 128}, num_warps=4, num_stages=2),
    triton.Config({'BLOCK_CO': 32, 'BLOCK_CI': 32, 'BLOCK_P': 64}, num_warps=4, num_stages=3),
    triton.Config({'BLOCK_CO': 64, 'BLOCK_CI': 64, 'BLOCK_P': 64}, num_warps=4, num_stages=3),
    triton.Config({'BLOCK_CO': 64, 'BLOCK_CI': 64, 'BLOCK_P': 128}, num_warps=8, num_stages=3),
    triton.Config({'BLOCK_CO': 128, 'BLOCK_CI': 64, 'BLOCK_P': 64}, num_warps=8, num_stages=3),
    # 128 x 128 (co, ci) outputs, 64 pixels a reduction step
    triton.Config({'BLOCK_CO': 128, 'BLOCK_CI': 128, 'BLOCK_P': 64}, num_warps=8, num_stages=2),
], _INTERPRET_CONFIGS)


def _prune(configs, named_args, **kwargs):
    """Drop channel tiles much wider than C (all-masked lanes); keep at least the narrowest config."""
    c = named_args['C']
    cap = max(16, triton.next_power_of_2(c))
    kept = [cfg for cfg in configs if cfg.kwargs['BLOCK_CO'] <= cap and cfg.kwargs['BLOCK_CI'] <= cap]
    return kept or configs[:1]


@triton.jit
def _interp_source(m, T_IN, scale):
    """F.interpolate(mode='linear'/'bilinear', align_corners=False) for output index m of an input of T_IN frames:
    (i0, i1, lambda1), with x_interp[m] = (1 - lambda1) * x[i0] + lambda1 * x[i1]."""
    src = tl.maximum((m.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)                     # src >= 0: truncation is floor
    lam1 = src - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, T_IN - 1)
    return i0, i1, lam1


@triton.jit
def _tap_source(j, k, s, T_SRC, T_MID, T_OUT, scale, MODE: tl.constexpr, NSRC: tl.constexpr):
    """Source frame and coefficient of blend term ``s`` of tap ``k`` for output frame ``j`` (coef 0: no term).

    T_SRC: frames of the tensor read; T_OUT: frames written; T_MID: interpolated length (INTERP / INTERP_ADJ);
    scale: the forward interpolation's input/output frame ratio.
    """
    if MODE == 0:       # MODE_DOWN
        f = 2 * j - 1 + k
        coef = ((f >= 0) & (f < T_SRC)).to(tl.float32)
    elif MODE == 1:     # MODE_UP: n = j + 1 - k >= -1; shift by 2 so integer division never sees a negative
        n = j + 1 - k + 2
        f = n // 2 - 1
        coef = (((n % 2) == 0) & (f >= 0) & (f < T_SRC)).to(tl.float32)
    elif MODE == 2:     # MODE_INTERP
        m = j - 1 + k
        i0, i1, lam1 = _interp_source(m, T_SRC, scale)
        ok = ((m >= 0) & (m < T_MID)).to(tl.float32)
        if s == 0:
            f = i0
            coef = ok * (1.0 - lam1)
        else:
            f = i1
            coef = ok * lam1
    else:               # MODE_INTERP_ADJ: output frame j is an input frame of the forward interpolation
        m = (j * T_MID) // T_OUT - (NSRC - 1) // 2 + s
        i0, i1, lam1 = _interp_source(m, T_OUT, scale)
        f = m - 1 + k
        a = (i0 == j).to(tl.float32) * (1.0 - lam1) + (i1 == j).to(tl.float32) * lam1
        coef = a * ((m >= 0) & (m < T_MID) & (f >= 0) & (f < T_SRC)).to(tl.float32)
    return f, coef


@triton.jit
def _tap_live(j, k, T_SRC, T_MID, T_OUT, scale, MODE: tl.constexpr, NSRC: tl.constexpr):
    """Whether any blend term feeds tap k of output frame j (a dead tap skips its loads and its GEMMs)."""
    live = False
    for s in tl.static_range(NSRC):
        f, coef = _tap_source(j, k, s, T_SRC, T_MID, T_OUT, scale, MODE, NSRC)
        live = live | (coef != 0.0)
    return live


@triton.jit
def _load_tap(src_ptr, frame0, s_f, offs, mask, j, k, T_SRC, T_MID, T_OUT, scale,
              MODE: tl.constexpr, NSRC: tl.constexpr, R: tl.constexpr, S: tl.constexpr):
    """The [R, S] input tile of tap k for output frame j: the blend of its source frames, in fp32.

    ``offs``/``mask``: [R, S] element offsets within one frame (channel and pixel, int64) and their bounds, in
    whichever orientation the caller's GEMM wants; ``frame0``: index of the video's first frame.
    """
    tile = tl.zeros([R, S], dtype=tl.float32)
    for s in tl.static_range(NSRC):
        f, coef = _tap_source(j, k, s, T_SRC, T_MID, T_OUT, scale, MODE, NSRC)
        # a dead term is masked, not branched around: masked lanes fetch nothing, and a branch-free loop body
        # keeps the loads software-pipelined (tl.where, not `mask & (coef != 0.0)`: the interpreter cannot `&` a
        # float comparison's scalar with a block)
        v = tl.load(src_ptr + (frame0 + f).to(tl.int64) * s_f + offs, mask=tl.where(coef != 0.0, mask, False),
                    other=0.0)
        tile += coef * v.to(tl.float32)
    return tile


@triton.autotune(configs=GEMM_CONFIGS, key=_KEY, prune_configs_by={'early_config_prune': _prune})
@triton.jit
def _resample_kernel(src_ptr, w_ptr, b_ptr, y_ptr,
                    C, T_SRC, T_OUT, T_MID, P, W_IMG, scale,
                    s_f, s_c, s_h, s_w,                 # source strides, frames layout
                    w_o, w_i, w_k,                      # W_k[o, i] = w_ptr[o * w_o + i * w_i + k * w_k]
                    y_f, y_c, y_h, y_w,
                    SRC_MERGED: tl.constexpr, Y_MERGED: tl.constexpr,
                    MODE: tl.constexpr, NSRC: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """y[(b j)] = sum_k W_k @ in_k(b, j) (+ bias): one program per (b, j, pixel tile, out-channel tile).

    Grid axis 0 only, out-channel tile fastest: neighbouring programs read the same input tiles (L2 reuse).
    """
    pid = tl.program_id(0)
    n_co = tl.cdiv(C, BLOCK_CO)
    n_p = tl.cdiv(P, BLOCK_P)
    ct, pt, bj = unravel3(pid, n_co, n_p)
    bi = bj // T_OUT
    j = bj % T_OUT

    co = ct * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    co_ok = co < C
    p_ok = p < P
    pix = pixel_offsets(p, W_IMG, s_h, s_w, SRC_MERGED)
    dot_ty = src_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
    for k in tl.static_range(3):
        if _tap_live(j, k, T_SRC, T_MID, T_OUT, scale, MODE, NSRC):
            for c0 in range(0, C, BLOCK_CI):
                ci = c0 + tl.arange(0, BLOCK_CI)
                ci_ok = ci < C
                w = tl.load(w_ptr + co[:, None].to(tl.int64) * w_o + ci[None, :] * w_i + k * w_k,
                            mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
                x = _load_tap(src_ptr, bi * T_SRC, s_f, ci[:, None].to(tl.int64) * s_c + pix[None, :],
                              ci_ok[:, None] & p_ok[None, :], j, k, T_SRC, T_MID, T_OUT, scale,
                              MODE, NSRC, BLOCK_CI, BLOCK_P)
                acc += tl.dot(w.to(dot_ty), x.to(dot_ty), input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    y_off = (bi * T_OUT + j).to(tl.int64) * y_f + co[:, None].to(tl.int64) * y_c \
        + pixel_offsets(p, W_IMG, y_h, y_w, Y_MERGED)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=co_ok[:, None] & p_ok[None, :])


@triton.jit
def _load_grad(g_frame, co, p, co_ok, p_ok, g_c, W_IMG, g_h, g_w, G_MERGED: tl.constexpr):
    """The [CO, P] tile of one grad_out frame."""
    return tl.load(g_frame + co[:, None].to(tl.int64) * g_c + pixel_offsets(p, W_IMG, g_h, g_w, G_MERGED)[None, :],
                   mask=co_ok[:, None] & p_ok[None, :], other=0.0)


@triton.autotune(configs=DW_CONFIGS, key=_KEY, prune_configs_by={'early_config_prune': _prune})
@triton.jit
def _resample_weight_grad_kernel(src_ptr, g_ptr, dw_ptr, db_ptr,
                       C, T_SRC, T_OUT, T_MID, P, W_IMG, scale,
                       BT_OUT, BJ_PER, P_PER, SPLIT_P,
                       s_f, s_c, s_h, s_w,                 # forward input strides
                       g_f, g_c, g_h, g_w,                 # grad_out strides
                       d_s, d_o, d_i, d_k,                 # dw_ptr[split * d_s + o * d_o + i * d_i + k * d_k]
                       SRC_MERGED: tl.constexpr, G_MERGED: tl.constexpr,
                       MODE: tl.constexpr, NSRC: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial weight (and bias) gradients of one split of the (b, j, p) reduction:

        dW_k[co, ci] = sum_{b, j, p} g[(b j)][co, p] * in_k(b, j)[ci, p],   db[co] = sum_{b, j, p} g[(b j)][co, p]

    One program per (split, tap, out-channel tile, in-channel tile); the split covers BJ_PER output frames times
    P_PER pixels, so small-C layers still fill the GPU. Each split stores its own partial sum (no atomics): the
    launcher adds the splits, which keeps the result deterministic and autotuning reruns harmless.
    """
    pid = tl.program_id(0)
    n_co = tl.cdiv(C, BLOCK_CO)
    n_ci = tl.cdiv(C, BLOCK_CI)
    cit, ct, k, split = unravel4(pid, n_ci, n_co, 3)
    sp = split % SPLIT_P
    sbj = split // SPLIT_P

    co = ct * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = cit * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = co < C
    ci_ok = ci < C
    dot_ty = src_ptr.dtype.element_ty
    do_bias = (k == 0) & (cit == 0) & HAS_BIAS
    p_lo = sp * P_PER
    p_hi = tl.minimum(p_lo + P_PER, P)
    bj_lo = sbj * BJ_PER
    bj_hi = tl.minimum(bj_lo + BJ_PER, BT_OUT)

    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_CO], dtype=tl.float32)
    for bj in range(bj_lo, bj_hi):
        bi = bj // T_OUT
        j = bj % T_OUT
        g_frame = g_ptr + tl.cast(bj, tl.int64) * g_f
        if _tap_live(j, k, T_SRC, T_MID, T_OUT, scale, MODE, NSRC):
            for p0 in range(p_lo, p_hi, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                p_ok = p < p_hi
                g = _load_grad(g_frame, co, p, co_ok, p_ok, g_c, W_IMG, g_h, g_w, G_MERGED)
                if HAS_BIAS:        # cheap next to the GEMM; only the bias programs store it
                    acc_b += tl.sum(g.to(tl.float32), axis=1)
                # the tap tile as [P, CI], so the GEMM is [CO, P] @ [P, CI]
                offs = pixel_offsets(p, W_IMG, s_h, s_w, SRC_MERGED)[:, None] + ci[None, :].to(tl.int64) * s_c
                x = _load_tap(src_ptr, bi * T_SRC, s_f, offs, p_ok[:, None] & ci_ok[None, :],
                              j, k, T_SRC, T_MID, T_OUT, scale, MODE, NSRC, BLOCK_P, BLOCK_CI)
                acc += tl.dot(g.to(dot_ty), x.to(dot_ty), input_precision=DOT_PREC)
        elif do_bias:               # a dead tap still owes the bias its share of grad_out
            for p0 in range(p_lo, p_hi, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                g = _load_grad(g_frame, co, p, co_ok, p < p_hi, g_c, W_IMG, g_h, g_w, G_MERGED)
                acc_b += tl.sum(g.to(tl.float32), axis=1)
    base = dw_ptr + split.to(tl.int64) * d_s + k * d_k
    tl.store(base + co[:, None].to(tl.int64) * d_o + ci[None, :].to(tl.int64) * d_i, acc,
             mask=co_ok[:, None] & ci_ok[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + split.to(tl.int64) * C + co, acc_b, mask=co_ok & do_bias)
