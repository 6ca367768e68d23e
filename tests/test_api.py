"""Public API: upstream's names and signatures, the original short API, the README Todo items, bad input."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lumiere_fast
from lumiere_fast import (AttentionInflationBlock, ConvolutionInflationBlock, Lumiere, MPAttentionInflationBlock,
                          MPConvolutionInflationBlock, MPLumiere, MPTemporalDownsample, MPTemporalUpsample,
                          TemporalDownsample, TemporalUpsample)
from lumiere_fast.lumiere import karras_unet_inflation_points
from helpers import SMALL_UNET_NAMES, small_unet

BLOCKS = ['ConvolutionInflationBlock', 'AttentionInflationBlock', 'TemporalDownsample', 'TemporalUpsample',
          'MPConvolutionInflationBlock', 'MPAttentionInflationBlock', 'MPTemporalDownsample', 'MPTemporalUpsample']


def test_exports_match_upstream():
    upstream = pytest.importorskip('lumiere_pytorch')
    names = {n for n in dir(upstream) if not n.startswith('_') and n[0].isupper()}
    assert names == {'Lumiere', 'MPLumiere', *BLOCKS}
    assert set(lumiere_fast.__all__) == names
    for n in names:
        assert hasattr(lumiere_fast, n)


@pytest.mark.parametrize('name', BLOCKS)
def test_block_signatures_match_upstream(name):
    upstream = pytest.importorskip('lumiere_pytorch')
    ours_sig = inspect.signature(getattr(lumiere_fast, name).__init__).parameters
    up_sig = inspect.signature(getattr(upstream, name).__init__).parameters
    for pname, p in up_sig.items():
        assert pname in ours_sig, f'{name} lacks argument {pname}'
        assert ours_sig[pname].kind == p.kind, f'{name}.{pname}: {ours_sig[pname].kind} != {p.kind}'
        assert ours_sig[pname].default == p.default, f'{name}.{pname}: default {ours_sig[pname].default!r}'
    fwd_ours = inspect.signature(getattr(lumiere_fast, name).forward).parameters
    assert 'batch_size' in fwd_ours and fwd_ours['batch_size'].default is None


def test_lumiere_signature_is_a_superset_of_upstream():
    upstream = pytest.importorskip('lumiere_pytorch')
    ours_sig = inspect.signature(Lumiere.__init__).parameters
    for pname, p in inspect.signature(upstream.Lumiere.__init__).parameters.items():
        assert pname in ours_sig and ours_sig[pname].kind == p.kind
        if p.default is inspect.Parameter.empty:
            continue
        if isinstance(p.default, type):               # conv_klass etc.: our class of the same name
            assert ours_sig[pname].default.__name__ == p.default.__name__, pname
        elif p.default is not inspect.Parameter.empty and not isinstance(p.default, (list, dict)) \
                and pname != 'channels':
            assert ours_sig[pname].default == p.default, pname
    # channels: None reads the model's `channels` attribute, 3 when it has none (upstream: always 3)
    assert ours_sig['channels'].default is None
    # upstream requires these; ours defaults them (the original short API)
    assert ours_sig['unet_time_kwarg'].default == 'time'
    assert ours_sig['conv_module_names'].default is None


def test_no_upstream_import_at_run_time():
    code = textwrap.dedent('''
        import sys, torch
        import lumiere_fast as lf
        x = torch.randn(1, 8, 4, 3, 3)
        for m in (lf.AttentionInflationBlock(dim=8, heads=2, dim_head=4), lf.MPAttentionInflationBlock(dim=8),
                  lf.ConvolutionInflationBlock(dim=8), lf.MPTemporalDownsample(8)):
            m(x)
        bad = [m for m in ('lumiere_pytorch', 'x_transformers', 'beartype') if m in sys.modules]
        assert not bad, bad
        print('clean')
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'clean' in out.stdout


def test_kernels_package_installs_inside_lumiere_fast():
    import lumiere_fast.kernels as k
    assert k.__name__ == 'lumiere_fast.kernels'
    import setuptools  # noqa: F401  (setup.py is the source of truth for what gets installed)
    from pathlib import Path
    setup_py = (Path(lumiere_fast.__file__).parents[1] / 'setup.py').read_text()
    assert "'lumiere_fast.kernels': 'kernels'" in setup_py
    assert "packages=['lumiere_fast'" in setup_py and "'kernels'," not in setup_py.split('packages=')[1].split(']')[0]


def test_no_bare_asserts_in_user_facing_code():
    import ast
    from pathlib import Path
    root = Path(lumiere_fast.__file__).parent
    offenders = []
    for path in [root / 'lumiere.py', root / 'backend.py', *(root / 'modules').glob('*.py'), *(root / 'ops').glob('*.py')]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                offenders.append(f'{path.name}:{node.lineno}')
    assert not offenders, f'asserts vanish under python -O; raise ValueError/TypeError instead: {offenders}'


# ---------------------------------------------------------------------------------------------- short API

@pytest.mark.parametrize('klass', [Lumiere, MPLumiere])
def test_original_readme_short_api_class_conditional(klass):
    """The first lumiere-pytorch README, verbatim but for the image size (256 runs once below)."""
    from denoising_diffusion_pytorch import KarrasUnet
    karras_unet = KarrasUnet(image_size=64, dim=8, channels=3, dim_max=768, num_classes=1000)
    lumiere = klass(karras_unet, image_size=64)
    noised_video = torch.randn(2, 3, 8, 64, 64)
    denoised = lumiere(noised_video, time=torch.ones(2), class_labels=torch.randint(0, 1000, (2,)))
    assert denoised.shape == noised_video.shape
    assert torch.isfinite(denoised).all()
    assert lumiere.downsample_factor == 8
    assert [len(g) for g in (lumiere.convs, lumiere.attns, lumiere.downsamples, lumiere.upsamples)] == [6, 4, 3, 3]


def test_original_readme_example_as_written():
    from denoising_diffusion_pytorch import KarrasUnet
    karras_unet = KarrasUnet(image_size=256, dim=8, channels=3, dim_max=768, num_classes=1000)
    lumiere = Lumiere(karras_unet, image_size=256)
    noised_video = torch.randn(2, 3, 8, 256, 256)
    time = torch.ones(2,)
    class_labels = torch.randint(0, 1000, (2,))
    with torch.no_grad():
        denoised_video = lumiere(noised_video, time=time, class_labels=class_labels)
    assert noised_video.shape == denoised_video.shape


def test_paper_inflation_points_for_karras_unet():
    from denoising_diffusion_pytorch import KarrasUnet
    unet = KarrasUnet(image_size=64, dim=8, dim_max=64, channels=3)      # 3 downsamples, 4 blocks per stage
    p = karras_unet_inflation_points(unet)
    downs, ups = unet.downs, unet.ups
    assert [int(n.split('.')[1]) for n in p['downsample']] == [i for i, b in enumerate(downs) if b.downsample]
    assert [int(n.split('.')[1]) for n in p['upsample']] == [i for i, b in enumerate(ups) if b.upsample]
    assert p['attn'][1:3] == ['mids.0', 'mids.1'] and len(p['attn']) == 4
    assert len(p['conv']) == 2 * unet.num_downsamples
    lum = Lumiere(unet, image_size=64)
    # attention sits at the coarsest level: its channel count is dim_max, spatial 64 / 2**3
    assert all(m.dim == 64 for m in lum.attns)
    assert lum.module_names == {'conv': p['conv'], 'attn': p['attn'], 'downsample': p['downsample'],
                                'upsample': p['upsample']}


def test_karras_points_reject_other_models():
    with pytest.raises(TypeError, match='KarrasUnet'):
        karras_unet_inflation_points(nn.Conv2d(3, 3, 1))


class ToyUnet(nn.Module):
    def __init__(self, channels=3, out_channels=None):
        super().__init__()
        self.channels = channels
        self.inp = nn.Conv2d(channels, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.out = nn.Conv2d(8, out_channels or channels, 3, padding=1)

    def forward(self, x, time):
        x = self.inp(x) + time.view(-1, 1, 1, 1)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def test_other_model_without_names_lists_candidates():
    with pytest.raises(ValueError, match=r"candidates such as \['inp', 'blocks.0'"):
        Lumiere(ToyUnet(), image_size=8)


def test_other_model_with_names_and_conditioning_repeat():
    lum = MPLumiere(ToyUnet(), image_size=8, conv_module_names=['blocks.0'], downsample_module_names=['blocks.1'],
                    upsample_module_names=['blocks.2'])
    out = lum(torch.randn(2, 3, 4, 8, 8), time=torch.rand(2))
    assert out.shape == (2, 3, 4, 8, 8)


def test_dry_run_checks_output_shape():
    with pytest.raises(ValueError, match='maps a mock video of shape'):
        Lumiere(ToyUnet(out_channels=5), image_size=8, conv_module_names=['blocks.0'])


# ---------------------------------------------------------------------------------------------- Todo items

def _small(klass=Lumiere, **kw):
    return klass(small_unet(), image_size=16, **{**SMALL_UNET_NAMES, **kw})


def test_frames_must_be_divisible_by_downsample_factor():
    lum = _small()
    assert lum.downsample_factor == 2
    with pytest.raises(ValueError, match='divisible by 2'):
        lum(torch.randn(1, 3, 3, 16, 16), time=torch.rand(1))


def test_down_and_up_counts_must_match():
    with pytest.raises(ValueError, match='as many temporal upsamples as downsamples'):
        _small(upsample_module_names=[])


def test_only_temporal_parameters_are_learned():
    lum = _small(MPLumiere)
    params = lum.parameters()
    assert isinstance(params, list) and len(params) > 0
    temporal = {id(p) for m in lum.temporal_modules() for p in m.parameters()}
    assert {id(p) for p in params} == temporal
    assert all(not p.requires_grad for p in lum.model.parameters())
    assert lum.parameters(recurse=True) == params                     # the standard signature works
    frozen = {k: v.clone() for k, v in lum.model.state_dict().items()}
    opt = torch.optim.SGD(lum.parameters(), lr=0.1)
    lum.eval()     # eval: the MP layers do not renormalise the frozen image weights in place
    lum(torch.randn(1, 3, 2, 16, 16), time=torch.rand(1)).square().mean().backward()
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in lum.model.state_dict().items())
    assert all(p.grad is None for p in lum.model.parameters())


def test_mp_variants_of_all_four_modules():
    lum = _small(MPLumiere)
    kinds = [type(m) for m in lum.temporal_modules()]
    assert {MPConvolutionInflationBlock, MPAttentionInflationBlock, MPTemporalDownsample,
            MPTemporalUpsample} == set(kinds)


def test_wrapper_deepcopies_and_its_hooks_pickle():
    """Hooks are module-level callables, not closures. (A KarrasUnet itself does not pickle on current
    torch: denoising-diffusion-pytorch's Attend holds an SDPBackend enum; so pickling uses a toy model.)"""
    import copy
    lum = _small(MPLumiere).eval()
    video, t = torch.randn(1, 3, 2, 16, 16), torch.rand(1)
    ref = lum(video, time=t)
    assert torch.allclose(copy.deepcopy(lum)(video, time=t), ref)
    toy = MPLumiere(ToyUnet(), image_size=8, conv_module_names=['blocks.0'], downsample_module_names=['blocks.1'],
                    upsample_module_names=['blocks.2']).eval()
    video, t = torch.randn(1, 3, 2, 8, 8), torch.rand(1)
    clone = pickle.loads(pickle.dumps(toy))
    assert torch.allclose(clone(video, time=t), toy(video, time=t))


class ContextToy(nn.Module):
    """A model with an optional text-like conditioning kwarg that the init dry run never passes."""

    def __init__(self):
        super().__init__()
        self.channels = 3
        self.inp = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([ContextBlock() for _ in range(3)])
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, time, context=None):
        x = self.inp(x) + time.view(-1, 1, 1, 1)
        for b in self.blocks:
            x = b(x, context)
        return self.out(x)


class ContextBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.to_ctx = nn.Linear(5, 8)

    def forward(self, x, context=None):
        x = self.conv(x)
        return x if context is None else x + self.to_ctx(context).view(*x.shape[:2], 1, 1)


@pytest.mark.parametrize('cond_rows', [1, 2, 8])
def test_conditioning_not_seen_by_the_dry_run_follows_the_frames(cond_rows):
    """A kwarg the dry run never passes is repeated per frame and follows temporal downsampling, as upstream.
    (Per-frame rows are the same within each pair of frames the downsample merges: where they differ, ours
    averages the pair and upstream keeps the first frame's, see test_wrapper.)"""
    upstream = pytest.importorskip('lumiere_pytorch')
    names = dict(conv_module_names=['blocks.0'], attn_module_names=['inp'], downsample_module_names=['blocks.1'],
                 upsample_module_names=['blocks.2'], attn_inflation_kwargs=dict(heads=2, dim_head=4))
    torch.manual_seed(0)
    model = ContextToy()
    u = upstream.MPLumiere(model, image_size=8, unet_time_kwarg='time', **names)
    o = MPLumiere(model, image_size=8, **names)
    o.load_state_dict(u.state_dict(), strict=True)
    video, time = torch.randn(2, 3, 4, 8, 8), torch.rand(2)
    context = torch.randn(cond_rows, 5) if cond_rows < 8 else torch.randn(4, 5).repeat_interleave(2, dim=0)
    torch.testing.assert_close(o.eval()(video, time=time, context=context), u.eval()(video, time=time, context=context))


