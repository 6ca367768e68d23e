"""Host time per op call (issue 13.4): what one call of each kernel op costs the CPU, at tiny shapes (B=1, T=4,
C=16, 8x8: the coarse levels, where a kernel takes a few microseconds on a GPU and host time decides).

Two paths, side by side: ``eager`` (what eager mode runs: the dispatch, one ``autograd.Function`` around the
launchers, ``ops/_triton.launch``) and ``custom_op`` (the torch.library custom op, what torch.compile traces; run
in eager here by turning ``_triton.EAGER`` off, which is what every op call cost before the eager path).

* ``cpu``: every Triton kernel is replaced by a launch that does nothing, so the time is exactly the Python and
  ATen host work around the launches (dispatch, checks, autograd, output allocation, strides, grids), with no
  interpreter. ``extra_info['launches']`` counts the Triton launches per call: on a GPU each adds Triton's own
  launch cost (``JITFunction.run``: argument binding, the cache lookup and the driver call; the autotuner's
  key and cache lookup on top), which this machine cannot time.
* ``cuda``: the real kernels; a loop of calls without host syncs, so at these sizes (kernels shorter than their
  launch) the time per call is the host time, Triton's launch included.

Target (the issue): <= 10 us of host time per op call in eager mode. Prediction written before any GPU run:
the CPU rows' eager forward ~5-15 us on this 2-core machine (a GPU host's core is ~2x faster), plus ~4-8 us per
launch for Triton 3.6's launcher on an H100 host; so 1-launch forwards meet the target on a GPU host and the
multi-launch backwards (3-6 launches) do not, whatever the Python around them costs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from harness import describe, device_or_skip

OPS = ['mp_temporal_conv_block', 'temporal_conv_block', 'mp_temporal_attention_block', 'temporal_attention_block',
       'mp_temporal_downsample', 'mp_temporal_upsample', 'temporal_downsample', 'temporal_upsample',
       'temporal_conv1d', 'fold_frames', 'pixel_norm_silu', 'scale_silu', 'mp_cat']
KERNEL_MODULES = ['conv_block', 'attention', 'temporal_conv1d', 'resample', 'fold', 'karras']
PATHS = ['eager', 'custom_op']
PHASES = ['forward', 'forward+backward']
B, T, C, HW = 1, 4, 16, 8
ITERATIONS = {'cpu': 200, 'cuda': 500}
TARGET_US = 10.0


def _op_call(op: str, device, dtype):
    """(a callable running ``op`` once on fresh leaves, the leaves) for the op's public dispatch function."""
    from lumiere_fast import ops
    from lumiere_fast.ops import karras
    from lumiere_fast.ops.weight_norm import mp_weight
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = r(B * T, C, HW, HW)
    w3, w1 = r(C, C, 3), r(C, C, 1)
    if op == 'mp_temporal_conv_block':
        args = (x, r(B * T, C, HW, HW), mp_weight(w3), mp_weight(w1), r(1))
        return (lambda h, res, cw, pw, gain: ops.mp_temporal_conv_block(h, res, cw, pw, gain, batch=B)), args
    if op == 'temporal_conv_block':
        args = (x, r(B * T, C, HW, HW), w3, r(C), r(C), w1, r(C))
        return (lambda *a: ops.temporal_conv_block(*a, batch=B)), args
    if op == 'mp_temporal_attention_block':
        heads, dim_head = 2, 8
        args = (x, r(3 * heads * dim_head, C), r(C, heads * dim_head), r(2, heads, 2, dim_head), r(C, C), r(1))
        return (lambda v, qkv, out, mem, pw, gain: ops.mp_temporal_attention_block(
            v, [(qkv, out, mem)], pw, gain, batch=B, heads=heads)), args
    if op == 'temporal_attention_block':
        heads, dim_head = 2, 8
        inner = heads * dim_head
        args = (x, r(C), r(inner, C), r(inner, C), r(inner, C), r(C, inner), r(C, C), r(C))
        return (lambda v, gn, wq, wk, wv, wo, pw, pb: ops.temporal_attention_block(
            v, [(gn, wq, wk, wv, wo)], pw, pb, batch=B, heads=heads)), args
    if op in ('mp_temporal_downsample', 'mp_temporal_upsample'):
        fn = getattr(ops, op)
        return (lambda v, w: fn(v, w, batch=B)), (x, w3)
    if op in ('temporal_downsample', 'temporal_upsample'):
        fn = getattr(ops, op)
        return (lambda v, w, b: fn(v, w, b, batch=B)), (x, w3, r(C))
    if op == 'temporal_conv1d':
        return (lambda v, w, b: ops.temporal_conv1d(v, w, b, batch=B)), (x, w3, r(C))
    if op == 'fold_frames':
        return (lambda v: ops.fold_frames(v, B)), (x,)
    if op == 'pixel_norm_silu':
        return (lambda v: karras.pixel_norm_silu(v)[1]), (x,)
    if op == 'scale_silu':
        return karras.scale_silu, (x, r(B * T, C))
    return (lambda a, b: karras.mp_cat(a, b)), (x, r(B * T, C // 2, HW, HW))


class _NoLaunch:
    """A Triton kernel that launches nothing, counting its launches."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.counter[0] += 1


@pytest.fixture
def stubbed_kernels(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '1')     # a forced Triton backend runs on CPU tensors (nothing launches)
    counter = [0]
    for name in KERNEL_MODULES:
        module = importlib.import_module(f'lumiere_fast.kernels.{name}')
        for attr, obj in list(vars(module).items()):
            if not isinstance(obj, type) and hasattr(obj, '__getitem__') and hasattr(obj, 'run'):
                monkeypatch.setattr(module, attr, _NoLaunch(counter))
    return counter


CASES = [(d, op) for d in ('cpu', 'cuda') for op in OPS]


@pytest.mark.parametrize('device_name, op', CASES, ids=[f'{d}-{op}' for d, op in CASES])
@pytest.mark.parametrize('phase', PHASES)
@pytest.mark.parametrize('path', PATHS)
def bench_host_overhead(benchmark, request, monkeypatch, path, phase, device_name, op):
    from lumiere_fast import backend
    from lumiere_fast.ops import _triton
    device = device_or_skip(device_name)
    counter = request.getfixturevalue('stubbed_kernels') if device.type == 'cpu' else [0]
    monkeypatch.setattr(_triton, 'EAGER', path == 'eager')
    fn, args = _op_call(op, device, torch.float32)
    train = phase == 'forward+backward'
    leaves = [a.detach().requires_grad_(train) for a in args]
    with torch.no_grad(), backend.use_backend('triton'):
        probe = fn(*leaves)
    cot = torch.ones_like(probe)

    def step():
        if train:
            fn(*leaves).backward(cot)
        else:
            with torch.no_grad():
                fn(*leaves)

    with backend.use_backend('triton'), backend.record_choices() as seen:
        step()                                   # warm: autotuning / compilation outside the timing
        before = counter[0]
        step()
        launches = counter[0] - before
        iterations = ITERATIONS[device.type]
        benchmark.pedantic(step, rounds=15, iterations=iterations, warmup_rounds=1)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    assert seen[op] == {'triton'}, seen
    # one group per (device, op, phase): ours (the eager path) and the custom op as its baseline, so RESULTS.md
    # shows the cut as a ratio
    describe(benchmark, device, torch.float32, f'B{B} T{T} C{C} {HW}x{HW}',
             'lumiere_fast' if path == 'eager' else 'lumiere_fast_custom_op')
    benchmark.group = f'host-overhead-{device.type}-{op}-{phase}'
    stats = getattr(benchmark, 'stats', None)
    median = stats.stats.median if stats is not None and hasattr(stats, 'stats') else None
    benchmark.extra_info.update(op=op, phase=phase, path=path, target_us=TARGET_US,
                                launches=launches if device.type == 'cpu' else None,
                                timing='host-loop', stubbed_kernels=device.type == 'cpu')
    if median is not None:
        benchmark.extra_info['host_us_per_call'] = round(median * 1e6, 2)
