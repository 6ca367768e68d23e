"""Index math and launch configuration shared by every kernel file (the one kernel-side common module).

Program ids. Every launch puts all its work on grid axis 0 (axes 1 and 2 stop at 65,535, and the batch can pass
that), so a kernel first splits its program id into tile indices, fastest-varying first:
``pid = ((i2 * n1) + i1) * n0 + i0`` (``unravel3`` / ``unravel4``). Keeping that arithmetic here keeps the
orderings of all kernels alike.

Frames. Every op reads and writes the image model's ``(b t) c H W`` tensors in place through their strides; a
tile is [channels, pixels] of one frame, with p = h * W + w the flat pixel index (``pixel_offsets``,
``tile_ptrs``).

Configs. Under ``TRITON_INTERPRET=1`` (the CPU tests) Triton runs numpy per program and cannot time configs, so
each autotuned kernel gets one small config there (``configs``), small enough that the tests' odd sizes cross
tile borders.
"""

import os

import triton
import triton.language as tl

# Read when this module is imported, as Triton reads the variable when a kernel is decorated.
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


def configs(gpu: list, interpret: list) -> list:
    """The autotune configs of a kernel: ``gpu`` on hardware, ``interpret`` (one small config) under the
    interpreter."""
    return interpret if INTERPRET else gpu


@triton.jit
def unravel3(pid, n0, n1):
    """pid -> (i0, i1, i2) with i0 < n0 fastest, then i1 < n1, then i2 (unbounded)."""
    return pid % n0, (pid // n0) % n1, pid // (n0 * n1)


@triton.jit
def unravel4(pid, n0, n1, n2):
    """pid -> (i0, i1, i2, i3) with i0 < n0 fastest, then i1 < n1, i2 < n2, then i3 (unbounded)."""
    rest = pid // (n0 * n1)
    return pid % n0, (pid // n0) % n1, rest % n2, rest // n2


@triton.jit
def pixel_offsets(p, W, s_h, s_w, MERGED: tl.constexpr = False):
    """Flat pixel indices p (row-major over H W) -> element offsets (int64: a frame can be large) in a frame with
    pixel strides (s_h, s_w).

    MERGED (the launcher checked s_h == W * s_w, or H == 1: contiguous and channels_last frames): p walks with the
    one stride s_w, which lets the compiler see contiguous pixels (vector loads) instead of a per-element (h, w)
    split."""
    if MERGED:
        return p.to(tl.int64) * s_w
    return (p // W).to(tl.int64) * s_h + (p % W).to(tl.int64) * s_w


@triton.jit
def tile_ptrs(ptr, n, s_n, s_c, ch, pix):
    """Pointers of a [channels, pixels] tile of frame n (n is the (b t) index; ``pix`` from ``pixel_offsets``)."""
    return ptr + n.to(tl.int64) * s_n + ch.to(tl.int64)[:, None] * s_c + pix[None, :]


@triton.jit
def load_mat(ptr, s_r, s_c, r, r_mask, c, c_mask):
    """A [rows, cols] weight tile, zero outside the masks (a transposed view is the same call with the strides
    swapped)."""
    return tl.load(ptr + r[:, None] * s_r + c[None, :] * s_c, mask=r_mask[:, None] & c_mask[None, :], other=0.)
