"""Attention inflation blocks; the attention math is in ``ops.attention``.

The non-MP block keeps x-transformers' module tree (``temporal_attns.N.fn.0.g``, ``...fn.1.to_q.weight``) so
upstream state dicts load, without importing x-transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import TemporalModule
from .mp_layers import Gain, MPAdd, MPLinear


def _check_kwargs(owner: str, given: dict, allowed: dict) -> dict:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f'{owner}: unsupported attention keyword(s) {unknown}; supported: {sorted(allowed)}')
    out = {**allowed, **given}
    for key in ('heads', 'dim_head'):
        if key in out and (not isinstance(out[key], int) or out[key] < 1):
            raise ValueError(f'{owner}: expected {key} as a positive int, got {out[key]!r}')
    if 'num_mem_kv' in out and (not isinstance(out['num_mem_kv'], int) or out['num_mem_kv'] < 0):
        raise ValueError(f'{owner}: expected num_mem_kv as an int >= 0, got {out["num_mem_kv"]!r}')
    if 'dropout' in out and not 0. <= float(out['dropout']) < 1.:
        raise ValueError(f'{owner}: expected dropout in [0, 1), got {out["dropout"]!r}')
    return out


def _layers_dropout(block: nn.Module, dropouts: list) -> float:
    """The one dropout probability of a block's attention layers (the fused op applies one to every layer)."""
    ps = {float(d.p) for d in dropouts}
    if len(ps) > 1:
        raise ValueError(f'{type(block).__name__}: its attention layers have different dropout probabilities '
                         f'{sorted(ps)}; set the same p on every layer\'s nn.Dropout')
    return ps.pop()


class RMSNorm(nn.Module):
    """x-transformers' RMSNorm: ``F.normalize(x, dim=-1) * sqrt(dim) * g``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.g


class Attention(nn.Module):
    """x-transformers' Attention for its defaults: bias-free q/k/v/out projections, softmax in fp32.

    As in x-transformers, a single head has no output projection (``to_out`` is an identity), so its
    ``dim_head`` must equal ``dim``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.):
        super().__init__()
        if heads == 1 and dim_head != dim:
            raise ValueError(f'AttentionInflationBlock: with heads=1 there is no output projection (as in '
                             f'x-transformers), so dim_head must equal dim={dim}; got dim_head={dim_head}')
        hidden = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.attn_dropout = nn.Dropout(dropout)        # x-transformers' Attend holds an nn.Dropout too; read per call
        self.to_q = nn.Linear(dim, hidden, bias=False)
        self.to_k = nn.Linear(dim, hidden, bias=False)
        self.to_v = nn.Linear(dim, hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False) if heads > 1 else nn.Identity()

    def weights(self):
        wo = self.to_out.weight if isinstance(self.to_out, nn.Linear) else None
        return self.to_q.weight, self.to_k.weight, self.to_v.weight, wo

    def forward(self, x: Tensor) -> Tensor:
        return ops.attention_layer(x, None, *self.weights(), self.heads, self.attn_dropout.p, self.training, False)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class AttentionInflationBlock(TemporalModule):
    def __init__(self, *, dim, depth=1, prenorm=True, residual_attn=True, time_dim=None, channel_last=False,
                 **attn_kwargs):
        super().__init__(dim, time_dim, channel_last)
        kw = _check_kwargs(type(self).__name__, attn_kwargs, dict(heads=8, dim_head=64, dropout=0.))
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f'{type(self).__name__}: expected depth as a positive int, got {depth!r}')
        self.heads, self.prenorm, self.residual_attn = kw['heads'], bool(prenorm), bool(residual_attn)
        self.temporal_attns = nn.ModuleList()
        for _ in range(depth):
            attn = nn.Sequential(*([RMSNorm(dim)] if prenorm else []), Attention(dim, **kw))
            self.temporal_attns.append(Residual(attn) if residual_attn else attn)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _layers(self):
        for layer in self.temporal_attns:
            seq = layer.fn if self.residual_attn else layer
            g = seq[0].g if self.prenorm else None
            attn = seq[-1]
            yield (g, *attn.weights())

    @property
    def dropout(self) -> float:
        """The attention dropout probability, read from the layers' ``nn.Dropout`` modules at every call."""
        return _layers_dropout(self, [(seq.fn if self.residual_attn else seq)[-1].attn_dropout
                                      for seq in self.temporal_attns])

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self.to_frames(x, batch_size)
        out = ops.temporal_attention_block(f.x, list(self._layers()), self.proj_out.weight, self.proj_out.bias,
                                           batch=f.batch, heads=self.heads, dropout=self.dropout, training=self.training,
                                           residual_attn=self.residual_attn)
        return self.from_frames(out, f)


class MPAttention(nn.Module):
    """One MP attention layer (upstream's ``MPAttention``): same parameters and keys."""

    def __init__(self, dim, heads=4, dim_head=64, num_mem_kv=4, mp_add_t=0.3, dropout=0.):
        super().__init__()
        self.heads = heads
        hidden = dim_head * heads
        self.scale = dim_head ** -0.5
        self.dropout = nn.Dropout(dropout)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = MPLinear(dim, hidden * 3)
        self.to_out = MPLinear(hidden, dim)
        self.mp_add = MPAdd(t=mp_add_t)

    def weights(self):
        return self.to_qkv.effective_weight(), self.to_out.effective_weight(), self.mem_kv

    def forward(self, x: Tensor) -> Tensor:
        return ops.mp_attention_layer(x, *self.weights(), self.heads, self.dropout.p, self.training)


class MPAttentionInflationBlock(TemporalModule):
    def __init__(self, *, dim, depth=1, time_dim=None, channel_last=False, mp_add_t=0.3, dropout=0., identity_init=False,
                 **attn_kwargs):
        super().__init__(dim, time_dim, channel_last)
        kw = _check_kwargs(type(self).__name__, attn_kwargs, dict(heads=4, dim_head=64, num_mem_kv=4))
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f'{type(self).__name__}: expected depth as a positive int, got {depth!r}')
        if not 0. <= float(dropout) < 1.:
            raise ValueError(f'{type(self).__name__}: expected dropout in [0, 1), got {dropout!r}')
        self.heads = kw['heads']
        self.temporal_attns = nn.ModuleList([MPAttention(dim=dim, dropout=dropout, **kw) for _ in range(depth)])
        self.proj_out = nn.Sequential(MPLinear(dim, dim), Gain())
        self.residual_mp_add = MPAdd(t=mp_add_t)
        if identity_init:            # opt-in: an exact identity at init (see TemporalModule.identity_init_)
            self.identity_init_()

    @property
    def dropout(self) -> float:
        """The attention dropout probability, read from the layers' ``nn.Dropout`` modules at every call."""
        return _layers_dropout(self, [attn.dropout for attn in self.temporal_attns])

    def forward(self, x: Tensor, batch_size: int | None = None) -> Tensor:
        f = self.to_frames(x, batch_size)
        layers = [attn.weights() for attn in self.temporal_attns]
        out = ops.mp_temporal_attention_block(f.x, layers, self.proj_out[0].effective_weight(), self.proj_out[1].gain,
                                              batch=f.batch, heads=self.heads, mp_add_t=self.residual_mp_add.t,
                                              dropout=self.dropout, training=self.training)
        return self.from_frames(out, f)
