#!/usr/bin/env bash
# Issue 8's ablation on <env>-random: per seed, ADEPT-SAC, the w = 1 control (--is-exponent 0), Diff+SAC and SAC,
# the world model pretrained for 100k steps and pi_D fitted for 20k (shared by the arms of a seed through the
# caches), one thread per run. ARMS picks and orders a subset ("adept control diff sac"). A run that was stopped
# resumes from its checkpoint, a finished one is left as it is (--resume first; a fresh run where there is none).
# Runs a frozen copy of the code (SRC, a worktree of one commit), so that editing adept.py meanwhile changes nothing;
# each run's metrics.csv and summary.json land in results/ablation/<env>-random/.
#     SRC=/tmp/src-<commit> bash results/queue_ablation.sh hopper 50000 "0 1 2"
set -u
env=$1 steps=$2 seeds=$3
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${SRC:-$here}"
out="$here/results/ablation/$env-random"
mkdir -p "$out"
. "$here/.venv/bin/activate"
for seed in $seeds; do
  for which in ${ARMS:-adept control diff sac}; do
    case $which in
      adept) arm="" ;;
      control) arm="--is-exponent 0" ;;
      diff) arm="--no-importance-sampling" ;;
      sac) arm="--no-world-model" ;;
    esac
    name=$(echo "adept $arm" | tr -d ' -')
    run="python $src/adept.py --env $env --dataset random --agent sac --seed $seed $arm --total-steps $steps \
      --world-model-steps 100000 --behavior-steps 20000 --threads 1 --output-dir $out"
    $run --resume >> "$out/$name-s$seed.log" 2>&1 || $run >> "$out/$name-s$seed.log" 2>&1
  done
done
