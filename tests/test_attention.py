"""The temporal attention blocks (``ops/attention.py``): the references against upstream's attention written out
with einsum, and the Triton kernels (kernels/attention.py) against the references.

Without a GPU everything runs under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors, so shapes are tiny.
Every case: forward and the gradients of x and every parameter, with the kernel path forced
(``use_backend('triton')``) and checked to have run (``record_choices``), and every buffer the launchers
allocate poisoned with NaN first (``ops._triton.POISON``). Both blocks, forward and backward, are Triton kernels.
Row tiles pack BLOCK_R // T positions (16 rows under the interpreter); shapes below leave position tails in the
last tile, and ``kernels.ATTN_ROWS_MAX`` is lowered in one test so a short clip goes through the forward's
key-block loop (online softmax) cheaply.
"""

from __future__ import annotations

from math import sqrt

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from helpers import (TOL, assert_close_rel, assert_same_forward_backward, compile_for_sm90, frames_input, perturb_,
                     strided_frames)
from lumiere_fast import backend, ops
from lumiere_fast.ops import _triton
from lumiere_fast.ops import attention as att

# Tolerances: helpers.TOL (norm-wise); fp16 kernel vs the fp32 reference of the same (fp16-rounded) values.
FP32 = TOL[torch.float32]
OP = 'mp_temporal_attention_block'
CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
pytestmark = pytest.mark.usefixtures('poison_and_ieee')


# ------------------------------------------------------------------------------------------------ reference


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
    (1, 1, 4, 1, 1, 1, 4, 0, 1), (2, 3, 6, 2, 3, 2, 8, 4, 2), (1, 13, 5, 1, 2, 3, 16, 1, 1),
    (3, 4, 8, 2, 2, 4, 2, 2, 1),
])
def test_references(dtype, b, t, c, h, w, heads, d, mem, depth):
    p = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    x = frames_input(b, t, c, h, w, dtype, contiguous=False)
    mp_layers = [(p(3 * heads * d, c), p(c, heads * d), p(2, heads, mem, d)) for _ in range(depth)]
    proj, gain = p(c, c), p(())
    flat = [z for layer in mp_layers for z in layer]
    assert_same_forward_backward(
        lambda x, proj, gain, *f: ops.mp_temporal_attention_block(
            x, [f[i:i + 3] for i in range(0, len(f), 3)], proj, gain, batch=b, heads=heads, mp_add_t=0.2),
        lambda x, proj, gain, *f: _mp_attention_explicit(
            x, [f[i:i + 3] for i in range(0, len(f), 3)], proj, gain, b, heads, 0.2),
        (x, proj, gain, *flat), dtype)
    layers = [(p(c), p(heads * d, c), p(heads * d, c), p(heads * d, c), p(c, heads * d)) for _ in range(depth)]
    flat = [z for layer in layers for z in layer]
    proj_b = p(c)
    assert_same_forward_backward(
        lambda x, proj, pb, *f: ops.temporal_attention_block(
            x, [f[i:i + 5] for i in range(0, len(f), 5)], proj, pb, batch=b, heads=heads),
        lambda x, proj, pb, *f: _attention_explicit(x, [f[i:i + 5] for i in range(0, len(f), 5)], proj, pb, b, heads),
        (x, proj, proj_b, *flat), dtype)


def test_errors():
    x = torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError, match='expected heads >= 1, got 0'):
        ops.mp_temporal_attention_block(x, [], torch.randn(3, 3), torch.tensor(1.), batch=2, heads=0)
    with pytest.raises(ValueError, match='expected proj_weight \\(3, 3\\)'):
        ops.temporal_attention_block(x, [], torch.randn(3, 4), None, batch=2, heads=1)


# ------------------------------------------------------------------------------------------------ Triton


@pytest.fixture(autouse=True)
def _reset_dynamo_after():
    yield
    torch._dynamo.reset()      # leave no compiled graphs or caches behind for later test files


def _frames(b, t, c, H, W, dtype, layout='contiguous', device=DEVICE):
    return strided_frames(b, t, c, H, W, dtype, layout, device)


def _unit_rows(*shape):
    w = torch.randn(shape)
    return w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1)))


