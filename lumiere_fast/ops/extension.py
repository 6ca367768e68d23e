"""Loading the native temporal conv1d extension (``csrc/``) and saying why it did not load.

The C++/CUDA extension (modules ``lumiere_fast._C``, CPU, and ``lumiere_fast._C_cuda``, CUDA; built by
``setup.py``, see ``csrc/README.md``) registers ``torch.ops.lumiere_fast_ext.temporal_conv1d`` and
``..._grad_weight`` with ``TORCH_LIBRARY``. This module imports them once, adds their fake (meta) kernels and
autograd, so ``torch.compile`` traces the op without a graph break, and records in ``extension_status()`` which
builds loaded. Backward: grad input is the same op on grad_out with the flipped, transposed weight; grad weight is
its own kernel; grad bias is a sum (ATen). Which calls take it is decided in ``ops/temporal_conv1d.py``.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ._triton import differentiable_backward

EXT_NAMESPACE = 'lumiere_fast_ext'     # not 'lumiere_fast': the Python custom ops (torch.library) own that one
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_MAX_K = 15                        # csrc/temporal_conv1d_cuda.cu kMaxK: shared memory grows with k
CPU_MIN_PIXELS = 256                   # h*w from which the CPU kernel wins (csrc/README.md has the timings)

_PKG_DIR = Path(__file__).resolve().parent.parent
_status: dict[str, dict] = {}
# CUDA calls: which of the native kernel and cuDNN each (shape, dtype, device) key runs, and why (measured times,
# or the rule that decided without timing); filled by ops/temporal_conv1d.py, reported by extension_status()
_cuda_decisions: dict[str, dict] = {}


def _built_file(module: str) -> Path | None:
    stem = module.rsplit('.', 1)[1]
    hits = sorted(_PKG_DIR.glob(f'{stem}.*.so')) + sorted(_PKG_DIR.glob(f'{stem}.*.pyd'))
    return hits[0] if hits else None


def _load_one(module: str, needs: str | None = None) -> dict:
    if needs is not None and not _status.get(needs, {}).get('loaded'):
        why = _status[needs]['why']
        return {'loaded': False, 'why': f'needs the CPU extension, which defines the op schemas: {why}'}
    if os.environ.get('LUMIERE_FAST_DISABLE_EXT', '0') == '1':
        return {'loaded': False, 'why': 'disabled by LUMIERE_FAST_DISABLE_EXT=1'}
    try:
        importlib.import_module(module)
    except ImportError as e:
        built = _built_file(module)
        if built is None:
            # never built (torch missing at install time, LUMIERE_FAST_BUILD_EXT=0, no nvcc, or a failed compile
            # that pip printed a warning for): silent here, the reference runs, extension_status() says so
            return {'loaded': False, 'why': f'{module} is not built (no {module.rsplit(".", 1)[1]}.*.so in '
                                             f'{_PKG_DIR}); see csrc/README.md to build it ({e})'}
        # built but unloadable (e.g. compiled against another torch): worth one warning
        why = f'{built.name} is built but failed to load: {e}'
        warnings.warn(f'lumiere_fast: {why}; temporal_conv1d falls back to the PyTorch reference. Rebuild with '
                      f'pip install --no-build-isolation -e . (csrc/README.md)', RuntimeWarning, stacklevel=3)
        return {'loaded': False, 'why': why}
    except Exception as e:  # a registration error inside the library
        warnings.warn(f'lumiere_fast: loading {module} failed ({e}); the PyTorch reference runs', RuntimeWarning,
                      stacklevel=3)
        return {'loaded': False, 'why': f'loading {module} failed: {e}'}
    return {'loaded': True, 'why': 'loaded'}


def _register_python_parts():
    """Fake kernels (shapes only, for torch.compile / FakeTensor) and autograd of the C++ ops."""
    conv = torch.ops.lumiere_fast_ext.temporal_conv1d
    grad_weight = torch.ops.lumiere_fast_ext.temporal_conv1d_grad_weight

    @torch.library.register_fake(f'{EXT_NAMESPACE}::temporal_conv1d')
    def _conv_fake(x, weight, bias, batch):
        shape = list(x.shape)
        shape[1] = weight.shape[0]
        return x.new_empty(shape)             # the C++ op returns a contiguous tensor too

    @torch.library.register_fake(f'{EXT_NAMESPACE}::temporal_conv1d_grad_weight')
    def _grad_weight_fake(grad_out, x, kernel_size, batch):
        return x.new_empty((grad_out.shape[1], x.shape[1], kernel_size))

    def setup_context(ctx, inputs, output):
        x, weight, bias, batch = inputs
        ctx.save_for_backward(x, weight)
        ctx.batch = batch
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():     # create_graph: the weight-grad op has no derivative; through the reference
            from .temporal_conv1d import temporal_conv1d_ref    # (here: that module imports this one)
            bias = weight.new_zeros(weight.shape[0]).requires_grad_(ctx.needs_input_grad[2]) if ctx.has_bias else None
            return differentiable_backward(temporal_conv1d_ref, (x, weight, bias, ctx.batch or None), grad)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # d out / d x is the same 'same'-padded conv with the taps reversed and in/out channels swapped
            grad_x = conv(grad, weight.flip(-1).transpose(0, 1), None, ctx.batch)
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight(grad, x, weight.shape[-1], ctx.batch)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dims = (0, 2) if grad.ndim == 3 else (0, 2, 3)
            grad_b = grad.sum(dims, dtype=torch.float32).to(grad.dtype)
        return grad_x, grad_w, grad_b, None

    torch.library.register_autograd(f'{EXT_NAMESPACE}::temporal_conv1d', backward, setup_context=setup_context)


def _load():
    _status['cpu'] = _load_one('lumiere_fast._C')
    if torch.version.cuda is None and torch.version.hip is None:
        _status['cuda'] = {'loaded': False, 'why': 'this torch build has no CUDA'}
    else:
        _status['cuda'] = _load_one('lumiere_fast._C_cuda', needs='cpu')
    if _status['cpu']['loaded']:
        _register_python_parts()


_load()


def extension_status() -> dict:
    """``{'cpu': {'loaded': bool, 'why': str}, 'cuda': {'loaded': bool, 'why': str, 'dispatch': {...}}}``: which
    native builds of temporal_conv1d are loaded, and if not, why (not built, failed to load, no CUDA in torch,
    disabled). ``['cuda']['dispatch']``: ``{'mode': 'measure' | 'native' | 'cudnn'`` (``LUMIERE_FAST_CONV1D_CUDA``),
    ``'decisions': {key: {'winner': 'native' | 'cudnn', 'why': str, 'native_ms': float, 'cudnn_ms': float}}}``, one
    entry per (shape, dtype, device) key a CUDA call timed (times only where measured; see
    ``ops/temporal_conv1d.py``). A copy: mutating it changes nothing."""
    from .temporal_conv1d import cuda_dispatch_mode     # (here: that module imports this one)
    status = copy.deepcopy(_status)
    try:
        mode = cuda_dispatch_mode()
    except ValueError as e:                             # a bad environment value: say so, do not fail the report
        mode = f'invalid ({e})'
    status['cuda']['dispatch'] = {'mode': mode, 'decisions': copy.deepcopy(_cuda_decisions)}
    return status


def note_cuda_decision(key: str, entry: dict) -> None:
    """Record the dispatch decision of one CUDA key for :func:`extension_status`."""
    _cuda_decisions[key] = dict(entry)


def native_supported(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the extension for x's device is loaded and takes this call (dtypes, kernel size)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if x.is_cuda:
        return _status['cuda']['loaded'] and x.dtype in CUDA_DTYPES and weight.shape[-1] <= CUDA_MAX_K
    if x.device.type == 'cpu':
        return _status['cpu']['loaded'] and x.dtype in CPU_DTYPES
    return False


def cpu_native_wins(x: Tensor) -> bool:
    """Where the CPU kernel measured faster than the reference: the frames layout with at least 16x16 pixels
    (the timings are in csrc/README.md). At 8x8 the per-call set-up (weight packing, thread pool) and short pixel
    rows make it a tie or a loss against mkldnn; the (n, c, t) layout (1 pixel) runs scalar code and loses by far."""
    return x.ndim == 4 and x.shape[-1] * x.shape[-2] >= CPU_MIN_PIXELS


def native_temporal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int | None) -> Tensor:
    """The extension's op (autograd and fake kernel registered above)."""
    return torch.ops.lumiere_fast_ext.temporal_conv1d(x, weight, bias, batch if x.ndim == 4 else 0)
