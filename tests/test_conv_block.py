"""The temporal conv block core (``ops/conv_block.py``): the references against upstream's fold -> conv1d ->
unfold composition, and the Triton kernels (kernels/conv_block.py) against the references.

Without a GPU everything runs under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors, so shapes are tiny.
Every case: forward and the gradients of h, residual and every parameter, with the kernel path forced
(``use_backend('triton')``) and checked to have run (``record_choices``), and every buffer the kernels must
write poisoned with NaN first (``ops._triton.POISON``).
"""

from __future__ import annotations

from math import sqrt

import pytest
import torch
import torch.nn.functional as F

from helpers import (REF_SHAPES, TOL, PackTracker, assert_close_rel, assert_same_forward_backward, compile_for_sm90,
                     fold_ct, frames_input, perturb_, strided_frames, unfold_ct)
from lumiere_fast import backend, ops
from lumiere_fast.ops import _triton
from lumiere_fast.ops import conv_block as cb

# Tolerances: helpers.TOL (norm-wise), fp16 kernel vs the fp32 reference of the same (fp16-rounded) values.
# x the case's largest gradient: a gradient that is zero in exact arithmetic (through the non-MP norm over a single
# frame) is exactly 0 from the kernels but rounding noise from torch's autograd, measured up to ~1.5e-6 of the
# largest gradient in these cases
NOISE_FLOOR = 1e-5

MP, NON_MP = 'mp_temporal_conv_block', 'temporal_conv_block'
CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
pytestmark = pytest.mark.usefixtures('poison_and_ieee')


# ------------------------------------------------------------------------------------------------ reference


def _mp_block_upstream_style(h, x, wc, wp, gain, b, t_add):
    H, W = h.shape[-2:]
    y = F.conv1d(fold_ct(h, b), wc, padding=wc.shape[-1] // 2)
    y = F.silu(y) / 0.596
    y = F.conv1d(y, wp) * gain
    y = unfold_ct(y, b, H, W)
    return (y * (1 - t_add) + x * t_add) / sqrt((1 - t_add) ** 2 + t_add ** 2)


def _block_upstream_style(h, x, wc, bc, gamma, wp, bp, b):
    H, W = h.shape[-2:]
    y = F.conv1d(fold_ct(h, b), wc, bc, padding=wc.shape[-1] // 2)
    y = F.normalize(y, dim=-1) * sqrt(y.shape[1]) * gamma.view(-1, 1)
    y = F.conv1d(F.silu(y), wp, bp)
    return unfold_ct(y, b, H, W) + x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', REF_SHAPES)
@pytest.mark.parametrize('k', [1, 3, 5])
def test_conv_block_refs(dtype, shape, k):
    b, t, c, H, W = shape
    h, x = frames_input(b, t, c, H, W, dtype), frames_input(b, t, c, H, W, dtype, contiguous=False)
    p = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    wc, wp, gain, bc, bp, gamma = p(c, c, k), p(c, c, 1), p(()), p(c), p(c), p(c)
    assert_same_forward_backward(
        lambda h, x, wc, wp, g: ops.mp_temporal_conv_block(h, x, wc, wp, g, batch=b, mp_add_t=0.4),
        lambda h, x, wc, wp, g: _mp_block_upstream_style(h, x, wc, wp, g, b, 0.4), (h, x, wc, wp, gain), dtype)
    assert_same_forward_backward(lambda *a: ops.temporal_conv_block(*a, batch=b),
                                 lambda *a: _block_upstream_style(*a, b), (h, x, wc, bc, gamma, wp, bp), dtype)


def test_conv_block_dropout_is_applied_in_training_only():
    b, t, c = 2, 3, 4
    h, x = torch.randn(b * t, c, 2, 2), torch.randn(b * t, c, 2, 2)
    wc, wp, gain = torch.randn(c, c, 3), torch.randn(c, c, 1), torch.tensor(1.)
    ev = ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b, dropout=0.5, training=False)
    assert torch.equal(ev, ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b))
    tr = ops.mp_temporal_conv_block(h, x, wc, wp, gain, batch=b, dropout=0.5, training=True)
    assert not torch.allclose(tr, ev)


