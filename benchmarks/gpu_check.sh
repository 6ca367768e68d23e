#!/usr/bin/env bash
# One call on a fresh GPU machine: install the carried wheels, build the extension (CUDA included), run the
# GPU-only tests and a curated benchmark subset, and write RESULTS.md and the chart, all inside a time budget
# (8 minutes by default) with a time limit per stage, so that a hang costs its stage and not the lease.
#
# Made for the device tool's H200 (Python 3.12, torch 2.11, triton 3.6, numpy 2.5 preinstalled, no network).
# Here, once:   benchmarks/fetch_gpu_wheels.sh              (the wheels the image lacks, into .whl, ~3.3 MB)
# There:        run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Here, on CPU: benchmarks/gpu_check.sh --dry-run           (the plan, and every check a CPU can do; CI runs it)
#
# Options:
#   --dry-run            print the plan and check what a CPU can: scripts parse, the carried wheels are complete
#                        for cp312 (missing ones are reported; not an error unless --require-wheels), the test
#                        and benchmark selections collect and are non-empty, every test this machine skips for
#                        want of CUDA is in the GPU test selection, make_results.py runs on a fixture
#   --require-wheels     missing or extra carried wheels are an error (dry run and real run)
#   --checks LIST        dry run: only these checks (comma list of wheels,syntax,tests,bench,results)
#   --wheels DIR         the carried wheels (default .whl)
#   --out DIR            where logs and results go (default $OUT, the device tool's output folder, else
#                        build/gpu_check/out); at most 8 files, as the device tool brings back
#   --work DIR           scratch (default build/gpu_check/work): per-part benchmark JSONs, the wheel target
#   --python PY          the interpreter (default python3: on the GPU image the one that holds torch)
#   --budget SECONDS     total time for all stages (default 480); each stage's limit scales with it
#
# Stages (limit at the default budget; a stage may use what earlier stages left unused, never what later ones
# were given: stage i must end by the sum of limits 1..i):
#   setup    30 s  versions, nvidia-smi, a CUDA device present; the carried wheels the image lacks, installed
#                  with pip --no-deps --no-index into the work dir (on PYTHONPATH); imports of the baselines
#   build   150 s  LUMIERE_FAST_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . (the CUDA
#                  extension must build and load); if it fails, a pure-Python install so the rest still runs
#   tests    80 s  pytest tests -k "$GPU_TESTS_K": the GPU-only tests (bf16, grids > 65,535, > 2^31
#                  elements, the CUDA extension)
#   e2e     120 s  the karras64 bf16 MPLumiere training step: ours vs upstream eager vs torch.compile(upstream)
#   ops      60 s  each op once (fold, MP conv block, MP down/upsample, MP attention, conv1d) forward+backward
#                  vs eager and torch.compile(upstream) (and the op's other baselines); the host time per call
#                  of three ops (eager path vs custom op, bench_host_overhead)
#   profile  25 s  profile_step.py: where the training step's time goes (skipped when too little time is left)
#   results  15 s  make_results.py over the JSONs: RESULTS.md and speedup.png
# Output files ($OUT): summary.txt setup.log build.log tests.log bench.log bench.json RESULTS.md speedup.png
# (bench.json: the benchmark parts merged, the profile under the key "lumiere_profile"). Copy RESULTS.md and
# speedup.png into benchmarks/ to record a run.
#
# numpy: the image's numpy 2.5 breaks triton 3.6's interpreter, but the interpreter never runs here: with a
# GPU, tests/conftest.py does not set TRITON_INTERPRET, and this script unsets it; so no numpy pin on the GPU.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."

GPU_TESTS_K='gpu or cuda'
TEST_ARGS=(tests -k "$GPU_TESTS_K" --ignore=tests/test_gpu_check.py -rs -p no:cacheprovider
           -o faulthandler_timeout=60)