def test_conditioning_hook_skips_single_input_modules():
    lum = _small()
    hooked = [n for n, m in lum.model.named_modules() if m._forward_pre_hooks]
    total = sum(1 for _ in lum.model.named_modules())
    assert '' in hooked                      # the image model itself: time is repeated per frame there
    assert 'downs.0' in hooked and 'skip_mp_cat' in hooked       # (x, emb) and (x, skip)
    assert 'downs.0.block1.1' not in hooked                      # a conv: its input only
    assert len(hooked) < total // 2, (len(hooked), total)


def test_batch_dim_is_unset_after_init():
    lum = _small()
    assert all(m.batch_dim is None for m in lum.temporal_modules())
    with pytest.raises(ValueError, match='needs the batch'):
        lum.convs[0](torch.randn(8, lum.convs[0].dim, 16, 16))


def test_time_dim_in_inflation_kwargs():
    """Upstream accepts a fixed time_dim; the mock-video check is skipped then (it cannot guess the frames)."""
    lum = _small(conv_inflation_kwargs=dict(time_dim=4), downsample_module_names=[], upsample_module_names=[])
    assert lum(torch.randn(2, 3, 4, 16, 16), time=torch.rand(2)).shape == (2, 3, 4, 16, 16)


def test_a_module_that_runs_twice_cannot_carry_a_temporal_module():
    class Twice(ToyUnet):
        def forward(self, x, time):
            x = self.inp(x)
            return self.out(self.blocks[0](self.blocks[0](x)))
    with pytest.raises(ValueError, match=r"module\(s\) \['blocks.0'\] run more than once per forward"):
        Lumiere(Twice(), image_size=8, conv_module_names=['blocks.0'])


