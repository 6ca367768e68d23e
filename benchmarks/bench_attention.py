"""Temporal attention blocks (MP and non-MP), ours vs upstream eager vs torch.compile(upstream block) vs 'sdpa'.

'sdpa' is the same problem in plain PyTorch with ``F.scaled_dot_product_attention`` as the core and the memory
keys/values concatenated to the keys/values (the MP block's reference, ``mp_temporal_attention_block_ref``, is
exactly that; the non-MP block gets the same written out below), on our module's weights: what a fused
attention core alone would give.

CUDA (issue 4's list): bf16 activations under bf16 autocast, the coarse levels of a 64x64 KarrasUnet (C=768 at
8x8 and 16x16), T in {2, 4, 8, 16, 64}, B in {2, 8}, forward (eval, no_grad) and forward+backward (train, a
scalar loss into the input and every parameter); peak memory of each. CPU: one small fp32 case per block.

``bench_attention_large_grid`` (CUDA only) runs a problem with B*H*W*heads > 65,535 programs' worth of (clip,
pixel, head) work, checks ours against the fp32 reference output (and input gradient) before timing it.

Timing and peak memory: harness.run_benchmark. Rates (harness.record_rates), per layer (depth 1), with
N = B H W sequences of T frames, h heads of d channels, m memory keys (MP: 4, non-MP: 0), C channels:
  flops (forward) = 2 N T C 3hd (qkv) + 4 N h T (T+m) d (QK^T and PV) + 2 N T hd C (out) + 2 N T C C (proj_out);
  forward+backward: 3x forward;
  bytes: what the two-stage layout moves (``attention_bytes`` below; the problem's minimum, one fused pass, is
  2 |x| forward and 5 |x| forward+backward); weights not counted.
"""

from __future__ import annotations

import functools
from math import sqrt

import pytest
import torch
import torch.nn.functional as F

from harness import (compile_fresh, compiled_or_skip, describe, device_or_skip, frames_module_steps, record_rates,
                      rounds, run_benchmark, upstream_or_skip)

BLOCKS = ['MPAttentionInflationBlock', 'AttentionInflationBlock']
IMPLS = ['lumiere_fast', 'upstream', 'upstream_compiled', 'sdpa']
PHASES = ['forward', 'forward+backward']
CUDA_SHAPES = [(768, hw, t, b) for hw in (8, 16) for t in (2, 4, 8, 16, 64) for b in (2, 8)]   # C, H=W, T, B
CPU_SHAPES = [(64, 8, 8, 2)]
CASES = [('cpu', *s) for s in CPU_SHAPES] + [('cuda', *s) for s in CUDA_SHAPES]


@functools.lru_cache(maxsize=None)
def _dims(block: str, c: int) -> tuple[int, int, int]:
    """(heads, dim_head, memory keys) of the block at its defaults (upstream's and ours are the same)."""
    module = getattr(__import__('lumiere_fast'), block)(dim=c)
    if hasattr(module.temporal_attns[0], 'mem_kv'):
        mem = module.temporal_attns[0].mem_kv
        return mem.shape[1], mem.shape[3], mem.shape[2]
    return module.heads, module.temporal_attns[0].fn[-1].to_q.weight.shape[0] // module.heads, 0


def attention_flops(n: int, t: int, c: int, heads: int, d: int, m: int) -> int:
    hd = heads * d
    return 2 * n * t * c * 3 * hd + 4 * n * heads * t * (t + m) * d + 2 * n * t * hd * c + 2 * n * t * c * c


