"""ADEPT: Adaptive Diffusion World-Model for Policy Evaluation, in one file.

Paper: Zeyu Fang and Tian Lan, "Learning from Random Demonstrations: Offline Reinforcement Learning with
Importance-Sampled Diffusion Models". A guided diffusion world model evaluates the learning policy (actions from
the policy, next states denoised by the model: Sec. 4.1, Algorithm 1 PE), and an importance-sampled update keeps
the model aligned with that policy as it drifts from the one that collected the data (Sec. 4.2, Eq. 3, IWU).

The file reads top to bottom, the method first and the plumbing last:
  1. arguments                      5. world model M_{theta,eta} (Eq. 1-2) and its pretraining
  2. normalizer and buffer          6. policy evaluation in the model (PE)
  3. networks, the policy contract  7. importance-sampled world-model update (IWU, Eq. 3)
  4. losses and agents              8. training loop (Algorithm 1), 9. evaluation and diagnostics
then 10. dataset building and caches, 11. progress and checkpoint I/O, 12. CUDA graphs, 13. the command-line entry.

    python adept.py --env hopper --dataset random --agent sac                    # ADEPT-SAC
    python adept.py --env hopper --dataset random --agent sac --no-importance-sampling   # Diff+SAC
    python adept.py --env hopper --dataset random --agent sac --no-world-model   # SAC alone
    python adept.py --env hopper --dataset random --agent sac --is-exponent 0    # the w = 1 control
    python adept.py --env hopper --dataset medium-replay --agent iql             # built locally on first use
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Protocol

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


# ==================================================================================================================
# 1. Arguments. A default whose docstring cites Table 2 (diffusion world model) or Table 3 (offline RL) is the
#    paper's; the paper gives no value for the others, and README's implementation details say why they are ours.
# ==================================================================================================================
@dataclass
class Args:
    # ---- the run: task, data, method and seed ----
    env: Literal["hopper", "halfcheetah", "walker2d"] = "hopper"
    """MuJoCo task, simulated by gymnasium's v5 environments"""
    dataset: str = "random"
    """`random`, `medium`, `medium-replay`: the paper's three datasets, built locally in the simulator by D4RL's
    recipes; `simple`, `expert`: Minari's official `mujoco/<env>/<name>-v0`; or any Minari dataset id, such as
    `mujoco/hopper/medium-v0`"""
    agent: Literal["sac", "iql", "bc"] = "sac"
    """offline RL method that updates the policy pi_phi (ADEPT wraps SAC or IQL, Sec. 5.1; BC is Sec. 5.2's
    ablation (3))"""
    seed: int = 0
    """seed of the networks, batches and evaluation episodes (the random dataset has its own fixed seed)"""

    # ---- offline RL (Table 3) ----
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
    model_buffer_size: int = 1_000_000
    """capacity of the model buffer D_hat (Table 3 replay buffer size)"""
    model_ratio: float = 0.5
    """fraction of each policy batch drawn from D_hat (the rest from D); not in the paper (README, detail 7)"""

    # ---- diffusion world model (Table 2) ----
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
    """probability of dropping the condition (s, a) in training, so that one network also learns eps(x, null); not
    in the paper (README, detail 2)"""
    world_model_batch_size: int = 256
    """pretraining batch (Table 2 "train batchsize")"""
    is_batch_size: int = 1024
    """B_m, dataset transitions per importance-sampled update (Table 2)"""
    horizon: int = 10
    """H, steps of a model rollout (Table 2)"""

    # ---- Algorithm 1: which parts run, and their schedule ----
    world_model: bool = True
    """train a world model and evaluate the policy in it (False: the agent alone on the dataset)"""
    importance_sampling: bool = True
    """adapt the world model to the policy with the importance-sampled update, Eq. 3 (False: Diff+<agent>,
    a model trained once before policy learning)"""
    rollout_every: int = 250
    """policy steps between two batched policy evaluations (PE) in the model (README, detail 6)"""
    rollout_batch_size: int = 250
    """rollouts per PE, from random dataset states; with --rollout-every 250 this is Algorithm 1's one rollout
    per policy step, batched: N_e = 1000 PE rollouts per epoch of 1000 policy steps (Algorithm 1's "evaluation
    steps per epoch N_e", Table 3: 1000)"""
    iwu_every: int = 1
    """policy steps between two importance-sampled world-model updates (Algorithm 1: after every policy update)"""
    behavior_density: Literal["fitted", "uniform", "gaussian"] = "fitted"
    """pi_D, the behavior policy that collected D (Eq. 3's denominator): `fitted`, a Beta policy on the action box
    fitted by behavior cloning (it can represent the uniform actions of random data); `uniform`, the exact density
    of the random data's generator (locally built random datasets only); `gaussian`, the unbounded Gaussian of
    `--agent bc` (earlier versions' pi_D), to compare"""
    is_max_weight: float = 10.0
    """importance weights are truncated at this value (after self-normalization); not in Eq. 3, which uses the raw
    ratio (README, detail 8)"""
    is_self_normalize: bool = True
    """divide the weights by their batch mean (computed as a softmax in log space) before truncation; not in Eq. 3
    (README, detail 8)"""
    clip: bool = True
    """clip generated states and rewards to the data's range (Sec. 4.1); --no-clip is Appendix C's ablation (the
    clamp of the predicted x_0 at the sampler's earlier steps stays: it is part of its numerics)"""

    # ---- beyond the paper: variants of the IWU, the uncertainty penalty, and the diagnostics ----
    is_exponent: float = 1.0
    """lambda, tempered weights w ~ (pi_phi/pi_D)^lambda: 1 is Eq. 3; 0 keeps training the model on D with w = 1
    at the same schedule (the control for "more model training")"""
    iwu_lr: float | None = None
    """learning rate of the importance-sampled update; None: --lr"""
    is_resample_pool: int = 0
    """0: off. N > 0: each IWU draws N dataset transitions, weighs them, and draws its B_m transitions from them
    with replacement, in proportion to the (self-normalized, untruncated) weights; the loss weighs them equally
    (--is-max-weight does not apply, and is_ess is then the ESS of the pool's weights)"""
    uncertainty_samples: int = 1
    """N, next states the model draws for each (s, a) of a PE rollout, with independent sampler noises; N > 1
    measures the model's uncertainty u(s, a) from their spread (README, detail 14). The rollout continues from the
    first, which is the one N = 1 draws: with no penalty and no threshold, N > 1 makes the run N = 1 makes (bit for
    bit on the CPU; on a GPU, to rounding)"""
    uncertainty_penalty: float = 0.0
    """lambda_u: D_hat stores the reward r - lambda_u u(s, a) (0: the paper's ADEPT; needs --uncertainty-samples > 1)"""
    uncertainty_threshold: float | None = None
    """None: off. A transition whose u(s, a) exceeds it is kept (penalized) and ends its rollout there, as a
    truncation (the next state still bootstraps); needs --uncertainty-samples > 1"""
    diag_samples: int = 16384
    """dataset transitions for the return-gap diagnostics (eps_r, eps_m, eps_pi of Definitions 4.1-4.3; section 9)
    at each evaluation: Eq. 3's weights concentrate on a few percent of them once the policy has moved, so they must
    be many"""
    sim_check_states: int = 1024
    """dataset states (the first of those above) from which the simulator check steps model and simulator"""

    # ---- dataset building (the locally built datasets) ----
    dataset_size: int = 1_000_000
    """transitions in a locally built `random` or `medium` dataset (D4RL's hold 1M)"""
    medium_return: float | None = None
    """return at which the online learner that makes `medium` and `medium-replay` counts as medium; None: a third
    of the way from D4RL's random to its expert return, D4RL's medium level"""
    online_steps_cap: int = 1_000_000
    """environment steps after which the online learner gives up if it has not reached the medium return"""
    online_eval_every: int = 5000
    """environment steps between two evaluations (10 deterministic episodes) and checkpoints of the online learner"""

    # ---- budgets, output and the machine ----
    total_steps: int = 1_000_000
    """policy gradient steps (Table 3: 1000 epochs x 1000 gradient steps)"""
    world_model_steps: int = 1_000_000
    """pretraining steps of the world model, Algorithm 1's initialisation IWU(pi_D) (Table 2)"""
    behavior_steps: int = 100_000
    """BC steps that fit the behavior policy pi_D used in the importance weights (not in the paper)"""
    eval_every: int = 5000
    """evaluate in the real simulator (and write metrics and the checkpoint) every this many policy steps (not in
    the paper; README, detail 12)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic actions"""
    log_every: int = 1000
    """print progress (and write the losses to TensorBoard) every this many steps"""
    tensorboard: bool = True
    """also write the metrics, diagnostics and losses as TensorBoard event files in the run folder (where the
    tensorboard package is installed; metrics.csv is the record either way)"""
    output_dir: str = "runs"
    """runs go to <output-dir>/<run-name>/, pretrained world models to <output-dir>/world_models/ and fitted behavior
    policies to <output-dir>/behavior_policies/"""
    run_name: str = ""
    """run folder name; empty: <env>-<dataset>-[adept-|diff-]<agent>[-<settings>]-s<seed>, the middle part left out
    under --no-world-model, and <settings> the flags that differ from the paper's: -noclip, -uniform or -gaussian
    (--behavior-density), -lambda<x> (--is-exponent), -iwulr<x> (--iwu-lr), -pool<n> (--is-resample-pool),
    -samples<n> (--uncertainty-samples), -upenalty<x> (--uncertainty-penalty), -uthreshold<x>
    (--uncertainty-threshold)"""
    resume: bool = False
    """continue the run in the run folder from its checkpoint"""
    threads: int = 1
    """torch CPU threads (0: torch's default, all cores). 1 because, measured on 2 cores (bench/threads.sh), 2
    threads made a step 1.3-1.4x faster alone but 2.4-2.6x slower beside one other busy process"""
    cuda: bool = True
    """use CUDA when it is available"""
    cudagraphs: bool = True
    """on CUDA, replay the fixed-shape parts of a step (the agent's update, the IWU, the PE rollouts) as captured
    CUDA graphs: the same computation in a few launches instead of hundreds (section 12); no effect on the CPU"""


class EnvInfo(NamedTuple):
    gym_id: str
    ref_random: float  # D4RL's reference returns, for normalized scores
    ref_expert: float
    clips_velocity: bool  # the observation clips joint velocities at +-10


ENVS = {
    "hopper": EnvInfo("Hopper-v5", -20.272305, 3234.3, True),
    "halfcheetah": EnvInfo("HalfCheetah-v5", -280.178953, 12135.0, False),
    "walker2d": EnvInfo("Walker2d-v5", 1.629008, 4592.3, True),
}
DATA_SEED = 0  # everyone who builds a local dataset gets the same one
LOCAL_DATASETS = ("random", "medium", "medium-replay")  # built in the simulator (section 10)
OFFICIAL_DATASETS = ("simple", "expert")  # Minari's mujoco/<env>/<name>-v0


class UserError(Exception):
    """Bad input (arguments, missing or unreadable data): printed as one line, exit code 2, no traceback."""


