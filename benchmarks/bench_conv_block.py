"""Each temporal conv inflation block alone (``ops/conv_block.py``), ours vs upstream eager vs
torch.compile(upstream), same weights and input.

Phases, shapes (a 64x64 KarrasUnet's conv levels on CUDA, bf16 under autocast, B=2, T=16; C=32 at 32x32, fp32,
B=2, T=8 on CPU), timing and bytes moved: harness.run_frames_module_case.
FLOPs: the temporal GEMMs only, 2 N C (C k) for the k-tap conv1d + 2 N C C for the 1x1 projection, N = B T H W
(the spatial 3x3 conv2d is not counted: issue 3's definition). On CUDA the blocks with C >= 256 also record
cuBLAS's bf16 rate on the same (M, N, K) as the conv1d GEMM.
"""

from __future__ import annotations

import pytest
import torch

from harness import DEVICES, KARRAS_64_LEVELS, median_of, median_seconds, run_frames_module_case

BLOCKS = ['MPConvolutionInflationBlock', 'ConvolutionInflationBlock']
SHAPES = {'cpu': [(32, 32)], 'cuda': KARRAS_64_LEVELS}     # per device: (channels, height=width)
BATCH, FRAMES = {'cpu': 2, 'cuda': 2}, {'cpu': 8, 'cuda': 16}
CONV1D_KERNEL = 3           # the blocks' default temporal kernel size
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled']
PHASES = ['forward', 'forward+backward']
CASES = [(d, block, c, hw) for d in DEVICES for block in BLOCKS for c, hw in SHAPES[d]]


@pytest.fixture(scope='session')
def cublas_tflops():
    """cuBLAS bf16 GEMM rate (TFLOP/s) of an (M, K) @ (K, N) product, measured once per session and shape."""
    cache: dict = {}

    def rate(m: int, n: int, k: int) -> float:
        if (m, n, k) not in cache:
            a = torch.randn(m, k, device='cuda', dtype=torch.bfloat16)
            b = torch.randn(k, n, device='cuda', dtype=torch.bfloat16)
            cache[m, n, k] = 2 * m * n * k / median_seconds(lambda: torch.mm(a, b), a.device, iters=20) / 1e12
        return cache[m, n, k]

    return rate


def _temporal_gemm_flops(c: int, n: int) -> tuple[int, tuple[int, int, int]]:
    """Forward FLOPs of a conv block's temporal GEMMs (module docstring) and the conv1d GEMM's (M, N, K)."""
    m, k = c, c * CONV1D_KERNEL
    return 2 * m * n * k + 2 * c * c * n, (m, n, k)


@pytest.mark.parametrize('device_name, block, c, hw', CASES,
                         ids=[f'{d}-{block}-C{c}-{hw}x{hw}' for d, block, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_block(benchmark, cublas_tflops, device_rates, impl, phase, device_name, block, c, hw):
    b, t = BATCH[device_name], FRAMES[device_name]
    flops, (m, n, k) = _temporal_gemm_flops(c, b * t * hw * hw)
    case = run_frames_module_case(benchmark, device_rates, impl, phase, device_name, block, c, hw, b, t, flops)
    if median_of(benchmark) and case['device'].type == 'cuda' and c >= 256:
        benchmark.extra_info['cublas_bf16_TFLOPs_same_MNK'] = round(cublas_tflops(m, n, k), 1)
        benchmark.extra_info['gemm_MNK'] = [m, n, k]
