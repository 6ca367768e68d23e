"""Conv weights packed in the layout the implicit-GEMM kernels read (conv block, resample): one helper for both.

    weight (o, i, k)  ->  pack [k, o, i] contiguous, in the compute dtype      (transpose: weight (i, o, k))

A kernel's weight tile is [out channels, in channels] of one tap. In the parameter's own (o, i, k) layout its
in-channel run has stride k: 2-byte scalar loads 6 bytes apart for k = 3, a third of each 32-byte sector used,
nothing a 16-byte pipelined load (cp.async) can take. In the pack every row of a tile is one contiguous run.
``packed`` returns the pack as an (o, i, k)-shaped view (strides (i, 1, o * i)), so a launcher passes
``w.stride()`` as before and a kernel reads W[o, i, k] at o * s_o + i * s_i + k * s_k with s_i == 1 (Triton
specialises an integer argument equal to 1 into a constant, so the compiler sees the contiguous run).

Once per call, not cached across calls. A cache keyed on the weight's version counter (``_version``, bumped by
every in-place write through the tensor: an optimizer step, ``w.add_(1)`` under no_grad) would be stale where
values change without that counter moving: FSDP2 all-gathers each step's new values into the same unsharded
parameter inside ``torch.autograd._unsafe_preserve_version_counter``, and a write through ``w.data`` bumps
another tensor's counter. A pack is a copy of c * c * k elements, small next to the activations a call reads
(c * h * w * frames), and no memory outlives the call. No autograd: the kernels' weight grads are computed in
the weight's own layout and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed(weight: Tensor, dtype: torch.dtype, *, transpose: bool = False, flip: bool = False) -> Tensor:
    """``weight`` (o, i, k) -> the (o, i, k)-shaped view of a new contiguous [k, o, i] pack in ``dtype``.

    ``transpose``: pack weight[i, o, k] instead (a ConvTranspose1d weight, or a conv's adjoint); ``flip``: tap k
    takes weight[..., K - 1 - k] for K taps (the adjoint of a 'same' conv)."""
    src = weight.detach()
    if transpose:
        src = src.transpose(0, 1)
    if flip:
        src = src.flip(-1)
    pack = torch.empty((src.shape[2], src.shape[0], src.shape[1]), dtype=dtype, device=weight.device)
    pack.copy_(src.permute(2, 0, 1))
    return pack.permute(1, 2, 0)
