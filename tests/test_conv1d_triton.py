"""The Triton temporal conv1d (the conv block's implicit-GEMM conv launched on its own) against the reference.

Forced with ``use_backend('triton')`` (the interpreter runs it on CPU tensors) and asserted with
``record_choices``; outputs start as NaN (``poison_and_ieee``), so an element no program writes fails.
Tolerances: fp32 atol = rtol = 1e-5 elementwise for the output and grad x (short sums); grad weight/bias are sums
over every (frame, pixel), atol 1e-5 * max|reference|. fp16 inputs against the fp32 reference of the same rounded
values: norm-wise relative error 1e-2 (fp32 accumulation, one fp16 rounding of the result). bf16: GPU only (the
interpreter's bf16 math is wrong).
"""

from __future__ import annotations

import pytest
import torch

from lumiere_fast import backend
from lumiere_fast.ops import temporal_conv1d, temporal_conv1d_ref
from helpers import compile_for_sm90, strided_frames

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU test: no CUDA device on this machine')


def _grads(fn, x, w, b, batch, cot):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], leaves[2], batch)
    out.backward(cot)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _triton(x, w, b, batch):
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = temporal_conv1d(x, w, b, batch=batch)
    assert seen == {'temporal_conv1d': {'triton'}}, seen
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (b, t, c_in, c_out, H, W, k, bias, layout): T=1, odd T, c_in != c_out, channels not a multiple of 16, pixel
# tails, k 1/3/5, a channel slice and a channels-last view
CASES = [
    (1, 1, 3, 5, 3, 3, 3, True, 'contiguous'),
    (2, 5, 7, 4, 2, 3, 3, True, 'slice'),
    (1, 4, 19, 19, 3, 5, 5, False, 'permuted'),
    (3, 3, 6, 9, 1, 7, 1, True, 'contiguous'),
    (2, 7, 5, 5, 4, 4, 5, True, 'slice'),
]


@pytest.mark.parametrize('b,t,ci,co,H,W,k,bias,layout', CASES,
                         ids=[f'b{c[0]}t{c[1]}ci{c[2]}co{c[3]}-{c[4]}x{c[5]}-k{c[6]}-{c[8]}' for c in CASES])
def test_triton_conv1d_fp32_forward_and_backward(poison_and_ieee, b, t, ci, co, H, W, k, bias, layout):
    torch.manual_seed(0)
    x = strided_frames(b, t, ci, H, W, torch.float32, layout)
    w, bb = torch.randn(co, ci, k), (torch.randn(co) if bias else None)
    cot = torch.randn(b * t, co, H, W)
    ours, g_ours = _grads(_triton, x, w, bb, b, cot)
    ref, g_ref = _grads(lambda *a: temporal_conv1d_ref(*a), x, w, bb, b, cot)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours[0], g_ref[0], atol=1e-5, rtol=1e-5)
    for name, a, r in (('weight', g_ours[1], g_ref[1]), ('bias', g_ours[2], g_ref[2])):
        if r is None:
            assert a is None
            continue
        torch.testing.assert_close(a, r, atol=1e-5 * max(r.abs().max().item(), 1.), rtol=1e-5,
                                   msg=lambda m: f'grad {name}: {m}')


def test_triton_conv1d_fp16_against_the_fp32_reference(poison_and_ieee):
    torch.manual_seed(1)
    b, t, ci, co, H, W, k = 2, 3, 6, 5, 3, 3, 3
    x = torch.randn(b * t, ci, H, W).half()
    w, bb = (torch.randn(co, ci, k) / 3).half(), torch.randn(co).half()
    cot = torch.randn(b * t, co, H, W).half()
    ours, g_ours = _grads(_triton, x, w, bb, b, cot)
    assert ours.dtype == torch.float16 and all(g.dtype == torch.float16 for g in g_ours)
    ref, g_ref = _grads(lambda *a: temporal_conv1d_ref(*a), x.float(), w.float(), bb.float(), b, cot.float())
    for name, a, r in (('out', ours, ref), *zip(('x', 'weight', 'bias'), g_ours, g_ref)):
        assert _rel(a, r) < 1e-2, f'{name}: relative error {_rel(a, r):.3g}'


def test_triton_conv1d_opcheck_and_compile_without_graph_break(poison_and_ieee):
    from lumiere_fast.ops.temporal_conv1d import _temporal_conv1d_op
    torch.manual_seed(2)
    x, w, bb = torch.randn(4, 3, 2, 3), torch.randn(5, 3, 3), torch.randn(5)
    torch.library.opcheck(_temporal_conv1d_op, (x, w, bb, 2))
    torch.library.opcheck(_temporal_conv1d_op, (x, w, None, 2))

    def fn(x, w, bb):
        return temporal_conv1d(x, w, bb, batch=2).square().sum()

    with backend.use_backend('triton'):
        compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
        torch.testing.assert_close(compiled(x, w, bb), fn(x, w, bb))


def test_reference_backend_and_the_time_major_layout_skip_triton(recwarn):
    x3, w = torch.randn(2, 3, 5), torch.randn(3, 3, 3)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        temporal_conv1d(x3, w)                      # (n, c, t): no Triton kernel for this layout
    assert seen == {'temporal_conv1d': {'reference'}}
    with backend.use_backend('reference'), backend.record_choices() as seen:
        temporal_conv1d(torch.randn(4, 3, 2, 2), w, batch=2)
    assert seen == {'temporal_conv1d': {'reference'}}


@needs_cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_triton_conv1d_on_gpu(poison_and_ieee, dtype, tol):
    """Real shapes (C=384 at 32x32, B=2, T=16) against the fp32 reference of the same rounded values."""
    torch.manual_seed(3)
    b, t, c, H, W, k = 2, 16, 384, 32, 32, 3
    x = torch.randn(b * t, c, H, W, device='cuda').to(dtype)
    w, bb = (torch.randn(c, c, k, device='cuda') / (3 * c) ** 0.5).to(dtype), torch.randn(c, device='cuda').to(dtype)
    cot = torch.randn(b * t, c, H, W, device='cuda').to(dtype)
    ours, g_ours = _grads(_triton, x, w, bb, b, cot)
    ref, g_ref = _grads(lambda *a: temporal_conv1d_ref(*a), x.float(), w.float(), bb.float(), b, cot.float())
    for name, a, r in (('out', ours, ref), *zip(('x', 'weight', 'bias'), g_ours, g_ref)):
        assert _rel(a, r) < tol, f'{name}: relative error {_rel(a, r):.3g}'


# ------------------------------------------------------------------------------ GPU compile without a GPU

_COMPILE_CALLS = r'''
from lumiere_fast.kernels import temporal_conv1d as K
compile_for_h100(K._temporal_conv1d_kernel, dict(EPI=K.EPI_MP_OUT, PREC='ieee', BLOCK_C=64, BLOCK_CI=32, BLOCK_P=32),
                 warps=8)
compile_for_h100(K._temporal_conv1d_weight_grad_kernel,
                 dict(HAS_BIAS=True, PREC='tf32', BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=32), dt='fp32', warps=8)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter never lowers the kernels: compile the conv (an epilogue with a residual) in bf16 and the
    TF32 weight grad for sm_90 through ptxas, so a GPU-only lowering error fails here too."""
    compile_for_sm90(_COMPILE_CALLS, f32_buffers={'dw_ptr', 'db_ptr'}, floats={'c_out', 'c_res', 'silu_scale'})
