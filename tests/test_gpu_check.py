"""benchmarks/gpu_check.sh --dry-run: the one-call GPU check's plan and everything a CPU can check of it.

The dry run collects the GPU test selection and the benchmark selections, runs the results stage on a fixture and
checks the carried wheels. Without wheels it must say what to fetch and still pass; ``--require-wheels`` makes
missing, foreign or duplicate wheels an error. No downloads here: the wheel checks use empty stand-in files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.sh'
FETCH = ROOT / 'benchmarks' / 'fetch_gpu_wheels.sh'

pytestmark = pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None,
                                reason='gpu_check.sh needs bash and coreutils timeout')


def _dry_run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ('OUT', 'TRITON_INTERPRET', 'LUMIERE_FAST_BACKEND')}
    return subprocess.run(['bash', str(SCRIPT), '--dry-run', '--python', sys.executable, '--work', str(tmp / 'work'),
                           '--out', str(tmp / 'out'), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _listed() -> list[str]:
    out = subprocess.run(['bash', str(FETCH), '--list'], capture_output=True, text=True, check=True).stdout.split()
    assert out and all(re.fullmatch(r'[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+', w) for w in out), out
    return out


def _stand_ins(folder: Path, tag: str = 'py3-none-any') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for w in _listed():
        name, version = w.split('==')
        (folder / f'{re.sub(r"[-_.]+", "_", name)}-{version}-{tag}.whl').write_bytes(b'')
    return folder


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    """The full dry run (what CI runs), with an empty wheels folder."""
    tmp = tmp_path_factory.mktemp('gpu_check')
    (tmp / 'no_wheels').mkdir()
    return _dry_run(tmp, '--wheels', str(tmp / 'no_wheels'))


def test_dry_run_passes_and_names_the_missing_wheels(dry_run):
    out = dry_run.stdout
    assert dry_run.returncode == 0, out[-5000:] + dry_run.stderr[-2000:]
    assert '--- dry run: ok' in out
    for w in _listed():
        assert f'missing {w}' in out
    assert 'fetch_gpu_wheels.sh' in out


def test_plan_fits_eight_minutes(dry_run):
    ends = [int(m) for m in re.findall(r'ends by\s+(\d+) s', dry_run.stdout)]
    assert len(ends) == 7 and ends == sorted(ends) and ends[-1] <= 480, dry_run.stdout[:2000]


def test_selections_collect_and_cover_the_plan(dry_run):
    out = dry_run.stdout
    m = re.search(r'^(\d+) tests selected \((\d+) of them skip here for want of CUDA\)', out, re.M)
    assert m and int(m.group(1)) > 0, out[-5000:]
    if not __import__('torch').cuda.is_available():
        assert int(m.group(2)) > 0             # the bf16 / large-grid / extension tests are in it
    assert re.search(r'^e2e: [1-9]\d* cases', out, re.M) and re.search(r'^ops: [1-9]\d* cases', out, re.M)
    for op in ('fold', 'conv_block', 'downsample', 'upsample', 'attention', 'conv1d'):
        assert re.search(rf'^  {op}: [1-9]\d* cases', out, re.M), op
    assert 'results stage on the fixture: ok' in out


def test_require_wheels_fails_on_a_missing_wheel(tmp_path):
    proc = _dry_run(tmp_path, '--require-wheels', '--checks', 'wheels', '--wheels', str(tmp_path / 'none'))
    assert proc.returncode != 0 and 'missing lumiere-pytorch==0.0.24' in proc.stdout, proc.stdout


def test_require_wheels_accepts_a_complete_folder_and_flags_extra_or_foreign_ones(tmp_path):
    wheels = _stand_ins(tmp_path / 'wheels')
    args = ('--require-wheels', '--checks', 'wheels', '--wheels', str(wheels))
    proc = _dry_run(tmp_path, *args)
    assert proc.returncode == 0 and f'{len(_listed())} complete, 0 missing' in proc.stdout, proc.stdout
    (wheels / 'lumiere_pytorch-0.0.23-py3-none-any.whl').write_bytes(b'')      # a second version stops pip
    proc = _dry_run(tmp_path, *args)
    assert proc.returncode != 0 and 'extra lumiere_pytorch-0.0.23' in proc.stdout, proc.stdout
    foreign = _stand_ins(tmp_path / 'cp311', tag='cp311-cp311-manylinux_2_28_x86_64')
    proc = _dry_run(tmp_path, '--require-wheels', '--checks', 'wheels', '--wheels', str(foreign))
    assert proc.returncode != 0 and 'not for CPython 3.12 x86-64' in proc.stdout, proc.stdout
