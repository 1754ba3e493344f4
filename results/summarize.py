"""Results table from the runs in a folder: python results/summarize.py results/hopper-random [--at STEP]

Each run is scored by the mean normalized score of its last 3 evaluations (at or before STEP), since one evaluation
of offline SAC on random data is noise; a method's score is the mean +- std of that over seeds, beside its best run.
Model errors (measured against the simulator, see README) are the mean over seeds of the same last 3 evaluations.
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1])
at = int(sys.argv[sys.argv.index("--at") + 1]) if "--at" in sys.argv else None
methods = defaultdict(list)
for metrics in sorted(folder.glob("*/metrics.csv")):
    rows = [r for r in csv.DictReader(open(metrics)) if at is None or int(r["step"]) <= at]
    if len(rows) < 3 or not (metrics.parent / "summary.json").exists():  # finished runs only
        continue
    name = metrics.parent.name.split("-", 2)[2].rsplit("-s", 1)[0]  # hopper-random-adept-sac-s0 -> adept-sac
    last = rows[-3:]
    mean = lambda key: float(np.mean([float(r[key]) for r in last])) if last[0].get(key) else float("nan")  # noqa
    methods[name].append({"seed": metrics.parent.name.rsplit("-s", 1)[1], "step": int(rows[-1]["step"]),
                          "score": mean("normalized_score"), "final": float(rows[-1]["normalized_score"]),
                          **{k: mean(k) for k in ("sim_state_error", "sim_reward_error", "sim_state_error_h",
                                                  "eps_pi", "is_ess")}})

print(f"| method | seeds | steps | score (last 3 evals), mean +- std | best run | per seed | sim state err | "
      f"sim reward err | sim state err after H | eps_pi |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, runs in sorted(methods.items()):
    s = np.array([r["score"] for r in runs])
    err = lambda k: f"{np.mean([r[k] for r in runs]):.3f}" if not np.isnan(runs[0][k]) else "-"  # noqa: E731
    print(f"| {name} | {len(runs)} | {runs[0]['step']} | {s.mean():.1f} +- {s.std():.1f} | {s.max():.1f} | "
          f"{', '.join(f'{x:.1f}' for x in s)} | {err('sim_state_error')} | {err('sim_reward_error')} | "
          f"{err('sim_state_error_h')} | {err('eps_pi')} |")
