"""A run stopped and resumed at the paper's step settings (halfcheetah-random, 1M transitions) ends where an
uninterrupted one ends: every tensor of the checkpoint, and every evaluation row but the timings.
    SRC=<code to check, default: this repository> python results/paper-budget/resume_check.py <work folder>
"""
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("SRC", str(Path(__file__).resolve().parents[2])))
import adept  # noqa: E402
from adept import Args  # noqa: E402

root = sys.argv[1] if len(sys.argv) > 1 else "resume-check"
kw = dict(env="halfcheetah", world_model_steps=200, behavior_steps=200, eval_every=300, log_every=300)
adept.main(Args(**kw, total_steps=600, output_dir=f"{root}/a"))
adept.main(Args(**kw, total_steps=300, output_dir=f"{root}/b"))
adept.main(Args(**kw, total_steps=600, output_dir=f"{root}/b", resume=True))


def tensors(sd, p=""):
    for k, v in sd.items():
        if torch.is_tensor(v):
            yield p + str(k), v
        elif isinstance(v, dict):
            yield from tensors(v, p + str(k) + ".")


run = "halfcheetah-random-adept-sac-s0"
ck = [dict(tensors(torch.load(f"{root}/{r}/{run}/checkpoint.pt", weights_only=False))) for r in "ab"]
assert ck[0].keys() == ck[1].keys()
diff = [k for k in ck[0] if not torch.equal(ck[0][k], ck[1][k])]
rows = [list(csv.DictReader(open(f"{root}/{r}/{run}/metrics.csv"))) for r in "ab"]
timing = ("train_steps_per_second", "wall_seconds")
rows_differ = [(i, k) for i, (x, y) in enumerate(zip(*rows)) for k in x if k not in timing and x[k] != y[k]]
print(f"resume check: {len(ck[0])} checkpoint tensors, {len(diff)} differ {diff[:5]}; {len(rows[0])} evaluation rows, "
      f"non-timing cells that differ: {rows_differ}; D_hat rows {ck[0]['D_hat.s'].shape[0]}")
