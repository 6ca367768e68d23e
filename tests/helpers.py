"""Shared test helpers (imported as ``from helpers import ...``): the tolerance table and the one comparison
helper, upstream comparison, parameter perturbation, a small KarrasUnet, strided frames, the sm_90 compile check.

Not in ``conftest.py``: a combined ``pytest tests benchmarks`` imports both folders' conftest modules under the
one name ``conftest``, so a test importing from it could get the other one. Fixtures stay in conftest.py.
"""

from __future__ import annotations

import os

import pytest
import torch

# The one tolerance table: the norm-wise relative error ||ours - ref|| / ||ref|| allowed per dtype of the inputs,
# ours against a reference computed in fp32 (fp64 for fp64) from the same rounded inputs. fp32 is also the
# modules' and the wrapper's parity with upstream (fp32 sums in another order); fp16/bf16 are their rounding of
# the inputs and outputs (10 / 7 mantissa bits) after fp32 accumulation. 'tf32': fp32 through TF32 tensor cores
# (10 mantissa bits), what the kernels and cuDNN do on a GPU by default (torch.backends.cudnn.allow_tf32).
# 'fp32_model': a whole wrapped U-Net in fp32 on the Triton backend against the reference backend: each kernel sums
# tile by tile in another order than cuDNN/ATen, and some twenty layers forward and back amplify that (measured
# 2.7e-5 on a parameter gradient of the non-MP wrapper).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, 'tf32': 5e-3, 'fp32_model': 1e-4, torch.float16: 2e-2,
       torch.bfloat16: 3e-2}
PARITY_RTOL = TOL      # modules and wrapper vs lumiere-pytorch: the same table (fp32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close_rel(ours, ref, rtol=1e-5, atol=0., what=''):
    """||ours - ref|| <= rtol * ||ref|| + atol (norm-wise relative error, with an absolute noise floor); ours must
    be finite (a NaN-poisoned element that no program wrote fails). ``rtol``: an entry of ``TOL``; ``atol``: the
    noise floor of a gradient whose reference is (near) zero; ``rtol=0, atol=0``: bit-exact."""
    assert ours.shape == ref.shape, f'{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}'
    assert torch.isfinite(ours).all(), f'{what}: non-finite values'
    diff = (ours.detach().double() - ref.detach().double()).norm().item()
    ref_norm = ref.detach().double().norm().item()
    assert diff <= rtol * ref_norm + atol, \
        f'{what}: |diff| {diff:.3g} > {rtol:g} * |ref| {ref_norm:.3g} + {atol:.3g} (relative {rel_err(ours, ref):.3g})'


# no kernel by design: a (c, c, k) weight normalisation once per step; the image model's bilinear 2x resize
NO_KERNEL = frozenset({'mp_weight', 'resize2x'})


def assert_kernels_only(seen, what=''):
    """Every op recorded by ``backend.record_choices()`` that has a kernel ran it, and only it."""
    assert seen, f'{what}: no op recorded'
    bad = {op: c for op, c in seen.items() if op not in NO_KERNEL and c != {'triton'}}
    assert not bad, f'{what}: ops not on their kernel: {bad} (all: {seen})'


class PackTracker:
    """Records every weight pack an op module makes (``ops.weight_pack.packed``, patched into ``module``), each
    pack checked in-channel-contiguous, so a test can assert none outlives its call."""

    def __init__(self, monkeypatch, module):
        import weakref
        from lumiere_fast.ops import weight_pack
        self.refs = []

        def tracked(*args, **kwargs):
            pack = weight_pack.packed(*args, **kwargs)
            assert pack.stride(1) == 1, f'pack strides {pack.stride()}: in-channel stride must be 1'
            self.refs.append(weakref.ref(pack))
            return pack

        monkeypatch.setattr(module, 'packed', tracked)

    def assert_none_alive(self):
        import gc
        gc.collect()
        assert self.refs and all(r() is None for r in self.refs), 'a pack outlived its call'


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


def strided_frames(b, t, c, H, W, dtype, layout='contiguous', device='cpu'):
    """A (b t) c H W tensor: contiguous, a channel slice of a wider tensor, or a permuted (channels-last) view."""
    if layout == 'slice':
        return torch.randn(b * t, c + 3, H, W, dtype=dtype, device=device)[:, 1:c + 1]
    if layout == 'permuted':
        return torch.randn(b * t, H, W, c, dtype=dtype, device=device).permute(0, 3, 1, 2)
    return torch.randn(b * t, c, H, W, dtype=dtype, device=device)


