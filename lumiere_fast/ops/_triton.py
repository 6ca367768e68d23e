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
file imports them one way, lazily, inside the launchers: ``@cache def _kernels(): from ..kernels import <op> as
k; return k`` (cached: an import statement per launch is a microsecond of host time). Lazy because under
``TRITON_INTERPRET=1`` (CPU tests) Triton reads the variable when a kernel is decorated, and because plain CPU
users should not pay for importing Triton at all. Autotuned kernels launch through ``launch_tuned``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .. import backend

NAMESPACE = 'lumiere_fast'
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(op: str, *tensors: torch.Tensor | None, supported: bool = True, autocast: bool = True) -> bool:
    """True when ``op`` should run its Triton kernel on these tensors (see ``backend.choose``).

    ``supported``: whether the kernel handles this call's sizes/flags. The kernel needs one dtype out of
    ``KERNEL_DTYPES`` for every tensor (None entries are skipped) on one device: the dtype they have, or with
    ``autocast`` (the ops that replace convolutions and linears) the dtype :func:`autocast_inputs` casts them to
    under autocast, which the caller then applies. Otherwise the reference runs.
    """
    x = tensors[0]
    ok = False
    if supported:
        dtype = kernel_dtype(tensors, autocast)
        ok = dtype in KERNEL_DTYPES
        if ok and dtype is torch.bfloat16 and not x.is_cuda and backend.interpreting():
            ok = False  # the interpreter's bf16 arithmetic and tl.dot are wrong (~1e9 off): reference, with the warning
    return backend.choose(op, x, has_triton=ok) == 'triton'


_any_autocast = torch._C._is_any_autocast_enabled


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for x's device, None outside autocast (checked first, in one call:
    ``x.device.type`` alone builds a device object and a string, ~1 us, on every op call)."""
    if not _any_autocast():
        return None
    device = 'cuda' if x.is_cuda else x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast_eligible(t: torch.Tensor) -> bool:
    """Autocast casts floating tensors except fp64 (``cached_cast``'s rule)."""
    return t.is_floating_point() and t.dtype != torch.float64


def kernel_dtype(tensors, autocast: bool = True) -> torch.dtype | None:
    """The one dtype a kernel sees for these tensors (None entries skipped): with ``autocast``, under autocast,
    the autocast dtype (each eligible tensor cast to it, as autocast casts a convolution's input, weight and
    bias), else their own; None when they still differ or lie on different devices."""
    x = tensors[0]
    low = _autocast_dtype(x) if autocast else None
    # the device as (is_cuda, is_cpu, index): three attribute reads, where ``t.device`` builds an object per tensor
    cuda, cpu, index, dtype = x.is_cuda, x.is_cpu, x.get_device(), None
    for t in tensors:
        if t is None:
            continue
        dt = low if low is not None and _autocast_eligible(t) else t.dtype
        if dtype is None:
            dtype = dt
        elif dt != dtype or t.is_cuda != cuda or t.is_cpu != cpu or t.get_device() != index:
            return None
    return dtype


def autocast_inputs(*tensors):
    """An op's tensors as its kernel takes them under autocast: each eligible tensor in the autocast dtype, as
    autocast casts the inputs and weights of the convolutions and linears these kernels replace (fp32 sums and
    norms stay inside the kernels). The casts are differentiable: gradients come back in each tensor's own dtype
    (fp32 master weights get fp32 grads). Lists are cast element-wise; None, non-tensors and everything outside
    autocast pass unchanged (a cast to a tensor's own dtype is free)."""
    first = next(t for t in tensors if isinstance(t, torch.Tensor) or (isinstance(t, list) and t))
    low = _autocast_dtype(first[0] if isinstance(first, list) else first)
    if low is None:
        return tensors

    def cast(t):
        if isinstance(t, list):
            return [cast(u) for u in t]
        return t.to(low) if isinstance(t, torch.Tensor) and _autocast_eligible(t) else t

    return tuple(cast(t) for t in tensors)


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


# ------------------------------------------------------------------------------------------ the eager path
# A torch.library custom op costs ~20 us of host time per call in eager mode (measured on this CPU: 21 us without
# grad, 29 us with, against 3 / 8 us for an autograd.Function around the same launcher; the kernels themselves
# at the coarse levels take about as long on a GPU). So in eager mode an op runs its launchers through one
# autograd.Function with the custom op's own setup_context and backward; the custom op (fake impl, opcheck)
# stays the path for torch.compile, export and every tensor subclass or mode (FakeTensor, DTensor, tracing),
# which the launchers cannot take.

_EAGER: dict = {}
EAGER = True        # tests and benchmarks turn it off to run the custom ops in eager mode too


def register_eager(op, forward, setup_context, backward) -> None:
    """Give custom op ``op`` its eager path: ``forward`` (the launcher the op calls), and the ``setup_context`` /
    ``backward`` it registered with ``register_autograd``. ``backward`` asks :func:`eager_or_op` which backward
    to call, so the eager path's backward skips the backward custom op too."""
    _EAGER[op] = (forward, setup_context, backward)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(flat) -> bool:
    """No tensor subclass among the (flattened) arguments: a subclass's own dispatch needs the custom op."""
    return all(type(t) in _PLAIN or not isinstance(t, torch.Tensor) for t in flat)


_is_compiling = torch.compiler.is_compiling
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def launch(op, *args):
    """Run kernel op ``op`` on ``args`` (its custom op's arguments): through its eager autograd.Function when
    nothing traces or transforms the call (torch.compile, export, a dispatch or function mode, torch.func) and
    every tensor is a plain tensor, else through the custom op."""
    if (EAGER and not _is_compiling() and not _function_mode_enabled() and not _dispatch_stack_len()
            and not _functorch_active()):
        if any(type(a) is list for a in args):
            lengths = tuple(len(a) if type(a) is list else -1 for a in args)
            flat = [t for a in args for t in (a if type(a) is list else (a,))]
        else:
            lengths, flat = None, args
        if _plain(flat):
            spec = _EAGER[op]
            if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)):
                return spec[0](*args)           # nothing to differentiate: the launcher alone
            return _EagerOp.apply(*flat, (spec, lengths))
    return op(*args)


