"""Dispatch where people train (issue 13): the kernels are taken under autocast, in the autocast dtype; every
launch runs under its device guard; the fp32 dots follow PyTorch's precision flags.

On a GPU the tests run on CUDA with bf16 autocast, as people train (their ids say ``cuda``, so gpu_check.sh runs
them); without one on CPU through the interpreter, where fp16 autocast stands in for bf16 (the interpreter's bf16
arithmetic is wrong): the dispatch rule is the same, only the autocast dtype differs.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest
import torch

import lumiere_fast as ours
from lumiere_fast import backend
from helpers import SMALL_UNET_NAMES, TOL, assert_close_rel, assert_kernels_only, perturb_, small_unet

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
LOW = torch.bfloat16 if DEVICE == 'cuda' else torch.float16      # the autocast dtype of these tests


@pytest.fixture(params=[DEVICE])
def device(request):
    """The device the kernels run on here (a parameter, so the test ids name it)."""
    return torch.device(request.param)


BLOCK_CASES = [('ConvolutionInflationBlock', {}), ('MPConvolutionInflationBlock', {}),
               ('AttentionInflationBlock', dict(heads=2, dim_head=8)),
               ('MPAttentionInflationBlock', dict(heads=2, dim_head=8, num_mem_kv=2)),
               ('TemporalDownsample', {}), ('TemporalUpsample', {}), ('MPTemporalDownsample', {}),
               ('MPTemporalUpsample', {})]


def _outputs(model, x, **cond):
    """Output and the gradients of the input and of every trainable parameter, for one fixed cotangent."""
    v = x.clone().requires_grad_(True)
    out = model(v, **cond)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return [out, *torch.autograd.grad(out, [v, *params], cot)], params


@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_blocks_take_their_kernels_under_autocast(device, klass, kw):
    """fp32 parameters and input, fp16 autocast: forward and backward on the kernels (before: the MP conv block
    and, inside whole models, every conv block and resample took the reference); output in the autocast dtype,
    fp32 gradients for fp32 parameters, close to the fp32 reference."""
    torch.manual_seed(0)
    block = getattr(ours, klass)(dim=16, **kw).eval()
    perturb_(block)
    block.to(device)
    x = torch.randn(2, 16, 4, 3, 5).to(device)
    with backend.use_backend('reference'):
        ref, _ = _outputs(block, x)
    with backend.use_backend('triton'), backend.record_choices() as seen, \
            torch.autocast(device.type, dtype=LOW):
        got, params = _outputs(block, x)
    assert_kernels_only(seen, klass)
    assert all(g.dtype == p.dtype for g, p in zip(got[2:], params)), 'parameter grads in the parameters\' dtype'
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a.float(), b, TOL[LOW], 1e-3 * b.norm().item() + 1e-6, what=f'{klass} output {i}')


@pytest.mark.parametrize('family', ['', 'MP'])
def test_whole_wrappers_take_every_kernel_under_autocast(device, family):
    """The wrapped KarrasUnet (fast image model on) under fp16 autocast: every temporal and image-model op on its
    kernel, forward and backward, and the result close to the fp32 reference backend."""
    torch.manual_seed(0)
    model = getattr(ours, f'{family}Lumiere')(small_unet(), image_size=16, unet_time_kwarg='time',
                                              **SMALL_UNET_NAMES)
    perturb_(model, 0.1)
    model.eval().to(device)
    x, time = torch.randn(1, 3, 4, 16, 16).to(device), torch.rand(1).to(device)
    with backend.use_backend('reference'):
        ref, _ = _outputs(model, x, time=time)
    with backend.use_backend('triton'), backend.record_choices() as seen, \
            torch.autocast(device.type, dtype=LOW):
        got, _ = _outputs(model, x, time=time)
    assert_kernels_only(seen, f'{family}Lumiere')
    temporal = {'temporal_conv_block', 'temporal_attention_block', 'temporal_downsample', 'temporal_upsample'}
    if family:
        temporal = {f'mp_{op}' for op in temporal}
    assert temporal <= set(seen), f'every temporal op ran: {sorted(seen)}'
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_rel(a.float(), b, 5e-2, 1e-3 * b.norm().item() + 1e-6, what=f'{family}Lumiere output/grad {i}')


@pytest.mark.skipif(DEVICE == 'cuda', reason='an fp64 reference check; the interpreter case covers the rule')
def test_autocast_leaves_fp64_and_no_autocast_alone():
    """fp64 under autocast is not cast (autocast's rule): the reference runs, in fp64; without autocast mixed
    dtypes still take the reference (as F.conv would raise, so does the reference: no silent cast)."""
    block = ours.MPTemporalDownsample(dim=4).double()
    x = torch.randn(1, 4, 4, 2, 2, dtype=torch.float64)
    with backend.use_backend('triton'), backend.record_choices() as seen, \
            torch.autocast('cpu', dtype=torch.float16), pytest.warns(RuntimeWarning, match='reference'):
        assert block(x).dtype == torch.float64
    assert seen['mp_temporal_downsample'] == {'reference'}


# ---------------------------------------------------------------------------------------------- device guards

OP_MODULES = ['conv_block', 'attention', 'temporal_conv1d', 'resample', 'fold', 'karras']


@pytest.fixture
def guarded_launches(monkeypatch):
    """Every kernel launch, whether it ran inside its op's device guard: each op module's ``device_guard`` and
    every Triton kernel's launch are wrapped (the launchers look both up at call time)."""
    import triton
    state = {'depth': 0, 'launches': [], 'kwargs': []}

    def guard(x):
        @contextmanager
        def entered():
            state['depth'] += 1
            try:
                yield
            finally:
                state['depth'] -= 1
        return entered()

    for name in OP_MODULES:
        monkeypatch.setattr(importlib.import_module(f'lumiere_fast.ops.{name}'), 'device_guard', guard)
    kernel_types = {triton.runtime.KernelInterface}
    kernel_types |= {type(obj) for name in OP_MODULES
                     for obj in vars(importlib.import_module(f'lumiere_fast.kernels.{name}')).values()
                     if not isinstance(obj, type) and hasattr(obj, '__getitem__') and hasattr(obj, 'run')}
    for kt in kernel_types:
        original = kt.__getitem__

        def getitem(self, grid, original=original):
            launch = original(self, grid)

            def run(*args, **kwargs):
                name = getattr(self, '__name__', None) or getattr(getattr(self, 'fn', None), '__name__', '?')
                state['launches'].append((name, state['depth'] > 0))
                state['kwargs'].append((name, kwargs))
                return launch(*args, **kwargs)
            return run
        monkeypatch.setattr(kt, '__getitem__', getitem)
    return state


@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_every_launch_runs_under_its_device_guard(guarded_launches, device, klass, kw):
    """A cuda:1 tensor while device 0 is current must launch on device 1: every launcher holds the guard (fold
    and resample had none). On CPU the guard is a no-op, so the test records where launches happen."""
    block = getattr(ours, klass)(dim=16, **kw).eval()
    perturb_(block)
    block.to(device)
    x = torch.randn(1, 16, 4, 2, 3, device=device, requires_grad=True)
    with backend.use_backend('triton'):
        block(x).square().sum().backward()
    launches = guarded_launches['launches']
    assert launches, f'{klass}: no kernel launched'
    unguarded = sorted({name for name, guarded in launches if not guarded})
    assert not unguarded, f'{klass}: launches outside a device guard: {unguarded}'


def test_fold_and_image_model_launches_run_under_the_device_guard(guarded_launches, device):
    from lumiere_fast import ops
    from lumiere_fast.ops import karras
    x = torch.randn(2 * 3, 16, 2, 3, device=device, requires_grad=True)
    with backend.use_backend('triton'):
        y = ops.unfold_frames(ops.fold_frames(x, 2), 2, 2, 3)
        a, s = karras.pixel_norm_silu(x)
        scale = torch.randn(6, 16, device=device)
        out = y.sum() + s.sum() + karras.scale_silu(x, scale).sum() + karras.mp_cat(x, x).sum()
        out.backward()
    launches = guarded_launches['launches']
    assert len(launches) >= 6
    assert all(guarded for _, guarded in launches), launches


# ---------------------------------------------------------------------------------------------- precision flags

@pytest.fixture
def restore_precision_flags():
    b = torch.backends
    saved = (b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.cuda.matmul.fp32_precision, b.fp32_precision,
             torch.get_float32_matmul_precision())
    yield
    b.fp32_precision = saved[3]
    b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision = saved[1], saved[0]
    b.cuda.matmul.fp32_precision = saved[2]
    torch.set_float32_matmul_precision(saved[4])


class _FakeCudaFp32:
    """What dot_precision reads of a tensor (no GPU here): an fp32 CUDA operand."""
    dtype, is_cuda = torch.float32, True


@pytest.mark.filterwarnings('error')
def test_dot_precision_follows_pytorchs_flags(restore_precision_flags):
    """Conv kernels follow cuDNN's convolution setting (TF32 by default), linear/attention kernels the matmul
    setting (full fp32 by default, so the README's fp32 parity holds on a GPU); both APIs, no warnings, and no
    error after a user mixed the legacy and the new API (reading ``allow_tf32`` then raises)."""
    from lumiere_fast.ops._triton import dot_precision
    x = _FakeCudaFp32()
    assert (dot_precision(x, 'conv'), dot_precision(x, 'matmul')) == ('tf32', 'ieee')
    torch.set_float32_matmul_precision('high')
    assert dot_precision(x, 'matmul') == 'tf32'
    torch.set_float32_matmul_precision('highest')
    assert dot_precision(x, 'matmul') == 'ieee'
    torch.backends.cudnn.allow_tf32 = False                      # legacy API
    assert dot_precision(x, 'conv') == 'ieee'
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True                # legacy, then the new API on the same flag: mixed
    torch.backends.cuda.matmul.fp32_precision = 'ieee'
    assert dot_precision(x, 'matmul') == 'ieee'
    torch.backends.cudnn.conv.fp32_precision = 'ieee'
    assert dot_precision(x, 'conv') == 'ieee'
    torch.backends.cudnn.conv.fp32_precision = 'none'            # inherits: cudnn, then the global setting
    torch.backends.cuda.matmul.fp32_precision = 'none'
    torch.backends.fp32_precision = 'tf32'
    assert dot_precision(x, 'conv') == 'tf32' and dot_precision(x, 'matmul') == 'tf32'
    cpu = torch.ones(1)
    assert dot_precision(cpu, 'conv') == dot_precision(cpu, 'matmul') == 'ieee'
    with pytest.raises(ValueError, match="'conv' or 'matmul'"):
        dot_precision(x, 'linear')


@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_each_kernel_asks_for_the_flag_of_the_layer_it_replaces(monkeypatch, device, klass, kw):
    """Attention kernels (upstream: Linear layers and einsum attention) follow the matmul flag in forward and
    backward, weight grads included; conv blocks and resamples (upstream: Conv1d) the cuDNN flag. (Before: every
    kernel followed cuDNN's flag, i.e. TF32 for fp32 attention where PyTorch's matmul runs full fp32.)"""
    from lumiere_fast.ops import _triton
    asked = []

    def recording(x, flag='conv'):
        asked.append(flag)
        return _triton.dot_precision(x, flag)

    for name in ('conv_block', 'attention', 'temporal_conv1d', 'resample'):
        monkeypatch.setattr(importlib.import_module(f'lumiere_fast.ops.{name}'), 'dot_precision', recording)
    block = getattr(ours, klass)(dim=16, **kw).eval().to(device)
    x = torch.randn(1, 16, 4, 2, 3, device=device, requires_grad=True)
    with backend.use_backend('triton'):
        block(x).square().sum().backward()
    assert asked, f'{klass}: no launch asked for a precision'
    want = 'matmul' if 'Attention' in klass else 'conv'
    assert set(asked) == {want}, f'{klass}: {asked}'


# ---------------------------------------------------------------------------------------------- deterministic mode

# Kernels with an atomic reduction and the launch arguments under which no atomic runs (their fixed-order variant).
ATOMIC_FREE = {'_conv_block_mp_backward_kernel': dict(FUSE_PROJ=False),
               '_conv_block_backward_kernel': dict(FUSE_PROJ=False, DETERMINISTIC=True),
               '_temporal_conv1d_weight_grad_kernel': dict(DETERMINISTIC=True)}


def test_every_kernel_with_atomics_has_a_deterministic_variant():
    """The table above names every kernel whose source adds with atomics (a new one must get a variant here)."""
    import inspect
    with_atomics = set()
    for name in OP_MODULES:
        module = importlib.import_module(f'lumiere_fast.kernels.{name}')
        for attr, obj in vars(module).items():
            fn = obj
            while hasattr(fn, 'fn'):
                fn = fn.fn
            if callable(fn) and attr.endswith('_kernel') and 'tl.atomic' in inspect.getsource(fn):
                with_atomics.add(attr)
    assert with_atomics == set(ATOMIC_FREE)


@pytest.fixture
def deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _grads_of(block, x):
    v = x.clone().requires_grad_(True)
    out = block(v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    return torch.autograd.grad(out, [v, *block.parameters()], cot)


@pytest.mark.parametrize('klass,kw', BLOCK_CASES, ids=[k for k, _ in BLOCK_CASES])
def test_deterministic_mode_launches_no_atomics(guarded_launches, device, klass, kw, request, monkeypatch):
    """``torch.use_deterministic_algorithms(True)``: every launch of a kernel with atomics takes its fixed-order
    variant (per-program partials summed by the host), the gradients equal the atomic path's up to fp32 rounding,
    and two runs are bitwise equal. Under the interpreter atomics add in program order, so bitwise equality alone
    would not show it: the launch arguments are checked."""
    torch.manual_seed(0)
    block = getattr(ours, klass)(dim=16, **kw).eval()
    perturb_(block)
    block.to(device)
    x = torch.randn(2, 16, 4, 3, 5).to(device)
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')       # deterministic cuBLAS (the references' linears)
    with backend.use_backend('triton'):
        atomic = _grads_of(block, x)
        guarded_launches['kwargs'].clear()
        request.getfixturevalue('deterministic_mode')
        first, second = _grads_of(block, x), _grads_of(block, x)
    launched = guarded_launches['kwargs']
    assert launched
    for name, kwargs in launched:
        for key, value in ATOMIC_FREE.get(name, {}).items():
            assert kwargs.get(key) == value, f'{klass}: {name} launched with {key}={kwargs.get(key)} in deterministic mode'
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        assert_close_rel(a, c, TOL[torch.float32], 1e-7, what=f'{klass}: deterministic vs atomic')


# ---------------------------------------------------------------------------------------------- host cost

def test_autotuned_kernels_skip_the_autotuner_after_the_first_call(monkeypatch, device):
    """``launch_tuned``: the first launch of a key goes through the autotuner, later ones launch the config it
    chose straight through the JIT function (the autotuner's per-call dict and key building is host time)."""
    import triton
    from lumiere_fast.ops import _triton
    monkeypatch.setattr(_triton, '_TUNED', {})
    calls = []
    original = triton.runtime.Autotuner.run

    def counting(self, *args, **kwargs):
        calls.append(self.base_fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.Autotuner, 'run', counting)
    block = ours.MPConvolutionInflationBlock(dim=16).eval().to(device)
    perturb_(block)
    x = torch.randn(1, 16, 4, 2, 3, device=device)
    with backend.use_backend('triton'), torch.no_grad():
        first = block(x)
        tuned = len(calls)
        second = block(x)
        again = len(calls) - tuned
        third = block(torch.randn(1, 16, 6, 2, 3, device=device))        # another frame count: another key
    assert tuned >= 1 and again == 0, calls
    assert len(calls) > tuned, 'a new autotune key went through the autotuner'
    assert torch.equal(first, second)
    assert third.shape[2] == 6
