"""Shared test helpers: upstream comparison, parameter perturbation, a small KarrasUnet."""

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

# fp32 parity with upstream: relative error (||ours - upstream|| / ||upstream||) per tensor
PARITY_RTOL = {torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv('LUMIERE_FAST_BACKEND', raising=False)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close_rel(ours, ref, rtol=1e-5, atol=0., what=''):
    """||ours - ref|| <= rtol * ||ref|| + atol (norm-wise relative error, with an absolute noise floor)."""
    assert ours.shape == ref.shape, f'{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}'
    assert torch.isfinite(ours).all(), f'{what}: non-finite values'
    diff = (ours.detach().double() - ref.detach().double()).norm().item()
    ref_norm = ref.detach().double().norm().item()
    assert diff <= rtol * ref_norm + atol, \
        f'{what}: |diff| {diff:.3g} > {rtol:g} * |ref| {ref_norm:.3g} + {atol:.3g} (relative {rel_err(ours, ref):.3g})'


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.3, generator=None):
    """Move every parameter off its init (zero-init projections and gains included), at its own scale."""
    for p in module.parameters():
        std = p.std().item() if p.numel() > 1 else 0.
        s = scale * (std if std > 0 else 1.)
        p.add_(torch.randn(p.shape, generator=generator) * s)


def small_unet(**overrides):
    from denoising_diffusion_pytorch import KarrasUnet
    kw = dict(image_size=16, dim=8, channels=3, dim_max=32, num_downsamples=2, num_blocks_per_stage=1,
              attn_res=(4,), dropout=0.)
    kw.update(overrides)
    unet = KarrasUnet(**kw)
    with torch.no_grad():          # the output Gain starts at 0: give the image model a non-zero output
        for name, p in unet.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.7)
    return unet


SMALL_UNET_NAMES = dict(conv_module_names=['downs.0', 'ups.2'], attn_module_names=['mids.0'],
                        downsample_module_names=['downs.1'], upsample_module_names=['ups.1'])


@pytest.fixture
def poison_and_ieee(monkeypatch):
    """Kernel tests: launcher outputs start as NaN (an unwritten element fails), and fp32 is exact IEEE on a GPU
    (the kernels, via ops._triton.dot_precision, and cuDNN both follow torch.backends.cudnn.allow_tf32)."""
    from lumiere_fast.ops import _triton
    monkeypatch.setattr(_triton, 'POISON', True)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def strided_frames(b, t, c, H, W, dtype, layout='contiguous', device='cpu'):
    """A (b t) c H W tensor: contiguous, a channel slice of a wider tensor, or a permuted (channels-last) view."""
    if layout == 'slice':
        return torch.randn(b * t, c + 3, H, W, dtype=dtype, device=device)[:, 1:c + 1]
    if layout == 'permuted':
        return torch.randn(b * t, H, W, c, dtype=dtype, device=device).permute(0, 3, 1, 2)
    return torch.randn(b * t, c, H, W, dtype=dtype, device=device)


def compile_for_sm90(script: str):
    """Run ``script`` (which compiles kernels for sm_90 through Triton's ahead-of-time API and prints
    'compiled') in a subprocess without TRITON_INTERPRET: the interpreter never lowers a kernel, so GPU-only
    lowering errors surface here on a machine without a GPU."""
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f'this triton has no ahead-of-time compile API: {e}')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and 'compiled' in run.stdout, run.stderr[-3000:]
