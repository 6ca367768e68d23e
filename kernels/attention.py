"""Triton kernels of the temporal attention blocks (``lumiere_fast/ops/attention.py`` holds the launchers).

Every tensor is read in the frames layout (b t) c H W through its strides: the (b t) c H W -> (b H W) t c fold
of the reference happens in the loads, and outputs are written contiguous (b t) c H W.

Row tiles. Temporal attention has tiny sequences (T frames per pixel position) and a huge batch (clips x pixels
x heads). A program owns one head and a tile of BLOCK_R query rows; a row is (position, frame), and the tile packs
POS = BLOCK_R // T whole positions (clip, pixel) back to back (``_tile_rows``): T = 2 fills a 32-row tile with 16
positions instead of padding one position's 2 rows to tl.dot's 16. A query sees only its own position's keys
(block-diagonal mask) and the head's memory keys. For T above the launcher's row cap the tile holds one position's
frames [qb * SPAN, (qb + 1) * SPAN) and the forward loops over key blocks with an online softmax, so no T x T
tile is ever held whole.

Kernels (grid: everything on axis 0, decoded in the kernel; no axis bounded by 65,535 carries the batch):
  _attention_core_kernel
      per (row tile, head): q, k, v of the head projected from the tile's [rows, c] (tl.dot over c chunks), MP:
      pixel norm of q, k, v and of the memory keys/values; non-MP: RMSNorm pre-norm folded in (rows divided by
      their norm over c times sqrt(c), g on the weights); fp32 online softmax over memory + key blocks; writes o as
      a (b t) (h d) H W tensor.
  _attention_core_backward_kernel
      its backward for T <= the row cap (the whole position in one tile): scores and probabilities recomputed, dq,
      dk, dv written as (b t) (3 h d) H W (through the pixel norm for MP; times the RMSNorm row scale for non-MP,
      see the launcher); each program walks GROUPS tiles of one head and writes one partial of the memory
      key/value grads (no atomics; the host sums the partials: deterministic).
  _attention_core_backward_long_kernel
      the backward for T above the cap, in SPAN-frame blocks from the forward's saved log-sum-exp
      (flash-attention-2 style): a dk/dv launch (per key block, loop over query blocks) and a dq + memory-grad
      launch (per query block, loop over key blocks); no atomics.
  _attention_linear_kernel
      out = mp_add(gain * W @ in (+ bias), res) per (frame, pixel tile, out-channel tile): output projections,
      residuals (MP and plain), and the backward's W^T products.
  _attention_rms_norm_backward_kernel
      the RMSNorm pre-norm's backward per (frame, pixel tile), two passes over c.
  _attention_channel_sum_kernel
      per-program partials of sum over frames and pixels of a (* b) per channel: the RMSNorm gain's and proj_out
      bias's grads (deterministic, summed on the host).
The weight grads (sum over frames and pixels of a (x) b, split-K, one fp32 atomic flush per program tile) are
temporal_conv1d's weight-grad kernel with one tap (``kernels/temporal_conv1d.py``).

Why the layer is not one kernel: the output projection sums over all heads and the residual needs all c
channels of a position's T rows; holding [T, c] (c up to 768, T up to 128) plus the [c, h d] weight on chip in one
program does not fit, so o makes one trip through memory (h d channels, the size of one qkv third) and the
projection runs as a tiled GEMM that reads it back in the same frames layout.

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
                           triton.Config(dict(BLOCK_CO=32, BLOCK_P=64), num_warps=4)],
                          [triton.Config(dict(BLOCK_CO=16, BLOCK_P=16), num_warps=4)])
# _attention_rms_norm_backward_kernel's and _attention_channel_sum_kernel's (BLOCK_C, BLOCK_P)
CHAN_BLOCKS = (16, 16) if INTERPRET else (64, 64)
# Attention row tiles (the launcher picks BLOCK_R from T): at least ATTN_ROWS_MIN rows, so short clips pack
# several positions into one tile; positions longer than ATTN_ROWS_MAX frames go through the forward's key-block
# loop in ATTN_ROWS_MAX-row blocks. 32 rows keeps a T <= 16 tile's [rows, rows] score block and [rows, d]
# operands small; 64 is the flash-attention-style block for d <= 128 at 4 warps. Not tuned on hardware yet.
ATTN_ROWS_MIN = 16 if INTERPRET else 32
ATTN_ROWS_MAX = 64

# -inf stand-in for running maxima: a row whose keys are all masked (a tail row of a tile) keeps exp() finite
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_rows(grp, qb, T, SPAN, POS, n_pos, P, BLOCK_R: tl.constexpr):
    """Rows of tile ``grp`` (time block ``qb``): frame index n (into (b t)), pixel p, local position lp and the
    validity mask. Positions are (clip, pixel) = pos // P, pos % P; a tile holds POS positions of SPAN frames."""
    r = tl.arange(0, BLOCK_R)
    lp = r // SPAN
    t = qb * SPAN + r % SPAN
    pos = grp.to(tl.int64) * POS + lp
    valid = (lp < POS) & (t < T) & (pos < n_pos)
    n = (pos // P) * T + t
    return n, pos % P, lp, valid


@triton.jit
def _row_norm(s_ptr, row_off, ss_c, valid, C, BLOCK_R: tl.constexpr, BLOCK_CK: tl.constexpr):
    """[BLOCK_R] l2 norms over the c channels of the rows (the non-MP RMSNorm's denominator)."""
    acc = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_CK):
        ck = c0 + tl.arange(0, BLOCK_CK)
        s = tl.load(s_ptr + row_off[:, None] + ck.to(tl.int64)[None, :] * ss_c,
                    mask=valid[:, None] & (ck < C)[None, :], other=0.).to(tl.float32)
        acc += tl.sum(s * s, axis=1)
    return tl.sqrt_rn(acc)


