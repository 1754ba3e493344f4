#!/usr/bin/env bash
# What the uncertainty estimate costs: the training speed of SAC, ADEPT-SAC and ADEPT-SAC with
# --uncertainty-samples 5 (and 10), one after another in one run of this script, one thread each, nothing else running.
#     bash bench/uncertainty_speed.sh [out-folder] [env]     # ~4 minutes; speed.csv in the folder
# The paper's step settings; the world model is pretrained for only 200 steps, which does not change a step's cost.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/uncertainty}" env="${2:-halfcheetah}"
mkdir -p "$out"
common=(--env "$env" --dataset random --eval-every 100000 --eval-episodes 1 --log-every 100000 --diag-samples 256
        --sim-check-states 16 --world-model-steps 200 --behavior-steps 200 --threads 1 --output-dir "$out")
echo "case,train_steps_per_second,ms_per_step" > "$out/speed.csv"
for case in sac adept adept-n5 adept-n10; do
  rm -rf "${out:?}/$case"
  case $case in
    sac) flags=(--no-world-model --total-steps 3000) ;;
    adept) flags=(--total-steps 1500) ;;
    adept-n5) flags=(--total-steps 1500 --uncertainty-samples 5) ;;
    adept-n10) flags=(--total-steps 1500 --uncertainty-samples 10) ;;
  esac
  python3 adept.py "${common[@]}" "${flags[@]}" --run-name "$case" > "$out/$case.log" 2>&1
  python3 -c "import json; s = json.load(open('$out/$case/summary.json'))['train_steps_per_second']; \
print(f'$case,{s:.1f},{1000 / s:.1f}')" | tee -a "$out/speed.csv"
done
