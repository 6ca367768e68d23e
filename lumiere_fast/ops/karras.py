"""The elementwise chains of the frozen image model (denoising-diffusion-pytorch's ``KarrasUnet``), fused.

Every tensor is an image batch ``b c h w`` (frames ``(b t) c h w`` inside Lumiere). The MP-SiLU divisor (0.596)
and the MP-add weight of the branch are linear, so ``modules/karras.py`` folds them into the cached weight of
the conv that follows (or precedes); what is left for these ops is plain SiLU:

    pixel_norm_silu(x)    -> (y, silu(y)),  y = pixel_norm(x) over c    Encoder: the residual and block1's input
    scale_silu(x, scale)  -> silu(x * scale[b, c])                      the embedding modulation before block2
    mp_cat(a, b, t)       -> MPCat over c, in one write                 the decoder's skip concatenation
    resize2x(x, up)       -> bilinear h/2 x w/2 or 2h x 2w              the encoder's downsample, the decoder's upsample

(``mp_add`` needs no op: with the branch weight folded into the conv it is one ``torch.add(res, x, alpha=)``.)

``resize2x`` is upstream's ``F.interpolate(mode='bilinear')`` except in deterministic mode on CUDA. There the
native ``upsample_bilinear2d`` backward (atomics) would raise, so ``F.interpolate`` itself switches to a Python
decomposition (4 gathers and lerps; backward: 4 sort-based ``index_put(accumulate=True)``): deterministic, but slow
(on CPU 4x (halving) and 17x (doubling) the native forward + backward on (4, 32, 32, 32), measured). ``resize2x``
runs the fixed 2x stencil instead, as ops whose CUDA backward is deterministic without a sort or atomics
(``avg_pool2d``; slices, products and sums; plain PyTorch, no kernel of ours), within 1 ulp of the native kernel.

Triton path (``lumiere_fast.kernels.karras``): forward and the input-gradient backward of each. The frozen image
model needs input gradients only; a ``scale`` that requires grad gets its gradient from a PyTorch reduction in
the backward (it never does inside Lumiere: the embedding is frozen).
"""

from __future__ import annotations

from functools import cache

from math import sqrt

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._triton import (NAMESPACE, device_guard, differentiable_backward, eager_or_op, grid_1d, launch, new_output,
                      register_eager, use_triton)

PIXEL_NORM_EPS = 1e-4      # upstream's PixelNorm default (the paper's high epsilon)


# ------------------------------------------------------------------------------------------------ checks

def _check_images(name: str, x: Tensor, what: str = 'x') -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f'{name}: expected {what} as a 4-dim b c h w tensor, got shape {tuple(getattr(x, "shape", ()))}')


def _check_scale(x: Tensor, scale: Tensor) -> None:
    if scale.shape != x.shape[:2]:
        raise ValueError(f'scale_silu: expected scale of shape {tuple(x.shape[:2])} (b, c), got {tuple(scale.shape)}')


def _check_cat(a: Tensor, b: Tensor) -> None:
    _check_images('mp_cat', a, 'a')
    _check_images('mp_cat', b, 'b')
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f'mp_cat: a {tuple(a.shape)} and b {tuple(b.shape)} must agree except in channels')


def _check_resize(x: Tensor, up: bool) -> None:
    _check_images('resize2x', x)
    if not isinstance(up, bool):
        raise TypeError(f'resize2x: expected up as a bool, got {type(up).__name__}')


def mp_cat_coefficients(na: int, nb: int, t: float) -> tuple[float, float]:
    """MPCat's per-half factors (Karras et al. eq. 103): out = cat(a * ca, b * cb)."""
    c = sqrt((na + nb) / ((1. - t) ** 2 + t ** 2))
    return c * (1. - t) / sqrt(na), c * t / sqrt(nb)


# ------------------------------------------------------------------------------------------------ references

