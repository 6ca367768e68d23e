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
"""

from __future__ import annotations

from math import sqrt
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
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
    backend.choose('mp_temporal_attention_block', x, has_triton=False)
    return mp_temporal_attention_block_ref(x, layers, proj_weight, gain, batch, heads, mp_add_t, dropout, training)


def temporal_attention_block(x: Tensor, layers: Sequence[tuple], proj_weight: Tensor, proj_bias: Tensor | None, *,
                             batch: int, heads: int, dropout: float = 0., training: bool = False,
                             residual_attn: bool = True) -> Tensor:
    """(b t) c H W -> (b t) c H W; ``layers``: [(g or None, wq, wk, wv, wo)] per depth."""
    _check('temporal_attention_block', x, batch, heads, proj_weight)
    backend.choose('temporal_attention_block', x, has_triton=False)
    return temporal_attention_block_ref(x, layers, proj_weight, proj_bias, batch, heads, dropout, training,
                                        residual_attn)
