"""The KarrasUnet elementwise chains (launchers: ``lumiere_fast/ops/karras.py``).

All tensors are contiguous ``b c (h w)``: a channel step is P = h*w elements, the pixel axis is contiguous.

* pixel norm + SiLU: a program owns one batch row and BLOCK_P pixels and loops over the channels in BLOCK_C
  chunks, twice (sum of squares, then normalise and write y and silu(y)); the norm per pixel goes out in fp32
  for the backward, which loops twice too (the dot x . g, then the gradient).
* scale + SiLU and MPCat: flat elementwise programs of BLOCK elements.
Everything computes in fp32 and casts once on store; offsets are int64 (a tensor can pass 2**31 elements).
"""

import triton
import triton.language as tl

from .grid import INTERPRET

# (BLOCK_C, BLOCK_P, num_warps): 32 channels x 128 pixels is 16 KiB of fp32 per chunk, 256-byte bf16 runs per
# channel row. The interpreter gets small tiles so the tiny test shapes cross tile borders (tails) in c and p.
PIXEL_NORM_BLOCKS = (4, 16, 1) if INTERPRET else (32, 128, 4)
# (BLOCK, num_warps) of the flat elementwise kernels: 8 elements a thread at 4 warps, 16-byte bf16 accesses
ELEMENTWISE_BLOCK = (64, 1) if INTERPRET else (1024, 4)


@triton.jit
def _silu_and_slope(y):
    """silu(y) and its derivative sigma(y) * (1 + y * (1 - sigma(y))), fp32."""
    sig = tl.sigmoid(y)
    return y * sig, sig * (1.0 + y * (1.0 - sig))


@triton.jit
def _channel_tile(c0, C, P, row, p, p_mask, BLOCK_C: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_P] and mask of channels c0.. c0+BLOCK_C of batch row ``row`` at pixels ``p``."""
    c = c0 + tl.arange(0, BLOCK_C)
    offs = (row * C + c[:, None]).to(tl.int64) * P + p[None, :]
    return offs, (c[:, None] < C) & p_mask[None, :]


@triton.jit
def _pixel_program(P, BLOCK_P: tl.constexpr):
    """Program id -> (batch row, pixels [BLOCK_P], their mask); pixel tiles fastest."""
    pid = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    row = (pid // n_p).to(tl.int64)
    p = (pid % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    return row, p, p < P


@triton.jit
def pixel_norm_silu_fwd_kernel(x_ptr, y_ptr, s_ptr, norm_ptr, C, P, scale, eps,
                               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    row, p, p_mask = _pixel_program(P, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_tile(c0, C, P, row, p, p_mask, BLOCK_C)
        v = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32)
        acc += tl.sum(v * v, axis=0)
    norm = tl.sqrt_rn(acc)      # round-to-nearest, as F.normalize (tl.sqrt is an approximation on a GPU)
    tl.store(norm_ptr + row * P + p, norm, mask=p_mask)
    k = tl.div_rn(scale, tl.maximum(norm, eps))
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_tile(c0, C, P, row, p, p_mask, BLOCK_C)
        v = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32)
        y = v * k[None, :]
        s, _ = _silu_and_slope(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_norm_grad_in(x_ptr, gy_ptr, gs_ptr, offs, mask, k):
    """x and the gradient reaching y (through y itself and through silu(y)) of one channel tile, fp32."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.).to(tl.float32)
    gs = tl.load(gs_ptr + offs, mask=mask, other=0.).to(tl.float32)
    _, slope = _silu_and_slope(v * k[None, :])
    return v, gy + gs * slope


@triton.jit
def pixel_norm_silu_bwd_kernel(x_ptr, gy_ptr, gs_ptr, norm_ptr, dx_ptr, C, P, scale, eps,
                               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # y = scale * x / max(|x|, eps): dx = scale / n * (g - x (x . g) / n^2) where |x| >= eps (F.normalize's
    # clamp passes the gradient there), dx = scale / eps * g below it
    row, p, p_mask = _pixel_program(P, BLOCK_P)
    norm = tl.load(norm_ptr + row * P + p, mask=p_mask, other=1.)
    inv = tl.div_rn(1.0, tl.maximum(norm, eps))
    k = scale * inv
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_tile(c0, C, P, row, p, p_mask, BLOCK_C)
        v, g = _pixel_norm_grad_in(x_ptr, gy_ptr, gs_ptr, offs, mask, k)
        dot += tl.sum(v * g, axis=0)
    proj = tl.where(norm >= eps, dot * inv * inv, 0.)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _channel_tile(c0, C, P, row, p, p_mask, BLOCK_C)
        v, g = _pixel_norm_grad_in(x_ptr, gy_ptr, gs_ptr, offs, mask, k)
        dx = k[None, :] * (g - v * proj[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flat_program(N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def scale_silu_fwd_kernel(x_ptr, scale_ptr, out_ptr, N, P, BLOCK: tl.constexpr):
    offs, mask = _flat_program(N, BLOCK)
    s = tl.load(scale_ptr + offs // P, mask=mask, other=0.).to(tl.float32)      # scale[b, c], (b c) = offs // P
    z = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32) * s
    out, _ = _silu_and_slope(z)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_silu_bwd_kernel(x_ptr, scale_ptr, g_ptr, dx_ptr, N, P, BLOCK: tl.constexpr):
    offs, mask = _flat_program(N, BLOCK)
    s = tl.load(scale_ptr + offs // P, mask=mask, other=0.).to(tl.float32)
    z = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32) * s
    _, slope = _silu_and_slope(z)
    g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32)
    tl.store(dx_ptr + offs, (g * slope * s).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mp_cat_fwd_kernel(a_ptr, b_ptr, out_ptr, N, CA, CB, P, ca, cb, BLOCK: tl.constexpr):
    # out = b (CA + CB) p; each element reads from a (channel < CA) or b, never both
    offs, mask = _flat_program(N, BLOCK)
    pix = offs % P
    rest = offs // P
    c = rest % (CA + CB)
    row = rest // (CA + CB)
    in_a = c < CA
    va = tl.load(a_ptr + (row * CA + c) * P + pix, mask=mask & in_a, other=0.).to(tl.float32)
    vb = tl.load(b_ptr + (row * CB + (c - CA)) * P + pix, mask=mask & (c >= CA), other=0.).to(tl.float32)
    out = tl.where(in_a, va * ca, vb * cb)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
