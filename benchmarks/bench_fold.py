"""Frame fold / unfold: ours vs the einops rearrange + .contiguous() reference vs x.clone() of the same tensor.

A fold/unfold is a pure copy, so x.clone() (a plain device copy of the same bytes) is its speed of light. Each
case records the achieved GB/s (read + write: 2 * bytes / median time) and, for ours and einops, the ratio to
x.clone()'s GB/s on the same tensor (issue 3's target for ours: >= 0.85).

CUDA: bf16 at the conv levels of a 64x64 KarrasUnet (dim 192, dim_max 768), B=2, T=16. CPU: one small fp32
shape as a smoke case (there `lumiere_fast` runs whatever dispatch picks: the reference under the default
backend, since the Triton kernels are for CUDA tensors).
"""

from __future__ import annotations


import pytest
import torch

from conftest import DEVICES, device_or_skip, median_seconds, sync
from lumiere_fast import backend, ops

BATCH, FRAMES = 2, 16
LEVELS = {  # (channels, height=width)
    'cpu': [(32, 16)],
    'cuda': [(192, 64), (384, 32), (768, 16), (768, 8)],
}
CASES = [(d, c, hw) for d in DEVICES for c, hw in LEVELS[d]]
IMPLS = ['lumiere_fast', 'einops', 'clone']
TARGET_RATIO = 0.85        # issue 3: ours at >= 85% of x.clone()'s GB/s


@pytest.fixture(scope='session')
def clone_rate():
    """x.clone() GB/s per (shape, dtype, device), measured once per session: the denominator of the ratios."""
    cache: dict = {}

    def rate(x: torch.Tensor) -> float:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device.type)
        if key not in cache:
            seconds = median_seconds(x.clone, x.device)
            cache[key] = 2 * x.numel() * x.element_size() / seconds / 1e9
        return cache[key]

    return rate


def _input(direction: str, layout: str, device, dtype, c: int, hw: int) -> torch.Tensor:
    """The op's input: frames (b t) c h w for fold, the folded tensor for unfold (both contiguous)."""
    frames = torch.randn(BATCH * FRAMES, c, hw, hw, device=device, dtype=dtype)
    return frames if direction == 'fold' else ops.fold_frames_ref(frames, BATCH, layout).contiguous()


def _impls(direction: str, x: torch.Tensor, layout: str, hw: int) -> dict:
    args = (x, BATCH, layout) if direction == 'fold' else (x, BATCH, hw, hw, layout)
    ours, ref = ((ops.fold_frames, ops.fold_frames_ref) if direction == 'fold' else
                 (ops.unfold_frames, ops.unfold_frames_ref))
    return {'lumiere_fast': lambda: ours(*args), 'einops': lambda: ref(*args).contiguous(), 'clone': x.clone}


@pytest.mark.parametrize('device_name, c, hw', CASES, ids=[f'{d}-C{c}-{hw}x{hw}' for d, c, hw in CASES])
@pytest.mark.parametrize('layout', ['c t', 't c'], ids=['ct', 'tc'])
@pytest.mark.parametrize('direction', ['fold', 'unfold'])
@pytest.mark.parametrize('impl', IMPLS)
def bench_fold(benchmark, clone_rate, impl, direction, layout, device_name, c, hw):
    device = device_or_skip(device_name)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    x = _input(direction, layout, device, dtype, c, hw)
    fn = _impls(direction, x, layout, hw)[impl]
    with backend.record_choices() as seen:
        out = fn()
    if impl != 'clone':     # every implementation times a correct result
        assert torch.equal(out, _impls(direction, x, layout, hw)['einops']())
    benchmark.group = (f'{direction} {layout!r} {device_name} {str(dtype)[6:]} C={c} {hw}x{hw} '
                       f'B={BATCH} T={FRAMES}')
    benchmark.extra_info['bytes'] = x.numel() * x.element_size()
    if impl == 'lumiere_fast':
        benchmark.extra_info['ran'] = sorted(next(iter(seen.values()), {'?'}))

    def step():
        fn()
        sync(device)

    benchmark.pedantic(step, rounds=30 if device.type == 'cuda' else 10, warmup_rounds=3)
    if benchmark.stats is not None:         # None under --benchmark-disable
        gbps = 2 * x.numel() * x.element_size() / benchmark.stats.stats.median / 1e9
        benchmark.extra_info['GB/s'] = round(gbps, 1)
        benchmark.extra_info['clone GB/s'] = round(clone_rate(x), 1)
        benchmark.extra_info['ratio to clone'] = round(gbps / clone_rate(x), 3)
        if impl == 'lumiere_fast':
            benchmark.extra_info['target ratio'] = TARGET_RATIO
