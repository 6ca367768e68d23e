"""Compatibility sweep against lumiere-pytorch 0.0.24 (issues 11 and 17): random small KarrasUnets and random
inflation name sets — any subset of the four kinds, any order, a module in several lists or twice in one,
per-frame conditioning, class labels, resample points whose skips cross temporal levels, upstream's own temporal
classes as ``*_klass`` (its ``batch_dim`` contract) — on both families.

Where upstream builds and runs, ours builds, runs and gives its numbers (float64: outputs, input and temporal
gradients to 1e-8). Where upstream raises, ours raises ValueError/TypeError with a message, or runs where the
README's differences table says why (``_UPSTREAM_CRASHES``).

Bounded for CI (``LUMIERE_SWEEP_EXAMPLES``, default 40); hypothesis prints the failing example and a
``@reproduce_failure`` blob, and ``--hypothesis-seed=N`` replays a run.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import lumiere_fast as ours
from helpers import rel_err

upstream = pytest.importorskip('lumiere_pytorch', reason='the sweep needs lumiere-pytorch==0.0.24 (the test extra)')
hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from test_dropin import _upstream_conditional  # noqa: E402

EXAMPLES = int(os.environ.get('LUMIERE_SWEEP_EXAMPLES', '40'))

# Upstream failures that the README's differences table lists as fixed here: (what upstream raises, the row).
_UPSTREAM_CRASHES = [
    (ValueError, r'not enough values to unpack', 'an empty name list crashes upstream; any subset works here'),
    (AssertionError, r'^$', 'T=1 with temporal downsamples: upstream asserts divisibility; images run here'),
]


@st.composite
def configs(draw):
    num_downsamples = draw(st.integers(1, 2))
    image_size = draw(st.sampled_from([8, 16])) if num_downsamples == 1 else 16
    unet_kw = dict(image_size=image_size, dim=draw(st.sampled_from([4, 8])), channels=3,
                   dim_max=draw(st.sampled_from([8, 16])), num_downsamples=num_downsamples,
                   num_blocks_per_stage=draw(st.integers(1, 2)), attn_res=(image_size // 2 ** num_downsamples,),
                   dropout=0., num_classes=draw(st.sampled_from([None, None, 4])))
    per_stage = unet_kw['num_blocks_per_stage']                 # the KarrasUnet's block counts
    n_down, n_up = per_stage + num_downsamples * (1 + per_stage), per_stage + 1 + num_downsamples * (per_stage + 2)
    blocks = [f'downs.{i}' for i in range(n_down)] + ['mids.0', 'mids.1'] + [f'ups.{i}' for i in range(n_up)]
    # mostly every kind present (upstream crashes on an empty list, so only then are there numbers to compare)
    any_empty = draw(st.integers(0, 3)) == 0
    pick = st.lists(st.sampled_from(blocks), min_size=0 if any_empty else 1, max_size=3)
    resample = draw(st.integers(0 if any_empty else 1, 2))
    down = draw(st.lists(st.sampled_from(blocks), min_size=resample, max_size=resample))
    up = draw(st.lists(st.sampled_from(blocks), min_size=resample, max_size=resample))
    if draw(st.integers(0, 9)) == 0:                      # now and then unequal counts: both must refuse
        up = up + [draw(st.sampled_from(blocks))]
    names = dict(conv_module_names=draw(pick), attn_module_names=draw(pick), downsample_module_names=down,
                 upsample_module_names=up)
    factor = 2 ** len(down)
    frames = draw(st.sampled_from([factor, 2 * factor, 1, factor + 1 if factor > 1 else 3]))
    return dict(family=draw(st.sampled_from(['', 'MP'])), upstream_klasses=draw(st.integers(0, 3)) == 0,
                unet_kw=unet_kw, names=names, frames=frames,
                batch=draw(st.integers(1, 2)), per_frame_time=draw(st.booleans()),
                per_frame_labels=draw(st.booleans()), train=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _klasses(family, use_upstream):
    """Upstream's own temporal classes as ``*_klass`` (their contract: ``batch_dim`` set per call), or none."""
    if not use_upstream:
        return {}
    return {f'{kind}_klass': getattr(upstream, f'{family}{name}') for kind, name in (
        ('conv', 'ConvolutionInflationBlock'), ('attn', 'AttentionInflationBlock'),
        ('downsample', 'TemporalDownsample'), ('upsample', 'TemporalUpsample'))}


