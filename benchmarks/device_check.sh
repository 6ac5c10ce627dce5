#!/usr/bin/env bash
# One-call GPU check of igengine: build the CUDA kernels for the GPU present, run every gpu-marked
# test of the project, time the fused step against the reference glue, and record it all.
#
#   bash benchmarks/device_check.sh            # from anywhere; runs from the repository root
#
# Needs: python with torch (CUDA build), pytest, cmake, nvcc (CUDACXX, PATH or /usr/local/cuda/bin).
# The official-speed section also needs the official files (benchmarks/official_speed.py lists them,
# ~60 kB) under ./official/Internal-Guidance (or OFFICIAL_REPO): copy them there, untracked and not
# ignored, so that the device tool carries them with the tree; never commit them.
# No network access and no pip installs. Every section is independent (a failing or hanging section
# is recorded and the next one runs) and the whole script stops itself before 9 minutes (the bench and
# official-speed sections take at most 7 of them).
# Results: benchmarks/results/device_check_<stamp>.{json,log} (+ the benchmark JSON and a JUnit XML),
# copied to "$OUT" when that is set. Without a GPU it degrades to a build + skipped tests.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%d-%H%M%S)
RES="$ROOT/benchmarks/results"
mkdir -p "$RES"
PREFIX="$RES/device_check_$STAMP"
LOG="$PREFIX.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/igengine_device_check.XXXXXX")
SECTIONS="$WORK/sections.tsv"
: > "$SECTIONS"
START=$(date +%s)
TOTAL_BUDGET=${DEVICE_CHECK_BUDGET:-540}   # seconds; the call limit is 10 minutes
SUMMARY_RESERVE=25

remaining() { echo $(( START + TOTAL_BUDGET - SUMMARY_RESERVE - $(date +%s) )); }

# run_section NAME CAP_SECONDS COMMAND...: run under a timeout of min(CAP, time left); record rc and seconds.
run_section() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  echo
  echo "=== [$name] (limit ${limit}s, $(( $(date +%s) - START ))s elapsed) ==="
  if (( limit < 5 )); then
    echo "skipped: out of time"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$SECTIONS"
    return
  fi
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "!!! [$name] timed out after ${limit}s"
  echo "--- [$name] rc=$rc in $(( $(date +%s) - t0 ))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SECTIONS"
}

