"""Issue 7: the wrapper where upstream's Lumiere breaks. Each test fails on lumiere-pytorch 0.0.24's behaviour
(noted per test) and passes on ours."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lumiere_fast import Lumiere, MPLumiere
from helpers import SMALL_UNET_NAMES, assert_close_rel, small_unet


def _small(klass=Lumiere, unet=None, **kw):
    return klass(unet if unet is not None else small_unet(), image_size=16, **{**SMALL_UNET_NAMES, **kw})


def _perturb_temporal_(lum, scale=0.3):
    with torch.no_grad():
        for p in lum.parameters():
            p.add_(torch.randn_like(p) * scale)
    return lum


# ---------------------------------------------------------------------------------------------- (4) parameters

def test_named_parameters_are_temporal_only_and_state_dict_is_full():
    """Upstream: named_parameters() lists every frozen image-model weight too."""
    lum = _small(MPLumiere)
    named = dict(lum.named_parameters())
    assert named and not any(k.startswith('model.') for k in named)
    assert [id(p) for p in named.values()] == [id(p) for p in lum.parameters()]
    sd = lum.state_dict()
    assert set(named) <= set(sd) and any(k.startswith('model.') for k in sd)
    assert dict(lum.named_parameters(prefix='lum')).keys() == {f'lum.{k}' for k in named}
    assert list(lum.named_parameters(recurse=False)) == []
    assert all(p.requires_grad for p in named.values())


def test_temporal_state_dict_round_trip():
    """Upstream has no way to save only the trained temporal weights."""
    unet = small_unet()
    a = _perturb_temporal_(_small(MPLumiere, unet)).eval()
    b = _small(MPLumiere, unet).eval()
    sd = a.temporal_state_dict()
    assert sd and set(sd) == {k for k in a.state_dict() if not k.startswith('model.')}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    result = b.load_temporal_state_dict(torch.load(buf))
    assert result.missing_keys == [] and result.unexpected_keys == []
    video, t = torch.randn(1, 3, 2, 16, 16), torch.rand(1)
    torch.testing.assert_close(b(video, time=t), a(video, time=t), rtol=0, atol=0)
    with pytest.raises(ValueError, match='missing keys'):
        b.load_temporal_state_dict({k: v for k, v in sd.items() if not k.startswith('convs.')})
    with pytest.raises(ValueError, match="unexpected keys \\['model.x'\\]"):
        b.load_temporal_state_dict({**sd, 'model.x': torch.zeros(1)})
    partial = b.load_temporal_state_dict({k: v for k, v in sd.items() if k.startswith('convs.')}, strict=False)
    assert partial.missing_keys and all(not k.startswith('convs.') for k in partial.missing_keys)


# ---------------------------------------------------------------------------------------------- (9) checkpointing

def _loss_and_grads(lum, video, t, cot):
    out = lum(video, time=t)
    grads = torch.autograd.grad((out * cot).sum(), lum.parameters())
    return out, grads


@pytest.mark.parametrize('klass', [Lumiere, MPLumiere])
def test_checkpoint_temporal_same_gradients_fewer_saved_activations(klass):
    """Upstream has no gradient checkpointing. Ours: identical outputs, gradients and renormalised MP weights,
    and fewer bytes of activations held for backward (the saved tensors of the autograd graph)."""
    kw = dict(conv_inflation_kwargs=dict(dropout=0.2)) if klass is MPLumiere else {}
    torch.manual_seed(0)
    plain = _perturb_temporal_(_small(klass, **kw)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_temporal = True
    assert _small(klass, checkpoint_temporal=True, **kw).checkpoint_temporal
    video, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    cot = torch.randn_like(video)

    def run(lum):
        saved = {}

        def pack(x):
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x
        torch.manual_seed(5)            # same dropout masks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = lum(video, time=t)
        grads = torch.autograd.grad((out * cot).sum(), lum.parameters())
        return out, grads, sum(saved.values())

    out_p, grads_p, bytes_p = run(plain)
    out_c, grads_c, bytes_c = run(ckpt)
    torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (n, a), b in zip(ckpt.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert bytes_c < 0.8 * bytes_p, (bytes_c, bytes_p)
    # eval / no_grad: no checkpointing, nothing changes
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(video, time=t), plain.eval()(video, time=t), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- (10) identity init

def _per_frame(unet, video, **cond):
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    cond = {k: v.repeat_interleave(t, 0) for k, v in cond.items()}
    out = unet(frames, **cond)
    return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)


def test_identity_init_mp_lumiere_is_the_image_model_per_frame():
    """Upstream's MP blocks scale their input by 0.394 at init; identity_init=True makes them the identity."""
    unet = small_unet().eval()
    names = dict(SMALL_UNET_NAMES, downsample_module_names=[], upsample_module_names=[])
    lum = MPLumiere(unet, image_size=16, identity_init=True, **names).eval()
    assert lum.identity_init
    video, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        expected = _per_frame(unet, video, time=t)
        assert_close_rel(lum(video, time=t), expected, 1e-6, what='identity init')   # rounding only
        default = MPLumiere(unet, image_size=16, **names).eval()(video, time=t)
    assert (default - expected).norm() > 0.1 * expected.norm()        # upstream's behaviour, kept by default
    block = lum.convs[0]
    x = torch.randn(2, block.dim, 3, 4, 4)
    torch.testing.assert_close(block(x), x, rtol=1e-6, atol=1e-6)
    # the branch still trains: after a step away from zero gain the block is no longer the identity
    with torch.no_grad():
        block.proj_out[1].gain.fill_(0.5)
    assert not torch.allclose(block(x), x, atol=1e-3)


