"""Triton kernels of the MP temporal attention block (``lumiere_fast/ops/attention.py`` holds the launchers).

Every tensor is read in the frames layout (b t) c H W through its strides: the (b t) c H W -> (b H W) t c fold
of the reference happens in the loads, and outputs are written contiguous (b t) c H W.

Kernels (grid: everything on axis 0, decoded in the kernel):
  attn_core_kernel      one program per (clip, pixel, head): the [T, c] rows of its pixel -> q, k, v for its head
                        (tl.dot over c chunks), pixel norm of q, k, v and of the head's memory keys/values, the
                        scaled softmax over m + T keys in fp32 (the memory keys are a second score block, so no
                        concatenation and no score tensor in memory) and P @ V; writes o as a (b t) (h d) H W
                        frames tensor. The non-MP variant (MP=False): separate wq/wk/wv, RMSNorm pre-norm
                        folded in (row norms over c, g on the weights), no pixel norm, no memory.
  mp_attn_core_bwd_kernel the MP core's backward (scores recomputed), see its docstring.
  weight_grad_kernel    sum over frames and pixels of a (x) b: the weight grads (split-K, fp32 atomics).
  linear_mp_add_kernel  out = mp_add(gain * W @ in, res) per (frame, pixel tile, out-channel tile): the layer's
                        output projection + inner MP residual, and proj_out * gain + the outer MP residual.

Why two kernels per layer and not one: the output projection sums over all heads and the residual needs all c
channels of a pixel's T rows; holding [T, c] (c up to 768, T up to 128) plus the [c, h d] weight on chip in one
program does not fit, so o makes one trip through memory (h d channels, the size of one qkv third) and the
projection runs as a tiled GEMM that reads it back in the same frames layout.

Tiles are >= 16 on every dot axis (tl.dot's minimum); time, channel, head-dim and memory tails are masked.
Accumulation and softmax are fp32; fp16/bf16 operands go to tl.dot in the input dtype.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter (CPU tests) runs numpy per program: one small config, no autotuning sweep.
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


def _configs(options):
    if INTERPRET:
        options = options[:1]
    return [triton.Config(meta, num_warps=warps) for meta, warps in options]


_LINEAR_CONFIGS = _configs([(dict(BLOCK_CO=16, BLOCK_P=16), 4) if INTERPRET else (dict(BLOCK_CO=64, BLOCK_P=64), 4),
                            (dict(BLOCK_CO=64, BLOCK_P=128), 8), (dict(BLOCK_CO=128, BLOCK_P=64), 8),
                            (dict(BLOCK_CO=32, BLOCK_P=64), 4)])

# weight_grad_kernel's (BLOCK_A, BLOCK_B, BLOCK_P) and warps
WGRAD_BLOCKS = (16, 16, 16) if INTERPRET else (64, 64, 32)
WGRAD_WARPS = 4 if INTERPRET else 8


@triton.jit
def _pixel_offsets(p, W, s_h, s_w):
    """Offsets of flat pixel indices p (row-major over H W) in a tensor with pixel strides (s_h, s_w)."""
    return (p // W).to(tl.int64) * s_h + (p % W).to(tl.int64) * s_w


@triton.jit
def _row_norm(s_ptr, ss_n, ss_c, pix, n, t_mask, C, BLOCK_T: tl.constexpr, BLOCK_CK: tl.constexpr):
    """[BLOCK_T] l2 norms over the c channels of the rows n (the non-MP RMSNorm's denominator)."""
    acc = tl.zeros([BLOCK_T], tl.float32)
    for c0 in range(0, C, BLOCK_CK):
        ck = c0 + tl.arange(0, BLOCK_CK)
        s = tl.load(s_ptr + n[:, None] * ss_n + ck.to(tl.int64)[None, :] * ss_c + pix,
                    mask=t_mask[:, None] & (ck < C)[None, :], other=0.).to(tl.float32)
        acc += tl.sum(s * s, axis=1)
    return tl.sqrt(acc)


@triton.jit
def _pixel_norm_rows(v, eps, scale):
    """F.normalize over the last axis (eps clamp of the norm) times sqrt(d); zero (masked) rows stay zero."""
    nrm = tl.sqrt(tl.sum(v * v, axis=1))
    return v / tl.maximum(nrm, eps)[:, None] * scale


@triton.jit
def _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, w_ptr, sw_o, sw_i, row0, d, d_mask, C,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, PREC: tl.constexpr,
               g_ptr=None, HAS_G: tl.constexpr = False):
    """[BLOCK_T, BLOCK_D] = s[rows n, :] @ (W[row0 + d, :] * g)^T, a loop over c chunks (fp32 accumulator);
    the RMSNorm gain g (HAS_G) scales W's columns, which equals scaling s's channels."""
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_CK):
        ck = c0 + tl.arange(0, BLOCK_CK)
        ck_mask = ck < C
        s = tl.load(s_ptr + n[:, None] * ss_n + ck.to(tl.int64)[None, :] * ss_c + pix,
                    mask=t_mask[:, None] & ck_mask[None, :], other=0.)
        w = tl.load(w_ptr + (row0 + d).to(tl.int64)[None, :] * sw_o + ck.to(tl.int64)[:, None] * sw_i,
                    mask=ck_mask[:, None] & d_mask[None, :], other=0.)
        if HAS_G:
            w = w.to(tl.float32) * tl.load(g_ptr + ck, mask=ck_mask, other=0.).to(tl.float32)[:, None]
        acc += tl.dot(s, w.to(s.dtype), input_precision=PREC)
    return acc


