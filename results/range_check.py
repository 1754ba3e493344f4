"""How far the study's target policies go outside the dataset's state range.

The world model clips every generated state to the range of D's next states (Sec. 4.1), so where a policy's states
leave that range no model of this kind can follow it, however it is trained (the study's ceiling included). This
runs each target policy of one study seed in the simulator (deterministic, as the study measures it) and prints the
share of its visited states with a dimension outside D's range, and by how much (in D's state stds).
    python results/range_check.py --env halfcheetah --seed 1
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import adept  # noqa: E402
import is_study  # noqa: E402


def outside(obs: np.ndarray, lo: np.ndarray, hi: np.ndarray, std: np.ndarray) -> tuple[float, float]:
    """(N, S) states, (S,) range and stds -> share of states with a dimension outside [lo, hi], and the mean excess
    of the outside dimensions beyond the range, in stds (0 if none)."""
    out = (obs < lo) | (obs > hi)
    excess = np.maximum(lo - obs, obs - hi) / std
    return float(out.any(1).mean()), float(excess[out].mean()) if out.any() else 0.0


def main(argv=None) -> dict[str, tuple[float, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="hopper", choices=sorted(adept.ENVS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study", default=str(Path(__file__).resolve().parent / "is_study"), help="the study's --out")
    p.add_argument("--dataset-size", type=int, default=1_000_000)
    p.add_argument("--states", type=int, default=900, help="simulator steps of each target policy")
    p.add_argument("--hidden", type=int, default=256, help="the targets' hidden width (the study's --hidden)")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    args = adept.Args(env=cli.env, seed=cli.seed, dataset_size=cli.dataset_size, hidden=cli.hidden,
                      cuda=False)
    data, _ = adept.load_transitions(args)
    lo, hi, std = data["s_next"].min(0), data["s_next"].max(0), data["s"].std(0)
    normalizer = adept.Normalizer(data["s"].mean(0), std)
    result = {}
    for run_dir in sorted((Path(cli.study) / f"{cli.env}-random-s{cli.seed}" / "targets").iterdir()):
        actor = is_study.load_target(run_dir, args, data).actor
        obs = is_study.visited_states(actor, normalizer, cli.env, cli.states, cli.seed)
        share, excess = result[run_dir.name] = outside(obs, lo, hi, std)
        print(f"{cli.env} seed {cli.seed} {run_dir.name}: {share:.1%} of {cli.states} visited states outside D's "
              f"range, by {excess:.2f} stds on average in those dimensions")
    return result


if __name__ == "__main__":
    main()
