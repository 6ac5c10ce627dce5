#!/usr/bin/env bash
# igengine's GPU check, made to be run as ONE call of the device tool: at most 8 minutes of wall time
# (DEVICE_CHECK_BUDGET, default 480 s), so that a machine start and this script fit in the 15 minutes
# of device time a task gets. Call it with a timeout of ~540 s:
#
#   IGENGINE_COMMIT=<sha> bash benchmarks/device_check.sh     # on the GPU machine; $OUT is set by the tool
#   DEVICE_CHECK_DRY_RUN=1 bash benchmarks/device_check.sh    # the plan on any machine (tests/test_device_check.py)
#
# Sections, in this order (most wanted first; each is skipped, with the reason recorded, when the
# budget left is below what it needs to be worth starting, and stopped at its own cap):
#   env                 versions, GPU, nvcc/cmake; tests/test_torch_floor.py against this torch
#   kernels-nvrtc       the NVRTC build, what pip users get: cold compile into a fresh cache, a cache hit,
#                       then loaded and self-tested (igengine.kernels.selftest)
#   kernels-cmake       the CMake build for the GPU present (python -m igengine.kernels.build)
#   selftest            both builds loaded and self-tested against the CPU twin; igengine info
#   sample-digits       a plain `igengine sample` on the GPU (its preflight included, where it has one)
#   e2e-ckpt            a SiT-XL/2 checkpoint with random weights (kept in DEVICE_CHECK_CACHE for a rerun)
#   e2e-sample          `igengine sample --device cuda` on it, default settings for 8 steps: captured (the
#                       default), --capture off and --precision reference, in parallel
#   e2e-compare         their final latents compared against stated bounds (device_check_steps.py compare)
#   bulk                batch and torchrun invariance (benchmarks/bulk_device_check.py)
#   pytest-gpu          every gpu-marked test, one shared compile cache
#   bench-sit-64        igengine bench SiT-XL/2, reference vs bf16 eager vs bf16 compiled, batch 64 only
#   official-speed-sit  against the official scripts (needs their files, see below)
#   kernel-bench        the fused step against the reference glue
#   bench-ldit-64, official-speed-ldit, bench-sit-1-16, bench-sit-256: as time allows
#
# Output: "$OUT" (default build/device_check_<stamp>/) holds three files, rewritten after every section,
# so whatever stops the script leaves every finished section's results there (the tool returns at most
# 8 files of at most 16 MiB): device_check.log (everything printed), device_check.json (per section:
# status, rc, seconds, cap; the key results; provenance) and device_check.tar.gz (every section's own
# files: bench JSONs written row by row, the pytest JUnit XML, kernels and comparison JSONs, manifests).
#
# Environment: DEVICE_CHECK_BUDGET (seconds, default 480), DEVICE_CHECK_ONLY=name,name (run only those
# sections, e.g. a rerun), DEVICE_CHECK_CACHE (compile caches and the XL checkpoint; default
# build/device-check-cache, which a warm machine keeps between calls), OFFICIAL_REPO (default
# ./official/Internal-Guidance: copy the official files listed in benchmarks/official_speed.py there,
# untracked and not ignored, so that the tool carries them; never commit them), PYTHON, CUDACXX.
# No network access and no pip installs.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%d-%H%M%S)
DRY=${DEVICE_CHECK_DRY_RUN:-0}
[[ "$DRY" == 0 ]] && DRY=""
BUDGET=${DEVICE_CHECK_BUDGET:-480}
RESERVE=15   # the final record (summary, archive) after the last section
GRACE=10     # timeout's grace between TERM and KILL
ONLY=${DEVICE_CHECK_ONLY:-}
OUT=${OUT:-$ROOT/build/device_check_$STAMP}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/igengine_device_check.XXXXXX")
export SECTIONS_DIR="$WORK/sections"
mkdir -p "$SECTIONS_DIR"
: > "$WORK/sections.tsv"
CACHE=${DEVICE_CHECK_CACHE:-$ROOT/build/device-check-cache}
mkdir -p "$CACHE"
# One compile cache for everything this script runs (igengine's compiled backend keeps its Inductor
# cache under $IGENGINE_CACHE; tests that want a cold cache set their own).
export IGENGINE_CACHE="$CACHE/igengine" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" TRITON_CACHE_DIR="$CACHE/triton"
export NVRTC_CACHE="$WORK/nvrtc-cache"   # fresh: the NVRTC section's compile is a first run's
export E2E_CKPT="$CACHE/e2e/SiT-XL-2-random-seed0.safetensors"
export OFFICIAL_REPO=${OFFICIAL_REPO:-official/Internal-Guidance}
START=$(date +%s)
VCLOCK=0     # dry run: the seconds the sections would have taken (their estimates)
SEQ=0

