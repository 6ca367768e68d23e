"""Temporal attention core: attention over the frames of every pixel, for both attention inflation blocks.

MP (MPAttentionInflationBlock), x (b t) c H W, all weights already MP-normalised:

    s = x as (b H W) t c
    per layer (qkv_weight (3 h d, c), out_weight (c, h d), mem_kv (2, h, m, d)):
        q, k, v = split_heads(s @ qkv_weight^T); k, v = [mem_k; k], [mem_v; v]
        q, k, v = pixel_norm(q), pixel_norm(k), pixel_norm(v)        # eps 1e-4, times sqrt(d)
        o = dropout(softmax(q k^T / sqrt(d))) v                       # over t + m keys
        s = mp_add(merge_heads(o) @ out_weight^T, s, t=0.3)
    out = mp_add((s @ proj_weight^T) * gain  as (b t) c H W,  x, t=mp_add_t)

Non-MP (AttentionInflationBlock, x-transformers semantics), per layer (g or None, wq, wk, wv, wo or None):
    n = rmsnorm(s) * g  if prenorm            (F.normalize over c, times sqrt(c))
    o = dropout(softmax(q k^T / sqrt(d), fp32)) v  with q, k, v = n wq^T, n wk^T, n wv^T
    s = o wo^T (+ s if residual_attn)
    out = s proj_weight^T + proj_bias  as (b t) c H W,  + x

In the MP layer softmax(q k^T * scale) v is ``F.scaled_dot_product_attention``: same math, and as q and k are
pixel-normed the logits are bounded, so its summation order does not matter (on CPU its fused kernel is 2x
faster than einsum-softmax-einsum and stores no score tensor for backward).

Triton path (``kernels/attention.py``; notes above the launchers below). Both blocks register a
custom op (``lumiere_fast::mp_temporal_attention_block``, ``lumiere_fast::temporal_attention_block``) and a
backward op, so ``torch.compile`` sees them as single nodes. Current state:
  * forward: Triton kernels, two stages per layer that each read memory in order (issue 14.1). The q/k/v
    projection is one pixel-contiguous GEMM over c (q, k and v in one pass over the packed [3 h d, c] weight, in
    the compute dtype; non-MP: RMSNorm row scale from the same tiles, g packed into the weight) reading x through
    its strides in the (b t) c H W layout and writing a head-major buffer (3 h, (b H W), t, d): each (position,
    head) a contiguous [t, d] block. The core kernel reads those blocks whole (MP pixel norms and memory keys
    in-kernel, fp32 online softmax; no score tensor in memory) and writes o head-major; the out projection +
    residual, then proj_out (* gain, + bias) + the outer residual, are the same GEMM kernel.
  * row tiles: a tile of BLOCK_R rows packs BLOCK_R // T whole positions (clip, pixel), block-diagonal mask (64-row
    tiles on GPU: T = 8 packs 8 positions; 16 under the interpreter); one head's tile is one contiguous run of
    the buffer. T above the row cap (64 frames, 32 for d = 128) takes one position per tile and loops over key
    blocks (flash style), reading k and v blocks again per query block (no re-projection).
  * backward: Triton kernels for x and every parameter, both blocks. On the eager path the forward keeps what it
    wrote (each layer's input, the qkv buffer, o, the log-sum-exp for long clips, the RMSNorm row scale) and the
    backward reads it; under torch.compile the custom ops' forward returns only the output, so the backward op
    reruns the forward stages first. The core's backward reads q, k, v blocks whole and writes dqkv head-major:
    one kernel recomputing the probabilities when a position fits one tile, a flash-2-style dk/dv + dq pair
    from the log-sum-exp above the cap. W^T products are the GEMM kernel reading head-major inputs; weight
    grads a partial-sum GEMM kernel (per-program fp32 partials summed on the host: deterministic, no atomics);
    memory key/value grads one fp32 partial per program, summed on the host. Non-MP RMSNorm: the core backward
    emits the q/k/v grads times the row scale, g's grad is a per-channel partial-sum kernel, the input grad an
    RMSNorm backward kernel; proj_out's bias grad is the same partial-sum kernel. Torch ops remain only on
    parameter-sized tensors: the MP gain's grad (sum of proj_weight * its c x c grad), the memory keys/values'
    pixel-norm backward (2 h m d), concatenating wq/wk/wv (3 h d x c), casts and the partials' final sums.
  * dropout > 0 in training takes the reference (supported=False, warned under a forced triton backend): the
    kernels have no RNG. Single layers used on their own (``mp_attention_layer``, ``attention_layer``) are
    reference-only.
  * known costs: o and the head-major qkv make one trip through memory each (benchmarks/bench_attention.py has
    the byte count: at c = 768, h d = 512 about 5.7x the fused minimum, in full sectors); the eager backward
    keeps them alive until it runs. The whole-tile backward holds [T, T] scores and several [T, d] tiles at 64
    rows. Tile sizes and warps come from ptxas register reports, not from timings (no GPU was available).
"""

from __future__ import annotations

from contextvars import ContextVar
from functools import cache

from math import sqrt
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._triton import (NAMESPACE, autocast_inputs, cdiv, device_guard, differentiable_backward, dot_block,
                      dot_precision, eager_or_op, grid_1d, launch, launch_tuned, new_output, pow2, register_eager,
                      target_programs, use_triton)
from .fold import fold_frames_ref, unfold_frames_ref
from .mp_math import mp_add, mp_add_coeffs, pixel_norm

MP_ATTN_ADD_T = 0.3
_MAX_T = 128
_EPS = 1e-4
_RMS_EPS = 1e-12      # F.normalize's default eps (the non-MP RMSNorm)


# -------------------------------------------------------------------------------------------------- checks


def _check(name, x, batch, heads, proj_weight):
    if x.ndim != 4:
        raise ValueError(f'{name}: expected x as (b t) c h w, got shape {tuple(x.shape)}')
    if batch < 1 or x.shape[0] % batch:
        raise ValueError(f'{name}: leading dim {x.shape[0]} is not batch ({batch}) x frames')
    if heads < 1:
        raise ValueError(f'{name}: expected heads >= 1, got {heads}')
    c = x.shape[1]
    if tuple(proj_weight.shape) != (c, c):
        raise ValueError(f'{name}: expected proj_weight ({c}, {c}), got {tuple(proj_weight.shape)}')


