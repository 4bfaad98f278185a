#!/usr/bin/env bash
# Every measurement of README's Deployment section, in order, for the nuaa-dev model of `make nuaa`
# (runs/nuaa/pta_mobilenet_v2). Run from the repository root after `make install`, on an otherwise
# idle machine: the latency figures are only comparable when nothing else runs. About 15 minutes on
# 2 CPU cores; each command's output goes to runs/readme/<name>.log (tables also as .md/.json/.csv).
set -euo pipefail
P=${PTANET:-.venv/bin/ptanet}
M=${MODEL:-runs/nuaa/pta_mobilenet_v2/best.pt}
R=${OUT:-runs/readme}
mkdir -p "$R"
run() { local name=$1; shift; echo "$(date +%T) $name: ptanet $*"; "$P" "$@" > "$R/$name.log" 2>&1; }
rm -rf runs/nuaa/deploy runs/nuaa/int8
run export      export "$M" --out runs/nuaa/deploy
run eval_deploy evaluate runs/nuaa/deploy/model_switchable
run int8        export "$M" --out runs/nuaa/int8/ --int8
run table4      bench "$M" --runtimes torch,onnxruntime,int8 --int8-dir runs/nuaa/int8/ --out "$R/table4"
run ort_basic   bench "$M" --runtimes onnxruntime --configs HHH,LLL --ort-optimization basic
run ort_all     bench "$M" --runtimes onnxruntime --configs HHH,LLL
run artifact    bench "$M" --artifact --out "$R/artifact"
run int8_options bench "$M" --int8-options --configs HHH,LLL,BBB
run int8_val    evaluate runs/nuaa/int8/*.onnx --split val --out runs/nuaa/int8/eval-val
run eval_val    evaluate "$M" --split val --configs all --out runs/nuaa/eval-val
run all27       bench "$M" --configs all --runtimes onnxruntime --no-bbb-variant --runs 150 --rounds 5 --out "$R/all27"
run select      select "$M" --bench "$R/all27.json" --quality runs/nuaa/eval-val/table3.json --budget-rel 0.9
run adaptive    bench "$M" --adaptive --out "$R/adaptive"
run complexity  complexity --latency --runs 30 --rounds 9
echo "$(date +%T) done: $R"
