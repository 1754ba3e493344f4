#!/usr/bin/env bash
# The agents alone (--no-world-model), 100k steps, 3 seeds; 1 thread each.
cd "$(dirname "$0")/.." && . .venv/bin/activate
for agent in sac iql bc; do
  for seed in 0 1 2; do
    python adept.py --env hopper --dataset random --agent $agent --seed $seed --no-world-model \
      --total-steps 100000 --threads 1 --output-dir results/hopper-random \
      > results/hopper-random/$agent-s$seed.log 2>&1
  done
done