def eager_or_op(ctx, eager_impl, op):
    """In a backward registered for a custom op: its launcher ``eager_impl`` when the eager path ran the
    forward, the backward custom op ``op`` otherwise (what torch.compile traces)."""
    return eager_impl if getattr(ctx, 'eager', False) else op


def _unflatten(flat, lengths) -> list:
    args, i = [], 0
    for n in lengths:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


class _EagerOp(torch.autograd.Function):
    """One custom op's forward and backward without the custom-op dispatch (see :func:`launch`). List arguments
    travel flattened (autograd.Function only tracks top-level tensors); ``ctx.needs_input_grad`` is given back
    per custom-op argument (any element of a list) so setup_context and backward read it as the custom op's."""

    @staticmethod
    def forward(ctx, *flat_and_spec):
        *flat, ((forward, setup_context, backward), lengths) = flat_and_spec
        if lengths is None:         # no list arguments: the custom op's arguments as they are
            args = flat
        else:
            args = _unflatten(flat, lengths)
            needs = _unflatten(ctx.needs_input_grad[:-1], lengths)
            ctx.needs_input_grad = tuple(any(n) if isinstance(n, list) else n for n in needs) + (False,)
        ctx.eager, ctx.eager_backward, ctx.eager_lengths = True, backward, lengths
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        structured = ctx.eager_backward(ctx, *grads)
        if ctx.eager_lengths is None:
            return (*structured, None)
        flat = []
        for g, n in zip(structured, ctx.eager_lengths):
            if n < 0:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * n)
        return (*flat, None)


_TUNED: dict = {}


def launch_tuned(kernel, grid, key: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel, without the autotuner's per-call work after the
    first call for ``key``: it rebuilds three dicts over every argument and a key holding each tensor's dtype
    string on every launch (tens of arguments here: microseconds of host time, comparable to a coarse-level
    kernel). The first call for ``key`` goes through the autotuner, which times its configs; later ones launch
    the config it chose straight through the JIT function. ``key`` must determine what the autotune key does
    (the sizes and flags it names and the dtype): configs only differ in speed, so a coarser key could cost time,
    never correctness. A kernel without an autotuner (or a test's stand-in) is launched as it is."""
    cached = _TUNED.get((kernel, key))
    if cached is not None:
        cached[0][grid](*args, **kwargs, **cached[1])
        return
    kernel[grid](*args, **kwargs)
    best = getattr(kernel, 'best_config', None)
    if best is not None and getattr(best, 'pre_hook', None) is None and hasattr(kernel, 'fn'):
        _TUNED[(kernel, key)] = (kernel.fn, best.all_kwargs())


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
    """The device guard around a launch: kernels launch on the current CUDA device, which must be x's. When it
    already is (nearly always), no guard: ``torch.cuda.device`` swaps the device twice per launch."""
    if not x.is_cuda:
        return _NO_GUARD
    index = x.get_device()
    return _NO_GUARD if index == _current_cuda_device() else torch.cuda.device(index)


_NO_GUARD = nullcontext()                       # stateless, so one instance serves every launch
_current_cuda_device = torch._C._cuda_getDevice if hasattr(torch._C, '_cuda_getDevice') else \
    torch.cuda.current_device


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


def deterministic() -> bool:
    """``torch.use_deterministic_algorithms(True)`` is in force: launchers whose reductions add with atomics (in
    whatever order programs finish, so fp32 rounding changes run to run) take a variant whose per-program
    partials the host sums in a fixed order instead."""
    return torch.are_deterministic_algorithms_enabled()


def dot_precision(x: torch.Tensor, flag: str = 'conv') -> str:
    """``tl.dot``'s input precision for fp32 operands, as PyTorch sets it for the op the kernel replaces:
    ``flag='conv'`` (upstream's Conv1d layers: cuDNN's convolution setting, TF32 by default) or ``'matmul'`` (its
    Linear layers and attention: the cuBLAS matmul setting, full fp32 by default, TF32 after
    ``torch.set_float32_matmul_precision('high')``). Exact fp32 ('ieee') otherwise, always on the CPU interpreter;
    fp16/bf16 ignore it."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return 'ieee'
    return 'ieee' if _fp32_precision(flag) == 'ieee' else 'tf32'


def _fp32_precision(flag: str) -> str:
    """The fp32 precision in force for cuDNN convolutions (``'conv'``) or cuBLAS matmuls (``'matmul'``): the
    ``fp32_precision`` setting of the op, else of its parents ('none' inherits), else 'ieee'. Read through that
    API where torch has it: the legacy ``allow_tf32`` flags raise once a user has mixed the two APIs."""
    b = torch.backends
    if flag not in ('conv', 'matmul'):
        raise ValueError(f"dot_precision: expected flag 'conv' or 'matmul', got {flag!r}")
    chain = (b.cudnn.conv, b.cudnn, b) if flag == 'conv' else (b.cuda.matmul, b)
    if not hasattr(chain[0], 'fp32_precision'):         # torch without the fp32_precision API
        legacy = b.cudnn.allow_tf32 if flag == 'conv' else b.cuda.matmul.allow_tf32
        return 'tf32' if legacy else 'ieee'
    for node in chain:
        value = getattr(node, 'fp32_precision', 'none')
        if value != 'none':
            return value
    return 'ieee'
