"""The op layer's references against plain compositions of torch ops in upstream's (b h w) c t layout.

The references skip upstream's fold/unfold copies by working on views of the frames; these tests hold each
to the obvious fold -> op -> unfold composition on shapes chosen to break view arithmetic (t=1, odd sizes,
one pixel, non-contiguous inputs), forward and backward, fp32 and fp64.
"""

from __future__ import annotations

from math import sqrt

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from lumiere_fast import ops

# fp64: the same math in another order, exact to rounding; fp32: another summation order through norms and
# softmax, whose gradients amplify rounding (seen up to 4e-5 absolute on unit-scale random inputs)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}
SHAPES = [  # batch, frames, channels, h, w
    (1, 1, 1, 1, 1), (2, 1, 3, 2, 5), (1, 7, 5, 3, 1), (3, 4, 16, 2, 2), (2, 9, 7, 5, 3), (1, 2, 33, 1, 4),
]


def _frames(b, t, c, h, w, dtype, contiguous=True):
    if contiguous:
        x = torch.randn(b * t, c, h, w, dtype=dtype)
    else:                                   # a channel-sliced, w-strided view: non-contiguous
        x = torch.randn(b * t, c + 2, h, 2 * w, dtype=dtype)[:, 1:c + 1, :, ::2]
    return x.requires_grad_(True)


def _fold(x, b):
    return rearrange(x, '(b t) c h w -> (b h w) c t', b=b)


def _unfold(y, b, h, w):
    return rearrange(y, '(b h w) c t -> (b t) c h w', b=b, h=h, w=w)


def _check(fn_ours, fn_ref, inputs, dtype):
    out_o, out_r = fn_ours(*inputs), fn_ref(*inputs)
    torch.testing.assert_close(out_o, out_r, **TOL[dtype])
    cot = torch.randn_like(out_r)
    go = torch.autograd.grad(out_o, inputs, cot, allow_unused=True)
    gr = torch.autograd.grad(out_r, inputs, cot, allow_unused=True)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('layout', ['c t', 't c'])
def test_fold_unfold_roundtrip(shape, layout):
    b, t, c, h, w = shape
    x = torch.randn(b * t, c, h, w)
    y = ops.fold_frames(x, b, layout)
    expect = x.view(b, t, c, h, w).permute(0, 3, 4, 2, 1).reshape(b * h * w, c, t)
    torch.testing.assert_close(y, expect if layout == 'c t' else expect.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(ops.unfold_frames(y, b, h, w, layout), x, rtol=0, atol=0)


def test_fold_errors():
    with pytest.raises(ValueError, match='4-dim'):
        ops.fold_frames(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match='batch \\(4\\) x frames'):
        ops.fold_frames(torch.randn(6, 3, 2, 2), 4)
    with pytest.raises(ValueError, match="layout: expected one of"):
        ops.fold_frames(torch.randn(6, 3, 2, 2), 2, 'ct')
    with pytest.raises(ValueError, match='batch\\*height\\*width'):
        ops.unfold_frames(torch.randn(6, 3, 2), 2, 2, 2)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('k', [1, 3, 5])
@pytest.mark.parametrize('contiguous', [True, False])
def test_temporal_conv1d_frames_form(dtype, shape, k, contiguous):
    b, t, c, h, w = shape
    c_out = c + 2                              # channel-changing, too
    x = _frames(b, t, c, h, w, dtype, contiguous)
    weight = torch.randn(c_out, c, k, dtype=dtype, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, requires_grad=True)
    _check(lambda x, wt, bs: ops.temporal_conv1d(x, wt, bs, batch=b),
           lambda x, wt, bs: _unfold(F.conv1d(_fold(x, b), wt, bs, padding=k // 2), b, h, w),
           (x, weight, bias), dtype)


def test_temporal_conv1d_3d_form_and_gradcheck():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ops.temporal_conv1d(x, weight), F.conv1d(x, weight, padding=1))
    assert torch.autograd.gradcheck(lambda x, wt: ops.temporal_conv1d(x, wt), (x, weight))


def test_temporal_conv1d_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match='odd kernel size, got 2'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 2), batch=2)
    with pytest.raises(ValueError, match='x has 3 channels, weight expects 4'):
        ops.temporal_conv1d(x, torch.randn(3, 4, 3), batch=2)
    with pytest.raises(ValueError, match='needs batch=b'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 3))
    with pytest.raises(ValueError, match='bias of shape \\(3,\\)'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 3), torch.randn(4), batch=2)