# selections by case id (function name, phase, module, shape), not by file name: files get split and renamed
# (ours under lumiere.compile() is left out: its inductor compile of the whole U-Net does not fit the stage's
# limit next to upstream's; run it apart with -k 'lumiere_fast_compiled')
E2E_ARGS=(benchmarks -k 'bench_lumiere and train and MPLumiere and karras64-bfloat16 and not lumiere_fast_compiled')
OPS_K='cuda and ((bench_fold and fold-ct and C384-32x32)'
OPS_K+=' or (bench_block and forward+backward and C384-32x32 and (MPConvolutionInflationBlock or MPTemporalDownsample or MPTemporalUpsample))'
OPS_K+=' or (bench_attention and forward+backward and MPAttentionInflationBlock and C768-8x8-T16-B2)'
OPS_K+=' or (bench_core and forward+backward and C384-32x32 and MPConvolutionInflationBlock)'
OPS_K+=' or (bench_conv1d and fwd+bwd and C384-32x32)'
OPS_K+=' or (bench_host_overhead and (mp_temporal_conv_block or mp_temporal_attention_block or mp_temporal_downsample)))'
OPS_ARGS=(benchmarks -k "$OPS_K")
# what the ops selection must cover: op -> a token of its case ids, and whether upstream has the module (then
# ours, upstream eager and torch.compile(upstream) must all be selected)
OPS_COVER='fold=bench_fold:0 conv_block=ConvolutionInflationBlock:1 downsample=TemporalDownsample:1
upsample=TemporalUpsample:1 attention=AttentionInflationBlock:1 conv1d=bench_conv1d:0'

BENCH_OPTS=(--benchmark-only -rs -p no:cacheprovider)
PROFILE_ARGS=(benchmarks/profile_step.py --device cuda --config karras64 --dtype bfloat16 --steps 5)
IMPORTS='lumiere_pytorch, denoising_diffusion_pytorch, x_transformers, einops, pytest_benchmark, hypothesis, matplotlib'

STAGES=(setup build tests e2e ops profile results)
declare -A CAP=([setup]=30 [build]=150 [tests]=80 [e2e]=120 [ops]=60 [profile]=25 [results]=15)
declare -A LOG=([setup]=setup.log [build]=build.log [tests]=tests.log [e2e]=bench.log [ops]=bench.log
                [profile]=bench.log [results]=summary.txt)
OPTIONAL_MIN_S=20               # an optional stage (profile) with less than this left is skipped

DRY=0 REQUIRE_WHEELS=0 WHEELS=.whl OUTDIR=${OUT:-build/gpu_check/out} WORK=build/gpu_check/work PY=python3
BUDGET=480 CHECKS=wheels,syntax,tests,bench,results STAGE=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --require-wheels) REQUIRE_WHEELS=1 ;;
    --checks) CHECKS=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --work) WORK=$2; shift ;;
    --python) PY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --stage) STAGE=$2; shift ;;        # internal: run one stage (under `timeout`)
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in "${STAGES[@]}"; do CAP[$s]=$(( CAP[$s] * BUDGET / 480 )); done
mkdir -p "$OUTDIR" "$WORK"
OUTDIR=$(cd "$OUTDIR" && pwd) WORK=$(cd "$WORK" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET LUMIERE_FAST_BACKEND

# ---------------------------------------------------------------- the carried wheels ---------------------------
wheel_report() {   # prints one line per listed wheel: ok FILE | missing NAME==VERSION | bad FILE why; extra FILE
  "$PY" - "$WHEELS" $(bash "$SELF_DIR/fetch_gpu_wheels.sh" --list) <<'EOF'
import re, sys
from pathlib import Path
d, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r'[-_.]+', '_', s).lower()
files = {}
for f in sorted(d.glob('*.whl')) if d.is_dir() else []:
    parts = f.name[:-4].split('-')
    files.setdefault((norm(parts[0]), parts[1]), []).append((f, parts[-3:]))
for w in wanted:
    name, version = w.split('==')
    found = files.pop((norm(name), version), [])
    if not found:
        print(f'missing {w}')
        continue
    f, (py, abi, plat) = found[0]
    pys, plats = py.split('.'), plat.split('.')
    ok_py = any(p in ('py3', 'cp312') or p.startswith('py3') for p in pys)
    ok_abi = abi in ('none', 'abi3', 'cp312')
    ok_plat = plat == 'any' or any(p.endswith('x86_64') and p.startswith('manylinux') for p in plats)
    print(f'ok {f.name}' if ok_py and ok_abi and ok_plat else f'bad {f.name} (not for CPython 3.12 x86-64)')
for (name, version), fs in files.items():
    for f, _ in fs:
        print(f'extra {f.name} (not on fetch_gpu_wheels.sh --list: two versions stop pip)')
EOF
}
SELF_DIR=$(dirname "$SELF")

