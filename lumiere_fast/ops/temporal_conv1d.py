"""Temporal conv1d: channel-mixing convolution over the frame axis, odd kernel, 'same' padding.

    x (n, c_in, t)          or the folded video layout (b t) c_in h w with ``batch=b``
    weight (c_out, c_in, k), bias (c_out,) or None
    -> (n, c_out, t)         or (b t) c_out h w

Reference: ``F.conv1d(x, weight, bias, padding=k // 2)``. The frames form runs the same convolution as a
(k, 1) conv2d over a (b, c, t, h*w) view (``layout.frames_as_time_major``), which skips the fold/unfold copies.

Three implementations, one dispatch (``temporal_conv1d``; ``backend.record_choices()`` records 'native',
'triton' or 'reference' for each call):

* backend ``reference``: always the reference.
* native (the C++/CUDA extension, loaded by ``ops/extension.py``; ``extension_status()`` says which builds loaded
  and why not). CUDA tensors in the frames layout, fp32/fp16/bf16, k <= 15, all tensors of one dtype and device:
  fp32 on CUDA cores in exact fp32, fp16/bf16 on tensor cores (WMMA) with fp32 accumulation. The (n, c, t) layout
  stays on cuDNN (its own layout: no fold to save). Where cuDNN on the frames view (the reference) is faster, CUDA
  calls run it instead: the first call of each (shape, dtype, device) key times both forwards (CUDA events,
  ``_TIMING_WARMUP`` + ``_TIMING_REPS`` runs each, median) and caches the winner; ``extension_status()['cuda']
  ['dispatch']`` lists the decisions and times. ``LUMIERE_FAST_CONV1D_CUDA=native`` / ``=cudnn`` forces one
  (``measure``, the default, times). No timing where it cannot be trusted or done: in deterministic mode
  (``torch.use_deterministic_algorithms``) cuDNN runs, whose algorithms honour it (the native weight grad adds
  with atomics; a timed choice would also change results between runs); inside a ``torch.compile`` trace and
  during CUDA graph capture the native kernel runs (no synchronising timer there; nothing is cached). The
  benchmarks/bench_temporal_conv1d.py cases time both. CPU tensors only where it measured faster than the
  reference (``extension.cpu_native_wins``, timings in csrc/README.md): fp32/fp64, the frames layout with
  h*w >= 256. The (n, c, t) layout has no contiguous pixel axis to vectorise over, so it stays on the reference
  (mkldnn); fp16/bf16 on CPU take the reference (the extension has no upcasting path).
* Triton (``kernels/temporal_conv1d.py``), the frames layout otherwise: CUDA tensors where the CUDA extension is
  not built, and the forced ``triton`` backend (which skips the extension). The (n, c, t) layout takes the
  reference (a forced ``triton`` backend warns once that no kernel handles it).

Triton path: forward is the implicit-GEMM conv kernel with the plain (EPI_NONE) or bias (EPI_BIAS) epilogue,
grad input the same kernel on grad_out with the flipped, transposed weight, grad weight (and bias) the split-K
weight-grad kernel (fp32 atomics). Frames layout only, read and written through strides (no fold copy). Its two
launch helpers are public (``conv_frames``, ``conv_weight_grad``): the conv block builds its split paths and
weight grads from them, attention its 1x1 projections' weight grads.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._triton import (NAMESPACE, autocast_inputs, cdiv, deterministic, device_guard, differentiable_backward,
                      dot_block, dot_precision, eager_or_op, grid_1d, launch, launch_tuned, new_output, register_eager,
                      target_programs, use_triton, zeros32)
from .extension import cpu_native_wins, native_supported, native_temporal_conv1d, note_cuda_decision
from .layout import frames_as_time_major, time_major_as_frames

OP = 'temporal_conv1d'

# Tests set this: True runs the native op whenever the extension for the device is loaded and supports the
# call (skipping the CPU speed rule and the CUDA measurement), False never runs it; None applies the rules above.
_force_native: bool | None = None

CUDA_DISPATCH_ENV = 'LUMIERE_FAST_CONV1D_CUDA'
CUDA_DISPATCH_MODES = ('measure', 'native', 'cudnn')
_TIMING_WARMUP, _TIMING_REPS = 2, 5
_cuda_winners: dict[tuple, str] = {}      # key (_cuda_key) -> 'native' | 'cudnn'


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


def temporal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, batch: int | None = None) -> Tensor:
    k = weight.shape[-1]
    if x.ndim == 3:
        return F.conv1d(x, weight, bias, padding=k // 2)
    h, w = x.shape[-2:]
    y = F.conv2d(frames_as_time_major(x, batch), weight.unsqueeze(-1), bias, padding=(k // 2, 0))
    return time_major_as_frames(y, h, w)


# ------------------------------------------------------------------------------------------ Triton launchers


@cache
def _kernels():
    from ..kernels import temporal_conv1d as k
    return k


def flipped_weight(weight: Tensor) -> Tensor:
    """w'[ci, co, k] = w[co, ci, K-1-k]: grad input is the 'same' conv of grad_out with it (a C*C*K copy)."""
    return weight.transpose(0, 1).flip(-1)


