"""End to end: MPLumiere / Lumiere around a KarrasUnet, forward and training step, ours vs upstream eager vs
torch.compile(upstream), same weights and inputs, one process.

Configs (the KarrasUnet inflated at the paper's points, passed by name via
``lumiere_fast.lumiere.karras_unet_inflation_points`` since upstream has no defaults, so both libraries run the
same network):
  CUDA 'karras64': image 64, dim 192, dim_max 768, 3 channels, B=2, T=16 (a realistic size);
  CUDA 'readme':   image 256, dim 8, dim_max 768, 3 channels, B=2, T=8 (the original lumiere-pytorch README);
  CPU  'cpu-small': image 64, dim 8, dim_max 768, B=1, T=8, fp32, ours vs upstream only (a smoke-sized case).
CUDA dtypes: 'bfloat16' (torch.autocast bf16, fp32 weights) and 'float32' (no autocast, TF32 off).

Phases: 'forward': eval mode under torch.no_grad. 'train step': train mode, zero_grad + forward + backward of
a scalar loss + AdamW step over the temporal parameters (``model.parameters()``, which both libraries restrict
to the temporal modules; the KarrasUnet stays frozen). 'upstream_compiled' is ``torch.compile(upstream model)``
(default mode), 'lumiere_fast_compiled' ours under ``lumiere.compile()`` (default mode: the kernels are custom ops
in its graph), both compiled by the warm-up call, outside every measurement; the optimizer step stays eager for
all. The compiled rows are CUDA baselines (on CPU inductor compiles for minutes).

Timing and peak memory: harness.run_benchmark (CUDA events over a ring of inputs > 2 x L2; peak memory =
max_memory_allocated over one step after a reset, model, optimizer state and one input included).
"""

from __future__ import annotations

import pytest
import torch

from harness import (compile_fresh, compiled_or_skip, describe, device_or_skip, no_tf32, rounds, run_benchmark,
                      upstream_or_skip)

CONFIGS = {
    'karras64': dict(device='cuda', image_size=64, dim=192, batch=2, frames=16),
    'readme': dict(device='cuda', image_size=256, dim=8, batch=2, frames=8),
    'cpu-small': dict(device='cpu', image_size=64, dim=8, batch=1, frames=8),
}
DTYPES = {'cuda': ['bfloat16', 'float32'], 'cpu': ['float32']}
CASES = [(name, dtype) for name, cfg in CONFIGS.items() for dtype in DTYPES[cfg['device']]]
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled', 'lumiere_fast_compiled']


def build(impl: str, family: str, device, image_size: int, dim: int):
    """MPLumiere (family 'MP') or Lumiere (family '') of ``impl`` around a seeded KarrasUnet."""
    from denoising_diffusion_pytorch import KarrasUnet
    from lumiere_fast.lumiere import karras_unet_inflation_points
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=image_size, dim=dim, channels=3, dim_max=768, dropout=0.)
    points = karras_unet_inflation_points(unet)
    names = dict(conv_module_names=points['conv'], attn_module_names=points['attn'],
                 downsample_module_names=points['downsample'], upsample_module_names=points['upsample'])
    lib = upstream_or_skip() if impl.startswith('upstream') else __import__('lumiere_fast')
    torch.manual_seed(1)
    model = getattr(lib, f'{family}Lumiere')(unet, image_size=image_size, unet_time_kwarg='time', **names)
    return model.to(device)


@pytest.mark.parametrize('config, dtype_name', CASES, ids=[f'{c}-{d}' for c, d in CASES])
@pytest.mark.parametrize('family', ['MP', ''], ids=['MPLumiere', 'Lumiere'])
@pytest.mark.parametrize('phase', ['train step', 'forward'])
@pytest.mark.parametrize('impl', IMPLS)
def bench_lumiere(benchmark, impl, phase, family, config, dtype_name):
    cfg = CONFIGS[config]
    device = device_or_skip(cfg['device'])
    if impl.endswith('_compiled'):
        compiled_or_skip(device)
    dtype = getattr(torch, dtype_name)
    autocast = dtype != torch.float32
    train = phase == 'train step'
    with no_tf32(device):        # fp32 means fp32 for every impl (restored after: other files keep the defaults)
        _bench_lumiere(benchmark, impl, phase, family, config, cfg, device, dtype, autocast, train)


def _bench_lumiere(benchmark, impl, phase, family, config, cfg, device, dtype, autocast, train):
    model = build(impl, family, device, cfg['image_size'], cfg['dim']).train(train)
    run = compile_fresh(model) if impl == 'upstream_compiled' else model
    if impl == 'lumiere_fast_compiled':
        torch._dynamo.reset()
        model.compile()             # in place: the module's own call is compiled (one graph for every batch size)
    b, t, s = cfg['batch'], cfg['frames'], cfg['image_size']
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model_name = f'{family}Lumiere'
    shape = f'{config}: image {s}, dim {cfg["dim"]}, dim_max 768, B={b}, T={t}'
    benchmark.group = f'{phase} {model_name} {device.type} {str(dtype)[6:]} {shape}'
    describe(benchmark, device, dtype, shape, impl)
    benchmark.extra_info.update(model=model_name, phase=phase, config=config,
                                temporal_params=sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(2)

    def make_inputs():
        video = torch.randn(b, 3, t, s, s, generator=gen).to(device)
        return video, torch.rand(b, generator=gen).to(device)

    def train_step(video, time):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = run(video, time=time)
        out.float().square().mean().backward()
        opt.step()

    def forward(video, time):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return run(video, time=time)

    run_benchmark(benchmark, train_step if train else forward, make_inputs, device,
                  n_rounds=rounds(20, 3, device), warmup=3 if device.type == 'cuda' else 1)
