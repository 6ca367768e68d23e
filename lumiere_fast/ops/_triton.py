"""Glue shared by the Triton launchers in ``ops/``: when a Triton kernel runs, and small launch helpers.

The pattern every op with a kernel follows (one op, one place: ``ops/<op>.py``):

    def <op>_ref(...):                       # plain PyTorch: the spec
    @torch.library.custom_op('lumiere_fast::<op>', mutates_args=())
    def _<op>_triton(...) -> Tensor:        # launcher: grid from sizes, calls kernels/<op>.py
    @_<op>_triton.register_fake             # shapes only, so torch.compile traces it without a graph break
    _<op>_triton.register_autograd(...)     # backward: Triton kernels (or a recompute, said in the docstring)
    def <op>(...):                           # validation + dispatch: use_triton(...) ? _<op>_triton : <op>_ref

Kernels live in ``lumiere_fast.kernels.<op>`` and are imported inside the launcher, not at module import: under
``TRITON_INTERPRET=1`` (CPU tests) Triton reads the variable when a kernel is decorated, and plain CPU users
should not pay for importing Triton at all.
"""

from __future__ import annotations

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
    return backend.choose(op, x, has_triton=ok) == 'triton'


def grid_1d(n_programs: int) -> tuple[int]:
    """A 1-d launch grid: everything on axis 0, whose limit is 2**31 - 1 (axes 1 and 2 stop at 65,535)."""
    if n_programs >= 2 ** 31:
        raise ValueError(f'launch needs {n_programs} programs, more than grid axis 0 allows (2**31 - 1)')
    return (max(1, n_programs),)


# Tests set this: every buffer a kernel must fully write starts as NaN instead of torch.empty's leftovers, so an
# element no program writes fails the comparison with the reference.
POISON = False


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A launcher's output buffer (NaN-filled when ``POISON`` is set)."""
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float('nan'), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def dot_precision(x: torch.Tensor) -> str:
    """``tl.dot``'s input precision for fp32 operands. The kernels replace cuDNN convolutions (upstream's conv1d),
    so they follow the switch cuDNN follows, ``torch.backends.cudnn.allow_tf32`` (on by default): TF32 where
    cuDNN would use it, exact fp32 otherwise and always on the CPU interpreter. fp16/bf16 ignore it."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return 'tf32'
    return 'ieee'
