"""Temporal conv1d: channel-mixing convolution over the frame axis, odd kernel, 'same' padding.

    x (n, c_in, t)          or the folded video layout (b t) c_in h w with ``batch=b``
    weight (c_out, c_in, k), bias (c_out,) or None
    -> (n, c_out, t)         or (b t) c_out h w

Reference: ``F.conv1d(x, weight, bias, padding=k // 2)``. The frames form runs the same convolution as a
(k, 1) conv2d over a (b, c, t, h*w) view, which skips the fold/unfold copies.

Native path: the C++/CUDA extension in ``csrc/`` (modules ``lumiere_fast._C``, CPU, and ``lumiere_fast._C_cuda``,
CUDA; built by ``setup.py``, see ``csrc/README.md``) registers ``torch.ops.lumiere_fast_ext.temporal_conv1d`` and
``..._grad_weight`` with ``TORCH_LIBRARY``; this module adds their fake (meta) kernels and autograd, so
``torch.compile`` traces the op without a graph break. Both kernels read the (b t) c h w layout in place.
Backward: grad input is the same op on grad_out with the flipped, transposed weight; grad weight is its own
kernel; grad bias is a sum (ATen).

Dispatch (``temporal_conv1d``; ``extension_status()`` says which builds loaded and why not):

* backend ``reference``: always the reference.
* CUDA tensors in the frames layout, fp32/fp16/bf16, k <= 15, all tensors of one dtype and device: the CUDA
  extension when loaded. fp32 runs on CUDA cores in exact fp32; fp16/bf16 on tensor cores (WMMA) with fp32
  accumulation. The (n, c, t) layout stays on cuDNN (its own layout: no fold to save). Not yet measured on a
  GPU (no GPU in the session that wrote it): benchmarks/bench_conv1d.py has the cases.
* CPU tensors: the CPU extension only where it measured faster than the reference: fp32/fp64, the frames
  layout (b t) c h w with h*w >= 256 (``_cpu_native_wins`` has the numbers). The (n, c, t) layout has no
  contiguous pixel axis to vectorise over, so it stays on the reference (mkldnn). fp16/bf16 on CPU take the
  reference (the extension has no upcasting path).
* otherwise, the frames layout: the Triton kernel for CUDA tensors (e.g. where the CUDA extension is not built)
  and under the forced ``triton`` backend (which skips the extension); the (n, c, t) layout: the reference (a
  forced ``triton`` backend warns once that no kernel handles it). The Triton path is the conv block's
  implicit-GEMM temporal conv launched on its own (see the section below).
``backend.record_choices()`` records 'native', 'triton' or 'reference' for each call.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._triton import NAMESPACE, new_output, use_triton

OP = 'temporal_conv1d'


def _check(x: Tensor, weight: Tensor, bias, batch):
    for name, t in (('x', x), ('weight', weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f'temporal_conv1d: expected {name} to be a Tensor, got {type(t).__name__}')
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f'temporal_conv1d: expected bias to be a Tensor or None, got {type(bias).__name__}')
    if weight.ndim != 3:
        raise ValueError(f'temporal_conv1d: expected weight of shape (c_out, c_in, k), got {tuple(weight.shape)}')
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f'temporal_conv1d: expected an odd kernel size, got {k}')
    if x.ndim not in (3, 4):
        raise ValueError(f'temporal_conv1d: expected x as (n, c, t) or (b t) c h w, got shape {tuple(x.shape)}')
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f'temporal_conv1d: x has {x.shape[1]} channels, weight expects {weight.shape[1]}')
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f'temporal_conv1d: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}')
    if x.ndim == 4:
        if batch is None:
            raise ValueError('temporal_conv1d: a (b t) c h w input needs batch=b')
        if not isinstance(batch, int):
            raise TypeError(f'temporal_conv1d: expected batch to be an int, got {type(batch).__name__}')
        if batch < 1 or x.shape[0] % batch:
            raise ValueError(f'temporal_conv1d: leading dim {x.shape[0]} is not batch ({batch}) x frames')


def frames_as_time_major(x: Tensor, batch: int) -> Tensor:
    """(b t) c h w -> b c t (h w), a view (no copy)."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h * w).transpose(1, 2)


