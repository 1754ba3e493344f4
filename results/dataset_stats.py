"""Statistics of the datasets in the local Minari store (none is built here: a missing one is reported as such).
    python results/dataset_stats.py [--envs hopper halfcheetah walker2d] [--datasets random medium medium-replay]
Per dataset: transitions, episodes, mean episode return (episodes cut by the dataset's end included) and its
D4RL-normalized score, and, for the medium ones, the online learner's recipe (target, reached return, steps)."""
import argparse
import json
import sys
from pathlib import Path

import minari
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--envs", nargs="+", default=["hopper", "halfcheetah", "walker2d"])
p.add_argument("--datasets", nargs="+", default=list(adept.LOCAL_DATASETS))
cli = p.parse_args()
print("| dataset | transitions | episodes | mean episode return | normalized | learner: target / reached return, "
      "env steps |")
print("|---|---|---|---|---|---|")
for env in cli.envs:
    for name in cli.datasets:
        args = adept.Args(env=env, dataset=name)
        ds_id = adept.dataset_id(args)
        if not (minari.storage.get_dataset_path(ds_id) / "data").exists():
            print(f"| {ds_id} | not built | | | | |")
            continue
        data, refs = adept.load_transitions(args)
        ends = np.flatnonzero(data["terminal"] + data["timeout"] > 0)
        returns = np.array([r.sum() for r in np.split(data["r"], ends[:-1] + 1)])
        meta = minari.load_dataset(ds_id).storage.metadata
        recipe = json.loads(meta["adept_recipe"]) if "adept_recipe" in meta else None
        learner = (f"{recipe['medium_return']:.0f} / {recipe['reached_return']:.0f}, {recipe['environment_steps']}"
                   if recipe else "")
        print(f"| {ds_id} | {len(data['s'])} | {len(returns)} | {returns.mean():.1f} | "
              f"{adept.normalized_score(returns.mean(), refs['random'], refs['expert']):.1f} | {learner} |")
