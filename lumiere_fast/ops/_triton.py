"""Glue shared by the Triton launchers in ``ops/``: when a Triton kernel runs, and small launch helpers.

Every op file ``ops/<op>.py`` follows one template, in this order:

    def _check...(...):                        # checks: ValueError/TypeError naming expected vs received
    def <op>_ref(...):                         # plain PyTorch: the spec
    def _kernels():                            # from ..kernels import <op> as k; return k  (see below)
    def _<op>_forward(...), _<op>_backward(...)    # launchers: plain functions, grids from sizes, kernels/<op>.py
    @torch.library.custom_op('lumiere_fast::<op>', mutates_args=())
    def _<op>_op(...) -> Tensor                # calls _<op>_forward
    @torch.library.custom_op('lumiere_fast::<op>_backward', mutates_args=())
    def _<op>_backward_op(...)                 # calls _<op>_backward
    register_fake on both                      # shapes only, so torch.compile traces them without a graph break
    _<op>_op.register_autograd(...)            # backward through _<op>_backward_op; when autograd records the
                                               # backward (create_graph=True) through differentiable_backward
    def <op>(...):                             # public dispatch, last: use_triton(...) ? _<op>_op : <op>_ref

A file with several ops (the MP and non-MP blocks, the four resamples over one ``temporal_resample`` op) repeats
the launcher / custom-op names per op; fold and unfold are each other's backward, so they have no ``_backward`` op.

Kernels live in ``lumiere_fast.kernels.<op>`` (``kernels/<op>.py``, named ``_<op>_..._kernel``), and every op
file imports them one way, lazily, inside the launchers: ``def _kernels(): from ..kernels import <op> as k;
return k``. Lazy because under ``TRITON_INTERPRET=1`` (CPU tests) Triton reads the variable when a kernel is
decorated, and because plain CPU users should not pay for importing Triton at all.
"""

from __future__ import annotations

from contextlib import nullcontext

import os

import torch

from .. import backend

NAMESPACE = 'lumiere_fast'
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(op: str, *tensors: torch.Tensor, supported: bool = True) -> bool:
    """True when ``op`` should run its Triton kernel on these tensors (see ``backend.choose``).

    ``supported``: whether the kernel handles this call's sizes/flags; dtypes outside ``KERNEL_DTYPES`` and
    tensors on different devices always take the reference.
    """
    x = tensors[0]
    ok = supported and all(t.dtype in KERNEL_DTYPES and t.device == x.device for t in tensors)
    if ok and not x.is_cuda and any(t.dtype == torch.bfloat16 for t in tensors) and \
            os.environ.get('TRITON_INTERPRET', '0') == '1':
        ok = False      # the interpreter's bf16 arithmetic and tl.dot are wrong (~1e9 off): reference, with the warning
    return backend.choose(op, x, has_triton=ok) == 'triton'


def differentiable_backward(ref, inputs: tuple, grad_outputs) -> tuple:
    """A kernel op's backward while autograd records it (``create_graph=True``: double backward, a gradient
    penalty). The Triton backward kernels have no derivative of their own, so the gradients come from autograd
    through the reference, ``ref(*inputs)``, recomputed on the saved inputs: the same numbers as the first-order
    path up to rounding, and differentiable again. ``inputs``: the op's arguments (tensors, lists of tensors,
    anything else passed through); a tensor the op did not save and whose gradient does not depend on its value
    (a residual, the input of a linear op) may be a zeros stand-in that requires grad. ``grad_outputs``: one
    gradient per output (None for an output without one). Returns one gradient per argument in its structure
    (lists for lists, None for non-tensors and tensors that do not require grad); a tensor passed twice gets its
    gradient once, as autograd sums the gradients of repeated arguments."""
    flat, seen = [], set()
    for arg in inputs:
        for t in (arg if isinstance(arg, (list, tuple)) else (arg,)):
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                flat.append(t)
    with torch.enable_grad():
        outs = ref(*inputs)
    outs = outs if isinstance(outs, (list, tuple)) else (outs,)
    grad_outputs = grad_outputs if isinstance(grad_outputs, (list, tuple)) else (grad_outputs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], flat, [g for _, g in pairs], create_graph=True,
                                allow_unused=True) if pairs and flat else [None] * len(flat)
    by_id = dict(zip(map(id, flat), grads))

    def take(t):
        return by_id.pop(id(t), None) if isinstance(t, torch.Tensor) else None

    def take_all(ts):           # a list argument's gradient is a list of tensors: zeros where there is none
        return [g if g is not None else torch.zeros_like(t) for t, g in zip(ts, map(take, ts))]

    return tuple(take_all(arg) if isinstance(arg, (list, tuple)) else take(arg) for arg in inputs)


def grid_1d(n_programs: int) -> tuple[int]:
    """A 1-d launch grid: everything on axis 0, whose limit is 2**31 - 1 (axes 1 and 2 stop at 65,535)."""
    if n_programs >= 2 ** 31:
        raise ValueError(f'launch needs {n_programs} programs, more than grid axis 0 allows (2**31 - 1)')
    return (max(1, n_programs),)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes: ``triton.cdiv``, without importing Triton where no kernel runs."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def dot_block(n: int, cap: int | None = None) -> int:
    """A tile size covering n along one tl.dot axis: a power of two, >= 16 (tl.dot's minimum), at most ``cap``."""
    block = max(16, pow2(n))
    return block if cap is None else min(block, cap)


def target_programs(x: torch.Tensor, interpreted: int = 4) -> int:
    """How many programs a split-K reduction should spread over: about 4 per SM on a GPU; under the interpreter a
    few programs, each looping, are as fast as many (``interpreted``)."""
    if x.is_cuda:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return interpreted


def device_guard(x: torch.Tensor):
    """The device guard around a launch: kernels launch on the current CUDA device, which must be x's."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


# Tests set this: every buffer a kernel must fully write starts as NaN instead of torch.empty's leftovers, so an
# element no program writes fails the comparison with the reference.
POISON = False


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A launcher's output buffer (NaN-filled when ``POISON`` is set)."""
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float('nan'), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def zeros32(*shape, like: torch.Tensor) -> torch.Tensor:
    """An fp32 accumulator (atomics add into it) on ``like``'s device."""
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for fp32 operands. The kernels replace cuDNN convolutions (upstream's conv1d),
    so they follow the switch cuDNN follows, ``torch.backends.cudnn.allow_tf32`` (on by default): TF32 where
    cuDNN would use it, exact fp32 otherwise and always on the CPU interpreter. fp16/bf16 ignore it."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return 'tf32'
    return 'ieee'
