"""The temporal conv1d (``ops/temporal_conv1d.py``) against its reference, every implementation.

* reference: ``temporal_conv1d_ref`` against upstream's fold -> F.conv1d -> unfold (fp32, fp64, random shapes);
* native (csrc/, lumiere_fast._C / _C_cuda): forced with ``_force_native``; the extension allocates with
  at::empty, so each comparison runs ours *before* the reference and after freeing a NaN-filled buffer of the same
  size, so stale memory never holds the right answer; fp64: gradcheck;
* Triton (kernels/temporal_conv1d.py): forced with ``use_backend('triton')`` (the interpreter runs it on CPU
  tensors); outputs start as NaN (``poison_and_ieee``), so an element no program writes fails;
* both fast paths on the same cases (``IMPLS``), each asserted with ``record_choices``;
* the CUDA dispatch's measured choice (native vs cuDNN per key): its cache, modes and report with a fake timer on
  CPU tensors, the real timer on a GPU; the CUDA kernel's staging paths (16-byte, tail, scalar) on a GPU, and its
  sm_90 ptxas report (registers, spills) without one.
Tolerances: ``helpers.TOL`` (norm-wise, per input dtype; fp16/bf16 against the fp32 reference of the same rounded
values). bf16 and the CUDA extension: GPU only (the interpreter's bf16 math is wrong).
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
from hypothesis import given, settings, strategies as st

from helpers import (REF_SHAPES, TOL, assert_close_rel, assert_same_forward_backward, compile_for_sm90, fold_ct,
                     frames_input, strided_frames, unfold_ct)
from lumiere_fast import backend, ops
from lumiere_fast.ops import extension_status, temporal_conv1d, temporal_conv1d_ref

# the module itself: ops/__init__ binds the name temporal_conv1d to the function
tc = importlib.import_module('lumiere_fast.ops.temporal_conv1d')

CPU_LOADED = extension_status()['cpu']['loaded']
needs_cpu_ext = pytest.mark.skipif(not CPU_LOADED,
                                   reason=f'CPU extension not loaded: {extension_status()["cpu"]["why"]}')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU test: no CUDA device on this machine')
FP32 = TOL[torch.float32]


@pytest.fixture
def force_native(monkeypatch):
    monkeypatch.setattr(tc, '_force_native', True)


def _poison_heap(like: torch.Tensor):
    """Leave NaNs where the next allocation of this size is likely to land (see the module docstring)."""
    buf = torch.full((like.numel() * 2 + 64,), float('nan'), dtype=like.dtype, device=like.device)
    del buf


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _ours(x, w, b, batch, grad, impl='native'):
    """(output, [x, w, b] leaves with .grad) of ``impl``, asserted with record_choices; 'native' needs the
    force_native fixture."""
    xs = _leaves(x, w, b)
    _poison_heap(x)
    with backend.use_backend('triton' if impl == 'triton' else 'auto'), backend.record_choices() as seen:
        y = temporal_conv1d(xs[0], xs[1], xs[2], batch=batch)
    assert seen['temporal_conv1d'] == {impl}, seen
    y.backward(torch.randn_like(y) if grad is None else grad)
    return y, xs


def _reference(x, w, b, batch, grad):
    """(output, leaves with .grad) of the reference in fp32 (fp64 stays fp64) on the same rounded values."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = _leaves(*(t.to(dtype) if t is not None else None for t in (x, w, b)))
    y_ref = temporal_conv1d_ref(xr[0], xr[1], xr[2], batch)
    y_ref.backward(grad.to(dtype))
    return y_ref, xr


def _run(x, w, b, batch, grad=None, impl='native'):
    """ours (run first, see the module docstring) then the reference: outputs and gradients of x, w, b."""
    if grad is None:
        shape = list(x.shape)
        shape[1] = w.shape[0]
        grad = torch.randn(shape, dtype=x.dtype, device=x.device)
    y, xs = _ours(x, w, b, batch, grad, impl)
    y_ref, xr = _reference(x, w, b, batch, grad)
    return y, y_ref, xs, xr


