"""Benchmark fixtures and pytest hooks; the helpers the bench_* files import are in ``harness.py`` (see there for
how cases are timed and recorded)."""

from __future__ import annotations

import warnings

import pytest
import torch

from harness import SESSION_ENV, environment, measure_rates

warnings.filterwarnings('ignore', category=FutureWarning)


@pytest.fixture(scope='session')
def device_rates(request):
    """``rates(device)`` -> the device's copy GB/s and GEMM TFLOP/s, measured once per run and device
    (nothing under --benchmark-disable, where no rate would be recorded)."""
    cache: dict = {}
    disabled = request.config.getoption('benchmark_disable', False)

    def rates(device: torch.device) -> dict:
        if disabled:
            return {}
        if device.type not in cache:
            cache[device.type] = measure_rates(device)
            SESSION_ENV.setdefault('device_rates', {})[device.type] = cache[device.type]
        return cache[device.type]

    return rates


def pytest_benchmark_update_machine_info(config, machine_info):
    """The JSON's machine_info['lumiere_env']: versions, device, the once-measured device rates."""
    machine_info['lumiere_env'] = {**environment(), **SESSION_ENV}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
