"""The importance-sampling mechanism study: does the importance-sampled update (Eq. 3) make the world model more
accurate under the policy it is adapted to?

For one environment and seed (the seed fixes the pretrained model, pi_D, the target policies and the minibatches):
- the world model pretrained as a run pretrains it, and pi_D fitted as a run fits it (the same caches);
- two fixed target policies: SAC trained offline on the dataset (no world model) for two budgets (2k and 50k);
- arms, each the same number of model updates at B_m from the same pretrained model, on the same minibatches:
  frozen (no update); w1 (w = 1, the control); eq3 (Eq. 3 with the fitted pi_D); eq3_uniform (Eq. 3 with the
  exact uniform pi_D); lambda0.5 (tempered weights); lr3e-5 (Eq. 3 at a smaller learning rate); resample (weighted
  resampling from a pool of 16,384); and a ceiling that no offline update reaches: w = 1 updates on real transitions
  that the target policy, with a little action noise, collects in the simulator;
- every --every updates, errors against the real simulator under the target (deterministic actions): one-step
  state and reward error on dataset states; one-step and H-step state error on states the target visits; and the
  policy-evaluation error |model H-step return - simulator H-step return| from those on-policy states.

One CSV per (target, arm) in <out>/<env>-random-s<seed>/ (frozen and w1 do not depend on the target: run once,
measured under both), and meta.json (targets' eps_pi from pi_D, their returns, and the ESS of their weights over
the whole dataset). Cells already written are skipped, so the study can be run in pieces.
    python results/is_study.py --env hopper --seed 0            # full size: about 2 CPU-hours
"""

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept  # noqa: E402