@triton.jit
def attn_core_kernel(
        s_ptr, ss_n, ss_c, ss_h, ss_w,
        wq_ptr, swq_o, swq_i, wk_ptr, swk_o, swk_i, wv_ptr, swv_o, swv_i, row_k0, row_v0,
        mem_ptr, sm_kv, sm_h, sm_m, sm_d, g_ptr,
        o_ptr,
        T, C, P, W, HEADS, D, M, norm_scale, sm_scale, eps, rms_scale, rms_eps,
        MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_M: tl.constexpr):
    """o[(clip t), head d, pixel] = softmax(q [mem_k; k]^T * scale) [mem_v; v] for one (clip, pixel, head).
    MP: q, k, v (and the memory) pixel-normed, weights rows row0 (+ row_k0, row_v0) of one qkv matrix.
    Non-MP (x-transformers): separate wq/wk/wv, optional RMSNorm pre-norm (HAS_G: the rows are divided by their
    norm over c times sqrt(c), g folded into the weights), scores rounded to the input dtype as the reference's
    ``sim``, softmax in fp32. Grid: (clip, pixel, head) flattened on axis 0."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % HEADS
    rest = pid // HEADS
    p = rest % P
    clip = rest // P
    t = tl.arange(0, BLOCK_T)
    t_mask = t < T
    n = clip * T + t                                         # frame rows of this clip (int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    pix = _pixel_offsets(p, W, ss_h, ss_w)
    dt = s_ptr.dtype.element_ty
    hd = HEADS * D
    q = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, wq_ptr, swq_o, swq_i, head * D, d, d_mask, C,
                   BLOCK_T, BLOCK_D, BLOCK_CK, PREC, g_ptr, HAS_G)
    k = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, wk_ptr, swk_o, swk_i, row_k0 + head * D, d, d_mask, C,
                   BLOCK_T, BLOCK_D, BLOCK_CK, PREC, g_ptr, HAS_G)
    v = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, wv_ptr, swv_o, swv_i, row_v0 + head * D, d, d_mask, C,
                   BLOCK_T, BLOCK_D, BLOCK_CK, PREC, g_ptr, HAS_G)
    if HAS_G:
        inv = rms_scale / tl.maximum(_row_norm(s_ptr, ss_n, ss_c, pix, n, t_mask, C, BLOCK_T, BLOCK_CK), rms_eps)
        q, k, v = q * inv[:, None], k * inv[:, None], v * inv[:, None]
    # the reference's linear outputs are in the input dtype: round there before the norm / the scores
    q, k, v = q.to(dt).to(tl.float32), k.to(dt).to(tl.float32), v.to(dt).to(tl.float32)
    if MP:
        q = _pixel_norm_rows(q, eps, norm_scale)
        k = _pixel_norm_rows(k, eps, norm_scale)
        v = _pixel_norm_rows(v, eps, norm_scale)
    qd = q.to(dt)
    scores = tl.dot(qd, tl.trans(k.to(dt)), input_precision=PREC)
    if not MP:
        scores = scores.to(dt).to(tl.float32)
    scores = scores * sm_scale
    if not MP:
        scores = scores.to(dt).to(tl.float32)
    scores = tl.where(t_mask[None, :], scores, float('-inf'))
    row_max = tl.max(scores, axis=1)
    if HAS_MEM:
        mi = tl.arange(0, BLOCK_M)
        mm = (mi < M)[:, None] & d_mask[None, :]
        mem_off = head * sm_h + mi.to(tl.int64)[:, None] * sm_m + d.to(tl.int64)[None, :] * sm_d
        mk = _pixel_norm_rows(tl.load(mem_ptr + mem_off, mask=mm, other=0.).to(tl.float32), eps, norm_scale)
        mv = _pixel_norm_rows(tl.load(mem_ptr + sm_kv + mem_off, mask=mm, other=0.).to(tl.float32), eps,
                              norm_scale)
        mscores = tl.dot(qd, tl.trans(mk.to(dt)), input_precision=PREC) * sm_scale
        mscores = tl.where((mi < M)[None, :], mscores, float('-inf'))
        row_max = tl.maximum(row_max, tl.max(mscores, axis=1))
    pr = tl.exp(scores - row_max[:, None])
    denom = tl.sum(pr, axis=1)
    if MP:
        o = tl.dot(pr.to(dt), v.to(dt), input_precision=PREC)
        if HAS_MEM:
            pm = tl.exp(mscores - row_max[:, None])
            denom += tl.sum(pm, axis=1)
            o += tl.dot(pm.to(dt), mv.to(dt), input_precision=PREC)
        o = o / denom[:, None]
    else:       # x-transformers: the fp32 softmax is cast to the input dtype before attn @ v
        o = tl.dot((pr / denom[:, None]).to(dt), v.to(dt), input_precision=PREC)
    # o as a contiguous (b t) (h d) H W frames tensor
    o_off = n[:, None] * (hd * P) + (head * D + d).to(tl.int64)[None, :] * P + p
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=t_mask[:, None] & d_mask[None, :])


@triton.autotune(configs=_LINEAR_CONFIGS, key=['CI', 'CO'])
@triton.jit
def linear_mp_add_kernel(
        x_ptr, sx_n, sx_c, sx_h, sx_w,
        w_ptr, sw_o, sw_i,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, gain_ptr, bias_ptr, c_out, c_res,
        N, CI, CO, P, W,
        HAS_GAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PREC: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n, co, p] = c_out * (gain * sum_ci W[co, ci] x[n, ci, p] + bias[co]) + c_res * r[n, co, p]
    (mp_add's two weights folded in; no r without HAS_RES), frames layout on every side, out contiguous.
    Grid: (frame, pixel tile, co tile) flattened."""
    pid = tl.program_id(0).to(tl.int64)
    n_co = tl.cdiv(CO, BLOCK_CO)
    n_pt = tl.cdiv(P, BLOCK_P)
    cot = pid % n_co
    pt = (pid // n_co) % n_pt
    n = pid // (n_co * n_pt)
    co = cot * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < CO
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    x_pix = _pixel_offsets(p, W, sx_h, sx_w)
    acc = tl.zeros([BLOCK_CO, BLOCK_P], tl.float32)
    for c0 in range(0, CI, BLOCK_CI):
        ci = c0 + tl.arange(0, BLOCK_CI)
        ci_mask = ci < CI
        xs = tl.load(x_ptr + n * sx_n + ci.to(tl.int64)[:, None] * sx_c + x_pix[None, :],
                     mask=ci_mask[:, None] & p_mask[None, :], other=0.)
        w = tl.load(w_ptr + co.to(tl.int64)[:, None] * sw_o + ci.to(tl.int64)[None, :] * sw_i,
                    mask=co_mask[:, None] & ci_mask[None, :], other=0.)
        acc += tl.dot(w.to(xs.dtype), xs, input_precision=PREC)
    # the reference rounds the projection (and its gain product) to the input dtype before the residual add
    y = (acc.to(out_ptr.dtype.element_ty).to(tl.float32))
    if HAS_GAIN:
        y = (y * tl.load(gain_ptr).to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    mask = co_mask[:, None] & p_mask[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + co, mask=co_mask, other=0.).to(tl.float32)[:, None]
    out = y * c_out
    if HAS_RES:
        r = tl.load(r_ptr + n * sr_n + co.to(tl.int64)[:, None] * sr_c + _pixel_offsets(p, W, sr_h, sr_w)[None, :],
                    mask=mask, other=0.).to(tl.float32)
        out += r * c_res
    tl.store(out_ptr + n * (CO * P) + co.to(tl.int64)[:, None] * P + p[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_norm_bwd(raw, dy, eps, scale):
    """Grad of y = raw / max(|raw|, eps) * scale, row-wise: scale / |raw| * (dy - u (u . dy)) with u = raw / |raw|,
    and scale / eps * dy where the norm is clamped."""
    nrm = tl.sqrt(tl.sum(raw * raw, axis=1))
    den = tl.maximum(nrm, eps)
    u = raw / den[:, None]
    proj = tl.sum(u * dy, axis=1)
    dx = tl.where((nrm > eps)[:, None], dy - u * proj[:, None], dy)
    return dx * (scale / den)[:, None]


@triton.jit
def mp_attn_core_bwd_kernel(
        s_ptr, ss_n, ss_c, ss_h, ss_w,
        w_ptr, sw_o, sw_i,
        mem_ptr, sm_kv, sm_h, sm_m, sm_d,
        do_ptr, dqkv_ptr, dmem_ptr,
        T, C, P, W, HEADS, D, M, norm_scale, sm_scale, eps, N_SLOTS,
        HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward of mp_attn_core_kernel for one (clip, pixel, head): q, k, v and the probabilities are recomputed
    (the [T, m + T] score block never goes to memory), do (contiguous (b t) (h d) H W) comes in, and out go
    dqkv (contiguous (b t) (3 h d) H W, grads of the raw projections, through the pixel norm) and the grads of the
    normalised memory keys/values (fp32 atomics into dmem (N_SLOTS, 2, h, m, d): programs spread over N_SLOTS
    copies so they do not all contend for the same m x d addresses; the host sums the slots and applies the
    pixel-norm backward, an m x d op). Grid: (clip, pixel, head) flattened on axis 0."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % HEADS
    rest = pid // HEADS
    p = rest % P
    clip = rest // P
    t = tl.arange(0, BLOCK_T)
    t_mask = t < T
    n = clip * T + t
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    td_mask = t_mask[:, None] & d_mask[None, :]
    pix = _pixel_offsets(p, W, ss_h, ss_w)
    dt = s_ptr.dtype.element_ty
    hd = HEADS * D
    q_raw = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, w_ptr, sw_o, sw_i, head * D, d, d_mask, C,
                       BLOCK_T, BLOCK_D, BLOCK_CK, PREC).to(dt).to(tl.float32)
    k_raw = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, w_ptr, sw_o, sw_i, hd + head * D, d, d_mask, C,
                       BLOCK_T, BLOCK_D, BLOCK_CK, PREC).to(dt).to(tl.float32)
    v_raw = _head_proj(s_ptr, ss_n, ss_c, pix, n, t_mask, w_ptr, sw_o, sw_i, 2 * hd + head * D, d, d_mask, C,
                       BLOCK_T, BLOCK_D, BLOCK_CK, PREC).to(dt).to(tl.float32)
    q = _pixel_norm_rows(q_raw, eps, norm_scale)
    k = _pixel_norm_rows(k_raw, eps, norm_scale)
    v = _pixel_norm_rows(v_raw, eps, norm_scale)
    qd = q.to(dt)
    do_off = n[:, None] * (hd * P) + (head * D + d).to(tl.int64)[None, :] * P + p
    do = tl.load(do_ptr + do_off, mask=td_mask, other=0.).to(tl.float32)
    dod = do.to(dt)
    scores = tl.dot(qd, tl.trans(k.to(dt)), input_precision=PREC) * sm_scale
    scores = tl.where(t_mask[None, :], scores, float('-inf'))
    row_max = tl.max(scores, axis=1)
    if HAS_MEM:
        mi = tl.arange(0, BLOCK_M)
        mm = (mi < M)[:, None] & d_mask[None, :]
        mem_off = head * sm_h + mi.to(tl.int64)[:, None] * sm_m + d.to(tl.int64)[None, :] * sm_d
        mk = _pixel_norm_rows(tl.load(mem_ptr + mem_off, mask=mm, other=0.).to(tl.float32), eps, norm_scale)
        mv = _pixel_norm_rows(tl.load(mem_ptr + sm_kv + mem_off, mask=mm, other=0.).to(tl.float32), eps,
                              norm_scale)
        mscores = tl.dot(qd, tl.trans(mk.to(dt)), input_precision=PREC) * sm_scale
        mscores = tl.where((mi < M)[None, :], mscores, float('-inf'))
        row_max = tl.maximum(row_max, tl.max(mscores, axis=1))
    pr = tl.exp(scores - row_max[:, None])
    denom = tl.sum(pr, axis=1)
    if HAS_MEM:
        pm = tl.exp(mscores - row_max[:, None])
        denom += tl.sum(pm, axis=1)
        pm = pm / denom[:, None]
    pr = pr / denom[:, None]
    dp = tl.dot(dod, tl.trans(v.to(dt)), input_precision=PREC)
    delta = tl.sum(pr * dp, axis=1)
    if HAS_MEM:
        dpm = tl.dot(dod, tl.trans(mv.to(dt)), input_precision=PREC)
        delta += tl.sum(pm * dpm, axis=1)
    ds = pr * (dp - delta[:, None]) * sm_scale
    dq = tl.dot(ds.to(dt), k.to(dt), input_precision=PREC)
    dk = tl.dot(tl.trans(ds.to(dt)), qd, input_precision=PREC)
    dv = tl.dot(tl.trans(pr.to(dt)), dod, input_precision=PREC)
    if HAS_MEM:
        dsm = pm * (dpm - delta[:, None]) * sm_scale
        dq += tl.dot(dsm.to(dt), mk.to(dt), input_precision=PREC)
        dmk = tl.dot(tl.trans(dsm.to(dt)), qd, input_precision=PREC)
        dmv = tl.dot(tl.trans(pm.to(dt)), dod, input_precision=PREC)
        own = (rest % N_SLOTS) * (2 * HEADS * M * D) + head * (M * D) + mi.to(tl.int64)[:, None] * D + d[None, :]
        tl.atomic_add(dmem_ptr + own, dmk, mask=mm)
        tl.atomic_add(dmem_ptr + HEADS * M * D + own, dmv, mask=mm)
    out_ty = dqkv_ptr.dtype.element_ty
    base = n[:, None] * (3 * hd * P) + p
    tl.store(dqkv_ptr + base + (head * D + d).to(tl.int64)[None, :] * P,
             _pixel_norm_bwd(q_raw, dq, eps, norm_scale).to(out_ty), mask=td_mask)
    tl.store(dqkv_ptr + base + (hd + head * D + d).to(tl.int64)[None, :] * P,
             _pixel_norm_bwd(k_raw, dk, eps, norm_scale).to(out_ty), mask=td_mask)
    tl.store(dqkv_ptr + base + (2 * hd + head * D + d).to(tl.int64)[None, :] * P,
             _pixel_norm_bwd(v_raw, dv, eps, norm_scale).to(out_ty), mask=td_mask)


@triton.jit
def weight_grad_kernel(
        a_ptr, sa_n, sa_c, sa_h, sa_w,
        b_ptr, sb_n, sb_c, sb_h, sb_w,
        g_ptr, N, CA, CB, P, W, rows_per_prog,
        PREC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """g[ca, cb] += sum over (frame n, pixel p) of a[n, ca, p] * b[n, cb, p] (fp32 buffer): a GEMM whose
    reduction axis is every (frame, pixel), split-K: each program reduces ``rows_per_prog`` (frame, pixel tile)
    rows and flushes one atomic add of its tile. Grid: (split, a tile, b tile) flattened."""
    pid = tl.program_id(0)
    n_a = tl.cdiv(CA, BLOCK_A)
    n_b = tl.cdiv(CB, BLOCK_B)
    bt = pid % n_b
    at = (pid // n_b) % n_a
    split = pid // (n_a * n_b)
    ca = at * BLOCK_A + tl.arange(0, BLOCK_A)
    cb = bt * BLOCK_B + tl.arange(0, BLOCK_B)
    ca_mask = ca < CA
    cb_mask = cb < CB
    n_pt = tl.cdiv(P, BLOCK_P)
    rows = N * n_pt
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for i in range(0, rows_per_prog):
        row = split.to(tl.int64) * rows_per_prog + i
        n = row // n_pt
        p = (row % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = (p < P) & (row < rows)
        a = tl.load(a_ptr + n * sa_n + ca.to(tl.int64)[:, None] * sa_c + _pixel_offsets(p, W, sa_h, sa_w)[None, :],
                    mask=ca_mask[:, None] & p_mask[None, :], other=0.)
        # b loaded as [pixels, cb] by its pointers (no tl.trans)
        b = tl.load(b_ptr + n * sb_n + _pixel_offsets(p, W, sb_h, sb_w)[:, None] + cb.to(tl.int64)[None, :] * sb_c,
                    mask=p_mask[:, None] & cb_mask[None, :], other=0.)
        acc += tl.dot(a.to(b.dtype), b, input_precision=PREC)
    tl.atomic_add(g_ptr + ca[:, None] * CB + cb[None, :], acc, mask=ca_mask[:, None] & cb_mask[None, :])