@pytest.mark.parametrize('klass,kw', [('MPConvolutionInflationBlock', {}),
                                      ('MPAttentionInflationBlock', dict(heads=2, dim_head=8, depth=2))])
def test_identity_init_as_a_block_argument(klass, kw):
    """The MP blocks take ``identity_init=True`` themselves (standalone, or through ``conv_inflation_kwargs`` /
    ``attn_inflation_kwargs``); default off, as upstream."""
    import lumiere_fast
    block = getattr(lumiere_fast, klass)(dim=8, identity_init=True, **kw).eval()
    x = torch.randn(2, 8, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=1e-6, atol=1e-6)
        default = getattr(lumiere_fast, klass)(dim=8, **kw).eval()
        assert default.skip_rescale is None and (default(x) - x).norm() > 0.1 * x.norm()
    lum = MPLumiere(small_unet(), image_size=16, conv_inflation_kwargs=dict(identity_init=True),
                    **dict(SMALL_UNET_NAMES, attn_module_names=[], downsample_module_names=[], upsample_module_names=[]))
    assert all(m.skip_rescale is not None for m in lum.convs)


# ---------------------------------------------------------------------------------------------- (7) T=1

@pytest.mark.parametrize('frames', [1, 8])
def test_mp_lumiere_karras_unet_one_frame_and_eight(frames):
    """Upstream rejects T=1 (an assert on divisibility by 2**downsamples). Ours: T=1 runs, with the temporal
    down/upsamples passing the single frame through; identity_init then gives the image model itself."""
    unet = small_unet().eval()
    lum = MPLumiere(unet, image_size=16, identity_init=True)             # the paper's points: 2 downsamples
    assert lum.downsample_factor == 4
    video, t = torch.randn(2, 3, frames, 16, 16), torch.rand(2)
    out = lum(video, time=t)
    assert out.shape == video.shape and torch.isfinite(out).all()
    if frames == 1:
        with torch.no_grad():
            assert_close_rel(out, _per_frame(unet, video, time=t), 1e-6, what='T=1')
    out.square().mean().backward()
    resample = {id(p) for g in (lum.downsamples, lum.upsamples) for p in g.parameters()}
    assert all(p.grad is not None for p in lum.parameters() if id(p) not in resample)
    assert all((p.grad is None) == (frames == 1) for p in lum.parameters() if id(p) in resample)


