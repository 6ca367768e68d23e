"""The frozen image model alone (issue 15): denoising-diffusion-pytorch's KarrasUnet, upstream vs accelerated
(``lumiere_fast.modules.karras.accelerate_karras_unet``) vs ``torch.compile(upstream)``, same weights and inputs.

Phases: 'forward' (eval, no_grad) and 'train step' (train mode, forward + backward into the input only: the frozen
image model inside Lumiere needs input gradients, never weight gradients). 'lumiere_fast_checkpoint' is the
accelerated model with ``checkpoint=True`` (train step; on CUDA its peak memory is the number to read).

Configs: CUDA 'karras64' (image 64, dim 192, dim_max 768, 4 blocks a stage, attention at 16 and 8; B*T = 32
frames, bf16 autocast), CPU 'cpu-mid' (image 32, dim 32, dim_max 256, 2 blocks a stage, attention at 8; 8 frames,
fp32). Prediction (CPU): the convs are unchanged, so the gain is the per-call weight normalisation (about 4 passes
over every weight, twice that in train mode with the in-place renormalisation), the residual clone and the
elementwise passes folded away (MP-SiLU divisor, MP-add weights, MPCat scaling): ~1.3-2x on a mid-size config
whose weights are comparable to its activations.

``python benchmarks/bench_karras.py`` runs the CPU side-by-side measurement (median of alternating runs in one
process) and the split of an MPLumiere step into image model vs temporal layers ("image model only": the same
wrapper with each temporal module reduced to its frame bookkeeping). Last run, 2026-12-02, 1 torch thread on a
2-core VM shared with other jobs (medians of 7 / 5 alternating rounds), no GPU lent:

    image model forward   : upstream    147.8 ms   accelerated    103.5 ms   ratio 1.43x
    image model train step: upstream    258.0 ms   accelerated    205.2 ms   ratio 1.26x
    MPLumiere train step (B=1, T=8, paper points): ours with upstream's image model 383.8 ms,
        ours + fast image model 292.9 ms (1.31x); image model share 74% -> 57% of the step
        (image model alone 282.5 -> 165.8 ms)

The convs (mkldnn) are ~85% of the accelerated forward on CPU, so the CPU ratio is capped there; GPU rows
(karras64, bf16: step >= 1.5x eager, >= 1.2x torch.compile(upstream), peak memory <= 0.7x with checkpointing)
are unmeasured.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import pytest
import torch

try:
    from harness import compile_fresh, compiled_or_skip, describe, device_or_skip, rounds, run_benchmark
except ImportError:         # run as a script from another folder
    sys.path.insert(0, __file__.rsplit('/', 1)[0])
    from harness import compile_fresh, compiled_or_skip, describe, device_or_skip, rounds, run_benchmark

CONFIGS = {
    'cpu-mid': dict(device='cpu', image_size=32, dim=32, dim_max=256, num_blocks_per_stage=2, attn_res=(8,),
                    frames=8, dtype='float32'),
    'karras64': dict(device='cuda', image_size=64, dim=192, dim_max=768, num_blocks_per_stage=4, attn_res=(16, 8),
                     frames=32, dtype='bfloat16'),
}
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled', 'lumiere_fast_checkpoint']
PHASES = ['forward', 'train step']


def build_unet(cfg: dict):
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=cfg['image_size'], dim=cfg['dim'], dim_max=cfg['dim_max'], channels=3,
                      num_blocks_per_stage=cfg['num_blocks_per_stage'], attn_res=cfg['attn_res'], dropout=0.)
    return unet.requires_grad_(False)


def make_impl(impl: str, unet):
    from lumiere_fast.modules.karras import accelerate_karras_unet
    if impl == 'upstream':
        return unet
    if impl == 'upstream_compiled':
        return compile_fresh(unet)
    return accelerate_karras_unet(copy.deepcopy(unet), checkpoint=impl == 'lumiere_fast_checkpoint')


def _autocast(device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')


def steps(model, x0: torch.Tensor, time_: torch.Tensor, phase: str, dtype: str):
    """(step, make_inputs): forward under no_grad, or forward + backward of a scalar loss into the input."""
    device = x0.device

    def forward(x):
        with torch.no_grad(), _autocast(device, dtype):
            return model(x, time_)

    def train_step(x):
        with _autocast(device, dtype):
            out = model(x, time_)
        out.float().square().mean().backward()
        return x.grad

    if phase == 'forward':
        return forward, lambda: (x0.clone(),)
    return train_step, lambda: (x0.clone().requires_grad_(),)


@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('config', list(CONFIGS))
def bench_karras_unet(benchmark, config, impl, phase):
    cfg = CONFIGS[config]
    device = device_or_skip(cfg['device'])
    if impl == 'upstream_compiled':
        compiled_or_skip(device)
    if impl == 'lumiere_fast_checkpoint' and phase == 'forward':
        pytest.skip('checkpointing changes nothing without a backward')
    unet = build_unet(cfg).to(device)
    model = make_impl(impl, unet)
    model.train(phase == 'train step')
    x0 = torch.randn(cfg['frames'], 3, cfg['image_size'], cfg['image_size'], device=device)
    t0 = torch.rand(cfg['frames'], device=device)
    step, make_inputs = steps(model, x0, t0, phase, cfg['dtype'])
    describe(benchmark, device, getattr(torch, cfg['dtype']), f"{config} frames={cfg['frames']}", impl)
    benchmark.extra_info.update(config=config, phase=phase)
    run_benchmark(benchmark, step, make_inputs, device, n_rounds=rounds(cuda=20, cpu=3, device=device))


# ---------------------------------------------------------------------------------------------- script

def alternating_medians(fns: dict, rounds_: int = 7) -> dict:
    """Median wall time of each fn, calls alternating (so machine load drifts hit every fn alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds_):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _null_temporal(lum):
    """Replace the temporal modules' forwards by their frame bookkeeping only (identity; every other frame for a
    downsample, each frame twice for an upsample): what is left of a step is the image model's time."""
    for group, kind in ((lum.convs, 'id'), (lum.attns, 'id'), (lum.downsamples, 'down'), (lum.upsamples, 'up')):
        for m in group:
            def forward(x, batch_size=None, _kind=kind):
                if _kind == 'id':
                    return x
                t = x.shape[0] // batch_size
                frames = x.view(batch_size, t, *x.shape[1:])
                frames = frames[:, ::2] if _kind == 'down' else frames.repeat_interleave(2, dim=1)
                return frames.reshape(-1, *x.shape[1:])
            m.forward = forward
    return lum


