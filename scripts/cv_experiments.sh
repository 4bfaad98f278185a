#!/usr/bin/env bash
# The cross-validation experiments of docs/experiments.md: 4-fold cross-validation by subject of
# nuaa-dev's train list for each recipe, with every fold model also scoring the synthetic set's test
# split (screen replays and prints of people no fold trains on).
#
#   scripts/cv_experiments.sh [EXPERIMENT ...]     # default: all, in the order below
#
# Each experiment runs its folds in two processes of one thread each (the fastest use of two cores),
# then writes the summary. Everything resumes: finished folds are not trained again, so the script
# can be stopped and started again at any time. Run from the repository root after `make install`.
set -euo pipefail

PTANET=${PTANET:-.venv/bin/ptanet}
DATA=${DATA:-../shared/data/nuaa-dev}
OUT=${OUT:-runs/cv}
SYNTH=${SYNTH:-runs/synth}
SEEDS=${SEEDS:-0,1,2}
# The paper's crop (box scale 1.0, 128 px) shares one cache; a recipe with another crop needs its own.
CACHE=${CACHE:-runs/nuaa/cache/nuaa-dev}

declare -A FLAGS=(
  [paper]=""
  [zoom]="--config recipes/nuaa_zoom.yaml --cache $OUT/cache-zoom/nuaa-dev"
  [distill]="--distill HHH"
  [mix]="--mix-synth 0.25 --synth-data $SYNTH"
)
ORDER=(paper zoom distill mix)

mkdir -p "$OUT"
[ -d "$SYNTH" ] || "$PTANET" synth --out "$SYNTH"

run_cv() {
  local name=$1 flags=${FLAGS[$1]}
  local cache="--cache $CACHE"
  [[ $flags == *--cache* ]] && cache=""
  # shellcheck disable=SC2086  # flags are words on purpose
  local args=(--data "$DATA" --out "$OUT/$name" --seeds "$SEEDS" --transfer-data "$SYNTH" $cache $flags)
  echo "$(date +%T) $name: ptanet cv ${args[*]}"
  # The caches are built once, by a first call that trains nothing (--only with no fold), before the
  # two processes start, so that they never build the same cache at once.
  "$PTANET" cv "${args[@]}" --only "" > "$OUT/$name-prepare.log" 2>&1 || true
  for part in 0,1 2,3; do
    OMP_NUM_THREADS=1 nice -n 5 "$PTANET" cv "${args[@]}" --only "$part" > "$OUT/$name-$part.log" 2>&1 &
  done
  wait
  "$PTANET" cv "${args[@]}" > "$OUT/$name.md" 2> "$OUT/$name.log"
  echo "$(date +%T) $name: $OUT/$name/cv.md, $OUT/$name/transfer.md"
}

for name in "${@:-${ORDER[@]}}"; do
  [[ -n ${FLAGS[$name]+set} ]] || { echo "unknown experiment $name; known: ${ORDER[*]}" >&2; exit 2; }
  run_cv "$name"
done
