#!/usr/bin/env bash
# ADEPT-IQL for the seeds given (reuses each seed's cached world model and pi_D); 1 thread each.
cd "$(dirname "$0")/.." && . .venv/bin/activate
for seed in "$@"; do
  while ! ls results/hopper-random/world_models/hopper-random-s$seed-*.pt >/dev/null 2>&1; do sleep 10; done
  python adept.py --env hopper --dataset random --agent iql --seed $seed --total-steps 50000 \
    --world-model-steps 50000 --behavior-steps 20000 --threads 1 --output-dir results/hopper-random \
    > results/hopper-random/adept-iql-s$seed.log 2>&1
done
