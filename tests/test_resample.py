"""Temporal down/upsampling (``ops/resample.py``): the references against upstream's fold -> conv1d -> unfold
composition, and the Triton kernels (``lumiere_fast::temporal_resample`` and its backward op) against the
references.

Every Triton case runs the dispatching op with the backend forced to Triton, asserts the kernel really ran
(``record_choices``), and compares the output and the gradients of the input, the weight and the bias with the
``*_ref`` functions' autograd on the same values. Launcher outputs (and the weight-gradient partials) are
NaN-poisoned, so an element no program writes fails the comparison. Without a GPU the kernels run in the Triton
interpreter on CPU tensors (fp32 and fp16; its bf16 math is wrong, so bf16 runs only in the GPU tests).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lumiere_fast as lf
from helpers import (PARITY_RTOL, TOL, PackTracker, assert_close_rel, assert_same_forward_backward, fold_ct,
                     frames_input, perturb_, unfold_ct)
from lumiere_fast import backend, ops
from lumiere_fast.ops import _triton
from lumiere_fast.ops import resample as R

if not backend.triton_available():
    pytest.skip('triton is not installed', allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
needs_cuda = pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU (bf16 and large sizes; the interpreter is CPU-only '
                                                   'and its bf16 math is wrong)')

# Tolerances: helpers.TOL (norm-wise); fp16 (inputs rounded to fp16, fp16 GEMM operands and fp16 stores) against
# the fp32 reference of the same values (measured about 4e-4 on these cases).
FP32 = TOL[torch.float32]

VARIANTS = {  # name -> (dispatching op, reference, has bias, halves the frames)
    'temporal_downsample': (lf.ops.temporal_downsample, R.temporal_downsample_ref, True, True),
    'temporal_upsample': (lf.ops.temporal_upsample, R.temporal_upsample_ref, True, False),
    'mp_temporal_downsample': (lf.ops.mp_temporal_downsample, R.mp_temporal_downsample_ref, False, True),
    'mp_temporal_upsample': (lf.ops.mp_temporal_upsample, R.mp_temporal_upsample_ref, False, False),
}


# ------------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('b,t,c,h,w', [(1, 2, 1, 1, 1), (2, 4, 3, 2, 5), (3, 8, 6, 1, 3), (1, 6, 17, 3, 2)])
def test_references(dtype, b, t, c, h, w):
    x = frames_input(b, t, c, h, w, dtype, contiguous=False)
    wd, wu = (torch.randn(c, c, 3, dtype=dtype, requires_grad=True) for _ in range(2))
    bd = torch.randn(c, dtype=dtype, requires_grad=True)

    def interp(y, n):
        return F.interpolate(y.unsqueeze(-1), (n, 1), mode='bilinear').squeeze(-1)

    def upstream(conv, x, **kw):
        return unfold_ct(conv(fold_ct(x, b), **kw), b, h, w)

    assert_same_forward_backward(
        lambda x, wt, bs: ops.temporal_downsample(x, wt, bs, batch=b),
        lambda x, wt, bs: upstream(lambda y: F.conv1d(y, wt, bs, stride=2, padding=1), x), (x, wd, bd), dtype)
    assert_same_forward_backward(
        lambda x, wt, bs: ops.temporal_upsample(x, wt, bs, batch=b),
        lambda x, wt, bs: upstream(lambda y: F.conv_transpose1d(y, wt, bs, stride=2, padding=1, output_padding=1), x),
        (x, wu, bd), dtype)
    assert_same_forward_backward(
        lambda x, wt: ops.mp_temporal_downsample(x, wt, batch=b),
        lambda x, wt: upstream(lambda y: F.conv1d(interp(y, t // 2), wt, padding=1), x), (x, wd), dtype)
    assert_same_forward_backward(
        lambda x, wt: ops.mp_temporal_upsample(x, wt, batch=b),
        lambda x, wt: upstream(lambda y: F.conv1d(interp(y, t * 2), wt, padding=1), x), (x, wu), dtype)


def test_errors():
    with pytest.raises(ValueError, match='even number of frames >= 2 to halve, got 3'):
        ops.mp_temporal_downsample(torch.randn(6, 2, 1, 1), torch.randn(2, 2, 3), batch=2)
    with pytest.raises(ValueError, match='expected weight \\(2, 2, k\\)'):
        ops.temporal_upsample(torch.randn(6, 2, 1, 1), torch.randn(3, 2, 3), batch=2)


# ------------------------------------------------------------------------------------------------ Triton


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_triton, 'POISON', True)
    # on a GPU the references' cuDNN convolutions and the kernels (ops._triton.dot_precision) both follow this
    # switch, on by default (TF32, ~1e-3): fp32 tolerances need exact fp32 on both sides
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def _frames(b, t, c, h, w, dtype, layout='contiguous'):
    """A (b t) c h w tensor; the non-contiguous layouts exercise the stride arguments (incl. h, w not mergeable)."""
    if layout == 'contiguous':
        x = torch.randn(b * t, c, h, w)
    elif layout == 'channels_last':             # a permuted view
        x = torch.randn(b * t, h, w, c).permute(0, 3, 1, 2)
    elif layout == 'sliced':                    # every other frame, a column cut off: s_h != w * s_w
        x = torch.randn(2 * b * t, c, h, w + 1)[::2, :, :, 1:]
    else:
        raise ValueError(layout)
    return x.to(device=DEVICE, dtype=dtype)


def _run(name, b, t, c, h, w, dtype=torch.float32, layout='contiguous', weight_t=False):
    fn, ref, has_bias, _ = VARIANTS[name]
    x = _frames(b, t, c, h, w, dtype, layout)
    weight = torch.randn(c, c, 3, device=DEVICE, dtype=dtype) * 0.4
    if weight_t:                                # a transposed view: strides (1, 3c, c)
        weight = torch.randn(c, c, 3, device=DEVICE, dtype=dtype).transpose(0, 1) * 0.4
    bias = torch.randn(c, device=DEVICE, dtype=dtype) if has_bias else None
    leaves = [x, weight] + ([bias] if has_bias else [])
    ours_in = [v.detach().requires_grad_(True) for v in leaves]       # detach keeps the (non-contiguous) strides
    ref_in = [v.detach().float().requires_grad_(True) for v in leaves]

    with backend.use_backend('triton'), backend.record_choices() as seen:
        y = fn(*ours_in, batch=b)
    assert seen == {name: {'triton'}}, seen
    y_ref = ref(*ref_in, b)
    # a non-contiguous cotangent exercises the grad-side strides too
    cot = torch.randn(y.shape[0], y.shape[2], y.shape[3], y.shape[1], device=DEVICE).permute(0, 3, 1, 2)
    grads = torch.autograd.grad(y, ours_in, cot.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_in, cot)
    names = ['output', 'grad x', 'grad weight', 'grad bias']
    for what, a, r in zip(names, [y, *grads], [y_ref, *grads_ref]):
        assert a.dtype == dtype, f'{what}: dtype {a.dtype}'
        assert torch.isfinite(a).all(), f'{name} {what}: non-finite (unwritten) elements'
        assert_close_rel(a.float(), r, TOL[dtype], what=f'{name} {what}')


# b, t, c, h, w: halving needs an even t >= 2; doubling takes any t >= 1 (T = 1 and odd T)
DOWN_SHAPES = [(2, 2, 5, 5, 7), (1, 6, 19, 2, 3), (3, 4, 5, 1, 6)]
UP_SHAPES = [(2, 1, 5, 5, 7), (1, 3, 19, 2, 3), (2, 4, 5, 1, 6)]


@pytest.mark.parametrize('name', list(VARIANTS))
@pytest.mark.parametrize('shape', range(3))
def test_fp32(name, shape):
    b, t, c, h, w = (DOWN_SHAPES if VARIANTS[name][3] else UP_SHAPES)[shape]
    _run(name, b, t, c, h, w)


@pytest.mark.parametrize('name', list(VARIANTS))
@pytest.mark.parametrize('layout', ['channels_last', 'sliced'])
def test_fp32_non_contiguous(name, layout):
    t = 4 if VARIANTS[name][3] else 3
    _run(name, 2, t, 5, 3, 4, layout=layout, weight_t=layout == 'sliced')


@pytest.mark.parametrize('name', list(VARIANTS))
def test_fp16(name):
    t = 4 if VARIANTS[name][3] else 2
    _run(name, 2, t, 19, 2, 3, torch.float16)


# Against the packed weights, the 64-wide reduction block and the frame axis of the grid: C = 130 (tails of 2
# past 128 and past a 64-wide BLOCK_CI), a large batch of short clips, T = 1 / odd T when doubling, one pixel.
EDGE_DOWN = [(1, 2, 130, 1, 3), (9, 2, 3, 1, 2), (2, 4, 67, 1, 1)]
EDGE_UP = [(1, 1, 130, 1, 3), (9, 1, 3, 1, 2), (2, 5, 67, 1, 1)]


@pytest.mark.parametrize('name', list(VARIANTS))
@pytest.mark.parametrize('shape', range(3))
def test_edge_shapes(name, shape):
    _run(name, *(EDGE_DOWN if VARIANTS[name][3] else EDGE_UP)[shape])


@pytest.mark.parametrize('name', list(VARIANTS))
def test_in_place_weight_updates_are_seen_and_packs_do_not_outlive_the_call(name, monkeypatch):
    """The weight is packed once per call ([3, c_out, c_in] in the compute dtype), never cached across calls: after
    an optimizer step and an in-place add under no_grad the next call uses the new values (output and every
    gradient equal the reference's), and no pack outlives its call."""
    packs = PackTracker(monkeypatch, R)
    fn, ref, has_bias, down = VARIANTS[name]
    b, t, c = 2, 4 if down else 3, 5
    x = torch.randn(b * t, c, 2, 3, device=DEVICE, requires_grad=True)
    params = [torch.randn(c, c, 3, device=DEVICE) * 0.4] + ([torch.randn(c, device=DEVICE)] if has_bias else [])
    params = [v.requires_grad_(True) for v in params]
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(3):
        with backend.use_backend('triton'), backend.record_choices() as seen:
            y = fn(x, *params, batch=b)
            cot = torch.randn_like(y)
            grads = torch.autograd.grad(y, [x, *params], cot)
        assert seen == {name: {'triton'}}
        xr = x.detach().clone().requires_grad_(True)
        pr = [v.detach().clone().requires_grad_(True) for v in params]
        y_ref = ref(xr, *pr, b)
        assert_close_rel(y, y_ref, FP32, what=f'step {step} output')
        for g, r in zip(grads, torch.autograd.grad(y_ref, [xr, *pr], cot)):
            assert_close_rel(g, r, FP32, what=f'step {step} grad')
        for v, g in zip(params, grads[1:]):
            v.grad = g
        opt.step()
        with torch.no_grad():
            params[0].add_(0.1 * torch.randn_like(params[0]))
        del y, grads
    packs.assert_none_alive()


@pytest.mark.parametrize('name', ['temporal_downsample', 'mp_temporal_upsample'])
def test_partial_requires_grad_and_expanded_grad(name):
    """Frozen parameters (only the input gradient), a constant input (only the parameter gradients), and the
    stride-0 cotangent of ``y.sum()``."""
    fn, ref, has_bias, down = VARIANTS[name]
    b, t, c = 2, 2, 5
    x = torch.randn(b * t, c, 2, 3, device=DEVICE)
    params = [torch.randn(c, c, 3, device=DEVICE)] + ([torch.randn(c, device=DEVICE)] if has_bias else [])
    for x_grad in (True, False):
        xs = x.clone().requires_grad_(x_grad)
        ps = [p.clone().requires_grad_(not x_grad) for p in params]
        with backend.use_backend('triton'), backend.record_choices() as seen:
            y = fn(xs, *ps, batch=b)
        assert seen == {name: {'triton'}}
        wanted = [xs] if x_grad else ps
        grads = torch.autograd.grad(y.sum(), wanted)
        xr = x.clone().requires_grad_(x_grad)
        pr = [p.clone().requires_grad_(not x_grad) for p in params]
        grads_ref = torch.autograd.grad(ref(xr, *pr, b).sum(), [xr] if x_grad else pr)
        for a, r in zip(grads, grads_ref):
            assert_close_rel(a, r, FP32)


def test_poison_catches_an_unwritten_element(monkeypatch):
    """The NaN poisoning works: one program short, and the forward output and weight gradient show NaNs."""
    monkeypatch.setattr(R, 'grid_1d', lambda n: (max(1, n - 1),))
    x = torch.randn(2 * 2, 5, 1, 3, device=DEVICE)
    w = torch.randn(5, 5, 3, device=DEVICE)
    y = R._temporal_resample_forward(x, w, None, 2, 'down')
    assert torch.isnan(y).any() and not torch.isnan(y[:1]).any()
    _, gw, _ = R._temporal_resample_backward(torch.randn_like(y), x, w, 2, 'down', 2, False, False, True)
    assert torch.isnan(gw).any()


def test_dw_split_covers_every_pixel_and_frame():
    """The weight-gradient reduction is cut into (frames, pixel-chunk) splits; every element lands in one."""
    for bt_out, p, c in [(1, 1, 1), (3, 35, 19), (8, 1000, 5), (2, 17, 300)]:
        sbj, sp, p_per = R._dw_split(bt_out, p, c, torch.empty(0))
        assert 1 <= sbj <= bt_out and sp >= 1 and p_per >= 1
        assert (sp - 1) * p_per < p <= sp * p_per


def test_unsupported_calls_take_the_reference():
    """A 5-tap MP weight is not the kernel's: the reference runs, and is recorded as such."""
    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    w = torch.randn(3, 3, 5, device=DEVICE)
    with backend.use_backend('triton'), backend.record_choices() as seen, warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        y = lf.ops.mp_temporal_upsample(x, w, batch=2)
    assert seen == {'mp_temporal_upsample': {'reference'}}
    assert_close_rel(y, R.mp_temporal_upsample_ref(x, w, 2), FP32)


# ---------------------------------------------------------------------------------------------- modules

upstream = pytest.importorskip('lumiere_pytorch', reason='module tests need lumiere-pytorch==0.0.24 (the test extra)')

MODULE_CASES = [  # klass, dim, frames, h, w: per class both channel counts and both pixel counts
    ('TemporalDownsample', 5, 6, 5, 7), ('TemporalDownsample', 19, 2, 2, 3),
    ('TemporalUpsample', 5, 2, 5, 7), ('TemporalUpsample', 19, 4, 2, 3),
    ('MPTemporalDownsample', 5, 4, 5, 7), ('MPTemporalDownsample', 19, 6, 2, 3),
    ('MPTemporalUpsample', 5, 2, 5, 7), ('MPTemporalUpsample', 19, 2, 2, 3),
]


OP_OF = {'TemporalDownsample': 'temporal_downsample', 'TemporalUpsample': 'temporal_upsample',
         'MPTemporalDownsample': 'mp_temporal_downsample', 'MPTemporalUpsample': 'mp_temporal_upsample'}


def _module_compare(klass, dim, x, forward_kwargs, mode='train'):
    u = getattr(upstream, klass)(dim)
    perturb_(u)
    if not hasattr(u, 'batch_dim'):      # upstream's MP resample blocks lack it (AttributeError on frames input)
        u.batch_dim = None
    o = getattr(lf, klass)(dim)
    o.load_state_dict(u.state_dict(), strict=True)
    u.train(mode == 'train')
    o.train(mode == 'train')
    xu, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_u = u(xu, **forward_kwargs)
    with backend.use_backend('triton'), backend.record_choices() as seen, warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)      # other ops in the module (mp_weight) may lack kernels
        out_o = o(xo, **forward_kwargs)
    assert seen[OP_OF[klass]] == {'triton'}, seen
    rtol = PARITY_RTOL[torch.float32]
    assert_close_rel(out_o, out_u, rtol, what=f'{klass} output')
    cot = torch.randn_like(out_u)
    names = [n for n, _ in u.named_parameters()]
    po = dict(o.named_parameters())
    gu = torch.autograd.grad(out_u, [xu, *[p for _, p in u.named_parameters()]], cot)
    go = torch.autograd.grad(out_o, [xo, *[po[n] for n in names]], cot)
    for n, a, b in zip(['input', *names], go, gu):
        assert_close_rel(a, b, rtol, what=f'{klass} grad {n}')


