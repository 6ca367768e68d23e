"""Triton kernels of lumiere_fast, installed as ``lumiere_fast.kernels``.

One file per op (``kernels/<op>.py``) holding only ``@triton.jit`` functions and their autotune configs; the
launchers, autograd registrations and dispatch live in ``lumiere_fast/ops/<op>.py``. Nothing here is imported
by ``import lumiere_fast``: the launchers import their kernels on first use.
"""
