#!/usr/bin/env bash
# The one command for a GPU machine (TESTING.md G14): build, CUDA tests, compute-sanitizer, benches,
# each under a time limit, results in one folder of <= 8 files. See bench/README.md.
#
# Usage: bash bench/gpu_check.sh [RESULTS_DIR]
#   default RESULTS_DIR: $OUT when the device tool runs it, else
#   bench/results/<UTC date>-<gpu short name>-<short commit>
# The device tool allows 600 s per command and gives the machine back ~30 s after it: one call
# runs every stage the 560 s budget reaches (the sanitizer capped at 180 s, the bench without
# torch.compile); rerun the skipped ones behind "build" in a second call
# (VLMKERN_GPU_CHECK_STAGES="build bench") and commit each call's folder (bench/README.md).
# Environment:
#   VLMKERN_GPU_CHECK_STAGES     stages to run, default "build info tests sanitizer bench"
#   VLMKERN_GPU_CHECK_TIMEOUT    seconds per stage, default 600
#   VLMKERN_GPU_CHECK_SANITIZER_TIMEOUT  cap on the sanitizer stage (default 180 s when $OUT is
#                                set, so one call can reach the bench; 0: no cap)
#   VLMKERN_GPU_CHECK_BUDGET     seconds for the whole call (stages are cut to fit, later ones
#                                skipped); default 560 when $OUT is set, else unlimited
#   VLMKERN_GPU_CHECK_MARKERS    pytest -m expression of the tests stage; default "gpu" (the CPU
#                                tests run in CI), "" runs everything
#   VLMKERN_GPU_CHECK_ALLOW_CPU  1: run without a GPU (dry check; default stages "info tests bench",
#                                sanitizer skipped, quick CPU bench)
#   VLMKERN_GPU_CHECK_BENCH_ARGS extra arguments for `python3 -m vlmkern.bench all` (default
#                                --no-compile when $OUT is set, i.e. under the device tool)
#   VLMKERN_CUDA_ARCHS           build archs, default the visible GPU's (e.g. 9.0a)
#   VLMKERN_COMMIT               commit to record when the tree has no .git (else git rev-parse)
#   PYTHON                       interpreter, default python3 from PATH
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
ALLOW_CPU=${VLMKERN_GPU_CHECK_ALLOW_CPU:-0}
STAGE_TIMEOUT=${VLMKERN_GPU_CHECK_TIMEOUT:-600}
BUDGET=${VLMKERN_GPU_CHECK_BUDGET:-$([[ -n ${OUT:-} ]] && echo 560 || echo 0)}
SANITIZER_CAP=${VLMKERN_GPU_CHECK_SANITIZER_TIMEOUT:-$([[ -n ${OUT:-} ]] && echo 180 || echo 0)}
START_TIME=$(date +%s)
MARKERS=${VLMKERN_GPU_CHECK_MARKERS-gpu}
SANITIZER_TOOLS="memcheck racecheck initcheck synccheck"

# ---- stages (each runs in a child `bash $0 --stage NAME` under `timeout`) --------------------------

pip_install() {
    # PEP 668 system interpreters refuse plain `pip install`; this machine is disposable.
    local extra=()
    if "$PY" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
        extra=(--break-system-packages)
    fi
    "$PY" -m pip install "${extra[@]}" "$@"
}