ARMS = ("frozen", "w1", "eq3", "eq3_uniform", "lambda0.5", "lr3e-5", "resample", "ceiling")
SHARED = ("frozen", "w1")  # arms that do not depend on the target policy
COLUMNS = ("updates", "dataset_state_error", "dataset_reward_error", "onpolicy_state_error",
           "onpolicy_state_error_h", "pe_return_error", "batch_ess")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="hopper", choices=sorted(adept.ENVS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/is_study")
    p.add_argument("--cache-dir", default=None, help="where the pretrained caches are (default: the ablation's)")
    p.add_argument("--dataset-size", type=int, default=1_000_000)
    p.add_argument("--world-model-steps", type=int, default=100_000)
    p.add_argument("--behavior-steps", type=int, default=20_000)
    p.add_argument("--target-steps", type=int, nargs=2, default=[2_000, 50_000], help="SAC budgets of the targets")
    p.add_argument("--updates", type=int, default=20_000, help="model updates per arm")
    p.add_argument("--every", type=int, default=2_000, help="measure every this many updates")
    p.add_argument("--states", type=int, default=300, help="start states of each measurement")
    p.add_argument("--real-transitions", type=int, default=50_000, help="on-policy data of the ceiling arm")
    p.add_argument("--action-noise", type=float, default=0.1, help="std of the ceiling's exploration noise")
    p.add_argument("--model-hidden", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--is-batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


@torch.no_grad()
def visited_states(policy, normalizer, env_name: str, n: int, seed: int, noise: float = 0.0, keep_transitions=False):
    """Run the policy (deterministic, plus Gaussian action noise of std `noise`) in the simulator until n
    transitions are collected. -> observations (n, S) and, if asked, the transitions (raw states)."""
    env = adept.gym.make(adept.ENVS[env_name].gym_id)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = {k: [] for k in adept.Buffer.FIELDS}
    while len(out["s"]) < n:
        a = policy.act(normalizer(torch.as_tensor(obs, dtype=torch.float32)[None]), True)[0].numpy()
        a = np.clip(a + noise * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
        obs2, r, terminated, truncated, _ = env.step(a)
        for k, v in zip(adept.Buffer.FIELDS, (obs, a, r, obs2, float(terminated))):
            out[k].append(v)
        obs = env.reset()[0] if terminated or truncated else obs2
    out = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    return out if keep_transitions else out["s"]


def load_target(run_dir: Path, args: adept.Args, data: dict) -> adept.SAC:
    """A target policy: the SAC agent of a finished offline run, from its checkpoint."""
    agent = adept.SAC(data["s"].shape[1], data["a"].shape[1], args, torch.device("cpu"))
    agent.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["agent"])
    return agent


def measure(wm, target, normalizer, env, dataset_obs, onpolicy_obs, horizon, env_name, seed) -> dict:
    """The study's errors of one model under one target, on fixed start states and a fixed sampler stream."""
    clips = adept.ENVS[env_name].clips_velocity
    with adept.own_stream(seed, "study measurement", torch.device("cpu")):
        on_data = adept.simulator_errors(wm, target, normalizer, env, dataset_obs, 1, clips)
        on_policy = adept.simulator_errors(wm, target, normalizer, env, onpolicy_obs, horizon, clips)
    return {"dataset_state_error": on_data["sim_state_error"], "dataset_reward_error": on_data["sim_reward_error"],
            "onpolicy_state_error": on_policy["sim_state_error"],
            "onpolicy_state_error_h": on_policy["sim_state_error_h"],
            "pe_return_error": on_policy["sim_return_error_h"]}


@torch.no_grad()
def dataset_ess(target, D: adept.Buffer, log_pi_D: torch.Tensor) -> float:
    """ESS of the target's Eq. 3 weights over the whole dataset: how many of D's transitions any reweighting of D
    can draw on at all."""
    w = adept.importance_weights(adept.log_density(target, D), log_pi_D, max_weight=math.inf)
    return adept.effective_sample_size(w).item()


def main(cli) -> Path:
    torch.set_num_threads(cli.threads)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    device = torch.device("cpu")
    out = Path(cli.out) / f"{cli.env}-random-s{cli.seed}"
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cli.cache_dir or str(Path(__file__).resolve().parent / "ablation" / f"{cli.env}-random")
    args = adept.Args(env=cli.env, seed=cli.seed, dataset_size=cli.dataset_size, output_dir=cache_dir,
                      world_model_steps=cli.world_model_steps, behavior_steps=cli.behavior_steps, cuda=False,
                      model_hidden=cli.model_hidden, hidden=cli.hidden, is_batch_size=cli.is_batch_size)
    run, data = adept.setup(args, device, out)  # the pretrained model and pi_D from the runs' caches
    normalizer, D, wm0, opt0 = run.normalizer, run.D, run.wm, run.wm_opt
    pi_D = {"fitted": run.pi_D,
            "uniform": adept.behavior_policy(dataclasses.replace(args, behavior_density="uniform"), D, device)}
    log_pi_D = {"fitted": D.data["log_pi_D"], "uniform": adept.log_density(pi_D["uniform"], D)}
    env, clips = adept.gym.make(adept.ENVS[cli.env].gym_id), adept.ENVS[cli.env].clips_velocity
    with adept.own_stream(cli.seed, "study dataset states", device):
        dataset_obs = adept.settable_states(data["s"][torch.randperm(len(data["s"]))[: 3 * cli.states].numpy()], env,
                                            clips)
    dataset_obs = dataset_obs[: cli.states]

    # ---- the two target policies: offline SAC at two budgets ----
    targets, meta = {}, {"env": cli.env, "seed": cli.seed, "targets": {}}
    for budget in cli.target_steps:
        name = f"sac{budget}"
        targs = dataclasses.replace(args, agent="sac", world_model=False, total_steps=budget, eval_every=budget,
                                    output_dir=str(out / "targets"), run_name=name, threads=cli.threads)
        run_dir = Path(targs.output_dir) / name  # its checkpoint is not committed: a new machine trains it again
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "checkpoint.pt").exists() \
            else adept.main(targs)
        agent = load_target(run_dir, targs, data)
        targets[name] = agent.actor
        with adept.own_stream(cli.seed, "study eps_pi", device):
            eps_pi = adept.policy_shift(agent.actor, pi_D["fitted"], D.sample(16384)["s"]).item()
        meta["targets"][name] = {
            "sac_steps": budget, "normalized_score": summary["normalized_score"], "eps_pi_fitted": eps_pi,
            "dataset_ess_fitted": dataset_ess(agent.actor, D, log_pi_D["fitted"]),
            "dataset_ess_uniform": dataset_ess(agent.actor, D, log_pi_D["uniform"])}
    eps = [m["eps_pi_fitted"] for m in meta["targets"].values()]
    meta["eps_pi_gap"] = abs(eps[1] - eps[0])
    onpolicy = {name: adept.settable_states(visited_states(t, normalizer, cli.env, 3 * cli.states, cli.seed), env,
                                            clips)[:: 3][: cli.states] for name, t in targets.items()}

    # ---- the arms ----
    def run_arm(target_name: str | None, arm: str) -> None:
        measured_under = list(targets) if target_name is None else [target_name]
        paths = {t: out / f"{t}__{arm}.csv" for t in measured_under}
        if all(p.exists() for p in paths.values()):
            return
        t0 = time.perf_counter()
        wm = copy.deepcopy(wm0)
        opt = adept.adam(wm.parameters(), args.lr)
        opt.load_state_dict(opt0.state_dict())
        arm_args = dataclasses.replace(args, is_exponent=0.0 if arm == "w1" else 0.5 if arm == "lambda0.5" else 1.0,
                                       is_resample_pool=16384 if arm == "resample" else 0)
        for group in opt.param_groups:
            group["lr"] = 3e-5 if arm == "lr3e-5" else args.lr
        Dw = copy.copy(D)  # the dataset, with the log-density of this arm's pi_D
        Dw.data = {**D.data, "log_pi_D": log_pi_D["uniform" if arm == "eq3_uniform" else "fitted"]}
        pi = targets[target_name] if target_name else targets[next(iter(targets))]  # w1: weights are all 1 anyway
        if arm == "ceiling":  # real transitions of the target (with a little noise), in normalized units
            real = visited_states(pi, normalizer, cli.env, cli.real_transitions, cli.seed + 1, cli.action_noise, True)
            R = adept.Buffer(len(real["s"]), D.data["s"].shape[1], D.data["a"].shape[1], device)
            R.add({k: torch.as_tensor(v) for k, v in real.items()} | {
                "s": normalizer(torch.as_tensor(real["s"])), "s_next": normalizer(torch.as_tensor(real["s_next"]))})
        generator = torch.Generator().manual_seed(adept.seed_of(cli.seed, "study minibatches"))
        rows, ess = [], []
        for u in range(0, cli.updates + 1):
            if u % cli.every == 0:
                for tname in measured_under:
                    m = measure(wm, targets[tname], normalizer, env, dataset_obs, onpolicy[tname], args.horizon,
                                cli.env, cli.seed)
                    rows.append({"target": tname, "updates": u, **m,
                                 "batch_ess": float(np.mean(ess)) if ess else float("nan")})
                ess = []
                if arm == "frozen":  # nothing changes: one measurement stands for every update count
                    rows = [{**r, "updates": v} for v in range(0, cli.updates + 1, cli.every) for r in rows]
                    break
            if u == cli.updates:
                break
            if arm == "ceiling":
                adept.world_model_update(wm, opt, R.sample(cli.is_batch_size, generator), None, generator)
            else:
                _, e = adept.importance_sampled_update(wm, opt, pi, Dw, arm_args, generator)
                ess.append(e.item())
        for tname, path in paths.items():  # a shared arm is written once per target it was measured under
            adept.write_csv(path, COLUMNS, [r for r in rows if r["target"] == tname])
        print(f"[study] {cli.env} s{cli.seed} {target_name or 'both targets'} {arm}: {time.perf_counter() - t0:.0f} s",
              flush=True)

    for arm in SHARED:
        run_arm(None, arm)
    for tname in targets:
        for arm in ARMS:
            if arm not in SHARED:
                run_arm(tname, arm)
    meta["seconds"] = time.perf_counter() - t_start
    meta["settings"] = vars(cli)
    adept.atomic_write(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return out


if __name__ == "__main__":
    main(parse())
