"""The frozen image model's fast path: denoising-diffusion-pytorch's ``KarrasUnet`` through ``lumiere_fast`` ops.

``accelerate_karras_unet(unet)`` changes, in place, the class of each module it recognises (exactly upstream's
``Conv2d``, ``Linear``, ``MPAdd``, ``MPCat``, ``Encoder``, ``Decoder``, ``Attention``) to a subclass here with a
faster ``forward`` of the same signature. No module object is replaced, so the Lumiere hooks registered on them
(and ``lumiere.model``, the state dict, parameter and module names) stay upstream's. What changes:

* **Cached weights.** A frozen MP weight (``requires_grad=False``) is normalised once: ``normalize_weight(w) /
  sqrt(fan_in)``, times the linear factors folded into it below, stored in the compute dtype (the autocast dtype
  under autocast), reused until the weight's version counter, storage, device or dtype changes. In train mode
  upstream renormalises the stored weight in place on every call; here that happens on the first call and is
  skipped while the weight is unchanged (renormalising a normalised weight changes it only by rounding). Weights
  that require grad keep upstream's behaviour exactly.
* **Folded linear factors.** The MP-SiLU divisor 0.596 in front of a conv and the MP-add weight of the branch
  behind it are scalars of a linear map, so they go into the conv's cached weight; the elementwise passes left
  are plain SiLU (fused with the pixel norm, or with the embedding modulation: ``ops.karras``) and one
  ``torch.add(res, branch, alpha=)`` for the residual.
* **Attention**: one pixel norm over q, k and v together, memory keys concatenated, ``ops.softmax_attention`` (SDPA)
  (upstream's einsum softmax, or its own SDPA call with ``flash=True``: the same math up to rounding).
* **Resizes** (the encoder's downsample, the decoder's upsample): ``ops.karras.resize2x``, upstream's bilinear
  ``F.interpolate``; in deterministic mode on CUDA the same 2x stencil as ops with a deterministic backward
  (instead of ``F.interpolate``'s slow gather/index_put decomposition there).
* ``checkpoint=True``: each encoder/decoder block's body runs under ``torch.utils.checkpoint`` (non-reentrant)
  when its input requires grad: the block's activations are recomputed in backward; same outputs and gradients.

A block runs upstream's own ``forward`` whenever a submodule it would call functionally carries a hook (e.g.
Lumiere's dry run, or a temporal layer after ``downs.0.block1``), so every hook still sees its module run;
Lumiere's conditioning pre-hook on ``MPAdd``/``Attend`` is recognised as the identity it is there (every
argument has the frames' batch). Under ``torch.compile`` frozen weights are normalised inside the graph (no
version counters there) and the stored weight is not rewritten.
"""

from __future__ import annotations

import sys
from math import sqrt

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..ops import karras as karras_ops
from ..ops.attention import softmax_attention
from ..ops.mp_math import MP_SILU_DIVISOR
from ..ops.weight_norm import normalize_weight, renormalize_

_UPSTREAM = 'denoising_diffusion_pytorch.karras_unet'
_CACHE_ATTRS = ('_lf_cache', '_lf_renormed')


def _upstream():
    """denoising_diffusion_pytorch.karras_unet where it is already imported (it is whenever a KarrasUnet exists;
    importing it here would cost every other user the package's heavy imports)."""
    return sys.modules.get(_UPSTREAM)


def _mp_add_coeffs(t: float) -> tuple[float, float]:
    """MPAdd(t): out = x * ca + res * cb."""
    den = sqrt((1 - t) ** 2 + t ** 2)
    return (1. - t) / den, t / den


# ---------------------------------------------------------------------------------------------- cached weights

def _compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    dev = x.device.type
    if w.is_floating_point() and w.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return w.dtype


def _scaled(layer: nn.Module, factor: float) -> Tensor:
    weight = normalize_weight(layer.weight, layer.eps) / sqrt(layer.fan_in)
    return weight if factor == 1. else weight * factor


def mp_layer_weight(layer: nn.Module, x: Tensor, factor: float = 1.) -> Tensor:
    """The weight an MP ``Conv2d``/``Linear`` applies to ``x``, times ``factor``: cached for a frozen weight
    (see the module docstring), upstream's per-call normalisation (with the train-mode in-place renormalisation)
    for one that requires grad."""
    w = layer.weight
    if w.requires_grad:
        if layer.training:
            renormalize_(w, layer.eps)
        return _scaled(layer, factor)
    if torch.compiler.is_compiling():
        return _scaled(layer, factor)
    state = layer.__dict__
    if layer.training:
        done = state.get('_lf_renormed')
        if done is None or done[0] is not w or done[1] != (w._version, w.data_ptr()):
            renormalize_(w, layer.eps)
            state['_lf_renormed'] = (w, (w._version, w.data_ptr()))
    dtype = _compute_dtype(x, w)
    key = (w._version, w.data_ptr(), w.device, dtype)
    cache = state.setdefault('_lf_cache', {})
    hit = cache.get(factor)
    if hit is not None and hit[0] is w and hit[1] == key:
        return hit[2]
    # outside inference mode: a weight cached under torch.inference_mode must still serve a later training step
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        weight = _scaled(layer, factor).to(dtype)
    cache[factor] = (w, key, weight)
    return weight


