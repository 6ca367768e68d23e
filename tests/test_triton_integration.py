"""The Triton kernels inside the modules and the wrapper: forced with LUMIERE_FAST_BACKEND=triton (the
interpreter on CPU), compared with the reference backend on the same weights; and torch.compile of whole
blocks with fullgraph=True (no graph break around the custom ops, the in-place MP renormalisation included).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lumiere_fast as lf
from helpers import SMALL_UNET_NAMES, TOL, assert_close_rel, perturb_, small_unet
from lumiere_fast import backend

# fp32 through the interpreter: the kernels sum in another order than cuDNN/ATen (tile by tile)
FP32 = TOL[torch.float32]


def _run(model, video, backend_name, **cond):
    with backend.use_backend(backend_name), backend.record_choices() as seen, warnings.catch_warnings():
        # ops without a kernel (mp_weight) and calls no kernel takes run their reference, warned once
        warnings.simplefilter('ignore', RuntimeWarning)
        v = video.clone().requires_grad_(True)
        out = model(v, **cond)
        grads = torch.autograd.grad(out, [v, *model.parameters()], torch.ones_like(out) / out.numel() ** 0.5)
    return [out, *grads], seen


@pytest.mark.parametrize('family', ['MP', ''])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_wrapper_on_triton_matches_reference(family, mode):
    unet = small_unet()
    torch.manual_seed(1)
    model = getattr(lf, f'{family}Lumiere')(unet, image_size=16, attn_inflation_kwargs=dict(heads=2, dim_head=8),
                                            **SMALL_UNET_NAMES)
    perturb_(model)
    model.train(mode == 'train')
    ref_model = copy.deepcopy(model)         # train mode renormalises in place: each backend gets its own copy
    video, time = torch.randn(1, 3, 4, 16, 16), torch.rand(1)
    got, seen = _run(model, video, 'triton', time=time)
    ref, _ = _run(ref_model, video, 'reference', time=time)
    conv_op = 'mp_temporal_conv_block' if family else 'temporal_conv_block'
    down_op = 'mp_temporal_downsample' if family else 'temporal_downsample'
    assert seen[conv_op] == {'triton'} and seen[down_op] == {'triton'}, seen
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a, b, TOL['fp32_model'], 1e-7, what=f'{"output" if i == 0 else f"grad #{i}"}')


@pytest.mark.parametrize('klass,kw', [('MPConvolutionInflationBlock', {}), ('ConvolutionInflationBlock', {}),
                                      ('MPTemporalDownsample', {}), ('TemporalUpsample', {})])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_compiled_block_fullgraph(klass, kw, mode, monkeypatch):
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'triton')
    torch._dynamo.reset()
    block = getattr(lf, klass)(dim=5, **kw)
    perturb_(block)
    block.train(mode == 'train')
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 5, 4, 2, 3)
    with backend.record_choices() as seen:
        out_c = compiled(x)
    out_e = eager(x)
    assert any(v == {'triton'} for v in seen.values()), seen
    assert_close_rel(out_c, out_e, FP32, what='compiled output')
    for (name, p), q in zip(block.named_parameters(), eager.parameters()):     # train: the same in-place renorm
        assert_close_rel(p, q, FP32, what=name)


@pytest.mark.parametrize('op', ['mp_temporal_conv_block', 'temporal_conv_block', 'mp_temporal_downsample',
                                'temporal_upsample'])
def test_long_clip_128_frames(op):
    """T=128, the longest clip the issue asks for (the non-MP block holds all frames of its pixels)."""
    from lumiere_fast import ops
    b, t, c = 1, 128, 5
    x, h = torch.randn(b * t, c, 1, 3), torch.randn(b * t, c, 1, 3)
    w3, w1, vec = torch.randn(c, c, 3) * 0.3, torch.randn(c, c, 1) * 0.3, torch.randn(c)
    args = {'mp_temporal_conv_block': (h, x, w3, w1, torch.tensor(0.7)),
            'temporal_conv_block': (h, x, w3, vec, vec.abs(), w1, vec),
            'mp_temporal_downsample': (x, w3), 'temporal_upsample': (x, w3, vec)}[op]
    fn = getattr(ops, op)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        got = fn(*args, batch=b)
    assert seen[op] == {'triton'}
    with backend.use_backend('reference'):
        ref = fn(*args, batch=b)
    assert_close_rel(got, ref, FP32, what=op)
