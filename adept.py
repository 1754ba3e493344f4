"""ADEPT: Adaptive Diffusion World-Model for Policy Evaluation, in one file.

Paper: Zeyu Fang and Tian Lan, "Learning from Random Demonstrations: Offline Reinforcement Learning with
Importance-Sampled Diffusion Models". A guided diffusion world model evaluates the learning policy (actions from
the policy, next states denoised by the model: Sec. 4.1, Algorithm 1 PE), and an importance-sampled update keeps
the model aligned with that policy as it drifts from the one that collected the data (Sec. 4.2, Eq. 3, IWU).

The file reads top to bottom: arguments, data, networks, losses, agents, world model, rollout (PE),
importance-sampled update (IWU), training loop, evaluation and diagnostics.

    python adept.py --env hopper --dataset random --agent sac                    # ADEPT-SAC
    python adept.py --env hopper --dataset random --agent sac --no-importance-sampling   # Diff+SAC
    python adept.py --env hopper --dataset random --agent sac --no-world-model   # SAC alone
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


# ==================================================================================================================
# Arguments. Defaults are the paper's: Table 3 (offline RL) and Table 2 (diffusion world model).
# ==================================================================================================================
@dataclass
class Args:
    # ---- experiment ----
    env: Literal["hopper", "halfcheetah", "walker2d"] = "hopper"
    """MuJoCo task, simulated by gymnasium's v5 environments"""
    dataset: Literal["random", "simple", "medium", "expert"] = "random"
    """`random` is built locally in the simulator (as D4RL's); the others are Minari's `mujoco/<env>/<name>-v0`"""
    agent: Literal["sac", "iql", "bc"] = "sac"
    """offline RL method that updates the policy pi_phi (Sec. 5: ADEPT wraps SAC or IQL; BC is ablation (3))"""
    seed: int = 0
    """seed of the networks, batches and evaluation episodes (the random dataset has its own fixed seed)"""
    cuda: bool = True
    """use CUDA when it is available"""
    threads: int = 0
    """torch CPU threads (0: torch's default); give each of several parallel runs 1"""
    output_dir: str = "runs"
    """runs go to <output-dir>/<run-name>/, pretrained world models to <output-dir>/world_models/"""
    run_name: str = ""
    """run folder name (empty: <env>-<dataset>-<adept|diff>-<agent>-s<seed>, or without the middle part when
    --no-world-model)"""
    resume: bool = False
    """continue the run in the run folder from its checkpoint"""

    # ---- data ----
    dataset_size: int = 1_000_000
    """transitions in a locally built `random` dataset (D4RL's random datasets hold 1M)"""

    # ---- offline RL (Table 3) ----
    total_steps: int = 1_000_000
    """policy gradient steps (Table 3: 1000 epochs x 1000 gradient steps)"""
    batch_size: int = 256
    """B_p, transitions per policy update (Table 3)"""
    lr: float = 3e-4
    """Adam learning rate of every network (Tables 2 and 3)"""
    gamma: float = 0.99
    """discount factor"""
    hidden: int = 256
    """hidden width of the actor and critic MLPs (two hidden layers)"""
    tau: float = 5e-3
    """soft target update rate. Table 3 lists SAC's 5e-3 and "alpha (IQL) 0.005"; IQL's own hyperparameters are
    tau (expectile) and beta (temperature), so we read that alpha as IQL's target update rate: the same 5e-3"""
    iql_expectile: float = 0.7
    """IQL expectile tau (Table 3)"""
    iql_temperature: float = 3.0
    """IQL advantage temperature beta (Table 3)"""
    eval_every: int = 5000
    """evaluate in the real simulator (and write metrics and the checkpoint) every this many policy steps"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic actions"""
    log_every: int = 1000
    """print progress every this many steps"""

    # ---- ADEPT: diffusion world model (Table 2) ----
    world_model: bool = True
    """train a world model and evaluate the policy in it (False: the agent alone on the dataset)"""
    importance_sampling: bool = True
    """adapt the world model to the policy with the importance-sampled update, Eq. 3 (False: Diff+<agent>,
    a model trained once before policy learning)"""
    world_model_steps: int = 1_000_000
    """pretraining steps of the world model, Algorithm 1's initialisation IWU(pi_D) (Table 2)"""
    world_model_batch_size: int = 256
    """pretraining batch (Table 2 "train batchsize")"""
    behavior_steps: int = 100_000
    """BC steps that fit the behavior policy pi_D used in the importance weights"""
    denoising_steps: int = 10
    """K, denoising steps of the DDPM (Table 2)"""
    cosine_s: float = 1e-4
    """offset s of the cosine noise schedule (Table 2)"""
    model_hidden: int = 256
    """hidden width of the noise model eps_theta and the reward model r_eta (Table 2)"""
    model_depth: int = 3
    """hidden layers of eps_theta (Table 2 "error model depth")"""
    guidance_weight: float = 0.1
    """classifier-free guidance w (Table 2); Eq. 2 is used with omega = 1 + w (Ho & Salimans), see README"""
    cond_drop_prob: float = 0.1
    """probability of dropping the condition (s, a) in training, so that one network also learns eps(x, null)"""
    horizon: int = 10
    """H, steps of a model rollout (Table 2)"""
    rollout_every: int = 250
    """policy steps between two batched policy evaluations (PE) in the model"""
    rollout_batch_size: int = 250
    """rollouts per PE, from random dataset states; with --rollout-every 250 this is Algorithm 1's one rollout
    per policy step, batched"""
    model_buffer_size: int = 1_000_000
    """capacity of the model buffer D_hat (Table 3 replay buffer size)"""
    model_ratio: float = 0.5
    """fraction of each policy batch drawn from D_hat (the rest from D)"""
    is_batch_size: int = 1024
    """B_m, dataset transitions per importance-sampled update (Table 2)"""
    iwu_every: int = 1
    """policy steps between two importance-sampled world-model updates (Algorithm 1: after every policy update)"""
    is_max_weight: float = 10.0
    """importance weights are truncated at this value (after self-normalization)"""
    is_self_normalize: bool = True
    """divide the weights by their batch mean (computed as a softmax in log space) before truncation"""
    diag_samples: int = 256
    """dataset states used for the return-gap diagnostics and the simulator check at each evaluation"""