# ------------------------------------------------------------------------------------------------ Triton


def _frames(b, t, c, H, W, dtype, layout='contiguous', device=DEVICE):
    return strided_frames(b, t, c, H, W, dtype, layout, device)


def _params(op, c, k, dtype, device=DEVICE):
    p = lambda *s, scale=1.: (torch.randn(s, dtype=torch.float32) * scale).to(device, dtype)  # noqa: E731
    if op == MP:    # MP-normalised weights: rows of unit norm (what the module hands in)
        wc, wp = p(c, c, k), p(c, c, 1)
        wc, wp = (w / w.flatten(1).norm(dim=1).view(-1, 1, 1) for w in (wc, wp))
        return [wc, wp, p(scale=0.8).abs() + 0.2]
    return [p(c, c, k, scale=c ** -0.5), p(c), 1 + p(c, scale=0.3), p(c, c, 1, scale=c ** -0.5), p(c)]


def _call(op, h, x, params, b, mp_add_t=0.3):
    if op == MP:
        return cb.mp_temporal_conv_block(h, x, *params, batch=b, mp_add_t=mp_add_t)
    return cb.temporal_conv_block(h, x, *params, batch=b)


def _ref(op, h, x, params, b, mp_add_t=0.3):
    if op == MP:
        return cb.mp_temporal_conv_block_ref(h, x, *params, b, mp_add_t)
    return cb.temporal_conv_block_ref(h, x, *params, b)


def _check(op, b, t, c, H, W, k, dtype=torch.float32, layout='contiguous', mp_add_t=0.3, grad_layout='contiguous',
           weight_t=False):
    h, x = _frames(b, t, c, H, W, dtype, layout), _frames(b, t, c, H, W, dtype, 'slice')
    params = _params(op, c, k, dtype)
    if weight_t:        # the conv weight a transposed view, strides (k, c k, 1): the pack reads it as it is
        params[0] = params[0].transpose(0, 1)
    leaves = [v.detach().requires_grad_(True) for v in (h, x, *params)]
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = _call(op, leaves[0], leaves[1], leaves[2:], b, mp_add_t)
    assert seen == {op: {'triton'}}
    assert out.dtype == dtype and out.shape == h.shape
    ref_leaves = [v.detach().float().requires_grad_(True) for v in (h, x, *params)]
    ref = _ref(op, ref_leaves[0], ref_leaves[1], ref_leaves[2:], b, mp_add_t)
    tol = TOL[dtype]
    assert_close_rel(out.float(), ref, tol, what=f'{op} output')
    cot = _frames(b, t, c, H, W, torch.float32, grad_layout)
    with backend.use_backend('triton'):
        grads = torch.autograd.grad(out, leaves, cot.to(dtype) if dtype != torch.float32 else cot)
    ref_grads = torch.autograd.grad(ref, ref_leaves, cot)
    floor = NOISE_FLOOR * max(g.norm().item() for g in ref_grads)
    names = ['h', 'residual'] + (['conv_weight', 'proj_weight', 'gain'] if op == MP else
                                 ['conv_weight', 'conv_bias', 'gamma', 'proj_weight', 'proj_bias'])
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name     # weight grads in the weight's own layout
        assert_close_rel(g.float(), r, tol, floor, what=f'{op} grad {name}')


# b, t, c, H, W, k: T = 1, odd T, T not a power of two, C not a multiple of 16, H*W not a multiple of the tile
SHAPES = [(2, 3, 5, 2, 3, 3), (1, 1, 19, 5, 7, 3), (2, 5, 19, 1, 6, 5), (1, 8, 32, 2, 3, 3), (2, 6, 17, 5, 7, 1)]


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('shape', SHAPES)
def test_fp32(op, shape):
    _check(op, *shape)


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('layout', ['slice', 'permuted'])
def test_non_contiguous_h_and_grad(op, layout):
    _check(op, 2, 3, 5, 3, 4, 3, layout=layout, grad_layout=layout)


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('shape', [(2, 3, 5, 2, 3, 3), (1, 5, 19, 5, 7, 3)])
def test_fp16(op, shape):
    _check(op, *shape, dtype=torch.float16)