stage_build() {
    set -e
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]})); then
        echo "== installing bundled wheels: ${wheels[*]}"
        pip_install -q --no-index --no-deps "${wheels[@]}"
    fi
    export VLMKERN_CUDA_ARCHS=${VLMKERN_CUDA_ARCHS:-$GPU_ARCH}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export VLMKERN_PTXAS_VERBOSE=1  # registers / spills of every kernel into build.log
    # The device tool's machine sets CXX=/opt/gcc/bin/g++, which has no shared libstdc++
    # (CMakeLists.txt refuses it: the static copy crashes on the first error message). Fall back
    # to the system compiler there.
    local cxx=${CXX:-c++}
    if [[ $("$cxx" -print-file-name=libstdc++.so 2>/dev/null) != /* ]] && [[ -x /usr/bin/g++ ]]; then
        echo "== $cxx has no shared libstdc++: building with /usr/bin/g++ instead"
        export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
    fi
    # CMakeLists.txt compiles every kernel with -lineinfo, so compute-sanitizer names source lines.
    echo "== VLMKERN_CUDA_ARCHS=$VLMKERN_CUDA_ARCHS MAX_JOBS=$MAX_JOBS"
    pip_install --no-build-isolation -v .
}

stage_info() {
    set -e
    "$PY" -m vlmkern info
    if [[ $ALLOW_CPU != 1 ]]; then
        "$PY" -c 'import sys, vlmkern
sys.exit(0 if vlmkern.info()["cuda_kernels"] else "FAIL: vlmkern was built without CUDA kernels")'
        # On an H100 / H200 the CUTLASS GEMM path must be there, or its tests skip unnoticed.
        "$PY" -c 'import sys, torch, vlmkern
sm90 = torch.cuda.get_device_capability() == (9, 0)
sys.exit("FAIL: sm_90 GPU but vlmkern was built without CUTLASS (put the nvidia-cutlass wheel "
         "in .whl/, or set VLMKERN_CUTLASS_DIR)" if sm90 and not vlmkern.info()["cutlass_gemm"]
         else 0)'
    fi
}

stage_tests() {
    "$PY" -c 'import vlmkern; print("testing vlmkern from", vlmkern.__file__)'
    # MARKERS "gpu" (default): the CUDA tests, slow ones included; "" runs every test.
    "$PY" -m pytest tests -q -m "$MARKERS" -p no:cacheprovider --junitxml="$DIR/tests.xml"
}

find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
        /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        if [[ -n $c && -x $c ]]; then echo "$c"; return 0; fi
    done
    return 1
}

stage_sanitizer() {
    local tool rc t0 fails=0 per_tool=$((STAGE_TIMEOUT / 4 - 5)) sanitizer
    sanitizer=$(find_sanitizer) || { echo "SANITIZER all: FAIL (compute-sanitizer not found)"; return 1; }
    echo "== $sanitizer ($("$sanitizer" --version | tail -n 1))"
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for tool in $SANITIZER_TOOLS; do
        echo "=================== compute-sanitizer --tool $tool ==================="
        t0=$(date +%s)
        VLMKERN_SANITIZER_TOOL=$tool timeout -k 10 "$per_tool" "$sanitizer" --tool "$tool" \
            --error-exitcode 1 "$PY" bench/sanitizer_smoke.py 2>&1
        rc=$?
        if ((rc == 0)); then
            echo "SANITIZER $tool: PASS ($(($(date +%s) - t0)) s)"
        else
            fails=1
            echo "SANITIZER $tool: FAIL (exit $rc$( ((rc == 124)) && echo ', timed out'), $(($(date +%s) - t0)) s)"
        fi
    done
    return $fails
}

stage_bench() {
    # stdout (tables) -> bench.txt; stderr (progress, warnings) is appended by the caller.
    # shellcheck disable=SC2086
    "$PY" -m vlmkern.bench all --json "$DIR/bench.json" $BENCH_ARGS
}

if [[ ${1:-} == --stage ]]; then
    "stage_$2"
    exit $?
fi

# ---- machine facts and the results folder ----------------------------------------------------------

GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
    | head -n 1)
if [[ -n $GPU_LINE ]]; then
    IFS=',' read -r GPU_NAME GPU_DRIVER GPU_CC <<<"$GPU_LINE"
    GPU_NAME=$(echo "$GPU_NAME" | xargs) GPU_DRIVER=$(echo "$GPU_DRIVER" | xargs)
    GPU_CC=$(echo "$GPU_CC" | xargs)
    GPU_SHORT=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed 's/^nvidia //' | awk '{print $1}')
    # 9.0 -> 9.0a: Hopper and later get the arch-specific (wgmma/TMA) variant.
    GPU_ARCH=$GPU_CC$( [[ ${GPU_CC%%.*} -ge 9 ]] && echo a)
elif [[ $ALLOW_CPU == 1 ]]; then
    GPU_NAME="none (VLMKERN_GPU_CHECK_ALLOW_CPU=1)" GPU_DRIVER="none" GPU_SHORT=cpu GPU_ARCH=""
else
    echo "gpu_check: nvidia-smi finds no GPU (set VLMKERN_GPU_CHECK_ALLOW_CPU=1 for a dry run)" >&2
    exit 2
fi
if [[ -n ${VLMKERN_COMMIT:-} ]]; then  # a copy of the tree without .git: the caller says which
    COMMIT=$VLMKERN_COMMIT
else
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ $COMMIT != unknown ]] && ! git diff --quiet HEAD 2>/dev/null; then COMMIT=$COMMIT-dirty; fi
fi
export VLMKERN_COMMIT=$COMMIT  # the bench header uses it too
DATE_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
DIR=${1:-${OUT:-bench/results/$(date -u +%Y-%m-%d)-$GPU_SHORT-$COMMIT}}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || exit 2

if [[ $ALLOW_CPU == 1 ]]; then
    STAGES=${VLMKERN_GPU_CHECK_STAGES:-info tests bench}
    BENCH_ARGS=${VLMKERN_GPU_CHECK_BENCH_ARGS:---quick}
else
    STAGES=${VLMKERN_GPU_CHECK_STAGES:-build info tests sanitizer bench}
    # Under the device tool ($OUT set) one call cannot also hold torch.compile's compilations
    # (the first run timed out after two ops): --no-compile there; compile rows in their own call.
    BENCH_ARGS=${VLMKERN_GPU_CHECK_BENCH_ARGS-$([[ -n ${OUT:-} ]] && echo --no-compile)}
fi
if [[ $ALLOW_CPU == 1 && " $STAGES " == *" sanitizer "* ]]; then
    echo "gpu_check: no GPU, the sanitizer stage is skipped" >&2
    STAGES=${STAGES//sanitizer/}
fi
export PY DIR ALLOW_CPU GPU_ARCH BENCH_ARGS SANITIZER_TOOLS MARKERS
export PYTHONUNBUFFERED=1

# stage -> results file (the folder holds only these 8 files, as the device tool returns 8)
declare -A LOG=([build]=build.log [info]=info.txt [tests]=tests.log [sanitizer]=sanitizer.log
    [bench]=bench.txt)
declare -A RESULT=() SECONDS_TAKEN=()
ORDER=(build info tests sanitizer bench)
FAILED=0
# A folder that already holds results (stages run in an earlier call) keeps the stages not rerun.
if [[ -f $DIR/summary.md ]]; then
    while IFS='|' read -r name result secs; do
        if [[ " $STAGES " != *" $name "* && $result != SKIPPED ]]; then
            RESULT[$name]=$result SECONDS_TAKEN[$name]=$secs
        fi
    done < <(sed -n 's/^<!-- stage \(.*\) -->$/\1/p' "$DIR/summary.md")
fi

write_summary() {
    local s stages=""
    for s in "${ORDER[@]}"; do
        stages+="$s:${RESULT[$s]:-SKIPPED}:${SECONDS_TAKEN[$s]:-0};"
    done
    STAGE_RESULTS=$stages GPU_NAME=$GPU_NAME GPU_DRIVER=$GPU_DRIVER COMMIT=$COMMIT \
        DATE_UTC=$DATE_UTC timeout 30 "$PY" - <<'EOF' >"$DIR/summary.md.tmp" \
        && mv "$DIR/summary.md.tmp" "$DIR/summary.md" || rm -f "$DIR/summary.md.tmp"
import os
import re
import xml.etree.ElementTree as ET

d, env = os.environ["DIR"], os.environ


def read(name):
    try:
        with open(os.path.join(d, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


try:
    import torch
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
except Exception as e:  # noqa: BLE001
    versions = f"torch not importable ({e})"
out = [
    "# vlmkern GPU check",
    "",
    f"- GPU: {env['GPU_NAME']}, driver {env['GPU_DRIVER']}",
    f"- {versions}",
    f"- commit {env['COMMIT']}, {env['DATE_UTC']}",
    "",
    "| stage | result | seconds | log |",
    "|---|---|---|---|",
]
logs = {"build": "build.log", "info": "info.txt", "tests": "tests.log",
        "sanitizer": "sanitizer.log", "bench": "bench.txt"}
for item in filter(None, env["STAGE_RESULTS"].split(";")):
    name, result, secs = item.split(":")
    out.append(f"| {name} | {result} | {secs} | {logs[name]} |")

info = read("info.txt")
if info:
    out += ["", "## vlmkern info", "", "```", info.strip(), "```"]

xml = read("tests.xml")
counts = None
if xml:
    try:
        root = ET.fromstring(xml)
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        tot = {k: sum(int(s.get(k, 0)) for s in suites)
               for k in ("tests", "failures", "errors", "skipped")}
        tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
        counts = ", ".join(f"{tot[k]} {k}" for k in
                           ("passed", "failures", "errors", "skipped", "tests"))
        failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                  for c in s.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    except ET.ParseError as e:
        counts, failed = f"tests.xml unreadable ({e})", []
log = read("tests.log")
if counts or log:
    out += ["", "## Tests", ""]
    if counts:
        out.append(f"- junit: {counts}")
    if log:
        last = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)]
        if last:
            out.append(f"- pytest: {last[-1].strip('= ')}")
    if counts and failed:
        out += ["- failed:"] + [f"  - {f}" for f in failed[:50]]

san = read("sanitizer.log")
if san:
    lines = [ln for ln in san.splitlines() if ln.startswith("SANITIZER ")]
    out += ["", "## compute-sanitizer", ""] + [f"- {ln[len('SANITIZER '):]}" for ln in lines]

bench = read("bench.txt")
if bench:
    table = bench.split("\n## stderr", 1)[0].strip()
    out += ["", "## Benchmarks", "", "```", table, "```"]
# machine-readable stage results, read back when a later run adds stages to this folder
out += [""] + [f"<!-- stage {item.replace(':', '|')} -->"
               for item in filter(None, env["STAGE_RESULTS"].split(";"))]
print("\n".join(out))
EOF
}

# Seconds the next stage may take: STAGE_TIMEOUT, cut to what is left of BUDGET (minus 40 s for
# the kill grace and the summary); 0 when too little is left to start it.
stage_limit() {
    local left
    if ((BUDGET <= 0)); then echo "$STAGE_TIMEOUT"; return; fi
    left=$((BUDGET - ($(date +%s) - START_TIME) - 40))
    if ((left < 30)); then echo 0; elif ((left < STAGE_TIMEOUT)); then echo "$left";
    else echo "$STAGE_TIMEOUT"; fi
}

run_stage() {
    local name=$1 log=$DIR/${LOG[$1]} t0 rc limit
    limit=$(stage_limit)
    if ((limit == 0)); then
        RESULT[$name]="SKIPPED (budget of ${BUDGET} s spent)" SECONDS_TAKEN[$name]=0
        echo "== [$name] skipped: the call's budget of ${BUDGET} s is spent"
        write_summary
        return
    fi
    # The sanitizer gets at most SANITIZER_CAP, so one device-tool call can still reach the bench.
    if [[ $name == sanitizer ]] && ((SANITIZER_CAP > 0 && limit > SANITIZER_CAP)); then
        limit=$SANITIZER_CAP
    fi
    export STAGE_TIMEOUT=$limit
    t0=$(date +%s)
    echo "== [$name] $(date -u +%H:%M:%S) (log: $log)"
    if [[ $name == bench ]]; then
        rm -f "$DIR/bench.json"
        local err
        err=$(mktemp)
        timeout -k 10 "$STAGE_TIMEOUT" bash "$0" --stage "$name" >"$log" 2>"$err"
        rc=$?
        { echo; echo "## stderr"; cat "$err"; } >>"$log"
        rm -f "$err"
    else
        [[ $name == tests ]] && rm -f "$DIR/tests.xml"
        timeout -k 10 "$STAGE_TIMEOUT" bash "$0" --stage "$name" >"$log" 2>&1
        rc=$?
    fi
    SECONDS_TAKEN[$name]=$(($(date +%s) - t0))
    if ((rc == 0)); then
        RESULT[$name]=PASS
    else
        RESULT[$name]="FAIL (exit $rc$( ((rc == 124)) && echo ", timed out after ${STAGE_TIMEOUT} s"))"
        FAILED=1
        echo "   last lines of $log:"
        tail -n 15 "$log" | sed 's/^/   | /'
    fi
    echo "   $name: ${RESULT[$name]} in ${SECONDS_TAKEN[$name]} s"
    write_summary
}

echo "gpu_check: $GPU_NAME, commit $COMMIT, results in $DIR"
echo "gpu_check: stages: $(echo $STAGES)"
for s in "${ORDER[@]}"; do
    if [[ " $STAGES " == *" $s "* ]]; then
        run_stage "$s"
    fi
done
write_summary
echo "gpu_check: summary in $DIR/summary.md"
ls "$DIR"
exit $FAILED