@pytest.mark.parametrize('frames', [2, 3, 6])
def test_frames_not_divisible_still_raise(frames):
    lum = MPLumiere(small_unet(), image_size=16)
    with pytest.raises(ValueError, match=f'divisible by 4 .*or 1 \\(images\\), got {frames}'):
        lum(torch.randn(1, 3, frames, 16, 16), time=torch.rand(1))


# ---------------------------------------------------------------------------------------------- (2) any subset

@pytest.mark.parametrize('kinds', [('conv',), ('attn',), ('conv', 'attn'), ('downsample', 'upsample'),
                                   ('conv', 'downsample', 'upsample')])
@pytest.mark.parametrize('klass', [Lumiere, MPLumiere])
def test_any_subset_of_the_four_kinds(kinds, klass):
    """Upstream's default ``attn_module_names=[]`` (and any other empty list) crashes with "not enough values to
    unpack"; ours inflates with any subset, conv-only without resampling included."""
    names = {f'{k}_module_names': (SMALL_UNET_NAMES[f'{k}_module_names'] if k in kinds else [])
             for k in ('conv', 'attn', 'downsample', 'upsample')}
    lum = klass(small_unet(), image_size=16, **names)
    assert len(lum.convs) == ('conv' in kinds) * len(SMALL_UNET_NAMES['conv_module_names'])
    assert len(lum.downsamples) == ('downsample' in kinds) * len(SMALL_UNET_NAMES['downsample_module_names'])
    frames = 2 * lum.downsample_factor
    video = torch.randn(1, 3, frames, 16, 16)
    out = lum(video, time=torch.rand(1))
    assert out.shape == video.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in lum.parameters())


# ---------------------------------------------------------------------------------------------- (8) compile

def _tiny_compile_lumiere():
    unet = small_unet(image_size=8, dim=4, dim_max=8, num_downsamples=1, attn_res=(4,))
    names = dict(conv_module_names=['downs.0'], attn_module_names=['mids.0'], downsample_module_names=['downs.1'],
                 upsample_module_names=['ups.1'])
    return MPLumiere(unet, image_size=8, **names).eval()


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) >= (major, minor)