def check_args(args: Args) -> None:
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.type in ("int", int) and f.name not in ("seed", "threads", "is_resample_pool") and value <= 0:
            raise UserError(f"--{f.name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's seeds
        raise UserError(f"--seed must lie in [0, 2^32), got {args.seed}")
    if args.uncertainty_samples == 1 and (args.uncertainty_penalty or args.uncertainty_threshold is not None):
        raise UserError("--uncertainty-penalty and --uncertainty-threshold need --uncertainty-samples N > 1: u(s, a) "
                        "is the spread of N model samples")
    if args.uncertainty_threshold is not None and not args.uncertainty_threshold > 0:
        raise UserError(f"--uncertainty-threshold must be positive, got {args.uncertainty_threshold}")
    for name in ("threads", "is_resample_pool", "is_exponent", "uncertainty_penalty"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.is_resample_pool and not args.is_self_normalize:
        raise UserError("--is-resample-pool draws in proportion to the self-normalized weights: drop "
                        "--no-is-self-normalize")
    if args.world_model and args.model_buffer_size < args.rollout_batch_size * args.horizon:
        raise UserError(f"--model-buffer-size {args.model_buffer_size} is smaller than one PE's transitions "
                        f"(--rollout-batch-size x --horizon = {args.rollout_batch_size * args.horizon})")
    if args.iwu_lr is not None and not args.iwu_lr > 0:
        raise UserError(f"--iwu-lr must be positive, got {args.iwu_lr}")
    if args.dataset not in LOCAL_DATASETS + OFFICIAL_DATASETS and "/" not in args.dataset:
        raise UserError(f"--dataset {args.dataset}: use one of {', '.join(LOCAL_DATASETS + OFFICIAL_DATASETS)} or a "
                        "Minari dataset id such as mujoco/hopper/medium-v0")
    if args.behavior_density == "uniform" and args.dataset != "random":
        raise UserError("--behavior-density uniform is the exact density of the locally built random datasets' "
                        f"uniform policy; --dataset {args.dataset} was collected by another policy: use fitted")
    for name in ("lr", "tau", "is_max_weight", "iql_temperature"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name, lo, hi in (("gamma", 0, 1), ("model_ratio", 0, 1), ("cond_drop_prob", 0, 1), ("iql_expectile", 0, 1)):
        if not lo <= getattr(args, name) <= hi:
            raise UserError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {getattr(args, name)}")


# ==================================================================================================================
# 2. The small structures the method uses. One vocabulary for a transition everywhere after loading:
#    s (state), a (action), r (reward), s_next (next state), terminal (1 where the episode terminated).
# ==================================================================================================================
class Normalizer(nn.Module):
    """z-scores states with the dataset's mean and std (buffers, so they travel with .to() and checkpoints)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, std_pad: float = 1e-3):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32) + std_pad)  # +1e-3, as CORL

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return (s - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class Buffer:
    """Transitions as preallocated tensors on the device: the dataset D, or the ring buffer D_hat of model data.
    sample() returns every tensor in `data`: D also carries log pi_D(a|s) of its transitions (section 7)."""

    FIELDS = ("s", "a", "r", "s_next", "terminal")

    def __init__(self, capacity: int, s_dim: int, a_dim: int, device: torch.device):
        dims = {"s": (s_dim,), "a": (a_dim,), "r": (), "s_next": (s_dim,), "terminal": ()}
        self.data = {k: torch.empty((capacity, *d), device=device) for k, d in dims.items()}
        self.capacity, self.size, self.ptr = capacity, 0, 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        n = len(batch["s"])
        idx = (self.ptr + torch.arange(n, device=self.data["s"].device)) % self.capacity
        for k in self.FIELDS:
            self.data[k][idx] = batch[k]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), device=self.data["s"].device, generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        # A copy of the filled rows only: on the CPU, v[:size].cpu() is a view, and torch.save writes the view's
        # whole storage (the buffer's full capacity).
        return {"ptr": self.ptr, "size": self.size,
                **{k: v[: self.size].to("cpu", copy=True) for k, v in self.data.items()}}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.FIELDS:
            self.data[k][: sd["size"]] = sd[k].to(self.data[k].device)
        self.ptr, self.size = sd["ptr"], sd["size"]


def dataset_buffer(data: dict[str, np.ndarray], normalizer: Normalizer, device: torch.device) -> Buffer:
    """D with normalized states; only terminations stop bootstrapping (timeouts do not, and are left out)."""
    t = {k: torch.as_tensor(data[k], device=device) for k in Buffer.FIELDS}
    buf = Buffer(len(t["s"]), t["s"].shape[1], t["a"].shape[1], device)
    buf.add({**t, "s": normalizer(t["s"]), "s_next": normalizer(t["s_next"])})
    return buf


# ==================================================================================================================
# 3. Networks
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


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """sum log(1 - tanh(u)^2), the change of variables of a = tanh(u), in a form that is stable for large |u|."""
    return (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class Policy(Protocol):
    """The policy contract. PE, IWU, evaluation and the diagnostics use a policy only through these three methods;
    s is a (B, S) batch of normalized states and actions lie in the box [-1, 1]^A.

    act(s, deterministic=False) -> a (B, A): the action taken in PE and in the simulator (deterministic: the mode).
    sample(s) -> (a (B, A), log pi(a|s) (B,)): a reparameterized draw and its log-density (SAC's losses, eps_pi).
    log_prob(s, a) -> log pi(a|s) (B,): the density at given actions, finite on the whole box, the bounds included
    (pi_D's Beta gives -inf off the box, where it has no mass; the tanh actors clamp actions a hair inside it).

    Eq. 3's importance weights pi_phi/pi_D need log_prob of both policies: a deterministic actor (TD3, say) has no
    density, so it can serve ADEPT only with one added (a Gaussian around its action, for example)."""

    def act(self, s: torch.Tensor, deterministic: bool = False) -> torch.Tensor: ...
    def sample(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def log_prob(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor: ...


class GaussianHead(nn.Module):
    """An MLP from s to the mean and the (clamped) log std of a diagonal Gaussian: the body both policies share."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(s_dim, 2 * a_dim, hidden)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, S) -> mu (B, A), log_std (B, A)
        mu, log_std = self.net(s).chunk(2, -1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


class GaussianActor(GaussianHead):
    """pi(a|s) = N(tanh(mu(s)), sigma(s)^2), a Policy: IQL's and BC's policy, and the behavior-policy estimator pi_D.
    Its density is finite for every action, including dataset actions at exactly +-1; act() clips to the box."""

    def mean_log_std(self, s):
        mu, log_std = self(s)
        return torch.tanh(mu), log_std

    def log_prob(self, s, a):
        return gaussian_log_prob(a, *self.mean_log_std(s))

    def sample(self, s):
        mu, log_std = self.mean_log_std(s)
        a = mu + log_std.exp() * torch.randn_like(mu)
        return a, gaussian_log_prob(a, mu, log_std)

    def act(self, s, deterministic: bool = False):
        return (self.mean_log_std(s)[0] if deterministic else self.sample(s)[0]).clamp(-1.0, 1.0)


class TanhGaussianActor(GaussianHead):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)), a Policy: SAC's squashed policy."""

    def log_prob(self, s, a):
        # atanh(+-1) is infinite, and log_prob nan there; keep dataset actions a hair inside the bounds.
        u = torch.atanh(a.clamp(-1.0 + 1e-4, 1.0 - 1e-4))
        return gaussian_log_prob(u, *self(s)) - tanh_log_det(u)

    def sample(self, s):
        mu, log_std = self(s)
        u = mu + log_std.exp() * torch.randn_like(mu)  # reparameterized
        return torch.tanh(u), gaussian_log_prob(u, mu, log_std) - tanh_log_det(u)

    def act(self, s, deterministic: bool = False):
        return torch.tanh(self(s)[0]) if deterministic else self.sample(s)[0]


class BetaActor(nn.Module):
    """pi(a|s) = 2 Beta(alpha(s), beta(s)) - 1, alpha, beta = 1 + softplus(.), a Policy: the fitted behavior density
    pi_D. Unlike a Gaussian it puts all its mass on the action box, and it can be nearly uniform, as random data's
    actions are; alpha, beta > 1 keep it unimodal, and at a bound its density falls to 0 only as a power,
    (1 - |a|)^(alpha - 1), near 1 while alpha is near 1 (log_prob is read 2e-6 inside the bounds)."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(s_dim, 2 * a_dim, hidden)

    def dist(self, s) -> torch.distributions.Beta:  # over x = (a + 1)/2 in [0, 1], (B, A)
        return torch.distributions.Beta(*(1.0 + F.softplus(self.net(s))).chunk(2, -1))

    def log_prob(self, s, a):
        x = ((a + 1) / 2).clamp(1e-6, 1 - 1e-6)  # the Beta's log density is -inf or nan exactly at 0 and 1
        log_p = self.dist(s).log_prob(x).sum(-1) - a.shape[-1] * math.log(2.0)  # dx/da = 1/2 per dimension
        return log_p.where((a.abs() <= 1).all(-1), -math.inf)  # no mass off the box

    def sample(self, s):
        a = 2 * self.dist(s).rsample() - 1
        return a, self.log_prob(s, a)

    def act(self, s, deterministic: bool = False):
        return 2 * self.dist(s).mean - 1 if deterministic else self.sample(s)[0]


class UniformPolicy(nn.Module):
    """The uniform density on [-1, 1]^A, a Policy: the exact pi_D of the locally built random datasets."""

    def __init__(self, a_dim: int):
        super().__init__()
        self.a_dim = a_dim

    def log_prob(self, s, a):
        on_box = (a.abs() <= 1).all(-1)
        return torch.where(on_box, -self.a_dim * math.log(2.0), -math.inf).to(a.dtype)

    def sample(self, s):
        a = torch.rand(s.shape[0], self.a_dim, device=s.device) * 2 - 1
        return a, self.log_prob(s, a)

    def act(self, s, deterministic: bool = False):
        return torch.zeros(s.shape[0], self.a_dim, device=s.device) if deterministic else self.sample(s)[0]


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
# 4. Losses (one small function each, on plain tensors) and agents, the offline RL methods that improve pi_phi
#    ("Update phi with B via offline RL methods", Algorithm 1).
# ==================================================================================================================
def sac_target(r, terminal, q_next, logp_next, alpha, gamma):
    """Soft Bellman target y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s')), a' ~ pi(s')."""
    return r + gamma * (1.0 - terminal) * (q_next - alpha * logp_next)


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


def iql_q_target(r, terminal, v_next, gamma):
    """IQL's Q target r + gamma (1 - d) V(s')."""
    return r + gamma * (1.0 - terminal) * v_next


def awr_actor_loss(logp, adv, temperature, max_weight=100.0):
    """IQL's advantage-weighted regression: -E[exp(beta A) log pi(a|s)], exp clamped at 100 as in IQL."""
    return -(torch.exp(temperature * adv).clamp(max=max_weight) * logp).mean()


def bc_loss(logp):
    """Behavior cloning by maximum likelihood: -E[log pi(a|s)]."""
    return -logp.mean()


def adam(params, lr):
    return torch.optim.Adam(params, lr=lr, fused=True)  # fused: ~10% faster steps on CPU as well


def gradient_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Agent:
    """A learner: `actor` is pi_phi (a Policy) and `update(batch)` takes one gradient step of its method.
    `state` names everything a checkpoint must hold (networks, optimizers, tensors, and plain numbers such as a
    counter); --resume restores exactly that list, so an attribute that changes in training belongs in it."""

    actor: Policy
    state: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        out = {}
        for name in self.state:
            v = getattr(self, name)
            out[name] = v.state_dict() if hasattr(v, "state_dict") else v.detach().clone() if torch.is_tensor(v) else v
        return out

    def load_state_dict(self, sd: dict) -> None:
        for name in self.state:
            own = getattr(self, name)
            if hasattr(own, "load_state_dict"):
                own.load_state_dict(sd[name])
            elif torch.is_tensor(own):
                own.data.copy_(sd[name])
            else:
                setattr(self, name, sd[name])


class SAC(Agent):
    """Soft actor-critic (Haarnoja et al. 2018): twin Q, target networks, automatic entropy tuning."""

    state = ("actor", "q", "q_target", "log_alpha", "actor_opt", "q_opt", "alpha_opt")

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
            a_next, logp_next = self.actor.sample(b["s_next"])
            q_next = self.q_target(b["s_next"], a_next).min(0).values
            y = sac_target(b["r"], b["terminal"], q_next, logp_next, alpha, self.gamma)
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

    state = ("actor", "q", "q_target", "v", "actor_opt", "q_opt", "v_opt")

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
            v_next = self.v(b["s_next"]).squeeze(-1)
        v = self.v(b["s"]).squeeze(-1)
        v_loss = expectile_loss(q_t - v, self.expectile)
        gradient_step(self.v_opt, v_loss)

        q_loss = critic_loss(self.q(b["s"], b["a"]), iql_q_target(b["r"], b["terminal"], v_next, self.gamma))
        gradient_step(self.q_opt, q_loss)

        pi_loss = awr_actor_loss(self.actor.log_prob(b["s"], b["a"]), (q_t - v).detach(), self.temperature)
        gradient_step(self.actor_opt, pi_loss)
        soft_update(self.q_target, self.q, self.tau)
        return {"v_loss": v_loss.detach(), "q_loss": q_loss.detach(), "pi_loss": pi_loss.detach()}


class BC(Agent):
    """Behavior cloning by maximum likelihood, of a Gaussian policy (`--agent bc`) or of another Policy: the
    estimator of pi_D for the importance weights (Sec. 4.2)."""

    state = ("actor", "actor_opt")

    def __init__(self, s_dim, a_dim, args: Args, device, policy: nn.Module | None = None):
        self.actor = (policy if policy is not None else GaussianActor(s_dim, a_dim, args.hidden)).to(device)
        self.actor_opt = adam(self.actor.parameters(), args.lr)

    def update(self, b):
        loss = bc_loss(self.actor.log_prob(b["s"], b["a"]))
        gradient_step(self.actor_opt, loss)
        return {"bc_loss": loss.detach()}


AGENTS = {"sac": SAC, "iql": IQL, "bc": BC}


# ==================================================================================================================
# 5. World model M_{theta,eta}: a classifier-free guided DDPM over the normalized next state (Sec. 3, Eq. 1-2),
#    conditioned on (s, a), and a reward/terminal model r_eta(s, a, s') (Sec. 4.1).
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
        "betas": betas, "alpha_bar": alpha_bar,
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
        self.s_dim, self.K = s_dim, K
        self.guidance_weight, self.cond_drop_prob = guidance_weight, cond_drop_prob
        self.clip = True  # generated states and rewards clipped to the data's range (Sec. 4.1); False: --no-clip
        self.t_embed = nn.Embedding(K, t_dim)  # learned timestep embedding, one vector per k
        # input: x_k, condition (s, a) or zeros, a flag saying whether the condition is present, embed(k)
        self.noise_net = mlp(s_dim + (s_dim + a_dim) + 1 + t_dim, s_dim, hidden, depth, nn.SiLU)
        self.reward_net = mlp(s_dim + a_dim + s_dim, 2, hidden, 2, nn.SiLU)  # -> reward, terminal logit
        sched = cosine_schedule(K, cosine_s)
        for k in ("alpha_bar", "post_var", "post_c0", "post_ck"):  # what training and sampling read
            self.register_buffer(k, sched[k])
        # Ranges of the data (set by set_ranges): generated states and rewards are clipped to them (Sec. 4.1).
        self.register_buffer("s_lo", torch.full((s_dim,), -torch.inf))
        self.register_buffer("s_hi", torch.full((s_dim,), torch.inf))
        self.register_buffer("r_lo", torch.tensor(-torch.inf))
        self.register_buffer("r_hi", torch.tensor(torch.inf))

    def set_ranges(self, s_next: torch.Tensor, r: torch.Tensor) -> None:
        self.s_lo.copy_(s_next.min(0).values)
        self.s_hi.copy_(s_next.max(0).values)
        self.r_lo.copy_(r.min())
        self.r_hi.copy_(r.max())

    def eps_theta(self, x_k, k, cond, has_cond):
        """eps_theta(x_k, k | cond): x_k (B, S), k (B,) in 1..K, cond (B, S + A), has_cond (B, 1) is 0 where the
        condition is the null token. -> (B, S)"""
        return self.noise_net(torch.cat([x_k, cond * has_cond, has_cond, self.t_embed(k - 1)], -1))

    def reward_terminal_logits(self, s, a, s_next):  # (B, S), (B, A), (B, S) -> reward (B,), terminal logit (B,)
        r, d_logit = self.reward_net(torch.cat([s, a, s_next], -1)).unbind(-1)
        return r, d_logit

    def loss_per_sample(self, s, a, r, terminal, s_next, generator: torch.Generator | None = None) -> torch.Tensor:
        """l_i of Algorithm 1 (IWU): ||eps - eps_theta(s_noise, (s, a), k)||^2 + (r - r_eta)^2, plus the terminal's
        cross-entropy. The eps error is averaged over state dimensions, and the condition (s, a) is dropped to the
        null token with probability --cond-drop-prob (classifier-free training). -> (B,)"""
        B, dev, g = s.shape[0], s.device, generator
        k = torch.randint(1, self.K + 1, (B,), device=dev, generator=g)   # k ~ Uniform{1..K}
        noise = torch.randn(s_next.shape, device=dev, generator=g)
        ab = self.alpha_bar[k - 1].unsqueeze(-1)                           # (B, 1)
        x_k = ab.sqrt() * s_next + (1 - ab).sqrt() * noise                 # s_noise
        has_cond = (torch.rand(B, 1, device=dev, generator=g) >= self.cond_drop_prob).float()  # drop (s, a)
        eps_loss = ((noise - self.eps_theta(x_k, k, torch.cat([s, a], -1), has_cond)) ** 2).mean(-1)
        r_pred, d_logit = self.reward_terminal_logits(s, a, s_next)
        terminal_loss = F.binary_cross_entropy_with_logits(d_logit, terminal, reduction="none")
        return eps_loss + (r - r_pred) ** 2 + terminal_loss

    @torch.no_grad()
    def sample(self, s, a) -> torch.Tensor:
        """s' ~ P_theta(.|s, a) by K guided denoising steps (Eq. 1-2). (B, S), (B, A) -> (B, S), in the data's range
        (unless --no-clip)."""
        return self.sample_n(s, a)[0]

    @torch.no_grad()
    def sample_n(self, s, a, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """n next states for each (s, a), denoised as one batch of n B rows. The first B draw their noise from torch's
        generator, exactly as sample() does; the other (n - 1) B from `generator`, so that drawing more samples
        leaves the run's random stream alone. (B, S), (B, A) -> (n, B, S)"""
        b0 = s.shape[0]

        def noise():  # (nB, S): the first B rows from torch's generator, the rest from `generator`
            x = torch.randn(b0, self.s_dim, device=s.device)
            if n == 1:
                return x
            return torch.cat([x, torch.randn((n - 1) * b0, self.s_dim, device=s.device, generator=generator)])

        s, a, B = s.repeat(n, 1), a.repeat(n, 1), n * b0                   # the batch repeated n times: (nB, .)
        cond = torch.cat([s, a], -1).repeat(2, 1)                          # (2B, S + A): conditional rows, null rows
        has_cond = torch.cat([torch.ones(B, 1, device=s.device), torch.zeros(B, 1, device=s.device)])  # (2B, 1)
        omega = 1.0 + self.guidance_weight                                 # guidance weight of Eq. 2
        x = noise()                                                        # x_K ~ N(0, I), (B, S)
        for k in range(self.K, 0, -1):
            k_batch = torch.full((2 * B,), k, device=s.device, dtype=torch.long)
            e_cond, e_null = self.eps_theta(x.repeat(2, 1), k_batch, cond, has_cond).chunk(2)  # (2B, S) -> 2 x (B, S)
            e = e_null + omega * (e_cond - e_null)                         # Eq. 2
            ab = self.alpha_bar[k - 1]
            # mu_theta of Eq. 1, written through the predicted x_0. Clipping x_0 to the data's range keeps the first
            # steps stable: with alpha_bar_K ~ 2e-5, Eq. 1 multiplies eps errors by 1/sqrt(alpha_K) ~ 32.
            x0 = (x - (1 - ab).sqrt() * e) / ab.sqrt()
            if k > 1 or self.clip:  # at k = 1 the sample is x_0 itself: this is the clip of Sec. 4.1 (--no-clip)
                x0 = x0.clamp(self.s_lo, self.s_hi)
            x = self.post_c0[k - 1] * x0 + self.post_ck[k - 1] * x  # k = 1: post_c0 = 1, post_ck = 0, so x = x_0
            if k > 1:
                x = x + self.post_var[k - 1].sqrt() * noise()
        return x.view(n, -1, self.s_dim)  # the generated states, in the data's range unless --no-clip

    @torch.no_grad()
    def reward_terminal(self, s, a, s_next):
        """r_hat clipped to the data's reward range (Sec. 4.1), terminal d = sigmoid(logit) > 1/2. -> (B,), (B,)"""
        r, d_logit = self.reward_terminal_logits(s, a, s_next)
        return (r.clamp(self.r_lo, self.r_hi) if self.clip else r), d_logit > 0


def weighted_loss(l: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """L(theta, eta) = 1/N sum_i w_i l_i (Eq. 3)."""
    return (w * l).mean()


def world_model_update(wm: WorldModel, opt, b: dict[str, torch.Tensor], w: torch.Tensor | None = None,
                       generator: torch.Generator | None = None):
    """One gradient step on L(theta, eta) = 1/N sum_i w_i l_i (Eq. 3); w = None: unit weights (pretraining, where
    pi = pi_D, or a batch resampled in proportion to the weights)."""
    l = wm.loss_per_sample(b["s"], b["a"], b["r"], b["terminal"], b["s_next"], generator)
    loss = l.mean() if w is None else weighted_loss(l, w)
    gradient_step(opt, loss)
    return loss.detach()


def pretrain_world_model(args: Args, D: Buffer, wm: WorldModel, wm_opt) -> None:
    """Algorithm 1's initialisation of the model on D with unit weights, IWU(pi_D, D, theta, eta): under pi_D itself
    every weight of Eq. 3 is 1. `pretrained_world_model` (section 10) caches the result on disk."""
    progress = Progress("world model", args.world_model_steps, args.log_every)  # a progress line (section 11)
    for step in range(1, args.world_model_steps + 1):
        progress.update(step, {"loss": world_model_update(wm, wm_opt, D.sample(args.world_model_batch_size))})


# ==================================================================================================================
# 6. Policy evaluation in the model (Algorithm 1, PE): batched rollouts of H steps from random dataset states.
# ==================================================================================================================
def disagreement(samples: torch.Tensor) -> torch.Tensor:
    """u(s, a) = || std_n s'_n ||_2: the per-dimension standard deviation of N model samples of the next state
    (normalized units), its norm over the state's dimensions, as MOPO's max_i ||sigma_i(s, a)|| but from one
    diffusion model's sampler noise instead of an ensemble (README, detail 14). (N, B, S) -> (B,)"""
    return samples.std(0).norm(dim=-1)


@torch.no_grad()
def rollout(wm: WorldModel, policy: Policy, s0: torch.Tensor, horizon: int, deterministic: bool = False,
            n_samples: int = 1, penalty: float = 0.0, threshold: float | None = None,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """a_t ~ pi(s_t), s_{t+1} by guided denoising, (r_t, d_t) = r_eta(s_t, a_t, s_{t+1}); a rollout stops at its
    terminal. With n_samples N > 1 the model also draws N - 1 more next states (from `generator`), u_t is their
    spread with s_{t+1}'s, the reward is r_t - penalty u_t, and a rollout whose u_t passes the threshold stops
    after step t as a truncation (d_t stays 0). s0 (B, S) -> (B, H, .) tensors for each field of a transition,
    `u` (B, H) (0 for N = 1), `truncated` (B,), and `valid` (B, H), False for steps after a rollout stopped."""
    out = {k: [] for k in (*Buffer.FIELDS, "u")}
    valid, alive = [], torch.ones(s0.shape[0], dtype=torch.bool, device=s0.device)
    truncated = torch.zeros_like(alive)
    s = s0
    for _ in range(horizon):
        a = policy.act(s, deterministic)
        samples = wm.sample_n(s, a, n_samples, generator)  # (N, B, S)
        s_next = samples[0]                                 # the rollout goes on from the first
        u = disagreement(samples) if n_samples > 1 else torch.zeros(len(s), device=s.device)
        r, terminal = wm.reward_terminal(s, a, s_next)
        for k, v in zip(out, (s, a, r - penalty * u, s_next, terminal.float(), u)):
            out[k].append(v)
        valid.append(alive)
        stop = (u > threshold) & alive & ~terminal if threshold is not None else torch.zeros_like(alive)
        truncated |= stop
        alive = alive & ~terminal & ~stop
        s = s_next
    return {**{k: torch.stack(v, 1) for k, v in out.items()}, "valid": torch.stack(valid, 1), "truncated": truncated}


def policy_evaluation(roll: Callable, D: Buffer, D_hat: Buffer, args: Args) -> dict[str, float]:
    """D_hat <- D_hat U PE(M_{theta,eta}, pi): --rollout-batch-size rollouts of H steps from random states of D.
    roll(s0) is rollout() with the run's model, pi_phi and settings (see step_functions, section 12).
    -> transitions added, the sum of their u, and the rollouts truncated for uncertainty"""
    out = roll(D.sample(args.rollout_batch_size)["s"])
    D_hat.add({k: out[k][out["valid"]] for k in Buffer.FIELDS})  # (n, H, .) -> (valid, .)
    return {"transitions": int(out["valid"].sum()), "u_sum": out["u"][out["valid"]].sum().item(),
            "truncated": int(out["truncated"].sum())}


def policy_batch(D: Buffer, D_hat: Buffer | None, n: int, model_ratio: float) -> dict[str, torch.Tensor]:
    """B ~ D U D_hat: a fixed fraction of the batch from the model buffer once it holds data."""
    n_model = round(n * model_ratio) if D_hat is not None and D_hat.size > 0 else 0
    if n_model == 0:
        return D.sample(n)
    real, fake = D.sample(n - n_model), D_hat.sample(n_model)
    return {k: torch.cat([real[k], fake[k]]) for k in Buffer.FIELDS}


# ==================================================================================================================
# 7. Importance-sampled world-model update (Algorithm 1, IWU; Eq. 3)
# ==================================================================================================================
def fit_behavior_policy(args: Args, D: Buffer, bc: BC) -> None:
    """pi_D estimated from D by behavior cloning (Sec. 4.2). `behavior_policy` (section 10) caches it on disk."""
    progress = Progress("behavior policy pi_D", args.behavior_steps, args.log_every)
    for step in range(1, args.behavior_steps + 1):
        progress.update(step, bc.update(D.sample(args.batch_size)))


@torch.no_grad()
def log_density(pi: Policy, D: Buffer, chunk: int = 65536) -> torch.Tensor:
    """log pi(a|s) of every transition of D, (N,), in chunks. For pi_D, which is fixed once fitted, this is computed
    once, with the dataset, rather than for every IWU batch."""
    s, a = D.data["s"][: D.size], D.data["a"][: D.size]
    return torch.cat([pi.log_prob(s[i: i + chunk], a[i: i + chunk]) for i in range(0, D.size, chunk)])


@torch.no_grad()
def importance_weights(log_pi: torch.Tensor, log_pi_D: torch.Tensor, max_weight: float = 10.0,
                       self_normalize: bool = True, exponent: float = 1.0) -> torch.Tensor:
    """w_i = (pi_phi(a_i|s_i) / pi_D(a_i|s_i))^lambda, Eq. 3 at lambda = `exponent` = 1, from the two log-densities:
    (B,), (B,) -> (B,). lambda = 0 gives w = 1 (the control). The raw ratio of two densities over a 3-6 dimensional
    action space spans many orders of magnitude, so by default it is self-normalized (w / mean w, as a softmax of
    the log ratios, which also cancels any constant offset) and truncated at max_weight."""
    # -inf - -inf (both densities underflow far in the tails) is nan: such a ratio is unknown, and counts as 1.
    log_w = exponent * torch.nan_to_num(log_pi - log_pi_D, nan=0.0, posinf=50.0, neginf=-50.0)
    if self_normalize:
        w = torch.softmax(log_w, 0) * len(log_w)
    else:
        w = log_w.clamp(max=50.0).exp()
    w = w.clamp(max=max_weight)
    # Weights below 1e-8 of the largest (below 1e-8 when self-normalized: their mean is 1) change the loss by less
    # than 1e-8 of its value, but as subnormal floats (a narrow policy gives many weights near 1e-40) they made the
    # backward pass 2.5-4x slower on CPU: set them to exactly 0.
    floor = 1e-8 if self_normalize else 1e-8 * w.max()
    return torch.where(w < floor, 0.0, w)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 / N in (0, 1]: the share of the batch the weighted loss effectively uses."""
    return w.sum() ** 2 / (w**2).sum().clamp_min(1e-12) / len(w)


def importance_sampled_update(wm: WorldModel, opt, pi: Policy, D: Buffer, args: Args,
                              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """IWU(pi_phi, D, theta, eta): a batch of B_m transitions of D weighed by Eq. 3, then one gradient step on the
    weighted loss. With --is-resample-pool N, the B_m transitions are drawn from a pool of N in proportion to their
    weights instead, and weigh equally. Draws from its own generator, so that the policy's random stream does not
    depend on it. -> the loss, and the effective sample size of the weights"""
    b = D.sample(args.is_resample_pool or args.is_batch_size, generator)
    with torch.no_grad():  # the weights carry no gradient
        log_pi = pi.log_prob(b["s"], b["a"])
    if args.is_resample_pool:
        w = importance_weights(log_pi, b["log_pi_D"], max_weight=math.inf, exponent=args.is_exponent)
        idx = torch.multinomial(w, args.is_batch_size, replacement=True, generator=generator)  # (B_m,) ~ w
        return world_model_update(wm, opt, {k: v[idx] for k, v in b.items()}, None, generator), \
            effective_sample_size(w)
    w = importance_weights(log_pi, b["log_pi_D"], args.is_max_weight, args.is_self_normalize, args.is_exponent)
    return world_model_update(wm, opt, b, w, generator), effective_sample_size(w)


# ==================================================================================================================
# 8. Training loop (Algorithm 1)
# ==================================================================================================================
COUNTS = ("policy_updates", "rollouts", "model_transitions", "iwu_updates", "evaluations", "checkpoints",
          "world_model_pretrain_steps")
METRICS = ("step", "return", "return_std", "normalized_score", "normalized_score_std", "train_steps_per_second",
           "wall_seconds")
DIAGNOSTICS = ("eps_r", "eps_m", "eps_pi", "return_gap_bound", "is_ess", "sim_state_error", "sim_reward_error",
               "sim_state_error_h", "sim_return_error_h", "sim_states")
UNCERTAINTY = ("u_rollout", "truncated_share", "u_sim", "u_error_rank_corr", "u_mean_error_rank_corr")  # N > 1


class RunLog:
    """The bookkeeping that main() leaves out: how often each phase ran, the metrics history, progress lines, and
    the speed of this process's own steps (the first 10% of them, at most 1000, are warm-up and not timed)."""

    def __init__(self, args: Args):
        self.counts = dict.fromkeys(COUNTS, 0)
        self.history: list[dict] = []
        self.t_start, self.total, self.log_every = time.perf_counter(), args.total_steps, args.log_every
        self.wall_before = 0.0  # wall seconds of a resumed run's earlier processes, up to its checkpoint
        self.budgets: list[int] = []  # --total-steps of each process of the run, when a resume extended it
        self.train_seconds, self.timed_steps = 0.0, 0
        self.rollout_seconds, self.rolled = 0.0, 0
        self.ess = []  # effective sample sizes of the IWU batches since the last evaluation
        self.pe_window = dict.fromkeys(("rollouts", "transitions", "u_sum", "truncated"), 0)  # PE since then

    def start(self, step: int, events_dir: Path | None) -> None:
        self.progress = Progress("train", self.total, self.log_every, step)
        self.warmup_until = step + min(1000, max(0, (self.total - step) // 10))
        if not self.budgets or self.budgets[-1] != self.total:  # a resumed run may extend its --total-steps
            self.budgets.append(self.total)
        self.writer = None
        if events_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the package is optional: metrics.csv is the record
                print("tensorboard is not installed: no event files (metrics.csv has every number)", flush=True)
            else:  # a resumed run drops the events a killed process wrote after its checkpoint
                self.writer = SummaryWriter(str(events_dir), purge_step=step + 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def step_begins(self) -> None:
        self.t_step = time.perf_counter()

    def rollouts_done(self, n_rollouts: int, pe: dict, seconds: float) -> None:
        self.counts["rollouts"] += n_rollouts
        self.counts["model_transitions"] += pe["transitions"]
        self.rollout_seconds, self.rolled = self.rollout_seconds + seconds, self.rolled + pe["transitions"]
        for k, v in (("rollouts", n_rollouts), ("transitions", pe["transitions"]), ("u_sum", pe["u_sum"]),
                     ("truncated", pe["truncated"])):
            self.pe_window[k] += v

    def take_pe_window(self) -> dict[str, float]:  # the mean u and the truncated share since the last evaluation
        w, self.pe_window = self.pe_window, dict.fromkeys(self.pe_window, 0)
        return {"u_rollout": w["u_sum"] / w["transitions"] if w["transitions"] else float("nan"),
                "truncated_share": w["truncated"] / w["rollouts"] if w["rollouts"] else float("nan")}

    def step_ends(self, step: int, losses: dict) -> None:
        self.counts["policy_updates"] += 1
        if step > self.warmup_until:
            if torch.cuda.is_initialized() and (step % self.log_every == 0 or step == self.total):
                torch.cuda.synchronize()  # GPU work runs behind the host: count what is still queued
            self.train_seconds += time.perf_counter() - self.t_step
            self.timed_steps += 1
        if self.progress.update(step, losses) and self.writer is not None:
            for k, v in losses.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)

    def wall_seconds(self) -> float:  # of the whole run, across resumes
        return self.wall_before + time.perf_counter() - self.t_start

    def steps_per_second(self) -> float:
        return self.timed_steps / self.train_seconds if self.train_seconds else float("nan")

    def take_mean_ess(self) -> float:  # and start a new window
        mean = torch.stack(self.ess).mean().item() if self.ess else float("nan")
        self.ess = []
        return mean

    def record(self, row: dict) -> None:
        self.history.append({k: int(v) if k in ("step", "sim_states") else float(v) for k, v in row.items()})
        self.counts["evaluations"] += 1
        print(f"[eval] step {row['step']} " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"),
              flush=True)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(f"{'eval' if k in METRICS else 'model'}/{k}", v, row["step"])
            self.writer.flush()

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "history": list(self.history), "wall_seconds": self.wall_seconds(),
                "budgets": list(self.budgets)}

    def load_state_dict(self, sd: dict) -> None:
        self.counts.update(sd["counts"])
        self.history = list(sd["history"])
        # checkpoints of earlier versions lack the key: their last evaluation's wall time is the nearest figure
        self.wall_before = sd.get("wall_seconds", self.history[-1]["wall_seconds"] if self.history else 0.0)
        self.budgets = list(sd.get("budgets", [sd["args"]["total_steps"]]))


@dataclass
class Run:
    """Everything the loop works on, in one place: the evaluation and the checkpoint need all of it."""

    args: Args
    dir: Path
    device: torch.device
    normalizer: Normalizer
    D: Buffer
    agent: Agent
    refs: dict  # reference returns {"random", "expert"} for normalized scores, and their "source"
    envs: list  # --eval-episodes simulators
    log: RunLog
    wm: WorldModel | None = None
    wm_opt: torch.optim.Optimizer | None = None
    pi_D: Policy | None = None
    D_hat: Buffer | None = None
    iwu_generator: torch.Generator | None = None  # the IWU's own random stream
    uncertainty_generator: torch.Generator | None = None  # the stream of PE's extra model samples (N > 1)

    def state_dict(self) -> dict:
        sd = {"agent": self.agent.state_dict(), **self.log.state_dict(), "normalizer": self.normalizer.state_dict(),
              "rng": rng_state(), "args": dataclasses.asdict(self.args)}
        if self.wm is not None:
            sd.update(wm=self.wm.state_dict(), wm_opt=self.wm_opt.state_dict(), pi_D=self.pi_D.state_dict(),
                      D_hat=self.D_hat.state_dict(), iwu_rng=self.iwu_generator.get_state(),
                      uncertainty_rng=self.uncertainty_generator.get_state(), rng_device=self.device.type)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        saved = sd["normalizer"]  # D is normalized with statistics recomputed from the dataset: they must match
        if not all(torch.allclose(saved[k].cpu(), v.cpu(), rtol=1e-5, atol=1e-6)
                   for k, v in self.normalizer.state_dict().items()):
            raise UserError(f"--resume: the dataset's state statistics differ from those the run in {self.dir} "
                            "started with: the dataset has changed; start a new run (--run-name)")
        self.agent.load_state_dict(sd["agent"])
        self.log.load_state_dict(sd)
        if self.wm is not None:
            self.wm.load_state_dict(sd["wm"])
            self.wm_opt.load_state_dict(sd["wm_opt"])
            self.pi_D.load_state_dict(sd["pi_D"])
            self.D_hat.load_state_dict(sd["D_hat"])
            if sd.get("rng_device", self.device.type) == self.device.type:
                self.iwu_generator.set_state(sd["iwu_rng"])
                if "uncertainty_rng" in sd:  # checkpoints of earlier versions drew no extra samples
                    self.uncertainty_generator.set_state(sd["uncertainty_rng"])
            else:  # a run moved between a GPU and the CPU: a generator's state does not transfer between devices
                print(f"--resume: the checkpoint was written on {sd['rng_device']}; the IWU's and PE's extra-sample "
                      f"random streams start over from their seeds on {self.device.type}: the run goes on, though "
                      "not exactly as it would have there")
            self.D.data["log_pi_D"] = log_density(self.pi_D, self.D)
        set_rng_state(sd["rng"])


def main(args: Args) -> dict:
    """Algorithm 1. Returns the run's summary (also written to <run folder>/summary.json)."""
    check_args(args)
    device = setup_torch(args)
    run_dir = Path(args.output_dir) / run_name(args)
    made = not run_dir.exists()
    lock = hold_run_folder(run_dir)  # held until main returns: one process per run folder
    try:
        if args.resume and not (run_dir / "checkpoint.pt").exists():
            raise UserError(f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}")
        if not args.resume and (run_dir / "checkpoint.pt").exists():  # never train over a run's results unasked
            raise UserError(f"{run_dir} already holds a run: --resume continues it (or, finished, does nothing), "
                            "--run-name names a new one, or delete the folder to start it over")
        if not args.resume and any((run_dir / f).exists() for f in ("metrics.csv", "summary.json")):
            raise UserError(f"{run_dir} holds a run's results but no checkpoint to continue: --run-name names a new "
                            "run, or delete the folder to start it over")
        ck = read_checkpoint(run_dir / "checkpoint.pt", args) if args.resume else None  # refuses other settings
        print(f"device: {device} | run folder: {run_dir}", flush=True)
        run, _ = setup(args, device, run_dir, pretrain=ck is None)  # resumed: model and pi_D are in the checkpoint
    except BaseException:  # a failed start leaves no run folder, and nothing in one it did not make
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            (run_dir / ".lock").unlink(missing_ok=True)
        raise
    D, agent, wm, D_hat, log = run.D, run.agent, run.wm, run.D_hat, run.log
    adapt = args.world_model and args.importance_sampling

    start = load_checkpoint(ck, run) if ck else 0
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    if start >= args.total_steps and summary.get("total_steps") == start:  # a finished run: keep what it wrote
        print(f"{run_dir} already finished {start} steps: nothing to do", flush=True)
        return summary
    # (a checkpoint at the budget whose summary was not written, or is an earlier stage's: it is written below)
    log.start(start, run_dir if args.tensorboard else None)
    update, iwu, roll = step_functions(run)  # agent.update, IWU, rollout(); replayed as CUDA graphs on a GPU
    for step in range(start + 1, args.total_steps + 1):
        log.step_begins()
        if wm is not None and (step - 1) % args.rollout_every == 0:  # D_hat <- D_hat U PE(M_{theta,eta}, pi_phi)
            t = time.perf_counter()
            pe = policy_evaluation(roll, D, D_hat, args)
            log.rollouts_done(args.rollout_batch_size, pe, time.perf_counter() - t)
        # Update phi with B ~ D U D_hat via the offline RL method
        losses = update(policy_batch(D, D_hat, args.batch_size, args.model_ratio))
        if adapt and step % args.iwu_every == 0:  # IWU(pi_phi, D, theta, eta)
            out = iwu()
            losses["wm_loss"] = out["wm_loss"]
            log.counts["iwu_updates"] += 1
            log.ess.append(out["ess"])
        log.step_ends(step, losses)
        if step % args.eval_every == 0 or step == args.total_steps:
            evaluate_and_checkpoint(run, step)
    log.close()
    return write_summary(run)


def setup(args: Args, device: torch.device, run_dir: Path, pretrain: bool = True) -> tuple[Run, dict]:
    """What Algorithm 1 starts from (main, results/is_study.py and bench/diagnostics_noise.py share it): the dataset D
    normalized, pi_phi, and for ADEPT the model M_{theta,eta} initialized with D and pi_D, pi_D, and D_hat = {}.
    pretrain=False builds the model and pi_D without training them (to be loaded from a checkpoint).
    -> the run, and the dataset's raw transition arrays"""
    # Normalize the dataset D (states z-scored with the dataset's statistics, Sec. 4.1)
    data, refs = load_transitions(args)
    normalizer = Normalizer(data["s"].mean(0), data["s"].std(0)).to(device)
    D = dataset_buffer(data, normalizer, device)
    s_dim, a_dim = data["s"].shape[1], data["a"].shape[1]
    # Initialize the target policy pi_phi (the agent's actor)
    agent = AGENTS[args.agent](s_dim, a_dim, args, device)
    run = Run(args, run_dir, device, normalizer, D, agent, refs,
              [gym.make(ENVS[args.env].gym_id) for _ in range(args.eval_episodes)], RunLog(args))
    if args.world_model:  # Initialize M_{theta,eta} with D and pi_D: IWU(pi_D, D, theta, eta), cached on disk
        run.wm, run.wm_opt, run.log.counts["world_model_pretrain_steps"] = pretrained_world_model(args, D, device,
                                                                                                 pretrain)
        run.wm.clip = args.clip
        run.pi_D = behavior_policy(args, D, device, pretrain)
        if pretrain:  # (otherwise once pi_D is loaded)
            D.data["log_pi_D"] = log_density(run.pi_D, D)
        run.D_hat = Buffer(args.model_buffer_size, s_dim, a_dim, device)  # the replay buffer D_hat = {}
        run.iwu_generator = torch.Generator(device).manual_seed(seed_of(args.seed, "iwu"))
        run.uncertainty_generator = torch.Generator(device).manual_seed(seed_of(args.seed, "uncertainty"))
        for group in run.wm_opt.param_groups:
            group["lr"] = args.iwu_lr or args.lr
    return run, data


def setup_torch(args: Args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal floats are ~100x slower on x86 CPUs; none of our numbers need them
    torch.manual_seed(args.seed)  # seeds the CPU generator and every CUDA one
    np.random.seed(args.seed)
    return torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")


def run_name(args: Args) -> str:
    """<env>-<dataset>-[adept-|diff-]<agent>[-<the variant flags below, where not at their defaults>]-s<seed>"""
    if args.run_name:
        return args.run_name
    mode = "" if not args.world_model else ("adept-" if args.importance_sampling else "diff-")
    suffix = "-noclip" if args.world_model and not args.clip else ""
    if args.world_model and args.importance_sampling:
        suffix += f"-{args.behavior_density}" if args.behavior_density != "fitted" else ""
        suffix += f"-lambda{args.is_exponent:g}" if args.is_exponent != 1 else ""
        suffix += f"-iwulr{args.iwu_lr:g}" if args.iwu_lr is not None else ""
        suffix += f"-pool{args.is_resample_pool}" if args.is_resample_pool else ""
    if args.world_model:  # spelled out: -lambda is --is-exponent's, and IQL's tau is another thing again
        suffix += f"-samples{args.uncertainty_samples}" if args.uncertainty_samples > 1 else ""
        suffix += f"-upenalty{args.uncertainty_penalty:g}" if args.uncertainty_penalty else ""
        suffix += f"-uthreshold{args.uncertainty_threshold:g}" if args.uncertainty_threshold is not None else ""
    return f"{args.env}-{args.dataset.replace('/', '-')}-{mode}{args.agent}{suffix}-s{args.seed}"


# ==================================================================================================================
# 9. Evaluation in the real simulator, and measurements of the world model
# ==================================================================================================================
def normalized_score(ret, ref_random: float, ref_expert: float):
    """D4RL normalized score: 100 (R - R_random) / (R_expert - R_random)."""
    return 100.0 * (ret - ref_random) / (ref_expert - ref_random)


@torch.no_grad()
def evaluate(policy: Policy, normalizer: Normalizer, envs: list, seed: int) -> np.ndarray:
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
def policy_shift(pi: Policy, pi_D: Policy, s: torch.Tensor) -> torch.Tensor:
    """eps_pi = TV(pi, pi_D) = E_{a ~ pi}[max(0, 1 - pi_D(a|s)/pi(a|s))], one action drawn per state, averaged over
    the states s (B, S)."""
    a_pi, logp = pi.sample(s)
    return (1 - torch.exp((pi_D.log_prob(s, a_pi) - logp).clamp(max=0))).mean()


@torch.no_grad()
def return_gap_diagnostics(wm: WorldModel, pi: Policy, pi_D: Policy, b: dict, gamma: float, r_max: float,
                           max_weight: float, self_normalize: bool) -> dict[str, float]:
    """Estimates of the errors of Theorem 4.4 on dataset transitions b, and the bound C of Eq. 9.
    eps_r, eps_m: importance-weighted (i.e. under pi_phi, as Eqs. 6-7 ask; Definition 4.2's prose says pi_D) mean
    squared errors of the model's reward and of its sampled next state (normalized units), the paper's practical
    proxy for the TV terms.
    eps_pi: TV(pi_phi, pi_D) = E_{a ~ pi_phi}[max(0, 1 - pi_D(a|s)/pi_phi(a|s))], averaged over dataset states: the
    drift from the data's behavior policy that Sec. 4.3 ("Policy shifting") says raises eps_pi. Definition 4.3
    (Eq. 8) defines eps_pi between the evaluated policy and the target policy whose rollouts filled D_hat, a shift
    the loop keeps small (PE's rollouts are at most --rollout-every steps stale); and it takes the max over states,
    too noisy to estimate. So C below, fed this eps_pi, measures another drift than Eq. 9's: an indication, not
    the theorem's bound. Eq. 9's closed form, kept below as printed, drops 2 r_max eps_m / (1 - gamma) from the sum
    that ends its proof (sum_t gamma^t (t + 1) = 1/(1 - gamma)^2): about 1% of C's eps_m term at gamma = 0.99.
    The weights are Eq. 3's at lambda = 1 whatever --is-exponent is, self-normalized and truncated as the IWU's
    (--is-max-weight, --no-is-self-normalize), so that arms differing only in lambda see the same weights."""
    w = importance_weights(pi.log_prob(b["s"], b["a"]), b["log_pi_D"], max_weight, self_normalize)
    s_next_hat = wm.sample(b["s"], b["a"])
    r_hat, _ = wm.reward_terminal(b["s"], b["a"], s_next_hat)
    eps_m = (w * ((s_next_hat - b["s_next"]) ** 2).mean(-1)).sum() / w.sum()
    eps_r = (w * (r_hat - b["r"]) ** 2).sum() / w.sum()
    eps_pi = policy_shift(pi, pi_D, b["s"])
    C = 2 * r_max * ((eps_r + 2 * eps_pi) / (1 - gamma) + gamma * (2 * eps_pi + eps_m) / (1 - gamma) ** 2)  # Eq. 9
    return {"eps_r": eps_r.item(), "eps_m": eps_m.item(), "eps_pi": eps_pi.item(), "return_gap_bound": C.item()}


def settable_states(obs: np.ndarray, env, clips_velocity: bool) -> np.ndarray:
    """The observations the simulator can be put in: where the observation clips velocities at +-10, those with a
    velocity at the clip are dropped (set_state cannot reproduce the velocity it stands for)."""
    if not clips_velocity:
        return obs
    nq = env.unwrapped.model.nq
    # The tolerance covers a float32 round trip through the normalizer (up to ~3e-6 at 10).
    return obs[np.abs(obs[:, nq - 1:]).max(1) < 10.0 - 1e-4]


@torch.no_grad()
def simulator_errors(wm: WorldModel, pi: Policy, normalizer: Normalizer, env, obs: np.ndarray, horizon: int,
                     clips_velocity: bool, n_samples: int = 1, generator: torch.Generator | None = None
                     ) -> dict[str, float]:
    """The model against the real simulator, under the current policy (deterministic actions). The simulator is put
    in the state each dataset observation describes (x position, which the observation omits and the dynamics do not
    depend on, set to 0); observations whose velocities sit at the +-10 clip are skipped. One-step RMSE of the state
    (normalized units) and of the reward; the state RMSE after H steps of each following the policy on its own; and
    the error that PE exists to keep small, |model H-step return - simulator H-step return| (undiscounted), on the
    start states whose simulated episode lasts H steps. With n_samples N > 1, last (so that the rest is the same
    with or without it): does the model's disagreement u(s, a) rank the states by its actual one-step error? The
    mean u, and Spearman's correlation of u with the error of an (N+1)-th sample, which did not enter u, and with
    the error of the mean of the N (errors as the norm over dimensions, normalized units)."""
    sim = env.unwrapped
    nq = sim.model.nq
    obs = settable_states(obs, env, clips_velocity)
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
    model_s, model_r = model["s_next"], model["r"]  # (n, H, S), (n, H); the model's terminals are not used: the
    # H-step errors count only the start states whose simulated episode lasts H steps (`full`)
    state_err = ((model_s - normalizer(torch.as_tensor(sim_s, device=device))) ** 2).mean(-1)  # (n, H)
    full = torch.as_tensor(sim_alive[:, -1], device=device)
    sim_r = torch.as_tensor(sim_r, device=device)
    reward_err = model_r[:, 0] - sim_r[:, 0]
    return_err = (model_r.sum(1) - sim_r.sum(1)).abs()  # (n,)
    extra = {}
    if n_samples > 1:
        s0 = normalizer(torch.as_tensor(obs, device=device))
        sim_next = normalizer(torch.as_tensor(sim_s[:, 0], device=device))
        samples = wm.sample_n(s0, pi.act(s0, True), n_samples + 1, generator)  # (N + 1, n, S)
        u = disagreement(samples[:n_samples])
        extra = {"u_sim": u.mean().item(),
                 "u_error_rank_corr": rank_correlation(u, (samples[-1] - sim_next).norm(dim=-1)),
                 "u_mean_error_rank_corr": rank_correlation(u, (samples[:n_samples].mean(0) - sim_next).norm(dim=-1))}
    return {**extra, "sim_state_error": state_err[:, 0].mean().sqrt().item(),
            "sim_reward_error": (reward_err**2).mean().sqrt().item(),
            "sim_state_error_h": state_err[full, -1].mean().sqrt().item() if full.any() else float("nan"),
            "sim_return_error_h": return_err[full].mean().item() if full.any() else float("nan"),
            "sim_states": n}


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho of two (n,) samples: the Pearson correlation of their ranks (continuous data: no ties)."""
    ranks = torch.stack([x.argsort().argsort(), y.argsort().argsort()]).double()
    return torch.corrcoef(ranks)[0, 1].item()


def evaluate_and_checkpoint(run: Run, step: int) -> None:
    """Every --eval-every steps: real-simulator returns, the world model's diagnostics, a row of metrics.csv, and
    the checkpoint."""
    args, log = run.args, run.log
    returns = evaluate(run.agent.actor, run.normalizer, run.envs, seed=10_000 + args.seed * 1000)
    scores = normalized_score(returns, run.refs["random"], run.refs["expert"])
    row = {"step": step, "return": returns.mean(), "return_std": returns.std(), "normalized_score": scores.mean(),
           "normalized_score_std": scores.std(), "train_steps_per_second": log.steps_per_second(),
           "wall_seconds": log.wall_seconds()}
    if run.wm is not None:
        # The same transitions (and sampler noise) at every evaluation and in every arm of a seed: the measurements
        # are paired, and leave the run's own random stream alone.
        with own_stream(args.seed, "diagnostics", run.device):
            b = run.D.sample(args.diag_samples)
            # r_max = max |r|: Lemma 4.5's max r bounds |r| only where rewards are >= 0 (halfcheetah's are not)
            r_max = run.D.data["r"][: run.D.size].abs().max().item()
            row.update(return_gap_diagnostics(run.wm, run.agent.actor, run.pi_D, b, args.gamma, r_max,
                                              args.is_max_weight, args.is_self_normalize))
            obs = run.normalizer.inverse(b["s"][: args.sim_check_states]).cpu().numpy()
            n, g = args.uncertainty_samples, torch.Generator(run.device).manual_seed(seed_of(args.seed, "u check"))
            row.update(simulator_errors(run.wm, run.agent.actor, run.normalizer, run.envs[0], obs, args.horizon,
                                        ENVS[args.env].clips_velocity, n, g))
        row["is_ess"] = log.take_mean_ess()  # of the IWU batches since the last evaluation (none for Diff+)
        row.update(log.take_pe_window() if args.uncertainty_samples > 1 else {})
    log.record(row)
    log.counts["checkpoints"] += 1
    save_checkpoint(run.dir / "checkpoint.pt", step, run)  # first: killed before the next line, the run resumes
    write_csv(run.dir / "metrics.csv", METRICS + DIAGNOSTICS + (UNCERTAINTY if args.uncertainty_samples > 1 else ()),
              log.history)  # rewritten whole from the history, which the checkpoint holds
    log.progress.restart(step)  # keep evaluation time out of the windowed speed


def machine(device: torch.device) -> dict:
    """What made the numbers: float results (and so a run's path) can differ between CPU models and libraries."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               None) if os.path.exists("/proc/cpuinfo") else None
    # the vector instructions torch's kernels use (e.g. AVX2, AVX512): CPUs of one model name may differ in them
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads()}


def write_summary(run: Run) -> dict:
    """summary.json: the final evaluation, the mean score of the last 3, speed, counts and the arguments."""
    args, log = run.args, run.log
    final = log.history[-1]
    summary = {
        "env": args.env, "dataset": args.dataset, "agent": args.agent, "seed": args.seed,
        "mode": "none" if not args.world_model else ("adept" if args.importance_sampling else "diff"),
        **{k: getattr(args, k) for k in ("behavior_density", "is_exponent", "iwu_lr", "is_resample_pool",
                                         "uncertainty_samples", "uncertainty_penalty", "uncertainty_threshold")},
        "total_steps": args.total_steps, **({"extended_from": log.budgets[:-1]} if len(log.budgets) > 1 else {}),
        "normalized_score": final["normalized_score"],
        "normalized_score_std": final["normalized_score_std"],
        "normalized_score_last3": float(np.mean([h["normalized_score"] for h in log.history[-3:]])),
        "return": final["return"], "return_std": final["return_std"], "reference_returns": run.refs,
        "train_steps_per_second": log.steps_per_second(),
        "rollout_transitions_per_second": log.rolled / log.rollout_seconds if log.rollout_seconds else None,
        "wall_seconds": log.wall_seconds(), "device": str(run.device), "machine": machine(run.device),
        "counts": log.counts,
        **{k: final.get(k) for k in DIAGNOSTICS}, **{k: final[k] for k in UNCERTAINTY if k in final},
        "args": dataclasses.asdict(args),
    }
    atomic_write(run.dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    n = min(3, len(log.history))
    print(f"final normalized score {summary['normalized_score']:.1f} +- {summary['normalized_score_std']:.1f} "
          f"(mean of the last {n} evaluation{'s' if n > 1 else ''} {summary['normalized_score_last3']:.1f}); wrote "
          f"{run.dir / 'summary.json'}")
    return summary


# ==================================================================================================================
# 10. Datasets and caches. Several runs share the dataset, its flat copy and the pretrained world model, and may
#     start at once or be killed at any moment: one process builds a shared file while the others wait on its lock,
#     and every file appears complete or not at all (it is written elsewhere, then renamed into place).
# ==================================================================================================================
@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` for the block; other processes wait. The OS drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it: say so, then wait
            print(f"waiting for another process that holds {path} (it builds what this run needs)", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def hold_run_folder(run_dir: Path):
    """The run folder, made if need be, and an exclusive lock on it (<run folder>/.lock) that holds while the
    returned file stays open: a second process on the same run stops with an error instead of mixing its results
    with this one's. The OS drops the lock when the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another process is running {run_dir}; wait for it, or name this run otherwise "
                        "(--run-name)") from None
    return f


def atomic_write(path: Path, write: Callable) -> None:
    """write(f) into a temporary file of a unique name beside `path`, then rename it to `path`: readers see the old
    file or the whole new one, never a part, and concurrent writers never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() gives, so others sharing a cache can read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def medium_tag(args: Args) -> str:
    """What sets this online learner apart from the default one, for the ids of its datasets ('' by default)."""
    tag = f"-return{round(args.medium_return)}" if args.medium_return is not None else ""
    return tag + (f"-eval{args.online_eval_every}" if args.online_eval_every != 5000 else "")


def dataset_id(args: Args) -> str:
    """Minari id of --dataset. Locally built data lives in our own namespace `adept/`, never in Minari's `mujoco/`."""
    env, tag = args.env, medium_tag(args)
    if args.dataset == "random":
        return f"adept/{env}/random-{args.dataset_size}-v0"
    if args.dataset == "medium":
        return f"adept/{env}/medium-{args.dataset_size}{tag}-v0"
    if args.dataset == "medium-replay":
        return f"adept/{env}/medium-replay{tag}-v0"
    return args.dataset if "/" in args.dataset else f"mujoco/{env}/{args.dataset}-v0"


@contextlib.contextmanager
def minari_store(path: Path):
    """Point Minari at another store folder for the block (it reads MINARI_DATASETS_PATH at every call)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def into_store(ds_id: str, make: Callable[[], object]) -> None:
    """Run make() (a build or a download of ds_id) in a fresh hidden store folder, then move the finished dataset
    into the real store with one rename. Minari writes the dataset id into its metadata, so the dataset is made under
    its own id in a temporary store rather than under a temporary id. A process killed inside make() leaves only
    the hidden folder, which the next builder (holding the dataset's lock) removes."""
    store = minari.storage.get_dataset_path()
    prefix = f".build-{ds_id.replace('/', '__')}-"
    for stale in store.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=store, prefix=prefix))
    try:
        with minari_store(tmp):
            make()
        parts = ds_id.split("/")
        for depth in range(1, len(parts)):  # namespace metadata files, so that Minari lists the namespace
            ns = "/".join(parts[:depth])
            meta = tmp / ns / "namespace_metadata.json"
            if meta.exists() and not (store / ns / meta.name).exists():
                (store / ns).mkdir(parents=True, exist_ok=True)
                os.replace(meta, store / ns / meta.name)
        (store / ds_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(store / ds_id, ignore_errors=True)  # what a killed rebuild left (it had no data/: we build)
        os.rename(tmp / ds_id, store / ds_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def collect(env: str, size: int, name: str, policy: Policy | None = None) -> dict[str, np.ndarray]:
    """`size` transitions in the real simulator from data seed 0, as arrays of the vocabulary of section 2 plus
    `timeout`: a uniform random policy (D4RL's recipe for random data), or `policy` on raw observations with its
    actions sampled (the medium data)."""
    sim = gym.make(ENVS[env].gym_id)
    sim.action_space.seed(DATA_SEED)
    obs, _ = sim.reset(seed=DATA_SEED)
    out = {k: [] for k in ("s", "a", "r", "s_next", "terminal", "timeout")}
    progress = Progress(f"collect {name}", size, max(1, size // 10))
    for t in range(1, size + 1):
        if policy is None:
            action = sim.action_space.sample()
        else:
            action = policy.act(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
        obs_next, reward, terminated, truncated, _ = sim.step(action)
        truncated = truncated or (t == size and not terminated)  # the last, cut episode must bootstrap
        for key, value in zip(out, (obs, action, reward, obs_next, terminated, truncated)):
            out[key].append(value)
        obs = sim.reset()[0] if terminated or truncated else obs_next
        progress.update(t)
    return {k: np.array(v) for k, v in out.items()}


def to_episodes(tr: dict[str, np.ndarray]) -> list:
    """Transition arrays, in the order they were collected, -> Minari episodes, split at each termination and
    truncation (the last transition must end its episode)."""
    from minari.data_collector import EpisodeBuffer

    ends = np.flatnonzero(tr["terminal"] + tr["timeout"] > 0)
    assert len(ends) and ends[-1] == len(tr["s"]) - 1, "the last transition must end an episode"
    episodes, start = [], 0
    for end in ends:
        part = slice(start, end + 1)
        episodes.append(EpisodeBuffer(
            id=len(episodes), observations=np.concatenate([tr["s"][part], tr["s_next"][end: end + 1]]),
            actions=tr["a"][part], rewards=list(tr["r"][part]), terminations=list(tr["terminal"][part].astype(bool)),
            truncations=list(tr["timeout"][part].astype(bool))))
        start = end + 1
    return episodes


def write_dataset(ds_id: str, env: str, tr: dict[str, np.ndarray], algorithm: str, description: str,
                  recipe: dict | None = None) -> None:
    """Transitions -> a Minari dataset `ds_id` with D4RL's reference returns, and our recipe in its metadata."""
    info = ENVS[env]
    episodes = to_episodes(tr)
    print(f"writing {len(episodes)} episodes of {ds_id} to the Minari store", flush=True)
    with warnings.catch_warnings():  # Minari nags about optional metadata (author e-mail, code link)
        warnings.simplefilter("ignore", UserWarning)
        ds = minari.create_dataset_from_buffers(
            ds_id, episodes, env=info.gym_id, eval_env=info.gym_id, algorithm_name=algorithm, author="adept.py",
            ref_min_score=info.ref_random, ref_max_score=info.ref_expert, data_format="hdf5",
            description=description + " Reference scores are D4RL's.")
    if recipe is not None:
        ds.storage.update_metadata({"adept_recipe": json.dumps(recipe)})


def build_random_dataset(args: Args, ds_id: str, learner=None) -> None:
    """The locally built `random` dataset: D4RL's recipe, a uniform random policy."""
    tr = collect(args.env, args.dataset_size, ds_id)
    write_dataset(ds_id, args.env, tr, "uniform random policy",
                  f"{args.dataset_size} transitions of a uniform random policy in {ENVS[args.env].gym_id} "
                  f"(seed {DATA_SEED}), as D4RL's random datasets.")


def medium_learner(args: Args) -> tuple[nn.Module, dict[str, np.ndarray], dict]:
    """D4RL's recipe for medium data (Fu et al. 2020): SAC (this file's, at Table 3's settings whatever the run's are)
    trained online in the simulator on raw observations, one gradient update per environment step after a warm-up
    of uniform random actions (1000 steps, as rlkit's SAC that D4RL used; at most half of --online-eval-every),
    evaluated every --online-eval-every steps on 10 deterministic
    episodes and checkpointed, until that mean return first reaches the medium return. Shared by `medium` and
    `medium-replay`: one process trains it while others wait; an interrupted training resumes from its checkpoint
    (the episode in progress is cut there, as a truncation). -> the medium policy, every transition collected until
    then (its replay buffer, in order), and the recipe with what it reached. The policy is saved beside the
    datasets, as <store>/adept/<env>/medium-policy<tag>.pt."""
    info, tag = ENVS[args.env], medium_tag(args)
    target = args.medium_return if args.medium_return is not None else \
        info.ref_random + (info.ref_expert - info.ref_random) / 3
    store = minari.storage.get_dataset_path()
    work = store / "adept" / args.env / f".medium-learner{tag}"
    policy_path = store / "adept" / args.env / f"medium-policy{tag}.pt"
    sim = gym.make(info.gym_id)
    s_dim, a_dim = sim.observation_space.shape[0], sim.action_space.shape[0]
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    with file_lock(store / ".locks" / f"medium-learner-{args.env}{tag}.lock"), \
            own_stream(DATA_SEED, f"medium learner {args.env}", device):
        agent = SAC(s_dim, a_dim, Args(env=args.env), device)
        if policy_path.exists():
            ck = torch.load(policy_path, map_location="cpu", weights_only=False)
            agent.actor.load_state_dict(ck["actor"])
            with np.load(work / "replay.npz") as z:
                return agent.actor.cpu(), {k: z[k] for k in z.files}, ck["recipe"]
        cap = args.online_steps_cap
        tr = {k: np.zeros((cap, d) if d else cap, np.float32) for k, d in
              (("s", s_dim), ("a", a_dim), ("r", 0), ("s_next", s_dim), ("terminal", 0), ("timeout", 0))}
        replay = Buffer(cap, s_dim, a_dim, device)
        t, history = 0, []
        if (work / "checkpoint.pt").exists():
            ck = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=False)
            t, history = ck["step"], ck["history"]
            if t > cap:
                raise UserError(f"the online learner for {args.env}'s medium data is at step {t} ({work}), past "
                                f"--online-steps-cap {cap}: raise the cap or lower --medium-return")
            agent.load_state_dict(ck["agent"])
            set_rng_state(ck["rng"])
            for k in tr:
                tr[k][:t] = ck["transitions"][k]
            tr["timeout"][t - 1] = max(tr["timeout"][t - 1], 1 - tr["terminal"][t - 1])  # cut the open episode
            replay.add({k: torch.as_tensor(tr[k][:t], device=device) for k in Buffer.FIELDS})
            print(f"online learner for {args.env}: resumed from {work / 'checkpoint.pt'} at step {t}", flush=True)
        identity = Normalizer(torch.zeros(s_dim), torch.ones(s_dim), std_pad=0.0).to(device)
        evals = [gym.make(info.gym_id) for _ in range(10)]
        sim.action_space.seed(DATA_SEED + t)
        obs, _ = sim.reset(seed=DATA_SEED + t)
        warmup, losses = min(1000, args.online_eval_every // 2), {}
        progress = Progress(f"online SAC {args.env}, until return {target:.0f} (ETA to the cap)", cap,
                            args.log_every, t)
        while True:
            if t >= cap:
                best = max((r for _, r in history), default=float("nan"))
                raise UserError(f"the online learner for {args.env}'s medium data did not reach the return "
                                f"{target:.0f} within --online-steps-cap {cap} environment steps (best evaluation "
                                f"{best:.0f}); raise the cap or lower --medium-return")
            if t < warmup:
                action = sim.action_space.sample()
            else:
                with torch.no_grad():
                    action = agent.actor.act(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0]
                action = action.cpu().numpy()
            obs_next, reward, terminated, truncated, _ = sim.step(action)
            for key, value in zip(tr, (obs, action, reward, obs_next, terminated, truncated)):
                tr[key][t] = value
            replay.add({k: torch.as_tensor(tr[k][t: t + 1], device=device) for k in Buffer.FIELDS})
            t += 1
            if t > warmup:  # one gradient update per environment step
                losses = agent.update(replay.sample(256))
            obs = sim.reset()[0] if terminated or truncated else obs_next
            progress.update(t, {"return": history[-1][1]} if history else losses)
            if t % args.online_eval_every == 0:
                history.append((t, float(evaluate(agent.actor, identity, evals, seed=DATA_SEED + 10_000).mean())))
                if history[-1][1] >= target:
                    break
                state = {"step": t, "history": history, "agent": agent.state_dict(), "rng": rng_state(),
                         "transitions": {k: v[:t] for k, v in tr.items()}}
                atomic_write(work / "checkpoint.pt", lambda f: torch.save(state, f))
        tr = {k: v[:t] for k, v in tr.items()}
        tr["timeout"][-1] = max(tr["timeout"][-1], 1 - tr["terminal"][-1])  # the episode open at the stop is cut
        recipe = {"recipe": "D4RL medium / medium-replay: online SAC, one update per environment step",
                  "env": info.gym_id, "medium_return": target, "reached_return": history[-1][1],
                  "reached_normalized_score": normalized_score(history[-1][1], info.ref_random, info.ref_expert),
                  "environment_steps": t, "warmup_random_steps": warmup, "eval_every": args.online_eval_every,
                  "evaluations": history, "data_seed": DATA_SEED}
        atomic_write(work / "replay.npz", lambda f: np.savez(f, **tr))
        policy = {"actor": {k: v.cpu() for k, v in agent.actor.state_dict().items()}, "recipe": recipe,
                  "class": "TanhGaussianActor", "hidden": Args.hidden, "s_dim": s_dim, "a_dim": a_dim}
        atomic_write(policy_path, lambda f: torch.save(policy, f))  # written last: it marks the learner done
        (work / "checkpoint.pt").unlink(missing_ok=True)
        print(f"online learner for {args.env} reached return {history[-1][1]:.0f} (target {target:.0f}) after {t} "
              f"environment steps; policy saved to {policy_path}", flush=True)
        return agent.actor.cpu(), tr, recipe


def build_medium_replay_dataset(args: Args, ds_id: str, learner: tuple) -> None:
    """`medium-replay`: every transition the online learner's replay buffer recorded, in order, until its policy
    first reached the medium return. `learner` is what medium_learner returned."""
    _, tr, recipe = learner
    write_dataset(ds_id, args.env, tr, "SAC, online (replay buffer until medium)",
                  f"The {len(tr['s'])} transitions an online SAC learner collected in {ENVS[args.env].gym_id} "
                  f"until its deterministic policy first reached the return {recipe['medium_return']:.0f}, as D4RL's "
                  "medium-replay datasets.", {**recipe, "dataset": "medium-replay"})


def build_medium_dataset(args: Args, ds_id: str, learner: tuple) -> None:
    """`medium`: --dataset-size transitions of the medium policy acting in the simulator. Its actions are sampled,
    not deterministic, as D4RL's medium data: a deterministic behavior policy has no density, so pi_D (Eq. 3) would
    be degenerate and the data would hold one action per state."""
    policy, _, recipe = learner
    with own_stream(DATA_SEED, f"medium data {args.env}", torch.device("cpu")):
        tr = collect(args.env, args.dataset_size, ds_id, policy)
    write_dataset(ds_id, args.env, tr, "SAC policy at the medium level, sampled actions",
                  f"{args.dataset_size} transitions of an online SAC policy that reached the return "
                  f"{recipe['reached_return']:.0f} in {ENVS[args.env].gym_id}, actions sampled, as D4RL's medium "
                  "datasets.", {**recipe, "dataset": "medium", "behavior_actions": "sampled"})


def flatten(episodes) -> dict[str, np.ndarray]:
    """Episodes (Minari's EpisodeData) -> transition arrays s[t], a[t], r[t], s_next[t] = s[t+1], with terminations
    (`terminal`) and truncations (`timeout`) kept apart (a truncated step must still bootstrap)."""
    episodes = list(episodes)
    data = {
        "s": np.concatenate([e.observations[:-1] for e in episodes]),
        "a": np.concatenate([e.actions for e in episodes]),
        "r": np.concatenate([e.rewards for e in episodes]),
        "s_next": np.concatenate([e.observations[1:] for e in episodes]),
        "terminal": np.concatenate([e.terminations for e in episodes]),
        "timeout": np.concatenate([e.truncations for e in episodes]),
    }
    return {k: v.astype(np.float32) for k, v in data.items()}


FLAT_FORMAT = 2  # version of transitions.npz; bump when its keys or contents change


def read_dataset(ds_id: str, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The dataset's transitions and metadata. Reading 45k small HDF5 episode groups takes ~25 s, so a flat copy of
    the transitions sits beside Minari's files, stamped with their sizes and times: a changed file invalidates it."""
    ds = minari.load_dataset(ds_id)
    files = sorted((path / "data").iterdir())
    stamp = json.dumps([FLAT_FORMAT] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    flat = path / "transitions.npz"
    if flat.exists():
        try:
            with np.load(flat) as z:
                if str(z["stamp"]) == stamp:
                    return {k: z[k] for k in z.files if k != "stamp"}, ds.storage.metadata
        except Exception as e:  # a damaged copy: Minari's files are the record, so the copy is rebuilt from them
            print(f"{flat} is unreadable ({type(e).__name__}); rebuilding it from the Minari dataset", flush=True)
    data = flatten(ds.iterate_episodes())
    try:
        atomic_write(flat, lambda f: np.savez(f, stamp=stamp, **data))
    except OSError as e:  # a full disk, a read-only store: the dataset is fine, the next run reads Minari's files
        print(f"could not write the flat copy {flat} ({type(e).__name__}: {e}); going on without it", flush=True)
    return data, ds.storage.metadata


def load_transitions(args: Args) -> tuple[dict[str, np.ndarray], dict]:
    """The dataset as flat transition arrays (the vocabulary of section 2, plus `timeout`), and its reference returns
    (random, expert) for normalized scores with their source. A missing local dataset is built, a missing official one
    downloaded; a local one that cannot be read (a build cut short by an older version) is rebuilt."""
    ds_id = dataset_id(args)
    path = minari.storage.get_dataset_path(ds_id)
    local = args.dataset in LOCAL_DATASETS
    build = {"random": build_random_dataset, "medium": build_medium_dataset,
             "medium-replay": build_medium_replay_dataset}.get(args.dataset)
    t0 = time.perf_counter()
    with file_lock(minari.storage.get_dataset_path() / ".locks" / f"{ds_id.replace('/', '__')}.lock"):
        for attempt in (1, 2):
            if not (path / "data").exists():
                if local:
                    learner = medium_learner(args) if args.dataset != "random" else None  # kept in the real store
                    into_store(ds_id, lambda: build(args, ds_id, learner))
                else:
                    try:  # Minari's download needs its `hf` extra and the network; offline it fails after ~20 s
                        into_store(ds_id, lambda: minari.download_dataset(ds_id))
                    except Exception as e:
                        raise UserError(
                            f"dataset {ds_id} is not in the local Minari store ({minari.storage.get_dataset_path()}, set by "
                            f"MINARI_DATASETS_PATH) and could not be downloaded ({type(e).__name__}). Download it where "
                            "there is network, or use --dataset random, medium or medium-replay, which are built "
                            "locally in the simulator and work offline.") from None
            try:
                data, meta = read_dataset(ds_id, path)
                break
            except MemoryError:  # not the dataset's fault: never delete it for this
                raise
            except Exception as e:
                problem = f"dataset {ds_id} at {path} is unreadable ({type(e).__name__}: {e})"
                if not local or attempt == 2:
                    raise UserError(f"{problem}; delete that folder to download it again" if not local else problem) \
                        from None
                print(f"{problem}; building it again", flush=True)
                shutil.rmtree(path)
    if not len(data["s"]):
        raise UserError(f"dataset {ds_id} at {path} holds no transitions")
    spec = meta.get("env_spec")  # halfcheetah's and walker2d's spaces have one shape: compare the simulators too
    try:
        spec_id = json.loads(spec).get("id") if isinstance(spec, str) else getattr(spec, "id", None)
    except ValueError:
        spec_id = None
    if spec_id and spec_id.split("-v")[0] != ENVS[args.env].gym_id.split("-v")[0]:
        raise UserError(f"dataset {ds_id} was collected in {spec_id}, but --env {args.env} is {ENVS[args.env].gym_id}")
    sim = gym.make(ENVS[args.env].gym_id)
    if data["s"].shape[1:] != sim.observation_space.shape or data["a"].shape[1:] != sim.action_space.shape:
        raise UserError(f"dataset {ds_id} holds states {data['s'].shape[1:]} and actions {data['a'].shape[1:]}, "
                        f"but --env {args.env} ({ENVS[args.env].gym_id}) has {sim.observation_space.shape} and "
                        f"{sim.action_space.shape}")
    refs = {"random": meta.get("ref_min_score"), "expert": meta.get("ref_max_score"), "source": "dataset metadata"}
    if refs["random"] is None or refs["expert"] is None:  # some official sets lack them (Minari issue #323)
        refs = {"random": ENVS[args.env].ref_random, "expert": ENVS[args.env].ref_expert, "source": "D4RL"}
    refs["random"], refs["expert"] = float(refs["random"]), float(refs["expert"])
    print(f"dataset {ds_id}: {meta.get('total_episodes')} episodes, {len(data['s'])} transitions, loaded in "
          f"{time.perf_counter() - t0:.1f} s; reference returns random {refs['random']:.6g} / expert "
          f"{refs['expert']:.6g} (from {refs['source']})", flush=True)
    return data, refs


CACHE_FORMAT = 3  # version of the pretraining caches; bump when WorldModel's, BetaActor's or BC's code changes
DATA_SETTINGS = ("env", "dataset", "dataset_size", "medium_return", "online_eval_every")  # which data
WORLD_MODEL_SETTINGS = DATA_SETTINGS + ("seed", "lr", "world_model_steps", "world_model_batch_size",
                                        "denoising_steps", "cosine_s", "model_hidden", "model_depth", "cond_drop_prob")
BEHAVIOR_SETTINGS = DATA_SETTINGS + ("seed", "lr", "behavior_density", "behavior_steps", "batch_size", "hidden")
RUN_ONLY = {  # Args fields that do not shape what is cached (a test checks that every field is in one of the three)
    "agent", "cuda", "cudagraphs", "threads", "output_dir", "run_name", "resume", "total_steps", "gamma", "tau",
    "iql_expectile", "iql_temperature", "eval_every", "eval_episodes", "log_every", "world_model", "importance_sampling",
    "guidance_weight", "horizon", "rollout_every", "rollout_batch_size", "model_buffer_size", "model_ratio",
    "is_batch_size", "iwu_every", "is_max_weight", "is_self_normalize", "is_exponent", "iwu_lr", "is_resample_pool",
    "diag_samples", "sim_check_states", "online_steps_cap", "clip", "uncertainty_samples", "uncertainty_penalty",
    "uncertainty_threshold", "tensorboard"}


def cache_path(args: Args, folder: str, fields: tuple[str, ...]) -> tuple[Path, dict]:
    """<output-dir>/<folder>/<env>-<dataset>-s<seed>-<key>.pt, the key a hash of the settings that shape what is
    cached and of the cache format. -> the path and the settings"""
    settings = {"format": CACHE_FORMAT, **{k: getattr(args, k) for k in fields}}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{args.env}-{args.dataset.replace('/', '-')}-s{args.seed}-{key}.pt"
    return Path(args.output_dir) / folder / name, settings


def cached(path: Path, settings: dict, parts: dict, train: Callable[[], None]) -> bool:
    """Load `parts` (name -> object with a state dict) from the cache file, or train() them and save them. Runs
    that share the settings (a rerun, the arms of a seed) share the file: one trains while the others wait on its
    lock. A file that does not load (cut short, or written by other code) is retrained from the fresh objects, so
    the result is the same as on a miss. -> True if trained here"""
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            fresh = {k: copy.deepcopy(v.state_dict()) for k, v in parts.items()}
            try:
                ck = torch.load(path, map_location="cpu", weights_only=False)
                for k, v in parts.items():
                    v.load_state_dict(ck[k])
                print(f"loaded {', '.join(parts)} from {path}", flush=True)
                return False
            except Exception as e:
                print(f"cached {path} does not load ({type(e).__name__}); training it again", flush=True)
                for k, v in parts.items():
                    v.load_state_dict(fresh[k])
        train()
        ck = {**{k: v.state_dict() for k, v in parts.items()}, "settings": settings}
        atomic_write(path, lambda f: torch.save(ck, f))
    print(f"saved {', '.join(parts)} to {path}", flush=True)
    return True


def pretrained_world_model(args: Args, D: Buffer, device, pretrain: bool = True
                           ) -> tuple[WorldModel, torch.optim.Optimizer, int]:
    """The world model and its optimizer after pretraining, from the cache or trained. Built and trained on a random
    stream of its own, fixed by the seed, so the model is the same whoever trained it and the run's own stream is the
    same on a hit and on a miss. pretrain=False: built only (a resumed run loads it from its checkpoint).
    -> wm, wm_opt, pretraining steps run here (0 on a cache hit)"""
    path, settings = cache_path(args, "world_models", WORLD_MODEL_SETTINGS)
    with own_stream(args.seed, "world model", device):
        wm = WorldModel(D.data["s"].shape[1], D.data["a"].shape[1], args.model_hidden, args.model_depth,
                        args.denoising_steps, args.cosine_s, args.guidance_weight, args.cond_drop_prob).to(device)
        wm.set_ranges(D.data["s_next"][: D.size], D.data["r"][: D.size])
        wm_opt = adam(wm.parameters(), args.lr)
        trained = pretrain and cached(path, settings, {"wm": wm, "wm_opt": wm_opt},
                                      lambda: pretrain_world_model(args, D, wm, wm_opt))
    return wm, wm_opt, args.world_model_steps if trained else 0


def behavior_policy(args: Args, D: Buffer, device, fit: bool = True) -> Policy:
    """pi_D by --behavior-density: the exact uniform density, or a Beta (`fitted`) or Gaussian policy fitted by
    behavior cloning on a random stream of its own, cached as the world model is (fit=False: built only)."""
    s_dim, a_dim = D.data["s"].shape[1], D.data["a"].shape[1]
    if args.behavior_density == "uniform":
        return UniformPolicy(a_dim).to(device)
    path, settings = cache_path(args, "behavior_policies", BEHAVIOR_SETTINGS)
    with own_stream(args.seed, "behavior policy", device):
        policy = BetaActor(s_dim, a_dim, args.hidden) if args.behavior_density == "fitted" else None
        bc = BC(s_dim, a_dim, args, device, policy)
        if fit:
            cached(path, settings, {"pi_D": bc}, lambda: fit_behavior_policy(args, D, bc))
    return bc.actor


# ==================================================================================================================
# 11. Progress and checkpoint I/O
# ==================================================================================================================
class Progress:
    """Prints `[name] step/total | rate/s | ETA | values` every `every` steps, and at least 10 times in a phase;
    the rate is windowed."""

    def __init__(self, name: str, total: int, every: int, start: int = 0):
        self.name, self.total, self.every = name, total, max(1, min(every, (total - start) // 10))
        self.restart(start)

    def restart(self, step: int) -> None:  # begin a new window (after a pause such as an evaluation)
        self.last_step, self.last_time = step, time.perf_counter()

    def update(self, step: int, values: dict | None = None) -> bool:  # -> whether it printed
        if step % self.every and step != self.total:
            return False
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = " ".join(f"{k} {float(v):.3g}" for k, v in (values or {}).items())
        print(f"[{self.name}] {step}/{self.total} | {rate:.0f}/s | ETA {eta / 60:.1f} min | {extra}", flush=True)
        self.restart(step)
        return True


def rng_state() -> dict:
    """The global generators: torch's CPU generator, each started CUDA device's, and numpy's (the run's own
    streams, the IWU's and PE's extra samples, are saved by Run.state_dict). Reading a CUDA generator starts CUDA, so
    a CPU run on a GPU machine reads none."""
    return {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())  # set_rng_state takes a CPU ByteTensor only
    np.random.set_state(state["numpy"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"][:torch.cuda.device_count()]])


def seed_of(seed: int, stream: str) -> int:
    """The seed of one named random stream of a run, fixed by the run's seed."""
    return int(hashlib.sha1(f"{seed}/{stream}".encode()).hexdigest()[:15], 16)


@contextlib.contextmanager
def own_stream(seed: int, stream: str, device: torch.device):
    """Run the block on torch's generators reseeded by (seed, stream), and give them back as they were after it.
    Pretraining, pi_D and the diagnostics draw here, so that the policy's stream of a seed is the same in every
    arm (ADEPT, the controls, Diff+) whether the caches hit or missed: paired seeds. manual_seed reseeds every CUDA
    device too, so every device is given back once CUDA is in use, by this run or by the block."""
    cuda = device.type == "cuda" or torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.manual_seed(seed_of(seed, stream))
        yield


def save_checkpoint(path: Path, step: int, run: Run) -> None:
    state = {"step": step, **run.state_dict()}
    atomic_write(path, lambda f: torch.save(state, f))


RESUME_FREE = ("cuda", "cudagraphs", "threads", "output_dir", "run_name", "resume", "log_every", "tensorboard",
               "total_steps")


def read_checkpoint(path: Path, args: Args) -> dict:
    """The checkpoint --resume continues, read onto the CPU (the generator states must stay there). It refuses a
    checkpoint made with other settings than the command's, but for those in RESUME_FREE: a larger --total-steps
    extends a run (its summary says so), and the machine and output may change."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--resume: checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    saved = ck["args"]  # a field that an earlier version lacked had its default there
    changed = [f"--{f.name.replace('_', '-')} {saved.get(f.name, f.default)} -> {getattr(args, f.name)}"
               for f in dataclasses.fields(args)
               if f.name not in RESUME_FREE and saved.get(f.name, f.default) != getattr(args, f.name)]
    if changed:
        raise UserError(f"--resume: {path} was made with other settings ({'; '.join(changed)}); resume with the "
                        "run's own settings, or start a new run (--run-name)")
    if args.total_steps < ck["step"]:
        raise UserError(f"--resume: {path} is at step {ck['step']}, past --total-steps {args.total_steps}")
    return ck


def load_checkpoint(ck: dict, run: Run) -> int:
    """Restore a run from its checkpoint; load_state_dict moves each tensor to the device of the tensor it
    replaces. -> the checkpoint's step"""
    run.load_state_dict(ck)
    print(f"resumed from {run.dir / 'checkpoint.pt'} at step {ck['step']}", flush=True)
    return ck["step"]


# ==================================================================================================================
# 12. CUDA graphs (--cudagraphs). On a GPU, a step of this file is hundreds of small kernel launches whose cost
#     is the launching, not the arithmetic (batch 256, width 256). A CUDA graph records a fixed-shape piece of work
#     once and replays it in one launch: the same kernels on the same memory, so the method is unchanged.
# ==================================================================================================================
def step_functions(run: Run) -> tuple[Callable, Callable, Callable]:
    """The three fixed-shape parts of a step, each returning a dict of tensors: update(batch), the agent's update on
    a batch of D U D_hat; iwu(), the IWU (it draws its own batch of D); roll(s0), the PE rollouts from (B, S) start
    states. Plain calls of agent.update, importance_sampled_update and rollout; with --cudagraphs on CUDA, each is
    captured once as a CUDA graph and replayed. The batch of D U D_hat is drawn outside the graph (D_hat grows, and
    a graph freezes sizes); so are the resampling IWU (--is-resample-pool) and the masked add of PE to D_hat."""
    args, agent, wm = run.args, run.agent, run.wm

    def iwu():
        loss, ess = importance_sampled_update(wm, run.wm_opt, agent.actor, run.D, args, run.iwu_generator)
        return {"wm_loss": loss, "ess": ess}

    def roll(s0):
        return rollout(wm, agent.actor, s0, args.horizon, False, args.uncertainty_samples, args.uncertainty_penalty,
                       args.uncertainty_threshold, run.uncertainty_generator)

    if not (args.cudagraphs and run.device.type == "cuda"):
        return agent.update, iwu, roll

    def example(n):  # a batch of n rows of D to capture with, drawn without touching a generator
        idx = torch.arange(n, device=run.D.data["s"].device) % run.D.size
        return {k: run.D.data[k][idx] for k in Buffer.FIELDS}

    update = CudaGraph(agent.update, example(args.batch_size), [getattr(agent, k) for k in agent.state])
    if wm is not None and args.importance_sampling and not args.is_resample_pool:
        iwu = CudaGraph(iwu, None, [wm, run.wm_opt], [run.iwu_generator])
    if wm is not None:
        roll = CudaGraph(roll, example(args.rollout_batch_size)["s"], [], [run.uncertainty_generator])
    return update, iwu, roll


@contextlib.contextmanager
def state_kept(objects: list, generators: list[torch.Generator]):
    """On leaving the block, every tensor of `objects` (modules, optimizers, tensors) and every generator is as it
    was on entering it; optimizer state made inside (Adam's moments, on a run's first update) is zeroed, which is
    where Adam starts from. A CUDA graph's capture runs its steps for real first; this undoes them."""
    def tensors(o) -> list[torch.Tensor]:
        if isinstance(o, nn.Module):
            return [*o.parameters(), *o.buffers()]
        if isinstance(o, torch.optim.Optimizer):
            return [v for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
        return [o] if torch.is_tensor(o) else []

    before = [t for o in objects for t in tensors(o)]
    saved, rng = [t.detach().clone() for t in before], [g.get_state() for g in generators]
    yield
    with torch.no_grad():
        known = {id(t) for t in before}
        for t in (t for o in objects for t in tensors(o) if id(t) not in known):
            t.zero_()
        for t, v in zip(before, saved):
            t.copy_(v)
    for g, state in zip(generators, rng):
        g.set_state(state)


class CudaGraph:
    """fn(x) -> dict of tensors, x a tensor, a dict of tensors or absent, captured once as a CUDA graph: each call
    copies its x into the graph's own input tensors, replays the graph, and returns copies of its outputs (the next
    replay overwrites them). `state` lists what fn changes (networks, optimizers), `generators` the run's own random
    streams it draws from (torch's default CUDA generator is always kept, and needs no registering)."""

    def __init__(self, fn: Callable, x: torch.Tensor | dict | None, state: list,
                 generators: list[torch.Generator] = ()):
        for opt in (o for o in state if isinstance(o, torch.optim.Optimizer)):
            for group in opt.param_groups:
                group["capturable"] = True  # Adam's step count stays on the GPU: no host sync in a graph
        self.x = {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else None if x is None else x.clone()
        self.fn = fn if x is None else (lambda: fn(self.x))
        self.graph = torch.cuda.CUDAGraph()
        default = torch.cuda.default_generators[torch.cuda.current_device()]
        with state_kept(state, [default, *generators]):
            # Warm-up on a side stream (PyTorch's recipe): the first calls allocate what a graph cannot (Adam's
            # moments, cuBLAS workspaces, autograd's buffers); state_kept then undoes their updates.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            with warnings.catch_warnings():  # each replay then draws fresh numbers from g's stream (newer PyTorch
                warnings.simplefilter("ignore")  # registers a generator on first use, and deprecates this call)
                for g in generators:
                    self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn()

    def __call__(self, x: torch.Tensor | dict | None = None) -> dict[str, torch.Tensor]:
        if isinstance(self.x, dict):  # a batch may carry more fields than the graph reads (D's log pi_D)
            for k, v in self.x.items():
                v.copy_(x[k])
        elif self.x is not None:
            self.x.copy_(x)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}


# ==================================================================================================================
# 13. Command-line entry
# ==================================================================================================================
def parse_args(argv: list[str] | None = None) -> Args:
    """tyro's parser, with its framed error box (an unknown --env, say) folded into one line: `error: ...`, exit 2."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(Args, args=argv)
    except SystemExit as e:
        if e.code:  # tyro's box: strip its frame, keep the message, drop the pointer to --help
            lines = [ln.strip(" │╭╮╰╯─\n") for ln in err.getvalue().splitlines()]
            msg = " ".join(ln for ln in lines[1:] if ln and not ln.startswith("For full helptext"))
            msg = msg.split(" Argument helptext:")[0]
            print(f"error: {msg or err.getvalue().strip()} (see --help)", file=sys.stderr)
            raise SystemExit(2) from None
        sys.stderr.write(err.getvalue())
        raise


if __name__ == "__main__":
    cli_args = parse_args()
    try:
        main(cli_args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        ck = Path(cli_args.output_dir) / run_name(cli_args) / "checkpoint.pt"
        kept = "the checkpoint of the last evaluation is kept, continue with --resume"
        print(f"\ninterrupted; {kept if ck.exists() else 'before the first checkpoint: the same command starts over'}",
              file=sys.stderr)
        sys.exit(130)
