"""Benchmark fixtures: ours vs upstream lumiere-pytorch on the same inputs, in one process.

Run: ``pytest benchmarks/ --benchmark-only`` (or ``--benchmark-disable`` for a quick smoke run, as CI does).
CUDA cases skip with a reason on machines without a GPU; the CPU cases always run.
"""

from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch

warnings.filterwarnings('ignore', category=FutureWarning)

DEVICES = ['cpu', 'cuda']


def device_or_skip(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        pytest.skip('CUDA case: no CUDA device on this machine')
    return torch.device(name)


def upstream_or_skip():
    return pytest.importorskip('lumiere_pytorch', reason='baseline needs lumiere-pytorch==0.0.24 (test extra)')


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, iters: int = 50) -> float:
    """Median wall time of fn() with a device sync after each call, after one untimed call (for the reference
    rates measured once per session: copy bandwidth, cuBLAS GEMM)."""
    fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