def pixel_norm_sumsq(x: Tensor, dim: int, eps: float = PIXEL_NORM_EPS) -> Tensor:
    """Upstream's ``PixelNorm(dim)``: ``F.normalize(x, dim, eps) * sqrt(x.shape[dim])``, the same function and
    gradient written as ``x * rsqrt(max(sum x^2, eps^2))``: torch's vector norm over a strided axis (channels of
    b c h w, the head dim of b (3 h d) n) is 10-20x slower on CPU than a sum of squares (measured, 1 thread,
    (8, 32, 32, 32): 3.8 ms vs 0.3 ms). The clamp on the squared norm passes the gradient exactly where
    ``F.normalize``'s clamp on the norm does; the sum is in fp32 for fp16/bf16 inputs (eps^2 underflows in fp16)."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    sumsq = x.to(acc).square().sum(dim, keepdim=True)
    scale = sumsq.clamp_min(eps * eps).rsqrt() * sqrt(x.shape[dim])
    return x * scale.to(x.dtype)


def pixel_norm_silu_ref(x: Tensor, eps: float = PIXEL_NORM_EPS) -> tuple[Tensor, Tensor]:
    """b c h w -> (y, silu(y)), y = l2-normalised over c (``F.normalize`` with eps) times sqrt(c)."""
    y = pixel_norm_sumsq(x, 1, eps)
    return y, F.silu(y)


def scale_silu_ref(x: Tensor, scale: Tensor) -> Tensor:
    """b c h w, (b, c) -> b c h w: silu(x * scale)."""
    return F.silu(x * scale[:, :, None, None])


def mp_cat_ref(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """b ca h w, b cb h w -> b (ca + cb) h w: upstream's MPCat over channels, one per-channel multiply after the
    cat instead of scaling each half and the result (two passes instead of four)."""
    ca, cb = mp_cat_coefficients(a.shape[1], b.shape[1], t)
    coeff = torch.cat([a.new_full((a.shape[1],), ca), b.new_full((b.shape[1],), cb)])
    return torch.cat((a, b), dim=1) * coeff[:, None, None]


def resize2x_ref(x: Tensor, up: bool) -> Tensor:
    """b c h w -> b c 2h 2w (``up``) or b c h//2 w//2: upstream's ``F.interpolate(x, size, mode='bilinear')``
    (align_corners=False), as its encoder and decoder call it."""
    h, w = x.shape[-2:]
    return F.interpolate(x, (h * 2, w * 2) if up else (h // 2, w // 2), mode='bilinear')


def halve_exact(x: Tensor) -> Tensor:
    """b c h w -> b c h/2 w/2 (h, w even): bilinear at scale 1/2 samples at 2i + 0.5, the mean of each 2x2 block,
    which is ``avg_pool2d(x, 2)`` (its CUDA backward gathers: deterministic). Equal to ``F.interpolate`` up to the
    order of the four-term sum (1 ulp; the input gradient, each output's gradient / 4 over its block, bit-equal:
    measured on CPU). Odd h or w: the scale h / (h // 2) is not 2 and no fixed stencil exists."""
    return F.avg_pool2d(x, 2)


def _double_axis(x: Tensor, dim: int) -> Tensor:
    """... n ... -> ... 2n ...: linear interpolation at scale 2 along ``dim``, align_corners=False, as PyTorch
    computes it (source index 0.5 i - 0.25, clamped at 0 below, neighbour clamped at n - 1 above):
    out[2i] = 0.25 x[i-1] + 0.75 x[i] (out[0] = x[0]), out[2i+1] = 0.75 x[i] + 0.25 x[i+1] (the last:
    0.75 x[n-1] + 0.25 x[n-1]). Slices, products, sums, cat and stack only: each backward is a copy or a sum,
    nothing scatters (replicate padding would: its native CUDA backward adds with atomics)."""
    n = x.shape[dim]
    lo, hi, last = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)
    even = torch.cat((x.narrow(dim, 0, 1), lo * 0.25 + hi * 0.75), dim)
    odd = torch.cat((lo * 0.75 + hi * 0.25, last * 0.75 + last * 0.25), dim)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return torch.stack((even, odd), dim + 1).reshape(shape)      # ... n 2 ... -> ... (n 2) ...


