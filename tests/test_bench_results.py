"""The benchmark tooling: make_results.py turns pytest-benchmark JSON into RESULTS.md and a chart computed from
the numbers, refuses timing-less JSON, and profile_step.py produces its JSON. CPU only, a few subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / 'benchmarks'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f'_bench_{name}', BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up while the class is built
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved              # profile_step.py adds benchmarks/ itself: keep it out of other tests
    return module


@pytest.fixture(scope='module')
def mr():
    return _load('make_results')


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('LUMIERE_FAST_BACKEND', 'TRITON_INTERPRET')}
    env['LUMIERE_BENCH_ROUNDS'] = '2'
    return env


def _row(text: str, case: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f'| {case} |'))
    return [c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]]


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_results_from_a_real_cpu_run(tmp_path, mr):
    """A real (tiny) benchmark run -> RESULTS.md: each baseline's ratio is its median / ours from the JSON."""
    out_json = tmp_path / 'run.json'
    proc = subprocess.run([sys.executable, '-m', 'pytest', 'benchmarks/bench_fold.py', '-k', 'cpu', '-q',
                           '-p', 'no:cacheprovider', f'--benchmark-json={out_json}'],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert data['machine_info']['lumiere_env']['torch']
    assert 'cpu' in data['machine_info']['lumiere_env']['device_rates']
    md, png = tmp_path / 'RESULTS.md', tmp_path / 'speedup.png'
    assert mr.main([str(out_json), '--out', str(md), '--chart', str(png)]) == 0
    text = md.read_text()
    assert 'CPU run' in text and 'Frame fold / unfold' in text and '![speedups](speedup.png)' in text
    assert _is_png(png)
    by_group: dict = {}
    for b in data['benchmarks']:
        by_group.setdefault(b['group'], {})[b['extra_info']['impl']] = b
    assert len(by_group) == 4
    for group, impls in by_group.items():
        assert set(impls) == {'lumiere_fast', 'einops', 'clone'}
        ours = impls['lumiere_fast']['stats']['median']
        row = _row(text, group.replace('|', '\\|'))
        assert row[1] == mr.fmt_time(ours)
        assert row[2] == row[3] == '—'                   # no upstream / compiled for fold
        for base in ('einops', 'clone'):
            median = impls[base]['stats']['median']
            assert f'{base} {mr.fmt_time(median)} ({median / ours:.2f}x)' in row[-1]
        assert f"{impls['lumiere_fast']['extra_info']['achieved_GBps']:.3g} GB/s" in row[-2]
        # the roofline column: fold is a pure copy, so predicted_s = bytes / measured copy rate
        x = impls['lumiere_fast']['extra_info']
        assert x['roofline_bound'] == 'copy'
        assert x['predicted_s'] == pytest.approx(x['bytes'] / (x['device_copy_GBps'] * 1e9))
        assert row[6] == f"{mr.fmt_time(x['predicted_s'])} (copy)"
        assert row[7] == f"{ours / x['predicted_s']:.2f}x"
        clone = impls['clone']
        assert f"[{clone['stats']['median'] / clone['extra_info']['predicted_s']:.2f}x roofline]" in row[-1]


def _bench(group, impl, median, file='bench_end_to_end.py', stats_median=None, **extra):
    info = {'impl': impl, 'device': 'NVIDIA H100 80GB HBM3', 'dtype': 'bfloat16', 'timing': 'cuda_events',
            'median_s': median, **extra}
    return {'group': group, 'name': f'bench[{impl}]', 'fullname': f'benchmarks/{file}::bench[{impl}-{group}]',
            'params': {'impl': impl}, 'extra_info': info,
            'stats': {'median': stats_median if stats_median is not None else median * 1.1, 'rounds': 5}}


def _synthetic(path: Path) -> Path:
    train, fwd = 'train step MPLumiere cuda bfloat16 karras64', 'forward MPLumiere cuda bfloat16 karras64'
    e2e = dict(model='MPLumiere')
    benches = [
        _bench(train, 'lumiere_fast', 0.010, phase='train step', peak_mem_MiB=1000., **e2e),
        _bench(train, 'upstream', 0.020, phase='train step', peak_mem_MiB=1500., **e2e),
        _bench(train, 'upstream_compiled', 0.013, phase='train step', peak_mem_MiB=1600., **e2e),
        _bench(fwd, 'lumiere_fast', 0.004, phase='forward', peak_mem_MiB=300., **e2e),
        _bench(fwd, 'upstream', 0.0048, phase='forward', peak_mem_MiB=400., **e2e),       # no compiled record
        _bench('MPTemporalDownsample forward cuda bfloat16 C=768 8x8', 'lumiere_fast', 2e-5, 'bench_resample.py',
               achieved_GBps=2000., fraction_of_copy=0.6, achieved_TFLOPs=10., fraction_of_gemm=0.02,
               predicted_s=1.25e-5, roofline_bound='copy'),
        _bench('MPTemporalDownsample forward cuda bfloat16 C=768 8x8', 'upstream', 8e-5, 'bench_resample.py',
               predicted_s=1.25e-5, roofline_bound='copy'),
        _bench('MPTemporalDownsample forward cuda bfloat16 C=768 8x8', 'upstream_compiled', 3e-5,
               'bench_resample.py', predicted_s=1.25e-5, roofline_bound='copy'),
        _bench('MPTemporalDownsample forward cuda bfloat16 C=768 8x8', 'cudnn_conv1d', 5e-5, 'bench_resample.py',
               predicted_s=1.25e-5, roofline_bound='copy'),
    ]
    env = {'torch': '2.14.1', 'triton': '3.8.0', 'python': '3.12.3', 'device': 'NVIDIA H100 80GB HBM3',
           'cuda': '13.0', 'device_rates': {'cuda': {'device_copy_GBps': 3000., 'device_bf16_gemm_TFLOPs': 700.}}}
    data = {'machine_info': {'lumiere_env': env, 'cpu': {'brand_raw': 'Xeon'}, 'python_version': '3.12.3'},
            'commit_info': {'id': 'abcdef1234567', 'dirty': False}, 'benchmarks': benches,
            'datetime': '2026-11-25T12:00:00', 'version': '5.1.0'}
    path.write_text(json.dumps(data))
    return path


def test_results_from_synthetic_cuda_records(tmp_path, mr):
    src = _synthetic(tmp_path / 'cuda.json')
    md, png = tmp_path / 'out' / 'RESULTS.md', tmp_path / 'out' / 'chart.png'
    md.parent.mkdir()
    assert mr.main([str(src), '--out', str(md), '--chart', str(png)]) == 0
    text = md.read_text()
    assert _is_png(png)
    assert 'NVIDIA H100 80GB HBM3' in text and 'CPU run' not in text and '2.14.1' in text and '3.8.0' in text
    assert 'cuda_events' in text
    row = _row(text, 'train step MPLumiere cuda bfloat16 karras64')
    # medians come from extra_info['median_s'] (not stats.median, which is 1.1x here)
    assert row[1:6] == ['10 ms', '20 ms', '13 ms', '2.00x', f'{0.013 / 0.010:.2f}x']
    assert row[6:11] == ['1,000', '1,500', '1,600', f'{1000 / 1500:.2f}x', f'{1000 / 1600:.2f}x']
    assert 'train step >= 1.5x eager: met (2.00x)' in row[-1]
    assert 'train step >= 1.2x compiled: met (1.30x)' in row[-1]
    assert 'train step peak memory <= 0.7x compiled: met (0.62x)' in row[-1]
    fwd = _row(text, 'forward MPLumiere cuda bfloat16 karras64')
    assert fwd[3] == '—' and fwd[5] == '—' and fwd[4] == f'{0.0048 / 0.004:.2f}x'
    assert 'inference >= 1.3x eager: **NOT met** (1.20x)' in fwd[-1]
    blocks = _row(text, 'MPTemporalDownsample forward cuda bfloat16 C=768 8x8')
    assert blocks[4] == '4.00x' and '2e+03 GB/s (60% of copy); 10 TFLOP/s (2% of GEMM)' in blocks
    # roofline columns: measured median / predicted_s, per implementation (ours 2e-5, eager 8e-5,
    # compiled 3e-5, cudnn_conv1d 5e-5 against 12.5 us)
    assert blocks[6:10] == ['12.5 us (copy)', '1.60x', '6.40x', '2.40x']
    assert blocks[-1] == 'cudnn_conv1d 50 us (2.50x) [4.00x roofline]'
    assert 'measured/roofline ours' in text and 'measured/roofline x' in text
    assert '| Temporal down/upsample | 1 | 4.00x | 1.50x | 1.60x |' in text
    # the end-to-end section records no prediction: no roofline columns there
    assert row[6:11] == ['1,000', '1,500', '1,600', f'{1000 / 1500:.2f}x', f'{1000 / 1600:.2f}x']
    assert '| inference >= 1.3x eager | forward MPLumiere cuda bfloat16 karras64 | 1.20x | **NOT met** |' in text


def test_roofline_prediction():
    """harness.roofline_seconds / record_rates: predicted_s = max(bytes / copy rate, flops / GEMM rate), the GEMM
    rate of the case's dtype (the one measured where the dtype's is not)."""
    h = _load('harness')
    cuda = {'device_copy_GBps': 2000., 'device_bf16_gemm_TFLOPs': 500.}
    cpu = {'device_copy_GBps': 10., 'device_fp32_gemm_TFLOPs': 0.1}
    # bytes-bound: 4e9 B / 2e12 B/s = 2 ms > 1e11 FLOP / 5e14 FLOP/s = 0.2 ms
    assert h.roofline_seconds(cuda, 'bfloat16', nbytes=4e9, flops=1e11) == (pytest.approx(2e-3), 'copy')
    assert h.roofline_seconds(cuda, 'bfloat16', nbytes=4e8, flops=1e12) == (pytest.approx(2e-3), 'gemm')
    assert h.roofline_seconds(cpu, 'float32', flops=1e9) == (pytest.approx(1e-2), 'gemm')
    assert h.gemm_rate(cuda, 'float32') == ('device_bf16_gemm_TFLOPs', 500.)     # only bf16 measured on CUDA
    assert h.gemm_rate(cuda, 'float16') == ('device_bf16_gemm_TFLOPs', 500.)
    assert h.roofline_seconds({}, 'float32', nbytes=1, flops=1) is None

    class Fake:
        disabled, stats = False, None

        def __init__(self):
            self.extra_info = {'dtype': 'float32', 'median_s': 4e-2}

    b = Fake()
    h.record_rates(b, cpu, nbytes=2e8, flops=1e9)           # 20 ms (copy) vs 10 ms (gemm)
    assert b.extra_info['predicted_s'] == pytest.approx(2e-2) and b.extra_info['roofline_bound'] == 'copy'
    assert b.extra_info['roofline_gemm'] == 'device_fp32_gemm_TFLOPs'
    assert b.extra_info['fraction_of_copy'] == 0.5 and b.extra_info['fraction_of_gemm'] == 0.25


def test_timing_less_json_is_refused(tmp_path, mr, capsys):
    """A --benchmark-disable run records no stats: make_results says so instead of writing empty tables."""
    src = tmp_path / 'disabled.json'
    src.write_text(json.dumps({'machine_info': {}, 'commit_info': {}, 'benchmarks': [
        {'group': 'g', 'name': 'n', 'fullname': 'benchmarks/bench_fold.py::n', 'extra_info': {'impl': 'lumiere_fast'},
         'stats': None}]}))
    out = tmp_path / 'R.md'
    assert mr.main([str(src), '--out', str(out)]) == 2
    assert '--benchmark-disable' in capsys.readouterr().err and not out.exists()
    # pytest-benchmark writes no JSON at all under --benchmark-disable: a missing file gets the same answer
    assert mr.main([str(tmp_path / 'never_written.json'), '--out', str(out)]) == 2
    assert 'no such file' in capsys.readouterr().err and not out.exists()


def test_profile_step_cpu_and_where_the_time_goes(tmp_path, mr):
    prof = tmp_path / 'profile.json'
    proc = subprocess.run([sys.executable, 'benchmarks/profile_step.py', '--device', 'cpu', '--config', 'tiny',
                           '--steps', '1', '--warmup', '0', '--top', '15', '--out', str(prof)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p = json.loads(prof.read_text())
    assert p['device'] == 'cpu' and p['time_kind'] == 'self CPU time' and 0 < len(p['top']) <= 15
    assert [t['self_s'] for t in p['top']] == sorted((t['self_s'] for t in p['top']), reverse=True)
    assert sum(t['pct'] for t in p['top']) <= 100.01
    assert abs(sum(c['pct'] for c in p['categories']) - 100.) < 0.01
    md = tmp_path / 'R.md'
    assert mr.main([str(_synthetic(tmp_path / 'c.json')), '--out', str(md), '--profile', str(prof)]) == 0
    text = md.read_text()
    assert '## Where the time goes' in text and p['top'][0]['name'][:30] in text


def test_profile_categories():
    ps = _load('profile_step')
    assert ps.categorize('mp_attn_core_fwd_kernel').startswith('Triton')
    assert ps.categorize('triton_poi_fused_add_0').startswith('Triton')
    assert ps.categorize('void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>') \
        == 'elementwise'
    assert ps.categorize('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64') == 'GEMM'
    assert ps.categorize('aten::mkldnn_convolution') == 'convolution'
    assert ps.categorize('void at::native::(anonymous namespace)::multi_tensor_apply_kernel<Adam>') == 'optimizer'
