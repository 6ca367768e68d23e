"""The native temporal conv1d (csrc/, lumiere_fast._C / _C_cuda) against its reference, F.conv1d.

Tolerances: fp32 atol = rtol = 1e-5 elementwise (sums of at most c_in * k products of O(1) values, summed in
another order than mkldnn); the weight and bias gradients sum b*t*h*w products and the CPU kernel splits that
sum across threads, so their atol is 1e-5 * max|reference| (GRAD_SUM); fp64: gradcheck; fp16/bf16 (GPU only): norm-wise relative error vs the fp32
reference of the same rounded values, 1e-2 (fp16) / 2e-2 (bf16).

Unwritten outputs: the extension allocates with at::empty, so each comparison runs ours *before* the reference
and after freeing a NaN-filled buffer of the same size, so stale memory never holds the right answer.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from lumiere_fast import backend
from lumiere_fast.ops import extension_status, temporal_conv1d, temporal_conv1d_ref

# the module itself: ops/__init__ binds the name temporal_conv1d to the function
tc = importlib.import_module('lumiere_fast.ops.temporal_conv1d')

CPU_LOADED = extension_status()['cpu']['loaded']
needs_cpu_ext = pytest.mark.skipif(not CPU_LOADED,
                                   reason=f'CPU extension not loaded: {extension_status()["cpu"]["why"]}')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU test: no CUDA device on this machine')

FP32 = dict(atol=1e-5, rtol=1e-5)


def assert_grad_close(name, ours, ref):
    """GRAD_SUM: x grads are short sums (FP32); weight/bias grads are long reductions, atol scaled to them."""
    tol = FP32 if name == 'x' else dict(atol=1e-5 * max(ref.abs().max().item(), 1.0), rtol=1e-5)
    torch.testing.assert_close(ours, ref, **tol, msg=lambda m: f'grad {name}: {m}')


@pytest.fixture
def force_native(monkeypatch):
    monkeypatch.setattr(tc, '_force_native', True)


def _poison_heap(like: torch.Tensor):
    """Leave NaNs where the next allocation of this size is likely to land (see the module docstring)."""
    buf = torch.full((like.numel() * 2 + 64,), float('nan'), dtype=like.dtype, device=like.device)
    del buf


def _run(x, w, b, batch, grad=None):
    """ours (native, asserted) then the reference: output and gradients of x, w, b."""
    xs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    xr = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    _poison_heap(x)
    with backend.record_choices() as seen:
        y = temporal_conv1d(xs[0], xs[1], xs[2], batch=batch)
    assert seen['temporal_conv1d'] == {'native'}, seen
    y_ref = temporal_conv1d_ref(xr[0], xr[1], xr[2], batch)
    if grad is None:
        grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    return y, y_ref, xs, xr


# (n, c_in, c_out, t, k) for the (n, c, t) layout
SHAPES_NCT = [(3, 5, 7, 9, 3), (2, 4, 4, 1, 5), (1, 3, 2, 6, 1), (4, 19, 5, 7, 5), (2, 8, 16, 16, 3)]
# (b, t, c_in, c_out, h, w, k) for the frames layout; h*w below, at and above one 16/32-lane tile, with tails
SHAPES_FRAMES = [(2, 5, 5, 7, 3, 7, 3), (1, 1, 4, 3, 2, 2, 5), (2, 8, 19, 19, 5, 9, 5), (1, 3, 6, 13, 4, 4, 1),
                 (2, 4, 16, 8, 6, 6, 3), (1, 7, 3, 5, 9, 11, 3), (2, 2, 7, 7, 1, 33, 3)]


def _inputs(shape, layout, dtype=torch.float32, device='cpu', bias=True):
    if layout == 'nct':
        n, ci, co, t, k = shape
        x = torch.randn(n, ci, t, dtype=dtype, device=device)
        batch = None
    else:
        b, t, ci, co, h, w_, k = shape
        x = torch.randn(b * t, ci, h, w_, dtype=dtype, device=device)
        batch = b
    w = torch.randn(co, ci, k, dtype=dtype, device=device) / (ci * k) ** 0.5
    bias_t = torch.randn(co, dtype=dtype, device=device) if bias else None
    return x, w, bias_t, batch


def test_cpu_extension_built():
    # the README's install command builds it: CI fails here if setup.py stopped building or loading it
    status = extension_status()
    assert status['cpu']['loaded'], status['cpu']['why']


def test_extension_status_contents():
    status = extension_status()
    assert set(status) == {'cpu', 'cuda'}
    for entry in status.values():
        assert isinstance(entry['loaded'], bool) and isinstance(entry['why'], str) and entry['why']
    status['cpu']['loaded'] = 'mutated'                 # a copy: callers cannot corrupt the module's state
    assert extension_status()['cpu']['loaded'] is not 'mutated'  # noqa: F632


def test_cuda_source_compiles():
    """A CUDA compile error must fail CI: where the install could build the CUDA extension (torch with CUDA, nvcc
    found, not switched off), it must have been built and load (loading needs no GPU)."""
    if os.environ.get('LUMIERE_FAST_BUILD_CUDA', '').strip().lower() in ('0', 'false', 'no', 'off'):
        pytest.skip('LUMIERE_FAST_BUILD_CUDA=0: the CUDA extension was switched off')
    if os.environ.get('LUMIERE_FAST_BUILD_EXT', '').strip() == '0':
        pytest.skip('LUMIERE_FAST_BUILD_EXT=0: native builds were switched off')
    if torch.version.cuda is None:
        pytest.skip('this torch build has no CUDA: no CUDA extension to compile')
    cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    home_nvcc = os.path.join(cuda_home, 'bin', 'nvcc') if cuda_home else None
    nvcc = home_nvcc if home_nvcc and os.path.isfile(home_nvcc) else shutil.which('nvcc')
    if nvcc is None:
        pytest.skip('nvcc not found: the CUDA extension cannot be compiled on this machine')
    release = re.search(r'release (\d+)\.', subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout)
    if release and release.group(1) != torch.version.cuda.split('.')[0]:
        pytest.skip(f'nvcc is CUDA {release.group(1)}.x, torch was built with CUDA {torch.version.cuda}: torch refuses '
                    'to build extensions across CUDA major versions')
    status = extension_status()['cuda']
    assert status['loaded'], f'the CUDA extension should have been built (nvcc found, torch {torch.version.cuda}): ' \
                             f'{status["why"]}'


@needs_cpu_ext
@pytest.mark.parametrize('shape', SHAPES_NCT)
def test_cpu_nct_forward_backward(force_native, shape):
    x, w, b, batch = _inputs(shape, 'nct')
    y, y_ref, ours, ref = _run(x, w, b, batch)
    torch.testing.assert_close(y, F.conv1d(x, w, b, padding=shape[-1] // 2), **FP32)
    assert y.is_contiguous() and y.shape == y_ref.shape
    for name, a, r in zip(('x', 'weight', 'bias'), ours, ref):
        assert_grad_close(name, a.grad, r.grad)


@needs_cpu_ext
@pytest.mark.parametrize('shape', SHAPES_FRAMES)
@pytest.mark.parametrize('bias', [True, False])
def test_cpu_frames_forward_backward(force_native, shape, bias):
    x, w, b, batch = _inputs(shape, 'frames', bias=bias)
    y, y_ref, ours, ref = _run(x, w, b, batch)
    torch.testing.assert_close(y, y_ref, **FP32)
    assert y.is_contiguous() and y.shape == y_ref.shape
    # the frames form is F.conv1d on the folded (b h w) c t tensor
    bt, c, h, w_ = x.shape
    t = bt // batch
    folded = x.reshape(batch, t, c, h * w_).permute(0, 3, 2, 1).reshape(-1, c, t)
    y_fold = F.conv1d(folded, w, b, padding=w.shape[-1] // 2)
    torch.testing.assert_close(y, y_fold.reshape(batch, h * w_, -1, t).permute(0, 3, 2, 1).reshape(y.shape), **FP32)
    for name, a, r in zip(('x', 'weight', 'bias'), ours, ref):
        if a is not None:
            assert_grad_close(name, a.grad, r.grad)


@needs_cpu_ext
def test_cpu_non_contiguous(force_native):
    # x: every other channel of a wider tensor, in channels-last memory; grad_out: a transposed tensor
    b, t, c, h, w_ = 2, 5, 6, 5, 7
    base = torch.randn(b * t, 2 * c, h, w_).to(memory_format=torch.channels_last)
    x = base[:, ::2]
    assert not x.is_contiguous()
    w = torch.randn(4, c, 3) / 4
    bias = torch.randn(4)
    g = torch.randn(b * t, 4, w_, h).transpose(-1, -2)
    y, y_ref, ours, ref = _run(x, w, bias, b, grad=g)
    torch.testing.assert_close(y, y_ref, **FP32)
    for name, a, r in zip(('x', 'weight', 'bias'), ours, ref):
        assert_grad_close(name, a.grad, r.grad)
    # (n, c, t): a time slice
    xs = torch.randn(3, 5, 20)[..., 1:18:2]
    y, y_ref, ours, ref = _run(xs, torch.randn(7, 5, 3), None, None)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(ours[0].grad, ref[0].grad, **FP32)


@needs_cpu_ext
@pytest.mark.parametrize('layout,shape', [('nct', (2, 3, 4, 5, 3)), ('nct', (1, 2, 3, 1, 5)),
                                          ('frames', (2, 3, 3, 2, 4, 5, 3)), ('frames', (1, 4, 2, 3, 1, 3, 1))])
def test_cpu_gradcheck_fp64(force_native, layout, shape):
    x, w, b, batch = _inputs(shape, layout, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    with backend.record_choices() as seen:
        assert torch.autograd.gradcheck(lambda x_, w_, b_: temporal_conv1d(x_, w_, b_, batch=batch), args)
    assert seen['temporal_conv1d'] == {'native'}


@needs_cpu_ext
@pytest.mark.filterwarnings('ignore:Input #:UserWarning')
def test_cpu_gradcheck_fp32(force_native):
    # fp32 finite differences need a large eps and loose tolerances; the exact comparisons above are the real test
    x, w, b, batch = _inputs((1, 3, 2, 2, 2, 4, 3), 'frames')
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x_, w_, b_: temporal_conv1d(x_, w_, b_, batch=batch), args, eps=1e-2,
                                    atol=1e-2, rtol=1e-2)


@needs_cpu_ext
def test_cpu_dispatch_rules():
    x4, w, b, batch = _inputs((2, 4, 8, 8, 16, 16, 3), 'frames')      # h*w = 256 -> native
    x3 = torch.randn(4, 8, 9)
    with backend.record_choices() as seen:
        temporal_conv1d(x4, w, b, batch=batch)
    assert seen['temporal_conv1d'] == {'native'}
    with backend.record_choices() as seen:
        temporal_conv1d(x3, w, b)                                       # (n, c, t): mkldnn is faster
    assert seen['temporal_conv1d'] == {'reference'}
    with backend.record_choices() as seen:
        temporal_conv1d(x4[..., :15, :16], w, b, batch=batch)           # 240 pixels: mkldnn measured faster
    assert seen['temporal_conv1d'] == {'reference'}
    with backend.use_backend('reference'), backend.record_choices() as seen:
        temporal_conv1d(x4, w, b, batch=batch)
    assert seen['temporal_conv1d'] == {'reference'}
    with backend.record_choices() as seen:
        temporal_conv1d(x4.half(), w.half(), b.half(), batch=batch)     # no fp16 CPU kernel
        temporal_conv1d(x4, w.double(), b, batch=batch) if False else None
    assert seen['temporal_conv1d'] == {'reference'}


@needs_cpu_ext
def test_mixed_dtypes_take_reference(force_native):
    x, w, b, batch = _inputs((1, 3, 4, 4, 4, 4, 3), 'frames')
    with backend.record_choices() as seen:
        with pytest.raises(RuntimeError):                                # F.conv2d's own dtype error
            temporal_conv1d(x, w.double(), b, batch=batch)
    assert seen['temporal_conv1d'] == {'reference'}


def test_bad_inputs_raise():
    x = torch.randn(4, 3, 2, 2)
    w = torch.randn(5, 3, 3)
    with pytest.raises(ValueError, match='odd kernel size, got 2'):
        temporal_conv1d(x, torch.randn(5, 3, 2), batch=2)
    with pytest.raises(ValueError, match='x has 3 channels, weight expects 4'):
        temporal_conv1d(x, torch.randn(5, 4, 3), batch=2)
    with pytest.raises(ValueError, match='needs batch=b'):
        temporal_conv1d(x, w)
    with pytest.raises(ValueError, match=r'leading dim 4 is not batch \(3\)'):
        temporal_conv1d(x, w, batch=3)
    with pytest.raises(ValueError, match=r'expected bias of shape \(5,\), got \(3,\)'):
        temporal_conv1d(x, w, torch.randn(3), batch=2)
    with pytest.raises(ValueError, match=r'expected weight of shape \(c_out, c_in, k\), got \(5, 3\)'):
        temporal_conv1d(x, torch.randn(5, 3), batch=2)
    with pytest.raises(ValueError, match='expected x as'):
        temporal_conv1d(torch.randn(3, 3), w)
    with pytest.raises(TypeError, match='expected x to be a Tensor, got list'):
        temporal_conv1d([1.0], w)
    with pytest.raises(TypeError, match='expected batch to be an int, got float'):
        temporal_conv1d(x, w, batch=2.0)


@needs_cpu_ext
def test_cpp_op_checks_its_arguments():
    # direct torch.ops calls bypass the Python validation; the C++ side still refuses bad shapes
    with pytest.raises(RuntimeError, match='channels'):
        torch.ops.lumiere_fast_ext.temporal_conv1d(torch.randn(2, 3, 4), torch.randn(2, 4, 3), None, 0)


@needs_cpu_ext
@pytest.mark.parametrize('compile_backend', ['eager', 'aot_eager'])
def test_compile_no_graph_break(force_native, compile_backend):
    torch._dynamo.reset()
    x, w, b, batch = _inputs((2, 3, 4, 6, 4, 4, 3), 'frames')

    def fn(x_, w_, b_):
        return temporal_conv1d(x_, w_, b_, batch=batch).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = compiled(*args)
    loss.backward()
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = temporal_conv1d_ref(ref_args[0], ref_args[1], ref_args[2], batch).square().sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, **FP32)
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-4, rtol=1e-5)


@needs_cpu_ext
def test_opcheck():
    x = torch.randn(4, 3, 2, 3, requires_grad=True)
    w = torch.randn(5, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d.default, (x, w, b, 2))
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d.default, (torch.randn(2, 3, 5), w, None, 0))
    g = torch.randn(4, 5, 2, 3)
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d_grad_weight.default, (g, x.detach(), 3, 2))


# --------------------------------------------------------------------------------------------- GPU only

CUDA_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('layout,shape', [('nct', (3, 5, 7, 9, 3)), ('nct', (2, 4, 4, 1, 5)),
                                          ('frames', (2, 5, 5, 7, 3, 7, 3)), ('frames', (2, 8, 19, 19, 5, 9, 5)),
                                          ('frames', (1, 1, 4, 3, 2, 2, 1)), ('frames', (2, 16, 64, 96, 16, 16, 3)),
                                          ('frames', (2, 17, 40, 24, 9, 13, 7))])
def test_cuda_vs_reference(force_native, dtype, layout, shape):
    assert extension_status()['cuda']['loaded'], extension_status()['cuda']['why']
    x, w, b, batch = _inputs(shape, layout, dtype=dtype, device='cuda')
    y, _, ours, _ = _run(x, w, b, batch)
    # the spec: the fp32 reference on the same (rounded) values
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = temporal_conv1d_ref(ref_in[0], ref_in[1], ref_in[2], batch)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    for t in ours:
        t.grad = None
    y2 = temporal_conv1d(ours[0], ours[1], ours[2], batch=batch)
    y2.backward(g.to(dtype))
    tol = CUDA_TOL[dtype]
    assert _rel(y, y_ref) < tol
    for name, a, r in zip(('x', 'weight', 'bias'), ours, ref_in):
        assert _rel(a.grad, r.grad) < tol, name


@needs_cuda
def test_cuda_large_bf16():
    # 2 clips x 4 frame tiles x 9,216 pixel tiles = 73,728 blocks on grid axis x (> 65,535, the limit of axes
    # y/z); 768*768 pixels, and 8 channels: a partial 16-channel stage and a partial 64-channel tile
    b, t, c, h, w_ = 2, 16, 8, 768, 768
    x = torch.randn(b * t, c, h, w_, device='cuda', dtype=torch.bfloat16)
    w = (torch.randn(c, c, 3, device='cuda') / (3 * c) ** 0.5).bfloat16()
    with backend.record_choices() as seen:
        y = temporal_conv1d(x, w, None, batch=b)
    assert seen['temporal_conv1d'] == {'native'}
    assert _rel(y, temporal_conv1d_ref(x.float(), w.float(), None, b)) < 2e-2