def _params(c, heads, dim_head, mem, depth, dtype, device=DEVICE):
    """[x-free params]: proj_weight, gain, then per layer qkv_weight, out_weight, mem_kv (MP-normalised rows)."""
    hd = heads * dim_head
    ps = [_unit_rows(c, c), torch.tensor(0.8)]
    for _ in range(depth):
        ps += [_unit_rows(3 * hd, c), _unit_rows(c, hd), torch.randn(2, heads, mem, dim_head)]
    return [p.to(device, dtype) for p in ps]


def _layers(ps):
    return [tuple(ps[i:i + 3]) for i in range(2, len(ps), 3)]


def _check(b, t, c, H, W, heads=2, dim_head=16, mem=4, depth=1, dtype=torch.float32, layout='contiguous',
           mp_add_t=0.3, device=DEVICE, grad=True):
    x = _frames(b, t, c, H, W, dtype, layout, device)
    ps = _params(c, heads, dim_head, mem, depth, dtype, device)
    leaves = [v.detach().requires_grad_(grad) for v in (x, *ps)]
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = att.mp_temporal_attention_block(leaves[0], _layers(leaves[1:]), leaves[1], leaves[2], batch=b,
                                              heads=heads, mp_add_t=mp_add_t)
    assert seen == {OP: {'triton'}}
    ref_leaves = [v.detach().float().requires_grad_(grad) for v in leaves]
    ref = att.mp_temporal_attention_block_ref(ref_leaves[0], _layers(ref_leaves[1:]), ref_leaves[1],
                                              ref_leaves[2], b, heads, mp_add_t)
    names = ['x', 'proj_weight', 'gain'] + [f'{n}[{i}]' for i in range(depth)
                                            for n in ('qkv_weight', 'out_weight', 'mem_kv')]
    _compare(out, ref, leaves, ref_leaves, names, dtype, grad)


def _compare(out, ref, leaves, ref_leaves, names, dtype, grad):
    """Forward (and with ``grad`` the gradient of every leaf, for one random cotangent) against the reference."""
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == leaves[0].shape
    assert_close_rel(out.float(), ref, tol, what='forward')
    if not grad:
        return
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for name, a, r in zip(names, leaves, ref_leaves):
        if r is None or r.grad.numel() == 0:
            continue
        assert_close_rel(a.grad.float(), r.grad, tol, atol=1e-7, what=f'grad {name}')


# b, t, c, H, W, num_mem_kv: T=1, odd T, T not a power of two, C not a multiple of 16, H*W = 6
@pytest.mark.parametrize('shape, mem', [((2, 1, 8, 2, 3), 4), ((2, 1, 8, 2, 3), 0), ((1, 3, 12, 2, 3), 4),
                                        ((2, 5, 16, 3, 2), 0), ((1, 13, 19, 2, 3), 4)])
def test_fp32(shape, mem):
    _check(*shape, mem=mem)


@pytest.mark.parametrize('depth', [2])
@pytest.mark.parametrize('layout', ['slice', 'permuted'])
def test_depth_and_strided_input(depth, layout):
    _check(2, 3, 10, 2, 3, depth=depth, layout=layout, mp_add_t=0.4)


@pytest.mark.parametrize('heads, dim_head', [(1, 32), (3, 8), (2, 20)])
def test_heads_and_dim_head(heads, dim_head):
    """Head-dim tails (d = 8, 20 pad to 16, 32) and one or three heads."""
    _check(1, 4, 8, 2, 2, heads=heads, dim_head=dim_head, mem=3)


@pytest.mark.parametrize('shape', [(2, 3, 8, 2, 3), (1, 6, 19, 2, 3)])
def test_fp16(shape):
    _check(*shape, dtype=torch.float16, depth=2)


def test_long_clip_forward():
    """T = 33 (time tile 64 with a tail), forward only (the interpreter is slow)."""
    _check(1, 33, 8, 1, 2, mem=4, grad=False)


def _tiles(t):
    from lumiere_fast.kernels import attention as kern
    return att._row_tiles(kern, t)