def conv_frames(x: Tensor, w: Tensor, out: Tensor, frames: int, epilogue: str = 'none', residual=None, bias=None,
                gain=None, c_out=1., c_res=0., silu_scale=1.) -> Tensor:
    """out (b t) c_out H W = epilogue(temporal conv of x (b t) c_in H W, ``frames`` per clip, with w (c_out, c_in,
    k)), 'same' padding; any strides on x, w, out and residual. ``epilogue``: 'none'; 'bias' (+ bias); 'mp_silu'
    (mp_silu with ``silu_scale``); 'mp_out' (c_out * gain * y + c_res * residual); 'bias_residual'
    (y + bias + residual). The caller holds the device guard."""
    k = _kernels()
    n, c_in, _, width = x.shape
    c_o, taps, p = w.shape[0], w.shape[-1], x.shape[-2] * x.shape[-1]
    r = residual if residual is not None else out       # unused pointer arguments: the epilogue decides
    epi = getattr(k, f'EPI_{epilogue.upper()}')
    launch_tuned(
        k._temporal_conv1d_kernel, lambda m: grid_1d(n * cdiv(p, m['BLOCK_P']) * cdiv(c_o, m['BLOCK_C'])),
        (c_in, c_o, frames, taps, p, epi, x.dtype, w.dtype, out.dtype),
        x, *x.stride(), w, w.stride(0), w.stride(1), w.stride(2), r, *r.stride(), out, *out.stride(),
        bias if bias is not None else out, gain if gain is not None else out, c_out, c_res, silu_scale,
        n, frames, c_in, c_o, p, width, taps, taps // 2,
        EPI=epi, PREC=dot_precision(x), BLOCK_CI=dot_block(c_in, 32))
    return out


