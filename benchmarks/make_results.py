#!/usr/bin/env python
"""pytest-benchmark JSON -> benchmarks/RESULTS.md (tables) and a PNG chart of speedups. Nothing is typed by hand.

    python benchmarks/make_results.py results.json [more.json ...] --out benchmarks/RESULTS.md \\
        --chart benchmarks/speedup.png [--profile profile.json ...]

Records follow the schema in benchmarks/README.md: ``group`` = the case, ``extra_info['impl']`` = the
implementation ('lumiere_fast' = ours, 'upstream' = lumiere-pytorch eager, 'upstream_compiled' =
torch.compile(upstream), anything else = another baseline). The median of a record is
``extra_info['median_s']`` (CUDA events, harness.run_benchmark) where present, else pytest-benchmark's
``stats.median``. Ratios are baseline median / ours median in one group (> 1: ours is faster); the memory
ratio is ours peak / baseline peak (< 1: ours uses less). The roofline columns are measured median /
``extra_info['predicted_s']`` (harness.roofline_seconds: max(bytes / copy rate, flops / GEMM rate) from the
device's measured rates) of each implementation: 1.00x is at the roofline, 2.00x takes twice the predicted time.

A JSON from a ``--benchmark-disable`` run holds no timings: such files are refused with a message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

OURS, EAGER, COMPILED = 'lumiere_fast', 'upstream', 'upstream_compiled'
SECTIONS = OrderedDict([
    ('bench_end_to_end.py', 'End to end: MPLumiere / Lumiere around a KarrasUnet'),
    ('bench_conv_block.py', 'Temporal conv blocks'),
    ('bench_resample.py', 'Temporal down/upsample'),
    ('bench_attention.py', 'Temporal attention blocks'),
    ('bench_temporal_conv1d.py', 'Temporal conv1d'),
    ('bench_fold.py', 'Frame fold / unfold'),
    ('bench_karras.py', 'The frozen KarrasUnet: fast image model'),
    ('bench_host_overhead.py', 'Host time per op call (eager path vs the custom op; CPU rows: kernels stubbed)'),
])


class NoTimings(SystemExit):
    pass


@dataclass
class Record:
    file: str
    group: str
    impl: str
    median: float | None
    timing: str
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ loading

def _impl_of(bench: dict) -> str:
    return bench.get('extra_info', {}).get('impl') or bench.get('params', {}).get('impl') or '?'


def load(paths: list[str]) -> tuple[list[Record], dict]:
    """Records of every timed benchmark in ``paths`` and the run's environment (first file's)."""
    records: list[Record] = []
    env: dict = {}
    for path in paths:
        if not os.path.exists(path):
            raise NoTimings(f'{path}: no such file (pytest-benchmark writes no JSON under --benchmark-disable; run '
                            f'`pytest benchmarks --benchmark-only --benchmark-json={path}`)')
        with open(path) as fh:
            data = json.load(fh)
        benches = data.get('benchmarks', [])
        timed = [b for b in benches if b.get('stats') or 'median_s' in b.get('extra_info', {})]
        if not timed:
            raise NoTimings(f'{path}: no timed benchmark in this JSON ({len(benches)} records without stats). Was it '
                            f'made with --benchmark-disable? Run `pytest benchmarks --benchmark-only '
                            f'--benchmark-json={path}` to record timings.')
        if not env:
            mi = data.get('machine_info', {})
            env = dict(mi.get('lumiere_env', {}))
            env.setdefault('python', mi.get('python_version'))
            env['cpu'] = (mi.get('cpu') or {}).get('brand_raw') or mi.get('processor') or mi.get('machine')
            env['node'] = mi.get('node')
            env['datetime'] = data.get('datetime')
            ci = data.get('commit_info', {})
            env['commit'] = f"{(ci.get('id') or '?')[:10]}{' (dirty tree)' if ci.get('dirty') else ''}"
            env['pytest_benchmark'] = data.get('version')
        for b in timed:
            extra = b.get('extra_info', {})
            median = extra.get('median_s')
            median = median if median is not None else (b.get('stats') or {}).get('median')
            file = os.path.basename(b.get('fullname', '').split('::')[0]) or '?'
            records.append(Record(file, b.get('group') or b.get('name'), _impl_of(b), median,
                                  extra.get('timing', 'pytest-benchmark'), extra))
    return records, env


def grouped(records: list[Record]) -> OrderedDict:
    """{file: {group: {impl: Record}}}, files in SECTIONS order then any others, groups in run order."""
    out: OrderedDict = OrderedDict((f, OrderedDict()) for f in SECTIONS)
    for r in records:
        out.setdefault(r.file, OrderedDict()).setdefault(r.group, {})[r.impl] = r
    return OrderedDict((f, g) for f, g in out.items() if g)


# ------------------------------------------------------------------------------------------------ numbers

def ratio(group: dict, baseline: str) -> float | None:
    """baseline median / ours median (> 1: ours is faster)."""
    ours, base = group.get(OURS), group.get(baseline)
    if not ours or not base or not ours.median or not base.median:
        return None
    return base.median / ours.median


def mem_ratio(group: dict, baseline: str) -> float | None:
    """ours peak memory / baseline peak memory (< 1: ours uses less)."""
    ours, base = group.get(OURS), group.get(baseline)
    a = ours and ours.extra.get('peak_mem_MiB')
    b = base and base.extra.get('peak_mem_MiB')
    return a / b if a and b else None


def predicted(group: dict) -> Record | None:
    """The group's record that carries the roofline prediction (ours where it has one: every impl of a case gets
    the same bytes/FLOPs, hence the same prediction)."""
    for r in sorted(group.values(), key=lambda r: r.impl != OURS):
        if r.extra.get('predicted_s'):
            return r
    return None


def roofline_ratio(group: dict, impl: str) -> float | None:
    """measured median / roofline-predicted time of ``impl`` in this group (1: at the roofline; > 1: slower)."""
    r, fallback = group.get(impl), predicted(group)
    if r is None or not r.median:
        return None
    pred = r.extra.get('predicted_s') or (fallback.extra['predicted_s'] if fallback else None)
    return r.median / pred if pred else None


@dataclass
class Target:
    name: str
    file: str
    phase: str
    model: str
    check: str          # 'eager', 'compiled', 'mem_compiled'
    bound: float


# The targets (bf16 on CUDA, meant for an H100): checked on every matching group of a CUDA run.
TARGETS = [
    Target('train step >= 1.5x eager', 'bench_end_to_end.py', 'train step', 'MPLumiere', 'eager', 1.5),
    Target('train step >= 1.2x compiled', 'bench_end_to_end.py', 'train step', 'MPLumiere', 'compiled', 1.2),
    Target('train step peak memory <= 0.7x compiled', 'bench_end_to_end.py', 'train step', 'MPLumiere',
           'mem_compiled', 0.7),
    Target('inference >= 1.3x eager', 'bench_end_to_end.py', 'forward', 'MPLumiere', 'eager', 1.3),
]


def _applies(target: Target, file: str, group: dict) -> bool:
    ours = group.get(OURS)
    if ours is None or file != target.file:
        return False
    x = ours.extra
    return (x.get('phase') == target.phase and x.get('model') == target.model and x.get('dtype') == 'bfloat16'
            and x.get('device', 'cpu') != 'cpu')


def target_results(file: str, group: dict) -> list[tuple[Target, float | None, bool | None]]:
    """(target, measured value, met) for each target that applies to this group (value None: not measured)."""
    out = []
    for t in TARGETS:
        if not _applies(t, file, group):
            continue
        if t.check == 'eager':
            v = ratio(group, EAGER)
        elif t.check == 'compiled':
            v = ratio(group, COMPILED)
        else:
            v = mem_ratio(group, COMPILED)
        met = None if v is None else (v >= t.bound if t.check != 'mem_compiled' else v <= t.bound)
        out.append((t, v, met))
    ours = group.get(OURS)
    if file == 'bench_fold.py' and ours and 'target_ratio_to_clone' in ours.extra \
            and ours.extra.get('device', 'cpu') != 'cpu' and 'ratio_to_clone' in ours.extra:
        t = Target(f"GB/s >= {ours.extra['target_ratio_to_clone']}x clone", file, '', '', 'clone',
                   ours.extra['target_ratio_to_clone'])
        v = ours.extra['ratio_to_clone']
        out.append((t, v, v >= t.bound))
    return out


# ------------------------------------------------------------------------------------------------ formatting

def fmt_time(s: float | None) -> str:
    if s is None:
        return '—'
    for unit, scale in (('s', 1.), ('ms', 1e-3), ('us', 1e-6)):
        if s >= scale or unit == 'us':
            v = s / scale
            return f'{v:.3g} {unit}' if v < 100 else f'{v:.0f} {unit}'
    return '—'


def fmt_ratio(r: float | None, suffix: str = 'x') -> str:
    return '—' if r is None else f'{r:.2f}{suffix}'


def fmt_mem(group: dict, impl: str) -> str:
    r = group.get(impl)
    v = r and r.extra.get('peak_mem_MiB')
    return '—' if v is None else f'{v:,.0f}'


def fmt_rate(r: Record | None) -> str:
    if r is None:
        return '—'
    parts = []
    x = r.extra
    if 'achieved_GBps' in x:
        frac = f" ({100 * x['fraction_of_copy']:.0f}% of copy)" if 'fraction_of_copy' in x else ''
        parts.append(f"{x['achieved_GBps']:.3g} GB/s{frac}")
    if 'achieved_TFLOPs' in x:
        frac = f" ({100 * x['fraction_of_gemm']:.0f}% of GEMM)" if 'fraction_of_gemm' in x else ''
        parts.append(f"{x['achieved_TFLOPs']:.3g} TFLOP/s{frac}")
    if 'ratio_to_clone' in x:
        parts.append(f"{x['ratio_to_clone']:.2f}x clone")
    return '; '.join(parts) or '—'


def fmt_others(group: dict) -> str:
    parts = []
    for impl, r in group.items():
        if impl in (OURS, EAGER, COMPILED):
            continue
        rr, roof = ratio(group, impl), roofline_ratio(group, impl)
        parts.append(f"{impl} {fmt_time(r.median)}" + (f" ({rr:.2f}x)" if rr is not None else '')
                     + (f" [{roof:.2f}x roofline]" if roof is not None else ''))
    return '; '.join(parts) or '—'


def fmt_prediction(group: dict) -> str:
    r = predicted(group)
    return '—' if r is None else f"{fmt_time(r.extra['predicted_s'])} ({r.extra.get('roofline_bound', '?')})"


def fmt_targets(results) -> str:
    if not results:
        return '—'
    cells = []
    for t, v, met in results:
        val = '—' if v is None else f'{v:.2f}x'
        cells.append(f"{t.name}: {'not measured' if met is None else 'met' if met else '**NOT met**'} ({val})")
    return '; '.join(cells)


def _cell(text: str) -> str:
    return text.replace('|', '\\|')


def section_table(file: str, groups: OrderedDict) -> list[str]:
    has_mem = any(r.extra.get('peak_mem_MiB') is not None for g in groups.values() for r in g.values())
    has_others = any(i not in (OURS, EAGER, COMPILED) for g in groups.values() for i in g)
    has_rate = any(any(k in r.extra for k in ('achieved_GBps', 'achieved_TFLOPs', 'ratio_to_clone'))
                   for g in groups.values() for r in g.values())
    has_targets = any(target_results(file, g) for g in groups.values())
    has_roof = any(predicted(g) for g in groups.values())
    head = ['case', 'ours', 'eager', 'compiled', 'eager/ours', 'compiled/ours']
    if has_roof:
        head += ['roofline time (bound)', 'measured/roofline ours', 'measured/roofline eager',
                 'measured/roofline compiled']
    if has_mem:
        head += ['peak MiB ours', 'peak MiB eager', 'peak MiB compiled', 'mem ours/eager', 'mem ours/compiled']
    if has_rate:
        head += ['ours: achieved rate']
    if has_others:
        head += ['other baselines (median, baseline/ours' + (', [measured/roofline]' if has_roof else '') + ')']
    if has_targets:
        head += ['targets']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, g in groups.items():
        row = [name, fmt_time(g[OURS].median if OURS in g else None),
               fmt_time(g[EAGER].median if EAGER in g else None),
               fmt_time(g[COMPILED].median if COMPILED in g else None),
               fmt_ratio(ratio(g, EAGER)), fmt_ratio(ratio(g, COMPILED))]
        if has_roof:
            row += [fmt_prediction(g)] + [fmt_ratio(roofline_ratio(g, i)) for i in (OURS, EAGER, COMPILED)]
        if has_mem:
            row += [fmt_mem(g, OURS), fmt_mem(g, EAGER), fmt_mem(g, COMPILED),
                    fmt_ratio(mem_ratio(g, EAGER)), fmt_ratio(mem_ratio(g, COMPILED))]
        if has_rate:
            row += [fmt_rate(g.get(OURS))]
        if has_others:
            row += [fmt_others(g)]
        if has_targets:
            row += [fmt_targets(target_results(file, g))]
        lines.append('| ' + ' | '.join(_cell(c) for c in row) + ' |')
    return lines


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def profile_section(profiles: list[dict]) -> list[str]:
    lines = ['## Where the time goes', '']
    for p in profiles:
        kind = p.get('time_kind', 'self time')
        lines += [f"### {p.get('impl', '?')} {p.get('model', '')} {p.get('phase', '')}, {p.get('config', '')}, "
                  f"{p.get('dtype', '')} on {p.get('device_name', p.get('device', '?'))}", '',
                  f"torch.profiler over {p.get('steps', '?')} steps after warm-up; per step: "
                  f"{fmt_time(p.get('step_s'))} wall, {fmt_time(p.get('total_self_s'))} total {kind} "
                  f"(percentages below are of that total).", '']
        u, st = p.get('unet_only_step_s'), p.get('step_s')
        if u and st and u >= st:
            lines += [f"The frozen KarrasUnet alone on the same frames took {fmt_time(u)} per step, not less than "
                      f"the whole step ({fmt_time(st)}): timing noise (see the load average), so this run gives no "
                      f"split between the KarrasUnet and the temporal layers.", '']
        elif u and st:
            lines += [f"The frozen KarrasUnet alone on the same frames (forward + backward into its input) takes "
                      f"{fmt_time(u)} per step, {100 * u / st:.0f}% of this step: the temporal layers, the wrapper "
                      f"and the optimizer take the other {fmt_time(max(st - u, 0.))} "
                      f"({100 * max(st - u, 0.) / st:.0f}%). Even with free temporal layers this step could get at "
                      f"most {st / u:.2f}x faster.", '']
        cats = p.get('categories') or []
        if cats:
            lines += ['| category | per step | % |', '|---|---|---|']
            lines += [f"| {c['category']} | {fmt_time(c['self_s'])} | {c['pct']:.1f} |" for c in cats]
            lines.append('')
        top = p.get('top') or []
        if top:
            lines += [f'| # | top by {kind} | category | calls/step | per step | % |', '|---|---|---|---|---|---|']
            for i, t in enumerate(top, 1):
                name = t['name'] if len(t['name']) <= 90 else t['name'][:87] + '...'
                lines.append(f"| {i} | `{_cell(name)}` | {t.get('category', '')} | {t.get('calls', 0):g} | "
                             f"{fmt_time(t['self_s'])} | {t['pct']:.1f} |")
            lines.append('')
        if cats and top:
            c0, t0 = cats[0], top[0]
            lines += [f"Largest share: **{c0['category']}** ({c0['pct']:.0f}% of {kind}); the single largest entry "
                      f"is `{_cell(t0['name'][:80])}` ({t0['pct']:.0f}%). The top {len(top)} entries cover "
                      f"{sum(t['pct'] for t in top):.0f}%: the next step is the largest category above.", '']
    return lines


def render(records: list[Record], env: dict, profiles: list[dict], chart_rel: str | None) -> str:
    sections = grouped(records)
    on_cpu_only = all(r.extra.get('device', 'cpu') == 'cpu' for r in records)
    timing = sorted({r.timing for r in records})
    lines = ['# Benchmark results', '',
             '_Generated by `benchmarks/make_results.py` from pytest-benchmark JSON; do not edit by hand._', '']
    if on_cpu_only:
        lines += [f"**CPU run** on {env.get('device') or env.get('cpu')} ({env.get('cpu')}): no GPU was available, so "
                  'every CUDA case was skipped and these are the small CPU smoke cases only. CPU numbers say '
                  'nothing about the CUDA targets; on CPU `lumiere_fast` runs its PyTorch reference ops.', '']
    lines += ['| | |', '|---|---|',
              f"| device | {env.get('device', '?')} |",
              f"| CPU | {env.get('cpu', '?')} ({env.get('torch_threads', '?')} torch threads) |",
              f"| date | {env.get('datetime', '?')} |",
              f"| commit | {env.get('commit', '?')} |",
              f"| torch | {env.get('torch', '?')} (CUDA {env.get('cuda') or 'none'}) |",
              f"| triton | {env.get('triton') or 'not installed'} |",
              f"| python | {env.get('python', '?')} |",
              f"| lumiere-pytorch (upstream) | {env.get('lumiere_pytorch') or 'not installed'} |",
              f"| LUMIERE_FAST_BACKEND | {env.get('backend', '?')} |",
              f"| median from | {', '.join(timing)} |"]
    if env.get('load_average'):
        lines.append(f"| load average at the end (1, 5, 15 min) | {', '.join(map(str, env['load_average']))} "
                     f"(other processes on the machine skew timings when this exceeds the core count) |")
    for dev, rates in (env.get('device_rates') or {}).items():
        desc = ', '.join(f'{k.replace("device_", "")} {v}' for k, v in rates.items())
        lines.append(f'| measured {dev} rates | {desc} |')
    lines += ['', 'Columns: medians of ours (`lumiere_fast`), upstream `lumiere-pytorch` eager, and '
              '`torch.compile(upstream)`; ratios are baseline / ours (> 1: ours is faster); `mem ours/x` is ours '
              'peak / x peak (`torch.cuda.max_memory_allocated`, < 1: ours uses less). `measured/roofline x` is x\'s '
              'median / the roofline time predicted from the device\'s measured rates, max(bytes / copy rate, '
              'FLOPs / GEMM rate) (`roofline_bound`: which term sets it); 1.00x is at the roofline, larger is '
              'further from it. — : not run (e.g. no compiled baseline on CPU). benchmarks/README.md describes '
              'each column.', '']

    all_targets = [(f, name, tr) for f, gs in sections.items() for name, g in gs.items()
                   for tr in target_results(f, g)]
    lines += ['## Targets', '']
    if not all_targets:
        lines += ['The issue\'s targets are for bf16 on CUDA (an H100): no case of this run is one, so none is '
                  'checked here.', '']
    else:
        lines += ['| target | case | measured | result |', '|---|---|---|---|']
        for f, name, (t, v, met) in all_targets:
            lines.append(f"| {t.name} | {_cell(name)} | {fmt_ratio(v)} | "
                         f"{'not measured' if met is None else 'met' if met else '**NOT met**'} |")
        lines.append('')

    lines += ['## Summary (geometric mean of ratios per section)', '',
              '| section | cases | eager/ours | compiled/ours | measured/roofline ours |', '|---|---|---|---|---|']
    for f, gs in sections.items():
        lines.append(f"| {SECTIONS.get(f, f)} | {len(gs)} | "
                     f"{fmt_ratio(_geomean([ratio(g, EAGER) for g in gs.values()]))} | "
                     f"{fmt_ratio(_geomean([ratio(g, COMPILED) for g in gs.values()]))} | "
                     f"{fmt_ratio(_geomean([roofline_ratio(g, OURS) for g in gs.values()]))} |")
    lines.append('')
    if chart_rel:
        lines += [f'![speedups]({chart_rel})', '']

    for f, gs in sections.items():
        lines += [f'## {SECTIONS.get(f, f)} (`{f}`)', '']
        lines += section_table(f, gs)
        lines.append('')
    if profiles:
        lines += profile_section(profiles)
    return '\n'.join(lines).rstrip() + '\n'


# ------------------------------------------------------------------------------------------------ chart

def chart(records: list[Record], path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    sections = grouped(records)
    rows = []       # (section, label, {baseline: ratio})
    for f, gs in sections.items():
        for name, g in gs.items():
            ratios = {impl: ratio(g, impl) for impl in g if impl != OURS}
            ratios = {k: v for k, v in ratios.items() if v}
            if ratios:
                rows.append((f, name, ratios))
    baselines = sorted({b for _, _, r in rows for b in r}, key=lambda b: (b != EAGER, b != COMPILED, b))
    widest = max((len(r) for _, _, r in rows), default=1)
    height = max(2.5, len(rows) * (0.2 + 0.07 * min(widest, 4)) + 1.5)
    fig, ax = plt.subplots(figsize=(13, min(height, 250)))
    if not rows:
        ax.text(0.5, 0.5, 'no group has ours and a baseline', ha='center', va='center')
        ax.set_axis_off()
    else:
        colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
        color = {b: colors[j % len(colors)] for j, b in enumerate(baselines)}
        labelled = set()
        for i, (_, _, r) in enumerate(rows):
            present = [b for b in baselines if b in r]
            h = 0.8 / len(present)
            for k, b in enumerate(present):      # each row's bars centred on its label
                ax.barh(i - 0.4 + h * (k + 0.5), r[b], height=h, color=color[b],
                        label=None if b in labelled else f'{b} / ours')
                labelled.add(b)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([(name if len(name) < 72 else name[:69] + '...') for _, name, _ in rows], fontsize=6)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xscale('log')
        ax.axvline(1.0, color='black', linewidth=0.8)
        ax.set_xlabel('speedup of lumiere_fast (baseline median / ours median; > 1: ours faster; log scale)')
        ax.legend(loc='best', fontsize=7)
        ax.grid(axis='x', which='both', alpha=0.3)
    devices = sorted({r.extra.get('device', 'cpu') for r in records})
    ax.set_title(f"lumiere_fast speedups ({', '.join(devices)})")
    fig.subplots_adjust(left=0.42, right=0.98, top=1 - 0.5 / fig.get_figheight(), bottom=0.8 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('json', nargs='+', help='pytest-benchmark --benchmark-json files (one run, or several parts)')
    ap.add_argument('--out', default='benchmarks/RESULTS.md')
    ap.add_argument('--chart', default=None, help='PNG path of the speedup chart (default: none)')
    ap.add_argument('--profile', action='append', default=[], help="profile_step.py JSON ('Where the time goes')")
    args = ap.parse_args(argv)
    try:
        records, env = load(args.json)
    except NoTimings as e:
        print(f'make_results.py: {e}', file=sys.stderr)
        return 2
    profiles = []
    for p in args.profile:
        with open(p) as fh:
            profiles.append(json.load(fh))
    chart_rel = None
    if args.chart:
        chart(records, args.chart)
        chart_rel = os.path.relpath(args.chart, os.path.dirname(os.path.abspath(args.out)) or '.')
    text = render(records, env, profiles, chart_rel)
    with open(args.out, 'w') as fh:
        fh.write(text)
    print(f'wrote {args.out} ({len(records)} records)' + (f' and {args.chart}' if args.chart else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