def _mp_layer_shapes_ok(c: int, heads: int, layers) -> bool:
    for qkv_weight, out_weight, mem_kv in layers:
        if qkv_weight.ndim != 2 or qkv_weight.shape[1] != c or qkv_weight.shape[0] % (3 * heads):
            return False
        hd = qkv_weight.shape[0] // 3
        d = hd // heads
        if tuple(out_weight.shape) != (c, hd) or mem_kv.ndim != 4 or tuple(mem_kv.shape[:2]) != (2, heads) \
                or mem_kv.shape[-1] != d or d > 128:
            return False
    return True


def _layer_shapes_ok(c: int, heads: int, layers) -> bool:
    prenorm = layers[0][0] is not None
    for g, wq, wk, wv, wo in layers:
        if (g is not None) != prenorm or (g is not None and tuple(g.shape) != (c,)):
            return False
        if wq.ndim != 2 or wq.shape[1] != c or wq.shape[0] % heads or wk.shape != wq.shape or wv.shape != wq.shape:
            return False
        hd = wq.shape[0]
        if (wo is None and hd != c) or (wo is not None and tuple(wo.shape) != (c, hd)) or hd // heads > 128:
            return False
    return True


# ---------------------------------------------------------------------------------------------- references


def _split_heads(t: Tensor, heads: int) -> Tensor:
    n, s, hd = t.shape
    return t.view(n, s, heads, hd // heads).transpose(1, 2)          # n h s d


def _merge_heads(t: Tensor) -> Tensor:
    n, h, s, d = t.shape
    return t.transpose(1, 2).reshape(n, s, h * d)                     # n s (h d)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float = 0.) -> Tensor:
    root = scale ** 0.5                        # both sides scaled, as SDPA's own math path does
    attn = ((q * root) @ (k * root).transpose(-1, -2)).softmax(dim=-1)
    return (F.dropout(attn, dropout) if dropout else attn) @ v


class _TwiceDifferentiableSDPA(torch.autograd.Function):
    """SDPA forward; backward through SDPA's own backward (recomputed), or, when the backward itself is being
    recorded (``create_graph=True``), through the explicit matmul-softmax, which autograd differentiates again."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        if torch.is_grad_enabled():            # create_graph: a differentiable backward of the same function
            return (*torch.autograd.grad(_math_attention(q, k, v, ctx.scale), (q, k, v), grad, create_graph=True),
                    None)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, scale=ctx.scale)
        return (*torch.autograd.grad(out, leaves, grad), None)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0., scale: float | None = None) -> Tensor:
    """(..., s, d) x (..., m, d) x (..., m, d) -> (..., s, d): softmax(q k^T * scale) v (scale d ** -0.5 by default).

    ``F.scaled_dot_product_attention``; but SDPA's fused kernels have no double backward
    (``_scaled_dot_product_flash_attention_for_cpu_backward``, the CUDA flash / efficient backward), which a
    gradient penalty (``create_graph=True``) needs and upstream's einsum attention has: where autograd records it
    (eager, any device, autocast's casts applied here) it runs through
    :class:`_TwiceDifferentiableSDPA` (the same forward and first-order backward numbers, one recomputed SDPA
    forward in backward), or with dropout through the explicit matmul-softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling()):
        # (eager only: a compiled graph cannot trace the backward's autograd.grad)
        device = q.device.type
        if torch.is_autocast_enabled(device):
            # autocast's SDPA casting (fp32 -> the autocast dtype) does not reach inside the Function: done here
            low = torch.get_autocast_dtype(device)
            q, k, v = (t.to(low) if t.dtype == torch.float32 else t for t in (q, k, v))
        if q.dtype == k.dtype == v.dtype:
            with torch.autocast(device, enabled=False):
                if dropout:
                    return _math_attention(q, k, v, scale, dropout)
                return _TwiceDifferentiableSDPA.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)


def mp_attention_layer_ref(s: Tensor, qkv_weight: Tensor, out_weight: Tensor, mem_kv: Tensor, heads: int,
                           dropout: float = 0., training: bool = False) -> Tensor:
    """(n, t, c) -> (n, t, c): one MPAttention layer with its inner MP residual."""
    q, k, v = (_split_heads(p, heads) for p in F.linear(s, qkv_weight).chunk(3, dim=-1))
    n = s.shape[0]
    mk, mv = (m.unsqueeze(0).expand(n, -1, -1, -1) for m in mem_kv)
    k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
    q, k, v = pixel_norm(q), pixel_norm(k), pixel_norm(v)
    o = softmax_attention(q, k, v, dropout if training else 0.)
    out = F.linear(_merge_heads(o), out_weight)
    return mp_add(out, s, MP_ATTN_ADD_T)


def attention_layer_ref(s: Tensor, g: Tensor | None, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor | None, heads: int,
                        dropout: float = 0., training: bool = False, residual: bool = True) -> Tensor:
    """(n, t, c) -> (n, t, c): RMSNorm pre-norm (if g is given), x-transformers attention, residual."""
    n_ = s if g is None else F.normalize(s, dim=-1) * sqrt(s.shape[-1]) * g
    q, k, v = (_split_heads(F.linear(n_, w), heads) for w in (wq, wk, wv))
    # written out as x-transformers does (softmax in fp32, then back): its logits are not bounded by a norm, so
    # a fused kernel's different summation order would show in the parity tests
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    attn = F.dropout(sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype), dropout, training)
    out = _merge_heads(attn @ v)
    out = out if wo is None else F.linear(out, wo)          # x-transformers: one head has no output projection
    return out + s if residual else out


def mp_temporal_attention_block_ref(x: Tensor, layers: Sequence[tuple], proj_weight: Tensor, gain: Tensor,
                                    batch: int, heads: int, mp_add_t: float = 0.3, dropout: float = 0.,
                                    training: bool = False) -> Tensor:
    s = fold_frames_ref(x, batch, 't c')
    for qkv_weight, out_weight, mem_kv in layers:
        s = mp_attention_layer_ref(s, qkv_weight, out_weight, mem_kv, heads, dropout, training)
    s = F.linear(s, proj_weight) * gain
    return mp_add(unfold_frames_ref(s, batch, *x.shape[-2:], 't c'), x, mp_add_t)