# ---------------------------------------------------------------------------------------------- upstream crash bugs

def test_mp_attention_block_alone_on_video():
    """Upstream raises AttributeError (no batch_dim)."""
    block = MPAttentionInflationBlock(dim=8, heads=2, dim_head=4)
    assert block(torch.randn(2, 8, 3, 4, 4)).shape == (2, 8, 3, 4, 4)


@pytest.mark.parametrize('klass', [TemporalDownsample, MPTemporalDownsample])
@pytest.mark.parametrize('frames', [1, 3, 5])
def test_odd_frames_into_downsample_raise(klass, frames):
    """Upstream silently drops a frame (or asserts at t=1)."""
    with pytest.raises(ValueError, match=f'even number of frames >= 2 to halve, got {frames}'):
        klass(4)(torch.randn(1, 4, frames, 2, 2))
    with pytest.raises(ValueError, match='even number of frames'):
        klass(4)(torch.randn(2 * frames, 4, 2, 2), batch_size=2)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('klass,kw', [(ConvolutionInflationBlock, dict(dim=4)), (MPConvolutionInflationBlock, dict(dim=4)),
                                      (AttentionInflationBlock, dict(dim=4, heads=2, dim_head=2)),
                                      (MPAttentionInflationBlock, dict(dim=4)), (TemporalUpsample, dict(dim=4)),
                                      (MPTemporalUpsample, dict(dim=4))])
