"""Each temporal module alone, ours vs upstream eager vs torch.compile(upstream), same weights and input.

Phases: 'forward' (eval, no_grad) and 'forward+backward' (train; backward of a scalar loss into the input and
every parameter). CPU shapes are a 64x64 KarrasUnet's levels scaled down to CPU size, fp32; CUDA shapes are
issue 3's bf16-autocast shapes of a 64x64 KarrasUnet (dim 192, dim_max 768), B=2, T=16: the conv blocks and
the temporal down/upsamples at every conv level (C=192 at 64x64, 384 at 32x32, 768 at 16x16 and 8x8), the
attention blocks at the 8x8 level.

extra_info on CUDA: peak memory of one step (``torch.cuda.max_memory_allocated`` after a reset, and the part
above what was allocated before the step), and for the conv blocks with C >= 256 the achieved TFLOP/s of the
temporal GEMMs next to cuBLAS's bf16 rate on the same M/N/K.
"""

from __future__ import annotations


import pytest
import torch

from conftest import DEVICES, device_or_skip, median_seconds, sync, upstream_or_skip

BLOCKS = ['MPConvolutionInflationBlock', 'ConvolutionInflationBlock', 'MPAttentionInflationBlock',
          'AttentionInflationBlock', 'MPTemporalDownsample', 'MPTemporalUpsample', 'TemporalDownsample',
          'TemporalUpsample']
KARRAS_64_LEVELS = [(192, 64), (384, 32), (768, 16), (768, 8)]    # (channels, height=width)
SHAPES = {  # per device and block kind: list of (channels, height=width)
    'cpu': {'conv': [(32, 32)], 'attn': [(64, 8)], 'resample': [(32, 32)]},
    'cuda': {'conv': KARRAS_64_LEVELS, 'attn': [(768, 8)], 'resample': KARRAS_64_LEVELS},
}
BATCH, FRAMES = {'cpu': 2, 'cuda': 2}, {'cpu': 8, 'cuda': 16}
CONV1D_KERNEL = 3           # the blocks' default temporal kernel size
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled']
PHASES = ['forward', 'forward+backward']


def _kind(block: str) -> str:
    return 'attn' if 'Attention' in block else 'conv' if 'Convolution' in block else 'resample'


CASES = [(d, block, c, hw) for d in DEVICES for block in BLOCKS for c, hw in SHAPES[d][_kind(block)]]


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
    """Forward FLOPs of a conv block's temporal GEMMs: the k-tap conv1d as an (M=C, K=C*k) @ (K, N=B*T*H*W)
    GEMM plus the 1x1 projection (2*C*C*N). The spatial 3x3 conv2d is not counted (issue 3's definition)."""
    m, k = c, c * CONV1D_KERNEL
    return 2 * m * n * k + 2 * c * c * n, (m, n, k)


@pytest.mark.parametrize('device_name, block, c, hw', CASES,
                         ids=[f'{d}-{block}-C{c}-{hw}x{hw}' for d, block, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_block(benchmark, cublas_tflops, impl, phase, device_name, block, c, hw):
    device = device_or_skip(device_name)
    if impl == 'upstream_compiled' and device.type != 'cuda':
        pytest.skip('torch.compile(upstream) is a CUDA baseline: on CPU inductor needs a C++ toolchain and '
                    'compiles for minutes, for no number the issue asks for')
    lib = upstream_or_skip() if impl.startswith('upstream') else __import__('lumiere_fast')
    b, t = BATCH[device_name], FRAMES[device_name]
    torch.manual_seed(0)
    module = getattr(lib, block)(dim=c).to(device).train(phase == 'forward+backward')
    module.batch_dim = b
    run = torch.compile(module) if impl == 'upstream_compiled' else module
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x = torch.randn(b * t, c, hw, hw, device=device, requires_grad=phase == 'forward+backward')
    benchmark.group = f'{block} {phase} {device_name} C={c} {hw}x{hw} B={b} T={t}'

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
            run(x)
        sync(device)

    def forward_backward():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
            out = run(x)
        out.float().square().mean().backward()
        sync(device)

    step = forward if phase == 'forward' else forward_backward
    if device.type == 'cuda':
        step()                      # compile / autotune outside the memory measurement
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info['peak_mem_MiB'] = round(peak / 2 ** 20, 1)
        benchmark.extra_info['peak_above_start_MiB'] = round((peak - before) / 2 ** 20, 1)

    benchmark.pedantic(step, rounds=15, warmup_rounds=2)

    if benchmark.stats is not None and device.type == 'cuda' and _kind(block) == 'conv' and c >= 256:
        flops, (m, n, k) = _temporal_gemm_flops(c, b * t * hw * hw)
        if phase == 'forward+backward':
            flops *= 3              # backward: a data-gradient and a weight-gradient GEMM of the same size each
        benchmark.extra_info['temporal_gemm_TFLOPs'] = round(flops / benchmark.stats.stats.median / 1e12, 1)
        benchmark.extra_info['cublas_bf16_TFLOPs_same_MNK'] = round(cublas_tflops(m, n, k), 1)
        benchmark.extra_info['gemm_MNK'] = [m, n, k]
