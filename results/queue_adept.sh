#!/usr/bin/env bash
# ADEPT-SAC then Diff+SAC (which reuses the cached pretrained model) per seed; 1 thread each.
cd "$(dirname "$0")/.." && . .venv/bin/activate
for seed in 0 1 2; do
  for flag in "" "--no-importance-sampling"; do
    python adept.py --env hopper --dataset random --agent sac --seed $seed $flag --total-steps 50000 \
      --world-model-steps 50000 --behavior-steps 20000 --threads 1 --output-dir results/hopper-random \
      > results/hopper-random/$(echo "adept${flag}" | tr -d ' -')-s$seed.log 2>&1
  done
done
