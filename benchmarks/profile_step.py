#!/usr/bin/env python
"""Where the time of an end-to-end training step goes: torch.profiler over a few MPLumiere / Lumiere steps.

    python benchmarks/profile_step.py --device cuda --out profile.json            # karras64, bf16, ours
    python benchmarks/profile_step.py --device cpu --config tiny --out profile.json
    python benchmarks/profile_step.py --device cuda --impl upstream --out profile_upstream.json

The step is bench_end_to_end.py's 'train step' (zero_grad, forward under autocast, backward, AdamW over the
temporal parameters) on the same model. After ``--warmup`` untimed steps (compilation, autotuning), ``--steps``
steps are profiled. On CUDA the entries are GPU kernels ranked by self device time; on CPU, the aten ops ranked
by self CPU time. The JSON holds, per step: the wall time, the total self time, the top ``--top`` entries (name,
category, calls, self time, % of the total) and the same time by category (GEMM, convolution, attention,
Triton kernels, elementwise, reduction/norm, copy/layout, optimizer, other). make_results.py renders it under
"Where the time goes",
with the frozen KarrasUnet's own time on the same frames (forward + backward into its input) as the floor
that no temporal kernel can remove.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    'karras64': dict(image_size=64, dim=192, batch=2, frames=16),
    'readme': dict(image_size=256, dim=8, batch=2, frames=8),
    'cpu-small': dict(image_size=64, dim=8, batch=1, frames=8),
    'tiny': dict(image_size=16, dim=8, batch=1, frames=8),     # T: 3 temporal downsamples need 8 | T
}

# first match wins. A Triton kernel shows under its bare @triton.jit name (lumiere_fast's end in _kernel,
# inductor's start with triton_); ATen's CUDA kernels are C++ signatures ('void at::native::...').
TRITON_NAME = r'^(triton_\w+|\w+_kernel)$'
CATEGORIES = [
    ('optimizer', r'adam|optim|_foreach|multi_tensor'),
    ('Triton kernels (ours; inductor: triton_*)', TRITON_NAME),
    ('attention', r'flash|fmha|attention|sdpa|_efficient_attention|softmax'),
    ('GEMM', r'gemm|cutlass|sm90_xmma|sm80_xmma|ampere_|hopper|cublas|\bmm\b|addmm|bmm|matmul|linear|nvjet'),
    ('convolution', r'conv|cudnn|implicit|winograd|dgrad|wgrad|fprop'),
    ('reduction / norm', r'reduce|norm|sum|mean|var|layer_norm|group_norm'),
    ('copy / layout', r'copy|memcpy|memset|cat|contiguous|transpose|permute|clone|fill|index|gather|scatter'),
    ('elementwise', r'elementwise|vectorized|unrolled|mul|add|div|sub|silu|gelu|sigmoid|exp|sqrt|where|pow|clamp'),
]


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name if pattern is TRITON_NAME else name.lower()):
            return cat
    return 'other'


def _self_time_us(evt, cuda: bool) -> float:
    if cuda:
        for attr in ('self_device_time_total', 'self_cuda_time_total'):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.
    return float(evt.self_cpu_time_total)


def _unet_only_seconds(cfg, device, dtype, autocast, steps, sync) -> float:
    """Median wall time of the frozen KarrasUnet alone on the same B*T frames, forward + backward into its
    input (what a Lumiere training step must also do to reach the temporal parameters): the part of the step
    that no temporal kernel can remove."""
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(image_size=cfg['image_size'], dim=cfg['dim'], channels=3, dim_max=768, dropout=0.).to(device)
    unet.requires_grad_(False)
    n, s = cfg['batch'] * cfg['frames'], cfg['image_size']
    x = torch.randn(n, 3, s, s, device=device, requires_grad=True)
    tm = torch.rand(n, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = unet(x, time=tm)
        out.float().square().mean().backward()

    step()
    sync()
    times = []
    for _ in range(max(steps, 1)):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(args) -> dict:
    from bench_end_to_end import build
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('profile_step.py: --device cuda but no CUDA device here (use --device cpu --config tiny)')
    cfg = CONFIGS[args.config]
    dtype = getattr(torch, args.dtype)
    autocast = dtype != torch.float32
    family = '' if args.model == 'Lumiere' else 'MP'
    model = build(args.impl, family, device, cfg['image_size'], cfg['dim']).train()
    run = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t, s = cfg['batch'], cfg['frames'], cfg['image_size']
    video = torch.randn(b, 3, t, s, s, device=device)
    tm = torch.rand(b, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = run(video, time=tm)
        out.float().square().mean().backward()
        opt.step()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps

    unet_s = _unet_only_seconds(cfg, device, dtype, autocast, args.steps, sync) if args.unet_baseline else None

    cuda = device.type == 'cuda'
    rows = []
    for evt in prof.key_averages():
        us = _self_time_us(evt, cuda)
        if us <= 0:
            continue
        if cuda and getattr(evt, 'self_cpu_time_total', 0) > 0 and getattr(evt, 'device_type', None) is not None \
                and str(evt.device_type).endswith('CPU'):
            continue        # an op's launch-side entry; its kernels are counted as their own entries
        rows.append((evt.key, us, evt.count))
    total = sum(us for _, us, _ in rows) or 1.
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = {}
    for name, us, _ in rows:
        cats[categorize(name)] = cats.get(categorize(name), 0.) + us
    n = args.steps
    return {
        'device': device.type,
        'device_name': torch.cuda.get_device_name(device) if cuda else 'cpu',
        'impl': args.impl + (' (torch.compile)' if args.compile else ''),
        'model': args.model, 'phase': 'train step', 'dtype': args.dtype,
        'config': f"{args.config}: image {s}, dim {cfg['dim']}, dim_max 768, B={b}, T={t}",
        'steps': n, 'warmup': args.warmup,
        'time_kind': 'self device time' if cuda else 'self CPU time',
        'step_s': wall, 'total_self_s': total / 1e6 / n, 'unet_only_step_s': unet_s,
        'torch': torch.__version__,
        'top': [{'name': name, 'category': categorize(name), 'calls': count / n, 'self_s': us / 1e6 / n,
                 'pct': 100. * us / total} for name, us, count in rows[:args.top]],
        'categories': [{'category': c, 'self_s': us / 1e6 / n, 'pct': 100. * us / total}
                       for c, us in sorted(cats.items(), key=lambda kv: -kv[1])],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    ap.add_argument('--config', default=None, choices=sorted(CONFIGS),
                    help='model size (default: karras64 on CUDA, cpu-small on CPU)')
    ap.add_argument('--model', default='MPLumiere', choices=['MPLumiere', 'Lumiere'])
    ap.add_argument('--impl', default='lumiere_fast', choices=['lumiere_fast', 'upstream'])
    ap.add_argument('--compile', action='store_true', help='torch.compile the model (as upstream_compiled)')
    ap.add_argument('--dtype', default=None, choices=['bfloat16', 'float32'],
                    help='autocast dtype (default: bfloat16 on CUDA, float32 on CPU)')
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--top', type=int, default=15)
    ap.add_argument('--no-unet-baseline', dest='unet_baseline', action='store_false',
                    help='skip timing the bare KarrasUnet on the same frames')
    ap.add_argument('--out', default='profile.json')
    args = ap.parse_args(argv)
    args.config = args.config or ('karras64' if args.device == 'cuda' else 'cpu-small')
    args.dtype = args.dtype or ('bfloat16' if args.device == 'cuda' else 'float32')
    result = profile(args)
    with open(args.out, 'w') as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}: {result['step_s'] * 1e3:.1f} ms/step; top: "
          + ', '.join(f"{t['name'][:40]} {t['pct']:.0f}%" for t in result['top'][:3]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
