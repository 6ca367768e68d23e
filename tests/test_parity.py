"""lumiere_fast against lumiere-pytorch 0.0.24: state dicts load strictly, same outputs, same gradients.

Every case: build upstream's module, move all its parameters off their init, load its state dict into ours
with strict=True, run both on the same input in eval and in train mode, and compare the output and the
gradients of the input and of every parameter (fp32, norm-wise relative error <= 1e-5). In train mode the MP
layers renormalise their stored weights in place: the weights after the step are compared too.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lumiere_fast as ours
from helpers import PARITY_RTOL, SMALL_UNET_NAMES, assert_close_rel, perturb_, rel_err, small_unet

upstream = pytest.importorskip('lumiere_pytorch', reason='parity tests need lumiere-pytorch==0.0.24 (the test extra)')

RTOL = PARITY_RTOL[torch.float32]
# A gradient that is zero in exact arithmetic (e.g. through upstream's norm over a single frame at t=1) is
# rounding noise in both implementations; it is compared against this fraction of the case's largest gradient.
NOISE_FLOOR = 1e-6


def _pair(name, *args, **kwargs):
    u = getattr(upstream, name)(*args, **kwargs)
    perturb_(u)
    o = getattr(ours, name)(*args, **kwargs)
    o.load_state_dict(u.state_dict(), strict=True)
    if not hasattr(u, 'batch_dim'):      # upstream's MP attention/resample blocks lack it (AttributeError)
        u.batch_dim = None
    return u, o


def _compare(u, o, x, mode, forward_kwargs=None, what=''):
    forward_kwargs = forward_kwargs or {}
    u.train(mode == 'train')
    o.train(mode == 'train')
    xu = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    out_u = u(xu, **forward_kwargs)
    out_o = o(xo, **forward_kwargs)
    assert_close_rel(out_o, out_u, RTOL, what=f'{what} output')
    cot = torch.randn_like(out_u)
    names = [n for n, _ in u.named_parameters()]
    pu = [p for _, p in u.named_parameters()]
    po = dict(o.named_parameters())
    assert sorted(names) == sorted(po), f'{what}: parameter names differ'
    gu = torch.autograd.grad(out_u, [xu, *pu], cot, allow_unused=True)
    go = torch.autograd.grad(out_o, [xo, *[po[n] for n in names]], cot, allow_unused=True)
    floor = NOISE_FLOOR * max(g.norm().item() for g in gu if g is not None)
    for n, a, b in zip(['input', *names], go, gu):
        if b is None:
            assert a is None or a.abs().max() == 0, f'{what}: {n} has a gradient upstream does not'
            continue
        assert a is not None, f'{what}: no gradient for {n}'
        assert_close_rel(a, b, RTOL, floor, what=f'{what} grad {n}')
    for n, p in u.named_parameters():       # in-place renormalisation (train mode) gives the same weights
        assert_close_rel(po[n], p, 1e-6, what=f'{what} weight {n} after forward')


CONV_CASES = [  # dim, frames, h, w, conv2d k, conv1d k
    (5, 1, 3, 5, 3, 3), (12, 2, 4, 3, 3, 3), (7, 3, 5, 2, 1, 5), (16, 5, 2, 6, 5, 3), (9, 9, 3, 3, 3, 1),
    (3, 4, 1, 7, 3, 3),
]


@pytest.mark.parametrize('klass', ['ConvolutionInflationBlock', 'MPConvolutionInflationBlock'])
@pytest.mark.parametrize('dim,t,h,w,k2,k1', CONV_CASES)
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_conv_block_parity_video(klass, dim, t, h, w, k2, k1, mode):
    u, o = _pair(klass, dim=dim, conv2d_kernel_size=k2, conv1d_kernel_size=k1)
    _compare(u, o, torch.randn(2, dim, t, h, w), mode, what=f'{klass} video')


@pytest.mark.parametrize('klass', ['ConvolutionInflationBlock', 'MPConvolutionInflationBlock'])
@pytest.mark.parametrize('batch,t', [(1, 1), (3, 2), (2, 7)])
def test_conv_block_parity_frames(klass, batch, t):
    u, o = _pair(klass, dim=6)
    _compare(u, o, torch.randn(batch * t, 6, 4, 5), 'train', dict(batch_size=batch), what=f'{klass} frames')


def test_conv_block_parity_time_dim():
    u, o = _pair('MPConvolutionInflationBlock', dim=6, time_dim=3)
    _compare(u, o, torch.randn(2 * 3, 6, 4, 5), 'eval', what='time_dim')


ATTN_CASES = [  # dim, depth, frames, h, w, extra kwargs
    (8, 1, 1, 2, 3, dict(heads=2, dim_head=4)),
    (12, 2, 5, 3, 2, dict(heads=3, dim_head=8)),
    (7, 1, 9, 2, 2, dict(heads=1, dim_head=7)),
    (16, 2, 4, 1, 3, dict(heads=4, dim_head=32)),
    (10, 1, 13, 2, 1, dict()),
]


@pytest.mark.parametrize('dim,depth,t,h,w,kw', ATTN_CASES)
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_attention_block_parity(dim, depth, t, h, w, kw, mode):
    u, o = _pair('AttentionInflationBlock', dim=dim, depth=depth, **kw)
    _compare(u, o, torch.randn(2, dim, t, h, w), mode, what='AttentionInflationBlock')


@pytest.mark.parametrize('prenorm,residual_attn', [(False, True), (True, False), (False, False)])
def test_attention_block_parity_flags(prenorm, residual_attn):
    u, o = _pair('AttentionInflationBlock', dim=8, heads=2, dim_head=4, prenorm=prenorm, residual_attn=residual_attn)
    _compare(u, o, torch.randn(2, 8, 3, 2, 2), 'train', what=f'prenorm={prenorm} residual={residual_attn}')


@pytest.mark.parametrize('dim,depth,t,h,w,kw', ATTN_CASES)
@pytest.mark.parametrize('num_mem_kv', [0, 1, 4])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_mp_attention_block_parity(dim, depth, t, h, w, kw, num_mem_kv, mode):
    u, o = _pair('MPAttentionInflationBlock', dim=dim, depth=depth, num_mem_kv=num_mem_kv, **kw)
    _compare(u, o, torch.randn(2, dim, t, h, w), mode, what='MPAttentionInflationBlock')


def test_mp_attention_block_parity_frames_and_mp_add_t():
    u, o = _pair('MPAttentionInflationBlock', dim=8, heads=2, dim_head=4, mp_add_t=0.45)
    _compare(u, o, torch.randn(3 * 4, 8, 2, 3), 'train', dict(batch_size=3), what='MP attention frames')


RESAMPLE_CASES = [  # klass, dim, frames, h, w: halving needs an even frame count, doubling takes any
    *((k, *shape) for k in ('TemporalDownsample', 'MPTemporalDownsample')
      for shape in [(4, 2, 3, 2), (9, 6, 2, 5), (16, 8, 1, 1), (5, 12, 3, 3)]),
    *((k, *shape) for k in ('TemporalUpsample', 'MPTemporalUpsample')
      for shape in [(4, 1, 3, 2), (9, 3, 2, 5), (16, 4, 1, 1), (5, 7, 3, 3)]),
]


@pytest.mark.parametrize('klass,dim,t,h,w', RESAMPLE_CASES)
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_resample_parity(klass, dim, t, h, w, mode):
    u, o = _pair(klass, dim)
    _compare(u, o, torch.randn(2, dim, t, h, w), mode, what=klass)


@pytest.mark.parametrize('klass', ['TemporalDownsample', 'TemporalUpsample', 'MPTemporalDownsample',
                                   'MPTemporalUpsample'])
def test_resample_parity_frames(klass):
    u, o = _pair(klass, 6)
    _compare(u, o, torch.randn(3 * 4, 6, 2, 3), 'train', dict(batch_size=3), what=f'{klass} frames')


# ---------------------------------------------------------------------------------------------- wrapper

def _lumiere_pair(family, unet, **kwargs):
    torch.manual_seed(1)
    u = getattr(upstream, f'{family}Lumiere')(unet, **kwargs)
    o = getattr(ours, f'{family}Lumiere')(unet, **kwargs)
    sd = u.state_dict()
    with torch.no_grad():
        for key, value in sd.items():
            if not key.startswith('model.') and value.is_floating_point():
                std = value.std().item() if value.numel() > 1 else 0.
                value.add_(torch.randn_like(value) * 0.3 * (std if std > 0 else 1.))
    o.load_state_dict(sd, strict=True)
    return u, o


def _lumiere_outputs(model, video, cot_seed, **cond):
    v = video.clone().requires_grad_(True)
    out = model(v, **cond)
    # drawn in float32 and cast, so the float64 re-run differentiates the very same loss
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cot_seed)).to(out.dtype)
    return [out, *torch.autograd.grad(out, [v, *model.parameters()], cot)]


def _compare_lumiere(u, o, video, mode, **cond):
    """The whole wrapped U-Net, outputs and every gradient (input and temporal parameters):

    * float64: ours equals upstream to 1e-9 (the same math);
    * float32: ours within RTOL of upstream. A U-Net can amplify rounding past RTOL in upstream itself (a
      norm over one or two frames, upstream's quirk, is nearly flat); where ours and upstream differ by more,
      ours must be as close to the float64 answer as upstream's float32 result is (within 2x).
    """
    u.train(mode == 'train')
    o.train(mode == 'train')
    u64, o64 = copy.deepcopy(u).double(), copy.deepcopy(o).double()     # before train mode renormalises
    cond64 = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    ref, got = _lumiere_outputs(u, video, 7, **cond), _lumiere_outputs(o, video, 7, **cond)
    exact, got64 = _lumiere_outputs(u64, video.double(), 7, **cond64), _lumiere_outputs(o64, video.double(), 7, **cond64)
    assert got[0].shape == video.shape and len(got) == len(ref) == len(exact) == len(got64)
    floor = NOISE_FLOOR * max(g.norm().item() for g in ref[1:])
    floor64 = 1e-12 * max(g.norm().item() for g in exact[1:])    # a gradient zero in exact arithmetic
    for i, (a, b, a64, b64) in enumerate(zip(got, ref, got64, exact)):
        what = 'Lumiere output' if i == 0 else f'Lumiere grad #{i}'
        assert_close_rel(a64, b64, 1e-9, floor64 if i else 0., what=f'{what} (float64)')
        if rel_err(a, b) <= RTOL or (i > 0 and (a - b).double().norm() <= floor):
            continue
        up_err = rel_err(b, b64)
        assert rel_err(a, b64) <= max(RTOL, 2 * up_err), \
            f'{what}: ours is off the float64 answer by {rel_err(a, b64):.3g}, upstream by {up_err:.3g}'


@pytest.mark.parametrize('family', ['', 'MP'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('frames', [2, 4])
def test_lumiere_parity(family, mode, frames):
    unet = small_unet()
    u, o = _lumiere_pair(family, unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
    _compare_lumiere(u, o, torch.randn(2, 3, frames, 16, 16), mode, time=torch.rand(2))


@pytest.mark.parametrize('family', ['', 'MP'])
def test_lumiere_parity_paper_points_and_kwargs(family):
    """Paper inflation points passed to upstream by name, non-default block kwargs, per-frame time."""
    from lumiere_fast.lumiere import karras_unet_inflation_points
    unet = small_unet()
    points = karras_unet_inflation_points(unet)
    attn_kw = dict(heads=2, dim_head=8, depth=2) | (dict(num_mem_kv=2) if family else {})
    u, o = _lumiere_pair(family, unet, image_size=16, unet_time_kwarg='time',
                         conv_module_names=points['conv'], attn_module_names=points['attn'],
                         downsample_module_names=points['downsample'], upsample_module_names=points['upsample'],
                         conv_inflation_kwargs=dict(conv1d_kernel_size=5), attn_inflation_kwargs=attn_kw)
    assert [type(m).__name__ for m in o.temporal_modules()] == [type(m).__name__ for m in
                                                                  [*u.convs, *u.attns, *u.downsamples, *u.upsamples]]
    # per-frame time, the same within each group of frames the temporal downsamples merge: there upstream's
    # first-of-group rule and our group mean agree (test_wrapper tests time that differs within a group)
    group = o.downsample_factor
    _compare_lumiere(u, o, torch.randn(1, 3, 8, 16, 16), 'train', time=torch.rand(8 // group).repeat_interleave(group))


def test_lumiere_parity_channels_and_depth():
    unet = small_unet(channels=4, image_size=8, num_downsamples=1, attn_res=(4,))
    names = dict(conv_module_names=['downs.0'], attn_module_names=['mids.1'], downsample_module_names=['downs.1'],
                 upsample_module_names=['ups.2'])
    u, o = _lumiere_pair('MP', unet, image_size=8, unet_time_kwarg='time', channels=4,
                         attn_inflation_kwargs=dict(depth=2, heads=3, dim_head=16), **names)
    _compare_lumiere(u, o, torch.randn(2, 4, 6, 8, 8), 'eval', time=torch.rand(2))


def test_upstream_state_dict_keys_are_ours():
    unet = small_unet()
    for family in ('', 'MP'):
        u = getattr(upstream, f'{family}Lumiere')(unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
        o = getattr(ours, f'{family}Lumiere')(unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
        assert list(o.state_dict()) == list(u.state_dict())
        assert [tuple(v.shape) for v in o.state_dict().values()] == [tuple(v.shape) for v in u.state_dict().values()]