# b, t, H, W: positions (b * H * W) = 21 or 15, not a multiple of the positions per tile (16 // t)
@pytest.mark.parametrize('b, t, H, W', [(3, 1, 1, 7), (3, 2, 1, 7), (3, 3, 1, 7)])   # T = 13: test_fp32
def test_packed_positions_with_tails(b, t, H, W):
    """Several positions per row tile (block-diagonal mask) with a partial last tile, both blocks."""
    _, _, pos, qb = _tiles(t)
    assert qb == 1 and (pos == 1 or (b * H * W) % pos), 'the shape must leave a partial last tile'
    _check(b, t, 8, H, W, mem=3)
    _check_nonmp(b, t, 8, H, W)


def test_key_block_loop(monkeypatch):
    """T = 37 with 16-frame blocks: 3 query blocks x 3 key blocks (the last ones partial) through the online softmax
    and the long-clip backward (dk/dv and dq launches from the saved log-sum-exp), with and without memory keys."""
    from lumiere_fast.kernels import attention as kern
    monkeypatch.setattr(kern, 'ATTN_ROWS_MAX', 16)
    assert _tiles(37) == (16, 16, 1, 3)
    _check(1, 37, 8, 1, 2, mem=4)
    _check_nonmp(1, 37, 8, 1, 2, depth=1)


def test_long_clip_70_frames_forward():
    """T = 70 over the default 64-frame blocks (2 query x 2 key blocks), forward only (the interpreter is slow)."""
    assert _tiles(70)[3] == 2
    _check(1, 70, 8, 1, 1, mem=4, grad=False)
    _check_nonmp(1, 70, 8, 1, 1, grad=False)


def test_long_clip_128_frames():
    """T = 128 (the largest supported clip): 2 x 2 key blocks forward, the long-clip backward from the saved
    log-sum-exp, forward and backward, both blocks; an odd channel count and two pixels."""
    assert _tiles(128)[3] == 2
    _check(1, 128, 7, 1, 2, mem=3)
    _check_nonmp(1, 128, 7, 1, 2, depth=1)


def test_whole_tile_backward_at_33_frames():
    """T = 33: one position per 64-row tile (the whole-tile backward with a 31-row tail), both blocks."""
    assert _tiles(33) == (64, 33, 1, 1)
    _check(1, 33, 9, 1, 1, mem=2)
    _check_nonmp(1, 33, 9, 1, 1)


