"""Forced weight normalisation of the MP layers (``ops/weight_norm.py``; reference only, no kernel)."""

from __future__ import annotations

from math import sqrt

import torch

from helpers import TOL, assert_close_rel
from lumiere_fast import ops


def test_weight_norm():
    w = torch.randn(5, 3, 3) * 7
    n = ops.normalize_weight(w)
    fp32 = TOL[torch.float32]
    assert_close_rel(n.flatten(1).norm(dim=1), torch.full((5,), sqrt(9.)), fp32)
    assert_close_rel(ops.mp_weight(w).flatten(1).norm(dim=1), torch.ones(5), fp32)
    # eps is F.normalize's clamp: rows shorter than eps are divided by eps, not by their norm
    tiny = torch.full((1, 4), 0.01)
    assert_close_rel(ops.normalize_weight(tiny, eps=3.), tiny / 3. * 2., fp32)
    ops.renormalize_(w)
    assert_close_rel(w, n, fp32)
    assert_close_rel(ops.normalize_weight(w), n, fp32)          # idempotent
