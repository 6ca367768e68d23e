"""Triton kernels of the temporal attention blocks (``lumiere_fast/ops/attention.py`` holds the launchers).

Two stages per layer, each reading memory in the order it is laid out (issue 14.1):

1. Projections are GEMMs over channels on the frames layout (b t) c H W, pixel-contiguous: a program owns one
   frame, a pixel tile and an output-channel tile, and reads [BLOCK_CI, BLOCK_P] input tiles whose rows are
   contiguous runs of pixels (every 32-byte sector full, 16-byte vector loads), the packed weight in the compute
   dtype. The q/k/v projection is one such GEMM over the concatenated [3 h d, c] weight (q, k and v in one pass
   over the input), and writes a *head-major* buffer

       qkv: (3 h, (b H W), t, d)       one contiguous [t, d] block per (part, head, position)

   (``_hm_offsets``; the non-MP RMSNorm pre-norm is folded in: the row's sum of squares comes from the same input
   tiles, the gain g is packed into the weight). Every store is a d-long contiguous run (d >= 16: a full sector).
2. The attention core reads those blocks whole: a program owns one head and POS = BLOCK_R // t whole positions
   (block-diagonal mask), so its q, k, v tiles are each ONE contiguous run of POS * t * d elements; clips above the
   row cap take one position per program in cap-frame blocks with an online softmax over key blocks (no t x t
   tile held whole). MP: pixel norm of q, k, v and of the head's memory keys/values in-kernel (the buffer holds
   the raw projections, which the backward needs for the norm's grad anyway). fp32 online softmax, no score tensor
   in memory. o goes out head-major as (h, (b H W), t, d), with the rows' log-sum-exp (h, (b H W) t) fp32.
   The output projection (+ residual) is the same GEMM kernel reading o head-major, proj_out (* gain, + bias,
   + outer residual) that kernel on frames.

The backward reads what the forward wrote (qkv, o, lse) in the same layout: the core backward per (tile, head)
writes dqkv head-major; W^T products are the GEMM kernel reading it head-major; weight grads are
``_attention_weight_grad_kernel`` (per-program fp32 partials over row chunks, summed on the host: no atomics).

Kernels (grid: everything on axis 0, decoded in the kernel; no axis bounded by 65,535 carries the batch):
  _attention_linear_kernel          out = c_out * (gain * W @ in (+ bias)) + c_res * res per (frame, pixel tile,
                                    out-channel tile); input and output each frames (strided) or head-major;
                                    optional RMSNorm row scale (the q/k/v GEMM of the pre-norm block).
  _attention_core_kernel            the forward core (above).
  _attention_core_backward_kernel   its backward when a position's t frames fit one tile: probabilities
                                    recomputed from q and k, dq, dk, dv (through the pixel norm for MP; times the
                                    RMSNorm row scale for non-MP); memory grads as one fp32 partial per program.
  _attention_core_backward_long_kernel  above the row cap, flash-attention-2 style from the saved lse: a dk/dv
                                    launch and a dq + memory-grad launch; no atomics.
  _attention_weight_grad_kernel     fp32 partials of sum over frames and pixels of a (x) b (either side head-major).
  _attention_rms_norm_backward_kernel, _attention_channel_sum_kernel  the pre-norm's input grad, per-channel sums.

Why the core is not fused with the projections: the output projection sums over all heads and the residual
needs all c channels of a position's t rows; the head-major round trip (3 h d + h d values per row, written once
in contiguous runs) costs less than re-reading the strided [rows, c] tile per head for q, k and v as a fused core
must (3 h times per layer).

Tiles are >= 16 on every dot axis (tl.dot's minimum); time, channel, head-dim, memory and position tails are
masked. Accumulation and softmax are fp32; fp16/bf16 operands go to tl.dot in the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grid import INTERPRET, configs, pixel_offsets, unravel3

_LINEAR_CONFIGS = configs([triton.Config(dict(BLOCK_CO=64, BLOCK_P=64), num_warps=4),
                           triton.Config(dict(BLOCK_CO=64, BLOCK_P=128), num_warps=8),
                           triton.Config(dict(BLOCK_CO=128, BLOCK_P=64), num_warps=8),
                           triton.Config(dict(BLOCK_CO=128, BLOCK_P=128), num_warps=8),
                           triton.Config(dict(BLOCK_CO=32, BLOCK_P=64), num_warps=4)],
                          [triton.Config(dict(BLOCK_CO=16, BLOCK_P=16), num_warps=4)])
# _attention_rms_norm_backward_kernel's and _attention_channel_sum_kernel's (BLOCK_C, BLOCK_P)
CHAN_BLOCKS = (16, 16) if INTERPRET else (64, 64)
# _attention_weight_grad_kernel's (BLOCK_A, BLOCK_B, BLOCK_P): 64 x 64 outputs, a 64-row reduction step
WGRAD_BLOCKS = (16, 16, 16) if INTERPRET else (64, 64, 64)
# Attention row tiles (the launcher picks BLOCK_R from t): at least ATTN_ROWS_MIN rows, so short clips pack
# several positions into one tile (64 on a GPU: a tensor-core-sized M; t = 8 packs 8 positions, t = 16 four);
# positions longer than ATTN_ROWS_MAX frames go through the forward's key-block loop in ATTN_ROWS_MAX-row blocks.
ATTN_ROWS_MIN = 16 if INTERPRET else 64
ATTN_ROWS_MAX = 64
# The whole-tile backward holds [rows, rows] scores and some eight [rows, d] tiles: at 64 x 64 ptxas (sm_90,
# bf16, 8 warps) spills ~1.8 KB a thread, so positions of T <= 32 frames pack into 32-row tiles there
ATTN_BWD_ROWS_MIN = 16 if INTERPRET else 32

# -inf stand-in for running maxima: a row whose keys are all masked (a tail row of a tile) keeps exp() finite
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _hm_offsets(n, c, p, N, P, T, D):
    """[len(c), len(p)] int64 offsets of frame n (scalar), channels c, pixels p in a head-major buffer
    (c // D, (b P), T, D) of N = b T frames: channel c = (part, head) * D + e, frame n = clip * T + t, position
    clip * P + p. Along c a head's D channels are contiguous; pixels are T * D apart."""
    n = n.to(tl.int64)
    c = c.to(tl.int64)
    frame = (n // T) * P * T * D + (n % T) * D
    return (c // D)[:, None] * N * P * D + (c % D)[:, None] + frame + p.to(tl.int64)[None, :] * T * D


@triton.jit
def _frame_offsets(n, c, p, s_n, s_c, s_h, s_w, N, P, W, T, D, HM: tl.constexpr):
    """[len(c), len(p)] offsets of frame n, channels c, pixels p: a strided (b t) c H W tensor, or head-major."""
    if HM:
        return _hm_offsets(n, c, p, N, P, T, D)
    return n.to(tl.int64) * s_n + c.to(tl.int64)[:, None] * s_c + pixel_offsets(p, W, s_h, s_w)[None, :]


@triton.jit
def _tile_rows(grp, qb, T, SPAN, POS, n_pos, BLOCK_R: tl.constexpr):
    """Rows of tile ``grp`` (time block ``qb``) as indices into the head-major ((b H W) T) rows, the local
    position lp and the validity mask. A tile holds POS positions of SPAN frames; a full tile's rows are
    consecutive, so its [BLOCK_R, D] block is one contiguous run."""
    r = tl.arange(0, BLOCK_R)
    lp = r // SPAN
    t = qb * SPAN + r % SPAN
    pos = grp.to(tl.int64) * POS + lp
    valid = (lp < POS) & (t < T) & (pos < n_pos)
    return pos * T + t, lp, valid


@triton.jit
def _hm_block(ptr, slab, rows, valid, d, d_mask, NR, D):
    """Pointers and mask of rows ``rows`` of head slab ``slab`` ((part, head) index) of a (slabs, NR, D) buffer."""
    off = (slab.to(tl.int64) * NR + rows)[:, None] * D + d[None, :]
    return ptr + off, valid[:, None] & d_mask[None, :]


@triton.jit
def _load_rows(ptr, slab, rows, valid, d, d_mask, NR, D):
    """[BLOCK_R, BLOCK_D] fp32 block of a head-major buffer (zeros where masked)."""
    ptrs, mask = _hm_block(ptr, slab, rows, valid, d, d_mask, NR, D)
    return tl.load(ptrs, mask=mask, other=0.).to(tl.float32)


@triton.jit
def _store_rows(ptr, slab, rows, valid, d, d_mask, NR, D, val):
    ptrs, mask = _hm_block(ptr, slab, rows, valid, d, d_mask, NR, D)
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_norm_rows(v, eps, scale):
    """F.normalize over the last axis (eps clamp of the norm) times sqrt(d); zero (masked) rows stay zero.
    Round-to-nearest sqrt and division, as torch's F.normalize (a GPU's tl.sqrt and `/` are approximations), for
    every norm in this file: a row norm is then the reference's to the last bit."""
    nrm = tl.sqrt_rn(tl.sum(v * v, axis=1))
    return tl.div_rn(v, tl.maximum(nrm, eps)[:, None]) * scale


@triton.jit
def _pixel_norm_bwd(raw, dy, eps, scale):
    """Grad of y = raw / max(|raw|, eps) * scale, row-wise: scale / |raw| * (dy - u (u . dy)) with u = raw / |raw|,
    and scale / eps * dy where the norm is clamped."""
    nrm = tl.sqrt_rn(tl.sum(raw * raw, axis=1))
    den = tl.maximum(nrm, eps)
    u = tl.div_rn(raw, den[:, None])
    proj = tl.sum(u * dy, axis=1)
    dx = tl.where((nrm > eps)[:, None], dy - u * proj[:, None], dy)
    return dx * tl.div_rn(scale, den)[:, None]


@triton.jit
def _qkv_rows(qkv_ptr, part, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP: tl.constexpr):
    """(raw, normed) [BLOCK_R, BLOCK_D] of one head's q, k or v (part 0, 1, 2) on the tile's rows: raw as the
    projection GEMM stored it (the reference's linear output in the input dtype), normed its MP pixel norm."""
    raw = _load_rows(qkv_ptr, part * HEADS + head, rows, valid, d, d_mask, NR, D)
    if MP:
        return raw, _pixel_norm_rows(raw, eps, norm_scale)
    return raw, raw


@triton.jit
def _head_program(HEADS, D, M, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The backward kernels' program -> (head, chunk of work items) with the head fastest, plus the head-dim
    lanes and the memory-row mask: (head, chunk, d, d_mask, mi, mem_mask [BLOCK_M, BLOCK_D])."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    mi = tl.arange(0, BLOCK_M)
    return pid % HEADS, pid // HEADS, d, d_mask, mi, (mi < M)[:, None] & d_mask[None, :]


@triton.jit
def _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M: tl.constexpr):
    """The head's pixel-normed memory keys and values, [BLOCK_M, BLOCK_D] each (rows past M are zero)."""
    mi = tl.arange(0, BLOCK_M)
    mm = (mi < M)[:, None] & d_mask[None, :]
    off = head * sm_h + mi.to(tl.int64)[:, None] * sm_m + d.to(tl.int64)[None, :] * sm_d
    mk = _pixel_norm_rows(tl.load(mem_ptr + off, mask=mm, other=0.).to(tl.float32), eps, norm_scale)
    mv = _pixel_norm_rows(tl.load(mem_ptr + sm_kv + off, mask=mm, other=0.).to(tl.float32), eps, norm_scale)
    return mk, mv


@triton.jit
def _scores(qd, k, sm_scale, MP: tl.constexpr, PREC: tl.constexpr):
    """q k^T * scale in fp32; non-MP rounds as the reference's ``sim`` (input dtype, before and after scaling)."""
    dt = qd.dtype
    sc = tl.dot(qd, tl.trans(k.to(dt)), input_precision=PREC)
    if not MP:
        sc = sc.to(dt).to(tl.float32)
    sc = sc * sm_scale
    if not MP:
        sc = sc.to(dt).to(tl.float32)
    return sc


@triton.jit
def _attention_core_kernel(
        qkv_ptr, mem_ptr, sm_kv, sm_h, sm_m, sm_d, o_ptr, lse_ptr,
        T, HEADS, D, M, n_pos, SPAN, POS, QB, norm_scale, sm_scale, eps,
        MP: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr, WRITE_LSE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """o[head, rows] = softmax(q [mem_k; k]^T * scale) [mem_v; v] for one (row tile, time block, head), q, k, v
    read whole from the head-major qkv buffer (3 h, (b H W) T, d). MP: q, k, v and the memory pixel-normed.
    Non-MP (x-transformers): no memory, scores rounded to the input dtype as the reference's ``sim``. Online
    softmax in fp32 over the memory block then QB key blocks (one when the whole position fits the tile).
    WRITE_LSE: also the rows' log-sum-exp (h, (b H W) T) fp32, which the backward reads.
    Grid: (tile, time block, head) flattened on axis 0, head fastest."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % HEADS
    rest = pid // HEADS
    qb = rest % QB
    grp = rest // QB
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dt = o_ptr.dtype.element_ty
    NR = n_pos * T
    rows, lp, valid = _tile_rows(grp, qb, T, SPAN, POS, n_pos, BLOCK_R)
    _, q = _qkv_rows(qkv_ptr, 0, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
    qd = q.to(dt)
    m_i = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if HAS_MEM:
        mk, mv = _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M)
        ms = tl.dot(qd, tl.trans(mk.to(dt)), input_precision=PREC) * sm_scale
        ms = tl.where((tl.arange(0, BLOCK_M) < M)[None, :], ms, float('-inf'))
        m_i = tl.maximum(m_i, tl.max(ms, axis=1))
        pm = tl.exp(ms - m_i[:, None])
        l_i = tl.sum(pm, axis=1)
        acc = tl.dot(pm.to(dt), mv.to(dt), input_precision=PREC)
    for kb in range(0, QB):
        rows_k, lpk, valid_k = _tile_rows(grp, kb, T, SPAN, POS, n_pos, BLOCK_R)
        _, k = _qkv_rows(qkv_ptr, 1, head, HEADS, rows_k, valid_k, d, d_mask, NR, D, eps, norm_scale, MP)
        _, v = _qkv_rows(qkv_ptr, 2, head, HEADS, rows_k, valid_k, d, d_mask, NR, D, eps, norm_scale, MP)
        sc = _scores(qd, k, sm_scale, MP, PREC)
        sc = tl.where((lp[:, None] == lpk[None, :]) & valid_k[None, :], sc, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(dt), v.to(dt), input_precision=PREC)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.)
    _store_rows(o_ptr, head, rows, valid, d, d_mask, NR, D, acc / l_i[:, None])
    if WRITE_LSE:
        tl.store(lse_ptr + head * NR + rows, m_i + tl.log(l_i), mask=valid)


@triton.autotune(configs=_LINEAR_CONFIGS, key=['CI', 'CO', 'P'])
@triton.jit
def _attention_linear_kernel(
        x_ptr, sx_n, sx_c, sx_h, sx_w,
        w_ptr, sw_o, sw_i,
        r_ptr, sr_n, sr_c, sr_h, sr_w,
        out_ptr, gain_ptr, bias_ptr, inv_ptr, c_out, c_res, rms_scale, rms_eps,
        N, CI, CO, P, W, T, D,
        HAS_GAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RMS: tl.constexpr,
        X_HM: tl.constexpr, OUT_HM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n, co, p] = c_out * (gain * sum_ci W[co, ci] x[n, ci, p] (* inv[n, p]) + bias[co]) + c_res * r[n, co, p]
    (mp_add's two weights folded in; no r without HAS_RES). x: a strided frames tensor, or head-major (X_HM: the
    core's o, the backward's dqkv); out: contiguous frames, or head-major (OUT_HM: the q/k/v projection, the
    backward's do). HAS_RMS (the pre-norm block's q/k/v GEMM): inv = rms_scale / max(|x[n, :, p]|, rms_eps) from
    the same input tiles, the RMSNorm's row scale (g is packed into W), stored by the first channel tile in row
    order ((b H W) T) for the backward. Grid: (out-channel tile, pixel tile, frame) flattened, channel tile fastest
    (the programs sharing an input tile run together)."""
    pid = tl.program_id(0).to(tl.int64)
    cot, pt, n = unravel3(pid, tl.cdiv(CO, BLOCK_CO), tl.cdiv(P, BLOCK_P))
    co = cot * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < CO
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    acc = tl.zeros([BLOCK_CO, BLOCK_P], tl.float32)
    ss = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, CI, BLOCK_CI):
        ci = c0 + tl.arange(0, BLOCK_CI)
        ci_mask = ci < CI
        xs = tl.load(x_ptr + _frame_offsets(n, ci, p, sx_n, sx_c, sx_h, sx_w, N, P, W, T, D, X_HM),
                     mask=ci_mask[:, None] & p_mask[None, :], other=0.)
        w = tl.load(w_ptr + co.to(tl.int64)[:, None] * sw_o + ci.to(tl.int64)[None, :] * sw_i,
                    mask=co_mask[:, None] & ci_mask[None, :], other=0.)
        acc += tl.dot(w.to(xs.dtype), xs, input_precision=PREC)
        if HAS_RMS:
            xf = xs.to(tl.float32)
            ss += tl.sum(xf * xf, axis=0)
    if HAS_RMS:
        inv = tl.div_rn(rms_scale, tl.maximum(tl.sqrt_rn(ss), rms_eps))
        acc = acc * inv[None, :]
        if cot == 0:
            tl.store(inv_ptr + ((n // T) * P + p) * T + n % T, inv, mask=p_mask)
    # the reference rounds the projection (and its gain product) to the input dtype before the residual add
    y = (acc.to(out_ptr.dtype.element_ty).to(tl.float32))
    if HAS_GAIN:
        y = (y * tl.load(gain_ptr).to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    mask = co_mask[:, None] & p_mask[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + co, mask=co_mask, other=0.).to(tl.float32)[:, None]
    out = y * c_out
    if HAS_RES:
        r = tl.load(r_ptr + _frame_offsets(n, co, p, sr_n, sr_c, sr_h, sr_w, N, P, W, T, D, False),
                    mask=mask, other=0.).to(tl.float32)
        out += r * c_res
    if OUT_HM:
        out_off = _hm_offsets(n, co, p, N, P, T, D)
    else:
        out_off = n * (CO * P) + co.to(tl.int64)[:, None] * P + p[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_weight_grad_kernel(
        a_ptr, sa_n, sa_c, sa_h, sa_w, b_ptr, sb_n, sb_c, sb_h, sb_w, part_ptr,
        N, CA, CB, P, W, T, D, rows_per_prog,
        A_HM: tl.constexpr, B_HM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """part[split, ca, cb] = sum over this program's rows_per_prog (frame, pixel tile) rows of a[n, ca, p] b[n, cb, p]
    in fp32 (a 1x1 projection's weight grad; a or b head-major with A_HM / B_HM). Each program owns its partial:
    the host sums the splits, so the result does not depend on scheduling (deterministic, no atomics).
    Grid: (b tile, a tile, split) flattened, b tile fastest."""
    pid = tl.program_id(0).to(tl.int64)
    bt, at, split = unravel3(pid, tl.cdiv(CB, BLOCK_B), tl.cdiv(CA, BLOCK_A))
    ca = at * BLOCK_A + tl.arange(0, BLOCK_A)
    cb = bt * BLOCK_B + tl.arange(0, BLOCK_B)
    n_pt = tl.cdiv(P, BLOCK_P)
    rows = N * n_pt
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for i in range(0, rows_per_prog):
        row = split * rows_per_prog + i
        n = row // n_pt
        p = (row % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = (p < P) & (row < rows)
        a = tl.load(a_ptr + _frame_offsets(n, ca, p, sa_n, sa_c, sa_h, sa_w, N, P, W, T, D, A_HM),
                    mask=(ca < CA)[:, None] & p_mask[None, :], other=0.)
        b = tl.load(b_ptr + _frame_offsets(n, cb, p, sb_n, sb_c, sb_h, sb_w, N, P, W, T, D, B_HM),
                    mask=(cb < CB)[:, None] & p_mask[None, :], other=0.)
        acc += tl.dot(a, tl.trans(b.to(a.dtype)), input_precision=PREC)
    tl.store(part_ptr + split * CA * CB + ca.to(tl.int64)[:, None] * CB + cb[None, :], acc,
             mask=(ca < CA)[:, None] & (cb < CB)[None, :])


@triton.jit
def _attention_core_backward_kernel(
        qkv_ptr, mem_ptr, sm_kv, sm_h, sm_m, sm_d, inv_ptr, do_ptr, dqkv_ptr, dmem_ptr,
        T, HEADS, D, M, n_pos, POS, GROUPS, norm_scale, sm_scale, eps,
        MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward of _attention_core_kernel when a position's T frames fit one tile (SPAN = T, one key block). Per
    tile: raw q, k, v read whole from the saved head-major buffer, the probabilities recomputed (the score block
    never goes to memory), do read and dqkv written head-major ((h, rows, d) and (3 h, rows, d)): MP, the grads of
    the raw projections through the pixel norm; non-MP, times the RMSNorm row scale inv (HAS_G; what the weight
    and pre-norm grads need, see the launcher). A program walks GROUPS consecutive tiles of one head and writes
    its own partial of the normalised memory keys'/values' grads into dmem (programs, 2, h, m, d), fp32, no
    atomics; the host sums them. Grid: (tile chunk, head) flattened on axis 0."""
    head, chunk, d, d_mask, mi, mm = _head_program(HEADS, D, M, BLOCK_D, BLOCK_M)
    dt = qkv_ptr.dtype.element_ty
    NR = n_pos * T
    if HAS_MEM:
        mk, mv = _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M)
    dmk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dmv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for gi in range(0, GROUPS):
        rows, lp, valid = _tile_rows(chunk * GROUPS + gi, 0, T, T, POS, n_pos, BLOCK_R)
        q_raw, q = _qkv_rows(qkv_ptr, 0, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
        k_raw, k = _qkv_rows(qkv_ptr, 1, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
        v_raw, v = _qkv_rows(qkv_ptr, 2, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
        qd = q.to(dt)
        dod = _load_rows(do_ptr, head, rows, valid, d, d_mask, NR, D).to(dt)
        sc = _scores(qd, k, sm_scale, MP, PREC)
        sc = tl.where((lp[:, None] == lp[None, :]) & valid[None, :], sc, float('-inf'))
        row_max = tl.maximum(tl.max(sc, axis=1), NEG_BIG)
        if HAS_MEM:
            ms = tl.dot(qd, tl.trans(mk.to(dt)), input_precision=PREC) * sm_scale
            ms = tl.where((mi < M)[None, :], ms, float('-inf'))
            row_max = tl.maximum(row_max, tl.max(ms, axis=1))
        pr = tl.exp(sc - row_max[:, None])
        denom = tl.sum(pr, axis=1)
        if HAS_MEM:
            pm = tl.exp(ms - row_max[:, None])
            denom += tl.sum(pm, axis=1)
        denom = tl.where(denom > 0, denom, 1.)
        pr = pr / denom[:, None]
        dp = tl.dot(dod, tl.trans(v.to(dt)), input_precision=PREC)
        delta = tl.sum(pr * dp, axis=1)
        if HAS_MEM:
            pm = pm / denom[:, None]
            dpm = tl.dot(dod, tl.trans(mv.to(dt)), input_precision=PREC)
            delta += tl.sum(pm * dpm, axis=1)
        ds = pr * (dp - delta[:, None]) * sm_scale
        dq = tl.dot(ds.to(dt), k.to(dt), input_precision=PREC)
        dk = tl.dot(tl.trans(ds.to(dt)), qd, input_precision=PREC)
        dv = tl.dot(tl.trans(pr.to(dt)), dod, input_precision=PREC)
        if HAS_MEM:
            dsm = pm * (dpm - delta[:, None]) * sm_scale
            dq += tl.dot(dsm.to(dt), mk.to(dt), input_precision=PREC)
            dmk += tl.dot(tl.trans(dsm.to(dt)), qd, input_precision=PREC)
            dmv += tl.dot(tl.trans(pm.to(dt)), dod, input_precision=PREC)
        _store_dqkv(dqkv_ptr, inv_ptr, 0, head, HEADS, rows, valid, d, d_mask, NR, D, q_raw, dq, eps, norm_scale,
                    MP, HAS_G)
        _store_dqkv(dqkv_ptr, inv_ptr, 1, head, HEADS, rows, valid, d, d_mask, NR, D, k_raw, dk, eps, norm_scale,
                    MP, HAS_G)
        _store_dqkv(dqkv_ptr, inv_ptr, 2, head, HEADS, rows, valid, d, d_mask, NR, D, v_raw, dv, eps, norm_scale,
                    MP, HAS_G)
    if HAS_MEM:
        _store_mem_partial(dmem_ptr, chunk, head, HEADS, M, D, mi, d, mm, dmk, dmv)


@triton.jit
def _store_mem_partial(dmem_ptr, chunk, head, HEADS, M, D, mi, d, mm, dmk, dmv):
    """This program's partial of the memory keys'/values' grads: dmem[chunk, 0 | 1, head] (fp32)."""
    own = chunk * (2 * HEADS * M * D) + head * (M * D) + mi.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(dmem_ptr + own, dmk, mask=mm)
    tl.store(dmem_ptr + HEADS * M * D + own, dmv, mask=mm)


@triton.jit
def _row_stats(do_ptr, o_ptr, lse_ptr, head, rows, valid, d, d_mask, NR, D):
    """A tile's saved-row statistics for the long-clip backward: do (fp32), delta = rowsum(do * o) (the softmax
    backward's row term, memory keys included as o includes them) and the forward's log-sum-exp."""
    do = _load_rows(do_ptr, head, rows, valid, d, d_mask, NR, D)
    o = _load_rows(o_ptr, head, rows, valid, d, d_mask, NR, D)
    lse = tl.load(lse_ptr + head * NR + rows, mask=valid, other=0.)
    return do, tl.sum(do * o, axis=1), lse


@triton.jit
def _store_dqkv(dqkv_ptr, inv_ptr, part, head, HEADS, rows, valid, d, d_mask, NR, D, raw, dy, eps, norm_scale,
                MP: tl.constexpr, HAS_G: tl.constexpr):
    """Writes one of q, k, v's grads (part 0, 1, 2) head-major: through the pixel norm (MP), times the RMSNorm row
    scale (HAS_G)."""
    if MP:
        dy = _pixel_norm_bwd(raw, dy, eps, norm_scale)
    if HAS_G:
        dy = dy * tl.load(inv_ptr + rows, mask=valid, other=0.)[:, None]
    _store_rows(dqkv_ptr, part * HEADS + head, rows, valid, d, d_mask, NR, D, dy)


@triton.jit
def _attention_core_backward_long_kernel(
        qkv_ptr, mem_ptr, sm_kv, sm_h, sm_m, sm_d, inv_ptr, do_ptr, o_ptr, lse_ptr, dqkv_ptr, dmem_ptr,
        T, HEADS, D, M, n_pos, SPAN, QB, GROUPS, norm_scale, sm_scale, eps,
        DKV: tl.constexpr, MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward of _attention_core_kernel for clips longer than one tile (SPAN-frame blocks, one position per tile),
    flash-attention-2 style without atomics: the probabilities come back from the saved log-sum-exp, so no pass
    needs a whole T x T tile; q, k, v blocks are read whole from the saved head-major buffer. Two launches:
      DKV:  per (position, key block, head): dk and dv of the block, looping over the query blocks;
      else: per (position, query block, head) item, GROUPS items per program: dq, looping over the key blocks,
            and the memory keys'/values' grads as one fp32 partial per program (summed on the host).
    Grid: (item chunk, head) flattened on axis 0."""
    head, chunk, d, d_mask, mi, mm = _head_program(HEADS, D, M, BLOCK_D, BLOCK_M)
    dt = qkv_ptr.dtype.element_ty
    NR = n_pos * T
    if HAS_MEM:
        mk, mv = _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M)
    dmk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dmv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for gi in range(0, GROUPS):
        item = chunk * GROUPS + gi
        grp = item // QB
        blk = item % QB
        rows, lp, valid = _tile_rows(grp, blk, T, SPAN, 1, n_pos, BLOCK_R)
        if DKV:
            k_raw, k = _qkv_rows(qkv_ptr, 1, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
            v_raw, v = _qkv_rows(qkv_ptr, 2, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
            kd, vd = k.to(dt), v.to(dt)
            dk = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for qb in range(0, QB):
                rows_q, lpq, valid_q = _tile_rows(grp, qb, T, SPAN, 1, n_pos, BLOCK_R)
                q_unused, q = _qkv_rows(qkv_ptr, 0, head, HEADS, rows_q, valid_q, d, d_mask, NR, D, eps,
                                        norm_scale, MP)
                qd = q.to(dt)
                do, delta, lse = _row_stats(do_ptr, o_ptr, lse_ptr, head, rows_q, valid_q, d, d_mask, NR, D)
                sc = _scores(qd, k, sm_scale, MP, PREC)
                pr = tl.where(valid_q[:, None] & valid[None, :], tl.exp(sc - lse[:, None]), 0.)
                dod = do.to(dt)
                dv += tl.dot(tl.trans(pr.to(dt)), dod, input_precision=PREC)
                dp = tl.dot(dod, tl.trans(vd), input_precision=PREC)
                ds = pr * (dp - delta[:, None]) * sm_scale
                dk += tl.dot(tl.trans(ds.to(dt)), qd, input_precision=PREC)
            _store_dqkv(dqkv_ptr, inv_ptr, 1, head, HEADS, rows, valid, d, d_mask, NR, D, k_raw, dk, eps,
                        norm_scale, MP, HAS_G)
            _store_dqkv(dqkv_ptr, inv_ptr, 2, head, HEADS, rows, valid, d, d_mask, NR, D, v_raw, dv, eps,
                        norm_scale, MP, HAS_G)
        else:
            q_raw, q = _qkv_rows(qkv_ptr, 0, head, HEADS, rows, valid, d, d_mask, NR, D, eps, norm_scale, MP)
            qd = q.to(dt)
            do, delta, lse = _row_stats(do_ptr, o_ptr, lse_ptr, head, rows, valid, d, d_mask, NR, D)
            dod = do.to(dt)
            dq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            if HAS_MEM:
                ms = tl.dot(qd, tl.trans(mk.to(dt)), input_precision=PREC) * sm_scale
                pm = tl.where(valid[:, None] & (mi < M)[None, :], tl.exp(ms - lse[:, None]), 0.)
                dpm = tl.dot(dod, tl.trans(mv.to(dt)), input_precision=PREC)
                dsm = pm * (dpm - delta[:, None]) * sm_scale
                dq += tl.dot(dsm.to(dt), mk.to(dt), input_precision=PREC)
                dmk += tl.dot(tl.trans(dsm.to(dt)), qd, input_precision=PREC)
                dmv += tl.dot(tl.trans(pm.to(dt)), dod, input_precision=PREC)
            for kb in range(0, QB):
                rows_k, lpk, valid_k = _tile_rows(grp, kb, T, SPAN, 1, n_pos, BLOCK_R)
                k_unused, k = _qkv_rows(qkv_ptr, 1, head, HEADS, rows_k, valid_k, d, d_mask, NR, D, eps,
                                        norm_scale, MP)
                v_unused, v = _qkv_rows(qkv_ptr, 2, head, HEADS, rows_k, valid_k, d, d_mask, NR, D, eps,
                                        norm_scale, MP)
                sc = _scores(qd, k, sm_scale, MP, PREC)
                pr = tl.where(valid[:, None] & valid_k[None, :], tl.exp(sc - lse[:, None]), 0.)
                dp = tl.dot(dod, tl.trans(v.to(dt)), input_precision=PREC)
                ds = pr * (dp - delta[:, None]) * sm_scale
                dq += tl.dot(ds.to(dt), k.to(dt), input_precision=PREC)
            _store_dqkv(dqkv_ptr, inv_ptr, 0, head, HEADS, rows, valid, d, d_mask, NR, D, q_raw, dq, eps,
                        norm_scale, MP, HAS_G)
    if HAS_MEM:
        if not DKV:
            _store_mem_partial(dmem_ptr, chunk, head, HEADS, M, D, mi, d, mm, dmk, dmv)


@triton.jit
def _attention_rms_norm_backward_kernel(
        f_ptr, s_ptr, ss_n, ss_c, ss_h, ss_w, g_ptr, r_ptr, out_ptr,
        N, C, P, W, rms_eps, c_res,
        HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The RMSNorm pre-norm's input grad: with f = inv * dn (the grad of the normed rows times the row scale
    inv = sqrt(c) / max(|s|, eps), as the launcher builds it) and e = f * g,
        ds = e - s (s . e) / |s|^2   (|s| > eps),   e otherwise,   (+ c_res * r)
    per (frame, pixel tile): one pass over c for |s|^2 and s . e, one to write. f, r, out contiguous (b t) c H W;
    s strided. Grid: (frame, pixel tile) flattened."""
    pid = tl.program_id(0).to(tl.int64)
    n_pt = tl.cdiv(P, BLOCK_P)
    n = pid // n_pt
    p = (pid % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    s_pix = pixel_offsets(p, W, ss_h, ss_w)
    ss = tl.zeros([BLOCK_P], tl.float32)
    se = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & p_mask[None, :]
        s = tl.load(s_ptr + n * ss_n + c.to(tl.int64)[:, None] * ss_c + s_pix[None, :], mask=mask,
                    other=0.).to(tl.float32)
        f = tl.load(f_ptr + n * (C * P) + c.to(tl.int64)[:, None] * P + p[None, :], mask=mask, other=0.)
        g = tl.load(g_ptr + c, mask=c < C, other=0.).to(tl.float32)
        ss += tl.sum(s * s, axis=0)
        se += tl.sum(s * f.to(tl.float32) * g[:, None], axis=0)
    coef = tl.where(tl.sqrt_rn(ss) > rms_eps, tl.div_rn(se, tl.where(ss > 0, ss, 1.)), 0.)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & p_mask[None, :]
        s = tl.load(s_ptr + n * ss_n + c.to(tl.int64)[:, None] * ss_c + s_pix[None, :], mask=mask,
                    other=0.).to(tl.float32)
        out_off = n * (C * P) + c.to(tl.int64)[:, None] * P + p[None, :]
        f = tl.load(f_ptr + out_off, mask=mask, other=0.).to(tl.float32)
        g = tl.load(g_ptr + c, mask=c < C, other=0.).to(tl.float32)
        ds = f * g[:, None] - s * coef[None, :]
        if HAS_RES:
            ds += c_res * tl.load(r_ptr + out_off, mask=mask, other=0.).to(tl.float32)
        tl.store(out_ptr + out_off, ds.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_channel_sum_kernel(
        a_ptr, sa_n, sa_c, sa_h, sa_w, b_ptr, sb_n, sb_c, sb_h, sb_w, part_ptr,
        N, C, P, W, rows_per_prog,
        HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """part[split, c] = sum over this program's (frame, pixel tile) rows of a[n, c, p] (* b[n, c, p]), fp32.
    Each program owns its row of the partials (no atomics): the host sums the splits, so the result does not
    depend on scheduling. Grid: (split, channel tile) flattened."""
    pid = tl.program_id(0)
    n_ct = tl.cdiv(C, BLOCK_C)
    ct = pid % n_ct
    split = pid // n_ct
    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_pt = tl.cdiv(P, BLOCK_P)
    rows = N * n_pt
    acc = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, rows_per_prog):
        row = split.to(tl.int64) * rows_per_prog + i
        n = row // n_pt
        p = (row % n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & ((p < P) & (row < rows))[None, :]
        a = tl.load(a_ptr + n * sa_n + c.to(tl.int64)[:, None] * sa_c + pixel_offsets(p, W, sa_h, sa_w)[None, :],
                    mask=mask, other=0.).to(tl.float32)
        if HAS_B:
            a *= tl.load(b_ptr + n * sb_n + c.to(tl.int64)[:, None] * sb_c
                         + pixel_offsets(p, W, sb_h, sb_w)[None, :], mask=mask, other=0.).to(tl.float32)
        acc += tl.sum(a, axis=1)
    tl.store(part_ptr + split.to(tl.int64) * C + c, acc, mask=c_mask)