def _conv(layer: nn.Module, x: Tensor, factor: float = 1.) -> Tensor:
    """An MP Conv2d's forward with ``factor`` folded into its weight."""
    if layer.concat_ones_to_input:
        x = F.pad(x, (0, 0, 0, 0, 1, 0), value=1.)
    return F.conv2d(x, mp_layer_weight(layer, x, factor), padding='same')


class _DropsCaches:
    """Pickles and deep copies leave the weight caches behind (recomputed on first use)."""

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__
        return {k: v for k, v in state.items() if k not in _CACHE_ATTRS}


# ---------------------------------------------------------------------------------------------- hook checks

_GLOBAL_HOOKS = ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
                 '_global_backward_pre_hooks')


def _identity_pre_hook(hook) -> bool:
    """Lumiere's conditioning pre-hook: it repeats arguments with fewer rows than the first; on modules whose
    arguments all share the frames' batch (MPAdd, Attend) it returns them unchanged."""
    klass = type(hook)
    return klass.__name__ == '_ConditioningHook' and klass.__module__.startswith('lumiere_fast')


def _unhooked(*modules: nn.Module) -> bool:
    """No hook would see these modules run (so a block may compute them without calling them)."""
    if any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS):
        return False
    for m in modules:
        if m._forward_hooks or m._backward_hooks or getattr(m, '_backward_pre_hooks', None):
            return False
        if any(not _identity_pre_hook(h) for h in m._forward_pre_hooks.values()):
            return False
    return True


# ---------------------------------------------------------------------------------------------- leaf layers

def _build(ku) -> dict:
    """The fast subclasses of upstream's classes, made on first use (see ``__getattr__``)."""

    class FastConv2d(_DropsCaches, ku.Conv2d):
        def forward(self, x):
            return _conv(self, x)

    class FastLinear(_DropsCaches, ku.Linear):
        def forward(self, x):
            return F.linear(x, mp_layer_weight(self, x))

    class FastMPAdd(ku.MPAdd):
        def forward(self, x, res):
            ca, cb = _mp_add_coeffs(self.t)
            return torch.add(x * ca, res, alpha=cb)

    class FastMPCat(ku.MPCat):
        def forward(self, a, b):
            if self.dim in (1, -3) and a.ndim == 4:
                return karras_ops.mp_cat(a, b, self.t)
            return super().forward(a, b)

    # ------------------------------------------------------------------------------------------ blocks

    def _block_structure_ok(block) -> bool:
        """The block is built as upstream builds it (so its fast forward computes the same function)."""
        b1, b2 = block.block1, block.block2
        return (isinstance(b1, nn.Sequential) and len(b1) == 2 and type(b1[0]) is ku.MPSiLU
                and type(b1[1]) in (ku.Conv2d, FastConv2d)
                and isinstance(b2, nn.Sequential) and len(b2) == 3 and type(b2[0]) is ku.MPSiLU
                and type(b2[1]) is nn.Dropout and type(b2[2]) in (ku.Conv2d, FastConv2d)
                and type(block.res_mp_add) in (ku.MPAdd, FastMPAdd))

    class _FastBlock(nn.Module):
        """Shared by the encoder and decoder: the embedding-modulated double conv and the residual add."""

        _lf_checkpoint = False

        def _inner_modules(self):
            return (self.block1, *self.block1, self.block2, *self.block2, self.res_mp_add)

        def forward(self, x, emb=None):
            if not (self.__dict__.get('_lf_ok') and _unhooked(*self._inner_modules())):
                return super().forward(x, emb=emb)
            if self._lf_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                return _checkpoint(self._fast_body, x, emb, use_reentrant=False)
            return self._fast_body(x, emb)

        def _branch(self, h, res, emb):
            """h: block1's SiLU output (the MP-SiLU divisor goes into conv1) -> mp_add(block2(...), res)."""
            h = _conv(self.block1[1], h, 1. / MP_SILU_DIVISOR)
            if emb is not None:
                h = karras_ops.scale_silu(h, self.to_emb(emb) + 1)
            else:
                h = F.silu(h)
            drop = self.block2[1]
            h = F.dropout(h, drop.p, drop.training, drop.inplace)
            ca, cb = _mp_add_coeffs(self.res_mp_add.t)
            x = torch.add(_conv(self.block2[2], h, ca / MP_SILU_DIVISOR), res, alpha=cb)
            if self.attn is not None:
                x = self.attn(x)
            return x

    class FastEncoder(_FastBlock, ku.Encoder):
        def _inner_modules(self):
            return (self.pixel_norm, *super()._inner_modules())

        def _fast_body(self, x, emb):
            if self.downsample:
                x = karras_ops.resize2x(x, up=False)
                x = self.downsample_conv(x)
            res, h = karras_ops.pixel_norm_silu(x, self.pixel_norm.eps)
            return self._branch(h, res, emb)

    class FastDecoder(_FastBlock, ku.Decoder):
        def _fast_body(self, x, emb):
            if self.upsample:
                x = karras_ops.resize2x(x, up=True)
            res = self.res_conv(x)
            return self._branch(F.silu(x), res, emb)

    class FastAttention(ku.Attention):
        def forward(self, x):
            if not (self.__dict__.get('_lf_ok') and _unhooked(self.pixel_norm, self.attend, self.to_qkv,
                                                               self.to_out, self.mp_add)):
                return super().forward(x)
            b, c, hh, ww = x.shape
            heads = self.heads
            d = self.mem_kv.shape[-1]
            eps = self.pixel_norm.eps
            # b (3 h d) x y -> b 3 h d (x y): the pixel norm over d for q, k and v in one pass
            qkv = _conv(self.to_qkv, x).view(b, 3, heads, d, hh * ww)
            qkv = karras_ops.pixel_norm_sumsq(qkv, 3, eps)
            q, k, v = qkv.transpose(-1, -2).unbind(1)                         # each b h (x y) d
            mem = karras_ops.pixel_norm_sumsq(self.mem_kv, -1, eps)           # 2 h m d
            mk, mv = (t.to(q.dtype).expand(b, -1, -1, -1) for t in mem.unbind(0))
            k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
            out = softmax_attention(q, k, v)                                  # scale d ** -0.5, as upstream
            out = out.transpose(-1, -2).reshape(b, heads * d, hh, ww)         # b h (x y) d -> b (h d) x y
            ca, cb = _mp_add_coeffs(self.mp_add.t)
            return torch.add(_conv(self.to_out, out, ca), x, alpha=cb)

    def _attention_ok(attn) -> bool:
        a = attn.attend
        return (type(a).__name__ == 'Attend' and not a.dropout and a.scale is None
                and type(attn.pixel_norm) is ku.PixelNorm and attn.pixel_norm.dim == -1
                and type(attn.to_qkv) in (ku.Conv2d, FastConv2d) and type(attn.to_out) in (ku.Conv2d, FastConv2d)
                and type(attn.mp_add) in (ku.MPAdd, FastMPAdd) and attn.mem_kv.ndim == 4)

    def _encoder_ok(enc) -> bool:
        return type(enc.pixel_norm) is ku.PixelNorm and enc.pixel_norm.dim in (1, -3) and _block_structure_ok(enc)

    # upstream class -> (fast class, check that the instance is built as upstream builds it)
    _FAST = {
        ku.Conv2d: (FastConv2d, None),
        ku.Linear: (FastLinear, None),
        ku.MPAdd: (FastMPAdd, None),
        ku.MPCat: (FastMPCat, None),
        ku.Encoder: (FastEncoder, _encoder_ok),
        ku.Decoder: (FastDecoder, _block_structure_ok),
        ku.Attention: (FastAttention, _attention_ok),
    }
    classes = dict(FastConv2d=FastConv2d, FastLinear=FastLinear, FastMPAdd=FastMPAdd, FastMPCat=FastMPCat,
                   FastEncoder=FastEncoder, FastDecoder=FastDecoder, FastAttention=FastAttention,
                   _FastBlock=_FastBlock)
    for klass in classes.values():      # pickle finds them as lumiere_fast.modules.karras.<name> (__getattr__)
        klass.__qualname__ = klass.__name__
    return dict(classes, _FAST=_FAST, _FAST_CLASSES={fast: check for fast, check in _FAST.values()})