def time_major_as_frames(y: Tensor, height: int, width: int) -> Tensor:
    """b c t (h w) -> (b t) c h w (one copy)."""
    b, c, t, _ = y.shape
    return y.transpose(1, 2).reshape(b * t, c, height, width)


def frames_as_time_last(x: Tensor, batch: int) -> Tensor:
    """(b t) c h w -> b c (h w) t, a view (no copy)."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h * w).permute(0, 2, 3, 1)


def time_last_as_frames(y: Tensor, height: int, width: int) -> Tensor:
    """b c (h w) t -> (b t) c h w (one copy)."""
    b, c, _, t = y.shape
    return y.permute(0, 3, 1, 2).reshape(b * t, c, height, width)


def temporal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, batch: int | None = None) -> Tensor:
    k = weight.shape[-1]
    if x.ndim == 3:
        return F.conv1d(x, weight, bias, padding=k // 2)
    h, w = x.shape[-2:]
    y = F.conv2d(frames_as_time_major(x, batch), weight.unsqueeze(-1), bias, padding=(k // 2, 0))
    return time_major_as_frames(y, h, w)


# ------------------------------------------------------------------------------------------ native extension

EXT_NAMESPACE = 'lumiere_fast_ext'     # not 'lumiere_fast': the Python custom ops (torch.library) own that one
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_MAX_K = 15                        # csrc/temporal_conv1d_cuda.cu kMaxK: shared memory grows with k
CPU_MIN_PIXELS = 256                   # h*w from which the CPU kernel wins (see _cpu_native_wins)

_PKG_DIR = Path(__file__).resolve().parent.parent
_status: dict[str, dict] = {}
# Tests set this: True runs the native op whenever the extension for the device is loaded and supports the
# call (skipping the CPU speed rule), False never runs it; None applies the rules above.
_force_native: bool | None = None


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
    """``{'cpu': {'loaded': bool, 'why': str}, 'cuda': {...}}``: which native builds of temporal_conv1d are
    loaded, and if not, why (not built, failed to load, no CUDA in torch, disabled)."""
    return {k: dict(v) for k, v in _status.items()}


def _cpu_native_wins(x: Tensor) -> bool:
    """Where the CPU kernel measured faster than the reference (``temporal_conv1d_ref``: mkldnn conv2d over the
    frames view plus one copy back). fp32, k=3, B=2, T=8, c_in = c_out, 2 threads, min of 15 interleaved runs, one
    run on the 2-core AVX-512 dev VM (load < 1), 2026-11-25; ms ours / reference, forward and forward+backward:

        C=32  16x16  0.31 / 0.64   0.87 / 1.82      C=32  32x32   1.00 / 2.63    2.66 / 3.86
        C=64  16x16  0.58 / 0.63   2.09 / 2.28      C=64  32x32   2.55 / 5.92    7.54 / 11.44
        C=128 16x16  2.15 / 2.26   6.73 / 7.24      C=128 32x32   8.55 / 16.34  27.62 / 38.98
        C=16  8x8 (B=1) 0.07 / 0.05  0.29 / 0.22    C=256 8x8 (T=4) 0.98 / 1.04  3.83 / 3.61

    Against upstream's fold + F.conv1d + unfold ours is faster in every case above (forward 1.3x-4.1x,
    forward+backward 1.3x-2.6x). So: the frames layout with at least 16x16 pixels. At 8x8 the per-call set-up
    (weight packing, thread pool) and short pixel rows make it a tie or a loss against mkldnn; the (n, c, t) layout
    (1 pixel) runs scalar code and loses by far."""
    return x.ndim == 4 and x.shape[-1] * x.shape[-2] >= CPU_MIN_PIXELS


def _native_supported(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if x.is_cuda:
        return _status['cuda']['loaded'] and x.dtype in CUDA_DTYPES and weight.shape[-1] <= CUDA_MAX_K
    if x.device.type == 'cpu':
        return _status['cpu']['loaded'] and x.dtype in CPU_DTYPES
    return False


def _use_native(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if _force_native is False or backend.get_backend() == 'reference':
        return False
    if backend.get_backend() == 'triton' and not _force_native:
        return False         # a forced Triton backend runs the Triton kernel, not the extension
    if not _native_supported(x, weight, bias):
        return False
    if _force_native:
        return True
    # (n, c, t) stays on cuDNN / mkldnn: it is their native layout (nothing to save), and the kernels' pixel
    # axis is strided (CUDA) or absent (CPU) there
    return x.ndim == 4 and (x.is_cuda or _cpu_native_wins(x))


# ------------------------------------------------------------------------------------------ Triton path
#
# The conv block's implicit-GEMM temporal conv (lumiere_fast/kernels/conv_block.py), launched on its own: the
# forward is conv_epilogue_kernel with the plain (EPI_NONE) or bias (EPI_BIAS) epilogue, grad input the same
# kernel on grad_out with the flipped, transposed weight, grad weight (and bias) weight_grad_kernel (split-K, fp32
# atomics). Frames layout only, read and written through strides (no fold copy). It serves CUDA tensors when the
# CUDA extension is not built, and the forced ``triton`` backend.

def _conv_launchers():
    from . import conv_block      # imported here: conv_block imports this module's layout helpers
    return conv_block


def _triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    cb = _conv_launchers()
    kern = cb._kernels()
    out = new_output((x.shape[0], weight.shape[0], *x.shape[2:]), x)
    with cb._device(x):
        return cb._conv(kern, x, weight, out, x.shape[0] // batch, kern.EPI_BIAS if bias is not None else kern.EPI_NONE,
                        bias=bias)


def _triton_backward(grad: Tensor, x: Tensor, weight: Tensor, batch: int, with_bias: bool):
    cb = _conv_launchers()
    kern = cb._kernels()
    frames = x.shape[0] // batch
    grad_x = new_output(x.shape, x)
    with cb._device(x):
        cb._conv(kern, grad, cb._flipped(weight), grad_x, frames, kern.EPI_NONE)
        grad_w, grad_b = cb._weight_grad(kern, grad, x, frames, weight.shape[-1], with_bias)
    return grad_x, grad_w.to(weight.dtype), (grad_b.to(weight.dtype) if with_bias else None)


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv1d', mutates_args=())
def _triton_op(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    return _triton_forward(x, weight, bias, batch)


@_triton_op.register_fake
def _(x, weight, bias, batch):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv1d_backward', mutates_args=())
def _triton_backward_op(grad: Tensor, x: Tensor, weight: Tensor, batch: int, with_bias: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_w, grad_b = _triton_backward(grad, x, weight, batch, with_bias)
    return grad_x, grad_w, grad_b if grad_b is not None else weight.new_zeros(weight.shape[0])


@_triton_backward_op.register_fake
def _(grad, x, weight, batch, with_bias):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _triton_setup_context(ctx, inputs, output):
    x, weight, bias, batch = inputs
    ctx.save_for_backward(x, weight)
    ctx.batch, ctx.has_bias = batch, bias is not None


def _triton_autograd_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _triton_backward_op(grad, x, weight, ctx.batch, ctx.has_bias)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None


_triton_op.register_autograd(_triton_autograd_backward, setup_context=_triton_setup_context)


# ------------------------------------------------------------------------------------------------ dispatch

def temporal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int | None = None) -> Tensor:
    _check(x, weight, bias, batch)
    if _use_native(x, weight, bias):
        backend.record(OP, 'native')
        return torch.ops.lumiere_fast_ext.temporal_conv1d(x, weight, bias, batch if x.ndim == 4 else 0)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    supported = x.ndim == 4 and x.numel() > 0 and all(t.dtype == x.dtype for t in tensors)
    if use_triton(OP, *tensors, supported=supported):
        return _triton_op(x, weight, bias, batch)
    return temporal_conv1d_ref(x, weight, bias, batch)