def temporal_attention_block_ref(x: Tensor, layers: Sequence[tuple], proj_weight: Tensor, proj_bias: Tensor | None,
                                 batch: int, heads: int, dropout: float = 0., training: bool = False,
                                 residual_attn: bool = True) -> Tensor:
    s = fold_frames_ref(x, batch, 't c')
    for g, wq, wk, wv, wo in layers:
        s = attention_layer_ref(s, g, wq, wk, wv, wo, heads, dropout, training, residual_attn)
    s = F.linear(s, proj_weight, proj_bias)
    return unfold_frames_ref(s, batch, *x.shape[-2:], 't c') + x


# ------------------------------------------------------------------------------------------ Triton launchers
#
# Kernels: kernels/attention.py (lumiere_fast.kernels.attention, imported on first launch). Per layer, two stages
# that each read memory in order (the kernel module's docstring has the layout):
#   q/k/v projection: _attention_linear_kernel over the packed [3 h d, c] weight (non-MP: [wq; wk; wv] * g, cast
#       once to the compute dtype), one pixel-contiguous GEMM over c reading s (b t) c H W through its strides and
#       writing the head-major buffer qkv (3 h, (b H W), t, d); non-MP pre-norm: the RMSNorm row scale from the
#       same tiles (saved as inv ((b H W) t) fp32).
#   core: _attention_core_kernel per (POS positions or one time block, head), q, k, v blocks read whole, MP pixel
#       norms in-kernel (why there: the backward needs the raw projections for the norm's grad, so the buffer
#       holds them once and the GEMM's tiles need not align with heads), fp32 online softmax over memory + key
#       blocks; o head-major (h, (b H W), t, d), lse (h, (b H W) t) for clips above the row cap.
#   out projection + the layer's residual: the same GEMM kernel reading o head-major. Then proj_out (* gain,
#       + bias) + the outer residual with x (the same kernel on frames).
# Backward: the eager path (an autograd.Function, ops._triton.launch) keeps what the forward wrote (each layer's
# input, qkv, o, lse, inv) and walks it back; under torch.compile (the custom ops, whose forward returns only
# the block's output) the backward op first reruns the forward stages. The core backward
# (_attention_core_backward_kernel; _attention_core_backward_long_kernel above the row cap, from lse) reads qkv
# and do head-major and writes dqkv head-major; W^T products are the GEMM kernel reading head-major inputs,
# weight grads _attention_weight_grad_kernel (per-program partials, summed here: deterministic), the RMSNorm
# backward kernel and per-channel partial sums.


@cache
def _kernels():
    from ..kernels import attention as k
    return k


def _geom(x: Tensor, batch: int, d: int = 1) -> tuple:
    """(frames n = b t, height, width, t, d): the sizes the head-major layout (3 h, (b H W), t, d) needs."""
    n, _, height, width = x.shape
    return n, height, width, n // batch, d


