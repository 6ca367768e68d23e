"""Frame fold / unfold (``ops/fold.py``): the einops reference against the permutation written out, and the
Triton kernels (kernels/fold.py) against the reference.

Fold and unfold are pure copies, so every comparison is exact (rtol = atol = 0) in fp32 and fp16; bf16 runs
only in the GPU tests (the interpreter's bf16 is wrong). Outputs are NaN-poisoned before each launch, so an
element the kernel never writes fails ``torch.equal``. On CPU the kernels run under TRITON_INTERPRET=1 with
16 x 16 tiles, so the shapes below cross tile borders in q and p.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import REF_SHAPES, TOL, assert_close_rel
from lumiere_fast import backend, ops
from lumiere_fast.ops import _triton
from lumiere_fast.ops import fold as fold_ops

# (b, t, c, h, w): odd everything, T=1 (with W=1), C=1, H*W=1, q and p past one 16-tile, exact tiles
SHAPES = [(2, 3, 5, 3, 7), (1, 1, 1, 1, 1), (2, 1, 19, 5, 1), (1, 5, 1, 5, 3), (3, 17, 19, 2, 9), (2, 16, 16, 4, 4)]
LAYOUTS = ['c t', 't c']
DTYPES = [torch.float32, torch.float16]
FRAME_VIEWS = ['contiguous', 'channels_last', 'permuted', 'slice']
FOLDED_VIEWS = ['contiguous', 'transposed', 'slice']
# (dtype, view): every view in fp32; fp16 on one contiguous and one strided view (a copy cares about the
# element size, not the values, and the interpreter is slow)
FRAME_CASES = [(torch.float32, v) for v in FRAME_VIEWS] + [(torch.float16, 'contiguous'), (torch.float16, 'permuted')]
FOLDED_CASES = [(torch.float32, v) for v in FOLDED_VIEWS] + [(torch.float16, 'contiguous'),
                                                             (torch.float16, 'transposed')]


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value)[6:]
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return 'btchw=' + 'x'.join(map(str, value))
    return None


# ------------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize('shape', REF_SHAPES)
@pytest.mark.parametrize('layout', ['c t', 't c'])
def test_fold_unfold_roundtrip(shape, layout):
    b, t, c, h, w = shape
    x = torch.randn(b * t, c, h, w)
    y = ops.fold_frames(x, b, layout)
    expect = x.view(b, t, c, h, w).permute(0, 3, 4, 2, 1).reshape(b * h * w, c, t)
    assert torch.equal(y, expect if layout == 'c t' else expect.transpose(1, 2))
    assert torch.equal(ops.unfold_frames(y, b, h, w, layout), x)


def test_fold_errors():
    with pytest.raises(ValueError, match='4-dim'):
        ops.fold_frames(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match='batch \\(4\\) x frames'):
        ops.fold_frames(torch.randn(6, 3, 2, 2), 4)
    with pytest.raises(ValueError, match="layout: expected one of"):
        ops.fold_frames(torch.randn(6, 3, 2, 2), 2, 'ct')
    with pytest.raises(ValueError, match='batch\\*height\\*width'):
        ops.unfold_frames(torch.randn(6, 3, 2), 2, 2, 2)


# ------------------------------------------------------------------------------------------------ Triton


@pytest.fixture(autouse=True)
def _poison_and_count(monkeypatch):
    """NaN-poison launcher outputs, and count launches by direction (to prove backward ran the kernels)."""
    monkeypatch.setattr(_triton, 'POISON', True)
    launches = []
    real = fold_ops._launch

    def counting(frames, folded, batch, layout, to_folded):
        launches.append('fold' if to_folded else 'unfold')
        return real(frames, folded, batch, layout, to_folded)

    monkeypatch.setattr(fold_ops, '_launch', counting)
    return launches


def _frames(shape, dtype, view, device='cpu'):
    """A (b t) c h w tensor with the given memory layout (values equal whatever the view)."""
    b, t, c, h, w = shape
    if view == 'contiguous':
        return torch.randn(b * t, c, h, w, device=device).to(dtype)
    if view == 'channels_last':
        return torch.randn(b * t, c, h, w, device=device).to(dtype).to(memory_format=torch.channels_last)
    if view == 'permuted':      # stored c w (b t) h: no two axes merge, h and w split per element
        return torch.randn(c, w, b * t, h, device=device).to(dtype).permute(2, 0, 3, 1)
    if view == 'slice':         # channel and width slices of a bigger tensor: storage offset, s_h != w * s_w
        return torch.randn(b * t, c + 2, h, w + 3, device=device).to(dtype)[:, 1:c + 1, :, 2:w + 2]
    raise AssertionError(view)


def _folded(shape, layout, dtype, view):
    b, t, c, h, w = shape
    n, d1, d2 = (b * h * w, c, t) if layout == 'c t' else (b * h * w, t, c)
    if view == 'contiguous':
        return torch.randn(n, d1, d2).to(dtype)
    if view == 'transposed':    # the other layout's contiguous tensor, seen as this layout
        return torch.randn(n, d2, d1).to(dtype).transpose(1, 2)
    if view == 'slice':
        return torch.randn(n, d1 + 1, 2 * d2).to(dtype)[:, 1:, ::2]
    raise AssertionError(view)


def _triton_ran(seen, op):
    assert seen.get(op) == {'triton'}, f'{op} ran {seen.get(op)}: the kernel path must not fall back'


@pytest.mark.parametrize('dtype, view', FRAME_CASES, ids=_ids)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape', SHAPES, ids=_ids)
def test_fold_forward(shape, layout, dtype, view):
    """Exact: a copy. Output contiguous in the requested layout."""
    x = _frames(shape, dtype, view)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        y = ops.fold_frames(x, shape[0], layout)
    _triton_ran(seen, 'fold_frames')
    assert y.is_contiguous()
    assert torch.equal(y, ops.fold_frames_ref(x, shape[0], layout))


@pytest.mark.parametrize('dtype, view', FOLDED_CASES, ids=_ids)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape', SHAPES, ids=_ids)
def test_unfold_forward(shape, layout, dtype, view):
    b, t, c, h, w = shape
    x = _folded(shape, layout, dtype, view)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        y = ops.unfold_frames(x, b, h, w, layout)
    _triton_ran(seen, 'unfold_frames')
    assert y.is_contiguous()
    assert torch.equal(y, ops.unfold_frames_ref(x, b, h, w, layout))


@pytest.mark.parametrize('dtype', DTYPES, ids=_ids)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape', [SHAPES[0], (1, 17, 17, 1, 17)], ids=_ids)
def test_fold_unfold_backward(shape, layout, dtype, _poison_and_count):
    """The backward of fold is the unfold kernel and vice versa; gradients exact vs autograd of the reference."""
    b, t, c, h, w = shape
    x = _frames(shape, dtype, 'permuted').requires_grad_()
    with backend.use_backend('triton'):
        y = ops.fold_frames(x, b, layout)
        cot = torch.randn(y.shape).to(dtype)
        _poison_and_count.clear()
        (g_ours,) = torch.autograd.grad(y, x, cot)
        assert _poison_and_count == ['unfold']
        (g_ref,) = torch.autograd.grad(ops.fold_frames_ref(x, b, layout), x, cot)
        assert torch.equal(g_ours, g_ref)

        z = _folded(shape, layout, dtype, 'transposed').requires_grad_()
        u = ops.unfold_frames(z, b, h, w, layout)
        cot = torch.randn(u.shape).to(dtype)
        _poison_and_count.clear()
        (g_ours,) = torch.autograd.grad(u, z, cot)
        assert _poison_and_count == ['fold']
        (g_ref,) = torch.autograd.grad(ops.unfold_frames_ref(z, b, h, w, layout), z, cot)
        assert torch.equal(g_ours, g_ref)


def test_double_backward(_poison_and_count):
    """Backward goes through the custom ops themselves, so a second derivative runs the kernels again."""
    b, t, c, h, w = 2, 3, 5, 3, 2
    x = torch.randn(b * t, c, h, w, requires_grad=True)
    with backend.use_backend('triton'):
        y = ops.fold_frames(x, b, 'c t')
        cot = torch.randn(y.shape, requires_grad=True)
        (g,) = torch.autograd.grad(y, x, cot, create_graph=True)
        probe = torch.randn_like(g)
        (gg,) = torch.autograd.grad(g, cot, probe)
    assert _poison_and_count == ['fold', 'unfold', 'fold']
    assert torch.equal(gg, ops.fold_frames_ref(probe, b, 'c t'))


def test_auto_backend_on_cpu_takes_reference():
    """auto: kernels for CUDA tensors only; float64 is outside the kernel dtypes even when forced."""
    x = torch.randn(4, 3, 2, 2)
    with backend.record_choices() as seen:
        ops.fold_frames(x, 2)
    assert seen == {'fold_frames': {'reference'}}
    with backend.use_backend('triton'), backend.record_choices() as seen, warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)      # the forced backend warns once per op
        y = ops.fold_frames(x.double(), 2)
    assert seen == {'fold_frames': {'reference'}}
    assert torch.equal(y, ops.fold_frames_ref(x.double(), 2))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_opcheck(layout):
    b, t, c, h, w = 2, 3, 5, 2, 3
    x = torch.randn(b * t, c, h, w).to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.lumiere_fast.fold_frames.default, (x, b, layout))
    z = _folded((b, t, c, h, w), layout, torch.float32, 'transposed').requires_grad_()
    torch.library.opcheck(torch.ops.lumiere_fast.unfold_frames.default, (z, b, h, w, layout))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_compile_fullgraph(monkeypatch, layout):
    """LUMIERE_FAST_BACKEND=triton: the dispatching functions trace into the custom ops with no graph break."""
    monkeypatch.setenv(backend.ENV_VAR, 'triton')
    b, t, c, h, w = 2, 3, 5, 3, 2

    def fn(x):
        return ops.unfold_frames(ops.fold_frames(x, b, layout) * 2, b, h, w, layout)

    x = torch.randn(b * t, c, h, w, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend='aot_eager')(x)
    out.backward(torch.ones_like(out))
    assert torch.equal(out, 2 * x)
    assert torch.equal(x.grad, torch.full_like(x, 2.))


@pytest.mark.parametrize('block', ['TemporalDownsample', 'TemporalUpsample'])
def test_matches_upstream_resample_module(block):
    """Module level: upstream's temporal resample (fold 'c t' -> conv -> unfold) against the same conv between
    our Triton fold/unfold, upstream weights loaded, forward and every gradient.

    No lumiere_fast module calls ``ops.fold_frames`` itself yet (ops/resample.py and ops/attention.py inline
    the reference rearranges), so the op is held to upstream's module directly."""
    lumiere_pytorch = pytest.importorskip('lumiere_pytorch')
    b, t, c, h, w = 2, 4, 3, 3, 2
    up = getattr(lumiere_pytorch, block)(dim=c)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    up.batch_dim = b
    conv = F.conv1d if block == 'TemporalDownsample' else F.conv_transpose1d
    extra = dict(stride=2, padding=1) if block == 'TemporalDownsample' else dict(stride=2, padding=1,
                                                                                  output_padding=1)
    weight = up.conv.weight.detach().clone().requires_grad_()
    bias = up.conv.bias.detach().clone().requires_grad_()
    x = torch.randn(b * t, c, h, w, requires_grad=True)

    expect = up(x)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        ours = ops.unfold_frames(conv(ops.fold_frames(x, b), weight, bias, **extra), b, h, w)
    _triton_ran(seen, 'fold_frames')
    _triton_ran(seen, 'unfold_frames')
    assert_close_rel(ours, expect, TOL[torch.float32])
    cot = torch.randn_like(expect)
    g_up = torch.autograd.grad(expect, (x, up.conv.weight, up.conv.bias), cot)
    g_ours = torch.autograd.grad(ours, (x, weight, bias), cot)
    for a, e in zip(g_ours, g_up):      # fp32, same conv, fold/unfold exact: only conv summation order differs
        assert_close_rel(a, e, TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ GPU only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='GPU test: bf16 and sizes past the grid/int32 limits need a CUDA device')