def conv_weight_grad(dy: Tensor, x: Tensor, frames: int, taps: int, with_bias: bool, flag: str = 'conv'):
    """(dw (c_out, c_in, taps), db (c_out,) or None) in fp32: the sum over frames and pixels of dy (x) x at each
    tap, dy (b t) c_out H W and x (b t) c_in H W (any strides). taps = 1: a 1x1 projection's weight grad (dy (x) x
    per pixel). ``flag``: the precision setting its fp32 dots follow (``dot_precision``; 'matmul' for a Linear's
    weight grad). The caller holds the device guard."""
    k = _kernels()
    n, c_o, _, width = dy.shape
    c_i, p = x.shape[1], x.shape[-2] * x.shape[-1]
    b_co, b_ci, b_p = k.WGRAD_BLOCKS
    tiles = taps * cdiv(c_o, b_co) * cdiv(c_i, b_ci)
    rows = n * cdiv(p, b_p)
    rows_per_prog = cdiv(rows, max(1, min(rows, target_programs(x) // tiles)))
    splits = cdiv(rows, rows_per_prog)
    exact_order = deterministic()
    if exact_order:     # one fp32 partial per split, summed below in a fixed order (a few MiB at most)
        dw = new_output((splits, c_o, c_i, taps), x, torch.float32)
        db = new_output((splits, c_o), x, torch.float32) if with_bias else dw
    else:
        dw = zeros32(c_o, c_i, taps, like=x)
        db = zeros32(c_o, like=x) if with_bias else dw
    k._temporal_conv1d_weight_grad_kernel[grid_1d(splits * tiles)](
        dy, *dy.stride(), x, *x.stride(), dw, db, n, frames, c_o, c_i, p, width, taps, taps // 2, rows_per_prog,
        HAS_BIAS=with_bias, PREC=dot_precision(x, flag), DETERMINISTIC=exact_order, BLOCK_CO=b_co, BLOCK_CI=b_ci,
        BLOCK_P=b_p, num_warps=k.WGRAD_WARPS)
    if exact_order:
        dw, db = dw.sum(0), (db.sum(0) if with_bias else None)
    return dw, (db if with_bias else None)


def _temporal_conv1d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    out = new_output((x.shape[0], weight.shape[0], *x.shape[2:]), x)
    with device_guard(x):
        return conv_frames(x, weight, out, x.shape[0] // batch, 'bias' if bias is not None else 'none', bias=bias)


def _temporal_conv1d_backward(grad: Tensor, x: Tensor, weight: Tensor, batch: int, with_bias: bool):
    frames = x.shape[0] // batch
    grad_x = new_output(x.shape, x)
    with device_guard(x):
        conv_frames(grad, flipped_weight(weight), grad_x, frames)
        grad_w, grad_b = conv_weight_grad(grad, x, frames, weight.shape[-1], with_bias)
    return grad_x, grad_w.to(weight.dtype), (grad_b.to(weight.dtype) if with_bias else None)


# ------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv1d', mutates_args=())
def _temporal_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    return _temporal_conv1d_forward(x, weight, bias, batch)


@_temporal_conv1d_op.register_fake
def _(x, weight, bias, batch):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


@torch.library.custom_op(f'{NAMESPACE}::temporal_conv1d_backward', mutates_args=())
def _temporal_conv1d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, batch: int, with_bias: bool
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_w, grad_b = _temporal_conv1d_backward(grad, x, weight, batch, with_bias)
    return grad_x, grad_w, grad_b if grad_b is not None else weight.new_zeros(weight.shape[0])


@_temporal_conv1d_backward_op.register_fake
def _(grad, x, weight, batch, with_bias):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, batch = inputs
    ctx.save_for_backward(x, weight)
    ctx.batch, ctx.has_bias = batch, bias is not None


def _autograd_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if torch.is_grad_enabled():     # create_graph: through the reference (linear in the bias)
        bias = weight.new_zeros(weight.shape[0]).requires_grad_(ctx.needs_input_grad[2]) if ctx.has_bias else None
        return differentiable_backward(temporal_conv1d_ref, (x, weight, bias, ctx.batch), grad)
    backward = eager_or_op(ctx, _temporal_conv1d_backward, _temporal_conv1d_backward_op)
    grad_x, grad_w, grad_b = backward(grad, x, weight, ctx.batch, ctx.has_bias)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None


_temporal_conv1d_op.register_autograd(_autograd_backward, setup_context=_setup_context)
register_eager(_temporal_conv1d_op, _temporal_conv1d_forward, _setup_context, _autograd_backward)


# ------------------------------------------------------------------------------------------------ dispatch


def cuda_dispatch_mode() -> str:
    """``LUMIERE_FAST_CONV1D_CUDA``: 'measure' (default: time native against cuDNN per key), 'native' or 'cudnn'
    (always that one, for the CUDA calls the native kernel supports)."""
    raw = backend.getenv(CUDA_DISPATCH_ENV)
    if raw is None or not raw.strip():
        return 'measure'
    mode = raw.strip().lower()
    if mode not in CUDA_DISPATCH_MODES:
        raise ValueError(f'environment variable {CUDA_DISPATCH_ENV}: expected one of {CUDA_DISPATCH_MODES}, '
                         f'got {raw!r}')
    return mode


def _cuda_key(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int | None) -> tuple:
    # contiguity too: a strided input takes the kernel's scalar staging path, another speed
    return (tuple(x.shape), batch, tuple(weight.shape), bias is not None, x.dtype, x.device, x.is_contiguous())


def _describe_key(key: tuple) -> str:
    shape, batch, w_shape, has_bias, dtype, device, contiguous = key
    return (f'{str(dtype).replace("torch.", "")} x{shape} batch={batch} weight{w_shape}'
            f'{" bias" if has_bias else ""}{"" if contiguous else " strided"} {device}')


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` on ``device``'s current stream: CUDA events around each of
    ``_TIMING_REPS`` runs after ``_TIMING_WARMUP`` (first-call costs: cuDNN's algorithm search,
    cudaFuncSetAttribute)."""
    for _ in range(_TIMING_WARMUP):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(_TIMING_REPS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _measure(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int | None) -> dict:
    """Time both forwards on these inputs (no autograd, no autocast: the inputs are already in the dtype that runs):
    the decision entry for ``extension_status()``."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), device_guard(x):
        try:
            native_ms = _time_ms(lambda: native_temporal_conv1d(x, weight, bias, batch), x.device)
        except RuntimeError as e:        # e.g. a kernel size whose tiles do not fit this device's shared memory
            return {'winner': 'cudnn', 'why': f'the native kernel failed: {e}'.split('\n')[0]}
        cudnn_ms = _time_ms(lambda: temporal_conv1d_ref(x, weight, bias, batch), x.device)
    winner = 'native' if native_ms <= cudnn_ms else 'cudnn'
    return {'winner': winner, 'why': 'measured', 'native_ms': round(native_ms, 4), 'cudnn_ms': round(cudnn_ms, 4)}


def _cuda_choice(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int | None) -> str:
    """'native' or 'cudnn' for a call the native CUDA kernel supports (see the module docstring)."""
    if torch.compiler.is_compiling():
        return 'native'          # first: a trace neither times nor reads the cache (no guards on it)
    mode = cuda_dispatch_mode()
    if mode != 'measure':
        return mode
    if deterministic():
        return 'cudnn'
    key = _cuda_key(x, weight, bias, batch)
    winner = _cuda_winners.get(key)
    if winner is not None:
        return winner
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return 'native'          # a graph capture cannot synchronise
    entry = _measure(x, weight, bias, batch)
    _cuda_winners[key] = entry['winner']
    note_cuda_decision(_describe_key(key), entry)
    return entry['winner']


def _route(x: Tensor, weight: Tensor, bias: Tensor | None, batch: int | None) -> str | None:
    """'native', 'cudnn' (the reference, chosen over the native kernel on CUDA) or None (Triton or the reference,
    as ``use_triton`` decides)."""
    if _force_native is False or backend.get_backend() == 'reference':
        return None
    if backend.get_backend() == 'triton' and not _force_native:
        return None          # a forced Triton backend runs the Triton kernel, not the extension
    if not native_supported(x, weight, bias):
        return None
    if _force_native:
        return 'native'
    # (n, c, t) stays on cuDNN / mkldnn: it is their native layout (nothing to save), and the kernels' pixel
    # axis is strided (CUDA) or absent (CPU) there
    if x.ndim != 4:
        return None
    if x.is_cuda:
        return _cuda_choice(x, weight, bias, batch)
    return 'native' if cpu_native_wins(x) else None


def temporal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, batch: int | None = None) -> Tensor:
    """(n, c_in, t) -> (n, c_out, t), or (b t) c_in h w -> (b t) c_out h w with ``batch=b``; see the module
    docstring for which implementation runs."""
    _check(x, weight, bias, batch)
    # autocast does not reach the custom ops: cast as it casts a convolution (the reference's F.conv1d/conv2d
    # would do the same), so the native and Triton kernels run in the autocast dtype
    x, weight, bias = autocast_inputs(x, weight, bias)
    route = _route(x, weight, bias, batch)
    if route == 'native':
        backend.record(OP, 'native')
        return native_temporal_conv1d(x, weight, bias, batch)
    if route == 'cudnn':
        backend.record(OP, 'reference')
        return temporal_conv1d_ref(x, weight, bias, batch)
    if use_triton(OP, x, weight, bias, supported=x.ndim == 4 and x.numel() > 0):
        return launch(_temporal_conv1d_op, x, weight, bias, batch)
    return temporal_conv1d_ref(x, weight, bias, batch)
