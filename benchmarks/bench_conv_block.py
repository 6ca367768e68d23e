"""Each temporal conv inflation block (``ops/conv_block.py``), ours vs upstream eager vs torch.compile(upstream),
same weights and input: the whole block (``bench_block``) and its temporal core alone (``bench_core``).

Phases, shapes (a 64x64 KarrasUnet's conv levels on CUDA, bf16 under autocast, B=2, T=16; C=32 at 32x32, fp32,
B=2, T=8 on CPU), timing and the block's bytes moved: harness.run_frames_module_case.
FLOPs: the temporal GEMMs only, 2 N C (C k) for the k-tap conv1d + 2 N C C for the 1x1 projection, N = B T H W
(the spatial 3x3 conv2d is not counted: issue 3's definition); forward+backward 3x that. On CUDA the blocks with
C >= 256 also record cuBLAS's bf16 rate on the same (M, N, K) as the conv1d GEMM.

Temporal core (``bench_core``, issue 14.5): everything a block does after the spatial 3x3 conv every
implementation shares (~2/3 of a whole block's FLOPs), timed on that conv's output ``h`` and the block input
``x``, both (b t) c H W:

* ours (``lumiere_fast``): what ``modules/conv.py`` runs after its spatial conv, the effective (MP-normalised)
  weights then ``ops.mp_temporal_conv_block`` / ``ops.temporal_conv_block`` (:class:`OursCore`);
* upstream (``upstream``): upstream's block after its spatial conv, with its own layers and einops helpers: the
  fold ``(b t) c h w -> (b h w) c t``, ``temporal_conv`` (conv1d, activation [+ norm]), ``proj_out``, the unfold
  and the residual (``MPAdd``, or ``+ x`` as its ``@residualize``) (:class:`UpstreamCore`);
* ``upstream_compiled``: torch.compile of that upstream sequence (CUDA).

Before the first timing of each (device, block) the two are checked to compute the same thing: at the CPU shape,
fp32 with TF32 off, random weights (the blocks zero-init their projection / gain), max |ours - upstream| <=
1e-5 max |upstream| for the output and, after a backward, the gradients of h and x.
Core bytes (minimal, parameters not counted, s = element size): forward reads h and x and writes the output,
3 N C s; forward+backward adds a backward that reads the output's gradient and h (the conv recomputed or its
activation saved: one tensor either way) and writes the gradients of h and x, 7 N C s in all. Core FLOPs: the
block's (above).

Prediction (H100, bf16, B=2, T=16: 3.35 TB/s HBM, ~790 TFLOP/s dense bf16), core forward at the KarrasUnet
levels: N = B T H W, FLOPs 2 N C (3 C) + 2 N C C, minimal bytes 3 N C s:

    C    HxW    GFLOP  MMA us  MB     HBM us | non-MP programs, before -> now (frame axis)
    192  64x64  38.7   48.9    151.0  45.1   |  384 -> 6144  (BLOCK_P = 64; the conv: 32 frames x tiles)
    384  32x32  38.7   48.9     75.5  22.5   |  192 -> 3072
    768  16x16  38.7   48.9     37.7  11.3   |   96 -> 1536
    768  8x8     9.7   12.2      9.4   2.8   |   24 ->  384  (before: 24 of 132 SMs ran the whole conv, >= 5.5x
                                                              the MMA bound; now the frame-parallel conv and norm)
    128  8x8     0.27   0.34     1.6   0.5   |    2 ->   32  (fused: a 128-channel block of a smaller U-Net)

Every level here has C > 128 = FUSE_MAX_C, so the cores run the split path: the temporal GEMMs are the temporal
conv1d's kernel (kernels/temporal_conv1d.py, its own configs) on the packed [k, co, ci] weight, and the conv
block's kernels do the norm / activation stages frame-parallel. The fused kernels' 128 x 128 tiles (BLOCK_C = C
up to 128, BLOCK_P = 128, BLOCK_CI = 64) apply at C <= 128: per k-step a 128x128x64 tile reads 128 x 64 packed
weights and 64 x 128 inputs for 2 x 128 x 128 x 64 FLOPs, 64 FLOP per byte of shared memory against 32 for
64x64x64 (and 43 for 128x64x64 at 8x8, where a 128-pixel tile would be half masked: the key names P). The packed
weight turns each tile row into 128-byte contiguous runs (before: 2-byte loads at stride 6 bytes, a third of
each 32-byte sector). Unmeasured: no GPU in the session that wrote this.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from harness import (DEVICES, KARRAS_64_LEVELS, compile_fresh, compiled_or_skip, describe, device_or_skip,
                     frames_module_steps, median_of, median_seconds, no_tf32, record_rates, rounds, run_benchmark,
                     run_frames_module_case, upstream_or_skip)
import lumiere_fast
from lumiere_fast import backend, ops

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


# ------------------------------------------------------------------------------------------------ temporal core

class OursCore(nn.Module):
    """``(h, x) -> out``, all (b t) c H W: ours after the spatial conv, as ``modules/conv.py`` calls it."""

    def __init__(self, block: nn.Module, batch: int):
        super().__init__()
        self.block, self.batch = block, batch

    def forward(self, h, x):
        m = self.block
        if hasattr(m, 'residual_mp_add'):
            return ops.mp_temporal_conv_block(
                h, x, m.temporal_conv[0].effective_weight(), m.proj_out[0].effective_weight(), m.proj_out[1].gain,
                batch=self.batch, mp_add_t=m.residual_mp_add.t, dropout=m.temporal_conv[2].p, training=m.training)
        conv, norm = m.temporal_conv[0], m.temporal_conv[1]
        return ops.temporal_conv_block(h, x, conv.weight, conv.bias, norm.gamma, m.proj_out.weight,
                                       m.proj_out.bias, batch=self.batch)


class UpstreamCore(nn.Module):
    """``(h, x) -> out``, all (b t) c H W: upstream's block forward after ``x = self.spatial_conv(x)``, its own
    layers and helpers in its order (lumiere_pytorch 0.0.24, ``(MP)ConvolutionInflationBlock.forward``)."""

    def __init__(self, block: nn.Module, batch: int):
        super().__init__()
        from lumiere_pytorch.mp_lumiere import pack_one, unpack_one       # upstream's own (both files have them)
        self.block, self.batch, self.pack_one, self.unpack_one = block, batch, pack_one, unpack_one

    def forward(self, h, x):
        m = self.block
        y = rearrange(h, '(b t) c h w -> b h w c t', b=self.batch)
        y, ps = self.pack_one(y, '* c t')                                # (b h w) c t
        y = m.proj_out(m.temporal_conv(y))
        y = rearrange(self.unpack_one(y, ps, '* c t'), 'b h w c t -> (b t) c h w')
        return m.residual_mp_add(y, x) if hasattr(m, 'residual_mp_add') else y + x     # non-MP: @residualize


def _randomize_(module: nn.Module):
    """Non-trivial weights: the blocks zero-init their projection (non-MP) or gain (MP), which would make every
    core return its residual and the parity check vacuous."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            else:
                p.copy_(1 + 0.5 * torch.randn_like(p))


