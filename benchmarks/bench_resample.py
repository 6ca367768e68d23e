"""Each temporal down/upsample module alone (``ops/resample.py``), ours vs upstream eager vs
torch.compile(upstream), same weights and input.

Phases, shapes (a 64x64 KarrasUnet's conv levels on CUDA, bf16 under autocast, B=2, T=16; C=32 at 32x32, fp32,
B=2, T=8 on CPU), timing and bytes moved: harness.run_frames_module_case.
FLOPs: the k=3 conv1d, 2 C C 3 B H W T_out (downsample) / T_in (upsample).

Prediction for the GEMM tiles (kernels/resample.py, bf16, B=2, T=16 on an H100: 3.35 TB/s HBM, ~790 TFLOP/s
dense bf16; the L2 -> SM rate is assumed ~7 TB/s, not measured here). Each output frame is a GEMM of
M = C (out channels), N = H W (pixels), K = 3 C (tap, in channel). A BM x BN x 64 tile reads BM x 64 weights and
64 x BN inputs per k-step for 2 BM BN 64 FLOPs: BM BN / (BM + BN) FLOP per byte, 32 at 64x64, 64 at 128x128; over
the whole op the inputs are re-read from L2 once per out-channel tile (C / BM times) and the packed weight once
per pixel tile. MMA fill = the fraction of a tile's rows and columns inside (C, H W); programs vs 132 SMs.

    MPTemporalDownsample / TemporalDownsample (T_out = 8, 16 output frames):
    C    HxW    GFLOP  HBM MB  HBM us  MMA us | 64x64x64: fill, programs, L2->SM MB | 128x128x64: same
    192  64x64  14.5   75.7    22.6    18.3   | 100%  3072   453 (~65 us at 7 TB/s) |  75%  1024  264 (~38 us)
    384  32x32  14.5   38.6    11.5    18.3   | 100%  1536   453                     | 100%   384  226
    768  16x16  14.5   22.4     6.7    18.3   | 100%   768   453                     | 100%   192  226
    768  8x8     3.6    8.3     2.5     4.6   | 100%   192   113                     |  50%    96   85
    MPTemporalUpsample (3 taps on 64 interpolated output frames; TemporalUpsample has 1.5 live taps a frame):
    192  64x64  58.0  151.2    45.1    73.4   | 100% 12288  1812 (~260 us)           |  75%  4096 1057 (~150 us)
    384  32x32  58.0   76.4    22.8    73.4   | 100%  6144  1812                     | 100%  1536  906
    768  16x16  58.0   41.3    12.3    73.4   | 100%  3072  1812                     | 100%   768  906
    768  8x8    14.5   13.0     3.9    18.3   | 100%   768   453                     |  50%   384  340

So 64x64 tiles are bound by L2 -> SM traffic (~3x the HBM/MMA roofline at every level), 128x128 halves it and is
the tile to beat from 16x16 up; at 8x8 (H W = 64) a 128-pixel tile is half masked, where the 128x64 config
(BLOCK_CO=128, BLOCK_P=64) keeps full fill with 1.5x the 64x64 intensity: the autotune key names the pixel
count P so each level picks its own. Unmeasured: no GPU in the session that wrote this.
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