@triton.jit
def _pixel_norm_rows(v, eps, scale):
    """F.normalize over the last axis (eps clamp of the norm) times sqrt(d); zero (masked) rows stay zero.
    Round-to-nearest sqrt and division, as torch's F.normalize (a GPU's tl.sqrt and `/` are approximations), for
    every norm in this file: a row norm is then the reference's to the last bit."""
    nrm = tl.sqrt_rn(tl.sum(v * v, axis=1))
    return tl.div_rn(v, tl.maximum(nrm, eps)[:, None]) * scale


@triton.jit
def _head_proj(s_ptr, row_off, ss_c, valid, w_ptr, sw_o, sw_i, row0, d, d_mask, C, g_ptr, HAS_G: tl.constexpr,
               PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr):
    """[BLOCK_R, BLOCK_D] = s[rows, :] @ (W[row0 + d, :] * g)^T, a loop over c chunks (fp32 accumulator);
    the RMSNorm gain g (HAS_G) scales W's columns, which equals scaling s's channels."""
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_CK):
        ck = c0 + tl.arange(0, BLOCK_CK)
        ck_mask = ck < C
        s = tl.load(s_ptr + row_off[:, None] + ck.to(tl.int64)[None, :] * ss_c,
                    mask=valid[:, None] & ck_mask[None, :], other=0.)
        w = tl.load(w_ptr + (row0 + d).to(tl.int64)[None, :] * sw_o + ck.to(tl.int64)[:, None] * sw_i,
                    mask=ck_mask[:, None] & d_mask[None, :], other=0.)
        if HAS_G:
            w = w.to(tl.float32) * tl.load(g_ptr + ck, mask=ck_mask, other=0.).to(tl.float32)[:, None]
        acc += tl.dot(s, w.to(s.dtype), input_precision=PREC)
    return acc


@triton.jit
def _qkv(s_ptr, row_off, ss_c, valid, inv, w_ptr, sw_o, sw_i, row0, d, d_mask, C, g_ptr, eps, norm_scale,
         MP: tl.constexpr, HAS_G: tl.constexpr, PREC: tl.constexpr,
         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr):
    """(raw, normed) of one head's q, k or v on the tile's rows. raw: the projection as the reference's linear
    output (RMSNorm row scale ``inv`` applied, rounded to the input dtype); normed: MP pixel norm of raw, or raw."""
    raw = _head_proj(s_ptr, row_off, ss_c, valid, w_ptr, sw_o, sw_i, row0, d, d_mask, C, g_ptr, HAS_G, PREC,
                     BLOCK_R, BLOCK_D, BLOCK_CK)
    if HAS_G:
        raw = raw * inv[:, None]
    raw = raw.to(s_ptr.dtype.element_ty).to(tl.float32)
    if MP:
        return raw, _pixel_norm_rows(raw, eps, norm_scale)
    return raw, raw