def _core_pair(block: str, c: int, batch: int, device: torch.device, train: bool) -> tuple[nn.Module, nn.Module]:
    """(upstream block, our block) with the same random weights, in train or eval mode."""
    lumiere_pytorch = upstream_or_skip()
    torch.manual_seed(0)
    upstream = getattr(lumiere_pytorch, block)(dim=c)
    _randomize_(upstream)
    ours = getattr(lumiere_fast, block)(dim=c)
    ours.load_state_dict(upstream.state_dict())
    for m in (upstream, ours):
        m.to(device).train(train).batch_dim = batch
    return upstream, ours


_CHECKED: set = set()


def _check_core_parity(block: str, device: torch.device):
    """OursCore == UpstreamCore at the CPU shape in fp32 (module docstring), once per (device, block)."""
    if (device.type, block) in _CHECKED:
        return
    (c, hw), b, t = SHAPES['cpu'][0], BATCH['cpu'], FRAMES['cpu']
    upstream, ours = _core_pair(block, c, b, device, train=True)
    x = torch.randn(b * t, c, hw, hw, device=device)
    with torch.no_grad():
        h = upstream.spatial_conv(x)
    results = []
    with no_tf32(device):
        for core in (OursCore(ours, b), UpstreamCore(upstream, b)):
            hh, xx = h.clone().requires_grad_(), x.clone().requires_grad_()
            out = core(hh, xx)
            out.square().mean().backward()
            results.append((out.detach(), hh.grad, xx.grad))
    for name, got, want in zip(('output', 'grad h', 'grad x'), *results):
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert scale > 0 and err <= 1e-5 * scale, \
            f'{block} temporal core, {name}: ours vs upstream max |err| {err:.3g} vs max |upstream| {scale:.3g}'
    _CHECKED.add((device.type, block))


@pytest.mark.parametrize('device_name, block, c, hw', CASES,
                         ids=[f'{d}-{block}-C{c}-{hw}x{hw}' for d, block, c, hw in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_core(benchmark, device_rates, impl, phase, device_name, block, c, hw):
    """The temporal core alone on the spatial conv's output (module docstring), checked against upstream's
    sequence first."""
    device = device_or_skip(device_name)
    if impl == 'upstream_compiled':
        compiled_or_skip(device)
    _check_core_parity(block, device)
    b, t = BATCH[device_name], FRAMES[device_name]
    train = phase == 'forward+backward'
    upstream, ours = _core_pair(block, c, b, device, train)
    core = OursCore(ours, b) if impl == 'lumiere_fast' else UpstreamCore(upstream, b)
    run = compile_fresh(core) if impl == 'upstream_compiled' else core
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x0 = torch.randn(b * t, c, hw, hw, device=device, dtype=dtype)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda'):
        h0 = upstream.spatial_conv(x0).to(dtype)        # the same spatial-conv output for every impl
    benchmark.group = f'{block} temporal core {phase} {device_name} {str(dtype)[6:]} C={c} {hw}x{hw} B={b} T={t}'
    describe(benchmark, device, dtype, f'C={c} {hw}x{hw} B={b} T={t}', impl)

    step, make_inputs, forward = frames_module_steps(run, (h0, x0), device, dtype, train)
    if impl == 'lumiere_fast':
        with backend.record_choices() as seen:
            forward(h0, x0)
        benchmark.extra_info['ran'] = sorted(set().union(*seen.values())) if seen else []
    run_benchmark(benchmark, step, make_inputs, device, n_rounds=rounds(50, 10, device), warmup=2)

    flops, _ = _temporal_gemm_flops(c, b * t * hw * hw)
    record_rates(benchmark, device_rates(device), nbytes=(7 if train else 3) * x0.nbytes,
                 flops=3 * flops if train else flops)
