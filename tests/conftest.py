"""Test fixtures and the interpreter switch; the helpers tests import are in ``helpers.py``."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter on CPU tensors (fp32/fp16; its bf16 math is wrong,
# so bf16 kernel tests need a GPU). Set before anything imports lumiere_fast.kernels: Triton reads it when a
# kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# upstream's x-transformers import path emits deprecation noise that is not ours
warnings.filterwarnings('ignore', category=FutureWarning)


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv('LUMIERE_FAST_BACKEND', raising=False)
    yield


@pytest.fixture
def poison_and_ieee(monkeypatch):
    """Kernel tests: launcher outputs start as NaN (an unwritten element fails), and fp32 is exact IEEE on a GPU
    (the kernels, via ops._triton.dot_precision, and cuDNN both follow torch.backends.cudnn.allow_tf32)."""
    from lumiere_fast.ops import _triton
    monkeypatch.setattr(_triton, 'POISON', True)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