check_wheels() {   # $1: strict (1) or not
  local report; report=$(wheel_report) || { echo "wheel check failed to run"; return 1; }
  local n_ok n_bad; n_ok=$(grep -c '^ok ' <<<"$report"); n_bad=$(grep -vc '^ok ' <<<"$report")
  echo "carried wheels in $WHEELS: $n_ok complete, $n_bad missing/bad/extra"
  grep -v '^ok ' <<<"$report" | sed 's/^/  /'
  if [ "$n_bad" -gt 0 ]; then
    echo "  -> run benchmarks/fetch_gpu_wheels.sh${WHEELS:+ $WHEELS} here (needs PyPI), then carry $WHEELS"
    [ "$1" = 1 ] && return 1
  fi
  return 0
}

# ---------------------------------------------------------------- the stages ---------------------------------
stage_setup() {
  echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  nproc: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv,noheader
  "$PY" - <<'EOF' || return 1
import os, sys, platform
import numpy, torch, triton
print('python', platform.python_version(), sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)
print('TRITON_INTERPRET', os.environ.get('TRITON_INTERPRET'), '(unset: the interpreter, which numpy 2.5 breaks, is not used)')
if not torch.cuda.is_available():
    if os.environ.get('GPU_CHECK_ALLOW_NO_GPU') != '1':      # =1: exercise this script's stages on a CPU
        sys.exit('no CUDA device: every GPU test and benchmark would skip; stopping')
    print('no CUDA device; GPU_CHECK_ALLOW_NO_GPU=1: going on (a test of this script, not of the GPU)')
else:
    p = torch.cuda.get_device_properties(0)
    print(f'device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB')
EOF
  check_wheels "$REQUIRE_WHEELS" || return 1
  local missing=() f
  mapfile -t missing < <("$PY" - "$WHEELS" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob('*.whl')):
    name, version = f.name.split('-')[:2]
    try:
        have = metadata.version(name)
        print(f'keeping the image\'s {name} {have} (carried: {version})', file=sys.stderr)
    except metadata.PackageNotFoundError:
        print(f)
EOF
)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} carried wheels into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "${missing[@]}" || return 1
  fi
  "$PY" -m pip check 2>&1 | sed 's/^/pip check: /' | head -n 20      # informational: --no-deps skips the resolver
  "$PY" -c "import $IMPORTS; print('imports ok: $IMPORTS')"
}

stage_build() {
  local rc
  LUMIERE_FAST_BUILD_CUDA=1 MAX_JOBS=$(nproc) "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
  rc=$?
  [ $rc = 0 ] || return $rc
  "$PY" -c 'import lumiere_fast.ops as o, sys; s = o.extension_status(); print("extension_status:", s)
sys.exit(0 if s["cuda"]["loaded"] else "the CUDA extension did not load")'
}

run_pytest() {   # pytest's exit 5 (nothing collected) is a failure here: a selection went wrong
  "$PY" -m pytest "$@"
  local rc=$?
  [ $rc = 5 ] && echo "pytest collected no tests (exit 5): the selection matched nothing"
  return $rc
}

stage_tests() { run_pytest "${TEST_ARGS[@]}"; }
stage_e2e() { run_pytest "${E2E_ARGS[@]}" "${BENCH_OPTS[@]}" --benchmark-json="$WORK/bench-e2e.json"; }
stage_ops() { run_pytest "${OPS_ARGS[@]}" "${BENCH_OPTS[@]}" --benchmark-json="$WORK/bench-ops.json"; }
stage_profile() { "$PY" "${PROFILE_ARGS[@]}" --out "$WORK/profile.json"; }

