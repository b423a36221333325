#!/usr/bin/env bash
# GPU readiness checks for sgl-kvext on one CUDA GPU (sized for an H200: about 4 min).
# From the repo root: bash bench/gpu/check.sh. The project's H200 machines have torch and
# triton but no SGLang and no package index: the image's python3 runs the repo from
# PYTHONPATH, with the small wheels `make gpu-wheels` puts in .gpu-wheels/ (pytest, xdist,
# zstandard, xxhash, cryptography) installed into a scratch folder. One PASS/FAIL/SKIP line per check;
# logs in ${OUT:-/tmp/gpu-check}. Results go into docs/benchmarks.md ("GPU").
set -uo pipefail
LOG=${OUT:-/tmp/gpu-check}; mkdir -p "$LOG"; T0=$SECONDS; PY=${PY:-python3}
say(){ printf '%-4s %s\n' "$1" "$2" | tee -a "$LOG/summary.txt"; }
ok(){ [ "$1" = 0 ] && echo PASS || echo FAIL; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$LOG/gpu.txt" 2>&1
say "$(ok $?)" "nvidia-smi: $(head -1 "$LOG/gpu.txt")"
SITE=/tmp/kvx-site; mkdir -p $SITE
if [ -d .gpu-wheels ]; then
  timeout 120 $PY -m pip install -q --no-index --no-deps --target $SITE/lib .gpu-wheels/*.whl > "$LOG/pip.log" 2>&1
  say "$(ok $?)" "wheels from .gpu-wheels: $(tail -1 "$LOG/pip.log")"
fi
export PYTHONPATH="$SITE/lib:$PWD:$PWD/bench:$PWD/triton_kernels${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import sys,torch,triton,numpy;print(sys.version.split()[0],torch.__version__,torch.version.cuda,triton.__version__,numpy.__version__);assert torch.cuda.is_available()" \
  > "$LOG/torch.txt" 2>&1 && say PASS "python, torch, CUDA, triton, numpy: $(tail -1 "$LOG/torch.txt")" \
  || { say FAIL "no CUDA torch: $(tail -1 "$LOG/torch.txt")"; exit 1; }
# 1. tests/kernels: with CUDA every case runs compiled Triton (not the interpreter), and the
#    CUDA-only cases run instead of skipping. 2. the page / tier / blend unit tests on a CUDA box.
XD=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 200 $PY -m pytest tests/kernels -q -p no:cacheprovider $XD > "$LOG/kernels.log" 2>&1
say "$(ok $?)" "pytest tests/kernels: $(grep -E 'passed|failed|error' "$LOG/kernels.log" | tail -1)"
timeout 120 $PY -m pytest -q -p no:cacheprovider $XD tests/test_tier_host.py tests/test_kv_pages.py \
  tests/test_kv_tiering.py tests/test_kv_tiering_local.py tests/test_blend_placement.py \
  tests/test_blend_selection.py $(ls tests/test_device_placement.py 2>/dev/null) > "$LOG/units.log" 2>&1
say "$(ok $?)" "pytest host tier / pages / tiering / blend / device placement: $(grep -E 'passed|failed|error' "$LOG/units.log" | tail -1)"
# 3. kernels against torch at serving shapes with timings, the pinned host tier, KVTiering on
#    CUDA, the blend and the fragment store on CUDA with a random Llama.
timeout 240 $PY bench/gpu/checks.py > "$LOG/checks.log" 2>&1; rc=$?
grep -E '^(PASS|FAIL|SKIP) ' "$LOG/checks.log" | tee -a "$LOG/summary.txt"
[ $rc = 0 ] || say FAIL "checks.py exited $rc: $(tail -1 "$LOG/checks.log")"
say INFO "total $((SECONDS-T0)) s, logs in $LOG"
