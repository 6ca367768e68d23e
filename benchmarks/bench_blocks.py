"""Each temporal module alone, forward + backward, ours vs upstream, same weights and input.

CPU shapes are a 64x64 KarrasUnet's levels scaled down to CPU size; CUDA shapes are the issue's bf16 shapes
of a 64x64 KarrasUnet (dim 192, dim_max 768), B=2, T=16.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, device_or_skip, sync, upstream_or_skip

BLOCKS = ['MPConvolutionInflationBlock', 'ConvolutionInflationBlock', 'MPAttentionInflationBlock',
          'AttentionInflationBlock', 'MPTemporalDownsample', 'MPTemporalUpsample', 'TemporalDownsample',
          'TemporalUpsample']
SHAPES = {  # (channels, height=width)
    'cpu': {'conv': (32, 32), 'attn': (64, 8), 'resample': (32, 32)},
    'cuda': {'conv': (192, 64), 'attn': (768, 8), 'resample': (384, 32)},
}
BATCH, FRAMES = {'cpu': 2, 'cuda': 2}, {'cpu': 8, 'cuda': 16}


@pytest.mark.parametrize('device_name', DEVICES)
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('impl', ['lumiere_fast', 'upstream'])
def bench_block_fwd_bwd(benchmark, device_name, block, impl):
    device = device_or_skip(device_name)
    kind = 'attn' if 'Attention' in block else 'conv' if 'Convolution' in block else 'resample'
    c, hw = SHAPES[device_name][kind]
    lib = upstream_or_skip() if impl == 'upstream' else __import__('lumiere_fast')
    torch.manual_seed(0)
    module = getattr(lib, block)(dim=c).to(device).train()
    module.batch_dim = BATCH[device_name]
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x = torch.randn(BATCH[device_name] * FRAMES[device_name], c, hw, hw, device=device, requires_grad=True)
    benchmark.group = f'{block} fwd+bwd {device_name} C={c} {hw}x{hw} B={BATCH[device_name]} T={FRAMES[device_name]}'

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
            out = module(x)
        out.float().square().mean().backward()
        sync(device)

    benchmark.pedantic(step, rounds=15, warmup_rounds=2)