def double_exact(x: Tensor) -> Tensor:
    """b c h w -> b c 2h 2w: bilinear at scale 2 as two separable passes, w first then h (the order of PyTorch's
    h0 * (w0 * x00 + w1 * x01) + h1 * (...)); fp16/bf16 in fp32, cast once, as PyTorch's kernels compute. Equal to
    ``F.interpolate`` up to rounding (the kernels' fused multiply-adds: 1 ulp, measured)."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return _double_axis(_double_axis(x.to(acc), 3), 2).to(x.dtype)


# ------------------------------------------------------------------------------------------------ Triton launchers
#
# Kernels take contiguous b c (h w) tensors (what the convs around them produce), so a channel step is P = h*w
# elements and the pixel axis is the contiguous one: every load is a run of BLOCK_P pixels.

@cache
def _kernels():
    from ..kernels import karras as k
    return k


def _pixel_norm_grid(x: Tensor, block_p: int) -> tuple[int]:
    b, _, h, w = x.shape
    return grid_1d(b * -(-(h * w) // block_p))


def _pixel_norm_silu_forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """b c h w -> y, silu(y) (b c h w, contiguous), norm (b, h*w) fp32 (saved for the backward)."""
    k = _kernels()
    x = x.contiguous()
    b, c, h, w = x.shape
    y, s = new_output(x.shape, x), new_output(x.shape, x)
    norm = new_output((b, h * w), x, torch.float32)
    block_c, block_p, warps = k.PIXEL_NORM_BLOCKS
    with device_guard(x):
        k.pixel_norm_silu_fwd_kernel[_pixel_norm_grid(x, block_p)](
            x, y, s, norm, c, h * w, sqrt(c), eps, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return y, s, norm


def _pixel_norm_silu_backward(grad_y: Tensor, grad_s: Tensor, x: Tensor, norm: Tensor, eps: float) -> Tensor:
    k = _kernels()
    x, grad_y, grad_s = x.contiguous(), grad_y.contiguous(), grad_s.contiguous()
    b, c, h, w = x.shape
    dx = new_output(x.shape, x)
    block_c, block_p, warps = k.PIXEL_NORM_BLOCKS
    with device_guard(x):
        k.pixel_norm_silu_bwd_kernel[_pixel_norm_grid(x, block_p)](
            x, grad_y, grad_s, norm, dx, c, h * w, sqrt(c), eps, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return dx


def _elementwise_grid(n: int, block: int) -> tuple[int]:
    return grid_1d(-(-n // block))


def _scale_silu_forward(x: Tensor, scale: Tensor) -> Tensor:
    k = _kernels()
    x, scale = x.contiguous(), scale.contiguous()
    out = new_output(x.shape, x)
    block, warps = k.ELEMENTWISE_BLOCK
    with device_guard(x):
        k.scale_silu_fwd_kernel[_elementwise_grid(x.numel(), block)](
            x, scale, out, x.numel(), x.shape[2] * x.shape[3], BLOCK=block, num_warps=warps)
    return out


def _scale_silu_backward(grad: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    k = _kernels()
    x, scale, grad = x.contiguous(), scale.contiguous(), grad.contiguous()
    dx = new_output(x.shape, x)
    block, warps = k.ELEMENTWISE_BLOCK
    with device_guard(x):
        k.scale_silu_bwd_kernel[_elementwise_grid(x.numel(), block)](
            x, scale, grad, dx, x.numel(), x.shape[2] * x.shape[3], BLOCK=block, num_warps=warps)
    return dx


def _mp_cat_forward(a: Tensor, b: Tensor, t: float) -> Tensor:
    k = _kernels()
    a, b = a.contiguous(), b.contiguous()
    n, na, h, w = a.shape
    nb = b.shape[1]
    out = new_output((n, na + nb, h, w), a)
    ca, cb = mp_cat_coefficients(na, nb, t)
    block, warps = k.ELEMENTWISE_BLOCK
    with device_guard(a):
        k.mp_cat_fwd_kernel[_elementwise_grid(out.numel(), block)](
            a, b, out, out.numel(), na, nb, h * w, ca, cb, BLOCK=block, num_warps=warps)
    return out


# ------------------------------------------------------------------------------------------------ custom ops

@torch.library.custom_op(f'{NAMESPACE}::pixel_norm_silu', mutates_args=())
def _pixel_norm_silu_op(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _pixel_norm_silu_forward(x, eps)


@_pixel_norm_silu_op.register_fake
def _(x, eps):
    b, _, h, w = x.shape
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((b, h * w), dtype=torch.float32))


@torch.library.custom_op(f'{NAMESPACE}::pixel_norm_silu_backward', mutates_args=())
def _pixel_norm_silu_backward_op(grad_y: Tensor, grad_s: Tensor, x: Tensor, norm: Tensor, eps: float) -> Tensor:
    return _pixel_norm_silu_backward(grad_y, grad_s, x, norm, eps)


@_pixel_norm_silu_backward_op.register_fake
def _(grad_y, grad_s, x, norm, eps):
    return x.new_empty(x.shape)


def _pixel_norm_silu_setup(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x, output[2])
    ctx.eps = eps


def _pixel_norm_silu_autograd(ctx, grad_y, grad_s, _grad_norm):
    x, norm = ctx.saved_tensors
    if torch.is_grad_enabled():     # create_graph: through the reference
        return differentiable_backward(pixel_norm_silu_ref, (x, ctx.eps), (grad_y, grad_s))
    backward = eager_or_op(ctx, _pixel_norm_silu_backward, _pixel_norm_silu_backward_op)
    return backward(grad_y, grad_s, x, norm, ctx.eps), None


_pixel_norm_silu_op.register_autograd(_pixel_norm_silu_autograd, setup_context=_pixel_norm_silu_setup)
register_eager(_pixel_norm_silu_op, _pixel_norm_silu_forward, _pixel_norm_silu_setup, _pixel_norm_silu_autograd)


@torch.library.custom_op(f'{NAMESPACE}::scale_silu', mutates_args=())
def _scale_silu_op(x: Tensor, scale: Tensor) -> Tensor:
    return _scale_silu_forward(x, scale)


@_scale_silu_op.register_fake
def _(x, scale):
    return x.new_empty(x.shape)


@torch.library.custom_op(f'{NAMESPACE}::scale_silu_backward', mutates_args=())
def _scale_silu_backward_op(grad: Tensor, x: Tensor, scale: Tensor) -> Tensor:
    return _scale_silu_backward(grad, x, scale)


@_scale_silu_backward_op.register_fake
def _(grad, x, scale):
    return x.new_empty(x.shape)


def _scale_silu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scale_silu_autograd(ctx, grad):
    x, scale = ctx.saved_tensors
    if torch.is_grad_enabled():     # create_graph: through the reference
        return differentiable_backward(scale_silu_ref, (x, scale), grad)
    backward = eager_or_op(ctx, _scale_silu_backward, _scale_silu_backward_op)
    dx = backward(grad, x, scale) if ctx.needs_input_grad[0] else None
    dscale = None
    if ctx.needs_input_grad[1]:     # never inside Lumiere (frozen embedding): a PyTorch reduction is enough
        z = x * scale[:, :, None, None]
        sig = torch.sigmoid(z)
        dscale = (grad * sig * (1 + z * (1 - sig)) * x).sum((2, 3))
    return dx, dscale


_scale_silu_op.register_autograd(_scale_silu_autograd, setup_context=_scale_silu_setup)
register_eager(_scale_silu_op, _scale_silu_forward, _scale_silu_setup, _scale_silu_autograd)


@torch.library.custom_op(f'{NAMESPACE}::mp_cat', mutates_args=())
def _mp_cat_op(a: Tensor, b: Tensor, t: float) -> Tensor:
    return _mp_cat_forward(a, b, t)


@_mp_cat_op.register_fake
def _(a, b, t):
    return a.new_empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]))


def _mp_cat_setup(ctx, inputs, output):
    a, b, t = inputs
    ctx.na, ctx.nb, ctx.t = a.shape[1], b.shape[1], t


def _mp_cat_autograd(ctx, grad):
    # each input's gradient is a scaled slice of grad: one read and one write per half, already the minimum
    ca, cb = mp_cat_coefficients(ctx.na, ctx.nb, ctx.t)
    return grad[:, :ctx.na] * ca, grad[:, ctx.na:] * cb, None


_mp_cat_op.register_autograd(_mp_cat_autograd, setup_context=_mp_cat_setup)
register_eager(_mp_cat_op, _mp_cat_forward, _mp_cat_setup, _mp_cat_autograd)


# ------------------------------------------------------------------------------------------------ dispatch

def _promoted(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their promoted dtype, the dtype the reference's elementwise ops compute in (autocast casts
    none of them): a mixed fp32 / bf16 pair (an autocast conv's output beside an fp32 skip) takes the kernel."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def pixel_norm_silu(x: Tensor, eps: float = PIXEL_NORM_EPS) -> tuple[Tensor, Tensor]:
    """b c h w -> (y, silu(y)): upstream's ``PixelNorm(dim=1)`` and the SiLU of block1 in one pass (the MP-SiLU
    divisor is folded into the next conv's weight by the module)."""
    _check_images('pixel_norm_silu', x)
    if use_triton('pixel_norm_silu', x, supported=x.numel() > 0, autocast=False):
        y, s, _ = launch(_pixel_norm_silu_op, x, float(eps))
        return y, s
    return pixel_norm_silu_ref(x, eps)


