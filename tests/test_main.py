"""The main command (``python -m lumiere_fast`` / ``lumiere-fast``): a tiny run in-process, --help in a subprocess,
bad options (exit 2 with expected vs received), the missing-extra message, and the console-script entry point."""

import math
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from lumiere_fast.__main__ import main

# one thread: with two threads on two cores that other work also uses, OpenMP barriers stalled a step for seconds
TINY = ['--image-size', '32', '--frames', '8', '--batch', '1', '--steps', '1', '--warmup', '0', '--no-progress',
        '--device', 'cpu', '--threads', '1']


def _row(out: str, label: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.split('|')[0].strip() == label]
    assert len(rows) == 1, f'expected one table row for {label!r} in:\n{out}'
    return [cell.strip() for cell in rows[0].split('|')]


def _diff(out: str, what: str) -> float:
    match = re.search(rf'max abs diff lumiere_fast vs lumiere-pytorch, {what}[^:]*: (\S+)', out)
    assert match, f'no max abs diff line for {what!r} in:\n{out}'
    return float(match.group(1))


def test_tiny_run_prints_ours_vs_upstream(capsys):
    threads = torch.get_num_threads()
    assert main(TINY) == 0
    assert torch.get_num_threads() == threads               # --threads does not leak out of an in-process run
    out = capsys.readouterr().out
    header = _row(out, 'implementation')
    assert header == ['implementation', 'forward s/step', 'fwd+bwd s/step', 'fwd peak mem', 'fwd+bwd peak mem',
                      'max abs diff output', 'max abs diff grads', 'ops on kernels']
    for label in ('lumiere_fast', 'lumiere-pytorch'):
        cells = _row(out, label)
        assert float(cells[1]) > 0 and float(cells[2]) > 0
        assert cells[3] == cells[4] == 'n/a (CPU)'         # no invented CPU memory numbers
    assert _row(out, 'lumiere-pytorch')[5:7] == ['0.000e+00', '0.000e+00']
    on_kernels, called = _row(out, 'lumiere_fast')[7].split('/')
    assert on_kernels == '0' and int(called) >= 5           # no Triton kernel runs on CPU tensors
    assert 'video (1, 3, 8, 32, 32)' in out and f'torch {torch.__version__}' in out
    assert 'lumiere-pytorch compiled: CUDA only' in out and 'speed-up vs lumiere-pytorch eager' in out
    out_diff, grad_diff = _diff(out, 'forward output'), _diff(out, 'temporal-parameter gradients')
    # the same weights and inputs: upstream's numbers up to float32 rounding
    assert math.isfinite(out_diff) and math.isfinite(grad_diff)
    assert out_diff < 1e-3 and grad_diff < 1e-2


def test_bfloat16_autocast_on_cpu(capsys):
    assert main(TINY + ['--dtype', 'bfloat16']) == 0
    out = capsys.readouterr().out
    assert 'bfloat16 (torch.autocast' in out
    assert math.isfinite(_diff(out, 'forward output'))


def test_help_in_subprocess():
    proc = subprocess.run([sys.executable, '-m', 'lumiere_fast', '--help'], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ('--image-size', '--frames', '--batch', '--dim', '--steps', '--warmup', '--dtype', '--device',
                   '--seed'):
        assert option in proc.stdout


BAD = [
    (['--frames', '12'], ['--frames', 'multiple of 8', '12']),
    (['--image-size', '60'], ['--image-size', 'multiple of 8', '60']),
    (['--image-size', '0'], ['--image-size', 'positive integer', '0']),
    (['--batch', '-1'], ['--batch', 'positive integer', '-1']),
    (['--steps', 'two'], ['--steps', 'positive integer', "'two'"]),
    (['--warmup', '-1'], ['--warmup', 'non-negative integer', '-1']),
    (['--dtype', 'float64'], ['--dtype', 'float32', 'float64']),
    (['--device', 'cpu', '--dtype', 'float16'], ['float16', 'CPU', 'bfloat16']),
]


@pytest.mark.parametrize('argv,needles', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_options_exit_2(argv, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f'{needle!r} not in {err!r}'


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message for a machine without CUDA')
def test_cuda_requested_but_unavailable(capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--device', 'cuda'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--device cuda' in err and 'expected a CUDA device' in err


def test_missing_karras_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'denoising_diffusion_pytorch', None)     # makes the import fail
    with pytest.raises(SystemExit) as exc:
        main(TINY)
    assert exc.value.code == 2
    assert "pip install 'lumiere-fast[karras]'" in capsys.readouterr().err


def test_console_script_entry_point():
    (ep,) = entry_points(group='console_scripts', name='lumiere-fast')
    assert ep.value == 'lumiere_fast.__main__:main'
    assert ep.load() is main
