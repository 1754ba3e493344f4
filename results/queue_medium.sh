#!/usr/bin/env bash
# Issue 9's evidence on <env>-<dataset> (medium-replay or medium): per seed, SAC and IQL on the dataset alone
# (--no-world-model) and ADEPT-SAC with the world model pretrained for 100k steps and pi_D fitted for 20k, one thread
# per run. ARMS picks a subset ("sac iql adept"). A stopped run resumes from its checkpoint, a finished one is left.
# Runs a frozen copy of the code (SRC, a worktree of one commit); each run's metrics.csv and summary.json land in
# results/medium/<env>-<dataset>/.
#     SRC=/tmp/src-<commit> bash results/queue_medium.sh hopper medium-replay 50000 "0 1 2"
set -u
env=$1 dataset=$2 steps=$3 seeds=$4
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${SRC:-$here}"
out="$here/results/medium/$env-$dataset"
mkdir -p "$out"
. "$here/.venv/bin/activate"
for seed in $seeds; do
  for arm in ${ARMS:-sac iql adept}; do
    case $arm in
      sac) flags="--agent sac --no-world-model" ;;
      iql) flags="--agent iql --no-world-model" ;;
      adept) flags="--agent sac --world-model-steps 100000 --behavior-steps 20000" ;;
    esac
    run="python $src/adept.py --env $env --dataset $dataset $flags --seed $seed --total-steps $steps --threads 1 \
      --output-dir $out"
    $run --resume >> "$out/$arm-s$seed.log" 2>&1 || $run >> "$out/$arm-s$seed.log" 2>&1
  done
done