def scale_silu(x: Tensor, scale: Tensor) -> Tensor:
    """b c h w, (b, c) -> b c h w: the embedding modulation ``x * scale`` and block2's SiLU in one pass."""
    _check_images('scale_silu', x)
    _check_scale(x, scale)
    xs, ss = _promoted(x, scale)
    if use_triton('scale_silu', xs, ss, supported=x.numel() > 0, autocast=False):
        return launch(_scale_silu_op, xs, ss)
    return scale_silu_ref(x, scale)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """b ca h w, b cb h w -> b (ca + cb) h w: upstream's ``MPCat(t, dim=1)``, written once."""
    _check_cat(a, b)
    pa, pb = _promoted(a, b)
    if use_triton('mp_cat', pa, pb, supported=a.numel() > 0, autocast=False):
        return launch(_mp_cat_op, pa, pb, float(t))
    return mp_cat_ref(a, b, t)


def resize2x(x: Tensor, up: bool, deterministic: bool | None = None) -> Tensor:
    """b c h w -> b c 2h 2w (``up``) or b c h//2 w//2: upstream's bilinear resize (``resize2x_ref``).

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()`` on a CUDA tensor; True forces it,
    for tests on CPU): the same stencil as ops with a deterministic backward (``double_exact``, ``halve_exact``).
    A halving with odd h or w has no fixed stencil and keeps ``F.interpolate`` (in deterministic mode on CUDA its
    decomposition, deterministic too; a KarrasUnet never meets one: its decoder's skip concatenation needs the
    doubled size back). Recorded by ``record_choices()`` as ``'deterministic'`` or ``'reference'``."""
    _check_resize(x, up)
    if deterministic is None:
        deterministic = x.is_cuda and torch.are_deterministic_algorithms_enabled()
    h, w = x.shape[-2:]
    exact = x.is_floating_point() and x.numel() > 0 and (up or (h % 2 == 0 and w % 2 == 0))
    if not (deterministic and exact):
        backend.record('resize2x', 'reference')
        return resize2x_ref(x, up)
    backend.record('resize2x', 'deterministic')
    if x.is_cuda and torch.is_autocast_enabled('cuda') and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()       # CUDA autocast runs upsample_bilinear2d in fp32 (its fp32 list): the same dtype out
    return double_exact(x) if up else halve_exact(x)