def main():
    torch.manual_seed(0)
    cfg = CONFIGS['cpu-mid']
    unet = build_unet(cfg)
    print(f"cpu-mid KarrasUnet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg['frames']} frames of {cfg['image_size']}x{cfg['image_size']}, fp32, torch threads "
          f"{torch.get_num_threads()}")
    fast = make_impl('lumiere_fast', unet)
    x0, t0 = torch.randn(cfg['frames'], 3, cfg['image_size'], cfg['image_size']), torch.rand(cfg['frames'])
    for phase in PHASES:
        fns = {}
        for name, model in (('upstream', unet), ('lumiere_fast', fast)):
            model.train(phase == 'train step')
            step, make_inputs = steps(model, x0, t0, phase, 'float32')
            fns[name] = (lambda s=step, mk=make_inputs: s(*mk()))
        med = alternating_medians(fns)
        print(f"  image model {phase:10s}: upstream {med['upstream'] * 1e3:8.1f} ms   accelerated "
              f"{med['lumiere_fast'] * 1e3:8.1f} ms   ratio {med['upstream'] / med['lumiere_fast']:.2f}x")

    # MPLumiere at the paper's points (B=1, T=8): the step with and without the fast image model, and its split
    from lumiere_fast import MPLumiere
    from lumiere_fast.lumiere import karras_unet_inflation_points
    from lumiere_fast.modules.karras import accelerate_karras_unet
    pts = karras_unet_inflation_points(unet)
    lum = MPLumiere(unet, image_size=cfg['image_size'], conv_module_names=pts['conv'], attn_module_names=pts['attn'],
                    downsample_module_names=pts['downsample'], upsample_module_names=pts['upsample'])
    lum_fast = copy.deepcopy(lum)
    accelerate_karras_unet(lum_fast.model)
    video, vt = torch.randn(1, 3, 8, cfg['image_size'], cfg['image_size']), torch.rand(1)

    def lumiere_step(m):
        def run():
            v = video.clone().requires_grad_()
            out = m(v, time=vt)
            out.square().mean().backward()
        return run

    variants = {'ours (image model upstream)': lum, 'ours + fast image model': lum_fast,
                'image model only (upstream)': _null_temporal(copy.deepcopy(lum)),
                'image model only (fast)': _null_temporal(copy.deepcopy(lum_fast))}
    for m in variants.values():
        m.train()
    med = alternating_medians({k: lumiere_step(m) for k, m in variants.items()}, rounds_=5)
    print('  MPLumiere train step (B=1, T=8; backward into the video and the temporal parameters):')
    for k, v in med.items():
        print(f'    {k:30s} {v * 1e3:8.1f} ms')
    for tag, full, image in (('upstream image model', 'ours (image model upstream)', 'image model only (upstream)'),
                             ('fast image model', 'ours + fast image model', 'image model only (fast)')):
        share = med[image] / med[full]
        print(f'    split with the {tag}: image model {share:.0%}, temporal layers {1 - share:.0%}')
    print(f"    step ratio {med['ours (image model upstream)'] / med['ours + fast image model']:.2f}x")


if __name__ == '__main__':
    main()
