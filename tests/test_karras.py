"""The frozen image model's fast path (issue 15): ``ops/karras.py`` + ``kernels/karras.py`` and
``modules/karras.accelerate_karras_unet``.

* ops: Triton (the CPU interpreter: fp32, fp16) == reference, forward and input gradients, NaN-poisoned outputs;
  the references == upstream's modules; opcheck; a fullgraph compile; the kernels compile for sm_90.
* the accelerated KarrasUnet == upstream's on the same state dict, outputs and input gradients, eval and train:
  float64 to 1e-10 (the same math), float32 within 1e-6 (eval) / 1e-5 (train) or at most as far from the float64
  answer as upstream's own float32 result (upstream's float32 error is itself ~1e-6 on these nets: the folded
  factors move rounding, not math);
* the weight cache: reused, invalidated by any change of the weight, renormalisation once in train mode,
  upstream's behaviour for unfrozen weights, autocast dtype, inference mode then training;
* the plug-in: hooks and state dict kept, fallbacks where a hook needs a submodule to run, whole MPLumiere /
  Lumiere parity with lumiere-pytorch, checkpointing with the same gradients, pickling.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from helpers import TOL, assert_close_rel, compile_for_sm90, perturb_, rel_err, small_unet
from lumiere_fast import backend
from lumiere_fast.modules import karras as fast_unet
from lumiere_fast.ops import karras as K

ku = pytest.importorskip('denoising_diffusion_pytorch.karras_unet', reason='needs denoising-diffusion-pytorch')

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
KERNEL_DTYPES = [torch.float32, torch.float16]
# (b, c, h, w): channel and pixel tails past the interpreter's 4 x 16 tiles and 64-element blocks, c=1, one pixel
SHAPES = [(2, 13, 5, 7), (1, 1, 1, 1), (3, 4, 4, 4), (1, 33, 9, 3)]


def _ids(v):
    return str(v)[6:] if isinstance(v, torch.dtype) else 'x'.join(map(str, v)) if isinstance(v, tuple) else None


# ---------------------------------------------------------------------------------------------- ops

def _grads(out, inputs, cots):
    outs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outs, inputs, cots)


def _run_both(fn_name, inputs, dtype, extra=()):
    """Triton (forced) and reference on the same rounded inputs; reference in fp32; returns both (outs, grads)."""
    fn, ref = getattr(K, fn_name), getattr(K, f'{fn_name}_ref')
    xs = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
    with backend.use_backend('triton'), backend.record_choices() as seen:
        out = fn(*xs, *extra)
    assert seen == {fn_name: {'triton'}}
    outs = out if isinstance(out, tuple) else (out,)
    cots = [torch.randn(o.shape, device=DEVICE).to(dtype) for o in outs]
    grads = _grads(out, xs, cots)
    x32 = [t.detach().float().requires_grad_() for t in xs]
    ref_out = ref(*x32, *extra)
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    ref_grads = _grads(ref_out, x32, [c.float() for c in cots])
    return list(outs) + list(grads), list(ref_outs) + list(ref_grads)


@pytest.mark.usefixtures('poison_and_ieee')
@pytest.mark.parametrize('dtype', KERNEL_DTYPES, ids=_ids)
@pytest.mark.parametrize('shape', SHAPES, ids=_ids)
def test_pixel_norm_silu_kernel(shape, dtype):
    x = torch.randn(shape) * 3
    if dtype == torch.float32:          # (in fp16 their gradient, sqrt(c) / eps * g, overflows in both)
        x[0, :, 0, 0] = 0.              # a zero pixel: below eps, F.normalize's clamp
        if shape[1] > 1:
            x[-1, :, -1, -1] = 1e-6     # a tiny one
    got, ref = _run_both('pixel_norm_silu', [x], dtype)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a.float(), b, TOL[dtype], what=f'pixel_norm_silu #{i}')


@pytest.mark.usefixtures('poison_and_ieee')
@pytest.mark.parametrize('dtype', KERNEL_DTYPES, ids=_ids)
@pytest.mark.parametrize('shape', SHAPES, ids=_ids)
def test_scale_silu_kernel(shape, dtype):
    got, ref = _run_both('scale_silu', [torch.randn(shape) * 2, torch.randn(shape[:2]) + 1], dtype)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a.float(), b, TOL[dtype], what=f'scale_silu #{i}')


@pytest.mark.usefixtures('poison_and_ieee')
@pytest.mark.parametrize('dtype', KERNEL_DTYPES, ids=_ids)
@pytest.mark.parametrize('shape', SHAPES, ids=_ids)
@pytest.mark.parametrize('t', [0.5, 0.3])
def test_mp_cat_kernel(shape, dtype, t):
    b, c, h, w = shape
    got, ref = _run_both('mp_cat', [torch.randn(shape), torch.randn(b, c + 2, h, w)], dtype, extra=(t,))
    for i, (a, r) in enumerate(zip(got, ref)):
        assert_close_rel(a.float(), r, TOL[dtype], what=f'mp_cat #{i}')


def test_references_match_upstream_modules():
    x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    y, s = K.pixel_norm_silu_ref(x)
    up = ku.PixelNorm(dim=1)(x)
    assert_close_rel(y, up, 1e-14, what='pixel norm')
    assert_close_rel(s * (1 / 0.596), ku.MPSiLU()(up), 1e-14, what='silu')
    a, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 7, 4, 5, dtype=torch.float64)
    for t in (0.5, 0.3):
        assert_close_rel(K.mp_cat_ref(a, b, t), ku.MPCat(t=t, dim=1)(a, b), 1e-14, what=f'mp_cat t={t}')
    scale = torch.randn(2, 12, dtype=torch.float64)
    assert_close_rel(K.scale_silu_ref(x, scale), torch.nn.functional.silu(x * scale[..., None, None]), 0.)


def test_dispatch_and_validation():
    x = torch.randn(2, 3, 4, 4)
    with backend.record_choices() as seen:        # auto on CPU tensors: the references
        K.pixel_norm_silu(x), K.scale_silu(x, torch.ones(2, 3)), K.mp_cat(x, x)
    assert seen == {op: {'reference'} for op in ('pixel_norm_silu', 'scale_silu', 'mp_cat')}
    with pytest.raises(ValueError, match='4-dim'):
        K.pixel_norm_silu(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r'\(b, c\)'):
        K.scale_silu(x, torch.ones(3))
    with pytest.raises(ValueError, match='agree'):
        K.mp_cat(x, torch.randn(2, 3, 4, 5))


def _op_samples():
    x = torch.randn(2, 5, 3, 4, device=DEVICE, requires_grad=True)
    return [
        (torch.ops.lumiere_fast.pixel_norm_silu.default, (x, 1e-4)),
        (torch.ops.lumiere_fast.scale_silu.default, (x, torch.randn(2, 5, device=DEVICE, requires_grad=True))),
        (torch.ops.lumiere_fast.mp_cat.default, (x, torch.randn(2, 3, 3, 4, device=DEVICE, requires_grad=True), 0.4)),
        (torch.ops.lumiere_fast.pixel_norm_silu_backward.default,
         (torch.randn(2, 5, 3, 4, device=DEVICE), torch.randn(2, 5, 3, 4, device=DEVICE), x.detach(),
          x.detach().norm(dim=1).flatten(1), 1e-4)),
        (torch.ops.lumiere_fast.scale_silu_backward.default,
         (torch.randn(2, 5, 3, 4, device=DEVICE), x.detach(), torch.randn(2, 5, device=DEVICE))),
    ]


@pytest.mark.parametrize('case', range(5))
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_no_graph_break(monkeypatch):
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'triton')

    def fn(x, scale, skip):
        y, s = K.pixel_norm_silu(x)
        return K.mp_cat(K.scale_silu(s, scale) + y, skip)

    args = [torch.randn(2, 5, 3, 4, requires_grad=True), torch.randn(2, 5) + 1, torch.randn(2, 3, 3, 4)]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    with backend.record_choices() as seen:
        out = compiled(*args)
    assert set(seen) == {'pixel_norm_silu', 'scale_silu', 'mp_cat'}
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), args[0])[0], torch.autograd.grad(ref.sum(), args[0])[0])


_COMPILE_CALLS = '''
from lumiere_fast.kernels import karras as K
# the launchers' (ops/karras.py) blocks and warps, every dtype a kernel takes (fp32 without autocast)
bc, bp, nw = K.PIXEL_NORM_BLOCKS
block, ew = K.ELEMENTWISE_BLOCK
for dt in ('bf16', 'fp16', 'fp32'):
    compile_for_h100(K.pixel_norm_silu_fwd_kernel, dict(BLOCK_C=bc, BLOCK_P=bp), dt=dt, warps=nw, exact=('sqrt', 'div'))
    compile_for_h100(K.pixel_norm_silu_bwd_kernel, dict(BLOCK_C=bc, BLOCK_P=bp), dt=dt, warps=nw, exact=('div',))
    compile_for_h100(K.scale_silu_fwd_kernel, dict(BLOCK=block), dt=dt, warps=ew)
    compile_for_h100(K.scale_silu_bwd_kernel, dict(BLOCK=block), dt=dt, warps=ew)
    compile_for_h100(K.mp_cat_fwd_kernel, dict(BLOCK=block), dt=dt, warps=ew)
'''


@pytest.mark.skipif(CUDA, reason='with a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_sm90_without_a_gpu():
    compile_for_sm90(_COMPILE_CALLS, f32_buffers={'norm_ptr'}, floats={'scale', 'eps', 'ca', 'cb'})


needs_cuda = pytest.mark.skipif(not CUDA, reason='bf16 kernels need a CUDA GPU (the interpreter\'s bf16 is wrong)')


@needs_cuda
@pytest.mark.parametrize('op', ['pixel_norm_silu', 'scale_silu', 'mp_cat'])
def test_bf16_gpu(op):
    shape = (3, 96, 17, 19)
    inputs = {'pixel_norm_silu': [torch.randn(shape)], 'scale_silu': [torch.randn(shape), torch.randn(shape[:2])],
              'mp_cat': [torch.randn(shape), torch.randn(3, 64, 17, 19)]}[op]
    got, ref = _run_both(op, inputs, torch.bfloat16)
    for a, b in zip(got, ref):
        assert_close_rel(a.float(), b, TOL[torch.bfloat16], what=op)


# ---------------------------------------------------------------------------------------------- the U-Net

def _pair(**kw):
    up = small_unet(**kw)
    perturb_(up, 0.3)
    up.requires_grad_(False)
    return up, fast_unet.accelerate_karras_unet(copy.deepcopy(up))


def _outputs(model, x, cot, **cond):
    x = x.clone().requires_grad_()
    out = model(x, **cond)
    return out, torch.autograd.grad(out, x, cot)[0]


def _compare_unets(up, fast, mode, batch=3, seed=0, **cond):
    """Output and input gradient: float64 exact-math parity, float32 within tolerance of upstream or as close to
    the float64 answer as upstream's float32 result. In train mode the stored weights after the call too.
    Class labels: upstream casts them to float32 (``.float()``), so it cannot run in float64: float32 within 1e-5."""
    exact64 = 'class_labels' not in cond
    size, ch = up.image_size, up.channels
    g = torch.Generator().manual_seed(seed)
    x, cot = torch.randn(batch, ch, size, size, generator=g), torch.randn(batch, ch, size, size, generator=g)
    cond = dict(time=torch.rand(batch, generator=g), **cond)
    cond64 = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    for m in (up, fast):
        m.train(mode == 'train')
    up64, fast64 = copy.deepcopy(up).double(), copy.deepcopy(fast).double()
    torch.manual_seed(seed)
    ref = _outputs(up, x, cot, **cond)
    torch.manual_seed(seed)
    got = _outputs(fast, x, cot, **cond)
    if not exact64:
        for what, a, b in zip(('output', 'input grad'), got, ref):
            assert_close_rel(a, b, 1e-5, what=what)
    else:
        torch.manual_seed(seed)
        exact = _outputs(up64, x.double(), cot.double(), **cond64)
        torch.manual_seed(seed)
        got64 = _outputs(fast64, x.double(), cot.double(), **cond64)
        rtol = 1e-6 if mode == 'eval' else 1e-5
        for what, a, b, a64, b64 in zip(('output', 'input grad'), got, ref, got64, exact):
            assert_close_rel(a64, b64, 1e-10, what=f'{what} (float64)')
            if rel_err(a, b) > rtol:
                assert rel_err(a, b64) <= 1.25 * rel_err(b, b64), \
                    f'{what}: ours {rel_err(a, b64):.3g} off the float64 answer, upstream {rel_err(b, b64):.3g}'
    if mode == 'train':
        for (n, p), q in zip(up.named_parameters(), fast.parameters()):
            assert_close_rel(q, p, 1e-6, what=f'{n} after a train step')


UNET_CONFIGS = {
    'default': {},
    'class_cond': dict(num_classes=5),
    'self_cond_attn_levels': dict(self_condition=True, attn_res=(8, 4), num_blocks_per_stage=2),
    'flash_4ch': dict(attn_flash=True, channels=4, attn_dim_head=4),
    'one_downsample': dict(num_downsamples=1, image_size=8, attn_res=(4,)),
}


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('config', list(UNET_CONFIGS))
def test_unet_parity(config, mode):
    kw = UNET_CONFIGS[config]
    up, fast = _pair(**kw)
    cond = dict(class_labels=torch.randint(0, 5, (3,))) if 'num_classes' in kw else {}
    _compare_unets(up, fast, mode, **cond)
    assert type(fast.downs[0]) is fast_unet.FastEncoder and type(fast) is ku.KarrasUnet


def test_unet_parity_dropout_in_train_mode():
    """Dropout > 0: the fast path draws the same masks in the same order (same RNG stream) as upstream."""
    up, fast = _pair(dropout=0.3)
    _compare_unets(up, fast, 'train')


def test_names_state_dict_and_idempotence():
    up, fast = _pair()
    assert [n for n, _ in up.named_modules()] == [n for n, _ in fast.named_modules()]
    assert [n for n, _ in up.named_parameters()] == [n for n, _ in fast.named_parameters()]
    sd = fast.state_dict()
    assert list(sd) == list(up.state_dict())
    up.load_state_dict(sd, strict=True)
    assert fast_unet.accelerate_karras_unet(fast) is fast
    assert isinstance(fast.downs[0], ku.Encoder) and isinstance(fast.input_block, ku.Conv2d)


def test_not_a_karras_unet_or_unrecognised_modules_run_unchanged():
    net = torch.nn.Sequential(ku.Conv2d(3, 4, 3))
    assert fast_unet.accelerate_karras_unet(net) is net and type(net[0]) is ku.Conv2d

    class MyEncoder(ku.Encoder):
        pass

    up = small_unet()
    enc = up.downs[0]
    enc.__class__ = MyEncoder
    fast = fast_unet.accelerate_karras_unet(copy.deepcopy(up))
    assert type(fast.downs[0]) is MyEncoder and type(fast.downs[0].block1[1]) is fast_unet.FastConv2d


# ---------------------------------------------------------------------------------------------- weight cache

def test_cache_reused_and_invalidated():
    conv = fast_unet.accelerate_karras_unet(small_unet()).input_block
    conv.requires_grad_(False).eval()
    x = torch.randn(1, 3, 8, 8)
    w1 = fast_unet.mp_layer_weight(conv, x)
    assert fast_unet.mp_layer_weight(conv, x) is w1
    with torch.no_grad():
        conv.weight.mul_(2.)                     # in place: the version counter moves
    w2 = fast_unet.mp_layer_weight(conv, x)
    assert w2 is not w1
    conv.weight.data = torch.randn_like(conv.weight)      # new storage, same version
    w3 = fast_unet.mp_layer_weight(conv, x)
    assert w3 is not w2
    torch.testing.assert_close(w3, ku.normalize_weight(conv.weight) / conv.fan_in ** 0.5, rtol=0, atol=0)
    conv.double()
    assert fast_unet.mp_layer_weight(conv, x.double()).dtype == torch.float64


def test_train_mode_renormalises_once():
    up, fast = _pair()
    fast.train()
    conv = fast.downs[0].block1[1]
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    fast(x, t)
    version = conv.weight._version
    fast(x, t)
    assert conv.weight._version == version                 # no rewrite while the weight is unchanged
    torch.testing.assert_close(conv.weight, ku.normalize_weight(up.downs[0].block1[1].weight), rtol=1e-6, atol=1e-6)


def test_unfrozen_weights_keep_upstream_behaviour():
    up, fast = _pair()
    up.requires_grad_(True)
    fast.requires_grad_(True)
    for m in (up, fast):
        m.train()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    for _ in range(2):                   # upstream renormalises every call: so does ours for these weights
        v = fast.downs[0].block1[1].weight._version
        out_u, out_f = up(x, t), fast(x, t)
        assert fast.downs[0].block1[1].weight._version > v
    assert_close_rel(out_f, out_u, 1e-5, what='output')
    gu = torch.autograd.grad(out_u.sum(), list(up.parameters()), allow_unused=True)
    gf = torch.autograd.grad(out_f.sum(), list(fast.parameters()), allow_unused=True)
    for (n, _), a, b in zip(up.named_parameters(), gf, gu):
        if b is not None:
            assert_close_rel(a, b, 1e-5, 1e-7 * max(g.norm().item() for g in gu if g is not None), what=n)


def test_autocast_caches_in_the_compute_dtype():
    up, fast = _pair()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_f, out_u = fast(x, t), up(x, t)
    cached = [v[2] for v in fast.downs[0].block1[1]._lf_cache.values()]
    assert cached and all(w.dtype == torch.bfloat16 for w in cached)
    assert_close_rel(out_f.float(), out_u.float(), TOL[torch.bfloat16], what='bf16 autocast output')


def test_inference_mode_then_training():
    up, fast = _pair()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.inference_mode():
        fast(x, t)
    xg = x.clone().requires_grad_()
    fast(xg, t).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_pickle_and_deepcopy_drop_caches():
    up, fast = _pair()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = fast(x, t)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert '_lf_cache' not in clone.input_block.__dict__
        torch.testing.assert_close(clone(x, t), out)


# ---------------------------------------------------------------------------------------------- plug-in

def test_hooks_on_inner_modules_fall_back_to_upstream_forward():
    up, fast = _pair()
    seen = []
    fast.downs[0].block1.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    fast.downs[1].attn.to_qkv.register_forward_hook(lambda m, a, o: seen.append(o.shape)) \
        if fast.downs[1].attn is not None else None
    fast.eval(), up.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert_close_rel(fast(x, t), up(x, t), 1e-5, what='output')
    assert seen and seen[0] == (2, 8, 16, 16)


def test_record_choices_shows_the_image_model_ops():
    _, fast = _pair(num_classes=5)
    with backend.record_choices() as seen:
        fast(torch.randn(2, 3, 16, 16), torch.rand(2), class_labels=torch.tensor([1, 2]))
    assert {'pixel_norm_silu', 'scale_silu', 'mp_cat'} <= set(seen)


def test_checkpoint_same_gradients():
    up, fast = _pair(dropout=0.2)
    ck = fast_unet.accelerate_karras_unet(copy.deepcopy(fast), checkpoint=True)
    assert ck.downs[0]._lf_checkpoint and not fast.downs[0]._lf_checkpoint
    x, cot, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.rand(2)
    for m in (fast, ck):
        m.train()
    results = []
    for m in (fast, ck):
        torch.manual_seed(3)
        results.append(_outputs(m, x, cot, time=t))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _lumiere_pair(up_unet, family='MP'):
    """Upstream's wrapper and ours (fast image model on: the default) at the paper's points, one state dict."""
    pytest.importorskip('lumiere_pytorch', reason='wrapper parity needs lumiere-pytorch==0.0.24')
    from lumiere_fast.lumiere import karras_unet_inflation_points
    from test_parity import _lumiere_pair as pair
    names = karras_unet_inflation_points(up_unet)
    u, o = pair(family, up_unet, image_size=up_unet.image_size, unet_time_kwarg='time',
                conv_module_names=names['conv'], attn_module_names=names['attn'],
                downsample_module_names=names['downsample'], upsample_module_names=names['upsample'])
    return u, o


@pytest.mark.parametrize('family', ['MP', ''])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_whole_lumiere_parity(family, mode):
    """The wrapper with an accelerated image model vs lumiere-pytorch: output, input and temporal-parameter
    gradients; float64 to 1e-9 (the same math), float32 within 1e-5 or near upstream's own distance from the float64
    answer: 2x for MP; 4x for the non-MP wrapper, whose time norm (upstream's quirk) makes its gradients
    ill-conditioned: measured off float64 by 2-5e-5 for upstream, 3-7e-5 for ours without the fast image model
    and 5-10e-5 with it on this case (other roundings of the same sums)."""
    slack = 2 if family else 4
    unet = small_unet()
    perturb_(unet, 0.3)
    u, o = _lumiere_pair(unet, family)
    assert type(o.model.downs[0]) is fast_unet.FastEncoder
    video = torch.randn(1, 3, 4, 16, 16)
    results = []
    for m in (u, o, copy.deepcopy(u).double(), copy.deepcopy(o).double()):
        m.train(mode == 'train')
        v = (video.double() if list(m.parameters())[0].dtype == torch.float64 else video).clone().requires_grad_()
        out = m(v, time=torch.rand(1, generator=torch.Generator().manual_seed(0)).to(v.dtype))
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
        results.append([out, *torch.autograd.grad(out, [v, *m.parameters()], cot)])
    ref, got, exact, got64 = results
    for i, (a, b, a64, b64) in enumerate(zip(got, ref, got64, exact)):
        assert_close_rel(a64, b64, 1e-9, what=f'#{i} (float64)')
        if rel_err(a, b) > 1e-5:
            assert rel_err(a, b64) <= slack * rel_err(b, b64) + 1e-7, f'#{i}: {rel_err(a, b64):.3g} vs {rel_err(b, b64):.3g}'


def test_torch_compile_of_the_accelerated_unet():
    """Under torch.compile the frozen weights are normalised in the graph (no version counters there): same
    outputs and input gradients as eager, no graph break."""
    up, fast = _pair()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend='aot_eager')
    for mode in ('eval', 'train'):
        fast.train(mode == 'train')
        got, ref = _outputs(compiled, x, x, time=t), _outputs(fast, x, x, time=t)
        for a, b in zip(got, ref):
            assert_close_rel(a, b, 1e-6 if mode == 'eval' else 1e-5, what=f'compiled {mode}')


# ---------------------------------------------------------------------------------------------- deterministic resizes
#
# Issue 16.3: PyTorch has no deterministic CUDA backward for upsample_bilinear2d, so in deterministic mode on CUDA
# ``K.resize2x`` runs the same stencil as avg_pool2d (halving) or slices, products and sums (doubling). Forced here
# on CPU: equal to F.interpolate forward and input gradient to rounding (measured: halving 1.2e-7 of max|out| in
# fp32, 2.1e-16 in fp64, gradient bit-equal; doubling 1.4e-7 / 2.5e-16 forward, 2.2e-7 / 3.3e-16 gradient).

def _spatial_stride(b, c, h, w, dtype):
    return torch.randn(b, c, h, 2 * w, dtype=dtype)[..., ::2]


# (b, c, h, w) and a layout: one pixel, one row / column, odd sizes (halving: F.interpolate), even, channel tails,
# batch > 1; a channel slice, channels-last and a strided row of wider tensors
RESIZE_CASES = [((1, 1, 1, 1), 'contiguous'), ((1, 1, 1, 9), 'contiguous'), ((1, 1, 7, 1), 'contiguous'),
                ((1, 1, 2, 2), 'contiguous'), ((2, 3, 8, 6), 'contiguous'), ((3, 5, 7, 9), 'contiguous'),
                ((2, 3, 6, 5), 'contiguous'), ((4, 32, 32, 32), 'contiguous'), ((2, 3, 8, 6), 'slice'),
                ((2, 5, 6, 10), 'permuted'), ((3, 2, 4, 6), 'strided')]


def _resize_input(shape, layout, dtype):
    from helpers import strided_frames
    if layout == 'strided':
        return _spatial_stride(*shape, dtype)
    return strided_frames(shape[0], 1, *shape[1:], dtype, layout=layout)


def _resize_both(x, up):
    """resize2x forced to the deterministic formulation and F.interpolate: (out, input grad) each, the choices."""
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    with backend.record_choices() as seen:
        out = K.resize2x(a, up, deterministic=True)
    ref = K.resize2x_ref(b, up)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.dtype)
    return (out, *torch.autograd.grad(out, a, cot)), (ref, *torch.autograd.grad(ref, b, cot)), seen


def _assert_rounding(got, ref, dtype, what):
    """max |got - ref| within a few rounding steps of max |ref| (fp32: 4 eps; fp64: 1e-12)."""
    bound = (4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 1e-12) * ref.abs().max().item()
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    torch.testing.assert_close(got, ref, rtol=0, atol=bound, msg=lambda m: f'{what}: {m}')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=_ids)
@pytest.mark.parametrize('up', [False, True], ids=['halve', 'double'])
@pytest.mark.parametrize('case', RESIZE_CASES, ids=lambda c: f'{_ids(c[0])}-{c[1]}')
def test_resize2x_deterministic_formulation_matches_interpolate(case, up, dtype):
    shape, layout = case
    x = _resize_input(shape, layout, dtype)
    if not up and min(shape[2:]) == 1:          # an output size 0: F.interpolate's error, forced or not
        with pytest.raises(RuntimeError, match='greater than 0'):
            K.resize2x(x, up, deterministic=True)
        return
    got, ref, seen = _resize_both(x, up)
    exact = up or (shape[2] % 2 == 0 and shape[3] % 2 == 0)
    assert seen == {'resize2x': {'deterministic' if exact else 'reference'}}
    for g, r, what in zip(got, ref, ('output', 'input grad')):
        if exact:
            _assert_rounding(g, r, dtype, what)
        else:           # odd halving: F.interpolate itself
            assert torch.equal(g, r), what


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize('up', [False, True], ids=['halve', 'double'])
def test_resize2x_deterministic_half_precision(up, dtype):
    """fp16/bf16: computed in fp32 and cast once, as PyTorch's kernels: the dtype's rounding of the fp32 answer."""
    x = torch.randn(2, 5, 6, 10).to(dtype)
    got, ref, _ = _resize_both(x, up)
    _, exact, _ = _resize_both(x.float(), up)
    for g, r, e, what in zip(got, ref, exact, ('output', 'input grad')):
        assert g.dtype == r.dtype == dtype, what
        assert_close_rel(g.float(), e, TOL[dtype], what=f'{what} vs fp32')
        assert_close_rel(g.float(), r.float(), TOL[dtype], what=f'{what} vs F.interpolate')


def test_resize2x_dispatch_and_validation():
    x = torch.randn(1, 2, 4, 4)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with backend.record_choices() as seen:          # CPU: F.interpolate's backward is deterministic already
            out = K.resize2x(x, True)
        assert seen == {'resize2x': {'reference'}} and torch.equal(out, K.resize2x_ref(x, True))
    finally:
        torch.use_deterministic_algorithms(was)
    with backend.record_choices() as seen:
        K.resize2x(x, False, deterministic=False)
        with pytest.raises(RuntimeError):           # not floating: F.interpolate, and its error
            K.resize2x(x.to(torch.int64), True, deterministic=True)
    assert seen == {'resize2x': {'reference'}}
    with pytest.raises(ValueError, match='4-dim'):
        K.resize2x(torch.randn(2, 4, 4), True)
    with pytest.raises(TypeError, match='bool'):
        K.resize2x(x, 2)
    with pytest.raises(RuntimeError):              # h // 2 == 0: F.interpolate's error, forced or not
        K.resize2x(torch.randn(1, 1, 1, 4), False, deterministic=True)


def test_whole_mplumiere_same_with_the_deterministic_resizes(monkeypatch):
    """MPLumiere (fast image model on) with the deterministic resizes forced vs the default: output, input and
    parameter gradients; float64 to 1e-12, float32 within 1e-5 or at most 2x as far from the float64 answer as the
    default (some temporal gradients are ill-conditioned; measured on seeds 0-9: float64 <= 8e-14 apart, float32
    up to 5e-5 apart and then at most 1.6x the default's distance from float64)."""
    from functools import partial

    from helpers import SMALL_UNET_NAMES
    from lumiere_fast import MPLumiere
    torch.manual_seed(0)
    unet = small_unet()
    perturb_(unet, 0.3)
    lum = MPLumiere(unet, image_size=16, **SMALL_UNET_NAMES)
    assert type(lum.model.downs[1]) is fast_unet.FastEncoder and lum.model.downs[1].downsample
    video = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    time = torch.rand(1, generator=torch.Generator().manual_seed(2))
    cot = torch.randn(video.shape, generator=torch.Generator().manual_seed(7))
    default = K.resize2x
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = lum if dtype == torch.float32 else copy.deepcopy(lum).double()
        params = [p for p in model.parameters() if p.requires_grad]
        for forced in (False, True):
            monkeypatch.setattr(K, 'resize2x', partial(default, deterministic=True) if forced else default)
            v = video.to(dtype).requires_grad_()
            with backend.record_choices() as seen:
                out = model(v, time=time.to(dtype))
            assert seen['resize2x'] == {'deterministic' if forced else 'reference'}
            results[dtype, forced] = [out, *torch.autograd.grad(out, [v, *params], cot.to(dtype))]
    assert sum(bool(g.abs().sum() > 0) for g in results[torch.float32, False][2:]) >= 3
    for i, (a, b, a64, b64) in enumerate(zip(*(results[k] for k in [(torch.float32, True), (torch.float32, False),
                                                                  (torch.float64, True), (torch.float64, False)]))):
        assert_close_rel(a64, b64, 1e-12, what=f'#{i} (float64)')
        if rel_err(a, b) > TOL[torch.float32]:
            assert rel_err(a, b64) <= 2 * rel_err(b, b64) + 1e-7, f'#{i}: {rel_err(a, b64):.3g} vs {rel_err(b, b64):.3g}'


@pytest.mark.skipif(not CUDA, reason='deterministic mode on CUDA needs a CUDA GPU')
@pytest.mark.parametrize('up', [False, True], ids=['halve', 'double'])
def test_resize2x_deterministic_mode_on_gpu(up, monkeypatch):
    """On CUDA in deterministic mode the backward runs (F.interpolate's raises) and repeats bit for bit; under
    autocast the output has F.interpolate's dtype (fp32: CUDA autocast's fp32 list)."""
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    x = torch.randn(4, 64, 32, 32, device='cuda')
    cot = torch.randn((4, 64, 64, 64) if up else (4, 64, 16, 16), device='cuda')
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        grads = []
        for _ in range(2):
            a = x.clone().requires_grad_()
            with backend.record_choices() as seen:
                out = K.resize2x(a, up)
            assert seen == {'resize2x': {'deterministic'}}
            grads.append(torch.autograd.grad(out, a, cot)[0])
        assert torch.equal(*grads)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            got = K.resize2x(x.bfloat16(), up)
            ref = K.resize2x_ref(x.bfloat16(), up)
        assert got.dtype == ref.dtype == torch.float32
        _assert_rounding(got, ref, torch.float32, 'autocast output')
    finally:
        torch.use_deterministic_algorithms(was)
    b = x.clone().requires_grad_()
    ref = K.resize2x_ref(b, up)
    _assert_rounding(out, ref, torch.float32, 'output')
    _assert_rounding(grads[0], torch.autograd.grad(ref, b, cot)[0], torch.float32, 'input grad')