@pytest.mark.parametrize('family', ['mp', 'nonmp'])
def test_backward_reads_what_the_forward_saved(family, monkeypatch):
    """Eager path: the forward's q/k/v buffer, o (and lse) feed the backward, so the forward stages run once per
    layer; the custom-op path (what torch.compile runs) reruns them in the backward op. Both give the same
    gradients."""
    calls = []
    real = att._core_forward
    monkeypatch.setattr(att, '_core_forward', lambda *a, **k: calls.append(1) or real(*a, **k))
    op, fn, _, x, ps = _compiled_block(family)
    depth = 2 if family == 'mp' else 1
    grads = []
    for eager in (True, False):
        monkeypatch.setattr(_triton, 'EAGER', eager)
        calls.clear()
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, *ps)]
        with backend.use_backend('triton'), backend.record_choices() as seen:
            out = fn(*leaves)
            assert att._SAVED.get() is None
        out.backward(torch.ones_like(out))
        assert seen == {op: {'triton'}}
        assert len(calls) == (depth if eager else 2 * depth), (eager, len(calls))
        grads.append([t.grad for t in leaves if t is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with backend.use_backend('triton'), torch.no_grad():       # no grad: nothing kept
        monkeypatch.setattr(_triton, 'EAGER', True)
        calls.clear()
        fn(x, *ps)
        assert len(calls) == depth


def test_dropout_in_training_takes_the_reference():
    x = torch.randn(6, 8, 2, 2)
    ps = _params(8, 2, 16, 4, 1, torch.float32)
    with backend.use_backend('triton'), backend.record_choices() as seen, pytest.warns(RuntimeWarning):
        att.mp_temporal_attention_block(x, _layers(ps), ps[0], ps[1], batch=2, heads=2, dropout=0.5,
                                        training=True)
    assert seen == {OP: {'reference'}}


def _module_vs_upstream(u, o, op):
    """o (ours, state dict of u loaded) on the Triton path vs upstream's module u: forward and the gradients of
    the input and every parameter, on a (b c t h w) video; the op must really run its kernel."""
    x = torch.randn(2, 12, 3, 2, 3)
    xu, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = u(xu)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = o(xo)
    assert seen.get(op) == {'triton'}
    assert_close_rel(out, ref, FP32, what='module forward')
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert_close_rel(xo.grad, xu.grad, FP32, what='module grad x')
    up = dict(u.named_parameters())
    for name, p in o.named_parameters():
        assert_close_rel(p.grad, up[name].grad, FP32, atol=1e-7, what=f'module grad {name}')


def test_module_matches_upstream():
    """lumiere_fast's MPAttentionInflationBlock on the Triton path vs lumiere-pytorch 0.0.24's (state dict
    loaded), forward and the gradients of the input and every parameter, (b c t h w) input."""
    upstream = pytest.importorskip('lumiere_pytorch', reason='needs lumiere-pytorch==0.0.24 (the test extra)')
    import lumiere_fast as ours
    kw = dict(dim=12, depth=2, heads=2, dim_head=16, num_mem_kv=4)
    u = upstream.MPAttentionInflationBlock(**kw)
    perturb_(u)
    o = ours.MPAttentionInflationBlock(**kw)
    o.load_state_dict(u.state_dict(), strict=True)
    u.batch_dim = None      # upstream's MP attention block lacks it (AttributeError in its forward)
    u.train(False)
    o.train(False)
    _module_vs_upstream(u, o, OP)


def _op_args():
    ps = _params(8, 2, 16, 4, 1, torch.float32, 'cpu')
    qkv, outw, mem = (list(w) for w in zip(*_layers(ps)))
    x = torch.randn(4, 8, 1, 2)
    return (x, qkv, outw, mem, ps[0], ps[1], 2, 2, 0.3)


def test_opcheck():
    args = _op_args()
    args = tuple([t.requires_grad_(True) for t in a] if isinstance(a, list) else
                 a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    with backend.use_backend('triton'):
        torch.library.opcheck(torch.ops.lumiere_fast.mp_temporal_attention_block.default, args)


# ---------------------------------------------------------------------- non-MP (x-transformers) block
# Forward and backward kernels (RMSNorm pre-norm folded into the core; its backward a separate kernel).

NON_MP = 'temporal_attention_block'


def _nonmp_params(c, heads, dim_head, depth, prenorm, dtype, device=DEVICE):
    hd = heads * dim_head
    ps = [torch.randn(c, c) * c ** -0.5, torch.randn(c)]
    for _ in range(depth):
        ps += [1 + 0.3 * torch.randn(c) if prenorm else None,
               *(torch.randn(hd, c) * c ** -0.5 for _ in range(3)),
               torch.randn(c, hd) * hd ** -0.5 if heads > 1 else None]
    return [None if p is None else p.to(device, dtype) for p in ps]


def _nonmp_layers(ps):
    return [tuple(ps[i:i + 5]) for i in range(2, len(ps), 5)]


def _check_nonmp(b, t, c, H, W, heads=2, dim_head=16, depth=1, prenorm=True, residual_attn=True,
                 dtype=torch.float32, layout='contiguous', device=DEVICE, grad=True):
    x = _frames(b, t, c, H, W, dtype, layout, device)
    ps = _nonmp_params(c, heads, dim_head, depth, prenorm, dtype, device)
    leaves = [None if v is None else v.detach().requires_grad_(grad) for v in (x, *ps)]
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = att.temporal_attention_block(leaves[0], _nonmp_layers(leaves[1:]), leaves[1], leaves[2], batch=b,
                                           heads=heads, residual_attn=residual_attn)
    assert seen == {NON_MP: {'triton'}}
    refl = [None if v is None else v.detach().float().requires_grad_(grad) for v in leaves]
    ref = att.temporal_attention_block_ref(refl[0], _nonmp_layers(refl[1:]), refl[1], refl[2], b, heads,
                                           residual_attn=residual_attn)
    _compare(out, ref, leaves, refl, [f'of leaf {i}' for i in range(len(leaves))], dtype, grad)


@pytest.mark.parametrize('shape, heads, depth, prenorm, residual_attn', [
    ((2, 1, 8, 2, 3), 2, 1, True, True), ((1, 5, 19, 2, 3), 2, 2, True, True),
    ((2, 3, 16, 3, 2), 1, 1, True, True),           # one head: no output projection (identity GEMM)
    ((1, 13, 12, 2, 3), 2, 1, False, False)])
def test_nonmp_fp32(shape, heads, depth, prenorm, residual_attn):
    _check_nonmp(*shape, heads=heads, depth=depth, prenorm=prenorm, residual_attn=residual_attn,
                 dim_head=16 if heads > 1 else shape[2])


def test_nonmp_fp16_strided():
    _check_nonmp(2, 3, 10, 2, 3, depth=2, dtype=torch.float16, layout='permuted')


def test_nonmp_module_matches_upstream():
    upstream = pytest.importorskip('lumiere_pytorch', reason='needs lumiere-pytorch==0.0.24 (the test extra)')
    import lumiere_fast as ours
    kw = dict(dim=12, depth=2, heads=2, dim_head=16)
    u = upstream.AttentionInflationBlock(**kw)
    perturb_(u)
    o = ours.AttentionInflationBlock(**kw)
    o.load_state_dict(u.state_dict(), strict=True)
    _module_vs_upstream(u, o, NON_MP)


def test_nonmp_opcheck():
    ps = [p.requires_grad_(True) for p in _nonmp_params(8, 2, 16, 1, True, torch.float32, 'cpu')]
    g, wq, wk, wv, wo = _nonmp_layers(ps)[0]
    x = torch.randn(4, 8, 1, 2, requires_grad=True)
    args = (x, [g], [wq], [wk], [wv], [wo], ps[0], ps[1], 2, 2, True, True)
    torch.library.opcheck(torch.ops.lumiere_fast.temporal_attention_block.default, args)


def _compiled_block(family):
    """(op name, fn(x, *params), reference(x, *params), x, params) of a small MP or non-MP block."""
    if family == 'mp':
        ps, x = _params(8, 2, 16, 4, 2, torch.float32, 'cpu'), torch.randn(6, 8, 2, 2)
        return (OP, lambda x, *ps: att.mp_temporal_attention_block(x, _layers(ps), ps[0], ps[1], batch=2, heads=2),
                lambda x, *ps: att.mp_temporal_attention_block_ref(x, _layers(ps), ps[0], ps[1], 2, 2), x, ps)
    ps, x = _nonmp_params(8, 2, 16, 1, True, torch.float32, 'cpu'), torch.randn(6, 8, 1, 2)
    return (NON_MP, lambda x, *ps: att.temporal_attention_block(x, _nonmp_layers(ps), ps[0], ps[1], batch=2, heads=2),
            lambda x, *ps: att.temporal_attention_block_ref(x, _nonmp_layers(ps), ps[0], ps[1], 2, 2), x, ps)


# aot_eager traces the backward op too; eager once (MP)
@pytest.mark.parametrize('family,compile_backend', [('mp', 'eager'), ('mp', 'aot_eager'), ('nonmp', 'aot_eager')])
def test_compile_fullgraph_no_graph_break(family, compile_backend, monkeypatch):
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'triton')
    op, fn, ref_fn, x, ps = _compiled_block(family)
    x, ps = x.requires_grad_(True), [p.requires_grad_(True) for p in ps]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    with backend.record_choices() as seen:
        out = compiled(x, *ps)
    assert seen == {op: {'triton'}}
    assert_close_rel(out, ref_fn(x, *ps), FP32, what='compiled forward')
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ps)


# ------------------------------------------------------------------------------------------ GPU only

needs_cuda = pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU (bf16 math and large grids are wrong or too '
                                                 'slow under the CPU interpreter)')


@needs_cuda
def test_bf16_gpu():
    _check(2, 5, 19, 7, 9, dtype=torch.bfloat16, depth=2)
    _check_nonmp(2, 5, 19, 7, 9, dtype=torch.bfloat16, depth=2)


@needs_cuda
@pytest.mark.parametrize('heads, dim_head, c, t', [(4, 64, 64, 16), (8, 64, 768, 8), (4, 128, 320, 128),
                                                   (2, 32, 96, 2)])
def test_large_gpu(heads, dim_head, c, t):
    """B*H*W*heads far beyond 65,535 (everything on grid axis 0), fp16 against the fp32 reference."""
    b, H, W = 2, 48, 64 if t <= 16 else 16
    assert b * H * W * heads > 65_535 or t == 128
    _check(b, t, c, H, W, heads=heads, dim_head=dim_head, dtype=torch.float16, grad=False)
    _check_nonmp(b, t, c, H, W, heads=heads, dim_head=dim_head, dtype=torch.float16, grad=False)


@needs_cuda
@pytest.mark.parametrize('hw', [8, 16])
@pytest.mark.parametrize('t', [2, 8, 16, 64])
def test_real_shapes_bf16_gpu(t, hw):
    """C = 768 with the modules' 8 heads x 64, B = 2, 8x8 and 16x16 pixels: bf16 forward and the gradients of x and
    every parameter against the fp32 reference of the same values (TOL[bf16], norm-wise)."""
    _check(2, t, 768, hw, hw, heads=8, dim_head=64, mem=4, dtype=torch.bfloat16)
    _check_nonmp(2, t, 768, hw, hw, heads=8, dim_head=64, dtype=torch.bfloat16)


@needs_cuda
def test_large_batch_backward_gpu():
    """B*H*W*heads = 98,304 programs' worth of (position, head) pairs: forward and backward past 65,535."""
    b, H, W, heads = 2, 48, 64, 4
    assert b * H * W * heads > 65_535
    _check(b, 8, 64, H, W, heads=heads, dim_head=64, dtype=torch.float16)
    _check_nonmp(b, 8, 64, H, W, heads=heads, dim_head=64, dtype=torch.float16)


@needs_cuda
def test_long_clip_128_dim_head_128_bf16_gpu():
    """T = 128, d = 128: 32-frame query/key blocks (online softmax forward, long-clip backward)."""
    _check(1, 128, 256, 4, 4, heads=2, dim_head=128, mem=4, dtype=torch.bfloat16)
    _check_nonmp(1, 128, 256, 4, 4, heads=2, dim_head=128, dtype=torch.bfloat16)


@needs_cuda
def test_memory_and_input_grads_deterministic_gpu():
    """The memory keys'/values' grads are per-program partials summed on the host and x's grad has no atomics:
    bitwise equal across runs (the weight grads' split-K atomics are not, and are not checked here)."""
    x = _frames(2, 8, 64, 16, 16, torch.float16).requires_grad_(True)
    ps = [p.requires_grad_(True) for p in _params(64, 4, 32, 4, 1, torch.float16)]
    g = torch.randn_like(x)
    grads = []
    for _ in range(2):
        with backend.use_backend('triton'):
            out = att.mp_temporal_attention_block(x, _layers(ps), ps[0], ps[1], batch=2, heads=4)
        grads.append(torch.autograd.grad(out, [x, ps[4]], g))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@needs_cuda
def test_tf32_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    monkeypatch.setitem(TOL, torch.float32, TOL['tf32'])
    _check(2, 8, 64, 12, 20, heads=4, dim_head=32, grad=False)


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import attention as K
CORE = dict(fwd=(K._attention_core_kernel, dict(WRITE_LSE=True)), bwd=(K._attention_core_backward_kernel, {}),
            dkv=(K._attention_core_backward_long_kernel, dict(DKV=True)),
            dq=(K._attention_core_backward_long_kernel, dict(DKV=False)))
R_MAX, R_MIN, R_BWD = K.ATTN_ROWS_MAX, K.ATTN_ROWS_MIN, K.ATTN_BWD_ROWS_MIN
assert R_MIN == R_MAX == 2 * R_BWD == 64, 'the variants below are what the launchers launch for these row tiles'
# What the launchers (ops/attention.py: _row_tiles, _core_meta) launch: forward BLOCK_R = 64 at d <= 64 for every
# T (short clips pack 64 // T positions; T > 64 runs 64-frame blocks), 32 at d = 128; the whole-tile backward
# 32 rows for T <= 32, 64 for T = 33..64; BLOCK_M = dot_block(m) (4 memory keys), 8 warps. fp32 runs 'ieee' dots unless the matmul flag allows TF32; fp16/bf16 are the autocast variants
# (every data pointer in the autocast dtype).
# (kinds, MP, BLOCK_R, BLOCK_D, dtypes, PREC)
VARIANTS = [
    (('fwd', 'bwd'), True, R_MAX, 64, ('bf16', 'fp16', 'fp32'), 'ieee'),
    (('bwd',), True, R_BWD, 64, ('bf16', 'fp16', 'fp32'), 'ieee'),        # T <= 32
    (('bwd',), False, R_BWD, 64, ('bf16',), 'ieee'),
    (('dkv', 'dq'), True, R_MAX, 64, ('bf16', 'fp32'), 'ieee'),
    (('dq',), True, R_MAX, 64, ('fp16',), 'ieee'),
    (('fwd', 'bwd'), False, R_MAX, 64, ('bf16', 'fp32'), 'ieee'),         # non-MP: RMSNorm row scale, no memory
    (('dkv', 'dq'), False, R_MAX, 64, ('bf16',), 'ieee'),
    (('fwd', 'bwd', 'dkv', 'dq'), True, R_MAX // 2, 128, ('bf16',), 'ieee'),   # d = 128: the row cap halves
    (('fwd',), True, R_MAX // 2, 128, ('fp32',), 'ieee'),
]
def only(kern, meta):
    fn = kern
    while not hasattr(fn, 'arg_names'):
        fn = fn.fn
    return {k: v for k, v in meta.items() if k in fn.arg_names}
for kinds, mp, block_r, block_d, dts, prec in VARIANTS:
    meta = dict(MP=mp, HAS_G=not mp, HAS_MEM=mp, PREC=prec, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_M=16)
    for kind in kinds:
        kern, extra = CORE[kind]
        for dt in dts:
            # the pixel norms (MP) are in the core; the non-MP RMSNorm is the GEMM's (checked below)
            compile_for_h100(kern, only(kern, dict(meta, **extra)), dt=dt, warps=8,
                             exact=('sqrt', 'div') if mp else ())
# the GEMM kernel as the launchers use it: the q/k/v projection (frames in, head-major out, with the RMSNorm row
# scale) and the output projections (head-major or frames in, residual, gain, bias)
LINEAR = [dict(HAS_GAIN=False, HAS_BIAS=False, HAS_RES=False, HAS_RMS=True, X_HM=False, OUT_HM=True),
          dict(HAS_GAIN=True, HAS_BIAS=True, HAS_RES=True, HAS_RMS=False, X_HM=True, OUT_HM=False)]
blk_a, blk_b, blk_p = K.WGRAD_BLOCKS
for dt in ('bf16', 'fp16', 'fp32'):
    for cfg in K._attention_linear_kernel.configs:     # every autotune config, the widest input-channel block
        for flags in LINEAR:
            compile_for_h100(K._attention_linear_kernel, dict(PREC='ieee', BLOCK_CI=32, **flags, **cfg.kwargs),
                             dt=dt, warps=cfg.num_warps, stages=cfg.num_stages,
                             exact=('sqrt', 'div') if flags['HAS_RMS'] else ())
    for a_hm in (True, False):
        compile_for_h100(K._attention_weight_grad_kernel, dict(A_HM=a_hm, B_HM=not a_hm, PREC='ieee',
                                                               BLOCK_A=blk_a, BLOCK_B=blk_b, BLOCK_P=blk_p), dt=dt)
    blk_c, blk_p = K.CHAN_BLOCKS
    compile_for_h100(K._attention_rms_norm_backward_kernel, dict(HAS_RES=True, BLOCK_C=blk_c, BLOCK_P=blk_p), dt=dt,
                     exact=('sqrt', 'div'))
    compile_for_h100(K._attention_channel_sum_kernel, dict(HAS_B=True, BLOCK_C=blk_c, BLOCK_P=blk_p), dt=dt)
'''
FLOATS = {'c_out', 'c_res', 'norm_scale', 'sm_scale', 'eps', 'rms_scale', 'rms_eps'}
F32_BUFFERS = {'dmem_ptr', 'part_ptr', 'lse_ptr', 'inv_ptr'}


@pytest.mark.skipif(CUDA, reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernels: compile what the launchers launch for sm_90 through ptxas, so a
    GPU-only lowering error, a variant that does not fit an H100, or a norm that is not round-to-nearest fails
    here too (``pytest -s`` prints registers, spills and shared memory per variant)."""
    compile_for_sm90(_COMPILE_CALLS, F32_BUFFERS, FLOATS, timeout=1500)