def _assert_grads(ours, ref, dtype=torch.float32):
    for name, a, r in zip(('x', 'weight', 'bias'), ours, ref):
        if r is None:
            assert a is None
        else:
            assert_close_rel(a.grad.float(), r.grad, TOL[dtype], what=f'grad {name}')


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



# ------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', REF_SHAPES)
@pytest.mark.parametrize('k', [1, 3, 5])
@pytest.mark.parametrize('contiguous', [True, False])
def test_temporal_conv1d_frames_form(dtype, shape, k, contiguous):
    b, t, c, h, w = shape
    c_out = c + 2                              # channel-changing, too
    x = frames_input(b, t, c, h, w, dtype, contiguous)
    weight = torch.randn(c_out, c, k, dtype=dtype, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, requires_grad=True)
    assert_same_forward_backward(lambda x, wt, bs: ops.temporal_conv1d(x, wt, bs, batch=b),
           lambda x, wt, bs: unfold_ct(F.conv1d(fold_ct(x, b), wt, bs, padding=k // 2), b, h, w),
           (x, weight, bias), dtype)


def test_temporal_conv1d_3d_form_and_gradcheck():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert_close_rel(ops.temporal_conv1d(x, weight), F.conv1d(x, weight, padding=1), TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda x, wt: ops.temporal_conv1d(x, wt), (x, weight))


def test_reference_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match='odd kernel size, got 2'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 2), batch=2)
    with pytest.raises(ValueError, match='x has 3 channels, weight expects 4'):
        ops.temporal_conv1d(x, torch.randn(3, 4, 3), batch=2)
    with pytest.raises(ValueError, match='needs batch=b'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 3))
    with pytest.raises(ValueError, match='bias of shape \\(3,\\)'):
        ops.temporal_conv1d(x, torch.randn(3, 3, 3), torch.randn(4), batch=2)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), c_in=st.integers(1, 9), c_out=st.integers(1, 9),
       h=st.integers(1, 4), w=st.integers(1, 4), k=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_temporal_conv1d_property(b, t, c_in, c_out, h, w, k, seed):
    """Random shapes: the frames form equals fold -> F.conv1d -> unfold, and fold/unfold invert each other."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b * t, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, generator=g, dtype=torch.float64)
    expect = unfold_ct(F.conv1d(fold_ct(x, b), weight, padding=k // 2), b, h, w)
    assert_close_rel(ops.temporal_conv1d(x, weight, batch=b), expect, TOL[torch.float64])
    for layout in ('c t', 't c'):
        assert torch.equal(ops.unfold_frames(ops.fold_frames(x, b, layout), b, h, w, layout), x)

# ------------------------------------------------------------------------------ native and Triton, same cases

IMPLS = [pytest.param('native', marks=needs_cpu_ext), 'triton']
# (b, t, c_in, c_out, H, W, k, bias, layout): T=1, odd T, c_in != c_out, channels not a multiple of 16, pixel
# tails, k 1/3/5, a channel slice and a channels-last view
CASES = [
    (1, 1, 3, 5, 3, 3, 3, True, 'contiguous'),
    (2, 5, 7, 4, 2, 3, 3, True, 'slice'),
    (1, 4, 19, 19, 3, 5, 5, False, 'permuted'),
    (3, 3, 6, 9, 1, 7, 1, True, 'contiguous'),
    (2, 7, 5, 5, 4, 4, 5, True, 'slice'),
]


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('b,t,ci,co,H,W,k,bias,layout', CASES,
                         ids=[f'b{c[0]}t{c[1]}ci{c[2]}co{c[3]}-{c[4]}x{c[5]}-k{c[6]}-{c[8]}' for c in CASES])
def test_fp32_forward_and_backward(request, poison_and_ieee, impl, b, t, ci, co, H, W, k, bias, layout):
    if impl == 'native':
        request.getfixturevalue('force_native')
    x = strided_frames(b, t, ci, H, W, torch.float32, layout)
    w, bb = torch.randn(co, ci, k), (torch.randn(co) if bias else None)
    y, y_ref, ours, ref = _run(x, w, bb, b, grad=torch.randn(b * t, co, H, W), impl=impl)
    assert_close_rel(y, y_ref, FP32, what='output')
    _assert_grads(ours, ref)


def test_triton_fp16_against_the_fp32_reference(poison_and_ieee):
    torch.manual_seed(1)
    b, t, ci, co, H, W, k = 2, 3, 6, 5, 3, 3, 3
    x = torch.randn(b * t, ci, H, W).half()
    w, bb = (torch.randn(co, ci, k) / 3).half(), torch.randn(co).half()
    cot = torch.randn(b * t, co, H, W).half()
    y, y_ref, ours, ref = _run(x, w, bb, b, grad=cot, impl='triton')
    assert y.dtype == torch.float16 and all(g.grad.dtype == torch.float16 for g in ours)
    assert_close_rel(y.float(), y_ref, TOL[torch.float16], what='output')
    _assert_grads(ours, ref, torch.float16)


def test_triton_opcheck_and_compile_without_graph_break(poison_and_ieee):
    from lumiere_fast.ops.temporal_conv1d import _temporal_conv1d_op
    torch.manual_seed(2)
    x, w, bb = torch.randn(4, 3, 2, 3), torch.randn(5, 3, 3), torch.randn(5)
    torch.library.opcheck(_temporal_conv1d_op, (x, w, bb, 2))
    torch.library.opcheck(_temporal_conv1d_op, (x, w, None, 2))

    def fn(x, w, bb):
        return temporal_conv1d(x, w, bb, batch=2).square().sum()

    with backend.use_backend('triton'):
        compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
        assert_close_rel(compiled(x, w, bb), fn(x, w, bb), FP32)


def test_reference_backend_and_the_time_major_layout_skip_triton(recwarn):
    x3, w = torch.randn(2, 3, 5), torch.randn(3, 3, 3)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        temporal_conv1d(x3, w)                      # (n, c, t): no Triton kernel for this layout
    assert seen == {'temporal_conv1d': {'reference'}}
    with backend.use_backend('reference'), backend.record_choices() as seen:
        temporal_conv1d(torch.randn(4, 3, 2, 2), w, batch=2)
    assert seen == {'temporal_conv1d': {'reference'}}


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu(poison_and_ieee, dtype):
    """Real shapes (C=384 at 32x32, B=2, T=16) against the fp32 reference of the same rounded values."""
    torch.manual_seed(3)
    b, t, c, H, W, k = 2, 16, 384, 32, 32, 3
    x = torch.randn(b * t, c, H, W, device='cuda').to(dtype)
    w, bb = (torch.randn(c, c, k, device='cuda') / (3 * c) ** 0.5).to(dtype), torch.randn(c, device='cuda').to(dtype)
    cot = torch.randn(b * t, c, H, W, device='cuda').to(dtype)
    y, y_ref, ours, ref = _run(x, w, bb, b, grad=cot, impl='triton')
    assert_close_rel(y.float(), y_ref, TOL[dtype], what='output')
    _assert_grads(ours, ref, dtype)


# ------------------------------------------------------------------------------------- native only


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
    _nvcc_or_skip()
    status = extension_status()['cuda']
    assert status['loaded'], f'the CUDA extension should have been built (nvcc found, torch {torch.version.cuda}): ' \
                             f'{status["why"]}'


def _nvcc_or_skip() -> str:
    """nvcc of the toolkit torch would build with (the conditions of test_cuda_source_compiles), else skip."""
    if torch.version.cuda is None:
        pytest.skip('this torch build has no CUDA: no CUDA extension to compile')
    cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    home_nvcc = os.path.join(cuda_home, 'bin', 'nvcc') if cuda_home else None
    nvcc = home_nvcc if home_nvcc and os.path.isfile(home_nvcc) else shutil.which('nvcc')
    if nvcc is None:
        pytest.skip('nvcc not found: the CUDA source cannot be compiled on this machine')
    release = re.search(r'release (\d+)\.', subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout)
    if release and release.group(1) != torch.version.cuda.split('.')[0]:
        pytest.skip(f'nvcc is CUDA {release.group(1)}.x, torch was built with CUDA {torch.version.cuda}: torch refuses '
                    'to build extensions across CUDA major versions')
    return nvcc


# ptxas limits per kernel (sm_90): 255 registers a thread is the hardware's; the forward's __launch_bounds__
# (256 threads, 2 blocks an SM) caps it at 128. Spills go to local memory (L1-cached): reported, failed above
# MAX_SPILL bytes a thread (the same rule as tests/helpers.py for the Triton kernels). Dynamic shared memory is
# not ptxas's to report: static_asserts in the source hold every variant to the sm_80 and sm_90 limits.
MAX_REGS, MAX_SPILL = 255, 1024


def test_cuda_kernels_ptxas_report_sm90(tmp_path):
    """Compile csrc/temporal_conv1d_cuda.cu for sm_90 with ``-Xptxas -v`` (no GPU needed) and hold every kernel
    to the limits above; ``pytest -s`` prints registers, spills and static shared memory per kernel."""
    import sysconfig
    from torch.utils import cpp_extension
    nvcc = _nvcc_or_skip()
    try:
        includes = cpp_extension.include_paths(device_type='cuda')
    except TypeError:                              # torch < 2.6: include_paths(cuda=True)
        includes = cpp_extension.include_paths(cuda=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, 'csrc', 'temporal_conv1d_cuda.cu')
    cmd = [nvcc, '-c', src, '-o', str(tmp_path / 'k.o'), '-I' + os.path.join(root, 'csrc'),
           '-I' + sysconfig.get_paths()['include'], *('-I' + p for p in includes),
           *cpp_extension.COMMON_NVCC_FLAGS, '-std=c++20', '-O3', '-Xcompiler', '-fPIC',
           '-DTORCH_EXTENSION_NAME=_C_cuda', '-DTORCH_API_INCLUDE_EXTENSION_H',
           f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}',
           '-gencode=arch=compute_90,code=sm_90', '-Xptxas', '-v']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    rows = []
    for block in re.split(r"ptxas info\s+: Compiling entry function '", run.stderr)[1:]:
        mangled = block.split("'", 1)[0]
        kind = re.search(r'(conv_fwd_kernel|conv_grad_weight_kernel)I(6__half|13__nv_bfloat16|f)(?:Li(\d)E)?', mangled)
        name = (f'{kind.group(1)}<{ {"6__half": "half", "13__nv_bfloat16": "bf16", "f": "float"}[kind.group(2)]}'
                f'{", NBUF=" + kind.group(3) if kind.group(3) else ""}>') if kind else mangled
        num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, block)) else 0  # noqa: E731
        rows.append((name, num(r'Used (\d+) registers'), num(r'(\d+) bytes spill stores'),
                     num(r'(\d+) bytes spill loads'), num(r'(\d+) bytes smem')))
    print(f'{"kernel (sm_90)":<40} {"regs":>5} {"spill st/ld B":>14} {"static smem B":>14}')
    for name, regs, st, ld, smem in rows:
        print(f'{name:<40} {regs:>5} {f"{st}/{ld}":>14} {smem:>14}')
    names = {r[0] for r in rows}
    assert len(rows) == 9 and all(f'conv_fwd_kernel<{d}, NBUF={n}>' in names for d in ('half', 'bf16', 'float')
                                  for n in (1, 2)), names
    for name, regs, st, ld, _ in rows:
        assert regs <= (128 if 'fwd' in name else MAX_REGS), f'{name}: {regs} registers'
        assert max(st, ld) <= MAX_SPILL, f'{name}: spills {st}/{ld} bytes a thread'


@needs_cpu_ext
@pytest.mark.parametrize('shape', SHAPES_NCT)
def test_cpu_nct_forward_backward(force_native, shape):
    x, w, b, batch = _inputs(shape, 'nct')
    y, y_ref, ours, ref = _run(x, w, b, batch)
    assert_close_rel(y, F.conv1d(x, w, b, padding=shape[-1] // 2), FP32)
    assert y.is_contiguous() and y.shape == y_ref.shape
    _assert_grads(ours, ref)


@needs_cpu_ext
@pytest.mark.parametrize('shape', SHAPES_FRAMES)
@pytest.mark.parametrize('bias', [True, False])
def test_cpu_frames_forward_backward(force_native, shape, bias):
    x, w, b, batch = _inputs(shape, 'frames', bias=bias)
    y, y_ref, ours, ref = _run(x, w, b, batch)
    assert_close_rel(y, y_ref, FP32)
    assert y.is_contiguous() and y.shape == y_ref.shape
    # the frames form is F.conv1d on the folded (b h w) c t tensor
    bt, c, h, w_ = x.shape
    t = bt // batch
    folded = x.reshape(batch, t, c, h * w_).permute(0, 3, 2, 1).reshape(-1, c, t)
    y_fold = F.conv1d(folded, w, b, padding=w.shape[-1] // 2)
    assert_close_rel(y, y_fold.reshape(batch, h * w_, -1, t).permute(0, 3, 2, 1).reshape(y.shape), FP32)
    _assert_grads(ours, ref)


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
    assert_close_rel(y, y_ref, FP32)
    _assert_grads(ours, ref)
    # (n, c, t): a time slice
    xs = torch.randn(3, 5, 20)[..., 1:18:2]
    y, y_ref, ours, ref = _run(xs, torch.randn(7, 5, 3), None, None)
    assert_close_rel(y, y_ref, FP32)
    assert_close_rel(ours[0].grad, ref[0].grad, FP32)


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
    assert_close_rel(loss, ref, FP32)
    for a, r in zip(args, ref_args):
        assert_close_rel(a.grad, r.grad, FP32)


@needs_cpu_ext
def test_native_opcheck():
    x = torch.randn(4, 3, 2, 3, requires_grad=True)
    w = torch.randn(5, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d.default, (x, w, b, 2))
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d.default, (torch.randn(2, 3, 5), w, None, 0))
    g = torch.randn(4, 5, 2, 3)
    torch.library.opcheck(torch.ops.lumiere_fast_ext.temporal_conv1d_grad_weight.default, (g, x.detach(), 3, 2))


# --------------------------------------------------------------------------------------------- GPU only

@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('layout,shape', [('nct', (3, 5, 7, 9, 3)), ('nct', (2, 4, 4, 1, 5)),
                                          ('frames', (2, 5, 5, 7, 3, 7, 3)), ('frames', (2, 8, 19, 19, 5, 9, 5)),
                                          ('frames', (1, 1, 4, 3, 2, 2, 1)), ('frames', (2, 16, 64, 96, 16, 16, 3)),
                                          ('frames', (2, 17, 40, 24, 9, 13, 7))])
def test_native_cuda_vs_reference(force_native, dtype, layout, shape):
    assert extension_status()['cuda']['loaded'], extension_status()['cuda']['why']
    x, w, b, batch = _inputs(shape, layout, dtype=dtype, device='cuda')
    y, y_ref, ours, ref = _run(x, w, b, batch)       # against the fp32 reference on the same (rounded) values
    assert_close_rel(y.float(), y_ref, TOL[dtype], what='output')
    _assert_grads(ours, ref, dtype)


@needs_cuda
def test_native_cuda_large_bf16(force_native):
    # 1 channel tile x 2 clips x 4 frame tiles x 9,216 pixel tiles = 73,728 blocks on grid axis x (> 65,535, the
    # limit of axes y/z); 768*768 pixels, and 8 channels: a partial 16-channel stage and a partial 64-channel tile.
    # Forced native: the measured dispatch could pick cuDNN, and this is the native kernel's huge-grid case.
    b, t, c, h, w_ = 2, 16, 8, 768, 768
    x = torch.randn(b * t, c, h, w_, device='cuda', dtype=torch.bfloat16)
    w = (torch.randn(c, c, 3, device='cuda') / (3 * c) ** 0.5).bfloat16()
    with backend.record_choices() as seen:
        y = temporal_conv1d(x, w, None, batch=b)
    assert seen['temporal_conv1d'] == {'native'}
    assert_close_rel(y.float(), temporal_conv1d_ref(x.float(), w.float(), None, b), TOL[torch.bfloat16])


# The kernel's staging paths (csrc/temporal_conv1d_cuda.cu stage_rows): 16-byte cp.async rows where every row
# start is 16-byte aligned with unit pixel stride, element-wise copies of a partial last chunk, the scalar path
# otherwise; several channel chunks (the double-buffered pipeline), channel tails, and k = 15 (fp32: too big
# for the double buffer, single-buffered; fp16/bf16: double-buffered on an H100).
def _staging_input(case, bt, ci, dtype):
    if case == 'tail':              # rows 16-byte aligned (channel stride 16), 13 pixels: a partial last chunk
        return torch.randn(bt, ci, 1, 16, device='cuda', dtype=dtype)[..., :13]
    if case == 'unaligned':         # channel stride 24, but the data pointer one element past a 16-byte boundary
        return torch.randn(bt, ci, 1, 24, device='cuda', dtype=dtype)[..., 1:17]
    if case == 'channels_last':     # pixel stride c: the scalar path
        return torch.randn(bt, ci, 4, 6, device='cuda', dtype=dtype).to(memory_format=torch.channels_last)
    return torch.randn(bt, ci, 8, 8, device='cuda', dtype=dtype)     # 'aligned': whole 16-byte chunks


STAGING_CASES = [  # (case, b, t, c_in, c_out, k)
    ('aligned', 2, 5, 40, 72, 3), ('tail', 1, 6, 24, 9, 3), ('unaligned', 2, 3, 16, 16, 5),
    ('channels_last', 1, 4, 12, 20, 3), ('aligned', 1, 5, 8, 8, 15), ('aligned', 1, 4, 33, 65, 1),
]


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case,b,t,ci,co,k', STAGING_CASES,
                         ids=[f'{c[0]}-ci{c[3]}-co{c[4]}-k{c[5]}' for c in STAGING_CASES])
def test_native_cuda_staging_paths(force_native, dtype, case, b, t, ci, co, k):
    assert extension_status()['cuda']['loaded'], extension_status()['cuda']['why']
    torch.manual_seed(4)
    x = _staging_input(case, b * t, ci, dtype)
    w = (torch.randn(co, ci, k, device='cuda') / (ci * k) ** 0.5).to(dtype)
    bias = torch.randn(co, device='cuda').to(dtype)
    y, y_ref, ours, ref = _run(x, w, bias, b)
    assert_close_rel(y.float(), y_ref, TOL[dtype], what='output')
    _assert_grads(ours, ref, dtype)


@needs_cuda
def test_cuda_dispatch_measures_on_the_gpu(monkeypatch):
    """The real timer: the first call of a key times both, the choice runs and is reported."""
    assert extension_status()['cuda']['loaded'], extension_status()['cuda']['why']
    monkeypatch.setattr(tc, '_cuda_winners', {})
    monkeypatch.delenv(tc.CUDA_DISPATCH_ENV, raising=False)
    x, w, b, batch = _inputs((2, 8, 32, 32, 16, 16, 3), 'frames', dtype=torch.bfloat16, device='cuda')
    with backend.record_choices() as seen:
        y = temporal_conv1d(x, w, b, batch=batch)
    winner = next(iter(tc._cuda_winners.values()))
    assert seen['temporal_conv1d'] == {'native' if winner == 'native' else 'reference'}
    entry = extension_status()['cuda']['dispatch']['decisions'][tc._describe_key(next(iter(tc._cuda_winners)))]
    assert entry['winner'] == winner and entry['native_ms'] > 0 and entry['cudnn_ms'] > 0, entry
    assert_close_rel(y.float(), temporal_conv1d_ref(x.float(), w.float(), b.float(), batch), TOL[torch.bfloat16])


# ---------------------------------------------------------------- CUDA dispatch decisions (a fake timer, on CPU)
# ops/temporal_conv1d._cuda_choice decides CUDA calls; its logic (cache per key, report, modes) is device-agnostic,
# so CPU tensors and a fake _time_ms exercise it without a GPU.


@pytest.fixture
def fake_timer(monkeypatch):
    """_time_ms returning the times in ``times[name]`` ('native' / 'cudnn'), each timed fn run once; the calls
    are recorded in ``times['calls']``."""
    times = {'native': 1.0, 'cudnn': 2.0, 'calls': []}

    def fake(fn, device):
        out = fn()
        name = 'native' if len(times['calls']) % 2 == 0 else 'cudnn'     # _measure times native first
        times['calls'].append((name, tuple(out.shape)))
        if isinstance(times[name], Exception):
            raise times[name]
        return times[name]

    monkeypatch.setattr(tc, '_time_ms', fake)
    monkeypatch.setattr(tc, '_cuda_winners', {})
    monkeypatch.setattr(ops.extension, '_cuda_decisions', {})
    monkeypatch.delenv(tc.CUDA_DISPATCH_ENV, raising=False)
    return times


@needs_cpu_ext
def test_cuda_dispatch_times_each_key_once(fake_timer):
    x, w, b, batch = _inputs((2, 3, 4, 6, 4, 4, 3), 'frames')
    assert tc._cuda_choice(x, w, b, batch) == 'native'
    assert [n for n, _ in fake_timer['calls']] == ['native', 'cudnn']
    assert tc._cuda_choice(x, w, b, batch) == 'native'                   # cached: no timing
    assert len(fake_timer['calls']) == 2
    fake_timer['native'] = 3.0                                          # another key: timed, cuDNN wins
    x2 = x[:, :, :3]
    assert tc._cuda_choice(x2, w, b, batch) == 'cudnn'
    assert len(fake_timer['calls']) == 4 and len(tc._cuda_winners) == 2
    assert tc._cuda_choice(x, w, None, batch) == 'cudnn'                 # bias is part of the key
    decisions = extension_status()['cuda']['dispatch']['decisions']
    assert len(decisions) == 3
    first = decisions[tc._describe_key(tc._cuda_key(x, w, b, batch))]
    assert first == {'winner': 'native', 'why': 'measured', 'native_ms': 1.0, 'cudnn_ms': 2.0}
    second = decisions[tc._describe_key(tc._cuda_key(x2, w, b, batch))]
    assert second['winner'] == 'cudnn' and second['native_ms'] == 3.0
    assert 'strided' in tc._describe_key(tc._cuda_key(x2, w, b, batch))
    decisions.clear()                                                   # a copy
    assert len(extension_status()['cuda']['dispatch']['decisions']) == 3


@needs_cpu_ext
def test_cuda_dispatch_modes_and_rules(fake_timer, monkeypatch):
    x, w, b, batch = _inputs((1, 3, 4, 4, 2, 4, 3), 'frames')
    assert extension_status()['cuda']['dispatch']['mode'] == 'measure'
    for mode in ('native', 'cudnn'):
        monkeypatch.setenv(tc.CUDA_DISPATCH_ENV, f' {mode.upper()} ')
        assert tc._cuda_choice(x, w, b, batch) == mode
        assert extension_status()['cuda']['dispatch']['mode'] == mode
    monkeypatch.setenv(tc.CUDA_DISPATCH_ENV, 'fastest')
    with pytest.raises(ValueError, match="LUMIERE_FAST_CONV1D_CUDA: expected one of .*got 'fastest'"):
        tc._cuda_choice(x, w, b, batch)
    assert 'invalid' in extension_status()['cuda']['dispatch']['mode']
    monkeypatch.delenv(tc.CUDA_DISPATCH_ENV)
    monkeypatch.setattr(tc, 'deterministic', lambda: True)             # deterministic mode: cuDNN, never timed
    assert tc._cuda_choice(x, w, b, batch) == 'cudnn'
    monkeypatch.setattr(tc, 'deterministic', lambda: False)
    assert fake_timer['calls'] == [] and tc._cuda_winners == {}
    fake_timer['native'] = RuntimeError('needs 300000 bytes of shared memory\nmore')  # a native failure: cuDNN
    assert tc._cuda_choice(x, w, b, batch) == 'cudnn'
    (entry,) = extension_status()['cuda']['dispatch']['decisions'].values()
    assert entry == {'winner': 'cudnn', 'why': 'the native kernel failed: needs 300000 bytes of shared memory'}


@needs_cpu_ext
def test_cuda_dispatch_is_not_timed_in_a_trace(fake_timer):
    torch._dynamo.reset()
    x, w, b, batch = _inputs((1, 2, 3, 3, 2, 2, 3), 'frames')

    def fn(x_):
        return x_ * 2 if tc._cuda_choice(x_, w, b, batch) == 'native' else x_ * 3

    fake_timer['native'] = 5.0                   # eager would pick cuDNN
    assert torch.equal(torch.compile(fn, fullgraph=True, backend='eager')(x), x * 2)
    assert fake_timer['calls'] == [] and tc._cuda_winners == {}


@needs_cpu_ext
def test_cpu_calls_are_never_timed(fake_timer):
    x, w, b, batch = _inputs((2, 4, 8, 8, 16, 16, 3), 'frames')
    with backend.record_choices() as seen:
        temporal_conv1d(x, w, b, batch=batch)
    assert seen['temporal_conv1d'] == {'native'} and fake_timer['calls'] == []


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import temporal_conv1d as K
# What the launchers (ops/temporal_conv1d.py) launch: every autotune config of the conv at BLOCK_CI =
# dot_block(c_in, 32) with each epilogue (the conv block's split path uses all of them), and the weight grad at
# WGRAD_BLOCKS; bf16 and fp16 (autocast: every data pointer in that dtype) and fp32 with 'ieee' dots (the widest
# register tiles; TF32 once).
for i, cfg in enumerate(K._temporal_conv1d_kernel.configs):
    epis = (K.EPI_NONE, K.EPI_MP_SILU, K.EPI_MP_OUT, K.EPI_BIAS_RESIDUAL, K.EPI_BIAS)
    for epi in epis if i == 0 else (K.EPI_MP_OUT,):
        for dt in ('bf16', 'fp16', 'fp32'):
            compile_for_h100(K._temporal_conv1d_kernel, dict(EPI=epi, PREC='ieee', BLOCK_CI=32, **cfg.kwargs), dt=dt,
                             warps=cfg.num_warps, stages=cfg.num_stages)
b_co, b_ci, b_p = K.WGRAD_BLOCKS
for dt, prec, det in (('bf16', 'ieee', False), ('fp16', 'ieee', False), ('fp32', 'ieee', False),
                      ('fp32', 'tf32', False), ('bf16', 'ieee', True)):          # True: deterministic mode
    compile_for_h100(K._temporal_conv1d_weight_grad_kernel,
                     dict(HAS_BIAS=True, PREC=prec, DETERMINISTIC=det, BLOCK_CO=b_co, BLOCK_CI=b_ci, BLOCK_P=b_p),
                     dt=dt, warps=K.WGRAD_WARPS)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernels: compile what the launchers launch (every conv config and
    epilogue, the weight grad) for sm_90 through ptxas, so a GPU-only lowering error or a variant that does not fit
    an H100 fails here too (``pytest -s`` prints registers, spills and shared memory per variant)."""
    compile_for_sm90(_COMPILE_CALLS, f32_buffers={'dw_ptr', 'db_ptr'}, floats={'c_out', 'c_res', 'silu_scale'})