now() { if [[ -n "$DRY" ]]; then echo $(( START + VCLOCK )); else date +%s; fi; }
elapsed() { echo $(( $(now) - START )); }
# Seconds a section may still use: the budget less the final record and timeout's grace.
remaining() { echo $(( START + BUDGET - RESERVE - GRACE - $(now) )); }

record() {  # rewrite OUT/device_check.json and OUT/device_check.tar.gz (never fails the script)
  timeout -k 5 60 "$PY" benchmarks/device_check_steps.py record --work "$WORK" --out "$OUT" --log "$LOG" \
    --stamp "$STAMP" --budget "$BUDGET" --reserve "$RESERVE" --elapsed "$(elapsed)" ${DRY:+--dry-run} "$@" \
    > /dev/null 2> "$WORK/record.err" || { echo "!!! record failed:"; tail -3 "$WORK/record.err"; }
}

# tsv row: name status rc seconds cap need est start reason
note() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/sections.tsv"; }

skip() {  # skip NAME REASON [CAP NEED EST]
  echo
  echo "=== [$1] skipped: $2"
  note "$1" skipped "" 0 "${3:-}" "${4:-}" "${5:-}" "$(elapsed)" "$2"
  record
}

# section NAME CAP NEED EST -- COMMAND...: run COMMAND under a timeout of min(CAP, budget left) in its
# own folder $SEC (exported), unless less than NEED seconds are left. EST: the expected seconds on an
# H100 (the dry run advances its clock by it; tests/test_device_check.py checks it against measurements).
section() {
  local name=$1 cap=$2 need=$3 est=$4
  shift 4
  [[ "${1:-}" == "--" ]] && shift
  SEQ=$(( SEQ + 1 ))
  export SEC; SEC=$(printf '%s/%02d-%s' "$SECTIONS_DIR" "$SEQ" "$name")
  mkdir -p "$SEC"
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then
    note "$name" skipped "" 0 "$cap" "$need" "$est" "$(elapsed)" "not in DEVICE_CHECK_ONLY"
    return
  fi
  if [[ -n "${UNMET:-}" ]]; then  # a precondition the caller found missing
    skip "$name" "$UNMET" "$cap" "$need" "$est"
    return
  fi
  local left; left=$(remaining)
  if (( left < need )); then
    skip "$name" "needs ${need}s to be worth starting, ${left}s left" "$cap" "$need" "$est"
    return
  fi
  local limit=$(( cap < left ? cap : left )) start; start=$(elapsed)
  echo
  echo "=== [$name] limit ${limit}s (cap ${cap}s, needs ${need}s, expected ~${est}s), ${start}s elapsed ==="
  local rc status t0; t0=$(date +%s)
  if [[ -n "$DRY" ]]; then
    printf '%s\n' "$@" > "$SEC/dry-run.txt"   # the command, one argument a line
    echo "dry run: not run (the command is in $(basename "$SEC")/dry-run.txt of the archive)"
    VCLOCK=$(( VCLOCK + est ))
    rc=0; status=planned
  else
    timeout -k "$GRACE" "$limit" "$@"
    rc=$?
    status=ok
    (( rc != 0 )) && status=failed
    if (( rc == 124 || rc == 137 )); then status=timed-out; echo "!!! [$name] stopped at its limit of ${limit}s"; fi
  fi
  local secs=$(( $(date +%s) - t0 ))
  [[ -n "$DRY" ]] && secs=$est
  echo "--- [$name] $status rc=$rc in ${secs}s"
  note "$name" "$status" "$rc" "$secs" "$cap" "$need" "$est" "$start" ""
  record
}