@pytest.mark.parametrize('op', [MP, NON_MP])
def test_split_path(op, monkeypatch):
    """C above (BWD_)FUSE_MAX_C: channel tiles, the activation goes through memory, a second launch projects it
    and the projection's grads are reduced from it (forced here at a tiny C by lowering the thresholds)."""
    from lumiere_fast.kernels import conv_block as kernels
    monkeypatch.setattr(kernels, 'FUSE_MAX_C', 8)
    monkeypatch.setattr(kernels, 'BWD_FUSE_MAX_C', 8)
    _check(op, 2, 3, 19, 2, 5, 3)


def test_mp_add_t_extremes():
    _check(MP, 1, 3, 5, 2, 3, 3, mp_add_t=0.)
    _check(MP, 1, 3, 5, 2, 3, 3, mp_add_t=1.)


# Against the frame-parallel grids, the packed weights and the 64-wide reduction block: C = 65 (forward fused with
# a 1-channel tail past 64, backward split), C = 130 (split both ways: C > FUSE_MAX_C, 2-channel tails past 128 and
# past the 64-wide BLOCK_CI), a large batch of 2-frame clips, T = 1 at one pixel, odd T with K = 5 > T.
EDGE_SHAPES = [(1, 3, 65, 2, 3, 3), (1, 2, 130, 1, 3, 3), (9, 2, 5, 1, 3, 3), (3, 1, 7, 1, 1, 3), (2, 3, 3, 1, 2, 5)]


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('shape', EDGE_SHAPES)
def test_edge_shapes(op, shape):
    _check(op, *shape)


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_transposed_conv_weight(op, dtype):
    """A conv weight that is a transposed view (and fp16): the pack reads it through its strides, and its
    gradient comes back in its (c, c, k) shape and dtype."""
    _check(op, 2, 3, 19, 2, 3, 3, dtype=dtype, layout='permuted', weight_t=True)


def test_packed_weight_layout():
    """``weight_pack.packed``: an (o, i, k) view of a contiguous [k, o, i] buffer in the asked dtype (in-channel
    stride 1), equal to the weight, its transpose, its tap flip; any input strides."""
    from lumiere_fast.ops import weight_pack
    w = torch.randn(5, 7, 3)
    p = weight_pack.packed(w, torch.float16)
    assert p.dtype == torch.float16 and p.shape == (5, 7, 3) and p.stride() == (7, 1, 35)
    assert p.permute(2, 0, 1).is_contiguous() and torch.equal(p, w.half())
    sq = torch.randn(6, 6, 5).transpose(0, 1)
    for transpose in (False, True):
        for flip in (False, True):
            want = sq.transpose(0, 1) if transpose else sq
            want = want.flip(-1) if flip else want
            got = weight_pack.packed(sq, torch.float32, transpose=transpose, flip=flip)
            assert got.stride() == (6, 1, 36) and torch.equal(got, want)
    leaf = torch.randn(4, 4, 3, requires_grad=True)
    assert not weight_pack.packed(leaf, torch.float32).requires_grad     # no autograd through the pack


@pytest.mark.parametrize('op', [MP, NON_MP])
def test_in_place_weight_updates_are_seen_and_packs_do_not_outlive_the_call(op, monkeypatch):
    """Packing is once per call, never cached across calls: after an optimizer step and after an in-place add
    under no_grad the next call computes with the new values (forward and every gradient equal the reference's),
    and no pack outlives its call (nothing accumulates over steps)."""
    packs = PackTracker(monkeypatch, cb)
    b, t, c, H, W, k = 2, 3, 5, 2, 3, 3
    h, x = _frames(b, t, c, H, W, torch.float32), _frames(b, t, c, H, W, torch.float32)
    params = [v.requires_grad_(True) for v in _params(op, c, k, torch.float32)]
    cot = _frames(b, t, c, H, W, torch.float32)
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(3):
        with backend.use_backend('triton'), backend.record_choices() as seen:
            out = _call(op, h, x, params, b)
            grads = torch.autograd.grad(out, params, cot)
        assert seen == {op: {'triton'}}
        ref_params = [v.detach().clone().requires_grad_(True) for v in params]
        ref = _ref(op, h, x, ref_params, b)
        assert_close_rel(out, ref, TOL[torch.float32], what=f'step {step} output')
        for g, r in zip(grads, torch.autograd.grad(ref, ref_params, cot)):
            assert_close_rel(g, r, TOL[torch.float32], 1e-7, what=f'step {step} grad')
        for v, g in zip(params, grads):
            v.grad = g
        opt.step()
        with torch.no_grad():
            params[0].add_(0.1 * torch.randn_like(params[0]))
        del out, grads
    packs.assert_none_alive()