def _hm_buffer(slabs: int, geom: tuple, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A head-major (slabs, (b H W), t, d) buffer: one contiguous [t, d] block per (slab, position)."""
    n, height, width, frames, d = geom
    return new_output((slabs, n // frames * height * width, frames, d), like, dtype)


def _linear_mp_add(kern, inp: Tensor, w: Tensor, res: Tensor | None, gain: Tensor | None, c_out: float,
                   c_res: float = 0., bias: Tensor | None = None, *, geom: tuple, x_hm: bool = False,
                   out_hm: bool = False, inv: Tensor | None = None) -> Tensor:
    """c_out * (gain * (w @ inp per pixel) (* RMSNorm row scale) + bias) + c_res * res. ``inp`` (b t) c H W (any
    strides) or head-major (``x_hm``); the output contiguous (b t) co H W, or head-major (``out_hm``, co = slabs x
    d). ``w`` may be a transposed view (the backward's w^T): it is read through its strides. ``inv`` (fp32
    ((b H W) t)): compute the RMSNorm row scale of inp over its channels, apply it, and store it there."""
    n, height, width, frames, d = geom
    co, ci, p = w.shape[0], w.shape[1], height * width
    out = _hm_buffer(co // d, geom, inp) if out_hm else new_output((n, co, height, width), inp)
    r = res if res is not None else out     # unused pointer without HAS_RES
    xs = (0, 0, 0, 0) if x_hm else inp.stride()
    rs = res.stride() if res is not None else (0, 0, 0, 0)
    launch_tuned(
        kern._attention_linear_kernel, lambda m: grid_1d(n * cdiv(p, m['BLOCK_P']) * cdiv(co, m['BLOCK_CO'])),
        (ci, co, p, inp.dtype, w.dtype),
        inp, *xs, w, w.stride(0), w.stride(1), r, *rs, out,
        gain if gain is not None else out, bias if bias is not None else out, inv if inv is not None else out,
        c_out, c_res, sqrt(ci), _RMS_EPS, n, ci, co, p, width, frames, d,
        HAS_GAIN=gain is not None, HAS_BIAS=bias is not None, HAS_RES=res is not None, HAS_RMS=inv is not None,
        X_HM=x_hm, OUT_HM=out_hm, PREC=dot_precision(inp, 'matmul'), BLOCK_CI=dot_block(ci, 32))
    return out


def _weight_grad(kern, a: Tensor, b: Tensor, geom: tuple, a_hm: bool = False, b_hm: bool = False,
                 ca: int | None = None, cb: int | None = None) -> Tensor:
    """fp32 [ca, cb] = sum over frames and pixels of a (x) b: a 1x1 projection's weight grad. a, b (b t) c H W
    (any strides) or head-major (``a_hm`` / ``b_hm``; then ``ca`` / ``cb`` give their channel counts). Per-program
    partials over row chunks, summed here in a fixed order (deterministic)."""
    n, height, width, frames, d = geom
    p = height * width
    ca = ca if a_hm else a.shape[1]
    cb = cb if b_hm else b.shape[1]
    blk_a, blk_b, blk_p = kern.WGRAD_BLOCKS
    tiles, rows = cdiv(ca, blk_a) * cdiv(cb, blk_b), n * cdiv(p, blk_p)
    rows_per_prog = cdiv(rows, max(1, min(rows, cdiv(target_programs(a), tiles))))
    splits = cdiv(rows, rows_per_prog)
    part = new_output((splits, ca, cb), a, torch.float32)
    kern._attention_weight_grad_kernel[grid_1d(splits * tiles)](
        a, *((0, 0, 0, 0) if a_hm else a.stride()), b, *((0, 0, 0, 0) if b_hm else b.stride()), part,
        n, ca, cb, p, width, frames, d, rows_per_prog, A_HM=a_hm, B_HM=b_hm, PREC=dot_precision(a, 'matmul'),
        BLOCK_A=blk_a, BLOCK_B=blk_b, BLOCK_P=blk_p)
    return part.sum(0) if splits > 1 else part[0]


def _channel_sum(kern, a: Tensor, b: Tensor | None = None) -> Tensor:
    """fp32 [c] = sum over frames and pixels of a (* b) (both (b t) c H W, any strides): per-program partials
    from the kernel, summed here (deterministic)."""
    n, c, _, width = a.shape
    p = a.shape[-2] * a.shape[-1]
    blk_c, blk_p = kern.CHAN_BLOCKS
    c_tiles, rows = cdiv(c, blk_c), n * cdiv(p, blk_p)
    rows_per_prog = cdiv(rows, max(1, min(rows, target_programs(a) // c_tiles)))
    splits = cdiv(rows, rows_per_prog)
    part = new_output((splits, c), a, torch.float32)
    bb = b if b is not None else a
    kern._attention_channel_sum_kernel[grid_1d(splits * c_tiles)](
        a, *a.stride(), bb, *bb.stride(), part, n, c, p, width, rows_per_prog,
        HAS_B=b is not None, BLOCK_C=blk_c, BLOCK_P=blk_p)
    return part.sum(0)


def _rms_norm_backward(kern, f: Tensor, s: Tensor, g: Tensor, res: Tensor | None) -> Tensor:
    """Grad of the RMSNorm pre-norm's input s from f = row scale * grad of the normed rows (contiguous), + res."""
    n, c, height, width = s.shape
    p = height * width
    out = new_output(s.shape, s)
    blk_c, blk_p = kern.CHAN_BLOCKS
    kern._attention_rms_norm_backward_kernel[grid_1d(n * cdiv(p, blk_p))](
        f, s, *s.stride(), g, res if res is not None else out, out, n, c, p, width, _RMS_EPS, 1.,
        HAS_RES=res is not None, BLOCK_C=blk_c, BLOCK_P=blk_p)
    return out


def _pixel_norm_backward(raw: Tensor, dy: Tensor) -> Tensor:
    """Grad of pixel_norm(raw) (eps _EPS) over the last axis, for the tiny (2, h, m, d) memory tensor."""
    scale = sqrt(raw.shape[-1])
    nrm = raw.norm(dim=-1, keepdim=True)
    den = nrm.clamp_min(_EPS)
    u = raw / den
    dx = torch.where(nrm > _EPS, dy - u * (u * dy).sum(-1, keepdim=True), dy)
    return dx * (scale / den)


def _row_tiles(kern, frames: int, d: int = 64, whole: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_R, SPAN, POS, QB): rows per tile, frames per position in a tile, positions per tile, time blocks.
    Up to the row cap (or ``whole``: the backward, which keeps a position in one tile) a tile packs BLOCK_R // T
    whole positions (at least ATTN_ROWS_MIN rows: 64 on a GPU, a tensor-core M; the backward's
    ATTN_BWD_ROWS_MIN, 32: see the kernel module); longer clips take one position per
    tile in cap-frame blocks. The cap is ATTN_ROWS_MAX, halved for d = 128 (and the minimum with it): ptxas (sm_90,
    bf16, 8 warps) fits the forward's [64, 64] and [32, 128] tiles in registers but spills at [64, 128]."""
    cap = kern.ATTN_ROWS_MAX if d <= 64 else max(16, kern.ATTN_ROWS_MAX // 2)
    if frames <= cap or whole:
        block = max(min(kern.ATTN_BWD_ROWS_MIN if whole else kern.ATTN_ROWS_MIN, cap), pow2(frames))
        return block, frames, block // frames, 1
    return cap, cap, 1, cdiv(frames, cap)


def _core_meta(x: Tensor, mp: bool, d: int, m: int, block_r: int, bwd: bool) -> dict:
    block_d = dot_block(d)
    # 8 warps: ptxas (sm_90, bf16) keeps the forward's [64, 64] / [32, 128] tiles and the backward's [64, 64]
    # tile (nearly) free of spills at 8 warps, not at 4; 16 warps caps registers at 128/thread and spills more
    warps = 8 if bwd or block_r * block_d >= 32 * 64 else 4
    return dict(MP=mp, HAS_MEM=m > 0, PREC=dot_precision(x, 'matmul'), BLOCK_R=block_r, BLOCK_D=block_d,
                BLOCK_M=dot_block(m), num_warps=warps)


def _mem_args(mem: Tensor | None, dummy: Tensor) -> list:
    return [mem if mem is not None else dummy, *(mem.stride() if mem is not None else (0, 0, 0, 0))]


def _core_forward(kern, qkv: Tensor, mem: Tensor | None, geom: tuple, heads: int, mp: bool,
                  want_lse: bool = False) -> tuple[Tensor, Tensor | None]:
    """o (h, (b H W), t, d) = attention of every position's frames from the head-major qkv (3 h, (b H W), t, d),
    and with ``want_lse`` (for the backward, clips longer than one tile) the rows' log-sum-exp (h, (b H W) t)."""
    n, height, width, frames, d = geom
    n_pos = n // frames * height * width
    m = mem.shape[2] if mem is not None else 0
    o = _hm_buffer(heads, geom, qkv)
    block_r, span, pos, qb = _row_tiles(kern, frames, d)
    want_lse = want_lse and qb > 1
    lse = new_output((heads, n_pos * frames), qkv, torch.float32) if want_lse else None
    kern._attention_core_kernel[grid_1d(cdiv(n_pos, pos) * qb * heads)](
        qkv, *_mem_args(mem, o), o, lse if want_lse else o, frames, heads, d, m, n_pos, span, pos, qb,
        sqrt(d), d ** -0.5, _EPS, WRITE_LSE=want_lse, **_core_meta(qkv, mp, d, m, block_r, False))
    return o, lse


def _core_backward(kern, qkv: Tensor, mem: Tensor | None, inv: Tensor | None, do: Tensor, o: Tensor,
                   lse: Tensor | None, geom: tuple, heads: int, mp: bool) -> tuple[Tensor, Tensor | None]:
    """(dqkv head-major like qkv, fp32 grads of the normalised memory (2, h, m, d) or None) from the saved qkv, o,
    lse and do (head-major like o). Programs walk GROUPS tiles of one head each (enough programs to fill the GPU,
    few under the interpreter) and write one memory-grad partial per program, summed here. Clips that fit one
    tile: _attention_core_backward_kernel, scores recomputed; longer clips (``lse`` saved by the forward):
    _attention_core_backward_long_kernel, a dk/dv launch and a dq launch."""
    n, height, width, frames, d = geom
    n_pos = n // frames * height * width
    m = mem.shape[2] if mem is not None else 0
    long = lse is not None
    block_r, span, pos, qb = _row_tiles(kern, frames, d, whole=not long)
    items = cdiv(n_pos, pos) * qb
    per_head = target_programs(qkv) * (4 if qkv.is_cuda else 1)
    groups = cdiv(items, max(1, min(items, per_head // heads)))
    chunks = cdiv(items, groups)
    dqkv = new_output(qkv.shape, qkv)
    dmem = new_output((chunks, 2, heads, m, d), qkv, torch.float32) if m else dqkv
    meta = dict(_core_meta(qkv, mp, d, m, block_r, True), HAS_G=inv is not None)
    head_args = [qkv, *_mem_args(mem, dqkv), inv if inv is not None else dqkv]
    scalars = (sqrt(d), d ** -0.5, _EPS)
    if long:
        # dk, dv: one (position, key block) per program (no memory partials to amortise)
        kern._attention_core_backward_long_kernel[grid_1d(items * heads)](
            *head_args, do, o, lse, dqkv, dmem, frames, heads, d, m, n_pos, span, qb, 1, *scalars, DKV=True, **meta)
        kern._attention_core_backward_long_kernel[grid_1d(chunks * heads)](
            *head_args, do, o, lse, dqkv, dmem, frames, heads, d, m, n_pos, span, qb, groups, *scalars, DKV=False,
            **meta)
    else:
        kern._attention_core_backward_kernel[grid_1d(chunks * heads)](
            *head_args, do, dqkv, dmem, frames, heads, d, m, n_pos, pos, groups, *scalars, **meta)
    return dqkv, (dmem.sum(0) if m else None)


def _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads, save=False):
    """Runs the layers; returns every layer input s_0 = x .. s_depth and (with ``save``) per layer what its
    backward reads: (qkv buffer, o, lse or None)."""
    a, b = mp_add_coeffs(MP_ATTN_ADD_T)
    ss, saved = [x], []
    for qkv_weight, out_weight, mem_kv in zip(qkv, outw, mem):
        s = ss[-1]
        geom = _geom(x, batch, qkv_weight.shape[0] // 3 // heads)
        buf = _linear_mp_add(kern, s, qkv_weight, None, None, 1., geom=geom, out_hm=True)
        o, lse = _core_forward(kern, buf, mem_kv if mem_kv.shape[2] else None, geom, heads, True, save)
        ss.append(_linear_mp_add(kern, o, out_weight, s, None, a, b, geom=geom, x_hm=True))
        if save:
            saved.append((buf, o, lse))
    return ss, saved


def _mp_temporal_attention_block_forward(x: Tensor, qkv: list[Tensor], outw: list[Tensor], mem: list[Tensor],
                                         proj_weight: Tensor, gain: Tensor, batch: int, heads: int, mp_add_t: float,
                                         save: bool = False):
    """The block's output; with ``save`` (the eager path under autograd) (output, what the backward reads)."""
    kern = _kernels()
    with device_guard(x):
        ss, saved = _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads, save)
        out = _linear_mp_add(kern, ss[-1], proj_weight, x, gain.reshape(1), *mp_add_coeffs(mp_add_t),
                             geom=_geom(x, batch))
    return (out, (ss, saved)) if save else out


def _mp_temporal_attention_block_backward(grad: Tensor, x: Tensor, qkv: list[Tensor], outw: list[Tensor],
                                          mem: list[Tensor], proj_weight: Tensor, gain: Tensor, batch: int, heads: int,
                                          mp_add_t: float, saved=None) -> list[Tensor]:
    """Grads of (x, proj_weight, gain, *qkv, *outw, *mem) from what the forward wrote (``saved``: the layers'
    inputs and their (qkv, o, lse); rerun here when not given: the custom op path), walked back:
      outer:  dS = c_out * gain * P^T g (linear kernel on the transposed view), dP, dgain from G = sum g (x) s;
      layer:  do = a Wo^T dS (head-major);  dWo = a sum dS (x) o;  core backward kernel -> dqkv (head-major,
              + memory-grad partials);  dWqkv = sum dqkv (x) s;  dS_prev = Wqkv^T dqkv + b dS.
    Weight grads are fp32 partial-sum reductions, cast to the parameter dtype at the end; the gain's grad (sum of
    P * G, c x c) and the memory keys/values' pixel-norm backward (m x d) are torch ops."""
    kern = _kernels()
    c_out, c_res = mp_add_coeffs(mp_add_t)
    a, b = mp_add_coeffs(MP_ATTN_ADD_T)
    with device_guard(x):
        ss, layers = saved if saved is not None else _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads, True)
        g0 = _geom(x, batch)
        gs = _weight_grad(kern, grad, ss[-1], g0)
        d_proj = (gs * (c_out * gain.float())).to(proj_weight.dtype)
        d_gain = ((proj_weight.float() * gs).sum() * c_out).reshape(gain.shape).to(gain.dtype)
        ds = _linear_mp_add(kern, grad, proj_weight.t(), None, gain.reshape(1), c_out, geom=g0)
        d_qkv, d_out, d_mem = [None] * len(qkv), [None] * len(qkv), [None] * len(qkv)
        for i in reversed(range(len(qkv))):
            qkv_weight, out_weight, mem_kv, s = qkv[i], outw[i], mem[i], ss[i]
            buf, o, lse = layers[i]
            hd = qkv_weight.shape[0] // 3
            geom = _geom(x, batch, hd // heads)
            m = mem_kv.shape[2]
            do = _linear_mp_add(kern, ds, out_weight.t(), None, None, a, geom=geom, out_hm=True)
            d_out[i] = (_weight_grad(kern, ds, o, geom, b_hm=True, cb=hd) * a).to(out_weight.dtype)
            dqkv, dmem = _core_backward(kern, buf, mem_kv if m else None, None, do, o, lse, geom, heads, True)
            d_qkv[i] = _weight_grad(kern, dqkv, s, geom, a_hm=True, ca=3 * hd).to(qkv_weight.dtype)
            ds = _linear_mp_add(kern, dqkv, qkv_weight.t(), ds, None, 1., b, geom=geom, x_hm=True)
            d_mem[i] = (_pixel_norm_backward(mem_kv.float(), dmem).to(mem_kv.dtype) if m else
                        torch.zeros_like(mem_kv))
        d_x = ds + grad * c_res
    return [d_x, d_proj, d_gain, *d_qkv, *d_out, *d_mem]


def _layers_forward(kern, x, gs, wqs, wks, wvs, wos, batch, heads, prenorm, residual_attn, save=False):
    """Runs the layers; returns every layer input s_0 = x .. s_depth and (with ``save``) per layer what its
    backward reads: (qkv buffer, o, lse or None, RMSNorm row scale or None)."""
    ss, saved = [x], []
    for g, wq, wk, wv, wo in zip(gs, wqs, wks, wvs, wos):
        s = ss[-1]
        geom = _geom(x, batch, wq.shape[0] // heads)
        wcat = torch.cat((wq, wk, wv))
        inv = None
        if prenorm:     # g scales the normed rows' channels = W's columns: packed once, in the compute dtype
            wcat = (wcat.float() * g.float()).to(s.dtype)
            n, height, width, frames, _ = geom
            inv = new_output((n * height * width,), s, torch.float32)
        buf = _linear_mp_add(kern, s, wcat, None, None, 1., geom=geom, out_hm=True, inv=inv)
        o, lse = _core_forward(kern, buf, None, geom, heads, False, save)
        # heads=1 without an output projection runs wo = identity through the same GEMM (c x c, small)
        ss.append(_linear_mp_add(kern, o, wo, s if residual_attn else None, None, 1., 1., geom=geom, x_hm=True))
        if save:
            saved.append((buf, o, lse, inv))
    return ss, saved


def _temporal_attention_block_forward(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm,
                                      residual_attn, save=False):
    kern = _kernels()
    with device_guard(x):
        ss, saved = _layers_forward(kern, x, gs, wqs, wks, wvs, wos, batch, heads, prenorm, residual_attn, save)
        out = _linear_mp_add(kern, ss[-1], proj_weight, x, None, 1., 1., bias=proj_bias, geom=_geom(x, batch))
    return (out, (ss, saved)) if save else out


def _temporal_attention_block_backward(grad, x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm,
                                       residual_attn, saved=None) -> list[Tensor]:
    """Grads of (x, proj_weight, proj_bias, *gs, *wqs, *wks, *wvs, *wos) from what the forward wrote (``saved``:
    layer inputs, (qkv, o, lse, inv) per layer; rerun here when not given), walked back:
      outer:  dP = sum g (x) s_L;  db = sum g per channel;  dS = P^T g;
      layer:  do = Wo^T dS (head-major);  dWo = sum dS (x) o;  core backward -> dqkv (head-major, times the
              RMSNorm row scale inv = sqrt(c) / max(|s|, eps), so the pre-norm's rows never go to memory);
              dW_{q,k,v} = (sum dqkv (x) s) * g (g scales the normed rows' channels);
              f = [Wq; Wk; Wv]^T dqkv (= inv * grad of the normed rows);  dg = sum f * s per channel;
              dS_prev = RMSNorm backward of (f * g) (+ dS with the residual).
      Without a pre-norm dS_prev = [Wq; Wk; Wv]^T dqkv (+ dS) in one GEMM call.
    Weight grads are fp32 partial-sum reductions, g's and the bias's fp32 per-channel partial sums."""
    kern = _kernels()
    depth = len(wqs)
    with device_guard(x):
        ss, layers = saved if saved is not None else _layers_forward(kern, x, gs, wqs, wks, wvs, wos, batch, heads,
                                                                     prenorm, residual_attn, True)
        g0 = _geom(x, batch)
        d_proj = _weight_grad(kern, grad, ss[-1], g0).to(proj_weight.dtype)
        d_bias = _channel_sum(kern, grad).to(proj_bias.dtype)
        ds = _linear_mp_add(kern, grad, proj_weight.t(), None, None, 1., geom=g0)
        d_g, d_q, d_k, d_v, d_o = ([None] * depth for _ in range(5))
        for i in reversed(range(depth)):
            g, wq, wk, wv, wo, s = gs[i], wqs[i], wks[i], wvs[i], wos[i], ss[i]
            buf, o, lse, inv = layers[i]
            hd = wq.shape[0]
            geom = _geom(x, batch, hd // heads)
            do = _linear_mp_add(kern, ds, wo.t(), None, None, 1., geom=geom, out_hm=True)
            d_o[i] = _weight_grad(kern, ds, o, geom, b_hm=True, cb=hd).to(wo.dtype)
            dqkv, _ = _core_backward(kern, buf, None, inv, do, o, lse, geom, heads, False)
            dw = _weight_grad(kern, dqkv, s, geom, a_hm=True, ca=3 * hd)
            if prenorm:
                dw = dw * g.float()
            # copies: a custom op's outputs may not alias each other (split returns views)
            d_q[i], d_k[i], d_v[i] = (w.to(wq.dtype, copy=True) for w in dw.split(hd))
            wcat = torch.cat((wq, wk, wv))      # (3 h d, c), tiny: one W^T GEMM for the three grads
            res = ds if residual_attn else None
            if prenorm:
                f = _linear_mp_add(kern, dqkv, wcat.t(), None, None, 1., geom=geom, x_hm=True)
                d_g[i] = _channel_sum(kern, f, s).to(g.dtype)
                ds = _rms_norm_backward(kern, f, s, g, res)
            else:
                d_g[i] = torch.zeros_like(g)
                ds = _linear_mp_add(kern, dqkv, wcat.t(), res, None, 1., 1., geom=geom, x_hm=True)
        d_x = ds + grad
    return [d_x, d_proj, d_bias, *d_g, *d_q, *d_k, *d_v, *d_o]


# The eager path's saving forward. launch() runs an op's registered eager forward inside its autograd.Function
# (when something needs a gradient) and then the op's setup_context; the dispatch functions below open a holder
# for exactly that call, the forward leaves what the backward reads in it, setup_context moves it onto ctx. No
# holder (no grad wanted, or the custom op ran: torch.compile, modes, subclasses): nothing is kept, and the
# backward op reruns the forward stages.
_SAVED: ContextVar[list | None] = ContextVar('lumiere_fast_attention_saved', default=None)


def _saving(forward):
    def eager_forward(*args):
        holder = _SAVED.get()
        if holder is None:
            return forward(*args)
        out, saved = forward(*args, save=True)
        holder.append(saved)
        return out
    return eager_forward


def _take_saved():
    holder = _SAVED.get()
    return holder.pop() if holder else None


def _wants_grad(*tensors) -> bool:
    """Autograd will record this call (launch()'s own test, before autocast's differentiable casts)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _launch_saving(op, wants_grad: bool, *args):
    if torch.compiler.is_compiling():       # traced: the custom op (Dynamo cannot trace a ContextVar.set)
        return launch(op, *args)
    token = _SAVED.set([] if wants_grad else None)
    try:
        return launch(op, *args)
    finally:
        _SAVED.reset(token)


# ---------------------------------------------------------------------------------------------- custom ops


# real ops for torch.compile (fake impls give shapes), autograd by a backward op


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_attention_block', mutates_args=())
def _mp_temporal_attention_block_op(x: Tensor, qkv_weights: list[Tensor], out_weights: list[Tensor],
                                    mem_kvs: list[Tensor], proj_weight: Tensor, gain: Tensor, batch: int, heads: int,
                                    mp_add_t: float) -> Tensor:
    return _mp_temporal_attention_block_forward(x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads,
                                                mp_add_t)


@_mp_temporal_attention_block_op.register_fake
def _(x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t):
    return x.new_empty(x.shape)


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_attention_block_backward', mutates_args=())
def _mp_temporal_attention_block_backward_op(grad: Tensor, x: Tensor, qkv_weights: list[Tensor],
                                             out_weights: list[Tensor], mem_kvs: list[Tensor], proj_weight: Tensor,
                                             gain: Tensor, batch: int, heads: int, mp_add_t: float) -> list[Tensor]:
    return _mp_temporal_attention_block_backward(grad, x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch,
                                                 heads, mp_add_t)


@_mp_temporal_attention_block_backward_op.register_fake
def _(grad, x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t):
    return [torch.empty_like(t) for t in (x, proj_weight, gain, *qkv_weights, *out_weights, *mem_kvs)]


def _mp_setup_context(ctx, inputs, output):
    x, qkv, outw, mem, proj_weight, gain, batch, heads, mp_add_t = inputs
    ctx.save_for_backward(x, proj_weight, gain, *qkv, *outw, *mem)
    ctx.depth, ctx.batch, ctx.heads, ctx.mp_add_t = len(qkv), batch, heads, mp_add_t
    ctx.attention_saved = _take_saved()


def _mp_block_ref_from_lists(x, qkv, outw, mem, proj_weight, gain, batch, heads, mp_add_t):
    return mp_temporal_attention_block_ref(x, list(zip(qkv, outw, mem)), proj_weight, gain, batch, heads, mp_add_t)


def _mp_autograd_backward(ctx, grad):
    saved, depth = ctx.saved_tensors, ctx.depth
    x, proj_weight, gain = saved[:3]
    qkv, outw, mem = (list(saved[3 + i * depth:3 + (i + 1) * depth]) for i in range(3))
    if torch.is_grad_enabled():     # create_graph: through the reference
        return differentiable_backward(_mp_block_ref_from_lists, (x, qkv, outw, mem, proj_weight, gain, ctx.batch,
                                                                  ctx.heads, ctx.mp_add_t), grad)
    if getattr(ctx, 'eager', False) and ctx.attention_saved is not None:     # what the forward wrote
        g = _mp_temporal_attention_block_backward(grad, x, qkv, outw, mem, proj_weight, gain, ctx.batch, ctx.heads,
                                                  ctx.mp_add_t, ctx.attention_saved)
    else:
        backward = eager_or_op(ctx, _mp_temporal_attention_block_backward, _mp_temporal_attention_block_backward_op)
        g = backward(grad, x, qkv, outw, mem, proj_weight, gain, ctx.batch, ctx.heads, ctx.mp_add_t)
    return (g[0], list(g[3:3 + depth]), list(g[3 + depth:3 + 2 * depth]), list(g[3 + 2 * depth:]), g[1], g[2],
            None, None, None)


_mp_temporal_attention_block_op.register_autograd(_mp_autograd_backward, setup_context=_mp_setup_context)
register_eager(_mp_temporal_attention_block_op, _saving(_mp_temporal_attention_block_forward), _mp_setup_context,
               _mp_autograd_backward)


@torch.library.custom_op(f'{NAMESPACE}::temporal_attention_block', mutates_args=())
def _temporal_attention_block_op(x: Tensor, gs: list[Tensor], wqs: list[Tensor], wks: list[Tensor], wvs: list[Tensor],
                                 wos: list[Tensor], proj_weight: Tensor, proj_bias: Tensor, batch: int, heads: int,
                                 prenorm: bool, residual_attn: bool) -> Tensor:
    return _temporal_attention_block_forward(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm,
                                             residual_attn)


@_temporal_attention_block_op.register_fake
def _(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn):
    return x.new_empty(x.shape)


@torch.library.custom_op(f'{NAMESPACE}::temporal_attention_block_backward', mutates_args=())
def _temporal_attention_block_backward_op(grad: Tensor, x: Tensor, gs: list[Tensor], wqs: list[Tensor],
                                          wks: list[Tensor], wvs: list[Tensor], wos: list[Tensor], proj_weight: Tensor,
                                          proj_bias: Tensor, batch: int, heads: int, prenorm: bool,
                                          residual_attn: bool) -> list[Tensor]:
    return _temporal_attention_block_backward(grad, x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads,
                                              prenorm, residual_attn)


@_temporal_attention_block_backward_op.register_fake
def _(grad, x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn):
    return [torch.empty_like(t) for t in (x, proj_weight, proj_bias, *gs, *wqs, *wks, *wvs, *wos)]


def _block_setup_context(ctx, inputs, output):
    x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn = inputs
    ctx.save_for_backward(x, proj_weight, proj_bias, *gs, *wqs, *wks, *wvs, *wos)
    ctx.depth, ctx.batch, ctx.heads, ctx.prenorm, ctx.residual_attn = len(wqs), batch, heads, prenorm, residual_attn
    ctx.attention_saved = _take_saved()


def _block_ref_from_lists(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn):
    layers = [(g if prenorm else None, *ws) for g, *ws in zip(gs, wqs, wks, wvs, wos)]
    return temporal_attention_block_ref(x, layers, proj_weight, proj_bias, batch, heads, residual_attn=residual_attn)


def _block_autograd_backward(ctx, grad):
    saved, depth = ctx.saved_tensors, ctx.depth
    x, pw, pb = saved[:3]
    gs, wqs, wks, wvs, wos = (list(saved[3 + i * depth:3 + (i + 1) * depth]) for i in range(5))
    if torch.is_grad_enabled():     # create_graph: through the reference
        return differentiable_backward(_block_ref_from_lists, (x, gs, wqs, wks, wvs, wos, pw, pb, ctx.batch, ctx.heads,
                                                               ctx.prenorm, ctx.residual_attn), grad)
    if getattr(ctx, 'eager', False) and ctx.attention_saved is not None:     # what the forward wrote
        g = _temporal_attention_block_backward(grad, x, gs, wqs, wks, wvs, wos, pw, pb, ctx.batch, ctx.heads,
                                               ctx.prenorm, ctx.residual_attn, ctx.attention_saved)
    else:
        backward = eager_or_op(ctx, _temporal_attention_block_backward, _temporal_attention_block_backward_op)
        g = backward(grad, x, gs, wqs, wks, wvs, wos, pw, pb, ctx.batch, ctx.heads, ctx.prenorm, ctx.residual_attn)
    lists = [list(g[3 + i * depth:3 + (i + 1) * depth]) for i in range(5)]
    return (g[0], *lists, g[1], g[2], None, None, None, None)


_temporal_attention_block_op.register_autograd(_block_autograd_backward, setup_context=_block_setup_context)
register_eager(_temporal_attention_block_op, _saving(_temporal_attention_block_forward), _block_setup_context,
               _block_autograd_backward)


# ------------------------------------------------------------------------------------------------ dispatch


def mp_attention_layer(s: Tensor, qkv_weight: Tensor, out_weight: Tensor, mem_kv: Tensor, heads: int,
                       dropout: float = 0., training: bool = False) -> Tensor:
    """(n, t, c) -> (n, t, c): one MPAttention layer, MP-normalised weights (a module used on its own)."""
    if s.ndim != 3:
        raise ValueError(f'mp_attention_layer: expected (n, t, c), got shape {tuple(s.shape)}')
    backend.choose('mp_attention_layer', s, has_triton=False)
    return mp_attention_layer_ref(s, qkv_weight, out_weight, mem_kv, heads, dropout, training)


def attention_layer(s: Tensor, g: Tensor | None, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor | None, heads: int,
                    dropout: float = 0., training: bool = False, residual: bool = True) -> Tensor:
    """(n, t, c) -> (n, t, c): one x-transformers attention layer (a module used on its own)."""
    if s.ndim != 3:
        raise ValueError(f'attention_layer: expected (n, t, c), got shape {tuple(s.shape)}')
    backend.choose('attention_layer', s, has_triton=False)
    return attention_layer_ref(s, g, wq, wk, wv, wo, heads, dropout, training, residual)


def mp_temporal_attention_block(x: Tensor, layers: Sequence[tuple], proj_weight: Tensor, gain: Tensor, *,
                                batch: int, heads: int, mp_add_t: float = 0.3, dropout: float = 0.,
                                training: bool = False) -> Tensor:
    """(b t) c H W -> (b t) c H W; ``layers``: [(qkv_weight, out_weight, mem_kv)] per depth."""
    _check('mp_temporal_attention_block', x, batch, heads, proj_weight)
    layers = list(layers)
    flat = [w for layer in layers for w in layer]
    supported = (len(layers) > 0 and not (training and dropout > 0) and x.shape[0] // batch <= _MAX_T
                 and _mp_layer_shapes_ok(x.shape[1], heads, layers) and gain.numel() == 1)
    if use_triton('mp_temporal_attention_block', x, proj_weight, gain, *flat, supported=supported):
        qkv, out, mem = (list(ws) for ws in zip(*layers))
        return _launch_saving(_mp_temporal_attention_block_op, _wants_grad(x, proj_weight, gain, *flat),
                              *autocast_inputs(x, qkv, out, mem, proj_weight, gain), batch, heads, mp_add_t)
    return mp_temporal_attention_block_ref(x, layers, proj_weight, gain, batch, heads, mp_add_t, dropout, training)


def temporal_attention_block(x: Tensor, layers: Sequence[tuple], proj_weight: Tensor, proj_bias: Tensor | None, *,
                             batch: int, heads: int, dropout: float = 0., training: bool = False,
                             residual_attn: bool = True) -> Tensor:
    """(b t) c H W -> (b t) c H W; ``layers``: [(g or None, wq, wk, wv, wo)] per depth."""
    _check('temporal_attention_block', x, batch, heads, proj_weight)
    layers = list(layers)
    flat = [w for layer in layers for w in layer if w is not None]
    supported = (len(layers) > 0 and not (training and dropout > 0) and x.shape[0] // batch <= _MAX_T
                 and _layer_shapes_ok(x.shape[1], heads, layers))
    if use_triton('temporal_attention_block', x, proj_weight, *flat, supported=supported):
        c = x.shape[1]
        gs = [g if g is not None else x.new_ones(c) for g, *_ in layers]
        wos = [wo if wo is not None else torch.eye(c, dtype=wq.dtype, device=wq.device)
               for _, wq, _, _, wo in layers]
        wq, wk, wv = (list(ws) for ws in list(zip(*layers))[1:4])
        bias = proj_bias if proj_bias is not None else x.new_zeros(c)
        return _launch_saving(_temporal_attention_block_op, _wants_grad(x, proj_weight, proj_bias, *flat),
                              *autocast_inputs(x, gs, wq, wk, wv, wos, proj_weight, bias), batch, heads,
                              layers[0][0] is not None, residual_attn)
    return temporal_attention_block_ref(x, layers, proj_weight, proj_bias, batch, heads, dropout, training,
                                        residual_attn)