@triton.jit
def _rms_inv(s_ptr, row_off, ss_c, valid, C, rms_scale, rms_eps, HAS_G: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_CK: tl.constexpr):
    """Per-row RMSNorm scale sqrt(c) / max(|row|, eps) (ones without a pre-norm)."""
    if HAS_G:
        return tl.div_rn(rms_scale, tl.maximum(_row_norm(s_ptr, row_off, ss_c, valid, C, BLOCK_R, BLOCK_CK), rms_eps))
    return tl.full([BLOCK_R], 1.0, tl.float32)


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
        s_ptr, ss_n, ss_c, ss_h, ss_w,
        wq_ptr, swq_o, swq_i, wk_ptr, swk_o, swk_i, wv_ptr, swv_o, swv_i, row_k0, row_v0,
        mem_ptr, sm_kv, sm_h, sm_m, sm_d, g_ptr,
        o_ptr, lse_ptr,
        T, C, P, W, HEADS, D, M, n_pos, SPAN, POS, QB, norm_scale, sm_scale, eps, rms_scale, rms_eps,
        MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr, WRITE_LSE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_M: tl.constexpr):
    """o[rows, head d] = softmax(q [mem_k; k]^T * scale) [mem_v; v] for one (row tile, time block, head).
    MP: q, k, v (and the memory) pixel-normed; weight rows row0 (+ row_k0, row_v0) of one qkv matrix.
    Non-MP (x-transformers): separate wq/wk/wv, optional RMSNorm pre-norm (HAS_G), no memory, scores rounded to
    the input dtype as the reference's ``sim``. Online softmax in fp32 over the memory block then QB key blocks
    (one when the whole position fits the tile). WRITE_LSE (the long-clip backward's recompute): also the rows'
    log-sum-exp, fp32 (b t) h H W. Grid: (tile, time block, head) flattened on axis 0."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % HEADS
    rest = pid // HEADS
    qb = rest % QB
    grp = rest // QB
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dt = s_ptr.dtype.element_ty
    hd = HEADS * D
    n, p, lp, valid = _tile_rows(grp, qb, T, SPAN, POS, n_pos, P, BLOCK_R)
    row_off = n * ss_n + pixel_offsets(p, W, ss_h, ss_w)
    inv = _rms_inv(s_ptr, row_off, ss_c, valid, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
    _, q = _qkv(s_ptr, row_off, ss_c, valid, inv, wq_ptr, swq_o, swq_i, head * D, d, d_mask, C, g_ptr, eps,
                norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
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
        nk, pk, lpk, valid_k = _tile_rows(grp, kb, T, SPAN, POS, n_pos, P, BLOCK_R)
        k_off = nk * ss_n + pixel_offsets(pk, W, ss_h, ss_w)
        inv_k = _rms_inv(s_ptr, k_off, ss_c, valid_k, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
        _, k = _qkv(s_ptr, k_off, ss_c, valid_k, inv_k, wk_ptr, swk_o, swk_i, row_k0 + head * D, d, d_mask, C,
                    g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
        _, v = _qkv(s_ptr, k_off, ss_c, valid_k, inv_k, wv_ptr, swv_o, swv_i, row_v0 + head * D, d, d_mask, C,
                    g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
        sc = _scores(qd, k, sm_scale, MP, PREC)
        sc = tl.where((lp[:, None] == lpk[None, :]) & valid_k[None, :], sc, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(dt), v.to(dt), input_precision=PREC)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.)
    o = acc / l_i[:, None]
    # o as a contiguous (b t) (h d) H W frames tensor
    o_off = n[:, None] * (hd * P) + (head * D + d).to(tl.int64)[None, :] * P + p[:, None]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + (n * HEADS + head) * P + p, m_i + tl.log(l_i), mask=valid)


@triton.autotune(configs=_LINEAR_CONFIGS, key=['CI', 'CO', 'P'])
@triton.jit
def _attention_linear_kernel(
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
    cot, pt, n = unravel3(pid, tl.cdiv(CO, BLOCK_CO), tl.cdiv(P, BLOCK_P))
    co = cot * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < CO
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    x_pix = pixel_offsets(p, W, sx_h, sx_w)
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
        r = tl.load(r_ptr + n * sr_n + co.to(tl.int64)[:, None] * sr_c + pixel_offsets(p, W, sr_h, sr_w)[None, :],
                    mask=mask, other=0.).to(tl.float32)
        out += r * c_res
    tl.store(out_ptr + n * (CO * P) + co.to(tl.int64)[:, None] * P + p[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


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
def _attention_core_backward_kernel(
        s_ptr, ss_n, ss_c, ss_h, ss_w,
        wq_ptr, swq_o, swq_i, wk_ptr, swk_o, swk_i, wv_ptr, swv_o, swv_i, row_k0, row_v0,
        mem_ptr, sm_kv, sm_h, sm_m, sm_d, g_ptr,
        do_ptr, dqkv_ptr, dmem_ptr,
        T, C, P, W, HEADS, D, M, n_pos, POS, GROUPS, norm_scale, sm_scale, eps, rms_scale, rms_eps,
        MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward of _attention_core_kernel when a position's T frames fit one tile (SPAN = T, one key block). Per tile:
    q, k, v and the probabilities are recomputed (the score block never goes to memory), do (contiguous
    (b t) (h d) H W) comes in, and dqkv (contiguous (b t) (3 h d) H W) goes out: MP, the grads of the raw
    projections through the pixel norm; non-MP, the grads of q, k, v times the RMSNorm row scale (what the weight
    and pre-norm grads need, see the launcher). A program walks GROUPS consecutive tiles of one head and writes
    its own partial of the normalised memory keys'/values' grads into dmem (programs, 2, h, m, d), fp32, no
    atomics; the host sums them. Grid: (tile chunk, head) flattened on axis 0."""
    head, chunk, d, d_mask, mi, mm = _head_program(HEADS, D, M, BLOCK_D, BLOCK_M)
    dt = s_ptr.dtype.element_ty
    out_ty = dqkv_ptr.dtype.element_ty
    hd = HEADS * D
    if HAS_MEM:
        mk, mv = _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M)
    dmk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dmv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for gi in range(0, GROUPS):
        n, p, lp, valid = _tile_rows(chunk * GROUPS + gi, 0, T, T, POS, n_pos, P, BLOCK_R)
        td_mask = valid[:, None] & d_mask[None, :]
        row_off = n * ss_n + pixel_offsets(p, W, ss_h, ss_w)
        inv = _rms_inv(s_ptr, row_off, ss_c, valid, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
        q_raw, q = _qkv(s_ptr, row_off, ss_c, valid, inv, wq_ptr, swq_o, swq_i, head * D, d, d_mask, C, g_ptr,
                        eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
        k_raw, k = _qkv(s_ptr, row_off, ss_c, valid, inv, wk_ptr, swk_o, swk_i, row_k0 + head * D, d, d_mask, C,
                        g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
        v_raw, v = _qkv(s_ptr, row_off, ss_c, valid, inv, wv_ptr, swv_o, swv_i, row_v0 + head * D, d, d_mask, C,
                        g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
        qd = q.to(dt)
        o_off = n[:, None] * (hd * P) + (head * D + d).to(tl.int64)[None, :] * P + p[:, None]
        do = tl.load(do_ptr + o_off, mask=td_mask, other=0.).to(tl.float32)
        dod = do.to(dt)
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
        if MP:
            dq = _pixel_norm_bwd(q_raw, dq, eps, norm_scale)
            dk = _pixel_norm_bwd(k_raw, dk, eps, norm_scale)
            dv = _pixel_norm_bwd(v_raw, dv, eps, norm_scale)
        if HAS_G:
            dq, dk, dv = dq * inv[:, None], dk * inv[:, None], dv * inv[:, None]
        base = n[:, None] * (3 * hd * P) + p[:, None]
        tl.store(dqkv_ptr + base + (head * D + d).to(tl.int64)[None, :] * P, dq.to(out_ty), mask=td_mask)
        tl.store(dqkv_ptr + base + (hd + head * D + d).to(tl.int64)[None, :] * P, dk.to(out_ty), mask=td_mask)
        tl.store(dqkv_ptr + base + (2 * hd + head * D + d).to(tl.int64)[None, :] * P, dv.to(out_ty), mask=td_mask)
    if HAS_MEM:
        own = chunk * (2 * HEADS * M * D) + head * (M * D) + mi.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(dmem_ptr + own, dmk, mask=mm)
        tl.store(dmem_ptr + HEADS * M * D + own, dmv, mask=mm)


@triton.jit
def _row_stats(do_ptr, o_ptr, lse_ptr, n, p, valid, head, d, d_mask, HEADS, D, P):
    """A tile's saved-row statistics for the long-clip backward: do (fp32), delta = rowsum(do * o) (the softmax
    backward's row term, memory keys included as o includes them) and the forward's log-sum-exp."""
    o_off = n[:, None] * (HEADS * D * P) + (head * D + d).to(tl.int64)[None, :] * P + p[:, None]
    mask = valid[:, None] & d_mask[None, :]
    do = tl.load(do_ptr + o_off, mask=mask, other=0.).to(tl.float32)
    o = tl.load(o_ptr + o_off, mask=mask, other=0.).to(tl.float32)
    lse = tl.load(lse_ptr + (n * HEADS + head) * P + p, mask=valid, other=0.)
    return do, tl.sum(do * o, axis=1), lse


@triton.jit
def _store_dqkv(dqkv_ptr, n, p, valid, d, d_mask, part, head, HEADS, D, P, raw, dy, inv, eps, norm_scale,
                MP: tl.constexpr, HAS_G: tl.constexpr):
    """Writes one of q, k, v's grads (part 0, 1, 2) as the short backward does: through the pixel norm (MP), times
    the RMSNorm row scale (HAS_G)."""
    if MP:
        dy = _pixel_norm_bwd(raw, dy, eps, norm_scale)
    if HAS_G:
        dy = dy * inv[:, None]
    off = n[:, None] * (3 * HEADS * D * P) + (part * HEADS * D + head * D + d).to(tl.int64)[None, :] * P + p[:, None]
    tl.store(dqkv_ptr + off, dy.to(dqkv_ptr.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])


@triton.jit
def _attention_core_backward_long_kernel(
        s_ptr, ss_n, ss_c, ss_h, ss_w,
        wq_ptr, swq_o, swq_i, wk_ptr, swk_o, swk_i, wv_ptr, swv_o, swv_i, row_k0, row_v0,
        mem_ptr, sm_kv, sm_h, sm_m, sm_d, g_ptr,
        do_ptr, o_ptr, lse_ptr, dqkv_ptr, dmem_ptr,
        T, C, P, W, HEADS, D, M, n_pos, SPAN, QB, GROUPS, norm_scale, sm_scale, eps, rms_scale, rms_eps,
        DKV: tl.constexpr, MP: tl.constexpr, HAS_G: tl.constexpr, HAS_MEM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward of _attention_core_kernel for clips longer than one tile (SPAN-frame blocks, one position per tile),
    flash-attention-2 style without atomics: the probabilities come back from the saved log-sum-exp, so no pass
    needs a whole T x T tile. Two launches over the same code:
      DKV:  per (position, key block, head): dk and dv of the block, looping over the query blocks;
      else: per (position, query block, head) item, GROUPS items per program: dq, looping over the key blocks,
            and the memory keys'/values' grads as one fp32 partial per program (summed on the host).
    Grid: (item chunk, head) flattened on axis 0."""
    head, chunk, d, d_mask, mi, mm = _head_program(HEADS, D, M, BLOCK_D, BLOCK_M)
    dt = s_ptr.dtype.element_ty
    if HAS_MEM:
        mk, mv = _mem_kv(mem_ptr, sm_kv, sm_h, sm_m, sm_d, head, d, d_mask, M, eps, norm_scale, BLOCK_M)
    dmk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dmv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for gi in range(0, GROUPS):
        item = chunk * GROUPS + gi
        grp = item // QB
        blk = item % QB
        n, p, lp, valid = _tile_rows(grp, blk, T, SPAN, 1, n_pos, P, BLOCK_R)
        row_off = n * ss_n + pixel_offsets(p, W, ss_h, ss_w)
        inv = _rms_inv(s_ptr, row_off, ss_c, valid, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
        if DKV:
            k_raw, k = _qkv(s_ptr, row_off, ss_c, valid, inv, wk_ptr, swk_o, swk_i, row_k0 + head * D, d, d_mask,
                            C, g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
            v_raw, v = _qkv(s_ptr, row_off, ss_c, valid, inv, wv_ptr, swv_o, swv_i, row_v0 + head * D, d, d_mask,
                            C, g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
            kd, vd = k.to(dt), v.to(dt)
            dk = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for qb in range(0, QB):
                nq, pq, lpq, valid_q = _tile_rows(grp, qb, T, SPAN, 1, n_pos, P, BLOCK_R)
                q_off = nq * ss_n + pixel_offsets(pq, W, ss_h, ss_w)
                inv_q = _rms_inv(s_ptr, q_off, ss_c, valid_q, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
                q_unused, q = _qkv(s_ptr, q_off, ss_c, valid_q, inv_q, wq_ptr, swq_o, swq_i, head * D, d, d_mask, C,
                            g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
                qd = q.to(dt)
                do, delta, lse = _row_stats(do_ptr, o_ptr, lse_ptr, nq, pq, valid_q, head, d, d_mask, HEADS, D, P)
                sc = _scores(qd, k, sm_scale, MP, PREC)
                pr = tl.where(valid_q[:, None] & valid[None, :], tl.exp(sc - lse[:, None]), 0.)
                dod = do.to(dt)
                dv += tl.dot(tl.trans(pr.to(dt)), dod, input_precision=PREC)
                dp = tl.dot(dod, tl.trans(vd), input_precision=PREC)
                ds = pr * (dp - delta[:, None]) * sm_scale
                dk += tl.dot(tl.trans(ds.to(dt)), qd, input_precision=PREC)
            _store_dqkv(dqkv_ptr, n, p, valid, d, d_mask, 1, head, HEADS, D, P, k_raw, dk, inv, eps, norm_scale,
                        MP, HAS_G)
            _store_dqkv(dqkv_ptr, n, p, valid, d, d_mask, 2, head, HEADS, D, P, v_raw, dv, inv, eps, norm_scale,
                        MP, HAS_G)
        else:
            q_raw, q = _qkv(s_ptr, row_off, ss_c, valid, inv, wq_ptr, swq_o, swq_i, head * D, d, d_mask, C, g_ptr,
                            eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
            qd = q.to(dt)
            do, delta, lse = _row_stats(do_ptr, o_ptr, lse_ptr, n, p, valid, head, d, d_mask, HEADS, D, P)
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
                nk, pk, lpk, valid_k = _tile_rows(grp, kb, T, SPAN, 1, n_pos, P, BLOCK_R)
                k_off = nk * ss_n + pixel_offsets(pk, W, ss_h, ss_w)
                inv_k = _rms_inv(s_ptr, k_off, ss_c, valid_k, C, rms_scale, rms_eps, HAS_G, BLOCK_R, BLOCK_CK)
                k_unused, k = _qkv(s_ptr, k_off, ss_c, valid_k, inv_k, wk_ptr, swk_o, swk_i, row_k0 + head * D, d,
                                   d_mask, C, g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
                v_unused, v = _qkv(s_ptr, k_off, ss_c, valid_k, inv_k, wv_ptr, swv_o, swv_i, row_v0 + head * D, d,
                                   d_mask, C, g_ptr, eps, norm_scale, MP, HAS_G, PREC, BLOCK_R, BLOCK_D, BLOCK_CK)
                sc = _scores(qd, k, sm_scale, MP, PREC)
                pr = tl.where(valid[:, None] & valid_k[None, :], tl.exp(sc - lse[:, None]), 0.)
                dp = tl.dot(dod, tl.trans(v.to(dt)), input_precision=PREC)
                ds = pr * (dp - delta[:, None]) * sm_scale
                dq += tl.dot(ds.to(dt), k.to(dt), input_precision=PREC)
            _store_dqkv(dqkv_ptr, n, p, valid, d, d_mask, 0, head, HEADS, D, P, q_raw, dq, inv, eps, norm_scale,
                        MP, HAS_G)
    if HAS_MEM:
        if not DKV:
            own = chunk * (2 * HEADS * M * D) + head * (M * D) + mi.to(tl.int64)[:, None] * D + d[None, :]
            tl.store(dmem_ptr + own, dmk, mask=mm)
            tl.store(dmem_ptr + HEADS * M * D + own, dmv, mask=mm)


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
