"""lumiere-fast: pure-Python package + optional native temporal conv1d (csrc/, see csrc/README.md).

Native builds need torch importable at build time, so install torch first and build without isolation:

    pip install 'torch>=2.11' ninja setuptools wheel && pip install --no-build-isolation -e .

Switches (environment):
    LUMIERE_FAST_BUILD_EXT=0     build no native extension (pure-Python install; the reference runs)
    LUMIERE_FAST_BUILD_CUDA=0    skip the CUDA extension;  =1 force it (a CUDA compile error fails the install)
    (default: the CUDA extension is built when torch has CUDA and nvcc is found; a failed optional build
     prints one warning and the install goes on without it)
    LUMIERE_FAST_CUDA_ARCHS      extra -gencode targets, e.g. "100" adds sm_100 (sm_80 and sm_90 always)
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = 'csrc'


def _env_switch(name: str) -> str:
    value = os.environ.get(name, 'auto').strip().lower()
    return {'0': '0', 'false': '0', 'no': '0', 'off': '0', '1': '1', 'true': '1', 'yes': '1', 'on': '1'}.get(value,
                                                                                                           'auto')


def _warn(msg: str):
    print(f'WARNING: lumiere-fast: {msg}', file=sys.stderr, flush=True)


def _fix_cuda_home():
    """torch derives CUDA_HOME from `which nvcc` as its grandparent folder; with nvcc behind a wrapper script
    (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0) that folder has no CUDA headers or libraries. Point it at
    a real toolkit before torch.utils.cpp_extension reads it (at import)."""
    if os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH'):
        return
    candidates = []
    nvcc = shutil.which('nvcc')
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path('/usr/local/cuda')] + [Path(p) for p in sorted(glob.glob('/usr/local/cuda-*'), reverse=True)]
    for c in candidates:
        if (c / 'include' / 'cuda_runtime.h').is_file() and (c / 'bin' / 'nvcc').is_file():
            os.environ['CUDA_HOME'] = str(c)
            return


def _native_extensions():
    """(ext_modules, cmdclass) for the native temporal conv1d, or ([], {}) when it cannot or must not build."""
    if _env_switch('LUMIERE_FAST_BUILD_EXT') == '0':
        _warn('LUMIERE_FAST_BUILD_EXT=0: no native extension built; temporal_conv1d runs its PyTorch reference')
        return [], {}
    cuda_switch = _env_switch('LUMIERE_FAST_BUILD_CUDA')
    _fix_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _warn(f'torch is not importable at build time ({e}): installing without native extensions (temporal_conv1d '
              "runs its PyTorch reference). Install torch first and build with pip's --no-build-isolation to get "
              'them (csrc/README.md).')
        return [], {}

    # at::parallel_for is inline OpenMP in torch's Linux builds: without -fopenmp it runs on one thread (measured:
    # no speed-up from 2 threads). Compile-only flag: the GOMP_* calls then bind to the OpenMP runtime torch
    # itself loads (libtorch_cpu's libgomp), not to a second copy from the system.
    openmp = ['-fopenmp'] if sys.platform.startswith('linux') else []
    exts = [cpp_extension.CppExtension(
        'lumiere_fast._C', [f'{CSRC}/temporal_conv1d_cpu.cpp'],
        include_dirs=[str(HERE / CSRC)],
        extra_compile_args={'cxx': ['-O3'] + openmp})]
    optional = {'lumiere_fast._C'}                  # the CPU build always tries, never fails the install

    nvcc = cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, 'bin', 'nvcc').is_file()
    if cuda_switch != '0':
        if torch.version.cuda is None or not nvcc:
            why = 'torch has no CUDA' if torch.version.cuda is None else 'nvcc was not found (set CUDA_HOME)'
            if cuda_switch == '1':
                raise RuntimeError(f'LUMIERE_FAST_BUILD_CUDA=1 but {why}')
            _warn(f'CUDA extension not built: {why}')
        else:
            archs = ['80', '90'] + [a.strip() for a in os.environ.get('LUMIERE_FAST_CUDA_ARCHS', '').split(',')
                                     if a.strip()]
            gencode = [f'-gencode=arch=compute_{a},code=sm_{a}' for a in dict.fromkeys(archs)]
            exts.append(cpp_extension.CUDAExtension(
                'lumiere_fast._C_cuda', [f'{CSRC}/temporal_conv1d_cuda.cu'],
                include_dirs=[str(HERE / CSRC)],
                extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3', '-lineinfo'] + gencode}))
            if cuda_switch != '1':
                optional.add('lumiere_fast._C_cuda')

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), where a failing optional extension is dropped with one warning instead
        of failing the whole install; the package then runs the PyTorch reference for it."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                if ext.name not in optional:
                    raise
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                _warn(f'building {ext.name} failed ({first}); installing without it, temporal_conv1d falls back '
                      'to the PyTorch reference there (the compiler output is above)')
                self._lumiere_failed = getattr(self, '_lumiere_failed', set()) | {ext.name}

        def build_extensions(self):
            super().build_extensions()
            failed = getattr(self, '_lumiere_failed', set())
            # drop failed ones so the editable/inplace copy step and the wheel's file list do not look for them
            self.extensions = [e for e in self.extensions if e.name not in failed]

    use_ninja = shutil.which('ninja') is not None or _has_ninja_module()
    if not use_ninja:
        _warn('ninja not found: building with plain setuptools (slower, serial); pip install ninja')
    return exts, {'build_ext': OptionalBuildExtension.with_options(use_ninja=use_ninja)}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


ext_modules, cmdclass = _native_extensions()

setup(
    name='lumiere-fast',
    version='0.1.0',
    description='Drop-in, faster replacement for lumiere-pytorch (Lumiere space-time U-Net inflation)',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    # the Triton kernels live in the top-level folder kernels/ but install as lumiere_fast.kernels: a
    # top-level package named `kernels` would clash with an unrelated PyPI project
    packages=['lumiere_fast', 'lumiere_fast.ops', 'lumiere_fast.modules', 'lumiere_fast.kernels'],
    package_dir={'lumiere_fast.kernels': 'kernels'},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The floors are the oldest stack CI tests (.ci/run, stage 'oldest': torch 2.11 + triton 3.6, the GPU image's);
    # the newest is whatever the README's install command resolves (stage 'newest').
    install_requires=[
        'torch>=2.11',
        'einops>=0.7',
        'tqdm>=4.60',
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        # the image model of the main command and of the README examples, and the upstream the main command
        # compares ours against
        'karras': ['denoising-diffusion-pytorch>=2.0', 'lumiere-pytorch==0.0.24'],
        'test': [
            'pytest>=7',
            'pytest-benchmark>=4',
            'hypothesis>=6',
            'lumiere-pytorch==0.0.24',
            'denoising-diffusion-pytorch>=2.0',
            'matplotlib>=3.5',          # benchmarks/make_results.py draws the RESULTS.md chart
        ],
    },
    entry_points={'console_scripts': ['lumiere-fast=lumiere_fast.__main__:main']},
)
