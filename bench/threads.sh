#!/usr/bin/env bash
# How many torch threads a run should take on this machine: the training speed of SAC and ADEPT-SAC steps with 1 and
# 2 threads, alone and beside one other busy process (a one-core spin loop, as a second run would be).
#     bash bench/threads.sh [out-folder]          # ~5 minutes; one line per case, and threads.csv in the folder
# Uses halfcheetah-random (1M transitions; built on first use) and the paper's step settings; the world model is
# pretrained for only 200 steps, which does not change the cost of a step.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/threads}"
mkdir -p "$out"
common=(--env halfcheetah --dataset random --eval-every 100000 --eval-episodes 1 --log-every 100000 --diag-samples 256
        --sim-check-states 16 --world-model-steps 200 --behavior-steps 200 --output-dir "$out")
echo "neighbour,threads,arm,train_steps_per_second" > "$out/threads.csv"
for neighbour in alone busy; do
  spin=""
  if [ "$neighbour" = busy ]; then python3 -c "while True: pass" & spin=$!; fi
  for threads in 1 2; do
    for arm in sac adept-sac; do
      name="$neighbour-t$threads-$arm"
      rm -rf "$out/$name"
      if [ "$arm" = sac ]; then flags=(--no-world-model --total-steps 3000); else flags=(--total-steps 1500); fi
      python3 adept.py "${common[@]}" "${flags[@]}" --threads "$threads" --run-name "$name" > "$out/$name.log" 2>&1
      sps=$(python3 -c "import json; print(round(json.load(open('$out/$name/summary.json'))['train_steps_per_second'], 1))")
      echo "$neighbour,$threads,$arm,$sps" | tee -a "$out/threads.csv"
    done
  done
  [ -n "$spin" ] && kill "$spin"
done
