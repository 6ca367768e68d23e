"""Each temporal conv / resample module alone, ours vs upstream eager vs torch.compile(upstream), same weights
and input (the attention blocks are in bench_attention.py).

Phases: 'forward' (eval, no_grad) and 'forward+backward' (train; backward of a scalar loss into the input and
every parameter). CPU shapes are a 64x64 KarrasUnet's levels scaled down to CPU size, fp32; CUDA shapes are
issue 3's shapes of a 64x64 KarrasUnet (dim 192, dim_max 768), B=2, T=16, bf16 activations under bf16
autocast (fp32 weights): the conv blocks and the temporal down/upsamples at every conv level (C=192 at 64x64,
384 at 32x32, 768 at 16x16 and 8x8).

Timing and peak memory: conftest.run_benchmark. Rates (conftest.record_rates), from the shapes:
  bytes: forward |x| + |y|; forward+backward adds reading dy and x and writing dx: 3 |x| + 2 |y| (|.| in bytes,
         parameters not counted);
  flops: conv blocks: the temporal GEMMs only, 2 N C (C k) for the k-tap conv1d + 2 N C C for the 1x1
         projection, N = B T H W (the spatial 3x3 conv2d is not counted: issue 3's definition); resample: the
         k=3 conv1d, 2 C C 3 B H W T_out (downsample) / T_in (upsample); forward+backward: 3x forward (a data-
         and a weight-gradient GEMM of the forward's size each).
On CUDA the conv blocks with C >= 256 also record cuBLAS's bf16 rate on the same (M, N, K) as the conv1d GEMM.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (DEVICES, compile_fresh, compiled_or_skip, describe, device_or_skip, frames_module_steps,
                      median_of, median_seconds, record_rates, rounds, run_benchmark, upstream_or_skip)

BLOCKS = ['MPConvolutionInflationBlock', 'ConvolutionInflationBlock', 'MPTemporalDownsample', 'MPTemporalUpsample',
          'TemporalDownsample', 'TemporalUpsample']
KARRAS_64_LEVELS = [(192, 64), (384, 32), (768, 16), (768, 8)]    # (channels, height=width)
SHAPES = {  # per device and block kind: list of (channels, height=width)
    'cpu': {'conv': [(32, 32)], 'resample': [(32, 32)]},
    'cuda': {'conv': KARRAS_64_LEVELS, 'resample': KARRAS_64_LEVELS},
}
BATCH, FRAMES = {'cpu': 2, 'cuda': 2}, {'cpu': 8, 'cuda': 16}
CONV1D_KERNEL = 3           # the blocks' default temporal kernel size
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled']
PHASES = ['forward', 'forward+backward']


def _kind(block: str) -> str:
    return 'conv' if 'Convolution' in block else 'resample'


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
    """Forward FLOPs of a conv block's temporal GEMMs (module docstring) and the conv1d GEMM's (M, N, K)."""
    m, k = c, c * CONV1D_KERNEL
    return 2 * m * n * k + 2 * c * c * n, (m, n, k)


def _resample_flops(block: str, c: int, b: int, t: int, hw: int) -> int:
    t_counted = (t + 1) // 2 if 'Down' in block else t
    return 2 * c * c * CONV1D_KERNEL * b * hw * hw * t_counted


@pytest.mark.parametrize('device_name, block, c, hw', CASES,
                         ids=[f'{d}-{block}-C{c}-{hw}x{hw}' for d, block, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_block(benchmark, cublas_tflops, device_rates, impl, phase, device_name, block, c, hw):
    device = device_or_skip(device_name)
    if impl == 'upstream_compiled':
        compiled_or_skip(device)
    lib = upstream_or_skip() if impl.startswith('upstream') else __import__('lumiere_fast')
    b, t = BATCH[device_name], FRAMES[device_name]
    train = phase == 'forward+backward'
    torch.manual_seed(0)
    module = getattr(lib, block)(dim=c).to(device).train(train)
    module.batch_dim = b
    run = compile_fresh(module) if impl == 'upstream_compiled' else module
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x0 = torch.randn(b * t, c, hw, hw, device=device, dtype=dtype)
    benchmark.group = f'{block} {phase} {device_name} {str(dtype)[6:]} C={c} {hw}x{hw} B={b} T={t}'
    describe(benchmark, device, dtype, f'C={c} {hw}x{hw} B={b} T={t}', impl)

    step, make_inputs, forward = frames_module_steps(run, x0, device, dtype, train)
    run_benchmark(benchmark, step, make_inputs, device,
                  n_rounds=rounds(50, 10, device), warmup=2)

    with torch.no_grad():
        y = forward(x0)
    nbytes = x0.nbytes + y.numel() * x0.element_size()
    nbytes = 3 * x0.nbytes + 2 * (nbytes - x0.nbytes) if train else nbytes
    if _kind(block) == 'conv':
        flops, (m, n, k) = _temporal_gemm_flops(c, b * t * hw * hw)
    else:
        flops = _resample_flops(block, c, b, t, hw)
    record_rates(benchmark, device_rates(device), nbytes=nbytes, flops=3 * flops if train else flops)
    if median_of(benchmark) and device.type == 'cuda' and _kind(block) == 'conv' and c >= 256:
        benchmark.extra_info['cublas_bf16_TFLOPs_same_MNK'] = round(cublas_tflops(m, n, k), 1)
        benchmark.extra_info['gemm_MNK'] = [m, n, k]