def _build_upstream(family, unet, names, conditional):
    kwargs = dict(image_size=unet.image_size, unet_time_kwarg='time', attn_inflation_kwargs=dict(heads=2, dim_head=4),
                  **names)
    if conditional:
        return _upstream_conditional(family, unet, **kwargs)
    return getattr(upstream, f'{family}Lumiere')(unet, **kwargs)


def _inputs(cfg, conditional):
    g = torch.Generator().manual_seed(cfg['seed'])
    b, t, size = cfg['batch'], cfg['frames'], cfg['unet_kw']['image_size']
    video = torch.randn(b, 3, t, size, size, generator=g)
    cond = dict(time=torch.rand(b * t if cfg['per_frame_time'] else b, generator=g))
    if conditional:
        cond['class_labels'] = torch.randint(0, 4, (b * t if cfg['per_frame_labels'] else b,), generator=g)
    return video, cond


def _dtype(conditional):
    """float64 (the same math, to 1e-8), but a class-conditional KarrasUnet casts its one-hot labels to float32
    and so runs in float32 only (then 1e-4: the U-Net amplifies float32 rounding, see test_parity)."""
    return torch.float32 if conditional else torch.float64


def _run(model, video, cond, train):
    model.train(train)
    dtype = next(model.parameters()).dtype
    v = video.clone().to(dtype).requires_grad_(True)
    out = model(v, **{k: (x.to(dtype) if x.is_floating_point() else x) for k, x in cond.items()})
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    return [out, *torch.autograd.grad(out, [v, *model.parameters()], cot, allow_unused=True)]


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          phases=[Phase.explicit, Phase.generate],           # no shrinking: a failing draw is printed as drawn
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs())
def test_compatibility_sweep(cfg):
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(cfg['seed'])
    unet = KarrasUnet(**cfg['unet_kw'])
    conditional = cfg['unet_kw']['num_classes'] is not None
    family, names = cfg['family'], cfg['names']
    klasses = _klasses(family, cfg['upstream_klasses'])
    video, cond = _inputs(cfg, conditional)

    try:
        u = _build_upstream(family, unet, dict(names, **klasses), conditional)
        with torch.no_grad():
            for p in u.parameters():                       # off the zero-init, so every temporal module counts
                p.add_(torch.randn_like(p) * 0.3)
        u = u.to(_dtype(conditional))
        expected = _run(u, video, cond, cfg['train'])
    except Exception as err:  # noqa: BLE001 - whatever upstream raises decides what ours may do
        upstream_error = err
    else:
        upstream_error = None

    def build_and_run_ours():
        o = getattr(ours, f'{family}Lumiere')(unet, image_size=unet.image_size, unet_time_kwarg='time',
                                                 attn_inflation_kwargs=dict(heads=2, dim_head=4), **names,
                                                 **klasses)
        o = o.to(_dtype(conditional))
        if upstream_error is None:
            o.load_state_dict(u.state_dict(), strict=True)
        return o, _run(o, video, cond, cfg['train'])

    if upstream_error is None:
        o, got = build_and_run_ours()
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            what = 'output' if i == 0 else f'gradient #{i}'
            if b is None:
                assert a is None or a.abs().max() == 0, f'{what}: ours has a gradient upstream does not'
                continue
            assert a is not None, f'{what}: no gradient'
            tol = 1e-4 if conditional else 1e-8
            assert rel_err(a, b) <= tol or (a - b).norm() <= tol * 1e-2 * expected[1].norm(), \
                f'{what}: relative error {rel_err(a, b):.3g} vs upstream'
        return

    known = [why for klass, pattern, why in _UPSTREAM_CRASHES
             if isinstance(upstream_error, klass) and re.search(pattern, str(upstream_error))]
    try:
        build_and_run_ours()
    except (ValueError, TypeError) as err:
        assert str(err), 'ours raised without a message'
        return
    assert known, (f'upstream raised {type(upstream_error).__name__}: {upstream_error!s:.300}; ours ran, and the '
                   f'README lists no such difference')