bench() {  # bench NAME CAP NEED EST igengine-bench-args...: JSON (row by row) and plot into the section
  local name=$1 cap=$2 need=$3 est=$4
  shift 4
  section "$name" "$cap" "$need" "$est" -- bash -c \
    '$PY -m igengine bench --device cuda --steps 2 --repeats 2 --json "$SEC/bench.json" "$@" ${PLOT:+--plot "$SEC/bench.png"}' \
    bench "$@"
}

official() {  # official NAME CAP NEED EST FAMILY FOLDER
  local unmet=""
  [[ -d "$OFFICIAL_REPO/$6" ]] || unmet="no official files at $OFFICIAL_REPO/$6"
  UNMET=$unmet section "$1" "$2" "$3" "$4" -- bash -c \
    '$PY benchmarks/official_speed.py --official-repo "$OFFICIAL_REPO" --quick --family "$1" --json "$SEC/official_speed.json"' \
    official "$5"
}

PY=python3
for c in ${PYTHON:-} python3 python; do
  if command -v "$c" > /dev/null 2>&1; then PY=$c; break; fi
done
export PY
if [[ -z "${CUDACXX:-}" ]]; then
  if command -v nvcc > /dev/null 2>&1; then CUDACXX=$(command -v nvcc); export CUDACXX
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then export CUDACXX=/usr/local/cuda/bin/nvcc
  fi
fi
PLOT=""  # bench refuses --plot without matplotlib, which the GPU image may lack
[[ -z "$DRY" ]] && "$PY" -c "import matplotlib" > /dev/null 2>&1 && PLOT=1
export PLOT