main() {
  echo "igengine device check $STAMP in $ROOT"

  # ---- python ------------------------------------------------------------------------------------
  PY=""
  for c in ${PYTHON:-} python3 python; do
    if command -v "$c" > /dev/null 2>&1 && timeout 60 "$c" -c "import torch" > /dev/null 2>&1; then PY=$c; break; fi
  done
  if [[ -z "$PY" ]]; then echo "!!! no python with torch found"; PY=python3; fi
  export PY

  # ---- nvcc --------------------------------------------------------------------------------------
  if [[ -z "${CUDACXX:-}" ]]; then
    if command -v nvcc > /dev/null 2>&1; then export CUDACXX=$(command -v nvcc)
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then export CUDACXX=/usr/local/cuda/bin/nvcc
    fi
  fi

  run_section nvidia-smi 20 bash -c 'if command -v nvidia-smi >/dev/null; then nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; else echo "nvidia-smi not found (no NVIDIA driver?)"; exit 3; fi'

  run_section environment 60 bash -c '
    echo "python: $(command -v $PY) $($PY --version 2>&1)"
    echo "CUDACXX=${CUDACXX:-<unset>}"; [[ -n "${CUDACXX:-}" ]] && "$CUDACXX" --version | tail -2
    cmake --version | head -1; ninja --version 2>/dev/null | sed "s/^/ninja /"
    $PY -c "
import torch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f\"  cuda:{i}\", torch.cuda.get_device_name(i), \"sm_%d%d\" % torch.cuda.get_device_capability(i))
"'

  # ---- architecture of the GPU present ------------------------------------------------------------
  ARCH=""
  if command -v nvidia-smi > /dev/null 2>&1; then
    ARCH=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .\r')
  fi
  if ! [[ "$ARCH" =~ ^[0-9]{2,3}$ ]]; then
    ARCH=$(timeout 60 $PY -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}{c[1]}')" 2>/dev/null | tail -1)
  fi
  if [[ "$ARCH" =~ ^[0-9]{2,3}$ ]]; then
    CUDA_ARCHS="${ARCH}-real;${ARCH}-virtual"
    echo "GPU architecture: sm_$ARCH -> CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS"
  else
    CUDA_ARCHS="80-real;90-real;90-virtual"
    echo "GPU architecture not detected -> default CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS"
  fi
  export CUDA_ARCHS

  run_section build 200 bash -c '
    $PY -m igengine.kernels.build --cuda auto --cuda-arch "$CUDA_ARCHS" --build-dir build/kernels-device
    rc=$?
    if (( rc != 0 )) && [[ -n "${CUDACXX:-}" ]]; then
      echo "!!! build failed; retrying once with -allow-unsupported-compiler (host compiler newer than nvcc knows?)"
      rm -rf build/kernels-device
      $PY -m igengine.kernels.build --cuda auto --cuda-arch "$CUDA_ARCHS" --build-dir build/kernels-device \
        --cmake-arg=-DCMAKE_CUDA_FLAGS=-allow-unsupported-compiler
      rc=$?
    fi
    ls -l igengine/_lib 2>/dev/null
    exit $rc'

  run_section kernels 60 $PY -c "
import json, igengine.kernels as K
d = K.describe()
print(json.dumps(d, indent=1))
open('$WORK/kernels.json', 'w').write(json.dumps(d))
print('kernel path:', d['path'])"

  # The NVRTC build (pip-only GPU users): a cold compile for the GPU present into a fresh cache, then a
  # cache hit. Needs cuda-python + the NVRTC wheel (igengine[nvrtc]); without them it says so (rc 1).
  run_section nvrtc 60 bash -c "IGENGINE_CACHE='$WORK/nvrtc-cache' \$PY -m igengine.kernels.nvrtc && \
    IGENGINE_CACHE='$WORK/nvrtc-cache' \$PY -m igengine.kernels.nvrtc"

  run_section pytest-gpu 130 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$PREFIX.pytest.xml" tests

  # igengine bench on XL-sized random-weight models at the paper settings: K-step windows per class of
  # step, reference vs eager bf16 vs compiled bf16 (--configs: not the reference/compiled row a
  # --precision x --backend cross product adds; the compiled backend compiles one graph per row count,
  # 6 for batches 1,16,64), then compiled bf16 alone at batch 256. SiT first, then the official
  # speed, then LightningDiT: the most wanted numbers come before the script's time runs out.
  # --plot only where matplotlib is installed (the lent GPU image may lack it; bench refuses --plot then)
  local PLOT=()
  $PY -c "import matplotlib" > /dev/null 2>&1 && PLOT=(--plot "$WORK/bench_sit.png")
  run_section bench-sit 170 $PY -m igengine bench --model SiT-XL/2 --device cuda \
    --configs reference/torch,bf16/torch,bf16/compiled --batch-size 1,16,64 --steps 2 --repeats 2 \
    --json "$WORK/bench_sit.json" ${PLOT[@]+"${PLOT[@]}"}

  # Against the official scripts (needs their files beside the tree: OFFICIAL_REPO, default ./official/Internal-Guidance).
  run_section official-speed 100 bash -c "test -d \"\${OFFICIAL_REPO:-official/Internal-Guidance}\" || { echo 'no official repo here'; exit 3; }; \
    \$PY benchmarks/official_speed.py --official-repo \"\${OFFICIAL_REPO:-official/Internal-Guidance}\" --quick --json '$WORK/official_speed.json'"

  run_section bench-ldit 130 $PY -m igengine bench --model LightningDiT-XL/1 --device cuda \
    --configs reference/torch,bf16/torch,bf16/compiled --batch-size 1,16,64 --steps 2 --repeats 2 \
    --json "$WORK/bench_ldit.json"
  run_section bench-256 60 $PY -m igengine bench --model SiT-XL/2 --device cuda --configs bf16/compiled \
    --batch-size 256 --steps 2 --repeats 2 --no-anchor --json "$WORK/bench_sit_256.json"

  # The fused step alone against the reference glue (last: earlier device checks recorded it already).
  run_section benchmark 110 $PY benchmarks/kernel_bench.py --device cuda --budget 0.5 --out "$WORK/bench.json"

  # Bulk sampling on the GPU: batch 64 vs 7, torchrun with 1 and 2 processes (latents and pixels).
  run_section bulk 100 bash -c "\$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' \
    && \$PY benchmarks/bulk_device_check.py --out '$WORK/bulk.json'"

  # ---- record and summarise -------------------------------------------------------------------------
  echo
  echo "=== [summary] ==="
  timeout -k 5 40 $PY - "$WORK" "$PREFIX" "$LOG" <<'PYEOF'
import hashlib, json, os, re, subprocess, sys
from pathlib import Path
work, prefix, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
root = Path.cwd()
try:
    from benchmarks.provenance import provenance
    prov = provenance()
except Exception as exc:  # noqa: BLE001
    prov = {"error": f"{type(exc).__name__}: {exc}"}
if prov.get("commit", "unknown") == "unknown" and os.environ.get("IGENGINE_COMMIT"):
    prov["commit"] = os.environ["IGENGINE_COMMIT"]
h = hashlib.sha256()  # the kernel sources, in case the copy has no .git
for p in sorted(list(root.glob("csrc/*")) + list(root.glob("igengine/kernels/*.py")) + [root / "CMakeLists.txt"]):
    if p.is_file():
        h.update(p.name.encode()); h.update(p.read_bytes())
sections = [dict(zip(("name", "rc", "seconds"), line.split("\t"))) for line in
            (work / "sections.tsv").read_text().splitlines() if line]
text = log.read_text(errors="replace") if log.exists() else ""
m = re.findall(r"^=+ (.*(?:passed|failed|skipped|error|no tests ran).*) =+$", text, re.M) or \
    re.findall(r"^(\d+ (?:passed|failed|skipped|error).*)$", text, re.M)
smi = ""
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout.strip()
except Exception:  # noqa: BLE001
    pass
def load(p):
    try:
        return json.loads(Path(p).read_text())
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
bench = load(work / "bench.json")
result = {"provenance": prov, "kernel_sources_sha256": h.hexdigest(), "gpu": smi,
          "cuda_architectures": os.environ.get("CUDA_ARCHS"), "sections": sections,
          "pytest_gpu_summary": m[-1] if m else None, "kernels": load(work / "kernels.json"), "benchmark": bench}
out = prefix.with_suffix(".json")
out.write_text(json.dumps(result, indent=1) + "\n")
print("sections:", ", ".join(f"{s['name']}={s['rc']} ({s['seconds']}s)" for s in sections))
print("pytest -m gpu:", result["pytest_gpu_summary"])
print("kernel path:", result["kernels"].get("path"), "| commit:", prov.get("commit"),
      "| sources:", result["kernel_sources_sha256"][:12])
if "rows" in bench:
    try:
        from benchmarks.kernel_bench import table
        print(table(bench))
    except Exception as exc:  # noqa: BLE001
        print("table failed:", exc)
else:
    print("benchmark:", bench.get("error"))
print("written", out)
PYEOF
  echo "total $(( $(date +%s) - START ))s"
}

