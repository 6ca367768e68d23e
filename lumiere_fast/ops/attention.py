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

Triton path (``lumiere_fast.kernels.attention``; notes above the launcher below): the MP block registers
``lumiere_fast::mp_temporal_attention_block`` (+ ``..._backward``). Current state:
  * forward: Triton kernels (attention core per (clip, pixel, head) + a projection/MP-add GEMM per layer and for
    proj_out), reading x through its strides in the (b t) c H W layout: no fold/unfold copies;
  * backward: Triton kernels for x and every parameter (``_mp_block_backward``): the layer inputs and attention
    outputs are recomputed by the forward kernels, the attention core's backward recomputes its scores;
    weight grads are fp32 split-K reductions; only the memory keys/values' pixel-norm backward (an m x d tensor)
    is a torch op;
  * dropout > 0 in training takes the reference (supported=False): the kernels have no RNG;
  * the non-MP block (``temporal_attention_block``) and the single layers are reference-only for now.
"""

from __future__ import annotations

from math import sqrt
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._triton import NAMESPACE, dot_precision, grid_1d, new_output, use_triton
from .fold import fold_frames_ref, unfold_frames_ref
from .mp_math import mp_add, pixel_norm

MP_ATTN_ADD_T = 0.3


def _split_heads(t: Tensor, heads: int) -> Tensor:
    n, s, hd = t.shape
    return t.view(n, s, heads, hd // heads).transpose(1, 2)          # n h s d


def _merge_heads(t: Tensor) -> Tensor:
    n, h, s, d = t.shape
    return t.transpose(1, 2).reshape(n, s, h * d)                     # n s (h d)


def mp_attention_layer_ref(s: Tensor, qkv_weight: Tensor, out_weight: Tensor, mem_kv: Tensor, heads: int,
                           dropout: float = 0., training: bool = False) -> Tensor:
    """(n, t, c) -> (n, t, c): one MPAttention layer with its inner MP residual."""
    q, k, v = (_split_heads(p, heads) for p in F.linear(s, qkv_weight).chunk(3, dim=-1))
    n = s.shape[0]
    mk, mv = (m.unsqueeze(0).expand(n, -1, -1, -1) for m in mem_kv)
    k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
    q, k, v = pixel_norm(q), pixel_norm(k), pixel_norm(v)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if training else 0., scale=q.shape[-1] ** -0.5)
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
        return _mp_block_op(x, qkv, out, mem, proj_weight, gain, batch, heads, mp_add_t)
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
        return _block_op(x, gs, wq, wk, wv, wos, proj_weight, bias, batch, heads, layers[0][0] is not None,
                         residual_attn)
    return temporal_attention_block_ref(x, layers, proj_weight, proj_bias, batch, heads, dropout, training,
                                        residual_attn)


# ------------------------------------------------------------------------------------------ Triton path
#
# Kernels: lumiere_fast/kernels/attention.py (imported on first launch). Per layer:
#   attn_core_kernel (MP=True): one program per (clip, pixel, head) reads its pixel's [T, c] rows straight from the
#       (b t) c H W tensor (strided), projects q, k, v of its head, pixel-norms them (and the head's memory keys
#       and values), softmax over m + T keys in fp32 with the memory keys as a separate score block, P @ V; o goes
#       to a contiguous (b t) (h d) H W buffer.
#   linear_mp_add_kernel: out-projection + the inner MP residual into a contiguous (b t) c H W buffer.
# Then proj_out * gain + the outer MP residual with x (the same GEMM kernel). The o buffer is the one round trip
# the split costs (see the kernel module's docstring for why the layer is not one kernel).
# Backward (MP, _mp_block_backward): layer inputs and o recomputed by the forward kernels; the core backward
# (mp_attn_core_bwd_kernel) recomputes q, k, v and the probabilities per (clip, pixel, head) and writes dqkv;
# the rest are the same GEMM kernel on transposed weight views and split-K weight-grad reductions.
# Known costs of this first version (correctness and the fold-free layout first):
#   * tl.dot needs >= 16 rows, so short clips (T < 16) pad the time axis to 16, and each program handles one
#     pixel; batching BLOCK_N pixels per program (a 3-d dot) is the next step;
#   * T = 128 with d = 128 holds several [128, 128] fp32 tiles per program: it compiles but spills;
#   * the memory keys/values' grads are one fp32 atomic flush per (clip, pixel, head) program, spread over
#     _MEM_GRAD_SLOTS copies of the (2, h, m, d) buffer (summed after) to cut contention; per-tile partial sums
#     would cut the atomics themselves;
#   * the non-MP block's backward is a reference recompute (below).

_MAX_T = 128
_EPS = 1e-4
_MEM_GRAD_SLOTS = 512


def _attn_kernels():
    from ..kernels import attention as kernels
    return kernels


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mp_add_coeffs(t: float) -> tuple[float, float]:
    den = sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / den, t / den


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


def _device_ctx(x: Tensor):
    from contextlib import nullcontext
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _linear_mp_add(kern, inp: Tensor, w: Tensor, res: Tensor | None, gain: Tensor | None, c_out: float,
                   c_res: float = 0., bias: Tensor | None = None) -> Tensor:
    """c_out * (gain * (w @ inp per pixel) + bias) + c_res * res, all (b t) c H W; output contiguous. ``w`` may be a
    transposed view (the backward's w^T): it is read through its strides."""
    n, ci, _, width = inp.shape
    co, p = w.shape[0], inp.shape[-2] * inp.shape[-1]
    out = new_output((n, co, *inp.shape[-2:]), inp)
    r = res if res is not None else out     # unused pointer without HAS_RES
    kern.linear_mp_add_kernel[lambda m: grid_1d(n * _cdiv(p, m['BLOCK_P']) * _cdiv(co, m['BLOCK_CO']))](
        inp, *inp.stride(), w, w.stride(0), w.stride(1), r, *r.stride(), out,
        gain if gain is not None else out, bias if bias is not None else out, c_out, c_res, n, ci, co, p, width,
        HAS_GAIN=gain is not None, HAS_BIAS=bias is not None, HAS_RES=res is not None, PREC=dot_precision(inp),
        BLOCK_CI=min(32, max(16, _pow2(ci))))
    return out


def _target_programs(x: Tensor) -> int:
    if x.is_cuda:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 4        # the interpreter: a few programs, each looping, is as fast as many


def _weight_grad(kern, a: Tensor, b: Tensor) -> Tensor:
    """fp32 [ca, cb] = sum over frames and pixels of a (x) b (both (b t) c H W, any strides)."""
    n, ca, _, width = a.shape
    cb, p = b.shape[1], a.shape[-2] * a.shape[-1]
    blk_a, blk_b, blk_p = kern.WGRAD_BLOCKS
    g = torch.zeros(ca, cb, dtype=torch.float32, device=a.device)
    tiles = _cdiv(ca, blk_a) * _cdiv(cb, blk_b)
    rows = n * _cdiv(p, blk_p)
    rows_per_prog = _cdiv(rows, max(1, min(rows, _target_programs(a) // tiles)))
    kern.weight_grad_kernel[grid_1d(_cdiv(rows, rows_per_prog) * tiles)](
        a, *a.stride(), b, *b.stride(), g, n, ca, cb, p, width, rows_per_prog,
        PREC=dot_precision(a), BLOCK_A=blk_a, BLOCK_B=blk_b, BLOCK_P=blk_p, num_warps=kern.WGRAD_WARPS)
    return g


def _pixel_norm_backward(raw: Tensor, dy: Tensor) -> Tensor:
    """Grad of pixel_norm(raw) (eps _EPS) over the last axis, for the tiny (2, h, m, d) memory tensor."""
    scale = sqrt(raw.shape[-1])
    nrm = raw.norm(dim=-1, keepdim=True)
    den = nrm.clamp_min(_EPS)
    u = raw / den
    dx = torch.where(nrm > _EPS, dy - u * (u * dy).sum(-1, keepdim=True), dy)
    return dx * (scale / den)


def _core_meta(frames: int, c: int, d: int, m: int, x: Tensor) -> dict:
    return dict(HAS_MEM=m > 0, PREC=dot_precision(x), BLOCK_T=max(16, _pow2(frames)), BLOCK_D=max(16, _pow2(d)),
                BLOCK_CK=min(32, max(16, _pow2(c))), BLOCK_M=max(16, _pow2(m)), num_warps=4)


def _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads):
    """Runs the layers; returns every layer input s_0 = x .. s_depth and every attention output o_l."""
    n, c, height, width = x.shape
    frames, p = n // batch, height * width
    a, b = _mp_add_coeffs(MP_ATTN_ADD_T)
    ss, os_ = [x], []
    for qkv_weight, out_weight, mem_kv in zip(qkv, outw, mem):
        s = ss[-1]
        hd = qkv_weight.shape[0] // 3
        d, m = hd // heads, mem_kv.shape[2]
        o = new_output((n, hd, height, width), x)
        w = (qkv_weight, qkv_weight.stride(0), qkv_weight.stride(1))
        kern.attn_core_kernel[grid_1d(batch * p * heads)](
            s, *s.stride(), *w, *w, *w, hd, 2 * hd, mem_kv, *mem_kv.stride(), o, o,
            frames, c, p, width, heads, d, m, sqrt(d), d ** -0.5, _EPS, 1., 1.,
            MP=True, HAS_G=False, **_core_meta(frames, c, d, m, x))
        os_.append(o)
        ss.append(_linear_mp_add(kern, o, out_weight, s, None, a, b))
    return ss, os_


def _mp_block_forward(x: Tensor, qkv: list[Tensor], outw: list[Tensor], mem: list[Tensor], proj_weight: Tensor,
                      gain: Tensor, batch: int, heads: int, mp_add_t: float) -> Tensor:
    kern = _attn_kernels()
    with _device_ctx(x):
        ss, _ = _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads)
        return _linear_mp_add(kern, ss[-1], proj_weight, x, gain.reshape(1), *_mp_add_coeffs(mp_add_t))


def _mp_block_backward(grad: Tensor, x: Tensor, qkv: list[Tensor], outw: list[Tensor], mem: list[Tensor],
                       proj_weight: Tensor, gain: Tensor, batch: int, heads: int, mp_add_t: float) -> list[Tensor]:
    """Grads of (x, proj_weight, gain, *qkv, *outw, *mem). The layers' inputs and attention outputs are recomputed
    with the forward kernels (nothing but the op's inputs is saved), then walked back:
      outer:  dS = c_out * gain * P^T g (linear kernel on the transposed view), dP, dgain from G = sum g (x) s;
      layer:  do = a Wo^T dS;  dWo = a sum dS (x) o;  core backward kernel -> dqkv (+ memory grads, atomics);
              dWqkv = sum dqkv (x) s;  dS_prev = Wqkv^T dqkv + b dS.
    Weight grads are fp32 split-K reductions (weight_grad_kernel), cast to the parameter dtype at the end; the
    memory keys/values' pixel-norm backward is an m x d torch op on the host."""
    kern = _attn_kernels()
    n, c, height, width = x.shape
    frames, p = n // batch, height * width
    c_out, c_res = _mp_add_coeffs(mp_add_t)
    a, b = _mp_add_coeffs(MP_ATTN_ADD_T)
    with _device_ctx(x):
        ss, os_ = _mp_layers_forward(kern, x, qkv, outw, mem, batch, heads)
        gs = _weight_grad(kern, grad, ss[-1])
        d_proj = (gs * (c_out * gain.float())).to(proj_weight.dtype)
        d_gain = ((proj_weight.float() * gs).sum() * c_out).reshape(gain.shape).to(gain.dtype)
        ds = _linear_mp_add(kern, grad, proj_weight.t(), None, gain.reshape(1), c_out)
        d_qkv, d_out, d_mem = [None] * len(qkv), [None] * len(qkv), [None] * len(qkv)
        for i in reversed(range(len(qkv))):
            qkv_weight, out_weight, mem_kv, s = qkv[i], outw[i], mem[i], ss[i]
            hd = qkv_weight.shape[0] // 3
            d, m = hd // heads, mem_kv.shape[2]
            do = _linear_mp_add(kern, ds, out_weight.t(), None, None, a)
            d_out[i] = (_weight_grad(kern, ds, os_[i]) * a).to(out_weight.dtype)
            dqkv = new_output((n, 3 * hd, height, width), x)
            slots = min(_MEM_GRAD_SLOTS if x.is_cuda else 3, batch * p)      # 3: the tests exercise slots
            dmem = torch.zeros((slots, *mem_kv.shape), dtype=torch.float32, device=x.device)
            kern.mp_attn_core_bwd_kernel[grid_1d(batch * p * heads)](
                s, *s.stride(), qkv_weight, qkv_weight.stride(0), qkv_weight.stride(1),
                mem_kv, *mem_kv.stride(), do, dqkv, dmem,
                frames, c, p, width, heads, d, m, sqrt(d), d ** -0.5, _EPS, slots, **_core_meta(frames, c, d, m, x))
            d_qkv[i] = _weight_grad(kern, dqkv, s).to(qkv_weight.dtype)
            ds = _linear_mp_add(kern, dqkv, qkv_weight.t(), ds, None, 1., b)
            d_mem[i] = _pixel_norm_backward(mem_kv.float(), dmem.sum(0)).to(mem_kv.dtype)
        d_x = ds + grad * c_res
    return [d_x, d_proj, d_gain, *d_qkv, *d_out, *d_mem]


# --- torch.library registration: real ops for torch.compile (fake impls give shapes), autograd by a backward op


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_attention_block', mutates_args=())
def _mp_block_op(x: Tensor, qkv_weights: list[Tensor], out_weights: list[Tensor], mem_kvs: list[Tensor],
                 proj_weight: Tensor, gain: Tensor, batch: int, heads: int, mp_add_t: float) -> Tensor:
    return _mp_block_forward(x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t)


@_mp_block_op.register_fake
def _(x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t):
    return x.new_empty(x.shape)


@torch.library.custom_op(f'{NAMESPACE}::mp_temporal_attention_block_backward', mutates_args=())
def _mp_block_backward_op(grad: Tensor, x: Tensor, qkv_weights: list[Tensor], out_weights: list[Tensor],
                          mem_kvs: list[Tensor], proj_weight: Tensor, gain: Tensor, batch: int, heads: int,
                          mp_add_t: float) -> list[Tensor]:
    return _mp_block_backward(grad, x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t)


@_mp_block_backward_op.register_fake
def _(grad, x, qkv_weights, out_weights, mem_kvs, proj_weight, gain, batch, heads, mp_add_t):
    return [torch.empty_like(t) for t in (x, proj_weight, gain, *qkv_weights, *out_weights, *mem_kvs)]


def _mp_setup_context(ctx, inputs, output):
    x, qkv, outw, mem, proj_weight, gain, batch, heads, mp_add_t = inputs
    ctx.save_for_backward(x, proj_weight, gain, *qkv, *outw, *mem)
    ctx.depth, ctx.batch, ctx.heads, ctx.mp_add_t = len(qkv), batch, heads, mp_add_t


def _mp_autograd_backward(ctx, grad):
    saved, depth = ctx.saved_tensors, ctx.depth
    x, proj_weight, gain = saved[:3]
    qkv, outw, mem = (list(saved[3 + i * depth:3 + (i + 1) * depth]) for i in range(3))
    g = _mp_block_backward_op(grad, x, qkv, outw, mem, proj_weight, gain, ctx.batch, ctx.heads, ctx.mp_add_t)
    return (g[0], list(g[3:3 + depth]), list(g[3 + depth:3 + 2 * depth]), list(g[3 + 2 * depth:]), g[1], g[2],
            None, None, None)


_mp_block_op.register_autograd(_mp_autograd_backward, setup_context=_mp_setup_context)


# --- non-MP (x-transformers) block: forward kernels, backward by a reference recompute (current state)

_RMS_EPS = 1e-12      # F.normalize's default eps (the RMSNorm)


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


def _block_forward(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn):
    kern = _attn_kernels()
    n, c, height, width = x.shape
    frames, p = n // batch, height * width
    s = x
    with _device_ctx(x):
        for g, wq, wk, wv, wo in zip(gs, wqs, wks, wvs, wos):
            hd = wq.shape[0]
            d = hd // heads
            o = new_output((n, hd, height, width), x)
            kern.attn_core_kernel[grid_1d(batch * p * heads)](
                s, *s.stride(), wq, *wq.stride(), wk, *wk.stride(), wv, *wv.stride(), 0, 0, o, 0, 0, 0, 0, g, o,
                frames, c, p, width, heads, d, 0, 1., d ** -0.5, 1., sqrt(c), _RMS_EPS,
                MP=False, HAS_G=prenorm, **dict(_core_meta(frames, c, d, 0, x), HAS_MEM=False))
            # heads=1 without an output projection runs wo = identity through the same GEMM (c x c, small)
            s = _linear_mp_add(kern, o, wo, s if residual_attn else None, None, 1., 1.)
        return _linear_mp_add(kern, s, proj_weight, x, None, 1., 1., bias=proj_bias)


@torch.library.custom_op(f'{NAMESPACE}::temporal_attention_block', mutates_args=())
def _block_op(x: Tensor, gs: list[Tensor], wqs: list[Tensor], wks: list[Tensor], wvs: list[Tensor],
              wos: list[Tensor], proj_weight: Tensor, proj_bias: Tensor, batch: int, heads: int, prenorm: bool,
              residual_attn: bool) -> Tensor:
    return _block_forward(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn)


@_block_op.register_fake
def _(x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn):
    return x.new_empty(x.shape)


def _block_setup_context(ctx, inputs, output):
    x, gs, wqs, wks, wvs, wos, proj_weight, proj_bias, batch, heads, prenorm, residual_attn = inputs
    ctx.save_for_backward(x, proj_weight, proj_bias, *gs, *wqs, *wks, *wvs, *wos)
    ctx.depth, ctx.batch, ctx.heads, ctx.prenorm, ctx.residual_attn = len(wqs), batch, heads, prenorm, residual_attn


def _block_autograd_backward(ctx, grad):
    """Current state: the reference's autograd, recomputed from the saved inputs (no Triton backward kernels yet).
    It runs here, in the autograd backward, not inside a custom op: a custom op's body runs below the autograd
    dispatch key, where the reference could not build its graph."""
    saved, depth = ctx.saved_tensors, ctx.depth
    leaves = [t.detach().requires_grad_(True) for t in saved]
    x, pw, pb = leaves[:3]
    gs, wqs, wks, wvs, wos = (leaves[3 + i * depth:3 + (i + 1) * depth] for i in range(5))
    layers = [(g if ctx.prenorm else None, wq, wk, wv, wo) for g, wq, wk, wv, wo in zip(gs, wqs, wks, wvs, wos)]
    with torch.enable_grad():
        y = temporal_attention_block_ref(x, layers, pw, pb, ctx.batch, ctx.heads, 0., False, ctx.residual_attn)
        grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    lists = [grads[3 + i * depth:3 + (i + 1) * depth] for i in range(5)]
    return (grads[0], *lists, grads[1], grads[2], None, None, None, None)


_block_op.register_autograd(_block_autograd_backward, setup_context=_block_setup_context)
