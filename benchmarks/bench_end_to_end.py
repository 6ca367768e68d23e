"""End to end: an MPLumiere / Lumiere training step and forward, ours vs upstream, same weights and inputs.

The model is the original lumiere-pytorch README's KarrasUnet config (dim 8, dim_max 768, 3 channels) at a
CPU-sized image, inflated at the paper's points (passed by name, since upstream has no defaults), so both
libraries run the same network. Group names pair the two implementations; compare medians in one run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, device_or_skip, sync, upstream_or_skip

CONFIGS = {
    'cpu': dict(image_size=64, batch=1, frames=8),
    'cuda': dict(image_size=256, batch=2, frames=8),
}


def _build(impl: str, family: str, device, image_size: int):
    from denoising_diffusion_pytorch import KarrasUnet
    from lumiere_fast.lumiere import karras_unet_inflation_points
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=image_size, dim=8, channels=3, dim_max=768, dropout=0.)
    points = karras_unet_inflation_points(unet)
    names = dict(conv_module_names=points['conv'], attn_module_names=points['attn'],
                 downsample_module_names=points['downsample'], upsample_module_names=points['upsample'])
    lib = upstream_or_skip() if impl == 'upstream' else __import__('lumiere_fast')
    torch.manual_seed(1)
    model = getattr(lib, f'{family}Lumiere')(unet, image_size=image_size, unet_time_kwarg='time', **names)
    return model.to(device)


@pytest.mark.parametrize('device_name', DEVICES)
@pytest.mark.parametrize('family', ['MP', ''])
@pytest.mark.parametrize('impl', ['lumiere_fast', 'upstream'])
@pytest.mark.parametrize('phase', ['train step', 'forward'])
def bench_lumiere(benchmark, phase, device_name, family, impl):
    """train step: forward + backward into the temporal parameters + SGD step, train mode (the MP layers
    renormalise in place, as in training); forward: eval mode under no_grad."""
    device = device_or_skip(device_name)
    cfg = CONFIGS[device_name]
    model = _build(impl, family, device, cfg['image_size']).train(phase == 'train step')
    video = torch.randn(cfg['batch'], 3, cfg['frames'], cfg['image_size'], cfg['image_size'], device=device)
    time = torch.rand(cfg['batch'], device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    benchmark.group = f'{phase} {family or "non-MP"} Lumiere {device_name} {cfg}'

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(video, time=time).square().mean().backward()
        opt.step()
        sync(device)

    def forward():
        with torch.no_grad():
            model(video, time=time)
        sync(device)

    benchmark.pedantic(train_step if phase == 'train step' else forward, rounds=7, warmup_rounds=1)
