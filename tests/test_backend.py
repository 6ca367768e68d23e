"""LUMIERE_FAST_BACKEND and use_backend: read at call time, validated, nestable, never a silent fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from lumiere_fast import backend, ops


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.get_backend() == 'auto'
    monkeypatch.setenv(backend.ENV_VAR, '  ')
    assert backend.get_backend() == 'auto'


def test_env_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, 'reference')
    assert backend.get_backend() == 'reference'
    monkeypatch.setenv(backend.ENV_VAR, 'Triton')
    assert backend.get_backend() == 'triton'


def test_bad_env_value_names_expected_and_received(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, 'cuda')
    with pytest.raises(ValueError, match=r"LUMIERE_FAST_BACKEND: expected one of \('auto', 'reference', 'triton'\), "
                                         r"got 'cuda'"):
        backend.get_backend()
    with pytest.raises(ValueError, match='got'):          # and ops surface it, not a silent default
        ops.temporal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 2, 3))


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, 'triton')
    with backend.use_backend('reference'):
        assert backend.get_backend() == 'reference'
        with backend.use_backend('auto'):
            assert backend.get_backend() == 'auto'
        assert backend.get_backend() == 'reference'
    assert backend.get_backend() == 'triton'
    with pytest.raises(ValueError, match="use_backend: expected one of"):
        with backend.use_backend('fast'):
            pass
    with pytest.raises(TypeError, match='got int'):
        with backend.use_backend(3):
            pass


def test_choose_on_cpu():
    x = torch.randn(2)
    with backend.use_backend('auto'):
        assert backend.choose('op', x, has_triton=True) == 'reference'     # auto: kernels only for CUDA tensors
    with backend.use_backend('reference'):
        assert backend.choose('op', x, has_triton=True) == 'reference'


def test_forced_triton_without_a_kernel_warns_once(monkeypatch):
    backend._warned.discard('temporal_conv1d')
    x, w = torch.randn(2, 3, 4), torch.randn(3, 3, 3)
    with backend.use_backend('triton'):
        with pytest.warns(RuntimeWarning, match="op 'temporal_conv1d' runs on the PyTorch reference because no "
                                                "Triton kernel handles this call"):
            out = ops.temporal_conv1d(x, w)
        with warnings.catch_warnings():
            warnings.simplefilter('error')          # a second call does not warn again
            ops.temporal_conv1d(x, w)
    torch.testing.assert_close(out, torch.nn.functional.conv1d(x, w, padding=1))


def test_forced_triton_that_cannot_run_here_warns(monkeypatch):
    # triton reads TRITON_INTERPRET when first imported: import it before the variable goes, or kernels used by
    # later tests in this process would be built for a GPU (this file alone would then fail)
    backend.triton_available()
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    backend._warned.discard('some_op')
    with backend.use_backend('triton'), pytest.warns(RuntimeWarning, match='Triton cannot run here'):
        assert backend.choose('some_op', torch.randn(2), has_triton=True) == 'reference'
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    if backend.triton_available():
        with backend.use_backend('triton'):
            assert backend.choose('some_op', torch.randn(2), has_triton=True) == 'triton'


def test_modules_run_under_every_backend():
    from lumiere_fast import MPConvolutionInflationBlock
    block = MPConvolutionInflationBlock(dim=4).eval()
    x = torch.randn(1, 4, 3, 2, 2)
    outs = []
    for name in backend.BACKENDS:
        with backend.use_backend(name), warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            outs.append(block(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_record_choices_sees_what_ran():
    x, w = torch.randn(2, 3, 4), torch.randn(3, 3, 3)
    with backend.record_choices() as outer:
        with backend.use_backend('reference'), backend.record_choices() as inner:
            ops.temporal_conv1d(x, w)
        ops.fold_frames(torch.randn(4, 3, 2, 2), 2)
    assert inner == {'temporal_conv1d': {'reference'}}
    assert outer == {'temporal_conv1d': {'reference'}, 'fold_frames': {'reference'}}
