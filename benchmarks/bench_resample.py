"""Each temporal down/upsample module alone (``ops/resample.py``), ours vs upstream eager vs
torch.compile(upstream), same weights and input.

Phases, shapes (a 64x64 KarrasUnet's conv levels on CUDA, bf16 under autocast, B=2, T=16; C=32 at 32x32, fp32,
B=2, T=8 on CPU), timing and bytes moved: harness.run_frames_module_case.
FLOPs: the k=3 conv1d, 2 C C 3 B H W T_out (downsample) / T_in (upsample).
"""

from __future__ import annotations

import pytest

from harness import DEVICES, KARRAS_64_LEVELS, run_frames_module_case

BLOCKS = ['MPTemporalDownsample', 'MPTemporalUpsample', 'TemporalDownsample', 'TemporalUpsample']
SHAPES = {'cpu': [(32, 32)], 'cuda': KARRAS_64_LEVELS}     # per device: (channels, height=width)
BATCH, FRAMES = {'cpu': 2, 'cuda': 2}, {'cpu': 8, 'cuda': 16}
CONV1D_KERNEL = 3
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled']
PHASES = ['forward', 'forward+backward']
CASES = [(d, block, c, hw) for d in DEVICES for block in BLOCKS for c, hw in SHAPES[d]]


def _resample_flops(block: str, c: int, b: int, t: int, hw: int) -> int:
    t_counted = (t + 1) // 2 if 'Down' in block else t
    return 2 * c * c * CONV1D_KERNEL * b * hw * hw * t_counted


@pytest.mark.parametrize('device_name, block, c, hw', CASES,
                         ids=[f'{d}-{block}-C{c}-{hw}x{hw}' for d, block, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_block(benchmark, device_rates, impl, phase, device_name, block, c, hw):
    b, t = BATCH[device_name], FRAMES[device_name]
    run_frames_module_case(benchmark, device_rates, impl, phase, device_name, block, c, hw, b, t,
                           _resample_flops(block, c, b, t, hw))