_SM90_PRELUDE = r"""
import contextlib, io, os, re, sys, tempfile
os.environ.pop('TRITON_INTERPRET', None)
# A fresh cache: a cached kernel runs no ptxas, and ptxas's own report (-v, which Triton passes and prints with
# TRITON_DUMP_PTXAS_LOG) is where registers and spills come from without a driver.
import atexit, shutil
os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='lumiere-sm90-')
atexit.register(shutil.rmtree, os.environ['TRITON_CACHE_DIR'], True)
os.environ['TRITON_DUMP_PTXAS_LOG'] = '1'
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROWS, FAILS, SPILLS, INEXACT = [], [], [], []


def _ptxas_report(log):
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    if 'Used' not in log:
        raise RuntimeError('no ptxas report in the compile output:\n' + log[-2000:])
    return dict(regs=num(r'Used (\d+) registers'), spill_st=num(r'(\d+) bytes spill stores'),
                spill_ld=num(r'(\d+) bytes spill loads'), ptxas_smem=num(r'(\d+) bytes smem'))


def compile_for_h100(kernel, consts, dt='bf16', warps=4, stages=3, exact=()):
    # Compile one specialisation of ``kernel`` for sm_90a: pointer arguments (named *_ptr, or in POINTERS) of
    # dtype dt and 16-byte aligned (as every torch allocation; Triton specialises on it), fp32 for F32_BUFFERS;
    # scalars i32, fp32 for FLOATS; ``consts`` are the constexprs. Records registers, spills and shared memory;
    # ``exact``: ops ('sqrt', 'div') the kernel must compile to round-to-nearest (sqrt.rn / div.rn).
    fn = kernel
    while not isinstance(fn, triton.JITFunction):
        fn = fn.fn
    def is_ptr(a):
        return a.endswith('_ptr') or a in POINTERS
    def arg_type(a):
        if is_ptr(a):
            return '*fp32' if a in F32_BUFFERS else '*' + dt
        return 'fp32' if a in FLOATS else 'i32'
    sig = {a: 'constexpr' if a in consts else arg_type(a) for a in fn.arg_names}
    attrs = {(i,): [['tt.divisibility', 16]] for i, a in enumerate(fn.arg_names) if a not in consts and is_ptr(a)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=GPUTarget('cuda', 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    rep = _ptxas_report(log.getvalue())
    shared = k.metadata.shared + rep['ptxas_smem']
    variant = ' '.join(f'{a}={v}' for a, v in consts.items())
    row = (fn.__name__, f'{dt} w{warps} s{stages} {variant}', rep['regs'], rep['spill_st'], rep['spill_ld'], shared)
    spills = max(rep['spill_st'], rep['spill_ld']) > MAX_SPILL
    ROWS.append(row + ('SPILLS' if spills else '',))
    if spills:
        SPILLS.append(f'{row[0]} [{row[1]}]: {rep["spill_st"]}/{rep["spill_ld"]} B')
    why = []
    if shared > H100_SMEM:
        why.append(f'shared memory {shared} B > {H100_SMEM} B per block')
    if rep['regs'] > MAX_REGS:
        why.append(f'{rep["regs"]} registers > {MAX_REGS} per thread')
    ptx = k.asm['ptx']
    if why:
        FAILS.append(f'{row[0]} [{row[1]}]: ' + '; '.join(why))
    for op in exact:
        if (op == 'sqrt' and ('sqrt.approx' in ptx or 'sqrt.rn.f32' not in ptx)) or \
                (op == 'div' and 'div.rn.f32' not in ptx):
            INEXACT.append(f'{row[0]} [{row[1]}]: {op} is not round-to-nearest in the PTX')


def report():
    w = max(len(r[0]) + len(r[1]) for r in ROWS) + 3
    print(f'{"kernel [variant]":<{w}} {"regs":>5} {"spill st/ld B":>14} {"smem B":>7}')
    for name, variant, regs, st, ld, smem, note in ROWS:
        print(f'{name + " [" + variant + "]":<{w}} {regs:>5} {f"{st}/{ld}":>14} {smem:>7} {note}')
    print(f'{len(ROWS)} variants; limits: {H100_SMEM} B shared, {MAX_REGS} registers; '
          f'{len(SPILLS)} spill more than {MAX_SPILL} B a thread (reported, not failed)')
    if FAILS:
        print('DOES NOT FIT:\n' + '\n'.join(FAILS), file=sys.stderr)
    if INEXACT:
        print('NOT EXACT:\n' + '\n'.join(INEXACT), file=sys.stderr)
    sys.exit(2 if FAILS else 3 if INEXACT else 0)
"""

