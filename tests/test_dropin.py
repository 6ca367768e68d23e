"""Drop-in: upstream's own README configurations, training-loop patterns and temporal-class contracts run here
with upstream's numbers (lumiere-pytorch 0.0.24 on the same state dict), plus the switches beyond upstream on
those configurations.

Issue 11 (a module in the conv list and a resample list, upstream's README), issue 17 (upstream's conditioning
rule by default, upstream-contract classes, dropout switch, the image model alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lumiere_fast as ours
from lumiere_fast import backend
from helpers import assert_close_rel, assert_kernels_only, perturb_, rel_err, small_unet
from test_parity import _compare_lumiere, _lumiere_pair

upstream = pytest.importorskip('lumiere_pytorch', reason='drop-in tests need lumiere-pytorch==0.0.24 (the test extra)')

# upstream's final README, names verbatim (the KarrasUnet's image size reduced from 256 to 32)
README_NAMES = dict(conv_module_names=['downs.1', 'ups.1', 'downs.2', 'ups.2'], attn_module_names=['mids.0'],
                    upsample_module_names=['ups.2', 'ups.1'], downsample_module_names=['downs.1', 'downs.2'])
README_SIZE = 32


def _readme_unet():
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=README_SIZE, dim=8, channels=3, dim_max=768, dropout=0.)   # train mode: no dropout noise
    with torch.no_grad():           # the output Gain starts at 0: give the image model a non-zero output
        for name, p in unet.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.7)
    return unet


@pytest.fixture(scope='module')
def readme_unet():
    return _readme_unet()


# ---------------------------------------------------------------------------------------------- README examples

@pytest.mark.parametrize('family', ['', 'MP'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_upstream_final_readme_example_matches_upstream(readme_unet, family, mode):
    """Upstream's README example (a module in the conv and a resample list): upstream's keys in upstream's
    order, its output and every gradient."""
    u, o = _lumiere_pair(family, readme_unet, image_size=README_SIZE, unet_time_kwarg='time', **README_NAMES)
    assert list(o.state_dict()) == list(u.state_dict())
    assert [type(m).__name__ for m in o.temporal_modules()] == \
           [type(m).__name__ for m in [*u.convs, *u.attns, *u.downsamples, *u.upsamples]]
    _compare_lumiere(u, o, torch.randn(1, 3, 4, README_SIZE, README_SIZE), mode, time=torch.rand(1))


def test_upstream_final_readme_example_as_written(readme_unet):
    """The example's own lines (but the image size): builds, runs, keeps the shape."""
    lumiere = ours.MPLumiere(readme_unet, image_size=README_SIZE, unet_time_kwarg='time', **README_NAMES)
    noised_video = torch.randn(2, 3, 8, README_SIZE, README_SIZE)
    time = torch.ones(2,)
    denoised_video = lumiere(noised_video, time=time)
    assert noised_video.shape == denoised_video.shape
    # downs.1 carries a conv block and a downsample, conv first (upstream's hook order)
    assert lumiere.module_names['conv'][0] == 'downs.1' and lumiere.module_names['downsample'][0] == 'downs.1'


@pytest.mark.parametrize('family', ['', 'MP'])
def test_upstream_final_readme_example_on_triton(readme_unet, family):
    """The same configuration on the Triton kernels (the interpreter on CPU): every op takes its kernel, and
    output and gradients stay at upstream's."""
    u, o = _lumiere_pair(family, readme_unet, image_size=README_SIZE, unet_time_kwarg='time', **README_NAMES)
    u.eval(), o.eval()
    video = torch.randn(1, 3, 4, README_SIZE, README_SIZE)
    time = torch.rand(1)
    ref = u(video, time=time)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = o(video, time=time)
        out.backward(torch.ones_like(out))
    assert_kernels_only(seen, f'{family}Lumiere')
    assert_close_rel(out, ref, 1e-4, what='triton output')
    ref.backward(torch.ones_like(ref))
    for (name, a), b in zip(o.named_parameters(), u.parameters()):
        assert_close_rel(a.grad, b.grad, 1e-3, 1e-6 * max(p.grad.norm().item() for p in u.parameters()),
                         what=f'triton grad {name}')


