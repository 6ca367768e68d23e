"""Benchmark helpers: ours vs upstream lumiere-pytorch on the same inputs, in one process.

Imported by the bench_* files as ``from harness import ...`` (not from ``conftest``: a combined
``pytest tests benchmarks`` imports two conftest modules under one name, so neither can be imported by name);
the fixtures and pytest hooks are in ``benchmarks/conftest.py``.

Run: ``pytest benchmarks/ --benchmark-only`` (or ``--benchmark-disable`` for a quick smoke run, as CI does).
CUDA cases skip with a reason on machines without a GPU; the CPU cases always run. benchmarks/README.md says
how to turn the JSON into RESULTS.md; the record schema (group, extra_info keys) is described there too.

Timing (:func:`run_benchmark`, the one helper every bench_* file uses):

* CUDA: the median comes from CUDA events, one start/end pair around each call, no host sync between calls
  (so a call that is launch-bound shows its CPU time and a GPU-bound one its GPU time, as in
  ``triton.testing.do_bench``), after warm-up calls; each call takes the next copy of its inputs from a ring
  whose total size is at least twice the L2 (50 MB on an H100), so no call finds its inputs in L2. That
  median goes into ``extra_info['median_s']`` with ``extra_info['timing'] = 'cuda_events'``; pytest-benchmark
  then times the same ring with a host sync per call, for its own stats (wall clock, a few us of sync more).
* CPU: pytest-benchmark's own stats (``benchmark.pedantic``), ``extra_info['timing'] = 'pytest-benchmark'``.

``median_of(record)`` in make_results.py reads that: ``extra_info['median_s']`` where present, else the
pytest-benchmark median. Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` over one call after a
reset, measured before the ring is allocated, so it holds only the model/module, one input and the call.

``LUMIERE_BENCH_ROUNDS=N`` overrides every case's round count (tests use it to keep a subprocess run short).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Sequence

import pytest
import torch

warnings.filterwarnings('ignore', category=FutureWarning)

DEVICES = ['cpu', 'cuda']
KARRAS_64_LEVELS = [(192, 64), (384, 32), (768, 16), (768, 8)]    # a 64x64 KarrasUnet's (channels, height=width)
L2_BYTES = 50 * 2 ** 20         # H100 L2; rings of inputs span at least twice this
MAX_RING = 4096                 # copies; a sanity bound (the ring is ~2 x L2 whatever the input size)
SESSION_ENV: dict = {}          # device rates etc., written into the JSON's machine_info at the end


def device_or_skip(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        pytest.skip('CUDA case: no CUDA device on this machine')
    return torch.device(name)


def upstream_or_skip():
    return pytest.importorskip('lumiere_pytorch', reason='baseline needs lumiere-pytorch==0.0.24 (test extra)')


def compiled_or_skip(device: torch.device):
    if device.type != 'cuda':
        pytest.skip('torch.compile(upstream) is a CUDA baseline: on CPU inductor needs a C++ toolchain and '
                    'compiles for minutes, for no number the issue asks for')


def compile_fresh(module):
    """torch.compile(module) after a dynamo reset: every case builds a new module whose forward is the same code
    object, and past torch._dynamo.config.cache_size_limit (8) recompiles dynamo would silently run it eagerly."""
    torch._dynamo.reset()
    return torch.compile(module)


@contextlib.contextmanager
def no_tf32(device: torch.device):
    """fp32 means fp32 for every implementation inside: matmul and cuDNN TF32 off on CUDA (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def rounds(cuda: int, cpu: int, device: torch.device) -> int:
    """The case's round count, or ``LUMIERE_BENCH_ROUNDS`` where set."""
    env = os.environ.get('LUMIERE_BENCH_ROUNDS', '').strip()
    return max(1, int(env)) if env else (cuda if device.type == 'cuda' else cpu)


def median_seconds(fn, device: torch.device, iters: int = 50) -> float:
    """Median time of fn() after one untimed call: CUDA events per call on CUDA, wall time with a sync per
    call elsewhere (for the reference rates measured once per session: copy bandwidth, GEMM)."""
    fn()
    sync(device)
    if device.type == 'cuda':
        return statistics.median(_cuda_event_times(lambda i: fn(), iters))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cuda_event_times(call: Callable[[int], object], iters: int) -> list[float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(pairs):
        start.record()
        call(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def _nbytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def run_benchmark(benchmark, step: Callable, make_inputs: Callable[[], Sequence], device: torch.device, *,
                  n_rounds: int, warmup: int = 2, memory: bool = True) -> Sequence:
    """Time ``step(*make_inputs())`` into ``benchmark`` (see the module docstring); returns the first inputs.

    ``make_inputs`` returns a fresh tuple of inputs per call (leaf tensors that need grads made anew), so the
    ring holds distinct copies. ``step`` must not sync; this helper does.
    """
    first = tuple(make_inputs())
    if device.type != 'cuda':
        benchmark.extra_info['timing'] = 'pytest-benchmark'
        benchmark.pedantic(step, setup=lambda: (first, {}), rounds=n_rounds, warmup_rounds=warmup)
        return first

    step(*first)                    # compile / autotune outside every measurement
    sync(device)
    if memory:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(*first)
        sync(device)
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info['peak_mem_MiB'] = round(peak / 2 ** 20, 1)
        benchmark.extra_info['peak_above_start_MiB'] = round((peak - before) / 2 ** 20, 1)
    if benchmark.disabled:
        benchmark.pedantic(lambda: (step(*first), sync(device)), rounds=1)
        return first

    copies = min(MAX_RING, max(2, math.ceil(2 * L2_BYTES / max(_nbytes(first), 1))))
    ring = [first] + [tuple(make_inputs()) for _ in range(copies - 1)]
    for i in range(warmup):
        step(*ring[i % copies])
    times = _cuda_event_times(lambda i: step(*ring[i % copies]), n_rounds)
    benchmark.extra_info.update(timing='cuda_events', median_s=statistics.median(times), min_s=min(times),
                                rounds=n_rounds, ring_copies=copies,
                                ring_MiB=round(copies * _nbytes(first) / 2 ** 20, 1))
    turn = iter(range(10 ** 9))

    def setup():
        return ring[next(turn) % copies], {}

    benchmark.pedantic(lambda *a: (step(*a), sync(device)), setup=setup, rounds=n_rounds, warmup_rounds=1)
    return first


def frames_module_steps(run, x0: torch.Tensor | Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype,
                        train: bool):
    """(step, make_inputs, forward) for a temporal module on frames like ``x0`` (a tensor, or a tuple of tensors
    passed to ``run`` as its positional inputs): the timed step is the eval forward under no_grad, or (``train``)
    forward + backward of a scalar loss into every input (and parameter); bf16 autocast on CUDA. Each call gets
    fresh copies of x0 from ``make_inputs`` (the ring of run_benchmark)."""
    autocast = dict(device_type=device.type, dtype=dtype, enabled=device.type == 'cuda')
    x0s = (x0,) if isinstance(x0, torch.Tensor) else tuple(x0)

    def make_inputs():
        return tuple(x.clone().requires_grad_(train) for x in x0s)

    def forward(*xs):
        with torch.no_grad(), torch.autocast(**autocast):
            return run(*xs)

    def forward_backward(*xs):
        with torch.autocast(**autocast):
            out = run(*xs)
        out.float().square().mean().backward()

    return (forward_backward if train else forward), make_inputs, forward


def run_frames_module_case(benchmark, device_rates, impl: str, phase: str, device_name: str, block: str, c: int,
                           hw: int, batch: int, frames: int, flops: int) -> dict:
    """One ``bench_<op>.py`` case of a temporal module alone on (b t) c hw hw frames: ours, upstream eager or
    torch.compile(upstream) (``impl``), 'forward' (eval, no_grad) or 'forward+backward' (train: backward of a
    scalar loss into the input and every parameter), same weights and input; bf16 under autocast on CUDA, fp32
    on CPU. Records bytes (forward |x| + |y|; forward+backward 3 |x| + 2 |y|, parameters not counted) and
    ``flops`` (the forward's; forward+backward 3x: a data- and a weight-gradient GEMM of the forward's size each).
    Returns the case's shape as dict(device=...)."""
    device = device_or_skip(device_name)
    if impl == 'upstream_compiled':
        compiled_or_skip(device)
    lib = upstream_or_skip() if impl.startswith('upstream') else __import__('lumiere_fast')
    b, t = batch, frames
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
    run_benchmark(benchmark, step, make_inputs, device, n_rounds=rounds(50, 10, device), warmup=2)

    with torch.no_grad():
        y = forward(x0)
    nbytes = x0.nbytes + y.numel() * x0.element_size()
    nbytes = 3 * x0.nbytes + 2 * (nbytes - x0.nbytes) if train else nbytes
    record_rates(benchmark, device_rates(device), nbytes=nbytes, flops=3 * flops if train else flops)
    return dict(device=device)


def median_of(benchmark) -> float | None:
    """The one median of a finished case: CUDA events where recorded, else pytest-benchmark's."""
    if 'median_s' in benchmark.extra_info:
        return benchmark.extra_info['median_s']
    return None if benchmark.stats is None else benchmark.stats.stats.median


GEMM_RATE_KEYS = {'bfloat16': 'device_bf16_gemm_TFLOPs', 'float16': 'device_bf16_gemm_TFLOPs',
                  'float32': 'device_fp32_gemm_TFLOPs'}


def gemm_rate(rates: dict, dtype: str | None) -> tuple[str, float] | None:
    """(key, TFLOP/s) of the measured GEMM rate that applies to a case in ``dtype``: bf16 and fp16 cases the bf16
    rate, fp32 cases the fp32 rate. measure_rates measures one per device (CUDA: bf16, where every op case runs
    bf16; CPU: fp32, where every case runs fp32); a case whose dtype's rate was not measured (an fp32 case on
    CUDA) gets the one that was, and its record says which (``roofline_gemm``)."""
    key = GEMM_RATE_KEYS.get(dtype or '')
    if key and rates.get(key):
        return key, rates[key]
    for key in ('device_bf16_gemm_TFLOPs', 'device_fp32_gemm_TFLOPs'):
        if rates.get(key):
            return key, rates[key]
    return None


def roofline_seconds(rates: dict, dtype: str | None, *, nbytes: int | None = None, flops: int | None = None
                     ) -> tuple[float, str] | None:
    """The roofline prediction of a case and the bound that sets it ('copy' or 'gemm'):

        predicted_s = max(bytes / copy_rate, flops / gemm_rate)

    copy_rate = the device's measured copy bandwidth (``device_copy_GBps``: read + write bytes of ``x.clone()``
    per second, the same count as ``bytes``), gemm_rate = its measured GEMM rate for ``dtype`` (:func:`gemm_rate`).
    A term whose count or rate is missing is left out; None where neither term can be computed. It is a lower
    bound on time for the case's minimal traffic and work at rates this device reaches in isolation (it ignores
    that memory traffic and math can overlap only imperfectly, and any launch cost)."""
    terms = []
    if nbytes is not None and rates.get('device_copy_GBps'):
        terms.append((nbytes / (rates['device_copy_GBps'] * 1e9), 'copy'))
    gemm = gemm_rate(rates, dtype)
    if flops is not None and gemm:
        terms.append((flops / (gemm[1] * 1e12), 'gemm'))
    return max(terms) if terms else None


def record_rates(benchmark, rates: dict, *, nbytes: int | None = None, flops: int | None = None,
                 dtype: str | None = None):
    """extra_info: achieved GB/s (nbytes / median) and TFLOP/s (flops / median), the device's measured rates
    and the fractions of them, and the roofline prediction ``predicted_s`` (:func:`roofline_seconds`; with
    ``roofline_bound`` 'copy' | 'gemm' and ``roofline_gemm``, the GEMM rate used). ``nbytes`` / ``flops`` are
    the case's minimal traffic / work, computed by the caller from the shapes (each bench file states its
    formula); ``dtype`` defaults to ``extra_info['dtype']`` (set by :func:`describe`)."""
    benchmark.extra_info.update({k: v for k, v in rates.items() if k.startswith('device_')})
    dtype = dtype or benchmark.extra_info.get('dtype')
    if nbytes is not None:
        benchmark.extra_info['bytes'] = int(nbytes)
    if flops is not None:
        benchmark.extra_info['flops'] = int(flops)
    gemm = gemm_rate(rates, dtype)
    roof = roofline_seconds(rates, dtype, nbytes=nbytes, flops=flops)
    if roof is not None:
        benchmark.extra_info.update(predicted_s=roof[0], roofline_bound=roof[1])
        if flops is not None and gemm:
            benchmark.extra_info['roofline_gemm'] = gemm[0]
    median = median_of(benchmark)
    if median is None or median <= 0:
        return
    if nbytes is not None:
        gbps = nbytes / median / 1e9
        benchmark.extra_info['achieved_GBps'] = round(gbps, 2)
        if rates.get('device_copy_GBps'):
            benchmark.extra_info['fraction_of_copy'] = round(gbps / rates['device_copy_GBps'], 3)
    if flops is not None:
        tflops = flops / median / 1e12
        benchmark.extra_info['achieved_TFLOPs'] = round(tflops, 4)
        if gemm:
            benchmark.extra_info['fraction_of_gemm'] = round(tflops / gemm[1], 3)


def describe(benchmark, device: torch.device, dtype: torch.dtype, shape: str, impl: str):
    benchmark.extra_info.update(impl=impl, device=device_name(device), dtype=str(dtype).replace('torch.', ''),
                                shape=shape)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def measure_rates(device: torch.device) -> dict:
    """Copy bandwidth: x.clone() of a big tensor (read + write: 2 * bytes / median). GEMM: a square matmul,
    2 * n^3 / median (bf16 8192^3 on CUDA; fp32 1024^3 on CPU, where bf16 GEMMs are not what runs)."""
    if device.type == 'cuda':
        x = torch.empty(2 ** 28, dtype=torch.bfloat16, device=device)          # 512 MiB, >> L2
        copy = 2 * x.numel() * x.element_size() / median_seconds(x.clone, device, iters=20) / 1e9
        n, dtype, key = 8192, torch.bfloat16, 'device_bf16_gemm_TFLOPs'
    else:
        x = torch.empty(2 ** 24, dtype=torch.float32)                          # 64 MiB
        copy = 2 * x.numel() * x.element_size() / median_seconds(x.clone, device, iters=10) / 1e9
        n, dtype, key = 1024, torch.float32, 'device_fp32_gemm_TFLOPs'
    del x
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), device, iters=20 if device.type == 'cuda' else 5)
    return {'device_copy_GBps': round(copy, 1), key: round(gemm / 1e12, 3 if device.type == 'cpu' else 1),
            'device_gemm_shape': f'{n}x{n}x{n} {str(dtype)[6:]}'}


def environment() -> dict:
    env = {'torch': torch.__version__, 'python': platform.python_version(),
           'cuda_available': torch.cuda.is_available(), 'argv': ' '.join(sys.argv[1:])}
    try:
        import triton
        env['triton'] = triton.__version__
    except Exception:
        env['triton'] = None
    try:
        import lumiere_pytorch  # noqa: F401
        from importlib.metadata import version
        env['lumiere_pytorch'] = version('lumiere-pytorch')
    except Exception:
        env['lumiere_pytorch'] = None
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   device_memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    else:
        env['device'] = f'cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
    env['torch_threads'] = torch.get_num_threads()
    if hasattr(os, 'getloadavg'):   # other processes on the machine skew timings: say how busy it was
        env['load_average'] = [round(v, 2) for v in os.getloadavg()]
    env['backend'] = os.environ.get('LUMIERE_FAST_BACKEND', 'auto') or 'auto'
    return env