# What an H100 (sm_90) gives one block: 227 KiB of shared memory (opt-in maximum) and 255 registers a thread;
# above either the launch fails, so the test fails. Spills go to local memory (L1/L2-cached) and cost speed, not
# correctness: a few hundred bytes a thread are cheap next to a fused kernel's traffic, more than MAX_SPILL (1 KiB)
# means the tile does not fit the register file. Those are marked SPILLS in the table and listed, not failed:
# the tiles are the launchers' choice and measured today (issue 13) well above 1 KiB for the fp32 'ieee' dots
# (FMA, no tensor cores) and the 64-row attention tiles; shrinking them wants GPU timings.
H100_SMEM, MAX_REGS, MAX_SPILL = 232448, 255, 1024


def compile_for_sm90(calls: str, f32_buffers=(), floats=(), pointers=(), timeout=300):
    """Run ``calls`` (``compile_for_h100(kernel, consts, dt=..., warps=..., stages=..., exact=...)`` lines, which
    compile kernels for sm_90a through Triton's ahead-of-time API) in one subprocess without TRITON_INTERPRET:
    the interpreter never lowers a kernel, so GPU-only lowering errors surface here on a machine without a GPU.
    Prints a table of registers, spill bytes and shared memory per variant (``pytest -s`` shows it; SPILLS marks
    more than ``MAX_SPILL``) and fails on a variant that does not fit an H100 (``H100_SMEM``, ``MAX_REGS``) or whose
    ``exact`` ops are not round-to-nearest in its PTX (Triton before 3.8 lowers tl.sqrt_rn / tl.div_rn to
    approximations: the kernels' ``grid.sqrt_rn`` / ``grid.div_rn`` take libdevice's there, which this checks).
    ``f32_buffers``: pointer arguments that are fp32 whatever the kernel's dtype; ``floats``: fp32 scalar
    arguments; ``pointers``: pointer arguments not named *_ptr."""
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f'this triton has no ahead-of-time compile API: {e}')
    script = (_SM90_PRELUDE + f'H100_SMEM, MAX_REGS, MAX_SPILL = {H100_SMEM}, {MAX_REGS}, {MAX_SPILL}\n'
              f'F32_BUFFERS = {set(f32_buffers)!r}\nFLOATS = {set(floats)!r}\nPOINTERS = {set(pointers)!r}\n'
              + calls + '\nreport()\n')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=timeout)
    print(run.stdout)
    assert run.returncode == 0 and 'variants; limits' in run.stdout, run.stderr[-5000:]


# --------------------------------------------------------------------------- references vs explicit compositions
# The references skip upstream's fold/unfold copies by working on views of the frames; each op's test file holds
# its reference to the obvious fold -> op -> unfold composition on these shapes, chosen to break view arithmetic
# (t=1, odd sizes, one pixel, non-contiguous inputs), forward and backward, fp32 and fp64.

REF_SHAPES = [  # batch, frames, channels, h, w
    (1, 1, 1, 1, 1), (2, 1, 3, 2, 5), (1, 7, 5, 3, 1), (3, 4, 16, 2, 2), (2, 9, 7, 5, 3), (1, 2, 33, 1, 4),
]


def frames_input(b, t, c, h, w, dtype, contiguous=True):
    """A (b t) c h w leaf that requires grad: contiguous, or a channel-sliced, w-strided view."""
    if contiguous:
        x = torch.randn(b * t, c, h, w, dtype=dtype)
    else:
        x = torch.randn(b * t, c + 2, h, 2 * w, dtype=dtype)[:, 1:c + 1, :, ::2]
    return x.requires_grad_(True)


def fold_ct(x, b):
    """Upstream's fold, written out: (b t) c h w -> (b h w) c t."""
    from einops import rearrange
    return rearrange(x, '(b t) c h w -> (b h w) c t', b=b)


def unfold_ct(y, b, h, w):
    from einops import rearrange
    return rearrange(y, '(b h w) c t -> (b t) c h w', b=b, h=h, w=w)


def assert_same_forward_backward(fn_ours, fn_ref, inputs, dtype):
    """fn_ours(*inputs) against fn_ref(*inputs): outputs and the gradients of every input for one random
    cotangent, within TOL[dtype]. A gradient that is zero in exact arithmetic (e.g. through a norm over a single
    frame) is rounding noise on both sides: the absolute floor is TOL[dtype] times the case's largest gradient."""
    out_o, out_r = fn_ours(*inputs), fn_ref(*inputs)
    assert_close_rel(out_o, out_r, TOL[dtype], what='output')
    cot = torch.randn_like(out_r)
    go = torch.autograd.grad(out_o, inputs, cot, allow_unused=True)
    gr = torch.autograd.grad(out_r, inputs, cot, allow_unused=True)
    floor = TOL[dtype] * max(g.detach().double().norm().item() for g in gr)
    for i, (a, b) in enumerate(zip(go, gr)):
        assert_close_rel(a, b, TOL[dtype], floor, what=f'grad of input {i}')