_BUILT: dict = {}


def _fast() -> dict:
    if not _BUILT:
        ku = _upstream()
        if ku is None:
            ku = __import__(_UPSTREAM, fromlist=['KarrasUnet'])
        _BUILT.update(_build(ku))
    return _BUILT


def __getattr__(name: str):
    """``FastConv2d`` etc. are built on first access (pickle finds them here by name, too)."""
    if name.startswith('Fast') or name == '_FastBlock':
        classes = _fast()
        if name in classes:
            return classes[name]
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')




def is_karras_unet(model: nn.Module) -> bool:
    """``model`` is a denoising-diffusion-pytorch ``KarrasUnet`` (the class itself, not a subclass)."""
    ku = _upstream()
    return ku is not None and type(model) is ku.KarrasUnet


def accelerate_karras_unet(unet: nn.Module, *, checkpoint: bool = False) -> nn.Module:
    """Route the recognised modules of a ``KarrasUnet`` through the fast path, in place; returns ``unet``.

    Modules it does not recognise (subclasses, other layers) and models that are not a ``KarrasUnet`` run
    unchanged. ``checkpoint``: activation checkpointing of every encoder/decoder block (call again to switch it).
    Idempotent; the state dict, parameter and module names are upstream's.
    """
    if not is_karras_unet(unet):
        return unet
    classes = _fast()
    fast_of, checks, block = classes['_FAST'], classes['_FAST_CLASSES'], classes['_FastBlock']
    for m in unet.modules():
        klass = type(m)
        if klass in fast_of:
            fast, check = fast_of[klass]
            m.__class__ = fast
        elif klass in checks:
            check = checks[klass]
        else:
            continue
        if check is not None:
            m._lf_ok = bool(check(m))
        if isinstance(m, block):
            m._lf_checkpoint = bool(checkpoint)
    return unet