ENVS = {  # gymnasium id, D4RL reference returns (random, expert), observation clips velocities at +-10
    "hopper": ("Hopper-v5", -20.272305, 3234.3, True),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0, False),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3, True),
}
DATA_SEED = 0  # everyone who builds a random dataset gets the same one


class UserError(Exception):
    """Bad input (arguments, missing or unreadable data): printed as one line, exit code 2, no traceback."""


def check_args(args: Args) -> None:
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.type in ("int", int) and f.name not in ("seed", "threads") and value <= 0:
            raise UserError(f"--{f.name.replace('_', '-')} must be positive, got {value}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    for name in ("lr", "tau", "is_max_weight", "iql_temperature"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name, lo, hi in (("gamma", 0, 1), ("model_ratio", 0, 1), ("cond_drop_prob", 0, 1), ("iql_expectile", 0, 1)):
        if not lo <= getattr(args, name) <= hi:
            raise UserError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {getattr(args, name)}")


class Progress:
    """Prints `[name] step/total | rate/s | ETA | values` every `every` steps; the rate is windowed."""

    def __init__(self, name: str, total: int, every: int, start: int = 0):
        self.name, self.total, self.every = name, total, max(1, every)
        self.restart(start)

    def restart(self, step: int) -> None:  # begin a new window (after a pause such as an evaluation)
        self.last_step, self.last_time = step, time.perf_counter()

    def update(self, step: int, values: dict | None = None) -> None:
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = " ".join(f"{k} {float(v):.3g}" for k, v in (values or {}).items())
        print(f"[{self.name}] {step}/{self.total} | {rate:.0f}/s | ETA {eta / 60:.1f} min | {extra}", flush=True)
        self.restart(step)


# ==================================================================================================================
# Data: Minari datasets flattened to transitions, states z-scored with the dataset's statistics.
# ==================================================================================================================
def dataset_id(env: str, dataset: str, size: int) -> str:
    # Locally built data lives in our own namespace, never in Minari's official `mujoco/` one.
    return f"adept/{env}/random-{size}-v0" if dataset == "random" else f"mujoco/{env}/{dataset}-v0"


def build_random_dataset(env: str, size: int, ds_id: str) -> dict[str, np.ndarray]:
    """D4RL's recipe for random data: a uniform random policy in the real simulator, `size` transitions."""
    from minari.data_collector import EpisodeBuffer

    gym_id, ref_min, ref_max, _ = ENVS[env]
    sim = gym.make(gym_id)
    sim.action_space.seed(DATA_SEED)
    obs, _ = sim.reset(seed=DATA_SEED)
    episodes, ep = [], {"obs": [obs], "act": [], "rew": [], "term": [], "trunc": []}
    progress = Progress(f"collect {ds_id}", size, max(1, size // 10))
    for t in range(1, size + 1):
        action = sim.action_space.sample()
        obs, reward, terminated, truncated, _ = sim.step(action)
        truncated = truncated or (t == size and not terminated)  # the last, cut episode must bootstrap
        for key, value in zip(ep, (obs, action, reward, terminated, truncated)):
            ep[key].append(value)
        if terminated or truncated:
            episodes.append(EpisodeBuffer(
                id=len(episodes), observations=np.array(ep["obs"]), actions=np.array(ep["act"]),
                rewards=ep["rew"], terminations=ep["term"], truncations=ep["trunc"]))
            obs, _ = sim.reset()
            ep = {"obs": [obs], "act": [], "rew": [], "term": [], "trunc": []}
        progress.update(t)
    print(f"writing {len(episodes)} episodes to {minari.storage.get_dataset_path(ds_id)}", flush=True)
    with warnings.catch_warnings():  # Minari nags about optional metadata (author e-mail, code link)
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            ds_id, episodes, env=gym_id, eval_env=gym_id, algorithm_name="uniform random policy", author="adept.py",
            ref_min_score=ref_min, ref_max_score=ref_max, data_format="hdf5",
            description=f"{size} transitions of a uniform random policy in {gym_id} (seed {DATA_SEED}), as D4RL's "
                        "random datasets; reference scores are D4RL's.")
    return flatten(episodes)


def flatten(episodes) -> dict[str, np.ndarray]:
    """Episodes (Minari's EpisodeData or EpisodeBuffer) -> transition arrays obs[t], act[t], rew[t], obs[t+1], with
    terminations and truncations kept apart (a truncated step must still bootstrap)."""
    episodes = list(episodes)
    data = {
        "obs": np.concatenate([e.observations[:-1] for e in episodes]),
        "act": np.concatenate([e.actions for e in episodes]),
        "rew": np.concatenate([e.rewards for e in episodes]),
        "next_obs": np.concatenate([e.observations[1:] for e in episodes]),
        "terminal": np.concatenate([e.terminations for e in episodes]),
        "timeout": np.concatenate([e.truncations for e in episodes]),
    }
    return {k: v.astype(np.float32) for k, v in data.items()}


def load_transitions(args: Args) -> tuple[dict[str, np.ndarray], float, float]:
    """The dataset as flat transition arrays, and its reference returns (random, expert) for normalized scores."""
    ds_id = dataset_id(args.env, args.dataset, args.dataset_size)
    path = minari.storage.get_dataset_path(ds_id)
    data = None
    if not (path / "data").exists():
        if args.dataset == "random":
            data = build_random_dataset(args.env, args.dataset_size, ds_id)
        else:
            try:  # Minari's download needs its `hf` extra and the network; offline it fails after ~20 s of retries
                minari.download_dataset(ds_id)
            except Exception as e:
                raise UserError(
                    f"dataset {ds_id} is not in the local Minari store ({path.parent}, set by MINARI_DATASETS_PATH)"
                    f" and could not be downloaded ({type(e).__name__}). Download it where there is network, or "
                    f"use --dataset random, which is built locally and works offline.") from None
    t0 = time.perf_counter()
    try:
        ds = minari.load_dataset(ds_id)
        meta = ds.storage.metadata
        # Reading 45k small HDF5 episode groups takes ~25 s, so a flat copy of the transitions sits beside Minari's
        # files, stamped with their sizes and times: a changed (or corrupt) data file invalidates it.
        files = sorted((path / "data").iterdir())
        stamp = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
        flat, cached = path / "transitions.npz", None
        if flat.exists():
            with np.load(flat) as z:
                if str(z["stamp"]) == stamp:
                    cached = {k: z[k] for k in z.files if k != "stamp"}
        if data is None:
            data = cached if cached is not None else flatten(ds.iterate_episodes())
        if cached is None:
            np.savez(flat, stamp=stamp, **data)
    except Exception as e:
        raise UserError(f"dataset {ds_id} at {path} is unreadable ({type(e).__name__}: {e}); delete that folder "
                        "to rebuild (random) or download it again") from None
    if not len(data["obs"]):
        raise UserError(f"dataset {ds_id} at {path} holds no transitions")
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    source = "dataset metadata"
    if ref_min is None or ref_max is None:
        ref_min, ref_max, source = ENVS[args.env][1], ENVS[args.env][2], "D4RL"
    print(f"dataset {ds_id}: {meta.get('total_episodes')} episodes, {len(data['obs'])} transitions, loaded in "
          f"{time.perf_counter() - t0:.1f} s; reference returns random {ref_min:.6g} / expert {ref_max:.6g} "
          f"(from {source})", flush=True)
    return data, float(ref_min), float(ref_max)


class Normalizer(nn.Module):
    """z-scores states with the dataset's mean and std (buffers, so they travel with .to() and checkpoints)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32) + eps)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return (s - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class Buffer:
    """Transitions (s, a, r, s2, d) as preallocated tensors on the device: the dataset D, or the ring buffer D_hat."""

    FIELDS = ("s", "a", "r", "s2", "d")

    def __init__(self, capacity: int, s_dim: int, a_dim: int, device: torch.device):
        dims = {"s": s_dim, "a": a_dim, "r": None, "s2": s_dim, "d": None}
        self.data = {k: torch.empty((capacity,) + ((d,) if d else ()), device=device) for k, d in dims.items()}
        self.capacity, self.size, self.ptr = capacity, 0, 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        n = len(batch["s"])
        idx = (self.ptr + torch.arange(n, device=batch["s"].device)) % self.capacity
        for k in self.FIELDS:
            self.data[k][idx] = batch[k]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), device=self.data["s"].device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"ptr": self.ptr, "size": self.size, **{k: v[: self.size].cpu() for k, v in self.data.items()}}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.FIELDS:
            self.data[k][: sd["size"]] = sd[k].to(self.data[k].device)
        self.ptr, self.size = sd["ptr"], sd["size"]


def dataset_buffer(data: dict[str, np.ndarray], normalizer: Normalizer, device: torch.device) -> Buffer:
    """D with normalized states; only terminations stop bootstrapping (timeouts do not)."""
    t = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    buf = Buffer(len(data["obs"]), t["obs"].shape[1], t["act"].shape[1], device)
    buf.add({"s": normalizer(t["obs"]), "a": t["act"], "r": t["rew"], "s2": normalizer(t["next_obs"]),
             "d": t["terminal"]})
    return buf


# ==================================================================================================================
# Networks
# ==================================================================================================================
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(inp: int, out: int, hidden: int, n_hidden: int = 2, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers, d = [], inp
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, out))


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, exp(log_std)^2), summed over the last (action) dimension: (B, A) -> (B,)."""
    return (-0.5 * ((x - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class GaussianActor(nn.Module):
    """pi(a|s) = N(tanh(mu(s)), sigma(s)^2): IQL's and BC's policy, and the behavior-policy estimator pi_D.
    Its density is finite for every action, including dataset actions at exactly +-1."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(s_dim, 2 * a_dim, hidden)

    def params(self, s):
        mu, log_std = self.net(s).chunk(2, -1)
        return torch.tanh(mu), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def log_prob(self, s, a):
        return gaussian_log_prob(a, *self.params(s))

    def sample(self, s):  # -> a (B, A), log pi(a|s) (B,)
        mu, log_std = self.params(s)
        a = mu + log_std.exp() * torch.randn_like(mu)
        return a, gaussian_log_prob(a, mu, log_std)

    def act(self, s, deterministic: bool = False):
        return (self.params(s)[0] if deterministic else self.sample(s)[0]).clamp(-1.0, 1.0)


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """sum log(1 - tanh(u)^2), the change of variables of a = tanh(u), in a form that is stable for large |u|."""
    return (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class TanhGaussianActor(GaussianActor):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)): SAC's squashed policy."""

    def params(self, s):
        mu, log_std = self.net(s).chunk(2, -1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def log_prob(self, s, a):
        # The squashed density is infinite at |a| = 1; keep dataset actions a hair inside the bounds.
        u = torch.atanh(a.clamp(-1.0 + 1e-4, 1.0 - 1e-4))
        return gaussian_log_prob(u, *self.params(s)) - tanh_log_det(u)

    def sample(self, s):
        mu, log_std = self.params(s)
        u = mu + log_std.exp() * torch.randn_like(mu)  # reparameterized
        return torch.tanh(u), gaussian_log_prob(u, mu, log_std) - tanh_log_det(u)

    def act(self, s, deterministic: bool = False):
        return torch.tanh(self.params(s)[0]) if deterministic else self.sample(s)[0]


class TwinQ(nn.Module):
    """Q_1(s, a), Q_2(s, a) -> (2, B), for clipped double-Q learning."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int):
        super().__init__()
        self.q1, self.q2 = mlp(s_dim + a_dim, 1, hidden), mlp(s_dim + a_dim, 1, hidden)

    def forward(self, s, a):
        x = torch.cat([s, a], -1)
        return torch.stack([self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)])


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    for tp, p in zip(target.parameters(), source.parameters()):
        tp.lerp_(p, tau)  # tp <- (1 - tau) tp + tau p


# ==================================================================================================================
# Losses: one small function each, on plain tensors.
# ==================================================================================================================
def sac_target(r, d, q_next, logp_next, alpha, gamma):
    """Soft Bellman target y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s')), a' ~ pi(s')."""
    return r + gamma * (1.0 - d) * (q_next - alpha * logp_next)


def critic_loss(q_pred, target):
    """Sum over the twin critics of the mean squared TD error: q_pred (2, B), target (B,)."""
    return ((q_pred - target) ** 2).mean(-1).sum()


def sac_actor_loss(q_pi, logp, alpha):
    """E[alpha log pi(a|s) - min_j Q_j(s, a)], a ~ pi(s) reparameterized."""
    return (alpha * logp - q_pi).mean()


def sac_alpha_loss(log_alpha, logp, target_entropy):
    """Automatic entropy tuning: drives E[-log pi] towards the target entropy (-|A|)."""
    return -(log_alpha.exp() * (logp + target_entropy).detach()).mean()


def expectile_loss(diff, expectile):
    """IQL value loss L_2^tau(u) = |tau - 1(u < 0)| u^2 with u = Q(s, a) - V(s): an upper expectile of Q."""
    return (torch.abs(expectile - (diff < 0).float()) * diff**2).mean()


def iql_q_target(r, d, v_next, gamma):
    """IQL's Q target r + gamma (1 - d) V(s')."""
    return r + gamma * (1.0 - d) * v_next


def awr_actor_loss(logp, adv, temperature, max_weight=100.0):
    """IQL's advantage-weighted regression: -E[exp(beta A) log pi(a|s)], exp clamped at 100 as in IQL."""
    return -(torch.exp(temperature * adv).clamp(max=max_weight) * logp).mean()


def bc_loss(logp):
    """Behavior cloning by maximum likelihood: -E[log pi(a|s)]."""
    return -logp.mean()


# ==================================================================================================================
# Agents: the offline RL methods that improve pi_phi ("Update phi with B via offline RL methods", Algorithm 1).
# ==================================================================================================================
def adam(params, lr):
    return torch.optim.Adam(params, lr=lr, fused=True)  # fused: ~10% faster steps on CPU as well


def gradient_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Agent:
    """Networks, optimizers and tensors of a learner, saved and restored as one dict."""

    actor: GaussianActor

    def state_dict(self) -> dict:
        return {k: v.detach().clone() if torch.is_tensor(v) else v.state_dict()
                for k, v in vars(self).items() if torch.is_tensor(v) or hasattr(v, "state_dict")}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            own = getattr(self, k)
            own.data.copy_(v) if torch.is_tensor(own) else own.load_state_dict(v)


class SAC(Agent):
    """Soft actor-critic (Haarnoja et al. 2018): twin Q, target networks, automatic entropy tuning."""

    def __init__(self, s_dim, a_dim, args: Args, device):
        self.actor = TanhGaussianActor(s_dim, a_dim, args.hidden).to(device)
        self.q = TwinQ(s_dim, a_dim, args.hidden).to(device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)
        self.actor_opt, self.q_opt = adam(self.actor.parameters(), args.lr), adam(self.q.parameters(), args.lr)
        self.alpha_opt = adam([self.log_alpha], args.lr)
        self.target_entropy, self.gamma, self.tau = -float(a_dim), args.gamma, args.tau

    def update(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = self.actor.sample(b["s2"])
            y = sac_target(b["r"], b["d"], self.q_target(b["s2"], a2).min(0).values, logp2, alpha, self.gamma)
        q_loss = critic_loss(self.q(b["s"], b["a"]), y)
        gradient_step(self.q_opt, q_loss)

        a, logp = self.actor.sample(b["s"])
        pi_loss = sac_actor_loss(self.q(b["s"], a).min(0).values, logp, alpha)
        gradient_step(self.actor_opt, pi_loss)

        alpha_loss = sac_alpha_loss(self.log_alpha, logp, self.target_entropy)
        gradient_step(self.alpha_opt, alpha_loss)
        soft_update(self.q_target, self.q, self.tau)
        return {"q_loss": q_loss.detach(), "pi_loss": pi_loss.detach(), "alpha": alpha}


class IQL(Agent):
    """Implicit Q-learning (Kostrikov et al. 2021): expectile value, Q to r + gamma V(s'), AWR actor."""

    def __init__(self, s_dim, a_dim, args: Args, device):
        self.actor = GaussianActor(s_dim, a_dim, args.hidden).to(device)
        self.q = TwinQ(s_dim, a_dim, args.hidden).to(device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = mlp(s_dim, 1, args.hidden).to(device)
        self.actor_opt, self.q_opt = adam(self.actor.parameters(), args.lr), adam(self.q.parameters(), args.lr)
        self.v_opt = adam(self.v.parameters(), args.lr)
        self.gamma, self.tau = args.gamma, args.tau
        self.expectile, self.temperature = args.iql_expectile, args.iql_temperature

    def update(self, b):
        with torch.no_grad():
            q_t = self.q_target(b["s"], b["a"]).min(0).values
            v_next = self.v(b["s2"]).squeeze(-1)
        v = self.v(b["s"]).squeeze(-1)
        v_loss = expectile_loss(q_t - v, self.expectile)
        gradient_step(self.v_opt, v_loss)

        q_loss = critic_loss(self.q(b["s"], b["a"]), iql_q_target(b["r"], b["d"], v_next, self.gamma))
        gradient_step(self.q_opt, q_loss)

        pi_loss = awr_actor_loss(self.actor.log_prob(b["s"], b["a"]), (q_t - v).detach(), self.temperature)
        gradient_step(self.actor_opt, pi_loss)
        soft_update(self.q_target, self.q, self.tau)
        return {"v_loss": v_loss.detach(), "q_loss": q_loss.detach(), "pi_loss": pi_loss.detach()}


class BC(Agent):
    """Behavior cloning with a Gaussian policy; the same estimator gives pi_D for the importance weights."""

    def __init__(self, s_dim, a_dim, args: Args, device):
        self.actor = GaussianActor(s_dim, a_dim, args.hidden).to(device)
        self.actor_opt = adam(self.actor.parameters(), args.lr)

    def update(self, b):
        loss = bc_loss(self.actor.log_prob(b["s"], b["a"]))
        gradient_step(self.actor_opt, loss)
        return {"bc_loss": loss.detach()}


AGENTS = {"sac": SAC, "iql": IQL, "bc": BC}


# ==================================================================================================================
# World model M_{theta,eta}: a classifier-free guided DDPM over the normalized next state (Sec. 3, Eq. 1-2),
# conditioned on (s, a), and a reward/terminal model r_eta(s, a, s') (Sec. 4.1).
# ==================================================================================================================
def cosine_schedule(K: int, s: float) -> dict[str, torch.Tensor]:
    """Cosine noise schedule (Nichol & Dhariwal 2021): alpha_bar_k = f(k)/f(0), f(k) = cos^2((k/K + s)/(1 + s) pi/2),
    beta_k = 1 - alpha_bar_k/alpha_bar_{k-1} clipped at 0.999. Index k-1 holds step k = 1..K."""
    f = torch.cos((torch.arange(K + 1, dtype=torch.float64) / K + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    alphas = 1 - betas
    alpha_bar = torch.cumprod(alphas, 0)  # recomputed from the clipped betas, so alpha_bar_K > 0
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    sched = {
        "betas": betas, "alphas": alphas, "alpha_bar": alpha_bar,
        "post_var": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),        # Sigma_k of Eq. 1
        "post_c0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),        # posterior mean = c0 x_0 + ck x_k
        "post_ck": alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
    }
    return {k: v.float() for k, v in sched.items()}


class WorldModel(nn.Module):
    """eps_theta(x_k, k | s, a) and r_eta(s, a, s'). States are normalized; rewards are raw."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int = 256, depth: int = 3, K: int = 10, cosine_s: float = 1e-4,
                 guidance_weight: float = 0.1, cond_drop_prob: float = 0.1, t_dim: int = 32):
        super().__init__()
        self.s_dim, self.K, self.w, self.p_drop = s_dim, K, guidance_weight, cond_drop_prob
        self.t_embed = nn.Embedding(K, t_dim)  # learned timestep embedding, one vector per k
        # input: x_k, condition (s, a) or zeros, a flag saying whether the condition is present, embed(k)
        self.eps_net = mlp(s_dim + (s_dim + a_dim) + 1 + t_dim, s_dim, hidden, depth, nn.SiLU)
        self.reward_net = mlp(s_dim + a_dim + s_dim, 2, hidden, 2, nn.SiLU)  # -> reward, terminal logit
        for k, v in cosine_schedule(K, cosine_s).items():
            self.register_buffer(k, v)
        # Ranges of the data (set by set_ranges): generated states and rewards are clipped to them (Sec. 4.1).
        self.register_buffer("s_lo", torch.full((s_dim,), -torch.inf))
        self.register_buffer("s_hi", torch.full((s_dim,), torch.inf))
        self.register_buffer("r_lo", torch.tensor(-torch.inf))
        self.register_buffer("r_hi", torch.tensor(torch.inf))

    def set_ranges(self, s2: torch.Tensor, r: torch.Tensor) -> None:
        self.s_lo.copy_(s2.min(0).values), self.s_hi.copy_(s2.max(0).values)
        self.r_lo.copy_(r.min()), self.r_hi.copy_(r.max())

    def eps(self, x_k, k, cond, has_cond):
        """eps_theta(x_k, k | cond); has_cond (B, 1) is 0 where the condition is the null token."""
        return self.eps_net(torch.cat([x_k, cond * has_cond, has_cond, self.t_embed(k - 1)], -1))

    def reward_terminal_logits(self, s, a, s2):
        r, d_logit = self.reward_net(torch.cat([s, a, s2], -1)).unbind(-1)
        return r, d_logit

    def loss_per_sample(self, s, a, r, d, s2) -> torch.Tensor:
        """l_i of Algorithm 1 (IWU): ||eps - eps_theta(s_noise, (s, a), k)||^2 + (r - r_eta)^2, plus the terminal's
        cross-entropy. The eps error is averaged over state dimensions. -> (B,)"""
        B = s.shape[0]
        k = torch.randint(1, self.K + 1, (B,), device=s.device)           # k ~ Uniform{1..K}
        noise = torch.randn_like(s2)
        ab = self.alpha_bar[k - 1].unsqueeze(-1)
        x_k = ab.sqrt() * s2 + (1 - ab).sqrt() * noise                     # s_noise
        has_cond = (torch.rand(B, 1, device=s.device) >= self.p_drop).float()  # classifier-free: drop (s, a)
        eps_loss = ((noise - self.eps(x_k, k, torch.cat([s, a], -1), has_cond)) ** 2).mean(-1)
        r_pred, d_logit = self.reward_terminal_logits(s, a, s2)
        term_loss = F.binary_cross_entropy_with_logits(d_logit, d, reduction="none")
        return eps_loss + (r - r_pred) ** 2 + term_loss

    @torch.no_grad()
    def sample(self, s, a) -> torch.Tensor:
        """s' ~ P_theta(.|s, a) by K guided denoising steps (Eq. 1-2). (B, S), (B, A) -> (B, S), in the data's range."""
        B = s.shape[0]
        cond = torch.cat([s, a], -1).repeat(2, 1)                          # conditional and null rows, one pass
        has_cond = torch.cat([torch.ones(B, 1), torch.zeros(B, 1)]).to(s)
        omega = 1.0 + self.w                                               # guidance weight of Eq. 2
        x = torch.randn(B, self.s_dim, device=s.device)                   # x_K ~ N(0, I)
        for k in range(self.K, 0, -1):
            kk = torch.full((2 * B,), k, device=s.device, dtype=torch.long)
            e_cond, e_null = self.eps(x.repeat(2, 1), kk, cond, has_cond).chunk(2)
            e = e_null + omega * (e_cond - e_null)                         # Eq. 2
            ab = self.alpha_bar[k - 1]
            # mu_theta of Eq. 1, written through the predicted x_0. Clipping x_0 to the data's range keeps the first
            # steps stable: with alpha_bar_K ~ 2e-5, Eq. 1 multiplies eps errors by 1/sqrt(alpha_K) ~ 32.
            x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(self.s_lo, self.s_hi)
            x = self.post_c0[k - 1] * x0 + self.post_ck[k - 1] * x
            if k > 1:
                x = x + self.post_var[k - 1].sqrt() * torch.randn_like(x)
        return x.clamp(self.s_lo, self.s_hi)

    @torch.no_grad()
    def reward_terminal(self, s, a, s2):
        """r_hat clipped to the data's reward range (Sec. 4.1), terminal d = sigmoid(logit) > 1/2."""
        r, d_logit = self.reward_terminal_logits(s, a, s2)
        return r.clamp(self.r_lo, self.r_hi), d_logit > 0


def world_model_update(wm: WorldModel, opt, b: dict[str, torch.Tensor], w: torch.Tensor | None = None):
    """One gradient step on L(theta, eta) = 1/N sum_i w_i l_i (Eq. 3); w = None is pretraining (pi = pi_D, w = 1)."""
    l = wm.loss_per_sample(b["s"], b["a"], b["r"], b["d"], b["s2"])
    loss = l.mean() if w is None else weighted_loss(l, w)
    gradient_step(opt, loss)
    return loss.detach()


def pretrain(args: Args, D: Buffer, s_dim: int, a_dim: int, device, cache_dir: Path):
    """Algorithm 1's initialisation: fit pi_D by BC, then the world model with unit weights, IWU(pi_D, D).
    Cached on disk under a key of the settings that shape it, so a rerun (or the no-IS ablation) reuses it."""
    keys = ("env", "dataset", "dataset_size", "seed", "world_model_steps", "world_model_batch_size",
            "behavior_steps", "batch_size", "denoising_steps", "cosine_s", "model_hidden", "model_depth",
            "cond_drop_prob", "lr", "hidden")
    settings = {k: getattr(args, k) for k in keys}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir / f"{args.env}-{args.dataset}-s{args.seed}-{key}.pt"
    wm = WorldModel(s_dim, a_dim, args.model_hidden, args.model_depth, args.denoising_steps, args.cosine_s,
                    args.guidance_weight, args.cond_drop_prob).to(device)
    wm.set_ranges(D.data["s2"][: D.size], D.data["r"][: D.size])
    wm_opt = adam(wm.parameters(), args.lr)
    pi_D = BC(s_dim, a_dim, args, device)
    ck = None
    if path.exists():
        try:
            ck = torch.load(path, map_location=device)
        except Exception as e:  # a file cut short by a crash: train again rather than fail
            print(f"cached world model {path} is unreadable ({type(e).__name__}); training it again", flush=True)
    if ck is not None:
        wm.load_state_dict(ck["wm"]), wm_opt.load_state_dict(ck["wm_opt"]), pi_D.load_state_dict(ck["pi_D"])
        print(f"loaded pretrained world model and pi_D from {path}", flush=True)
        return wm, wm_opt, pi_D.actor, 0
    progress = Progress("behavior policy pi_D", args.behavior_steps, args.log_every)
    for step in range(1, args.behavior_steps + 1):
        progress.update(step, pi_D.update(D.sample(args.batch_size)))
    progress = Progress("world model", args.world_model_steps, args.log_every)
    for step in range(1, args.world_model_steps + 1):
        progress.update(step, {"loss": world_model_update(wm, wm_opt, D.sample(args.world_model_batch_size))})
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"wm": wm.state_dict(), "wm_opt": wm_opt.state_dict(), "pi_D": pi_D.state_dict(),
                 "settings": settings}, path)
    print(f"saved pretrained world model to {path}", flush=True)
    return wm, wm_opt, pi_D.actor, args.world_model_steps


# ==================================================================================================================
# Policy evaluation in the model (Algorithm 1, PE): batched rollouts of H steps from random dataset states.
# ==================================================================================================================
@torch.no_grad()
def rollout(wm: WorldModel, policy: GaussianActor, s0: torch.Tensor, horizon: int,
            deterministic: bool = False) -> dict[str, torch.Tensor]:
    """a_t ~ pi(s_t), s_{t+1} by guided denoising, (r_t, d_t) = r_eta(s_t, a_t, s_{t+1}); a rollout stops at its
    terminal. Returns (B, H, .) tensors and `valid` (B, H), False for steps after a terminal."""
    B, H = s0.shape[0], horizon
    out = {k: [] for k in Buffer.FIELDS}
    valid, alive = [], torch.ones(B, dtype=torch.bool, device=s0.device)
    s = s0
    for _ in range(H):
        a = policy.act(s, deterministic)
        s2 = wm.sample(s, a)
        r, d = wm.reward_terminal(s, a, s2)
        for k, v in zip(Buffer.FIELDS, (s, a, r, s2, d.float())):
            out[k].append(v)
        valid.append(alive)
        alive = alive & ~d
        s = s2
    return {**{k: torch.stack(v, 1) for k, v in out.items()}, "valid": torch.stack(valid, 1)}


def policy_batch(D: Buffer, D_hat: Buffer, n: int, model_ratio: float) -> dict[str, torch.Tensor]:
    """B ~ D U D_hat: a fixed fraction of the batch from the model buffer once it holds data."""
    n_model = round(n * model_ratio) if D_hat is not None and D_hat.size > 0 else 0
    if n_model == 0:
        return D.sample(n)
    real, fake = D.sample(n - n_model), D_hat.sample(n_model)
    return {k: torch.cat([real[k], fake[k]]) for k in Buffer.FIELDS}


# ==================================================================================================================
# Importance-sampled world-model update (Algorithm 1, IWU; Eq. 3)
# ==================================================================================================================
@torch.no_grad()
def importance_weights(pi, pi_D, s, a, max_weight: float = 10.0, self_normalize: bool = True) -> torch.Tensor:
    """w_i = pi_phi(a_i|s_i) / pi_D(a_i|s_i) (Eq. 3), computed in log space. The raw ratio of two densities over a
    3-6 dimensional action space spans many orders of magnitude, so by default it is self-normalized (w / mean w, as a
    softmax of the log ratios, which also cancels any constant offset) and truncated at max_weight."""
    log_w = pi.log_prob(s, a) - pi_D.log_prob(s, a)
    log_w = torch.nan_to_num(log_w, nan=0.0, posinf=50.0, neginf=-50.0)
    if self_normalize:
        w = torch.softmax(log_w, 0) * len(log_w)
    else:
        w = log_w.clamp(max=50.0).exp()
    # Weights below 1e-8 change the loss by less than 1e-8 of its value, but as subnormal floats (a narrow policy
    # gives many weights near 1e-40) they made the backward pass 2.5x slower on CPU: set them to exactly 0.
    return torch.where(w < 1e-8, 0.0, w.clamp(max=max_weight))


def weighted_loss(l: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """L(theta, eta) = 1/N sum_i w_i l_i (Eq. 3)."""
    return (w * l).mean()


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 / N in (0, 1]: the share of the batch the weighted loss effectively uses."""
    return w.sum() ** 2 / (w**2).sum().clamp_min(1e-12) / len(w)


# ==================================================================================================================
# Training loop (Algorithm 1)
# ==================================================================================================================
METRICS = ["step", "return", "return_std", "normalized_score", "normalized_score_std", "train_steps_per_second",
           "wall_seconds", "eps_r", "eps_m", "eps_pi", "return_gap_bound", "is_ess", "sim_state_error",
           "sim_reward_error", "sim_state_error_h", "sim_states"]


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename, so a crash never leaves a half-written file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_name(args: Args) -> str:
    if args.run_name:
        return args.run_name
    mode = "" if not args.world_model else ("adept-" if args.importance_sampling else "diff-")
    return f"{args.env}-{args.dataset}-{mode}{args.agent}-s{args.seed}"


def main(args: Args) -> dict:
    check_args(args)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal floats are ~100x slower on x86 CPUs; none of our numbers need them
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    run_dir = Path(args.output_dir) / run_name(args)
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {device} | run folder: {run_dir}", flush=True)

    # ---- data (Algorithm 1: "Normalize the dataset D") ----
    data, ref_min, ref_max = load_transitions(args)
    s_dim, a_dim = data["obs"].shape[1], data["act"].shape[1]
    normalizer = Normalizer(data["obs"].mean(0), data["obs"].std(0)).to(device)
    D = dataset_buffer(data, normalizer, device)
    r_max = float(np.abs(data["rew"]).max())
    gym_id, _, _, clips_velocity = ENVS[args.env]
    eval_envs = [gym.make(gym_id) for _ in range(args.eval_episodes)]

    # ---- agent, world model, pi_D (Algorithm 1: initialise pi_phi; initialise M with D and pi_D) ----
    agent = AGENTS[args.agent](s_dim, a_dim, args, device)
    counts = {"policy_updates": 0, "rollouts": 0, "model_transitions": 0, "iwu_updates": 0, "evaluations": 0,
              "checkpoints": 0, "world_model_pretrain_steps": 0}
    wm = wm_opt = pi_D = D_hat = None
    if args.world_model:
        wm, wm_opt, pi_D, counts["world_model_pretrain_steps"] = pretrain(
            args, D, s_dim, a_dim, device, Path(args.output_dir) / "world_models")
        D_hat = Buffer(args.model_buffer_size, s_dim, a_dim, device)
    adapt = args.world_model and args.importance_sampling

    start_step, history = 0, []
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        agent.load_state_dict(ck["agent"])
        if wm is not None:
            wm.load_state_dict(ck["wm"]), wm_opt.load_state_dict(ck["wm_opt"]), D_hat.load_state_dict(ck["D_hat"])
        torch.set_rng_state(ck["rng"])
        start_step, history, counts = ck["step"], ck["history"], {**counts, **ck["counts"]}
        print(f"resumed from {ckpt_path} at step {start_step}", flush=True)

    # ---- closed loop: PE -> policy update -> IWU, per gradient step ----
    progress = Progress("train", args.total_steps, args.log_every, start_step)
    warmup = start_step + min(1000, max(0, (args.total_steps - start_step) // 10))  # steps left out of the speed
    train_time, rollout_time, timed_steps, rolled = 0.0, 0.0, 0, 0  # speed of this process (a resume restarts it)
    last = {}
    for step in range(start_step + 1, args.total_steps + 1):
        t0 = time.perf_counter()
        if wm is not None and (step - 1) % args.rollout_every == 0:  # PE(M_{theta,eta}, pi_phi) into D_hat
            t_r = time.perf_counter()
            roll = rollout(wm, agent.actor, D.sample(args.rollout_batch_size)["s"], args.horizon)
            D_hat.add({k: roll[k][roll["valid"]] for k in Buffer.FIELDS})
            n_valid = int(roll["valid"].sum())
            counts["rollouts"] += args.rollout_batch_size
            counts["model_transitions"] += n_valid
            rolled += n_valid
            rollout_time += time.perf_counter() - t_r
        last = agent.update(policy_batch(D, D_hat, args.batch_size, args.model_ratio))  # update phi with B
        counts["policy_updates"] += 1
        if adapt and step % args.iwu_every == 0:  # IWU(pi_phi, D, theta, eta)
            b = D.sample(args.is_batch_size)
            w = importance_weights(agent.actor, pi_D, b["s"], b["a"], args.is_max_weight, args.is_self_normalize)
            last["wm_loss"] = world_model_update(wm, wm_opt, b, w)
            counts["iwu_updates"] += 1
        if step > warmup:
            train_time += time.perf_counter() - t0
            timed_steps += 1
        progress.update(step, last)

        if step % args.eval_every == 0 or step == args.total_steps:
            returns = evaluate(agent.actor, normalizer, eval_envs, seed=10_000 + args.seed * 1000)
            scores = normalized_score(returns, ref_min, ref_max)
            row = {"step": step, "return": returns.mean(), "return_std": returns.std(),
                   "normalized_score": scores.mean(), "normalized_score_std": scores.std(),
                   "train_steps_per_second": timed_steps / train_time if train_time else float("nan"),
                   "wall_seconds": time.perf_counter() - t_start}
            if wm is not None:
                b = D.sample(args.diag_samples)
                row.update(return_gap_diagnostics(wm, agent.actor, pi_D, b, args.gamma, r_max, args.is_max_weight,
                                                  args.is_self_normalize))
                row.update(simulator_errors(wm, agent.actor, normalizer, eval_envs[0],
                                            normalizer.inverse(b["s"]).cpu().numpy(), args.horizon, clips_velocity))
            history.append({k: int(v) if k in ("step", "sim_states") else float(v) for k, v in row.items()})
            counts["evaluations"] += 1
            print(f"[eval] step {step} " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"), flush=True)
            with open(run_dir / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, METRICS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(history)
            counts["checkpoints"] += 1
            atomic_save({"step": step, "agent": agent.state_dict(), "history": history, "counts": counts,
                         "rng": torch.get_rng_state(), "normalizer": normalizer.state_dict(),
                         "args": dataclasses.asdict(args),
                         **({"wm": wm.state_dict(), "wm_opt": wm_opt.state_dict(), "D_hat": D_hat.state_dict()}
                            if wm is not None else {})}, ckpt_path)
            progress.restart(step)  # keep evaluation time out of the windowed speed

    # ---- summary ----
    final = history[-1]
    last3 = [h["normalized_score"] for h in history[-3:]]
    summary = {
        "env": args.env, "dataset": args.dataset, "agent": args.agent, "seed": args.seed,
        "mode": "adept" if adapt else ("diff" if args.world_model else "none"),
        "total_steps": args.total_steps, "normalized_score": final["normalized_score"],
        "normalized_score_std": final["normalized_score_std"], "normalized_score_last3": float(np.mean(last3)),
        "return": final["return"], "return_std": final["return_std"],
        "reference_returns": {"random": ref_min, "expert": ref_max},
        "train_steps_per_second": timed_steps / train_time if train_time else float("nan"),
        "rollout_transitions_per_second": rolled / rollout_time if rollout_time else None,
        "wall_seconds": time.perf_counter() - t_start, "device": str(device), "counts": counts,
        **{k: final.get(k) for k in METRICS[7:]}, "args": dataclasses.asdict(args),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"final normalized score {summary['normalized_score']:.1f} +- {summary['normalized_score_std']:.1f} "
          f"(mean of last 3 evaluations {summary['normalized_score_last3']:.1f}); wrote {run_dir / 'summary.json'}")
    return summary


# ==================================================================================================================
# Evaluation in the real simulator, and measurements of the world model
# ==================================================================================================================
def normalized_score(ret, ref_min: float, ref_max: float):
    """D4RL normalized score: 100 (R - R_random) / (R_expert - R_random)."""
    return 100.0 * (ret - ref_min) / (ref_max - ref_min)


@torch.no_grad()
def evaluate(policy: GaussianActor, normalizer: Normalizer, envs: list, seed: int) -> np.ndarray:
    """Returns of one episode per environment, deterministic actions, all episodes stepped as one batch."""
    device = normalizer.mean.device
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, done = np.zeros(len(envs)), np.zeros(len(envs), dtype=bool)
    while not done.all():
        live = np.flatnonzero(~done)
        s = normalizer(torch.as_tensor(obs[live], dtype=torch.float32, device=device))
        actions = policy.act(s, deterministic=True).cpu().numpy()
        for i, a in zip(live, actions):
            obs[i], r, terminated, truncated, _ = envs[i].step(a)
            returns[i] += r
            done[i] = terminated or truncated
    return returns


@torch.no_grad()
def return_gap_diagnostics(wm, pi, pi_D, b, gamma, r_max, max_weight, self_normalize) -> dict[str, float]:
    """Estimates of the errors of Theorem 4.4 on dataset transitions b, and the bound C of Eq. 9.
    eps_r, eps_m: importance-weighted (i.e. under pi_phi, as Definitions 4.1-4.2 ask) mean squared errors of the
    model's reward and of its sampled next state (normalized units), the paper's practical proxy for the TV terms.
    eps_pi: TV(pi_phi, pi_D) = E_{a ~ pi_phi}[max(0, 1 - pi_D(a|s)/pi_phi(a|s))], averaged over dataset states (the
    policy shift the proof's first and third terms bound; the max over states of Definition 4.3 is too noisy)."""
    w = importance_weights(pi, pi_D, b["s"], b["a"], max_weight, self_normalize)
    s2_hat = wm.sample(b["s"], b["a"])
    r_hat, _ = wm.reward_terminal(b["s"], b["a"], s2_hat)
    eps_m = (w * ((s2_hat - b["s2"]) ** 2).mean(-1)).sum() / w.sum()
    eps_r = (w * (r_hat - b["r"]) ** 2).sum() / w.sum()
    a_pi, logp = pi.sample(b["s"])
    eps_pi = (1 - torch.exp((pi_D.log_prob(b["s"], a_pi) - logp).clamp(max=0))).mean()
    C = 2 * r_max * ((eps_r + 2 * eps_pi) / (1 - gamma) + gamma * (2 * eps_pi + eps_m) / (1 - gamma) ** 2)  # Eq. 9
    return {"eps_r": eps_r.item(), "eps_m": eps_m.item(), "eps_pi": eps_pi.item(), "return_gap_bound": C.item(),
            "is_ess": effective_sample_size(w).item()}


@torch.no_grad()
def simulator_errors(wm: WorldModel, pi, normalizer: Normalizer, env, obs: np.ndarray, horizon: int,
                     clips_velocity: bool) -> dict[str, float]:
    """The model against the real simulator, under the current policy (deterministic actions). The simulator is put
    in the state each dataset observation describes (x position, which the observation omits and the dynamics do not
    depend on, set to 0); observations whose velocities sit at the +-10 clip are skipped. One-step RMSE of the state
    (normalized units) and of the reward, and state RMSE after H steps of each following the policy on its own."""
    sim = env.unwrapped
    nq = sim.model.nq
    if clips_velocity:
        obs = obs[np.abs(obs[:, nq - 1:]).max(1) < 10.0 - 1e-6]
    device = normalizer.mean.device
    n = len(obs)
    sim_s, sim_r = np.zeros((n, horizon, obs.shape[1]), np.float32), np.zeros((n, horizon), np.float32)
    sim_alive = np.zeros((n, horizon), bool)
    for i in range(n):
        env.reset(seed=i)
        sim.set_state(np.concatenate([[0.0], obs[i, : nq - 1]]), obs[i, nq - 1:])
        o = obs[i]
        for t in range(horizon):
            a = pi.act(normalizer(torch.as_tensor(o, dtype=torch.float32, device=device)[None]), True)[0]
            o, sim_r[i, t], terminated, _, _ = env.step(a.cpu().numpy())
            sim_s[i, t], sim_alive[i, t] = o, True
            if terminated:
                break
    model = rollout(wm, pi, normalizer(torch.as_tensor(obs, dtype=torch.float32, device=device)), horizon, True)
    model_s, model_r = model["s2"], model["r"]  # (n, H, S), (n, H): model terminals ignored, as in the simulator's
    state_err = ((model_s - normalizer(torch.as_tensor(sim_s, device=device))) ** 2).mean(-1)  # (n, H)
    full = torch.as_tensor(sim_alive[:, -1], device=device)
    reward_err = model_r[:, 0] - torch.as_tensor(sim_r[:, 0], device=device)
    return {"sim_state_error": state_err[:, 0].mean().sqrt().item(),
            "sim_reward_error": (reward_err**2).mean().sqrt().item(),
            "sim_state_error_h": state_err[full, -1].mean().sqrt().item() if full.any() else float("nan"),
            "sim_states": n}


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        main(cli_args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the checkpoint of the last evaluation is kept, continue with --resume", file=sys.stderr)
        sys.exit(130)