def test_block_bad_inputs(klass, kw):
    block = klass(**kw)
    with pytest.raises(ValueError, match='expected a 5-dim video or 4-dim frames'):
        block(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match='expected 4 channels, got 3'):
        block(torch.randn(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match='needs the batch'):
        block(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match='cannot be split into batch_size=3'):
        block(torch.randn(4, 4, 2, 2), batch_size=3)
    with pytest.raises(TypeError, match='expected a tensor'):
        block([1, 2, 3])


def test_block_constructor_errors():
    with pytest.raises(ValueError, match='conv1d_kernel_size as an odd positive int, got 2'):
        ConvolutionInflationBlock(dim=4, conv1d_kernel_size=2)
    with pytest.raises(ValueError, match='conv2d_kernel_size'):
        MPConvolutionInflationBlock(dim=4, conv2d_kernel_size=4)
    with pytest.raises(TypeError, match=r"unsupported attention keyword\(s\) \['causal'\]; supported: "
                                        r"\['dim_head', 'dropout', 'heads'\]"):
        AttentionInflationBlock(dim=4, causal=True)
    with pytest.raises(TypeError, match=r"\['rotary_pos_emb'\]"):
        MPAttentionInflationBlock(dim=4, rotary_pos_emb=True)
    with pytest.raises(ValueError, match='heads as a positive int'):
        MPAttentionInflationBlock(dim=4, heads=0)
    with pytest.raises(ValueError, match='num_mem_kv'):
        MPAttentionInflationBlock(dim=4, num_mem_kv=-1)
    with pytest.raises(ValueError, match='dim as a positive int'):
        TemporalDownsample(0)
    with pytest.raises(ValueError, match='dim_head must equal dim'):
        AttentionInflationBlock(dim=4, heads=1, dim_head=8)


def test_time_dim_mismatch():
    block = MPConvolutionInflationBlock(dim=4, time_dim=3)
    with pytest.raises(ValueError, match='not a multiple of time_dim=3'):
        block(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match='batch_size\\*time_dim = 2\\*3'):
        block(torch.randn(4, 4, 2, 2), batch_size=2)


@pytest.fixture(scope='module')
def small_lumiere():
    return _small()


@pytest.mark.parametrize('video,cond,err,match', [
    (torch.randn(3, 16, 16), {}, ValueError, r'expected a video of shape \(batch, channels, frames, height, width\)'),
    (torch.randn(1, 4, 2, 16, 16), {}, ValueError, 'expected 3 channels, got 4'),
    (torch.randn(1, 3, 2, 16, 12), {}, ValueError, 'expected frames of 16x16, got 16x12'),
    (torch.randn(1, 3, 2, 8, 8), {}, ValueError, 'expected frames of 16x16, got 8x8'),
    (torch.randn(1, 3, 5, 16, 16), {}, ValueError, 'frames divisible by 2'),
    (torch.randn(2, 3, 2, 16, 16), dict(time=torch.rand(3)), ValueError, 'leading size 3; expected the batch size 2'),
    (torch.randn(2, 3, 2, 16, 16), dict(time=torch.rand(0)), ValueError, 'leading size 0'),
    (torch.randn(1, 3, 2, 16, 16, dtype=torch.float64), {}, TypeError, 'dtype torch.float64 does not match'),
    (torch.randint(0, 3, (1, 3, 2, 16, 16)), {}, TypeError, 'floating-point video'),
    (torch.randn(1, 3, 2, 16, 16, device='meta'), {}, ValueError, 'video is on meta but the model is on cpu'),
    ('not a tensor', {}, TypeError, 'expected the video as a tensor'),
])
def test_lumiere_bad_inputs(small_lumiere, video, cond, err, match):
    cond = cond or dict(time=torch.rand(video.shape[0] if isinstance(video, torch.Tensor) and video.ndim else 1))
    with pytest.raises(err, match=match):
        small_lumiere(video, **cond)


def test_lumiere_constructor_errors():
    unet = small_unet()
    with pytest.raises(ValueError, match=r"conv_module_names: module 'downs.9' not found in the model; did you mean "
                                         r"\['downs.4', 'downs.3', 'downs.2'\]"):
        Lumiere(unet, image_size=16, conv_module_names=['downs.9'])
    with pytest.raises(ValueError, match="not found in the model; did you mean .*'ups.1'"):
        Lumiere(unet, image_size=16, conv_module_names=['up.1'])
    with pytest.raises(TypeError, match='expected a list of module names, got str'):
        Lumiere(unet, image_size=16, conv_module_names='downs.0')
    with pytest.raises(TypeError, match='nn.Module'):
        Lumiere('unet', image_size=16)
    with pytest.raises(ValueError, match='image_size as a positive int'):
        Lumiere(unet, image_size=0)
    with pytest.raises(ValueError, match='no temporal parameters'):
        Lumiere(unet, image_size=16, conv_module_names=[])
    with pytest.raises(TypeError, match='attn_inflation_kwargs as a dict'):
        Lumiere(unet, image_size=16, conv_module_names=['downs.0'], attn_inflation_kwargs=[('heads', 2)])
    with pytest.raises(TypeError, match="init dry run KarrasUnet.* failed with TypeError: .*unexpected keyword "
                                        "argument 't'. Check channels, image_size and unet_time_kwarg"):
        Lumiere(unet, image_size=16, unet_time_kwarg='t', conv_module_names=['downs.0'])
    with pytest.raises(ValueError, match='init dry run KarrasUnet.* failed'):
        Lumiere(unet, image_size=16, channels=4, conv_module_names=['downs.0'])


def test_dtype_follows_model_and_autocast(small_lumiere):
    lum = small_lumiere
    video = torch.randn(1, 3, 2, 16, 16, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = lum(video, time=torch.rand(1))
    assert out.shape == video.shape


def test_wrapping_a_bf16_model_and_per_frame_time():
    unet = small_unet().to(torch.bfloat16)
    lum = MPLumiere(unet, image_size=16, **SMALL_UNET_NAMES)       # dry run on the model's dtype
    video = torch.randn(2, 3, 4, 16, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = lum.to(torch.bfloat16)(video, time=torch.rand(8, dtype=torch.bfloat16))
    assert out.shape == video.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize('klass,kw', [(ConvolutionInflationBlock, {}), (MPConvolutionInflationBlock, {}),
                                      (AttentionInflationBlock, dict(heads=2, dim_head=4)),
                                      (MPAttentionInflationBlock, dict(heads=2, dim_head=4)),
                                      (TemporalDownsample, {}), (TemporalUpsample, {}), (MPTemporalDownsample, {}),
                                      (MPTemporalUpsample, {})])
def test_channel_last_is_the_same_block_with_channels_moved(klass, kw):
    """channel_last=True takes b t h w c / (b t) h w c and returns the same layout (upstream moves the wrong axis
    on the way in, so a channel-last video fails or is misread there)."""
    first = klass(dim=6, **kw).eval()
    last = klass(dim=6, channel_last=True, **kw).eval()
    last.load_state_dict(first.state_dict())
    video = torch.randn(2, 6, 4, 3, 5)
    torch.testing.assert_close(last(video.movedim(1, -1)), first(video).movedim(1, -1))
    frames = torch.randn(8, 6, 3, 5)
    torch.testing.assert_close(last(frames.movedim(1, -1), batch_size=2), first(frames, batch_size=2).movedim(1, -1))