# Bytes/FLOPs prediction for the two-stage layout (issue 14.1), per row (one frame of one pixel), per layer, in
# elements of the activation dtype (bf16: 2 bytes), C channels, hd = h d, the modules' C = 768, h d = 8 x 64:
#   forward:  q/k/v GEMM reads s (C), writes qkv head-major (3 hd); the core reads qkv (3 hd), writes o (hd); the
#             out GEMM reads o (hd) and the residual s (C), writes s' (C); proj_out reads s, x, writes y (3 C):
#             6 C + 8 hd = 8,704 (4.4 KB/row bf16) against the fused minimum 2 C = 1,536;
#   backward (from what the forward saved): outer 7 C; per layer do (C + hd), dWo (C + hd), core (3 hd qkv + hd
#             do + 3 hd dqkv), dWqkv (3 hd + C), W^T dqkv + residual (3 hd + 2 C): 5 C + 15 hd;
#             forward+backward 18 C + 23 hd = 25,600 against the minimum 5 C = 3,840.
#   FLOPs per row: 2 C 3hd + 2 hd C + 2 C C + 4 hd (T + m) = 4.33 MFLOP (+ 2 x in backward): 249 FLOP/B forward,
#             which is at an H100's ridge (~790 TFLOP/s / ~3.3 TB/s = 240 FLOP/B): the projections stay
#             compute-bound, so the extra bytes cost little if every sector is full, which is the point:
# 32-byte sector efficiency (useful / fetched bytes) of the attention stage's loads, bf16:
#   before (one fused core; a row tile packs POS = 32 // T pixels of T frames and reads (b t) c H W across
#           pixels, so a sector carries POS x 2 useful bytes; x re-read per head for q, k and v):
#           T = 8: 25%;  T = 16: 12.5%;  T = 64: 6.25% (POS = 1), times 3 h re-reads of the [rows, c] tile;
#   after:  the GEMMs read [BLOCK_CI, 64..128 pixels] runs of (b t) c H W (128-256 contiguous bytes: 100%) and
#           read/write head-major rows of d = 64 contiguous elements (128 bytes: 100%); the core reads each
#           (position, head) [T, d] block, POS positions of one head back to back (POS T d contiguous: 100%):
#           100% at T = 8, 16 and 64, and x is read once per layer (the channel tiles of one pixel tile run
#           together, so the re-reads hit L2).


def attention_bytes(n: int, t: int, c: int, heads: int, d: int, train: bool, elem: int) -> int:
    """Bytes the two-stage layout moves per layer (see the prediction above), n sequences of t frames."""
    hd = heads * d
    per_row = 6 * c + 8 * hd + ((12 * c + 15 * hd) if train else 0)
    return n * t * per_row * elem


def _sdpa_block(module, x, batch):
    """The block's math with F.scaled_dot_product_attention as the core (memory kv concatenated for MP)."""
    from lumiere_fast import ops
    if hasattr(module.temporal_attns[0], 'mem_kv'):
        layers = [a.weights() for a in module.temporal_attns]
        return ops.mp_temporal_attention_block_ref(x, layers, module.proj_out[0].effective_weight(),
                                                   module.proj_out[1].gain, batch, module.heads,
                                                   module.residual_mp_add.t)
    s = ops.fold_frames_ref(x, batch, 't c')
    for g, wq, wk, wv, wo in module._layers():
        n_ = s if g is None else F.normalize(s, dim=-1) * sqrt(s.shape[-1]) * g
        q, k, v = (ops.attention._split_heads(F.linear(n_, w), module.heads) for w in (wq, wk, wv))
        o = ops.attention._merge_heads(F.scaled_dot_product_attention(q, k, v))
        o = o if wo is None else F.linear(o, wo)
        s = o + s if module.residual_attn else o
    s = F.linear(s, module.proj_out.weight, module.proj_out.bias)
    return ops.unfold_frames_ref(s, batch, *x.shape[-2:], 't c') + x


def _build(impl: str, block: str, c: int, b: int, device, train: bool):
    lib = upstream_or_skip() if impl.startswith('upstream') else __import__('lumiere_fast')
    torch.manual_seed(0)
    module = getattr(lib, block)(dim=c).to(device).train(train)
    module.batch_dim = b
    if impl == 'upstream_compiled':
        return module, compile_fresh(module)
    if impl == 'sdpa':
        return module, lambda x: _sdpa_block(module, x, b)
    return module, module


