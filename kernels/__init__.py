"""Triton kernels of lumiere_fast, installed as ``lumiere_fast.kernels``.

The sources sit in the top-level folder ``kernels/`` (the project's layout: ``lumiere_fast/`` for the Python
package, ``kernels/`` for the Triton code, ``csrc/`` for C++/CUDA), and ``setup.py`` maps that folder into the
package (``package_dir``): a top-level package named ``kernels`` would clash with an unrelated PyPI project, and
inside the package the launchers import them as ``from ..kernels import <op>``.

One file per op (``kernels/<op>.py``) holding only ``@triton.jit`` functions and their autotune configs, kernels
named ``_<op>_..._kernel``; the launchers, custom ops and dispatch live in ``lumiere_fast/ops/<op>.py``. Index math
and launch configs every kernel shares are in ``grid.py``. Nothing here is imported by ``import lumiere_fast``:
the launchers import their kernels on first use.
"""