def _mp_block_upstream_style(h, x, wc, wp, gain, b, t_add):
    H, W = h.shape[-2:]
    y = F.conv1d(_fold(h, b), wc, padding=wc.shape[-1] // 2)
    y = F.silu(y) / 0.596
    y = F.conv1d(y, wp) * gain
    y = _unfold(y, b, H, W)
    return (y * (1 - t_add) + x * t_add) / sqrt((1 - t_add) ** 2 + t_add ** 2)


def _block_upstream_style(h, x, wc, bc, gamma, wp, bp, b):
    H, W = h.shape[-2:]
    y = F.conv1d(_fold(h, b), wc, bc, padding=wc.shape[-1] // 2)
    y = F.normalize(y, dim=-1) * sqrt(y.shape[1]) * gamma.view(-1, 1)
    y = F.conv1d(F.silu(y), wp, bp)
    return _unfold(y, b, H, W) + x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('k', [1, 3, 5])
def test_conv_block_refs(dtype, shape, k):
    b, t, c, H, W = shape
    h, x = _frames(b, t, c, H, W, dtype), _frames(b, t, c, H, W, dtype, contiguous=False)
    p = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    wc, wp, gain, bc, bp, gamma = p(c, c, k), p(c, c, 1), p(()), p(c), p(c), p(c)
    _check(lambda h, x, wc, wp, g: ops.mp_temporal_conv_block(h, x, wc, wp, g, batch=b, mp_add_t=0.4),
           lambda h, x, wc, wp, g: _mp_block_upstream_style(h, x, wc, wp, g, b, 0.4), (h, x, wc, wp, gain), dtype)
    _check(lambda *a: ops.temporal_conv_block(*a, batch=b), lambda *a: _block_upstream_style(*a, b),
           (h, x, wc, bc, gamma, wp, bp), dtype)


def test_conv_block_dropout_is_applied_in_training_only():
    b, t, c = 2, 3, 4
    h, x = torch.randn(b * t, c, 2, 2), torch.randn(b * t, c, 2, 2)
    wc, wp, gain = torch.randn(c, c, 3), torch.randn(c, c, 1), torch.tensor(1.)
    ev = ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b, dropout=0.5, training=False)
    torch.testing.assert_close(ev, ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b))
    tr = ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b, dropout=0.5, training=True)
    assert not torch.allclose(tr, ev)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('b,t,c,h,w', [(1, 2, 1, 1, 1), (2, 4, 3, 2, 5), (3, 8, 6, 1, 3), (1, 6, 17, 3, 2)])