def test_one_compiled_graph_for_batch_sizes_one_two_three():
    """Upstream sets ``batch_dim`` on every temporal module per forward: a module attribute, which dynamo
    specialises, so a compiled model recompiles for every new batch size. ``lum.compile()`` keeps one graph for
    batch sizes 1, 2, 3 (dynamo would otherwise specialise batch 1), with the eager outputs."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    lum = _tiny_compile_lumiere()
    eager = copy.deepcopy(lum)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()         # process-wide: other tests compile too
    counter = CompileCounter()
    lum.compile(backend=counter)
    # measured: one graph on torch 2.14; torch 2.11 specialises batch 1 despite size-oblivious tracing and keeps
    # a second graph for it (the README says so): then batch 1 and batches 2, 3 share one graph each
    graphs = 1 if _torch_at_least(2, 14) else 2
    try:
        with torch.no_grad():
            for b in (1, 2, 3, 1):
                video, t = torch.randn(b, 3, 4, 8, 8), torch.rand(b)
                torch.testing.assert_close(lum(video, time=t), eager(video, time=t))
                assert counter.frame_count <= graphs, f'{counter.frame_count} graphs after batch size {b}'
        assert torch._dynamo.utils.counters['stats']['unique_graphs'] <= graphs
    finally:
        torch._dynamo.reset()


def test_plain_torch_compile_and_compiled_image_model_keep_one_graph_across_batch_sizes():
    """``torch.compile(lumiere)`` (batch 1 aside: dynamo's own size-1 rule) and an image model compiled inside
    the eager wrapper: new batch sizes add no graph, because no module attribute changes per forward."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    lum = _tiny_compile_lumiere()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lum, backend=counter, dynamic=True)
    with torch.no_grad():
        for b in (2, 3):
            video, t = torch.randn(b, 3, 4, 8, 8), torch.rand(b)
            torch.testing.assert_close(compiled(video, time=t), lum(video, time=t))
    assert counter.frame_count == 1, f'{counter.frame_count} graphs for batch sizes 2, 3'

    torch._dynamo.reset()
    counter = CompileCounter()
    lum.model.compile(backend=counter, dynamic=True)
    with torch.no_grad():
        for b in (3, 4):
            lum(torch.randn(b, 3, 2, 8, 8), time=torch.rand(b))
        warm = counter.frame_count
        for b in (5, 6, 7):
            lum(torch.randn(b, 3, 2, 8, 8), time=torch.rand(b))
    assert counter.frame_count == warm, f'recompiled for new batch sizes: {warm} -> {counter.frame_count} frames'
    assert all(m.batch_dim is None for m in lum.temporal_modules())
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- (6) conditioning

class _CondBlock(nn.Module):
    def __init__(self, dim, cond_dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.to_cond = nn.Linear(cond_dim, dim)

    def forward(self, x, cond=None):
        x = self.conv(x)
        return x if cond is None else x + self.to_cond(cond)[:, :, None, None]


class _PerFrameCondModel(nn.Module):
    """A per-frame conditioning tensor handed to a block that runs after a temporal downsample."""
    channels = 3

    def __init__(self):
        super().__init__()
        self.inp, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mid = _CondBlock(8, 4)
        self.up, self.out = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, time=None, cond=None):
        return self.out(self.up(self.mid(self.down(self.inp(x)), cond=cond)))


_COND_NAMES = dict(conv_module_names=['inp'], downsample_module_names=['down'], upsample_module_names=['up'])


def test_per_frame_conditioning_follows_upstream_by_default():
    """A block after a temporal downsample gets the first frame's conditioning of each merged pair, as upstream
    (the other frame's is dropped): same numbers as upstream, bit for bit."""
    upstream = pytest.importorskip('lumiere_pytorch')
    torch.manual_seed(0)
    model = _PerFrameCondModel()
    names = dict(_COND_NAMES, attn_module_names=['mid'], attn_inflation_kwargs=dict(heads=2, dim_head=4))
    lum = _perturb_temporal_(Lumiere(model, image_size=8, **names)).eval()
    up = upstream.Lumiere(model, image_size=8, unet_time_kwarg='time', **names).eval()     # crashes without attn
    up.load_state_dict(lum.state_dict())
    video, cond = torch.randn(2, 3, 4, 8, 8), torch.randn(8, 4)
    second = cond.clone()
    second[1::2] += 1.
    with torch.no_grad():
        out = lum(video, cond=cond)
        torch.testing.assert_close(out, up(video, cond=cond), rtol=0, atol=0)
        torch.testing.assert_close(lum(video, cond=second), out, rtol=0, atol=0)


def test_per_frame_conditioning_averaged_when_asked():
    """``average_conditioning=['cond']``: the merged frame gets the mean of its frames' conditioning, so every
    frame's conditioning counts; per-video conditioning (the same in every frame of a group) gives exactly the
    default's (upstream's) result."""
    torch.manual_seed(0)
    lum = _perturb_temporal_(Lumiere(_PerFrameCondModel(), image_size=8, average_conditioning=['cond'],
                                     **_COND_NAMES)).eval()
    video = torch.randn(2, 3, 4, 8, 8)
    cond = torch.randn(8, 4)                                 # (b t) rows: one per frame
    second = cond.clone()
    second[1::2] += 1.                                       # the second frame of every merged pair
    pair_mean = cond.reshape(4, 2, 4).mean(1).repeat_interleave(2, dim=0)
    with torch.no_grad():
        out = lum(video, cond=cond)
        assert (lum(video, cond=second) - out).abs().max() > 1e-2          # every frame's conditioning counts
        torch.testing.assert_close(lum(video, cond=pair_mean), out)        # ... through the mean of its group
        per_video = lum(video, cond=cond[::4])                             # (b, ...) rows: repeated per frame
        torch.testing.assert_close(lum(video, cond=cond[::4].repeat_interleave(4, dim=0)), per_video, rtol=0, atol=0)
        lum.average_conditioning = ()                                      # settable later: upstream's rule again
        torch.testing.assert_close(lum(video, cond=second), lum(video, cond=cond), rtol=0, atol=0)
    with pytest.raises(TypeError, match='average_conditioning as a list of keyword names'):
        Lumiere(_PerFrameCondModel(), image_size=8, average_conditioning='cond', **_COND_NAMES)


def test_zero_dim_kwarg_passes_through_the_conditioning_hook():
    """Upstream's pre-hook indexes ``shape[0]`` of every tensor kwarg: a 0-dim tensor raises IndexError."""
    lum = Lumiere(_PerFrameCondModel(), image_size=8, **_COND_NAMES).eval()
    with torch.no_grad():
        out = lum(torch.randn(2, 3, 4, 8, 8), cond=torch.randn(2, 4), time=torch.tensor(0.5))
    assert out.shape == (2, 3, 4, 8, 8)


# ---------------------------------------------------------------------------------------------- (1) dry run

class _Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.channels, self.inner, self.calls = model.channels, model, []

    def forward(self, x, time, **kw):
        self.calls.append(tuple(x.shape))
        return self.inner(x, time=time, **kw)


def test_explicit_dry_run_input_and_a_single_dry_run_forward():
    """Upstream builds its own mock and runs four full forwards at init (dry_run_input= is a TypeError there)."""
    model = _Counting(small_unet())
    names = {k: [f'inner.{n}' for n in v] for k, v in SMALL_UNET_NAMES.items()}
    images = torch.randn(2, 3, 16, 16)
    lum = MPLumiere(model, image_size=16, dry_run_input=images, check_mock_video=False, **names)
    assert lum.model.calls == [(2, 3, 16, 16)]                       # one forward, of the given images
    lum = MPLumiere(model, image_size=16, dry_run_input=images, **names)
    assert lum.model.calls == [(2, 3, 16, 16), (2, 3, 16, 16)]       # + the mock-video check, on those frames
    assert lum(torch.randn(1, 3, 2, 16, 16), time=torch.rand(1)).shape == (1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match='dry_run_input as a \\(batch, channels, height, width\\) tensor'):
        MPLumiere(model, image_size=16, dry_run_input=torch.randn(3, 16, 16), **names)


# ---------------------------------------------------------------------------------------------- (5) saving

def test_torch_save_round_trip_of_the_whole_wrapper():
    """Upstream's hook is a local closure: torch.save(lumiere) raises. Ours round-trips (a model that pickles;
    a KarrasUnet itself does not on this torch, see the README)."""
    from test_api import ToyUnet
    lum = MPLumiere(ToyUnet(), image_size=8, conv_module_names=['blocks.0'], downsample_module_names=['blocks.1'],
                    upsample_module_names=['blocks.2'], checkpoint_temporal=True, identity_init=True)
    _perturb_temporal_(lum).eval()
    buf = io.BytesIO()
    torch.save(lum, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    assert clone.checkpoint_temporal and clone.identity_init
    video, t = torch.randn(2, 3, 4, 8, 8), torch.rand(2)
    torch.testing.assert_close(clone(video, time=t), lum(video, time=t), rtol=0, atol=0)
    assert clone(torch.randn(1, 3, 1, 8, 8), time=torch.rand(1)).shape == (1, 3, 1, 8, 8)


def test_torch_save_round_trip_of_a_wrapped_karras_unet():
    """A KarrasUnet holds ``SDPBackend`` enum members (denoising-diffusion-pytorch's ``Attend``) that pickle cannot
    find by name, so ``torch.save`` fails for it, wrapped or not; importing lumiere_fast registers a by-name
    reducer for them, and the whole wrapper round-trips."""
    lum = _perturb_temporal_(MPLumiere(small_unet(), image_size=16, **SMALL_UNET_NAMES)).eval()
    buf = io.BytesIO()
    torch.save(lum, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    video, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(clone(video, time=t), lum(video, time=t), rtol=0, atol=0)
    attend = [m for m in clone.modules() if type(m).__name__ == 'Attend']
    assert attend, 'the small KarrasUnet should hold an Attend module'
    copy.deepcopy(lum)


def test_fast_image_model_switch_checkpointing_and_choices():
    """``fast_image_model`` (default on) runs the frozen KarrasUnet's MP layers through lumiere_fast (its ops show in
    record_choices); off, upstream's modules run unchanged; both give the same numbers, and
    ``checkpoint_image_model`` the same gradients."""
    from lumiere_fast import backend
    unet = small_unet()
    fast = MPLumiere(unet, image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES)
    plain = MPLumiere(unet, image_size=16, unet_time_kwarg='time', fast_image_model=False, **SMALL_UNET_NAMES)
    plain.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert type(plain.model.downs[0]).__module__.startswith('denoising_diffusion_pytorch')
    assert not type(fast.model.downs[0]).__module__.startswith('denoising_diffusion_pytorch')
    video, time = torch.randn(1, 3, 2, 16, 16), torch.rand(1)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(video, time=time)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    for m in (fast, plain):
        m.eval()
    (a, ga), (b, gb) = step(fast), step(plain)
    assert_close_rel(a, b, 1e-5, what='fast vs upstream image model')
    for x, y in zip(ga, gb):
        assert_close_rel(x, y, 1e-4, 1e-6 * max(g.norm().item() for g in gb), what='fast vs upstream grads')
    fast.train()
    ref = step(copy.deepcopy(fast))[1]
    fast.checkpoint_image_model = True
    assert fast.checkpoint_image_model
    for x, y in zip(step(fast)[1], ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='needs fast_image_model'):
        plain.checkpoint_image_model = True
    with backend.use_backend('triton'), backend.record_choices() as seen, torch.no_grad():
        fast.eval()(video, time=time)
    assert {'pixel_norm_silu', 'mp_cat'} <= set(seen), seen


def test_lumiere_compile_with_inductor_eval_and_training_step():
    """``lumiere.compile()`` with the default backend (inductor, CPU) on the tiny config of issue 17 item 5, first
    call at batch 1 and then 2: the eager outputs, and a training step's gradients."""
    import torch._dynamo
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=8, dim=4, dim_max=8, num_downsamples=1, num_blocks_per_stage=1, attn_res=(4,))
    lum = MPLumiere(unet, image_size=8, unet_time_kwarg='time', conv_module_names=['downs.0'],
                    attn_module_names=['mids.0'], downsample_module_names=['downs.1'], upsample_module_names=['ups.1'])
    eager = copy.deepcopy(lum)
    torch._dynamo.reset()
    lum.compile()
    try:
        lum.eval(), eager.eval()
        with torch.no_grad():
            for b in (1, 2):
                video, t = torch.randn(b, 4, 4, 8, 8), torch.rand(b)
                torch.testing.assert_close(lum(video, time=t), eager(video, time=t), rtol=1e-4, atol=1e-5)
        if not _torch_at_least(2, 14):
            pytest.xfail('torch < 2.14: inductor cannot compile the dynamic-batch training graph (measured on '
                         "2.11: `cannot determine truth value of Relational`, or the process aborts); eval above runs")
        lum.train(), eager.train()
        video, t = torch.randn(2, 4, 4, 8, 8), torch.rand(2)
        grads = []
        for model in (lum, eager):
            model.zero_grad(set_to_none=True)
            model(video, time=t).square().mean().backward()
            grads.append([p.grad for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_checkpoint_image_model_holds_less_for_backward():
    """Activation checkpointing of the frozen U-Net's blocks: the forward keeps fewer bytes for backward
    (measured on a 32x32, dim 32 KarrasUnet, T=8: 94.5 MiB -> 52.4 MiB, 12.3 MiB with checkpoint_temporal too)."""
    def saved_mib(**kw):
        lum = MPLumiere(small_unet(), image_size=16, unet_time_kwarg='time', **SMALL_UNET_NAMES, **kw).train()
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lum(torch.randn(1, 3, 4, 16, 16), time=torch.rand(1))
        out.square().mean().backward()
        return total[0]
    plain, image, both = saved_mib(), saved_mib(checkpoint_image_model=True), \
        saved_mib(checkpoint_image_model=True, checkpoint_temporal=True)
    assert image < 0.8 * plain and both < 0.6 * image, (plain, image, both)
