#!/usr/bin/env bash
# GPU check for ptanet, on a CUDA machine, from the repository root, in at most 9 minutes:
#   scripts/gpu-check.sh [RESULTS_DIR]          (default: gpu-check-results/<UTC time>)
# 1. installs the project (pip install -c constraints.txt -e '.[dev]'); constraints.txt pins the torch
#    version, and an environment that already holds the CPU build of that version keeps it, so when
#    torch.cuda.is_available() is still false the CUDA build of the same version is installed from PyPI
#    (its Linux wheels are the CUDA builds). PTANET_SKIP_INSTALL=1 skips this step (offline machines).
# 2. runs the CUDA tests (tests/test_distributed.py; pytest skips them without a GPU),
# 3. a 2-process torchrun DDP smoke run when two GPUs are visible,
# 4. synthetic data, `ptanet prepare` images/s per worker count, `ptanet bench-data` per worker count,
# 5. `ptanet bench-train` at batch 256 with mixed precision (targets on an H100/H200: >= 5,000 images/s
#    PTA, PTA / No PTA time ratio <= 0.96).
# Every step has a timeout within one overall deadline; a failed step is recorded in summary.txt and the
# remaining steps still run. All output goes into RESULTS_DIR (log.txt holds everything printed).
set -euo pipefail

DEADLINE=$((SECONDS + ${PTANET_CHECK_SECONDS:-530}))   # 8 min 50 s
RESULTS=${1:-gpu-check-results/$(date -u +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$RESULTS/work
mkdir -p "$WORK"
exec > >(tee -a "$RESULTS/log.txt") 2>&1
: > "$RESULTS/summary.txt"
failed=0

say() { printf '\n=== [%3ds] %s\n' "$SECONDS" "$*"; }
# step NAME MAX_SECONDS COMMAND...: runs COMMAND with a timeout that also respects the deadline.
step() {
    local name=$1 max=$2; shift 2
    local left=$((DEADLINE - SECONDS - 5))
    if ((left < 15)); then
        say "$name: skipped (deadline)"; echo "$name: skipped (deadline)" >> "$RESULTS/summary.txt"; return 0
    fi
    local limit=$((max < left ? max : left))
    say "$name (limit ${limit}s): $*"
    local rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if ((rc == 0)); then
        echo "$name: ok" >> "$RESULTS/summary.txt"
    else
        echo "$name: FAILED (exit $rc$( ((rc == 124)) && echo ', timed out'))" >> "$RESULTS/summary.txt"
        failed=1
    fi
}

cuda_ready() { "$PYTHON" -c 'import torch, ptanet; raise SystemExit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

install() {
    "$PYTHON" -m pip install -q -c constraints.txt -e '.[dev]'
    if ! "$PYTHON" -c 'import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)'; then
        echo "torch.cuda.is_available() is false after install: installing the CUDA build of the pinned torch from PyPI"
        "$PYTHON" -m pip uninstall -y -q torch
        "$PYTHON" -m pip install -q -c constraints.txt --index-url https://pypi.org/simple torch
    fi
}

say "results in $RESULTS"
if [[ ${PTANET_SKIP_INSTALL:-0} == 1 ]] || cuda_ready; then
    say "install: skipped ($( [[ ${PTANET_SKIP_INSTALL:-0} == 1 ]] && echo PTANET_SKIP_INSTALL=1 || echo 'ptanet and CUDA torch already importable'))"
else
    step install 240 install
fi

say "environment"
{ nvidia-smi || true; "$PYTHON" -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "gpus", torch.cuda.device_count()); [print(i, torch.cuda.get_device_name(i), "bf16" if torch.cuda.is_bf16_supported() else "no bf16") for i in range(torch.cuda.device_count())]'; nproc; } | tee "$RESULTS/environment.txt"
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if ((GPUS == 0)); then
    echo "no CUDA GPU visible: the GPU checks cannot run" | tee -a "$RESULTS/summary.txt"
    exit 1
fi

step cuda-tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" -rs \
    tests/test_distributed.py -k "cuda or two_processes" --junitxml "$RESULTS/cuda-tests.xml"

step synth 60 "$PYTHON" -m ptanet synth --out "$WORK/synth" --train-subjects 16 --test-subjects 2 --per-subject 80 \
    --size 176 --workers "$(nproc)"

# `ptanet prepare` per worker count, each into its own cache (resumable; a fresh folder measures a full build).
prepare() {
    "$PYTHON" - "$WORK" "$RESULTS/prepare.csv" <<'PY'
import subprocess, sys, time
from ptanet.data import CropCache
work, out = sys.argv[1:]
rows = ["workers,images,seconds,images_per_s"]
for w in (1, 4, 8, 16):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ptanet", "prepare", f"{work}/synth", "--out", f"{work}/prep{w}/x",
                    "--prepare-workers", str(w)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    n = sum(len(CropCache(f"{work}/prep{w}/cache/synth/{part}")) for part in ("train", "test"))
    rows.append(f"{w},{n},{seconds:.2f},{n / seconds:.1f}")
    print(rows[-1], flush=True)
open(out, "w").write("\n".join(rows) + "\n")
PY
}
step prepare 90 prepare
CACHE=$WORK/prep1/cache/synth/train

step bench-data 60 "$PYTHON" -m ptanet bench-data "$CACHE" --batch-size 256 --workers 0,1,2,4,8,15 --batches 20 \
    --format csv
step bench-train 150 "$PYTHON" -m ptanet bench-train "$CACHE" --batch-size 256 --steps 30 --repeats 3 \
    --epoch-images 494000 --out "$RESULTS/bench-train"

if ((GPUS >= 2)); then
    step ddp-smoke 90 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 -m ptanet train --data "$WORK/synth" \
        --out "$WORK/ddp-run" --cache "$WORK/prep1/cache/synth" --batch-size 256 --epochs 1 --device cuda --bn-images 256
    step ddp-bench-train 120 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 -m ptanet bench-train "$CACHE" \
        --batch-size 512 --steps 30 --repeats 3 --epoch-images 494000 --out "$RESULTS/bench-train-2gpu"
    for mode in zero find; do  # how DDP learns of the branches a configuration leaves out
        step "ddp-unused-$mode" 60 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 -m ptanet bench-train "$CACHE" \
            --batch-size 512 --steps 30 --repeats 3 --parts model --models pta --ddp-unused "$mode" \
            --out "$RESULTS/ddp-unused-$mode"
    done
else
    echo "ddp-smoke: skipped (one GPU)" >> "$RESULTS/summary.txt"
fi

step bench-train-compiled 120 "$PYTHON" -m ptanet bench-train "$CACHE" --batch-size 256 --steps 30 --repeats 3 \
    --warmup 10 --compile --epoch-images 494000 --out "$RESULTS/bench-train-compiled"

say "summary ($SECONDS s)"
cat "$RESULTS/summary.txt"
rm -rf "$WORK/prep4" "$WORK/prep8" "$WORK/prep16"   # the results stay; the extra caches go
exit $failed