def test_resample_refs(dtype, b, t, c, h, w):
    x = _frames(b, t, c, h, w, dtype, contiguous=False)
    wd, wu = (torch.randn(c, c, 3, dtype=dtype, requires_grad=True) for _ in range(2))
    bd = torch.randn(c, dtype=dtype, requires_grad=True)

    def interp(y, n):
        return F.interpolate(y.unsqueeze(-1), (n, 1), mode='bilinear').squeeze(-1)
    _check(lambda x, wt, bs: ops.temporal_downsample(x, wt, bs, batch=b),
           lambda x, wt, bs: _unfold(F.conv1d(_fold(x, b), wt, bs, stride=2, padding=1), b, h, w), (x, wd, bd), dtype)
    _check(lambda x, wt, bs: ops.temporal_upsample(x, wt, bs, batch=b),
           lambda x, wt, bs: _unfold(F.conv_transpose1d(_fold(x, b), wt, bs, stride=2, padding=1, output_padding=1),
                                     b, h, w), (x, wu, bd), dtype)
    _check(lambda x, wt: ops.mp_temporal_downsample(x, wt, batch=b),
           lambda x, wt: _unfold(F.conv1d(interp(_fold(x, b), t // 2), wt, padding=1), b, h, w), (x, wd), dtype)
    _check(lambda x, wt: ops.mp_temporal_upsample(x, wt, batch=b),
           lambda x, wt: _unfold(F.conv1d(interp(_fold(x, b), t * 2), wt, padding=1), b, h, w), (x, wu), dtype)


def test_resample_errors():
    with pytest.raises(ValueError, match='even number of frames >= 2 to halve, got 3'):
        ops.mp_temporal_downsample(torch.randn(6, 2, 1, 1), torch.randn(2, 2, 3), batch=2)
    with pytest.raises(ValueError, match='expected weight \\(2, 2, k\\)'):
        ops.temporal_upsample(torch.randn(6, 2, 1, 1), torch.randn(3, 2, 3), batch=2)


def _mp_attention_explicit(x, layers, proj, gain, b, heads, t_add):
    """Upstream's MPAttention written out with einsum in (b h w) t c."""
    H, W = x.shape[-2:]
    s = rearrange(x, '(b t) c h w -> (b h w) t c', b=b)
    res = s
    for wqkv, wo, mem in layers:
        q, k, v = (rearrange(p, 'n s (h d) -> n h s d', h=heads) for p in (s @ wqkv.T).chunk(3, dim=-1))
        k = torch.cat((mem[0].expand(s.shape[0], -1, -1, -1), k), dim=-2)
        v = torch.cat((mem[1].expand(s.shape[0], -1, -1, -1), v), dim=-2)
        q, k, v = (F.normalize(z, dim=-1, eps=1e-4) * sqrt(z.shape[-1]) for z in (q, k, v))
        attn = torch.einsum('nhid,nhjd->nhij', q * q.shape[-1] ** -0.5, k).softmax(-1)
        o = rearrange(torch.einsum('nhij,nhjd->nhid', attn, v), 'n h s d -> n s (h d)') @ wo.T
        s = (o * 0.7 + s * 0.3) / sqrt(0.58)
    s = (s @ proj.T) * gain
    s = (s * (1 - t_add) + res * t_add) / sqrt((1 - t_add) ** 2 + t_add ** 2)
    return rearrange(s, '(b h w) t c -> (b t) c h w', b=b, h=H, w=W)


def _attention_explicit(x, layers, proj, proj_b, b, heads):
    H, W = x.shape[-2:]
    s = rearrange(x, '(b t) c h w -> (b h w) t c', b=b)
    for g, wq, wk, wv, wo in layers:
        n = F.normalize(s, dim=-1) * sqrt(s.shape[-1]) * g
        q, k, v = (rearrange(n @ w.T, 'n s (h d) -> n h s d', h=heads) for w in (wq, wk, wv))
        sim = torch.einsum('nhid,nhjd->nhij', q, k) * q.shape[-1] ** -0.5
        attn = sim.softmax(-1, dtype=torch.float32).to(sim.dtype)      # x-transformers: softmax in fp32, always
        s = rearrange(torch.einsum('nhij,nhjd->nhid', attn, v), 'n h s d -> n s (h d)') @ wo.T + s
    return rearrange(s @ proj.T + proj_b, '(b h w) t c -> (b t) c h w', b=b, h=H, w=W) + x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('b,t,c,h,w,heads,d,mem,depth', [
    (1, 1, 4, 1, 1, 1, 4, 0, 1), (2, 3, 6, 2, 3, 2, 8, 4, 2), (1, 13, 5, 1, 2, 3, 16, 1, 1), (3, 4, 8, 2, 2, 4, 2, 2, 1),
])
def test_attention_refs(dtype, b, t, c, h, w, heads, d, mem, depth):
    p = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    x = _frames(b, t, c, h, w, dtype, contiguous=False)
    mp_layers = [(p(3 * heads * d, c), p(c, heads * d), p(2, heads, mem, d)) for _ in range(depth)]
    proj, gain = p(c, c), p(())
    flat = [z for layer in mp_layers for z in layer]
    _check(lambda x, proj, gain, *f: ops.mp_temporal_attention_block(
               x, [f[i:i + 3] for i in range(0, len(f), 3)], proj, gain, batch=b, heads=heads, mp_add_t=0.2),
           lambda x, proj, gain, *f: _mp_attention_explicit(
               x, [f[i:i + 3] for i in range(0, len(f), 3)], proj, gain, b, heads, 0.2),
           (x, proj, gain, *flat), dtype)
    layers = [(p(c), p(heads * d, c), p(heads * d, c), p(heads * d, c), p(c, heads * d)) for _ in range(depth)]
    flat = [z for layer in layers for z in layer]
    proj_b = p(c)
    _check(lambda x, proj, pb, *f: ops.temporal_attention_block(
               x, [f[i:i + 5] for i in range(0, len(f), 5)], proj, pb, batch=b, heads=heads),
           lambda x, proj, pb, *f: _attention_explicit(x, [f[i:i + 5] for i in range(0, len(f), 5)], proj, pb, b, heads),
           (x, proj, proj_b, *flat), dtype)


def test_attention_errors():
    x = torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError, match='expected heads >= 1, got 0'):
        ops.mp_temporal_attention_block(x, [], torch.randn(3, 3), torch.tensor(1.), batch=2, heads=0)
    with pytest.raises(ValueError, match='expected proj_weight \\(3, 3\\)'):
        ops.temporal_attention_block(x, [], torch.randn(3, 4), None, batch=2, heads=1)


def test_weight_norm():
    w = torch.randn(5, 3, 3) * 7
    n = ops.normalize_weight(w)
    torch.testing.assert_close(n.flatten(1).norm(dim=1), torch.full((5,), sqrt(9.)))
    torch.testing.assert_close(ops.mp_weight(w).flatten(1).norm(dim=1), torch.ones(5))
    # eps is F.normalize's clamp: rows shorter than eps are divided by eps, not by their norm
    tiny = torch.full((1, 4), 0.01)
    torch.testing.assert_close(ops.normalize_weight(tiny, eps=3.), tiny / 3. * 2.)
    ops.renormalize_(w)
    torch.testing.assert_close(w, n)
    torch.testing.assert_close(ops.normalize_weight(w), n)          # idempotent


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), c_in=st.integers(1, 9), c_out=st.integers(1, 9),
       h=st.integers(1, 4), w=st.integers(1, 4), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_temporal_conv1d_property(b, t, c_in, c_out, h, w, k, seed):
    """Random shapes: the frames form equals fold -> F.conv1d -> unfold, and fold/unfold invert each other."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b * t, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, generator=g, dtype=torch.float64)
    expect = _unfold(F.conv1d(_fold(x, b), weight, padding=k // 2), b, h, w)
    torch.testing.assert_close(ops.temporal_conv1d(x, weight, batch=b), expect, **TOL[torch.float64])
    for layout in ('c t', 't c'):
        torch.testing.assert_close(ops.unfold_frames(ops.fold_frames(x, b, layout), b, h, w, layout), x,
                                   rtol=0, atol=0)
