"""Triton kernels of lumiere_fast, installed as ``lumiere_fast.kernels``.

One file per op (``kernels/<op>.py``) holding only ``@triton.jit`` functions and their autotune configs; the
launchers, autograd Functions and dispatch live in ``lumiere_fast/ops/<op>.py``. No kernel has landed yet:
the op layer runs its PyTorch references (see ``lumiere_fast.backend``).
"""
