"""Backend switch: which implementation of each op runs.

``LUMIERE_FAST_BACKEND`` is read at call time (not import time), so a test or a user can flip it between
calls; :func:`use_backend` overrides it for a block of code (thread-local, nests).

* ``auto`` (default): fast kernels for CUDA tensors where an op has one, the PyTorch reference otherwise.
* ``reference``: always the plain-PyTorch reference.
* ``triton``: force the Triton kernels, on CPU tensors too (run those under ``TRITON_INTERPRET=1``).

Nothing op-specific lives here: each ``ops/<op>.py`` asks :func:`choose` once per call.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager

import torch

BACKENDS = ('auto', 'reference', 'triton')
ENV_VAR = 'LUMIERE_FAST_BACKEND'

_local = threading.local()
_warned: set[str] = set()


def _validate(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f'{source}: expected a backend name (str) out of {BACKENDS}, got {type(name).__name__}')
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f'{source}: expected one of {BACKENDS}, got {name!r}')
    return value


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read at call time, without its cost for a name that is not set: ``Mapping.get``
    raises and catches a KeyError (~2 us here), and every op call reads two variables. CPython's ``os.environ``
    keeps its items in the dict ``_data`` under encoded keys, updated by every change through ``os.environ``
    (``monkeypatch.setenv`` included); anything else goes through ``os.environ.get``."""
    environ = os.environ
    data = getattr(environ, '_data', None)
    if type(data) is not dict:
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = environ.encodekey(name)
    raw = data.get(key)
    return None if raw is None else environ.decodevalue(raw)


_ENV_KEYS: dict[str, object] = {}


def get_backend() -> str:
    """The backend in force now: the innermost :func:`use_backend`, else the environment, else ``auto``."""
    stack = getattr(_local, 'stack', None)
    if stack:
        return stack[-1]
    env = getenv(ENV_VAR)
    if env is None or env.strip() == '':
        return 'auto'
    return _validate(env, f'environment variable {ENV_VAR}')


@contextmanager
def use_backend(name: str):
    """``with use_backend('reference'): ...`` runs the block on that backend, whatever the environment says."""
    value = _validate(name, 'use_backend')
    stack = getattr(_local, 'stack', None)
    if stack is None:
        stack = _local.stack = []
    stack.append(value)
    try:
        yield value
    finally:
        stack.pop()


def triton_available() -> bool:
    """Triton imports (checked once: an import attempt per op call costs host time, and a failed one retries
    the whole import machinery)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
        except Exception:
            _TRITON = False
        else:
            _TRITON = True
    return _TRITON


_TRITON: bool | None = None


def triton_runnable(device: torch.device) -> bool:
    """Triton can run on ``device``: CUDA with triton installed, or any device under the interpreter."""
    if not triton_available():
        return False
    if device.type == 'cuda':
        return True
    return interpreting()


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run in its CPU interpreter (read at call time)."""
    return getenv('TRITON_INTERPRET') == '1'


@contextmanager
def record_choices():
    """``with record_choices() as seen: ...`` collects ``{op: {'triton' | 'reference' | 'native' | 'deterministic',
    ...}}``: what each op call in the block really ran (thread-local; nests)."""
    stack = getattr(_local, 'recorders', None)
    if stack is None:
        stack = _local.recorders = []
    seen: dict[str, set[str]] = {}
    stack.append(seen)
    try:
        yield seen
    finally:
        del stack[next(i for i, r in enumerate(stack) if r is seen)]     # by identity: equal dicts may nest


def record(op: str, choice: str) -> None:
    """Note in every active :func:`record_choices` that ``op`` ran ``choice`` (``'triton'``, ``'reference'``, or
    ``'native'`` for an op with a C++/CUDA extension, which decides that itself; ``'deterministic'`` for a
    plain-PyTorch formulation taken in deterministic mode, e.g. ``ops.karras.resize2x``)."""
    for seen in getattr(_local, 'recorders', ()):
        seen.setdefault(op, set()).add(choice)


def choose(op: str, tensor: torch.Tensor, has_triton: bool) -> str:
    """Return ``'triton'`` or ``'reference'`` for one call of ``op`` on ``tensor`` (and record it)."""
    choice = _choose(op, tensor, has_triton)
    record(op, choice)
    return choice


def _choose(op: str, tensor: torch.Tensor, has_triton: bool) -> str:
    """The decision of :func:`choose`.

    ``has_triton`` says whether the op has a Triton kernel for this call (dtype/size supported). A forced
    ``triton`` backend that cannot be honoured falls back to the reference with one warning per op, never
    silently.
    """
    backend = get_backend()
    if backend == 'reference':
        return 'reference'
    if backend == 'auto':
        return 'triton' if (has_triton and tensor.is_cuda and triton_available()) else 'reference'
    # forced triton
    if has_triton and triton_available() and (tensor.is_cuda or interpreting()):    # triton_runnable, without
        return 'triton'                                                             # building tensor.device
    if op not in _warned:
        _warned.add(op)
        why = ('no Triton kernel handles this call (none exists for the op yet, or not for these dtypes/sizes)'
               if not has_triton else
               'Triton cannot run here (no CUDA device and TRITON_INTERPRET is not 1, or triton is missing)')
        warnings.warn(f'{ENV_VAR}=triton: op {op!r} runs on the PyTorch reference because {why}', RuntimeWarning,
                      stacklevel=3)
    return 'reference'