main() {
  echo "igengine device check $STAMP in $ROOT${DRY:+ (DRY RUN: nothing runs, the clock advances by the estimate of each section)}"
  echo "budget ${BUDGET}s (sections end by $(( BUDGET - RESERVE - GRACE ))s); results in $OUT"
  record

  section env 45 10 10 -- bash -c '
    nvidia-smi || echo "nvidia-smi not found (no NVIDIA driver?)"
    $PY benchmarks/device_check_steps.py env --out "$SEC/env.json"; rc=$?
    $PY -m pytest -q -p no:cacheprovider tests/test_torch_floor.py --junitxml="$SEC/junit.xml" || rc=1
    exit $rc'

  section kernels-nvrtc 60 20 20 -- bash -c '
    export IGENGINE_CACHE="$NVRTC_CACHE"
    $PY -m igengine.kernels.nvrtc || exit $?
    $PY -m igengine.kernels.nvrtc | tee "$SEC/second.txt"
    grep -q ": cached " "$SEC/second.txt" || { echo "!!! the second compile was not a cache hit"; exit 1; }
    IGENGINE_KERNELS_BUILD=nvrtc $PY benchmarks/device_check_steps.py kernels --expect nvrtc --out "$SEC/nvrtc.json"'

  section kernels-cmake 120 20 15 -- bash -c '
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d " .\r")
    if [[ "$arch" =~ ^[0-9]{2,3}$ ]]; then archs="${arch}-real;${arch}-virtual"; else archs="80-real;90-real;90-virtual"; fi
    echo "CUDACXX=${CUDACXX:-<unset>} CMAKE_CUDA_ARCHITECTURES=$archs"
    $PY -m igengine.kernels.build --cuda on --cuda-arch "$archs" --build-dir build/kernels-device && exit 0
    echo "!!! build failed; once more with -allow-unsupported-compiler (a host compiler newer than nvcc knows?)"
    rm -rf build/kernels-device
    $PY -m igengine.kernels.build --cuda on --cuda-arch "$archs" --build-dir build/kernels-device \
      --cmake-arg=-DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler'

  section selftest 45 15 12 -- bash -c '
    rc=0
    IGENGINE_KERNELS_BUILD=cmake $PY benchmarks/device_check_steps.py kernels --expect cmake --out "$SEC/cmake.json" || rc=1
    IGENGINE_CACHE="$NVRTC_CACHE" IGENGINE_KERNELS_BUILD=nvrtc \
      $PY benchmarks/device_check_steps.py kernels --expect nvrtc --out "$SEC/nvrtc_with_twin.json" || rc=1
    $PY -m igengine info > "$SEC/info.json" || rc=1
    exit $rc'

  section sample-digits 60 20 15 -- bash -c '$PY -m igengine sample --n 64 --out "$SEC/digits"'

  section e2e-ckpt 90 30 40 -- bash -c \
    '$PY benchmarks/device_check_steps.py make-ckpt --model SiT-XL/2 --seed 0 --out "$E2E_CKPT"'

  section e2e-sample 120 30 30 -- bash -c '
    test -s "$E2E_CKPT" || { echo "no checkpoint: e2e-ckpt did not finish"; exit 3; }
    one() {
      local name=$1; shift
      $PY -m igengine sample --ckpt "$E2E_CKPT" --n 8 --batch-size 8 --steps 8 --seed 0 --no-decode \
        --device cuda --out "$SEC/$name" "$@" > "$SEC/$name.out" 2> "$SEC/$name.err"
      echo $? > "$SEC/$name.rc"
    }
    one captured & one eager --capture off & one reference --precision reference &
    wait
    rc=0
    for n in captured eager reference; do
      echo "--- $n: rc $(cat "$SEC/$n.rc")"; tail -5 "$SEC/$n.err"; cat "$SEC/$n.out"
      [[ "$(cat "$SEC/$n.rc")" == 0 ]] || rc=1
    done
    exit $rc'

  section e2e-compare 30 5 3 -- bash -c \
    '$PY benchmarks/device_check_steps.py compare --dir "$(ls -d "$SECTIONS_DIR"/*-e2e-sample | tail -1)" --out "$SEC/compare.json"'

  section bulk 100 45 45 -- bash -c \
    '$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" && $PY benchmarks/bulk_device_check.py --out "$SEC/bulk.json"'

  section pytest-gpu 210 60 120 -- bash -c \
    '$PY -m pytest -m gpu -v -rfEs -p no:cacheprovider --durations=20 --junitxml="$SEC/junit.xml" tests'

  # igengine bench with the compiled rows at one batch size first (2 graphs to compile: 64 and 128 rows).
  bench bench-sit-64 170 80 95 --model SiT-XL/2 --configs reference/torch,bf16/torch,bf16/compiled --batch-size 64
  official official-speed-sit 120 60 90 sit SiT
  section kernel-bench 45 15 15 -- bash -c \
    '$PY benchmarks/kernel_bench.py --device cuda --budget 0.5 --out "$SEC/kernels_cuda.json"'
  bench bench-ldit-64 170 80 100 --model LightningDiT-XL/1 --configs reference/torch,bf16/torch,bf16/compiled --batch-size 64
  official official-speed-ldit 150 60 120 lightningdit LightningDiT
  bench bench-sit-1-16 200 100 140 --model SiT-XL/2 --configs reference/torch,bf16/torch,bf16/compiled --batch-size 1,16
  bench bench-sit-256 150 80 90 --model SiT-XL/2 --configs bf16/compiled --batch-size 256 --no-anchor

  echo
  echo "=== [summary] $(elapsed)s elapsed${DRY:+ (virtual)} ==="
  echo "$VCLOCK" > "$WORK/vclock"
}

main 2>&1 | tee "$LOG"
VCLOCK=$(cat "$WORK/vclock" 2> /dev/null || echo 0)   # main ran in the pipeline's subshell
timeout -k 5 60 "$PY" benchmarks/device_check_steps.py record --work "$WORK" --out "$OUT" --log "$LOG" \
  --stamp "$STAMP" --budget "$BUDGET" --reserve "$RESERVE" --elapsed "$(elapsed)" ${DRY:+--dry-run} --final \
  2>&1 | tee -a "$LOG"
rm -rf "$WORK"
exit 0