@needs_cuda
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('view', ['contiguous', 'channels_last', 'permuted'])
def test_gpu_bf16_many_pixels(layout, view):
    """B*H*W = 131,072 > 65,535 (the folded batch would overflow grid axes 1/2), bf16, backward too."""
    shape = b, t, c, h, w = 2, 5, 19, 256, 256
    x = _frames(shape, torch.bfloat16, view, device='cuda').requires_grad_()
    with backend.use_backend('triton'), backend.record_choices() as seen:
        y = ops.fold_frames(x, b, layout)
        u = ops.unfold_frames(y, b, h, w, layout)
    _triton_ran(seen, 'fold_frames')
    _triton_ran(seen, 'unfold_frames')
    assert torch.equal(y, ops.fold_frames_ref(x, b, layout))
    assert torch.equal(u, x)
    cot = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, cot)
    assert torch.equal(g, ops.unfold_frames_ref(cot, b, h, w, layout))


@needs_cuda
@pytest.mark.parametrize('layout', LAYOUTS)
def test_gpu_past_int32_elements(layout):
    """2 * 17 * 4 * 4096 * 4096 = 2.28e9 > 2**31 elements: offsets must be 64-bit. Needs ~14 GB free."""
    shape = b, t, c, h, w = 2, 17, 4, 4096, 4096
    numel = b * t * c * h * w
    assert numel > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 3.2 * numel * 2:
        pytest.skip(f'needs {3.2 * numel * 2 / 2 ** 30:.1f} GiB free on the GPU, has {free / 2 ** 30:.1f}')
    x = torch.randn(b * t, c, h, w, device='cuda', dtype=torch.bfloat16)
    with backend.use_backend('triton'):
        y = ops.fold_frames(x, b, layout)
    assert torch.equal(y, ops.fold_frames_ref(x, b, layout))
    with backend.use_backend('triton'):
        u = ops.unfold_frames(y, b, h, w, layout)
    del y
    assert torch.equal(u, x)


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import fold as K
# What ops/fold.py launches: every autotune config, both layouts (TILE_T) and directions, merged (contiguous or
# channels_last) pixels; the general (h, w) split and fp16 once.
for i, cfg in enumerate(K._fold_frames_kernel.configs):
    for tile_t in (True, False):
        for to_folded in (True, False):
            for dt in ('bf16', 'fp32', 'fp16') if i == 0 and tile_t and to_folded else ('bf16', 'fp32'):
                compile_for_h100(K._fold_frames_kernel, dict(TILE_T=tile_t, TO_FOLDED=to_folded, HW_MERGED=True,
                                                             **cfg.kwargs), dt=dt, warps=cfg.num_warps,
                                 stages=cfg.num_stages)
compile_for_h100(K._fold_frames_kernel, dict(TILE_T=True, TO_FOLDED=True, HW_MERGED=False, BLOCK_Q=64, BLOCK_P=128),
                 warps=8)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernel: compile what the launcher launches for sm_90 through ptxas, so a
    GPU-only lowering error or a tile whose layout conversion does not fit an H100's shared memory fails here too
    (``pytest -s`` prints registers, spills and shared memory per variant)."""
    from helpers import compile_for_sm90
    compile_for_sm90(_COMPILE_CALLS, pointers={'src', 'dst'})