@pytest.mark.parametrize('klass,dim,t,h,w', MODULE_CASES)
def test_module_video(klass, dim, t, h, w):
    _module_compare(klass, dim, torch.randn(2, dim, t, h, w), {})


@pytest.mark.parametrize('klass', ['TemporalDownsample', 'TemporalUpsample', 'MPTemporalDownsample',
                                   'MPTemporalUpsample'])
def test_module_frames(klass):
    _module_compare(klass, 5, torch.randn(3 * 2, 5, 2, 3), dict(batch_size=3), mode='eval')


# ---------------------------------------------------------------------------------------------- op machinery

# one mode per family and per frame rule (halve / double): the registration and fake code is shared by all four,
# and opcheck is slow in the interpreter
@pytest.mark.parametrize('mode', ['down', 'mp_up'])
def test_opcheck(mode):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops."""
    has_bias = mode in ('down', 'up')
    t = 2 if 'down' in mode else 1
    x = torch.randn(2 * t, 3, 1, 2, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True) if has_bias else None
    torch.library.opcheck(R._temporal_resample_op, (x, w, b, 2, mode))
    g = torch.randn(2 * R._frames_out(mode, t), 3, 1, 2, device=DEVICE)
    backward_op = R._temporal_resample_backward_op
    torch.library.opcheck(backward_op, (g, x.detach(), w.detach(), 2, mode, t, has_bias, True, True))
    torch.library.opcheck(backward_op, (g, None, w.detach(), 2, mode, t, has_bias, True, False))


@pytest.mark.parametrize('name', ['temporal_upsample', 'mp_temporal_downsample'])
def test_compile_fullgraph(name, monkeypatch):
    """torch.compile sees the Triton path as one op (no graph break), forward and backward."""
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'triton')
    fn, ref, has_bias, _ = VARIANTS[name]
    x = torch.randn(2 * 2, 5, 2, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 5, 3, device=DEVICE, requires_grad=True)
    args = (x, w, torch.randn(5, device=DEVICE, requires_grad=True)) if has_bias else (x, w)

    def f(*a):
        return fn(*a, batch=2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend='aot_eager')
    with backend.record_choices() as seen:
        y = compiled(*args)
    assert seen == {name: {'triton'}}
    y.square().sum().backward()
    grads = [a.grad.clone() for a in args]
    y_ref = ref(*args, 2)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), args)
    assert_close_rel(y, y_ref, FP32)
    for a, r in zip(grads, grads_ref):
        assert_close_rel(a, r, FP32)


# ---------------------------------------------------------------------------------------------- GPU only

@needs_cuda
@pytest.mark.parametrize('name', list(VARIANTS))
def test_bf16_gpu(name):
    t = 4 if VARIANTS[name][3] else 3
    fn, ref, has_bias, _ = VARIANTS[name]
    b, c, h, w = 2, 40, 9, 11
    x = torch.randn(b * t, c, h, w, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    wt = (torch.randn(c, c, 3, device='cuda') * 0.2).bfloat16().requires_grad_(True)
    bias = torch.randn(c, device='cuda', dtype=torch.bfloat16, requires_grad=True) if has_bias else None
    leaves = [x, wt] + ([bias] if has_bias else [])
    with backend.use_backend('triton'), backend.record_choices() as seen:
        y = fn(*leaves, batch=b)
    assert seen == {name: {'triton'}}
    ref_in = [v.detach().float().requires_grad_(True) for v in leaves]
    y_ref = ref(*ref_in, b)
    cot = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, cot.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, ref_in, cot)
    assert_close_rel(y.float(), y_ref, TOL[torch.bfloat16], what='bf16 output')
    for a, r in zip(grads, grads_ref):
        assert_close_rel(a.float(), r, TOL[torch.bfloat16], what='bf16 grad')


@needs_cuda
@pytest.mark.parametrize('name', ['temporal_downsample', 'mp_temporal_upsample'])
def test_large_grid_gpu(name):
    """B*H*W past 65,535 (a per-pixel grid axis 1 or 2 could not hold it): everything rides axis 0."""
    t = 2
    fn, ref, has_bias, _ = VARIANTS[name]
    b, c, h, w = 3, 16, 180, 200
    x = torch.randn(b * t, c, h, w, device='cuda', requires_grad=True)
    wt = torch.randn(c, c, 3, device='cuda', requires_grad=True)
    args = [x, wt] + ([torch.randn(c, device='cuda', requires_grad=True)] if has_bias else [])
    with backend.use_backend('triton'):
        y = fn(*args, batch=b)
    y_ref = ref(*args, b)
    assert_close_rel(y, y_ref, FP32)
    cot = torch.randn_like(y)
    g = torch.autograd.grad(y, args, cot)
    g_ref = torch.autograd.grad(y_ref, args, cot)
    for a, r in zip(g, g_ref):
        assert_close_rel(a, r, FP32)


@needs_cuda
def test_int64_offsets_gpu():
    """A frames tensor past 2**31 elements (4.3 GB in fp16): offsets at its end need 64 bits. The op is
    independent per pixel, so the reference runs on the last image row only and is compared there."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip(f'needs ~24 GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free')
    b, t, c, h, w = 1, 2, 16, 2 ** 12, 2 ** 14 + 3          # 2 * 16 * 4096 * 16387 > 2**31
    x = torch.randn(b * t, c, h, w, device='cuda', dtype=torch.float16)
    wt = (torch.randn(c, c, 3, device='cuda') * 0.3).half()
    bias = torch.randn(c, device='cuda', dtype=torch.float16)
    assert x.numel() > 2 ** 31
    with backend.use_backend('triton'):
        y = lf.ops.temporal_upsample(x, wt, bias, batch=b)
        y2 = lf.ops.mp_temporal_downsample(x, wt, batch=b)
    row = slice(h - 1, h)
    y_ref = R.temporal_upsample_ref(x[:, :, row].float(), wt.float(), bias.float(), b)
    y2_ref = R.mp_temporal_downsample_ref(x[:, :, row].float(), wt.float(), b)
    assert_close_rel(y[:, :, row].float(), y_ref, TOL[torch.float16], what='upsample, last row')
    assert_close_rel(y2[:, :, row].float(), y2_ref, TOL[torch.float16], what='mp downsample, last row')
    del y, y2
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import resample as K
# What ops/resample.py launches: each mode of the GEMM kernel (forward: DOWN, UP, INTERP with 2 blend terms;
# input grads: UP, DOWN, INTERP_ADJ with 1 (halving) or 4 (doubling) terms) and of the weight grad (the forward
# modes), bf16 / fp16 (autocast: every data pointer in that dtype) and fp32 with 'ieee' dots (the widest register
# tiles); every autotune config at the widest blend in bf16 and fp32 (fp32's multi-stage configs measured at
# 150-224 KiB of shared memory, the widest within 3 KiB of an H100's 227 KiB: kept, so a change past it fails).
MODES = ((K.MODE_DOWN, 1), (K.MODE_UP, 1), (K.MODE_INTERP, 2), (K.MODE_INTERP_ADJ, 1), (K.MODE_INTERP_ADJ, 4))
MERGED = dict(SRC_MERGED=True, HAS_BIAS=True, DOT_PREC='ieee')
for kernel, modes, merged in ((K._resample_kernel, MODES, dict(Y_MERGED=True)),
                              (K._resample_weight_grad_kernel, MODES[:3], dict(G_MERGED=True))):
    for i, cfg in enumerate(kernel.configs):
        for mode, nsrc in modes if i == 0 else modes[-1:]:
            for dt in ('bf16', 'fp16', 'fp32') if i == 0 else ('bf16', 'fp32'):
                compile_for_h100(kernel, dict(MERGED, MODE=mode, NSRC=nsrc, **merged, **cfg.kwargs), dt=dt,
                                 warps=cfg.num_warps, stages=cfg.num_stages)
'''


@pytest.mark.skipif(CUDA, reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernels: compile what the launchers launch for sm_90 through ptxas, so a
    GPU-only lowering error or a variant that does not fit an H100 fails here too (``pytest -s`` prints registers,
    spills and shared memory per variant)."""
    from helpers import compile_for_sm90
    compile_for_sm90(_COMPILE_CALLS, f32_buffers={'dw_ptr', 'db_ptr'}, floats={'scale'}, timeout=900)