@pytest.mark.parametrize('device_name, c, hw, t, b', CASES,
                         ids=[f'{d}-C{c}-{hw}x{hw}-T{t}-B{b}' for d, c, hw, t, b in CASES])
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('impl', IMPLS)
def bench_attention(benchmark, device_rates, impl, phase, block, device_name, c, hw, t, b):
    device = device_or_skip(device_name)
    if impl == 'upstream_compiled':
        compiled_or_skip(device)
    train = phase == 'forward+backward'
    module, run = _build(impl, block, c, b, device, train)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x0 = torch.randn(b * t, c, hw, hw, device=device, dtype=dtype)
    benchmark.group = f'{block} {phase} {device_name} {str(dtype)[6:]} C={c} {hw}x{hw} T={t} B={b}'
    describe(benchmark, device, dtype, f'C={c} {hw}x{hw} T={t} B={b}', impl)

    step, make_inputs, forward = frames_module_steps(run, x0, device, dtype, train)
    run_benchmark(benchmark, step, make_inputs, device,
                  n_rounds=rounds(50, 10, device), warmup=2)
    heads, d, m = _dims(block, c)
    flops = attention_flops(b * hw * hw, t, c, heads, d, m)
    record_rates(benchmark, device_rates(device), nbytes=attention_bytes(b * hw * hw, t, c, heads, d, train,
                                                                         x0.element_size()),
                 flops=3 * flops if train else flops)


LARGE = dict(c=256, hw=64, t=4, b=5)   # B*H*W*heads = 5*4096*4 = 81,920 (MP) / 163,840 (non-MP, 8 heads)


def _randomize_(module):
    """Non-trivial weights (the blocks zero-init their output projection / gain, which would hide the core)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 1.))


@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('impl', ['lumiere_fast', 'upstream'])
def bench_attention_large_grid(benchmark, device_rates, impl, block):
    """GPU only: more than 65,535 (clip, pixel, head) programs; ours must match the fp32 reference output and
    input gradient (bf16 tolerance: max |err| <= 3e-2 * max |ref|, relative: the gradients are ~1/numel) before
    it is timed."""
    device = device_or_skip('cuda')
    from lumiere_fast import backend
    c, hw, t, b = LARGE['c'], LARGE['hw'], LARGE['t'], LARGE['b']
    module, run = _build(impl, block, c, b, device, train=True)
    _randomize_(module)
    heads = _dims(block, c)[0]
    assert b * hw * hw * heads > 65_535
    x0 = torch.randn(b * t, c, hw, hw, device=device, dtype=torch.bfloat16)
    if impl == 'lumiere_fast':
        x = x0.clone().requires_grad_(True)
        with backend.record_choices() as seen, torch.autocast('cuda', dtype=torch.bfloat16):
            out = run(x)
        out.float().square().mean().backward()
        ran = sorted(set().union(*seen.values())) if seen else []
        benchmark.extra_info['ran'] = ran
        assert 'triton' in ran, f'expected the Triton path at this size, dispatch chose {seen}'
        x_ref = x0.float().clone().requires_grad_(True)
        with backend.use_backend('reference'):
            ref = run(x_ref)
        ref.square().mean().backward()
        for name, got, want in (('output', out.float(), ref), ('input grad', x.grad.float(), x_ref.grad)):
            err, scale = (got - want).abs().max().item(), want.abs().max().item()
            assert err <= 3e-2 * scale, f'{block} {name}: max |err| {err:.3g} vs max |ref| {scale:.3g}'
        module.zero_grad(set_to_none=True)
    benchmark.group = f'{block} large grid forward+backward cuda bfloat16 C={c} {hw}x{hw} T={t} B={b}'
    describe(benchmark, device, torch.bfloat16, f'C={c} {hw}x{hw} T={t} B={b} heads={heads}', impl)

    def forward_backward(inp):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = run(inp)
        y.float().square().mean().backward()

    run_benchmark(benchmark, forward_backward, lambda: (x0.clone().requires_grad_(True),), device,
                  n_rounds=rounds(20, 3, device), warmup=2)
    heads, d, m = _dims(block, c)
    record_rates(benchmark, device_rates(device), nbytes=attention_bytes(b * hw * hw, t, c, heads, d, True,
                                                                         x0.element_size()),
                 flops=3 * attention_flops(b * hw * hw, t, c, heads, d, m))