main 2>&1 | tee "$LOG"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp -f "$PREFIX".* "$OUT"/ 2>/dev/null
  cp -f "$WORK/bench.json" "$OUT/kernels_cuda_$STAMP.json" 2>/dev/null
  cp -f "$WORK/bench.json" "$RES/kernels_cuda_$STAMP.json" 2>/dev/null
  for f in bench_sit bench_ldit bench_sit_256 official_speed; do
    cp -f "$WORK/$f.json" "$OUT/${f}_gpu_$STAMP.json" 2>/dev/null
    cp -f "$WORK/$f.json" "$RES/${f}_gpu_$STAMP.json" 2>/dev/null
  done
  cp -f "$WORK/bench_sit.png" "$OUT/bench_sit_gpu_$STAMP.png" 2>/dev/null
  cp -f "$WORK/bulk.json" "$OUT/bulk_gpu_$STAMP.json" 2>/dev/null
  cp -f "$WORK/bulk.json" "$RES/bulk_gpu_$STAMP.json" 2>/dev/null
  echo "copied results to $OUT"
else
  cp -f "$WORK/bench.json" "$RES/kernels_cuda_$STAMP.json" 2>/dev/null
  for f in bench_sit bench_ldit bench_sit_256 official_speed; do
    cp -f "$WORK/$f.json" "$RES/${f}_gpu_$STAMP.json" 2>/dev/null
  done
  cp -f "$WORK/bulk.json" "$RES/bulk_gpu_$STAMP.json" 2>/dev/null
fi
rm -rf "$WORK"
exit 0
