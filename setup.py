from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

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
    install_requires=[
        'torch>=2.4',
        'einops>=0.7',
        'tqdm>=4.60',
        'triton>=3.0; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        # the image model of the main command and of the README examples
        'karras': ['denoising-diffusion-pytorch>=2.0'],
        'test': [
            'pytest>=7',
            'pytest-benchmark>=4',
            'hypothesis>=6',
            'lumiere-pytorch==0.0.24',
            'denoising-diffusion-pytorch>=2.0',
        ],
    },
    entry_points={'console_scripts': ['lumiere-fast=lumiere_fast.__main__:main']},
)