@pytest.mark.parametrize('op', [MP, NON_MP])
def test_poison_catches_an_unwritten_tile(op, monkeypatch):
    """The NaN poisoning works on the frame-parallel grids: one program short and the last frame shows NaNs."""
    monkeypatch.setattr(cb, 'grid_1d', lambda n: (max(1, n - 1),))
    h, x = _frames(2, 3, 5, 2, 3, torch.float32), _frames(2, 3, 5, 2, 3, torch.float32)
    with torch.no_grad(), backend.use_backend('triton'):
        out = _call(op, h, x, _params(op, 5, 3, torch.float32), 2)
    assert torch.isnan(out[-1]).any() and not torch.isnan(out[:-1]).any()


@pytest.mark.parametrize('op', [MP, NON_MP])
def test_deterministic_mode(op):
    """``torch.use_deterministic_algorithms(True)``: the split backward with per-program partials (one row per
    frame-parallel program) equals the reference."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check(op, 2, 3, 19, 2, 3, 3)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.filterwarnings('ignore:LUMIERE_FAST_BACKEND=triton:RuntimeWarning')    # the forced fallback's notice
def test_dropout_in_training_takes_the_reference():
    b, t, c = 2, 3, 5
    h, x = _frames(b, t, c, 2, 3, torch.float32), _frames(b, t, c, 2, 3, torch.float32)
    params = _params(MP, c, 3, torch.float32)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        cb.mp_temporal_conv_block(h, x, *params, batch=b, dropout=0.5, training=True)
    assert seen == {MP: {'reference'}}
    with backend.use_backend('triton'), backend.record_choices() as seen:        # eval: dropout is a no-op
        cb.mp_temporal_conv_block(h, x, *params, batch=b, dropout=0.5, training=False)
    assert seen == {MP: {'triton'}}


# ------------------------------------------------------------------------------------------ module level

upstream = pytest.importorskip('lumiere_pytorch', reason='module tests need lumiere-pytorch==0.0.24 (test extra)')


@pytest.mark.parametrize('klass', ['MPConvolutionInflationBlock', 'ConvolutionInflationBlock'])
@pytest.mark.parametrize('dim,t,H,W,mode,frames', [
    (5, 3, 5, 7, 'eval', False), (19, 1, 5, 7, 'train', False), (32, 8, 2, 3, 'train', True),
    (5, 8, 2, 3, 'eval', True), (19, 3, 2, 3, 'train', True)])
def test_module_vs_upstream(klass, dim, t, H, W, mode, frames):
    import lumiere_fast
    u = getattr(upstream, klass)(dim=dim)
    perturb_(u)
    o = getattr(lumiere_fast, klass)(dim=dim)
    o.load_state_dict(u.state_dict(), strict=True)
    u.to(DEVICE).train(mode == 'train')
    o.to(DEVICE).train(mode == 'train')
    b = 2
    x = torch.randn(b * t, dim, H, W) if frames else torch.randn(b, dim, t, H, W)
    x = x.to(DEVICE)
    kw = dict(batch_size=b) if frames else {}
    xu, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_u = u(xu, **kw)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out_o = o(xo, **kw)
    op = MP if klass.startswith('MP') else NON_MP
    assert seen[op] == {'triton'}
    assert_close_rel(out_o, out_u, TOL[torch.float32], what=f'{klass} output')
    cot = torch.randn_like(out_u)
    names = [n for n, _ in u.named_parameters()]
    po = dict(o.named_parameters())
    gu = torch.autograd.grad(out_u, [xu, *u.parameters()], cot)
    with backend.use_backend('triton'):
        go = torch.autograd.grad(out_o, [xo, *[po[n] for n in names]], cot)
    floor = NOISE_FLOOR * max(g.norm().item() for g in gu)
    for n, a, r in zip(['input', *names], go, gu):
        assert_close_rel(a, r, TOL[torch.float32], floor, what=f'{klass} grad {n}')
    for n, p in u.named_parameters():           # train mode renormalises in place, outside the op
        assert_close_rel(po[n], p, TOL[torch.float32], what=f'{klass} weight {n} after forward')


# ------------------------------------------------------------------------------------- torch.library

def _op_args(op, b=1, t=3, c=5, H=2, W=3, k=3):
    h, x = _frames(b, t, c, H, W, torch.float32), _frames(b, t, c, H, W, torch.float32)
    params = _params(op, c, k, torch.float32)
    args = [v.requires_grad_(True) for v in (h, x, *params)]
    return args + ([b, 0.3] if op == MP else [b])


@pytest.mark.parametrize('op', [MP, NON_MP])
def test_opcheck(op):
    with backend.use_backend('triton'):
        torch.library.opcheck(getattr(torch.ops.lumiere_fast, op).default, _op_args(op))


@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('compile_backend', ['eager', 'aot_eager'])     # aot_eager: traces the backward op too
def test_compile_fullgraph_no_graph_break(op, compile_backend, monkeypatch):
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'triton')
    args = _op_args(op)
    b = args[-2] if op == MP else args[-1]
    tensors = args[:7] if op == NON_MP else args[:5]

    def fn(*ts):
        return _call(op, ts[0], ts[1], ts[2:], b)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    with backend.record_choices() as seen:
        out = compiled(*tensors)
    assert seen == {op: {'triton'}}
    ref = fn(*tensors)
    assert_close_rel(out, ref, TOL[out.dtype])
    grads = torch.autograd.grad(out.sum(), tensors)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), tensors)):
        assert_close_rel(g, r, TOL[g.dtype])


# ------------------------------------------------------------------------------------------ GPU only

needs_cuda = pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU (bf16 math and large grids are wrong or too '
                                                 'slow under the CPU interpreter)')


@needs_cuda
@pytest.mark.parametrize('op', [MP, NON_MP])
def test_bf16_gpu(op):
    _check(op, 2, 5, 19, 7, 9, 3, dtype=torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize('op', [MP, NON_MP])
@pytest.mark.parametrize('c', [64, 192])        # fused forward and backward; split forward and backward
def test_large_grid_gpu(op, c):
    """B*H*W far beyond 65,535 (everything on grid axis 0), fp16 against the fp32 reference."""
    _check(op, 2, 4, c, 96, 400, 3, dtype=torch.float16)


@needs_cuda
@pytest.mark.parametrize('op', [MP, NON_MP])
def test_tf32_gpu(op, monkeypatch):
    """fp32 with TF32 allowed (torch's default for cuDNN convs): the kernels use TF32 tensor cores too."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    monkeypatch.setitem(TOL, torch.float32, TOL['tf32'])
    _check(op, 2, 5, 96, 12, 20, 3)


@needs_cuda
def test_past_int32_offsets_gpu():
    """A (b t) c H W tensor of more than 2**31 elements: 64-bit offsets (forward only, fp16: ~8.6 GB a tensor)."""
    b, t, c, H, W = 1, 2, 16, 8192, 8200
    assert b * t * c * H * W > 2 ** 31
    free = torch.cuda.mem_get_info()[0]
    if free < 40 * 2 ** 30:
        pytest.skip(f'needs ~40 GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free')
    h = torch.randn(b * t, c, H, W, dtype=torch.float16, device='cuda')
    params = _params(MP, c, 3, torch.float16)
    with torch.no_grad(), backend.use_backend('triton'):
        out = _call(MP, h, h, params, b)
    # check the last rows, beyond the 2**31-th element, against the reference on that slice of pixels
    sl = (slice(None), slice(None), slice(H - 2, H), slice(None))
    ref = _ref(MP, h[sl].float(), h[sl].float(), [p.float() for p in params], b)
    assert_close_rel(out[sl].float(), ref, TOL[torch.float16], what='last rows')


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import conv_block as K
# What the launchers (ops/conv_block.py) launch: the fused kernels with BLOCK_C = dot_block(c) up to FUSE_MAX_C
# (forward) / BWD_FUSE_MAX_C (backward), the split ones with SPLIT_BLOCK_C; BLOCK_CI = dot_block(c, 64), the widest
# (64) here. Conv weights packed (ops/weight_pack.py): the in-channel stride swc_i is 1, which Triton specialises
# into a constant as a run does. Every autotune config in bf16 (autocast: every data pointer bf16); fp32 with
# 'ieee' dots (cudnn.allow_tf32 off: the widest register tiles) and fp16 on the first config (ptxas on fp32 FMA
# tiles takes ~5 s each); norms exact. Every grid has a frame axis: the grid is not part of a compile, the frame
# index is decoded from program_id(0) (unravel4 in the non-MP kernels), compiled here with the rest.
def each(kernel, consts, exact=()):
    for i, cfg in enumerate(kernel.configs):
        for dt in ('bf16', 'fp32', 'fp16') if i == 0 else ('bf16',):
            compile_for_h100(kernel, dict(consts, PREC='ieee', **cfg.kwargs), dt=dt, warps=cfg.num_warps,
                             stages=cfg.num_stages, exact=exact)
PACKED = dict(swc_i=1)
each(K._conv_block_mp_forward_kernel, dict(PACKED, BLOCK_C=K.FUSE_MAX_C, BLOCK_CI=64))
for fuse, block_c in ((True, K.FUSE_MAX_C), (False, K.SPLIT_BLOCK_C)):
    each(K._conv_block_forward_kernel, dict(FUSE_PROJ=fuse, BLOCK_C=block_c), exact=('sqrt', 'div'))
for fuse, block_c in ((True, K.BWD_FUSE_MAX_C), (False, K.SPLIT_BLOCK_C)):
    each(K._conv_block_mp_backward_kernel, dict(PACKED, FUSE_PROJ=fuse, BLOCK_C=block_c, BLOCK_CI=64))
    each(K._conv_block_backward_kernel, dict(FUSE_PROJ=fuse, DETERMINISTIC=False, BLOCK_C=block_c, BLOCK_CI=64),
         exact=('sqrt', 'div'))
# deterministic mode: never fused, partial stores instead of atomics (first config)
compile_for_h100(K._conv_block_backward_kernel, dict(FUSE_PROJ=False, DETERMINISTIC=True, BLOCK_C=K.SPLIT_BLOCK_C,
                 BLOCK_CI=64, PREC='ieee', **K._conv_block_backward_kernel.configs[0].kwargs), dt='bf16',
                 warps=K._conv_block_backward_kernel.configs[0].num_warps, exact=('sqrt', 'div'))
# the norm backward: fixed blocks, no dot
nb_c, nb_p, nb_warps = K.NORM_BWD_BLOCKS
for dt in ('bf16', 'fp32', 'fp16'):
    compile_for_h100(K._conv_block_norm_backward_kernel, dict(BLOCK_C=nb_c, BLOCK_P=nb_p), dt=dt, warps=nb_warps,
                     exact=('sqrt', 'div'))
'''
F32_BUFFERS = {'dwp_ptr', 'dgain_ptr', 'dbp_ptr', 'dgamma_ptr'}
FLOATS = {'c_out', 'c_res', 'silu_scale', 'norm_scale', 'eps'}


@pytest.mark.skipif(CUDA, reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernels: compile what the launchers launch (fused and split paths, every
    autotune config) for sm_90 through ptxas, so a GPU-only lowering error, a variant that does not fit an H100 or
    a time norm that is not round-to-nearest fails here too (``pytest -s`` prints the per-variant table)."""
    compile_for_sm90(_COMPILE_CALLS, F32_BUFFERS, FLOATS, timeout=600)
