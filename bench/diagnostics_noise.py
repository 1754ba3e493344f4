"""How much do two measurements of the same world model's diagnostics differ? Loads a run's checkpoint and measures
eps_r, eps_m, eps_pi (at --diag-samples) and the simulator check (at --sim-check-states) several times on different
random streams. Reports each measurement's relative spread (max - min) / mean.
    python bench/diagnostics_noise.py RUN_FOLDER [--repeats 4]   (the run's own arguments are read from its checkpoint)
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--repeats", type=int, default=4)
p.add_argument("--diag-samples", type=int, nargs="+", default=[256, 16384])
p.add_argument("--sim-check-states", type=int, nargs="+", default=[256, 1024])
cli = p.parse_args()
ck = torch.load(Path(cli.run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
known = {f.name for f in adept.dataclasses.fields(adept.Args)}
args = adept.Args(**{k: v for k, v in ck["args"].items() if k in known})
device = torch.device("cpu")
run, _ = adept.setup(args, device, Path(cli.run_dir), pretrain=False)  # the run as it was at its checkpoint
adept.load_checkpoint(ck, run)
norm, D, agent, wm, pi_D = run.normalizer, run.D, run.agent, run.wm, run.pi_D
env = adept.gym.make(adept.ENVS[args.env].gym_id)
r_max = D.data["r"][: D.size].abs().max().item()
for n in cli.diag_samples:
    vals = []
    for i in range(cli.repeats):
        with adept.own_stream(i, "noise check", device):
            vals.append(adept.return_gap_diagnostics(wm, agent.actor, pi_D, D.sample(n), args.gamma, r_max,
                                                     args.is_max_weight, args.is_self_normalize))
    print(f"diag_samples {n}: " + ", ".join(
        f"{k} spread {np.ptp([v[k] for v in vals]) / np.mean([v[k] for v in vals]):.1%}" for k in ("eps_r", "eps_m", "eps_pi")))
for n in cli.sim_check_states:
    vals = []
    for i in range(cli.repeats):
        with adept.own_stream(i, "noise check", device):
            obs = norm.inverse(D.sample(n)["s"]).numpy()
            vals.append(adept.simulator_errors(wm, agent.actor, norm, env, obs, args.horizon,
                                               adept.ENVS[args.env].clips_velocity))
    print(f"sim_check_states {n}: " + ", ".join(
        f"{k} spread {np.ptp([v[k] for v in vals]) / np.mean([v[k] for v in vals]):.1%}"
        for k in ("sim_state_error", "sim_reward_error", "sim_state_error_h")))