def test_original_short_readme_example_upstream_fails_ours_runs():
    """The original README's ``Lumiere(karras_unet, image_size=...)``: upstream raises (no names, no time
    kwarg); ours inflates at the paper's points and runs the example."""
    from denoising_diffusion_pytorch import KarrasUnet
    karras_unet = KarrasUnet(image_size=32, dim=8, channels=3, dim_max=768, num_classes=1000)
    with pytest.raises(TypeError):
        upstream.Lumiere(karras_unet, image_size=32)
    lumiere = ours.Lumiere(karras_unet, image_size=32)
    noised_video = torch.randn(2, 3, 8, 32, 32)
    denoised_video = lumiere(noised_video, time=torch.ones(2,), class_labels=torch.randint(0, 1000, (2,)))
    assert noised_video.shape == denoised_video.shape


# ---------------------------------------------------------------------------------------------- beyond upstream there

def test_readme_config_checkpointing_identity_init_images_and_compile(readme_unet):
    """The switches beyond upstream keep working on upstream's README configuration."""
    torch.manual_seed(0)
    lum = ours.MPLumiere(readme_unet, image_size=README_SIZE, unet_time_kwarg='time', **README_NAMES)
    perturb_(lum.convs), perturb_(lum.attns)
    video, time = torch.randn(1, 3, 4, README_SIZE, README_SIZE), torch.rand(1)

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(video, time=time).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    lum.train()
    plain = grads(copy.deepcopy(lum))
    ckpt = copy.deepcopy(lum)
    ckpt.checkpoint_temporal = True
    for a, b in zip(grads(ckpt), plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    lum.eval()
    with torch.no_grad():                                   # T=1: images through the video model
        one = lum(video[:, :, :1], time=time)
        with lum.image_model_only():
            frames = lum.model(video[:, :, 0], time=time)
    assert one.shape == (1, 3, 1, README_SIZE, README_SIZE) and torch.isfinite(one).all()
    assert frames.shape == (1, 3, README_SIZE, README_SIZE)

    ident = ours.MPLumiere(readme_unet, image_size=README_SIZE, unet_time_kwarg='time', identity_init=True,
                           **README_NAMES).eval()
    # identity init: conv/attention blocks pass the input through (the resamples are not identities)
    block = ident.convs[0]
    x = torch.randn(2 * 4, block.dim, 8, 8)
    torch.testing.assert_close(block(x, batch_size=2), x, rtol=1e-6, atol=1e-6)

    with torch.no_grad():            # per-frame time: upstream's first-of-group rule, or the mean when asked
        per_frame = torch.rand(4)
        first = lum(video, time=per_frame)
        lum.average_conditioning = ['emb']
        averaged = lum(video, time=per_frame)
        lum.average_conditioning = ()
    assert torch.isfinite(averaged).all() and (averaged - first).abs().max() > 0

    compiled = copy.deepcopy(lum)
    compiled.compile(backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(video, time=time), lum(video, time=time), rtol=1e-5, atol=1e-6)


def test_direct_image_model_call_says_how():
    lum = ours.MPLumiere(small_unet(), image_size=16, unet_time_kwarg='time',
                         conv_module_names=['downs.0'], attn_module_names=['mids.0']).eval()
    frames = torch.randn(2, 3, 16, 16)
    lum(frames[None].transpose(1, 2), time=torch.ones(1))
    with pytest.raises(RuntimeError, match=r'called on its own.*image_model_only\(\)'):
        lum.model(frames, time=torch.ones(2))
    with torch.no_grad(), lum.image_model_only() as model:
        out = model(frames, time=torch.ones(2))
        plain = copy.deepcopy(lum.model)
        for m in plain.modules():                           # the same model with every hook removed
            m._forward_hooks.clear(), m._forward_pre_hooks.clear()
        torch.testing.assert_close(out, plain(frames, time=torch.ones(2)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- training patterns

def _train_pattern(model, pattern, videos, times):
    """The temporal gradients after one of the loops people write (in train mode)."""
    model.train()
    model.zero_grad(set_to_none=True)
    if pattern == 'two_forwards_one_backward':
        loss = model(videos[0], time=times[0]).square().mean() + model(videos[1], time=times[1]).square().mean()
        loss.backward()
    elif pattern == 'accumulate':
        for v, t in zip(videos, times):
            model(v, time=t).square().mean().backward()
    elif pattern == 'no_grad_forward_between':
        loss = model(videos[0], time=times[0]).square().mean()
        with torch.no_grad():
            model(videos[1], time=times[1])
        loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize('family', ['', 'MP'])
@pytest.mark.parametrize('pattern', ['two_forwards_one_backward', 'accumulate', 'no_grad_forward_between'])
@pytest.mark.parametrize('checkpoint', [False, True])
def test_training_patterns_match_upstream(family, pattern, checkpoint):
    """Upstream's gradients and renormalised weights, by the parity criterion of test_parity: float64 equal to
    1e-9; float32 within 1e-5, or as close to the float64 answer as upstream's own float32 result (2x)."""
    from helpers import SMALL_UNET_NAMES
    u, o = _lumiere_pair(family, small_unet(), image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
    o.checkpoint_temporal = checkpoint
    u64, o64 = copy.deepcopy(u).double(), copy.deepcopy(o).double()
    videos = [torch.randn(1, 3, 2, 16, 16) for _ in range(2)]
    times = [torch.rand(1) for _ in range(2)]
    gu, go = _train_pattern(u, pattern, videos, times), _train_pattern(o, pattern, videos, times)
    floor = 1e-6 * max(g.norm().item() for g in gu)
    off = [i for i, (a, b) in enumerate(zip(go, gu)) if rel_err(a, b) > 1e-5 and (a - b).norm() > floor]
    if off:                     # float32 rounding amplified past 1e-5: judge both against the float64 answer
        videos64, times64 = [v.double() for v in videos], [t.double() for t in times]
        gu64, go64 = _train_pattern(u64, pattern, videos64, times64), _train_pattern(o64, pattern, videos64, times64)
        names = [n for n, _ in o.named_parameters()]
        for i in off:
            assert_close_rel(go64[i], gu64[i], 1e-9, what=f'{pattern} grad {names[i]} (float64)')
            assert rel_err(go[i], gu64[i]) <= max(1e-5, 2 * rel_err(gu[i], gu64[i])), f'{pattern} grad {names[i]}'
    for (name, a), b in zip(o.named_parameters(), u.parameters()):          # in-place renormalised weights too
        assert_close_rel(a, b, 1e-6, what=f'{pattern} weight {name}')


# ---------------------------------------------------------------------------------------------- upstream's numbers

def _perturbed_pair(family, unet, **kwargs):
    u, o = _lumiere_pair(family, unet, image_size=16, unet_time_kwarg='time', **kwargs)
    return u.eval(), o.eval()


@pytest.mark.parametrize('family', ['', 'MP'])
def test_skips_crossing_temporal_levels_match_upstream(family):
    """A temporal downsample at downs.0 and the upsample at ups.7: the U-Net's skip tensors reach decoders at
    another temporal level, and get upstream's first-of-group rule (issue 17: averaging them was off by 0.5)."""
    names = dict(conv_module_names=['downs.2', 'ups.3'], attn_module_names=['mids.0'],
                 downsample_module_names=['downs.0'], upsample_module_names=['ups.7'])
    u, o = _perturbed_pair(family, small_unet(), **names)
    video, time = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        assert rel_err(o(video, time=time), u(video, time=time)) < 1e-5


@pytest.mark.parametrize('family', ['', 'MP'])
def test_per_frame_integer_labels_match_upstream(family):
    """Per-frame class labels on a class-conditional KarrasUnet become a float embedding inside; upstream keeps
    the first frame of each merged group, and so do we by default."""
    from helpers import SMALL_UNET_NAMES
    unet = small_unet(num_classes=10)
    names = dict(SMALL_UNET_NAMES)
    torch.manual_seed(1)
    o = getattr(ours, f'{family}Lumiere')(unet, image_size=16, unet_time_kwarg='time', **names).eval()
    perturb_(o.convs), perturb_(o.attns), perturb_(o.downsamples), perturb_(o.upsamples)
    u = _upstream_conditional(family, unet, image_size=16, unet_time_kwarg='time', **names)
    u.load_state_dict(o.state_dict(), strict=True)
    u.eval()
    video, time = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    labels = torch.arange(8) % 10
    with torch.no_grad():
        assert rel_err(o(video, time=time, class_labels=labels), u(video, time=time, class_labels=labels)) < 1e-5


def _upstream_conditional(family, unet, **kwargs):
    """Upstream's wrapper around a class-conditional KarrasUnet (its init dry run passes no class labels and
    crashes, so the dry run is given labels through a pre-hook for the duration of the init)."""
    def add_labels(module, args, kw):
        if 'class_labels' not in kw:
            kw = dict(kw, class_labels=torch.zeros(args[0].shape[0], dtype=torch.long))
        return args, kw
    handle = unet.register_forward_pre_hook(add_labels, with_kwargs=True)
    try:
        u = getattr(upstream, f'{family}Lumiere')(unet, **kwargs)
    finally:
        handle.remove()
    for m in u.model.modules():          # the deep copy took the init-only hook along: drop it there too
        for key, fn in list(m._forward_pre_hooks.items()):
            if getattr(fn, '__name__', '') == 'add_labels':
                del m._forward_pre_hooks[key]
    return u


# ---------------------------------------------------------------------------------------------- temporal classes

class UserConvBlock(nn.Module):
    """A temporal class written to upstream's contract: ``dim=`` at init, ``batch_dim`` set before ``module(x)``."""

    def __init__(self, dim):
        super().__init__()
        self.batch_dim = None
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x):
        bt, c, h, w = x.shape
        t = bt // self.batch_dim
        y = x.reshape(self.batch_dim, t, c, h, w).permute(0, 3, 4, 2, 1).reshape(-1, c, t)
        y = self.conv(y).reshape(self.batch_dim, h, w, c, t).permute(0, 4, 3, 1, 2).reshape(bt, c, h, w)
        return x + y


@pytest.mark.parametrize('family', ['', 'MP'])
def test_upstream_contract_classes_match_upstream(family):
    """A user class on upstream's contract and upstream's own temporal classes as ``*_klass``: built, called
    with ``batch_dim`` set, upstream's numbers."""
    from helpers import SMALL_UNET_NAMES
    prefix = 'MP' if family else ''
    klasses = dict(conv_klass=UserConvBlock,
                   attn_klass=getattr(upstream, f'{prefix}AttentionInflationBlock'),
                   downsample_klass=getattr(upstream, f'{prefix}TemporalDownsample'),
                   upsample_klass=getattr(upstream, f'{prefix}TemporalUpsample'))
    unet = small_unet()
    torch.manual_seed(1)
    u = upstream.Lumiere(unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES, **klasses)
    o = ours.Lumiere(unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES, **klasses)
    perturb_(u.convs)
    o.load_state_dict(u.state_dict(), strict=True)
    video, time = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    for mode in (False, True):
        u.train(mode), o.train(mode)
        a, b = o(video, time=time), u(video, time=time)
        assert rel_err(a, b) < 1e-6, mode
    with pytest.raises(TypeError, match='identity_init_'):
        ours.Lumiere(unet, image_size=16, unet_time_kwarg='time', identity_init=True, conv_module_names=['downs.0'],
                     conv_klass=UserConvBlock)


def test_our_classes_keep_batch_size_and_set_no_attribute():
    from helpers import SMALL_UNET_NAMES
    lum = ours.MPLumiere(small_unet(), image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
    lum(torch.randn(2, 3, 4, 16, 16), time=torch.rand(2))
    assert all(m.batch_dim is None for m in lum.temporal_modules())


# ---------------------------------------------------------------------------------------------- dropout switch

@pytest.mark.parametrize('klass,kw', [
    ('MPConvolutionInflationBlock', dict(dropout=0.5)),
    ('AttentionInflationBlock', dict(heads=2, dim_head=4, dropout=0.5, depth=2)),
    ('MPAttentionInflationBlock', dict(heads=2, dim_head=4, dropout=0.5, depth=2)),
])
def test_dropout_follows_the_nn_dropout_modules(klass, kw):
    """Setting ``p = 0`` on every ``nn.Dropout`` turns dropout off, as it does upstream."""
    block = getattr(ours, klass)(dim=8, **kw)
    perturb_(block)
    block.train()
    x = torch.randn(2, 8, 4, 3, 3)
    assert (block(x) - block(x)).abs().max() > 0                 # random in train mode with p = 0.5
    drops = [m for m in block.modules() if isinstance(m, nn.Dropout)]
    assert drops
    for m in drops:
        m.p = 0.
    assert_close_rel(block(x), block(x), 1e-6, what='p=0: two train-mode calls')   # (MP renormalisation rounds)
    block.eval()
    with torch.no_grad():
        ref = block(x)
    block.train()
    with torch.no_grad():
        assert_close_rel(block(x), ref, 1e-6, what='p=0 train vs eval')


# ---------------------------------------------------------------------------------------------- no silent garbage

@pytest.mark.skipif(torch.cuda.is_available(), reason='the interpreter runs only without a GPU here')
@pytest.mark.parametrize('klass,kw', [('MPConvolutionInflationBlock', {}), ('TemporalDownsample', {}),
                                      ('MPAttentionInflationBlock', dict(heads=2, dim_head=4))])
def test_bf16_under_the_interpreter_takes_the_reference(klass, kw):
    """The interpreter's bf16 math is wrong (a block came out ~1e9 off): with the triton backend forced, bf16
    calls take the reference (recorded, and warned once per op), never a wrong number."""
    import os
    assert os.environ.get('TRITON_INTERPRET') == '1'
    block = getattr(ours, klass)(dim=8, **kw)
    perturb_(block)
    x = torch.randn(2, 8, 4, 3, 3)
    with torch.no_grad():
        ref = block(x)
        with backend.use_backend('triton'), backend.record_choices() as seen:
            out = block.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert seen and all(c == {'reference'} for c in seen.values()), {k: v for k, v in seen.items() if v != {"triton"}}
    assert_close_rel(out.float(), ref, 2e-2, what='bf16 vs fp32')


# ---------------------------------------------------------------------------------------------- double backward

BLOCK_CASES = [('ConvolutionInflationBlock', {}), ('MPConvolutionInflationBlock', {}),
               ('AttentionInflationBlock', dict(heads=2, dim_head=4)),
               ('MPAttentionInflationBlock', dict(heads=2, dim_head=4, num_mem_kv=2)),
               ('TemporalDownsample', {}), ('TemporalUpsample', {}), ('MPTemporalDownsample', {}),
               ('MPTemporalUpsample', {})]


def _penalty_grads(model, x, params):
    """A gradient penalty: d/dparams of ||d out / d x||^2 (needs the backward differentiated again)."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(g.square().sum(), [x, *params], allow_unused=True)


@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_double_backward_matches_upstream(klass, kw):
    """``create_graph=True`` through every block (upstream passes gradgradcheck; here the CPU SDPA kernel had no
    double backward): gradgradcheck in float64, and a gradient penalty's gradients equal upstream's."""
    dim = 4
    u = getattr(upstream, klass)(dim=dim, **kw).double()
    perturb_(u)
    o = getattr(ours, klass)(dim=dim, **kw).double()
    o.load_state_dict(u.state_dict(), strict=True)
    if not hasattr(u, 'batch_dim'):
        u.batch_dim = None
    u.eval(), o.eval()
    x = torch.randn(1, dim, 4, 2, 2, dtype=torch.float64)
    if klass != 'AttentionInflationBlock':
        # (the non-MP attention's softmax runs in float32 even for float64 input, x-transformers' quirk kept:
        # finite differences at eps 1e-6 are noise there, upstream's block fails gradgradcheck the same way)
        torch.autograd.gradgradcheck(lambda v: o(v), (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)
    names = [n for n, _ in u.named_parameters()]
    po = dict(o.named_parameters())
    gu = _penalty_grads(u, x, list(u.parameters()))
    go = _penalty_grads(o, x, [po[n] for n in names])
    scale = max(g.norm().item() for g in gu if g is not None)
    for n, a, b in zip(['input', *names], go, gu):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() <= 1e-12 * scale, n
            continue
        assert_close_rel(a, b, 1e-8, 1e-12 * scale, what=f'{klass} penalty grad {n}')


def test_gradient_penalty_through_mp_lumiere():
    from helpers import SMALL_UNET_NAMES
    u, o = _lumiere_pair('MP', small_unet(), image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
    u, o = u.double().eval(), o.double().eval()
    x, time = torch.randn(1, 3, 2, 16, 16, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    gu = _penalty_grads(lambda v: u(v, time=time), x, u.parameters())
    go = _penalty_grads(lambda v: o(v, time=time), x, o.parameters())
    for a, b in zip(go, gu):
        assert_close_rel(a, b, 1e-8, 1e-12 * max(g.norm().item() for g in gu), what='MPLumiere penalty grad')


# The kernel paths: the Triton backward kernels have no derivative, so while autograd records a backward
# (create_graph=True) every kernel op's backward goes through its reference (ops._triton.differentiable_backward).
# Under the interpreter (fp32): every op records 'triton', and a gradient penalty's gradients equal the reference
# backend's. (Before: "Trying to backward through ..." / wrong zeros from the non-differentiable backward ops.)


@pytest.mark.skipif(torch.cuda.is_available(), reason='the interpreter runs only without a GPU here')
@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_double_backward_through_the_kernels(klass, kw):
    torch.manual_seed(0)
    o = getattr(ours, klass)(dim=8, **kw).eval()
    perturb_(o)
    x = torch.randn(2, 8, 4, 3, 3)
    params = list(o.parameters())
    with backend.use_backend('reference'):
        ref = _penalty_grads(o, x, params)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        got = _penalty_grads(o, x, params)
    assert_kernels_only(seen, klass)
    scale = max(g.norm().item() for g in ref if g is not None)
    for n, a, b in zip(['input', *[n for n, _ in o.named_parameters()]], got, ref):
        if b is None:
            assert a is None or a.abs().max() <= 1e-6 * scale, n
            continue
        assert_close_rel(a, b, 1e-4, 1e-6 * scale, what=f'{klass} penalty grad {n}')


def _op_cases():
    from lumiere_fast import ops
    from lumiere_fast.ops import karras
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    frames = r(2 * 3, 5, 3, 2)
    return {
        'temporal_conv1d': (lambda x, w, b: ops.temporal_conv1d(x, w, b, batch=2), (frames, r(5, 5, 3), r(5))),
        'fold_frames': (lambda x: ops.fold_frames(x, 2).square(), (frames,)),
        'pixel_norm_silu': (lambda x: torch.cat(karras.pixel_norm_silu(x), 1), (r(2, 5, 3, 3),)),
        'scale_silu': (karras.scale_silu, (r(2, 5, 3, 3), r(2, 5))),
        'mp_cat': (lambda a, b: karras.mp_cat(a, b).square(), (r(2, 3, 2, 2), r(2, 4, 2, 2))),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason='the interpreter runs only without a GPU here')
@pytest.mark.parametrize('op', list(_op_cases()))
def test_double_backward_through_each_op_kernel(op):
    fn, args = _op_cases()[op]

    def penalty(*inputs):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out.sin().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(gr.square().sum() for gr in grads), leaves)

    with backend.use_backend('reference'):
        ref = penalty(*args)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        got = penalty(*args)
    assert_kernels_only(seen, op)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a, b, 1e-5, 1e-7, what=f'{op} penalty grad of input {i}')


def test_double_backward_through_the_native_conv1d():
    import importlib
    from lumiere_fast.ops import extension_status
    conv_mod = importlib.import_module('lumiere_fast.ops.temporal_conv1d')
    if not extension_status()['cpu']['loaded']:
        pytest.skip(f"the CPU extension is not loaded: {extension_status()['cpu']['why']}")
    x = torch.randn(2 * 3, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    old, conv_mod._force_native = conv_mod._force_native, True
    try:
        with backend.record_choices() as seen:
            torch.autograd.gradgradcheck(lambda *a: conv_mod.temporal_conv1d(*a, batch=2), (x, w, b))
    finally:
        conv_mod._force_native = old
    assert seen.get('temporal_conv1d') == {'native'}, seen


@pytest.mark.skipif(torch.cuda.is_available(), reason='the interpreter runs only without a GPU here')
def test_gradient_penalty_through_mp_lumiere_on_the_kernels():
    from helpers import SMALL_UNET_NAMES
    torch.manual_seed(0)
    model = ours.MPLumiere(small_unet(), image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES).eval()
    perturb_(model, 0.1)
    x, time = torch.randn(1, 3, 2, 16, 16), torch.rand(1)
    params = [p for p in model.parameters() if p.requires_grad]
    with backend.use_backend('reference'):
        ref = _penalty_grads(lambda v: model(v, time=time), x, params)
    with backend.use_backend('triton'), backend.record_choices() as seen:
        got = _penalty_grads(lambda v: model(v, time=time), x, params)
    assert seen and 'triton' in set().union(*seen.values()), {k: v for k, v in seen.items() if v != {"triton"}}
    scale = max(g.norm().item() for g in ref if g is not None)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a, b, 1e-4, 1e-6 * scale, what=f'MPLumiere penalty grad {i}')
