#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the GPU machine (no network there): the packages of
# the `test` and `karras` extras that its image lacks, for CPython 3.12 on x86-64, each with --no-deps.
#
#   benchmarks/fetch_gpu_wheels.sh [DIR]     download into DIR (default .whl, which the device tool carries:
#                                            name it in `carry`); stale versions in DIR are removed
#   benchmarks/fetch_gpu_wheels.sh --list    print the NAME==VERSION list (gpu_check.sh --dry-run reads it)
#
# Versions: what CI's newest stack resolved (pip freeze of .venv, 2026-12-01); the oldest-stack CI run resolves
# the same ones against torch 2.11. Bump them together with a green CI run.
# The GPU image (.library/device/KINDS.md, 2026-11-17) already has torch 2.11, triton 3.6, numpy 2.5, einops,
# tqdm, scipy, pillow, torchvision, accelerate, matplotlib, pytest, ninja, setuptools, wheel; it is said to
# have pytest-benchmark and hypothesis too, which is not certain, so they travel as well (gpu_check.sh
# installs a carried wheel only where the image has no such distribution, and never replaces one).
# Left out on purpose: optree (declared by lumiere-pytorch, never imported: it uses torch.utils._pytree),
# huggingface_hub's and pip's extras (the image's accelerate brings its own hub).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  lumiere-pytorch==0.0.24          # the upstream baseline
  x-transformers==2.31.10          # lumiere-pytorch's attention
  einx==0.4.3                      # x-transformers
  loguru==0.7.3                    # x-transformers
  torch-einops-utils==0.2.0        # x-transformers
  frozendict==2.5.1                # einx
  beartype==0.23.1                 # lumiere-pytorch
  denoising-diffusion-pytorch==2.3.4   # KarrasUnet (the `karras` extra)
  ema-pytorch==0.8.3               # denoising-diffusion-pytorch
  pytorch-fid==0.3.0               # denoising-diffusion-pytorch
  pytest-benchmark==5.3.1          # benchmarks (if the image lacks it)
  py-cpuinfo2==10.1.1              # pytest-benchmark 5.3
  hypothesis==6.170.17             # tests (if the image lacks it)
  sortedcontainers==2.4.0          # hypothesis
)

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${WHEELS[@]}" | sed 's/[[:space:]]*#.*//'
  exit 0
fi

DIR=${1:-.whl}
mkdir -p "$DIR"
if [ "$DIR" = .whl ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >>.git/info/exclude      # ignored, so only `carry` takes it (and nobody commits it)
fi

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done

t0=$SECONDS
python3 -m pip download -q --progress-bar off --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$DIR" "${WHEELS[@]}"

# keep one version of each (two stop pip's install): drop every wheel that is not on the list
python3 - "$DIR" "${WHEELS[@]}" <<'EOF'
import re, sys
from pathlib import Path
d, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r'[-_.]+', '_', s).lower()
keep = {(norm(n), v) for n, v in (w.split('==') for w in wanted)}
for f in sorted(d.glob('*.whl')):
    name, version = f.name.split('-')[:2]
    if (norm(name), version) not in keep:
        print(f'removing {f.name} (not on the list)')
        f.unlink()
EOF
total=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f1)
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DIR, fetched in $((SECONDS - t0)) s"
# the device tool carries the working tree and the carried paths together, 64 MiB at most
tree=$(git ls-files -z --cached --others --exclude-standard |
       while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done | du -cb --files0-from=- | tail -n 1 | cut -f1)
echo "working tree that travels: $((tree / 1024)) KiB; with the wheels: $(((tree + total) / 1024)) KiB of 65536 KiB"
[ $((tree + total)) -lt $((64 * 1024 * 1024)) ] || { echo 'over the device tool limit of 64 MiB' >&2; exit 1; }