stage_results() {   # the benchmark parts of $WORK -> $OUTDIR/{bench.json,RESULTS.md,speedup.png}
  local parts=() p profile=()
  for p in "$WORK"/bench-e2e.json "$WORK"/bench-ops.json; do [ -s "$p" ] && parts+=("$p"); done
  [ -s "$WORK/profile.json" ] && profile=(--profile "$WORK/profile.json")
  [ ${#parts[@]} -gt 0 ] || { echo 'no benchmark JSON was written (both benchmark stages failed or ran out of time)'; return 1; }
  "$PY" - "$OUTDIR/bench.json" "$WORK/profile.json" "${parts[@]}" <<'EOF' || return 1
import json, os, sys
out, profile, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = None
for p in parts:
    with open(p) as fh:
        data = json.load(fh)
    if merged is None:
        merged = data
    else:
        merged['benchmarks'] += data.get('benchmarks', [])
merged['lumiere_parts'] = [os.path.basename(p) for p in parts]
if os.path.exists(profile):
    with open(profile) as fh:
        merged['lumiere_profile'] = json.load(fh)
with open(out, 'w') as fh:
    json.dump(merged, fh, indent=1)
print(f'wrote {out}: {len(merged["benchmarks"])} records from {", ".join(merged["lumiere_parts"])}')
EOF
  "$PY" benchmarks/make_results.py "${parts[@]}" "${profile[@]}" --out "$OUTDIR/RESULTS.md" --chart "$OUTDIR/speedup.png"
}

if [ -n "$STAGE" ]; then "stage_$STAGE"; exit $?; fi

# ---------------------------------------------------------------- the plan ------------------------------------
print_plan() {
  local total=0 s
  echo "gpu_check plan (budget ${BUDGET} s; stage i must end by the sum of limits 1..i):"
  for s in "${STAGES[@]}"; do
    total=$((total + CAP[$s]))
    printf '  %-8s limit %3s s, ends by %3s s -> %s\n' "$s" "${CAP[$s]}" "$total" "$OUTDIR/${LOG[$s]}"
  done
  echo "  tests:   $PY -m pytest ${TEST_ARGS[*]@Q}"
  echo "  e2e:     $PY -m pytest ${E2E_ARGS[*]@Q} ${BENCH_OPTS[*]}"
  echo "  ops:     $PY -m pytest ${OPS_ARGS[*]@Q} ${BENCH_OPTS[*]}"
  echo "  profile: $PY ${PROFILE_ARGS[*]}"
  echo "  results: make_results.py -> $OUTDIR/RESULTS.md, speedup.png, bench.json"
}

# ---------------------------------------------------------------- dry run -------------------------------------
collect() {   # $@: pytest args; prints the selected node ids, one a line (fails on a collection error)
  local out rc
  out=$("$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" 2>&1); rc=$?
  if [ $rc != 0 ]; then echo "$out" | tail -n 15 >&2; return $rc; fi
  grep '::' <<<"$out"
}

dry_run() {
  local failed=0 ids n
  print_plan
  has() { [[ ",$CHECKS," == *",$1,"* ]]; }
  if has wheels; then
    echo '--- wheels'
    check_wheels "$REQUIRE_WHEELS" || failed=1
  fi
  if has syntax; then
    echo '--- syntax'
    for f in "$SELF" "$SELF_DIR/fetch_gpu_wheels.sh" .ci/run; do
      bash -n "$f" && echo "bash -n $f: ok" || { echo "bash -n $f: FAILED"; failed=1; }
    done
    "$PY" -m py_compile benchmarks/make_results.py benchmarks/profile_step.py && echo 'py_compile make_results.py profile_step.py: ok' ||
      failed=1
    "$PY" benchmarks/profile_step.py --help >/dev/null && echo 'profile_step.py --help: ok' || failed=1
  fi
  if has tests; then
    echo '--- GPU test selection'
    # one collection of the whole suite: which tests are selected, and which skip here for want of CUDA (their
    # skipif condition is true and its reason names CUDA or a GPU): each of those must be selected
    cat >"$WORK/gpu_check_plugin.py" <<'EOF'
import json, os, re
_seen = {'selected': [], 'deselected': []}
def _gpu_only(item):
    for m in item.iter_markers('skipif'):
        cond = m.args[0] if m.args else m.kwargs.get('condition')
        if isinstance(cond, bool) and cond and re.search(r'cuda|gpu', str(m.kwargs.get('reason', '')), re.I):
            return True
    return False
def pytest_deselected(items):
    _seen['deselected'] += [(i.nodeid, _gpu_only(i)) for i in items]
def pytest_collection_finish(session):
    _seen['selected'] = [(i.nodeid, _gpu_only(i)) for i in session.items]
    with open(os.environ['GPU_CHECK_COLLECTED'], 'w') as fh:
        json.dump(_seen, fh)
EOF
    if GPU_CHECK_COLLECTED="$WORK/collected.json" PYTHONPATH="$WORK:$PYTHONPATH" \
         collect "${TEST_ARGS[@]}" -p gpu_check_plugin >/dev/null; then
      "$PY" - "$WORK/collected.json" <<'EOF' || failed=1
import json, sys
seen = json.load(open(sys.argv[1]))
sel, desel = seen['selected'], seen['deselected']
gpu_sel = [n for n, g in sel if g]
left_out = [n for n, g in desel if g]
print(f'{len(sel)} tests selected ({len(gpu_sel)} of them skip here for want of CUDA), {len(desel)} deselected')
for n, g in sel:
    print(f'  {"gpu-only " if g else "also     "} {n}')
if not sel:
    sys.exit('the GPU test selection is empty')
if left_out:
    print('GPU-only tests the selection misses (name them with gpu or cuda, or widen GPU_TESTS_K):')
    print('\n'.join(f'  {n}' for n in left_out))
    sys.exit(1)
EOF
    else
      echo 'collecting the GPU test selection FAILED'; failed=1
    fi
  fi
  if has bench; then
    echo '--- benchmark selections'
    local part args
    for part in e2e ops; do
      if [ $part = e2e ]; then args=("${E2E_ARGS[@]}"); else args=("${OPS_ARGS[@]}"); fi
      if ids=$(collect "${args[@]}"); then
        n=$(grep -c . <<<"$ids")
        echo "$part: $n cases"; sed 's/^/  /' <<<"$ids"
        [ "$n" -gt 0 ] || { echo "$part: the selection is empty"; failed=1; }
        printf '%s\n' "$ids" >"$WORK/$part.ids"
        # each op of the plan is there, timed against upstream eager and compiled where upstream has the module
        OPS_COVER=$OPS_COVER "$PY" - "$part" "$WORK/$part.ids" <<'EOF' || failed=1
import os, re, sys
part, ids = sys.argv[1], [i for i in open(sys.argv[2]).read().splitlines() if i.strip()]
impl = lambda i: re.search(r'\[(\w+)-', i).group(1)
problems = []
if part == 'e2e':
    cover = {'karras64 bf16 MPLumiere training step': ('karras64-bfloat16', True)}
else:
    cover = {op: (tok, flag == '1') for op, rest in (e.split('=') for e in os.environ['OPS_COVER'].split())
             for tok, flag in [rest.split(':')]}
for op, (token, upstream) in cover.items():
    got = {impl(i) for i in ids if token in i}
    if not got:
        problems.append(f'{op}: no case')
    elif upstream and not {'lumiere_fast', 'upstream', 'upstream_compiled'} <= got:
        problems.append(f'{op}: impls {sorted(got)}, want lumiere_fast, upstream, upstream_compiled')
    print(f'  {op}: {len([i for i in ids if token in i])} cases, impls {sorted(got)}')
if problems:
    print(f'{part}: ' + '; '.join(problems))
sys.exit(1 if problems else 0)
EOF
      else
        echo "collecting the $part selection FAILED"; failed=1
      fi
    done
  fi
  if has results; then
    echo '--- results stage on a fixture (CUDA-like records, two parts)'
    local fx="$WORK/dry" ; rm -rf "$fx"; mkdir -p "$fx/work" "$fx/out"
    "$PY" - "$fx/work" <<'EOF' || failed=1
import json, sys
d = sys.argv[1]
def rec(group, impl, median, file, **extra):
    info = dict(impl=impl, device='NVIDIA H200', dtype='bfloat16', timing='cuda_events', median_s=median, **extra)
    return {'group': group, 'name': f'bench[{impl}]', 'fullname': f'benchmarks/{file}::bench[{impl}-{group}]',
            'params': {'impl': impl}, 'extra_info': info, 'stats': {'median': median, 'rounds': 5}}
env = {'torch': '2.11.0', 'triton': '3.6.0', 'python': '3.12.3', 'device': 'NVIDIA H200', 'cuda': '13.0',
       'device_rates': {'cuda': {'device_copy_GBps': 4300., 'device_bf16_gemm_TFLOPs': 790.}}}
head = {'machine_info': {'lumiere_env': env, 'cpu': {'brand_raw': 'fixture'}, 'python_version': '3.12.3'},
        'commit_info': {'id': '0' * 40, 'dirty': False}, 'datetime': '2026-12-01T00:00:00', 'version': '5.3.1'}
g = 'train step MPLumiere cuda bfloat16 karras64: image 64, dim 192, dim_max 768, B=2, T=16'
e2e = [rec(g, i, m, 'bench_end_to_end.py', model='MPLumiere', phase='train step', peak_mem_MiB=p)
       for i, m, p in [('lumiere_fast', .05, 9000.), ('upstream', .09, 15000.), ('upstream_compiled', .07, 12000.)]]
g = 'MPTemporalDownsample forward+backward cuda bfloat16 C=384 32x32'
ops = [rec(g, i, m, 'bench_blocks.py') for i, m in [('lumiere_fast', 1e-4), ('upstream', 4e-4), ('upstream_compiled', 2e-4)]]
for name, benches in [('bench-e2e.json', e2e), ('bench-ops.json', ops)]:
    json.dump({**head, 'benchmarks': benches}, open(f'{d}/{name}', 'w'))
EOF
    if ( WORK="$fx/work" OUTDIR="$fx/out" stage_results ); then
      if [ -s "$fx/out/RESULTS.md" ] && [ -s "$fx/out/speedup.png" ] && [ -s "$fx/out/bench.json" ]; then
        echo "results stage on the fixture: ok ($(ls "$fx/out" | tr '\n' ' '))"
      else
        echo 'results stage on the fixture: output files missing'; failed=1
      fi
    else
      echo 'results stage on the fixture FAILED'; failed=1
    fi
  fi
  echo "--- dry run: $([ $failed = 0 ] && echo ok || echo FAILED)"
  return $failed
}

if [ $DRY = 1 ]; then dry_run; exit $?; fi

# ---------------------------------------------------------------- the real run --------------------------------
rm -f "$OUTDIR"/{summary.txt,setup.log,build.log,tests.log,bench.log,bench.json,RESULTS.md,speedup.png}
rm -f "$WORK"/bench-*.json "$WORK"/profile.json
print_plan | tee "$OUTDIR/summary.txt"
START=$SECONDS
ends_by=0
declare -A STATUS TOOK NOTE
for s in "${STAGES[@]}"; do
  ends_by=$((ends_by + CAP[$s]))
  left=$((START + ends_by - SECONDS))
  log="$OUTDIR/${LOG[$s]}"
  if [ "$s" = profile ] && [ "$left" -lt "$OPTIONAL_MIN_S" ]; then
    STATUS[$s]="skipped (${left} s left)"; TOOK[$s]=0; continue
  fi
  if [ "$left" -lt 5 ]; then STATUS[$s]="NOT RUN (no time left)"; TOOK[$s]=0; continue; fi
  echo "=== $s (limit ${left} s) $(date -u +%T)" | tee -a "$log"
  offset=$(stat -c %s "$log")
  t0=$SECONDS
  timeout -k 10 "$left" bash "$SELF" --stage "$s" --wheels "$WHEELS" --out "$OUTDIR" --work "$WORK" \
    --python "$PY" --budget "$BUDGET" $([ $REQUIRE_WHEELS = 1 ] && echo --require-wheels) >>"$log" 2>&1
  rc=$?
  TOOK[$s]=$((SECONDS - t0))
  case $rc in
    0) STATUS[$s]=ok ;;
    124|137) STATUS[$s]="TIMEOUT after ${TOOK[$s]} s" ;;
    *) STATUS[$s]="FAILED (exit $rc)" ;;
  esac
  tail -n 3 "$log" | sed "s/^/  [$s] /"
  # the stage's pytest closing line (or make_results' "wrote", the extension status) for the summary
  NOTE[$s]=$(tail -c +$((offset + 1)) "$log" | grep -E \
    '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$|^wrote |^extension_status|collected no tests|^no CUDA|Error' |
    tail -n 1 | cut -c1-150)
  if [ "$s" = build ] && ! (cd /tmp && "$PY" -c 'import lumiere_fast' 2>/dev/null); then
    echo "=== build fallback: pure-Python install (LUMIERE_FAST_BUILD_EXT=0) so the tests and benchmarks run" | tee -a "$log"
    LUMIERE_FAST_BUILD_EXT=0 timeout -k 5 60 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$log" 2>&1
  fi
  if [ "$s" = setup ] && [ $rc != 0 ] && grep -q 'no CUDA device' "$log"; then
    STATUS[$s]="FAILED: no CUDA device"; break
  fi
done

{
  echo "=== summary ($((SECONDS - START)) s of ${BUDGET} s)"
  for s in "${STAGES[@]}"; do
    printf '%-8s %-24s %4s s  %s\n' "$s" "${STATUS[$s]:-not run}" "${TOOK[$s]:-0}" "${NOTE[$s]:-}"
  done
  echo "files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
} | tee -a "$OUTDIR/summary.txt"
for s in "${STAGES[@]}"; do     # an optional stage skipped for time is no failure
  case "${STATUS[$s]:-not run}" in ok|"skipped ("*) ;; *) exit 1 ;; esac
done
exit 0
