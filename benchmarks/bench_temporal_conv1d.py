"""Temporal conv1d over frames ((b t) c h w, k=3, 'same'): the native extension (csrc/) vs its baselines.

impl (schema: /benchmarks, extra_info['impl']):
  lumiere_fast             ops.temporal_conv1d with the native extension forced (reads (b t) c h w in place)
  reference                ops.temporal_conv1d_ref: a (k, 1) conv2d over the b c t (h w) view + one copy back
  cudnn_conv1d_with_fold   fold (b t) c h w -> (b h w) c t, F.conv1d, unfold back (upstream's way; cuDNN on
                           CUDA, mkldnn on CPU)
  cudnn_conv1d             F.conv1d on an already folded tensor (fold time excluded)
  gemm_cublas              (CUDA) torch.mm of the same M/N/K: M = c_out, N = b*t*h*w, K = c_in*k, the speed of
                           light the issue holds ours to (within 1.5x)
  triton                   (CUDA) ops.temporal_conv1d under the triton backend: its implicit-GEMM conv kernel
                           (kernels/temporal_conv1d.py, the path CUDA users get without the extension)
phase: 'fwd' (forward) and 'fwd+bwd' (forward + backward of x, weight, bias).

CUDA: bf16, C in {192, 384, 768} at 64x64/32x32/16x16/8x8 (the conv levels of the Triton issue), B=2, T=16.
CPU: fp32, B=2, T=8, C in {32, 64, 128} at 16x16/32x32 (the model's CPU sizes; the conv block and resample
convs are this same (c, c, 3) conv over frames). Each case records (harness.record_rates) its minimal bytes and
FLOPs, achieved GB/s and TFLOP/s, and the roofline prediction from the device's measured copy and GEMM rates:

    flops = 2 * C * C * k * N   (N = b * t * h * w positions), x3 for fwd+bwd (grad input, grad weight)
    bytes = 2 * x.nbytes (read x, write y; the weight is C*C*k, < 1% here), 5 * x.nbytes for fwd+bwd
            (+ read grad_out and x again, write grad_x)

Prediction for the native kernel's staging (csrc/temporal_conv1d_cuda.cu, issue 14.3), bf16 k=3, C=384 at 32x32,
B=2, T=16 (N = 32,768): 29.0 GFLOP and 50.3 MB, so 576 FLOP/byte, far above an H100's ~236 (790 TFLOP/s over
3.35 TB/s): GEMM-bound, roofline 37 us forward. Per block (64 channels x 64 pixels x 4 frames) each 16-channel
step copies (4 + 2) frames x 16 x 128 B = 12 KiB of input and 6 KiB of weight into shared memory in 16-byte
cp.async chunks (1.5x the input tile: the time halo) while the previous step's 24 WMMA products per warp run;
with the output-channel tile the fastest block index the Co/64 = 6 blocks of one input tile run together, so
DRAM sees the input about once (the old order, channel tile slowest, read it 6 x 1.5 = 9 times unless L2 held
it) and L2 the 1.5x. WMMA (mma.sync, not Hopper's wgmma) reaches about half of the dense bf16 peak, so expect
~2x the roofline (~75 us) at best; cuDNN's frames-view conv is the measured alternative the dispatch picks
where it wins (extension_status()['cuda']['dispatch']).

Also a script: ``python benchmarks/bench_temporal_conv1d.py [--device cpu|cuda]`` prints medians and ratios.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import device_or_skip, median_seconds, record_rates, sync  # noqa: E402

from lumiere_fast import backend  # noqa: E402
from lumiere_fast.ops import extension_status, temporal_conv1d, temporal_conv1d_ref  # noqa: E402

tc = importlib.import_module('lumiere_fast.ops.temporal_conv1d')

K = 3
SHAPES = {   # (batch, frames, channels, height = width)
    'cpu': [(2, 8, c, hw) for c in (32, 64, 128) for hw in (16, 32)],
    'cuda': [(2, 16, c, hw) for c in (192, 384, 768) for hw in (64, 32, 16, 8)],
}
CASES = [(d, *s) for d in ('cpu', 'cuda') for s in SHAPES[d]]
IMPLS = ['lumiere_fast', 'triton', 'reference', 'cudnn_conv1d_with_fold', 'cudnn_conv1d', 'gemm_cublas']
PHASES = ['fwd', 'fwd+bwd']


def fold(x, b):
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h * w).permute(0, 3, 2, 1).reshape(-1, c, bt // b)


def unfold(y, b, h, w):
    bhw, c, t = y.shape
    return y.reshape(b, h * w, c, t).permute(0, 3, 2, 1).reshape(b * t, c, h, w)


def make_case(device, dtype, b, t, c, hw):
    x = torch.randn(b * t, c, hw, hw, device=device, dtype=dtype)
    w = (torch.randn(c, c, K, device=device) / (c * K) ** 0.5).to(dtype)
    bias = torch.randn(c, device=device, dtype=dtype)
    return x, w, bias


def impl_fn(impl, phase, x, w, bias, b):
    """A zero-argument step for one implementation (None where it does not apply)."""
    hw = x.shape[-1]
    training = phase == 'fwd+bwd'
    if training:
        x, w, bias = (t.detach().requires_grad_() for t in (x, w, bias))
    if impl == 'gemm_cublas':
        if not x.is_cuda or training:
            return None
        a = w.reshape(w.shape[0], -1)
        bm = torch.randn(a.shape[1], x.shape[0] * hw * hw, device=x.device, dtype=x.dtype)
        return lambda: torch.mm(a, bm)
    if impl == 'cudnn_conv1d':
        xf = fold(x.detach(), b).contiguous().requires_grad_(training)
        fwd = lambda: F.conv1d(xf, w, bias, padding=K // 2)  # noqa: E731
    elif impl == 'cudnn_conv1d_with_fold':
        fwd = lambda: unfold(F.conv1d(fold(x, b), w, bias, padding=K // 2), b, hw, hw)  # noqa: E731
    elif impl == 'reference':
        fwd = lambda: temporal_conv1d_ref(x, w, bias, b)  # noqa: E731
    elif impl == 'triton':
        if not x.is_cuda:
            return None         # the interpreter on CPU: a correctness tool, not a timing
        def fwd():
            with backend.use_backend('triton'):
                return temporal_conv1d(x, w, bias, batch=b)
    else:
        def fwd():
            forced, tc._force_native = tc._force_native, True
            try:
                return temporal_conv1d(x, w, bias, batch=b)
            finally:
                tc._force_native = forced
    if not training:
        return fwd
    grad = torch.randn_like(fwd())
    return lambda: fwd().backward(grad)


def flops(b, t, c, hw, phase):
    fwd = 2 * c * c * K * b * t * hw * hw
    return fwd * (3 if phase == 'fwd+bwd' else 1)


@pytest.mark.parametrize('device_name, b, t, c, hw', CASES, ids=[f'{d}-C{c}-{hw}x{hw}' for d, _, _, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_conv1d(benchmark, device_rates, impl, phase, device_name, b, t, c, hw):
    device = device_or_skip(device_name)
    status = extension_status()['cuda' if device.type == 'cuda' else 'cpu']
    if impl == 'lumiere_fast' and not status['loaded']:
        pytest.skip(f'native extension not loaded: {status["why"]}')
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x, w, bias = make_case(device, dtype, b, t, c, hw)
    fn = impl_fn(impl, phase, x, w, bias, b)
    if fn is None:
        pytest.skip(f'{impl} has no {phase} on {device.type}')
    if impl in ('lumiere_fast', 'triton'):
        with backend.record_choices() as seen:
            fn()
        assert seen['temporal_conv1d'] == {'native' if impl == 'lumiere_fast' else 'triton'}
    shape = f'B={b} T={t} C={c} {hw}x{hw} k={K}'
    benchmark.group = f'temporal_conv1d {phase} {device.type} {str(dtype)[6:]} {shape}'
    benchmark.extra_info.update(impl=impl, dtype=str(dtype)[6:], shape=shape,
                                device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                                flops=flops(b, t, c, hw, phase if impl != 'gemm_cublas' else 'fwd'))

    def step():
        fn()
        sync(device)

    benchmark.pedantic(step, rounds=30 if device.type == 'cuda' else 10, iterations=1, warmup_rounds=2)
    if not benchmark.disabled:
        # the GEMM baseline moves its own operands (weight + a (c*k, N) matrix + the (c, N) product)
        nbytes = (x.nbytes * (K + 1) if impl == 'gemm_cublas' else (5 if phase == 'fwd+bwd' else 2) * x.nbytes)
        record_rates(benchmark, device_rates(device), nbytes=nbytes, flops=benchmark.extra_info['flops'])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--iters', type=int, default=30)
    p.add_argument('--phase', default='fwd', choices=PHASES)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    torch.manual_seed(0)
    print(extension_status())
    impls = [i for i in IMPLS if not (i in ('gemm_cublas', 'triton') and device.type != 'cuda')]
    print(f'{args.phase} {dtype}: median ms (ratio = baseline / lumiere_fast, > 1: ours faster)')
    print('shape'.ljust(28) + ''.join(i.rjust(24) for i in impls))
    for b, t, c, hw in SHAPES[device.type]:
        x, w, bias = make_case(device, dtype, b, t, c, hw)
        ms = {}
        for impl in impls:
            fn = impl_fn(impl, args.phase, x, w, bias, b)
            ms[impl] = median_seconds(fn, device, args.iters) * 1e3
        ours = ms['lumiere_fast']
        cells = ''.join((f'{v:.3f}' + ('' if i == 'lumiere_fast' else f' ({v / ours:.2f}x)')).rjust(24)
                        for i, v in ms.items())
        print(f'B={b} T={t} C={c} {hw}x{hw}'.ljust(28) + cells, flush=True)


if __name__ == '__main__':
    main()
