"""Tests for adept.py: seeded, offline, small data. Run: pytest -q test_adept.py"""

import ast
import copy
import csv
import itertools
import shutil
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import dataclasses
import typing
import warnings

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # Minari's download then fails at once instead of retrying for ~20 s

import adept  # noqa: E402
from adept import Args  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZE = 1000  # transitions of the tiny random dataset the tests share
CUDA = os.environ.get("ADEPT_TEST_CUDA") == "1"  # the GPU check (bench/gpu_check.sh) runs the end-to-end tests on CUDA


@pytest.fixture(scope="session", autouse=True)
def minari_store(tmp_path_factory):
    """A private Minari store, so tests never touch (or depend on) the user's datasets."""
    store = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    return store


@pytest.fixture(scope="session")
def data(minari_store):
    return adept.load_transitions(Args(dataset_size=SIZE))


def tiny(tmp_path, **kw) -> Args:
    """Every phase of a run, at a size that takes seconds."""
    base = dict(dataset_size=SIZE, total_steps=40, eval_every=20, eval_episodes=2, log_every=20, batch_size=32,
                hidden=32, cuda=CUDA, output_dir=str(tmp_path), world_model_steps=50, behavior_steps=20,
                model_hidden=32, is_batch_size=64, rollout_every=10, rollout_batch_size=8, model_buffer_size=1000,
                diag_samples=64, sim_check_states=16)
    return Args(**{**base, **kw})


def load(path) -> dict:
    """A checkpoint or cache file, its tensors on the CPU where the tests make theirs (the runs may be on CUDA)."""
    return torch.load(path, weights_only=False, map_location="cpu")


def run_cli(*argv, **env):
    return subprocess.run([sys.executable, "adept.py", *argv], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def test_help_without_warnings_and_every_field_documented():
    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for flag in ("--env", "--dataset", "--agent", "--seed", "--cuda", "--no-cuda", "--total-steps", "--eval-every",
                 "--eval-episodes", "--dataset-size", "--output-dir", "--resume", "--no-world-model",
                 "--world-model-steps", "--horizon", "--is-batch-size", "--no-importance-sampling"):
        assert flag in r.stdout, flag
    # a docstring under every field of Args (tyro turns them into the --help text)
    cls = next(n for n in ast.parse((HERE / "adept.py").read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "Args")
    body = cls.body
    fields = [i for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    assert len(fields) == len(adept.dataclasses.fields(Args))
    for i in fields:
        nxt = body[i + 1] if i + 1 < len(body) else None
        assert isinstance(nxt, ast.Expr) and isinstance(nxt.value.value, str), body[i].target.id


def test_offline_official_dataset_fails_with_a_short_message(tmp_path):
    r = run_cli("--dataset", "mujoco/hopper/medium-v0", "--no-world-model", "--output-dir", str(tmp_path))
    assert r.returncode == 2
    assert f"mujoco/hopper/medium-v0 is not in the local Minari store ({os.environ['MINARI_DATASETS_PATH']}, set by " \
           "MINARI_DATASETS_PATH)" in r.stderr
    assert "--dataset random, medium or medium-replay" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder for a run that could not start


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    make_official_dataset("mujoco/hopper/expert-v0", refs=(0.0, 1.0))
    for kw in (dict(dataset="mujoco/hopper/medium-v0"), dict(env="halfcheetah", dataset="mujoco/hopper/expert-v0")):
        args = tiny(tmp_path / "runs", world_model=False, **kw)  # a dataset not there; one of another env
        with pytest.raises(adept.UserError):
            adept.main(args)
        assert not (tmp_path / "runs" / adept.run_name(args)).exists()
    made_before = tmp_path / "runs" / adept.run_name(args)  # a folder made by another (the sweep) is left as it was
    made_before.mkdir()
    with pytest.raises(adept.UserError):
        adept.main(args)
    assert made_before.is_dir() and list(made_before.iterdir()) == []


def test_help_has_one_default_per_option_and_names_the_run_name_suffixes():
    r = run_cli("--help")
    blocks = r.stdout.split("│ --")[1:]
    assert len(blocks) > 50 and all(b.count("(default") <= 1 for b in blocks), \
        [b.split()[0] for b in blocks if b.count("(default") > 1]
    run_name = next(b for b in blocks if b.startswith("run-name"))
    for suffix in ("-noclip", "-lambda", "-iwulr", "-pool", "-samples", "-upenalty", "-uthreshold"):
        assert suffix in run_name, suffix


@pytest.mark.parametrize("argv, expect", [
    (["--env", "ant"], "ant"), (["--agent", "td3"], "td3"), (["--dataset", "replay"], "replay"),
    (["--total-steps", "-5"], "--total-steps must be positive"), (["--batch-size", "0"], "--batch-size"),
    (["--total-steps", "abc"], "--total-steps"),
])
def test_bad_input_is_a_short_error_with_exit_code_2(argv, expect):
    r = run_cli(*argv)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[0].startswith("error: ") and "│" not in r.stderr, r.stderr


@pytest.mark.parametrize("field, value", [("total_steps", 0), ("batch_size", -1), ("eval_episodes", 0),
                                          ("is_batch_size", 0), ("horizon", 0), ("model_ratio", 1.5),
                                          ("gamma", 2.0), ("lr", 0.0), ("seed", -1)])
def test_check_args_rejects_bad_budgets(field, value):
    with pytest.raises(adept.UserError, match=f"^--{field.replace('_', '-')} must"):
        adept.check_args(Args(**{field: value}))


def test_check_args_rejects_settings_that_do_not_fit_together():
    with pytest.raises(adept.UserError, match="--model-buffer-size 100 is smaller than one PE's transitions"):
        adept.check_args(Args(model_buffer_size=100, rollout_batch_size=250, horizon=10))
    adept.check_args(Args(model_buffer_size=100, rollout_batch_size=250, horizon=10, world_model=False))
    with pytest.raises(adept.UserError, match="--no-is-self-normalize"):
        adept.check_args(Args(is_resample_pool=256, is_self_normalize=False))


def test_resume_without_checkpoint_is_a_user_error(tmp_path, data):
    with pytest.raises(adept.UserError, match="no checkpoint"):
        adept.main(tiny(tmp_path, resume=True, world_model=False))


def test_results_without_a_checkpoint_are_never_trained_over(tmp_path, data):
    """A run folder as git keeps it (metrics.csv and summary.json; checkpoints are ignored): a new run refuses it."""
    adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    run = tmp_path / "hopper-random-sac-s0"
    (run / "checkpoint.pt").unlink()
    before = {f: (run / f).read_bytes() for f in ("metrics.csv", "summary.json")}
    with pytest.raises(adept.UserError, match="holds a run's results but no checkpoint"):
        adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    assert {f: (run / f).read_bytes() for f in before} == before


def test_a_corrupt_local_dataset_is_rebuilt(tmp_path, monkeypatch, capsys):
    """Local data is derived: a folder that cannot be read (a build cut short by an older version) is rebuilt."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    args = Args(dataset_size=200)
    first, _ = adept.load_transitions(args)
    (tmp_path / "adept/hopper/random-200-v0/data/main_data.hdf5").write_bytes(b"not an hdf5 file")
    again, _ = adept.load_transitions(args)
    assert "unreadable" in capsys.readouterr().out
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # a rebuild killed while it deleted the corrupt folder: data/ gone, other files left; the next build replaces them
    shutil.rmtree(tmp_path / "adept/hopper/random-200-v0/data")
    assert (tmp_path / "adept/hopper/random-200-v0/transitions.npz").exists()
    third, _ = adept.load_transitions(args)
    np.testing.assert_array_equal(first["s"], third["s"])


def test_a_flat_copy_that_cannot_be_written_leaves_the_dataset_alone(tmp_path, monkeypatch, capsys):
    """A full disk while writing the flat copy is not a corrupt dataset: it loads, and nothing is deleted."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    args = Args(dataset_size=200)
    first, _ = adept.load_transitions(args)
    (tmp_path / "adept/hopper/random-200-v0/transitions.npz").unlink()
    write = adept.atomic_write

    def full_disk(path, f):
        if path.name == "transitions.npz":
            raise OSError(28, "No space left on device")
        write(path, f)
    monkeypatch.setattr(adept, "atomic_write", full_disk)
    monkeypatch.setattr(adept, "collect", lambda *a, **k: pytest.fail("collected the dataset again"))
    again, _ = adept.load_transitions(args)
    assert "could not write the flat copy" in capsys.readouterr().out
    np.testing.assert_array_equal(first["s"], again["s"])


def test_a_corrupt_flat_copy_is_rebuilt_from_minari_without_collecting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    args = Args(dataset_size=200)
    first, _ = adept.load_transitions(args)
    (tmp_path / "adept/hopper/random-200-v0/transitions.npz").write_bytes(b"not an npz file")
    monkeypatch.setattr(adept, "collect", lambda *a, **k: pytest.fail("collected the dataset again"))
    again, _ = adept.load_transitions(args)
    assert "rebuilding it from the Minari dataset" in capsys.readouterr().out
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    with np.load(tmp_path / "adept/hopper/random-200-v0/transitions.npz") as z:  # and the copy is whole again
        np.testing.assert_array_equal(z["s"], first["s"])


def test_waiting_on_another_process_lock_prints_a_line(tmp_path, capsys):
    import fcntl
    import threading
    lock = tmp_path / "build.lock"
    with adept.file_lock(lock):  # free: no line
        pass
    assert "waiting" not in capsys.readouterr().out
    with open(lock, "a") as other:  # another open file: flock treats it as another process's
        fcntl.flock(other, fcntl.LOCK_EX)
        threading.Timer(0.3, fcntl.flock, (other, fcntl.LOCK_UN)).start()
        with adept.file_lock(lock):
            pass
    assert f"waiting for another process that holds {lock}" in capsys.readouterr().out


def test_progress_prints_at_least_ten_lines_in_a_phase(capsys):
    p = adept.Progress("short", 40, 1000)
    for t in range(1, 41):
        p.update(t)
    assert capsys.readouterr().out.count("[short]") == 10
    p = adept.Progress("long", 10_000, 1000)
    for t in range(1, 10_001):
        p.update(t)
    assert capsys.readouterr().out.count("[long]") == 10


def test_a_corrupt_official_dataset_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_official_dataset("mujoco/hopper/medium-v0", refs=(-20.0, 3000.0))
    (tmp_path / "mujoco/hopper/medium-v0/data/main_data.hdf5").write_bytes(b"not an hdf5 file")
    with pytest.raises(adept.UserError, match="unreadable.*download it again"):
        adept.load_transitions(Args(dataset="mujoco/hopper/medium-v0"))


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_random_dataset_is_built_in_minari_and_reloaded(data, minari_store):
    d, refs = data
    assert refs == {"random": -20.272305, "expert": 3234.3, "source": "dataset metadata"}  # D4RL's, in the metadata
    assert (minari_store / "adept/hopper/random-1000-v0/data").is_dir()
    assert d["s"].shape == (SIZE, 11) and d["a"].shape == (SIZE, 3) and d["r"].shape == (SIZE,)
    assert np.abs(d["a"]).max() <= 1.0 and d["a"].std() > 0.5  # uniform in [-1, 1]: std 0.577
    # transitions chain inside episodes; terminations and truncations are kept apart
    ends = (d["terminal"] + d["timeout"]) > 0
    np.testing.assert_array_equal(d["s_next"][:-1][~ends[:-1]], d["s"][1:][~ends[:-1]])
    assert d["terminal"].sum() > 10 and d["timeout"][-1] == 1 and not (d["terminal"] * d["timeout"]).any()
    again, _ = adept.load_transitions(Args(dataset_size=SIZE))  # from disk, not rebuilt
    for k in d:
        np.testing.assert_array_equal(d[k], again[k])


def test_dataset_matches_the_simulator(data):
    """set_state with an observation's joint positions and velocities, then the dataset's action, reproduces the
    dataset's next observation and reward: the basis of the simulator check of the world model."""
    d, _ = data
    env = gym.make("Hopper-v5")
    sim = env.unwrapped
    ok = np.flatnonzero((np.abs(d["s"][:, 5:]).max(1) < 9.9) & (np.abs(d["s_next"][:, 5:]).max(1) < 9.9))[:50]
    assert len(ok) == 50
    for i in ok:
        env.reset(seed=0)
        sim.set_state(np.concatenate([[0.0], d["s"][i, :5]]), d["s"][i, 5:])
        obs, r, *_ = env.step(d["a"][i])
        np.testing.assert_allclose(obs, d["s_next"][i], atol=1e-4)
        assert abs(r - d["r"][i]) < 1e-4


def test_normalizer_round_trip(data):
    obs = torch.as_tensor(data[0]["s"])
    norm = adept.Normalizer(obs.mean(0), obs.std(0))
    z = norm(obs)
    assert torch.allclose(z.mean(0), torch.zeros(11), atol=1e-4)
    assert torch.allclose(z.std(0), obs.std(0) / (obs.std(0) + 1e-3), atol=1e-4)  # std + eps, as CORL
    assert torch.allclose(norm.inverse(z), obs, atol=1e-4)
    assert set(norm.state_dict()) == {"mean", "std"}  # statistics travel with the checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Losses on hand-made tensors
# ---------------------------------------------------------------------------------------------------------------
def test_expectile_loss_is_asymmetric():
    assert adept.expectile_loss(torch.tensor([2.0]), 0.7).item() == pytest.approx(0.7 * 4)
    assert adept.expectile_loss(torch.tensor([-2.0]), 0.7).item() == pytest.approx(0.3 * 4)
    assert adept.expectile_loss(torch.tensor([2.0, -2.0]), 0.5).item() == pytest.approx(0.5 * 4)


def test_sac_target_and_losses():
    r, d = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    y = adept.sac_target(r, d, q_next=torch.tensor([5.0, 5.0]), logp_next=torch.tensor([-1.0, -1.0]), alpha=0.5,
                         gamma=0.9)
    assert y.tolist() == pytest.approx([1 + 0.9 * (5 + 0.5), 1.0])  # a termination does not bootstrap
    q = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])  # (2 critics, 3 samples): each critic's mean, summed
    assert adept.critic_loss(q, torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(5 / 3 + 5 / 3)
    assert adept.critic_loss(q, torch.tensor([1.0, 2.0, 4.0])).item() == pytest.approx(0 + (4 + 0 + 16) / 3)
    for logp, sign in ((0.0, 1), (5.0, -1)):  # entropy 0 above the target -3, then -5 below it
        log_alpha = torch.zeros(1, requires_grad=True)
        adept.sac_alpha_loss(log_alpha, torch.tensor([logp]), -3.0).backward()
        assert log_alpha.grad.item() * sign > 0  # a gradient step lowers alpha above the target, raises it below
    assert adept.sac_actor_loss(torch.tensor([1.0]), torch.tensor([-2.0]), 0.5).item() == pytest.approx(-2.0)
    assert adept.iql_q_target(r, d, torch.tensor([3.0, 3.0]), 0.5).tolist() == pytest.approx([2.5, 1.0])
    # AWR: exp(beta A) is clamped at 100
    loss = adept.awr_actor_loss(torch.tensor([-1.0, -1.0]), torch.tensor([0.0, 10.0]), 3.0)
    assert loss.item() == pytest.approx((1.0 + 100.0) / 2)


def test_agents_bootstrap_from_the_smaller_of_the_twin_target_critics(monkeypatch):
    """Clipped double-Q: SAC's target and IQL's value target take min_j Q'_j, here 1 of the target heads 1 and 5,
    whichever of the two heads says 1."""
    torch.manual_seed(0)
    b = _marked_buffer(64, 0.0).sample(32)
    for (name, fn, position), (v1, v2) in itertools.product(
            (("sac", "sac_target", 2), ("iql", "expectile_loss", 0)), ((1.0, 5.0), (5.0, 1.0))):  # q_next; q_t - V
        agent = adept.AGENTS[name](2, 1, Args(hidden=16), torch.device("cpu"))
        with torch.no_grad():
            for head, value in ((agent.q_target.q1, v1), (agent.q_target.q2, v2)):
                head[-1].weight.zero_(), head[-1].bias.fill_(value)
            if name == "iql":
                agent.v[-1].weight.zero_(), agent.v[-1].bias.zero_()  # V = 0, so q_t - V is q_t
        seen, original = [], getattr(adept, fn)
        monkeypatch.setattr(adept, fn, lambda *a, original=original: seen.append(a[position]) or original(*a))
        agent.update(b)
        assert torch.equal(seen[0], torch.ones(32)), (name, v1, v2)
        monkeypatch.undo()


def test_bc_log_likelihood_is_finite_at_the_action_bounds():
    pi = adept.GaussianActor(4, 3, 16)
    for p in pi.parameters():
        torch.nn.init.zeros_(p)  # mean tanh(0) = 0, log std 0
    a = torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    logp = pi.log_prob(torch.zeros(2, 4), a)
    expected = [3 * (-0.5 - 0.5 * math.log(2 * math.pi)), 3 * (-0.5 * math.log(2 * math.pi))]
    assert logp.tolist() == pytest.approx(expected, rel=1e-5)
    assert adept.bc_loss(logp).item() == pytest.approx(-sum(expected) / 2, rel=1e-5)
    sac_pi = adept.TanhGaussianActor(4, 3, 16)
    assert torch.isfinite(sac_pi.log_prob(torch.zeros(2, 4), a)).all()


def test_tanh_gaussian_sample_log_prob_agrees_with_log_prob():
    torch.manual_seed(0)
    pi = adept.TanhGaussianActor(4, 2, 16)
    s = torch.randn(64, 4)
    a, logp = pi.sample(s)
    inside = a.abs().max(1).values < 0.999
    assert inside.sum() > 48 and torch.allclose(pi.log_prob(s, a)[inside], logp[inside], atol=1e-3)
    # the density itself, against torch's own tanh-transformed Gaussian (tanh_log_det is shared by both above)
    u = torch.linspace(-5, 5, 101)[:, None]
    naive = torch.log1p(-torch.tanh(u.double()) ** 2).sum(-1).float()  # in double: in float32 it loses digits
    assert torch.allclose(adept.tanh_log_det(u), naive, atol=1e-4)
    mu, log_std = pi(s)
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, log_std.exp()),
                                                      torch.distributions.TanhTransform())
    a_in = a.clamp(-0.99, 0.99)
    assert torch.allclose(pi.log_prob(s, a_in), ref.log_prob(a_in).sum(-1), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Agents, end to end: training, evaluation, checkpoint, resume
# ---------------------------------------------------------------------------------------------------------------
def _initial_agent_state(args: Args) -> dict:
    """The agent main(args) starts from: main's seeding (setup_torch) and construction (setup), nothing trained."""
    adept.setup_torch(args)
    run, _ = adept.setup(args, torch.device("cpu"), Path(args.output_dir), pretrain=False)
    return copy.deepcopy(run.agent.state_dict())


@pytest.mark.parametrize("agent", ["sac", "iql", "bc"])
def test_agent_alone_trains_evaluates_checkpoints_and_resumes(tmp_path, data, agent, capsys):
    initial = _initial_agent_state(tiny(tmp_path, agent=agent, world_model=False))
    s = adept.main(tiny(tmp_path, agent=agent, world_model=False))
    assert "(mean of the last 2 evaluations" in capsys.readouterr().out
    run = tmp_path / f"hopper-random-{agent}-s0"
    assert s["counts"]["policy_updates"] == 40 and s["counts"]["evaluations"] == 2
    assert s["counts"]["checkpoints"] == 2 and s["counts"]["rollouts"] == 0 and s["mode"] == "none"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [20, 40]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("normalized_score", "normalized_score_std", "return", "env", "dataset", "agent", "seed",
                "total_steps", "train_steps_per_second", "wall_seconds", "machine"):
        assert key in summary, key
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["threads"] == 1
    assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["normalized_score"] == pytest.approx(
        100 * (summary["return"] + 20.272305) / (3234.3 + 20.272305))
    ck = load(run / "checkpoint.pt")
    assert ck["step"] == 40
    for part in ("actor", "q") if agent != "bc" else ("actor",):  # training moved every layer's weights
        before, after = dict(_tensors(initial[part])), dict(_tensors(ck["agent"][part]))
        assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before), part

    resumed = adept.main(tiny(tmp_path, agent=agent, world_model=False, total_steps=60, resume=True))
    assert resumed["counts"]["policy_updates"] == 60 and resumed["counts"]["evaluations"] == 3
    assert [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [20, 40, 60]
    if agent == "sac":  # the same command again does not train over the results; --resume of a finished run keeps them
        with pytest.raises(adept.UserError, match="already holds a run"):
            adept.main(tiny(tmp_path, agent=agent, world_model=False, total_steps=60))
        again = adept.main(tiny(tmp_path, agent=agent, world_model=False, total_steps=60, resume=True))
        assert again["counts"]["policy_updates"] == 60 and again["normalized_score"] == resumed["normalized_score"]
        assert again["wall_seconds"] == resumed["wall_seconds"]  # its summary kept, not rewritten with no training
        assert [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [20, 40, 60]
        # killed after the last checkpoint, before its summary: the summary on disk is the 40-step stage's
        (run / "summary.json").write_text(json.dumps({**resumed, "total_steps": 40}))
        healed = adept.main(tiny(tmp_path, agent=agent, world_model=False, total_steps=60, resume=True))
        assert healed["total_steps"] == 60 and healed["normalized_score"] == resumed["normalized_score"]
        assert json.loads((run / "summary.json").read_text())["total_steps"] == 60
        assert healed["counts"]["policy_updates"] == 60  # no step trained again


def test_resume_continues_exactly(tmp_path, data, capsys):
    """40 steps, stop, resume to 60 == 60 steps straight: the checkpoint holds everything the run needs, the world
    model and pi_D included (the resumed run finds no cache, and pretrains nothing)."""
    straight = adept.main(tiny(tmp_path / "a", total_steps=60))
    adept.main(tiny(tmp_path / "b", total_steps=40))
    for cache in ("world_models", "behavior_policies"):
        shutil.rmtree(tmp_path / "b" / cache)
    capsys.readouterr()
    resumed = adept.main(tiny(tmp_path / "b", total_steps=60, resume=True))
    out = capsys.readouterr().out
    assert "[world model]" not in out and "[behavior policy" not in out and "saved" not in out, out
    assert not (tmp_path / "b/world_models").exists() and resumed["counts"]["world_model_pretrain_steps"] == 50
    assert resumed["extended_from"] == [40] and "extended_from" not in straight
    ck_a = load(tmp_path / "a/hopper-random-adept-sac-s0/checkpoint.pt")
    ck_b = load(tmp_path / "b/hopper-random-adept-sac-s0/checkpoint.pt")
    for part in ("agent", "wm", "wm_opt"):  # every weight and optimizer moment
        a, b = dict(_tensors(ck_a[part])), dict(_tensors(ck_b[part]))
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert straight["normalized_score"] == resumed["normalized_score"]
    assert resumed["rollout_transitions_per_second"] > 0  # measured on this process's rollouts only


def test_a_second_process_on_a_running_run_stops(tmp_path, data):
    """Two processes on one run folder would mix their checkpoints and metrics: while one holds the folder's lock
    (here another open file, which flock treats as another process's), a second start is refused and changes nothing."""
    import fcntl
    adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    run = tmp_path / "hopper-random-sac-s0"
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    with open(run / ".lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(adept.UserError, match="another process is running"):
            adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True))
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    assert adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True))["total_steps"] == 40  # freed


def test_a_run_killed_between_checkpoint_and_metrics_resumes(tmp_path, data, monkeypatch):
    """At an evaluation the checkpoint is written before metrics.csv: a run killed between the two at its first
    evaluation resumes, rather than being refused as results without a checkpoint, and metrics.csv is whole after."""
    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(adept, "write_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        adept.main(tiny(tmp_path, total_steps=40, world_model=False))
    run = tmp_path / "hopper-random-sac-s0"
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.csv").exists()
    monkeypatch.undo()
    adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True))
    assert [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [20, 40]


def test_checkpoint_size_follows_the_rows_it_holds(tmp_path, data):
    """D_hat is saved as its filled rows: a buffer of 200k rows' capacity holding ~300 makes no larger a file."""
    sizes = {}
    for cap in (1000, 200_000):  # 200k rows of hopper's 27 floats are 21.6 MB
        adept.main(tiny(tmp_path / str(cap), model_buffer_size=cap))
        ck = tmp_path / str(cap) / "hopper-random-adept-sac-s0/checkpoint.pt"
        assert load(ck)["D_hat"]["s"].shape[0] < 1000
        sizes[cap] = ck.stat().st_size
    assert sizes[200_000] < 1.05 * sizes[1000], sizes


def test_wall_time_continues_across_a_resume(tmp_path, data):
    """A resumed run's wall time starts from the checkpoint's, not from 0: here the checkpoint says 1000 s."""
    adept.main(tiny(tmp_path, total_steps=40, world_model=False))
    path = tmp_path / "hopper-random-sac-s0/checkpoint.pt"
    ck = load(path)
    assert 0 < ck["wall_seconds"] < 1000
    ck["wall_seconds"] = 1000.0
    torch.save(ck, path)
    s = adept.main(tiny(tmp_path, total_steps=60, world_model=False, resume=True))
    walls = [float(r["wall_seconds"]) for r in csv.DictReader(open(tmp_path / "hopper-random-sac-s0/metrics.csv"))]
    assert walls[1] < 1000 < walls[2] <= s["wall_seconds"] < 1000 + 300


def test_resume_on_another_device_goes_on(tmp_path, data, capsys):
    """A checkpoint written on a GPU holds CUDA generator states (16 bytes), which a CPU generator refuses, and the
    reverse: resumed on the other device, the IWU's and PE's extra-sample streams start over from their seeds, and
    the run goes on."""
    adept.main(tiny(tmp_path, total_steps=20))
    path = tmp_path / "hopper-random-adept-sac-s0/checkpoint.pt"
    ck = load(path)
    here = ck["rng_device"]
    assert here == ("cuda" if CUDA else "cpu")
    other, state = ("cuda", torch.zeros(16, dtype=torch.uint8)) if here == "cpu" else ("cpu", torch.get_rng_state())
    ck.update(rng_device=other, iwu_rng=state, uncertainty_rng=state)
    torch.save(ck, path)
    if here == "cpu":
        with pytest.raises(RuntimeError):  # what set_state does with a CUDA generator's state
            torch.Generator("cpu").set_state(state)
    s = adept.main(tiny(tmp_path, total_steps=40, resume=True))
    assert s["counts"]["policy_updates"] == 40 and f"written on {other}" in capsys.readouterr().out


def test_resume_refuses_a_changed_dataset(tmp_path, data):
    """D is normalized with statistics recomputed at the resume: a checkpoint made on other data is refused."""
    adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    path = tmp_path / "hopper-random-sac-s0/checkpoint.pt"
    adept.main(tiny(tmp_path, total_steps=30, world_model=False, resume=True))  # the same data: resumes
    ck = load(path)
    ck["normalizer"]["mean"][0] += 0.01
    torch.save(ck, path)
    with pytest.raises(adept.UserError, match="the dataset has changed"):
        adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True))


def test_resume_refuses_other_settings(tmp_path, data):
    adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    with pytest.raises(adept.UserError, match=r"other settings \(--lr 0.0003 -> 0.001; --gamma 0.99 -> 0.9\)"):
        adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True, lr=1e-3, gamma=0.9))
    with pytest.raises(adept.UserError, match="past --total-steps 10"):
        adept.main(tiny(tmp_path, total_steps=10, world_model=False, resume=True))
    s = adept.main(tiny(tmp_path, total_steps=40, world_model=False, resume=True, log_every=5, threads=2))
    assert s["counts"]["policy_updates"] == 40  # the machine, the logging and the budget may change


def test_tensorboard_events_hold_the_metrics_once_across_a_resume(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "hopper-random-adept-sac-s0"
    adept.main(tiny(tmp_path, total_steps=20))
    shutil.copy(run / "checkpoint.pt", tmp_path / "step20.pt")
    adept.main(tiny(tmp_path, total_steps=40, resume=True))
    shutil.copy(tmp_path / "step20.pt", run / "checkpoint.pt")  # as if killed after step 40's events, before its checkpoint
    adept.main(tiny(tmp_path, total_steps=40, resume=True))
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/normalized_score", "eval/return", "model/eps_pi", "model/sim_state_error", "train/q_loss",
            "train/wm_loss"} <= set(tags), tags
    assert [e.step for e in events.Scalars("eval/normalized_score")] == [20, 40]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [e.value for e in events.Scalars("model/eps_pi")] == pytest.approx([float(r["eps_pi"]) for r in rows])
    steps = [e.step for e in events.Scalars("train/q_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step twice


def test_a_run_without_the_tensorboard_package_writes_no_events_and_finishes(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as on a machine without the package
    s = adept.main(tiny(tmp_path, total_steps=20, world_model=False))
    assert s["counts"]["evaluations"] == 1 and "tensorboard is not installed" in capsys.readouterr().out
    assert not list((tmp_path / "hopper-random-sac-s0").glob("events.out.tfevents.*"))


def _tensors(sd, prefix=""):
    """The tensors of a nested state dict (networks, optimizers), with dotted names."""
    for k, v in sd.items():
        if torch.is_tensor(v):
            yield f"{prefix}{k}", v
        elif isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")


# ---------------------------------------------------------------------------------------------------------------
# World model: schedule, guided sampling on a toy system, importance weights, weighted loss, rollouts
# ---------------------------------------------------------------------------------------------------------------
def test_cosine_schedule_shape_and_bounds():
    K, s = 10, 1e-4
    sch = adept.cosine_schedule(K, s)
    assert all(v.shape == (K,) for v in sch.values())
    assert ((sch["betas"] > 0) & (sch["betas"] <= 0.999)).all()
    ab = sch["alpha_bar"]
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-3 and 0.9 < ab[0] < 1
    f = lambda k: math.cos((k / K + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert ab[0].item() == pytest.approx(f(1) / f(0), rel=1e-5)
    assert sch["post_var"][0].item() == pytest.approx(0.0, abs=1e-7)  # the last reverse step is the mean
    assert (sch["post_var"][1:] > 0).all()
    # the posterior mean c0 x_0 + ck x_k: at k = 1 it is x_0, and it keeps the marginal mean, E[x_{k-1}|x_0]
    assert sch["post_c0"][0].item() == pytest.approx(1.0) and sch["post_ck"][0].item() == pytest.approx(0.0, abs=1e-7)
    ab_prev = torch.cat([torch.ones(1), ab[:-1]])
    assert torch.allclose(sch["post_c0"] + sch["post_ck"] * ab.sqrt(), ab_prev.sqrt(), atol=1e-5)


A_TOY = torch.tensor([[0.9, 0.2], [-0.1, 0.8]])
B_TOY = torch.tensor([[0.5], [-0.3]])
SIGMA_TOY = 0.3  # K = 10 cannot resolve a much smaller spread: its last step returns E[x_0|x_1] (see README)


@pytest.fixture(scope="module")
def toy_model():
    """The world model trained on s' = A s + B a + 0.3 N(0, I), with s ~ N(0, I), a ~ U[-1, 1]."""
    torch.manual_seed(0)
    n = 20_000
    s, a = torch.randn(n, 2), torch.rand(n, 1) * 2 - 1
    s2 = s @ A_TOY.T + a @ B_TOY.T + SIGMA_TOY * torch.randn(n, 2)
    D = adept.Buffer(n, 2, 1, torch.device("cpu"))
    D.add({"s": s, "a": a, "r": s2[:, 0], "s_next": s2, "terminal": torch.zeros(n)})
    wm = adept.WorldModel(2, 1, hidden=128, depth=3, K=10, guidance_weight=0.1, cond_drop_prob=0.1)
    wm.set_ranges(s2, s2[:, 0])
    opt = torch.optim.Adam(wm.parameters(), lr=1e-3)
    for _ in range(4000):
        adept.world_model_update(wm, opt, D.sample(256))
    return wm


def test_toy_conditional_samples_match_the_true_conditional(toy_model):
    torch.manual_seed(1)
    for s, a in [([0.0, 0.0], [0.0]), ([1.0, -0.5], [0.8]), ([-1.2, 0.7], [-0.6])]:
        s, a = torch.tensor([s]).repeat(4000, 1), torch.tensor([a]).repeat(4000, 1)
        x = toy_model.sample(s, a)
        true_mean = (s[0] @ A_TOY.T + a[0] @ B_TOY.T)
        assert (x.mean(0) - true_mean).abs().max() < SIGMA_TOY / 3, (x.mean(0), true_mean)
        # the K = 10 sampler under-disperses (analytically x0.88 at this spread; guidance narrows it a little more)
        assert ((x.std(0) > 0.5 * SIGMA_TOY) & (x.std(0) < 1.2 * SIGMA_TOY)).all(), x.std(0)
        # the reward model learned r = s'_0
        r, _ = toy_model.reward_terminal(s[:500], a[:500], x[:500])
        assert (r - x[:500, 0]).abs().mean() < 0.15


def test_toy_unconditional_branch_ignores_the_condition(toy_model):
    torch.manual_seed(4)
    x, k = torch.randn(64, 2), torch.randint(1, 11, (64,))
    null = torch.zeros(64, 1)
    e1 = toy_model.eps_theta(x, k, torch.randn(64, 3), null)
    e2 = toy_model.eps_theta(x, k, torch.randn(64, 3), null)
    assert torch.equal(e1, e2)
    # sampling with omega = 0 (w = -1, only the null branch) gives the marginal, whatever the condition
    toy_model.guidance_weight = -1.0
    try:
        torch.manual_seed(2)
        x1 = toy_model.sample(torch.full((4000, 2), 1.5), torch.ones(4000, 1))
        torch.manual_seed(2)
        x2 = toy_model.sample(torch.full((4000, 2), -1.5), -torch.ones(4000, 1))
    finally:
        toy_model.guidance_weight = 0.1
    assert torch.equal(x1, x2)
    assert (x1.std(0) > 2 * SIGMA_TOY).all()  # the marginal of s' spreads about 1, far wider than a conditional


def _weights(pi, pi_D, s, a, *args, **kw):
    return adept.importance_weights(pi.log_prob(s, a), pi_D.log_prob(s, a), *args, **kw)


def test_importance_weights():
    torch.manual_seed(0)
    pi, pi_D = adept.GaussianActor(3, 2, 16), adept.GaussianActor(3, 2, 16)
    s, a = torch.randn(256, 3), torch.rand(256, 2) * 2 - 1
    for norm in (True, False):  # identical policies: every weight is 1
        assert torch.allclose(_weights(pi, pi, s, a, 10.0, norm), torch.ones(256), atol=1e-5)
    # finite (and positive) for dataset actions at exactly +-1, with SAC's squashed policy too
    sac_pi = adept.TanhGaussianActor(3, 2, 16)
    edge = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]).repeat(10, 1)
    w = _weights(sac_pi, pi_D, torch.randn(30, 3), edge)
    assert torch.isfinite(w).all() and (w > 0).all()
    # the weights rank actions as the ratio of the two densities does
    with torch.no_grad():
        ratio = (torch.distributions.Normal(*_mu_std(pi, s)).log_prob(a).sum(-1)
                 - torch.distributions.Normal(*_mu_std(pi_D, s)).log_prob(a).sum(-1)).exp()
    w = _weights(pi, pi_D, s, a, max_weight=1e9)
    assert torch.equal(w.argsort(), ratio.argsort())
    assert torch.allclose(w, ratio / ratio.mean(), rtol=1e-4)  # self-normalized: mean 1
    assert torch.allclose(_weights(pi, pi_D, s, a, 1e9, False), ratio, rtol=1e-4)  # --no-is-self-normalize
    # truncation at --is-max-weight, after self-normalization (the rest keep their values)
    log_pi = torch.zeros(64)
    log_pi[:4] = 5.0
    w_inf = adept.importance_weights(log_pi, torch.zeros(64), max_weight=math.inf)
    assert (w_inf > 2).sum() == 4 and (w_inf < 2).sum() == 60
    assert torch.equal(adept.importance_weights(log_pi, torch.zeros(64), max_weight=2.0), w_inf.clamp(max=2.0))
    # a narrow policy far from the data gives weights near 1e-40; below 1e-8 they are exactly 0 (no subnormals)
    narrow = adept.GaussianActor(3, 2, 16)
    with torch.no_grad():
        narrow.net[-1].weight.zero_(), narrow.net[-1].bias.copy_(torch.tensor([3.0, 3.0, -5.0, -5.0]))
    w = _weights(narrow, pi_D, s, a, max_weight=1e9)
    assert (w == 0).any() and ((w == 0) | (w >= 1e-8)).all() and w.sum() > 0
    # raw ratios all far below 1 keep their relative sizes: the floor is 1e-8 of the largest, not an absolute 1e-8
    log_pi = torch.tensor([-30.0, -31.0, -60.0])
    raw = adept.importance_weights(log_pi, torch.zeros(3), self_normalize=False)
    assert torch.allclose(raw[:2], log_pi[:2].exp(), rtol=1e-5, atol=0.0) and raw[2] == 0.0


def _mu_std(pi, s):
    mu, log_std = pi.mean_log_std(s)
    return mu, log_std.exp()


def test_weighted_world_model_loss_is_the_mean_of_w_times_l(data):
    d, _ = data
    torch.manual_seed(0)
    norm = adept.Normalizer(d["s"].mean(0), d["s"].std(0))
    D = adept.dataset_buffer(d, norm, torch.device("cpu"))
    wm = adept.WorldModel(11, 3, hidden=32)
    b, w = D.sample(64), torch.rand(64) * 3
    torch.manual_seed(5)
    l = wm.loss_per_sample(b["s"], b["a"], b["r"], b["terminal"], b["s_next"]).detach()
    torch.manual_seed(5)
    loss = adept.world_model_update(wm, torch.optim.SGD(wm.parameters(), lr=0.0), b, w)
    assert loss.item() == pytest.approx((w * l).mean().item(), rel=1e-5)
    assert adept.weighted_loss(l, torch.ones(64)).item() == pytest.approx(l.mean().item())


def test_rollouts_have_the_right_shapes_respect_clipping_and_stop_at_terminals():
    torch.manual_seed(0)
    wm = adept.WorldModel(4, 2, hidden=16)
    wm.set_ranges(torch.tensor([[-0.1, -0.2, 0.0, -0.3], [0.1, 0.2, 0.5, 0.3]]), torch.tensor([-1.0, 2.0]))
    pi, s0 = adept.TanhGaussianActor(4, 2, 16), torch.randn(32, 4)
    head = wm.reward_net[-1]  # outputs (reward, terminal logit)
    with torch.no_grad():
        head.weight.zero_(), head.bias.copy_(torch.tensor([5.0, -100.0]))  # reward 5 (above the range), never done
    out = adept.rollout(wm, pi, s0, horizon=6)
    assert out["s"].shape == (32, 6, 4) and out["a"].shape == (32, 6, 2) and out["s_next"].shape == (32, 6, 4)
    assert out["r"].shape == (32, 6) and out["terminal"].shape == (32, 6) and out["valid"].shape == (32, 6)
    assert out["valid"].all()
    assert (out["s_next"] >= wm.s_lo).all() and (out["s_next"] <= wm.s_hi).all() and (out["s_next"] == wm.s_hi).any()
    assert torch.equal(out["r"], torch.full((32, 6), 2.0))  # clipped to the data's reward range
    assert torch.equal(out["s"][:, 0], s0) and torch.equal(out["s"][:, 1:], out["s_next"][:, :-1])  # states chain
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 100.0]))  # terminal at once
    out = adept.rollout(wm, pi, s0, horizon=6)
    assert out["valid"][:, 0].all() and not out["valid"][:, 1:].any()
    # actions from the policy at each step's own state; rewards from r_eta(s, a, s'), clipped to [-1, 2]
    with torch.no_grad():
        head.weight.normal_(), head.bias.copy_(torch.tensor([0.5, -100.0]))
    out = adept.rollout(wm, pi, s0, horizon=6, deterministic=True)
    flat = {k: out[k].reshape(32 * 6, -1) for k in ("s", "a", "s_next")}
    with torch.no_grad():
        assert torch.equal(flat["a"], pi.act(flat["s"], True))
        r = wm.reward_terminal_logits(flat["s"], flat["a"], flat["s_next"])[0].clamp(-1.0, 2.0)
    assert torch.allclose(out["r"].reshape(-1), r, atol=1e-6) and r.min() < r.max()
    # a rollout that ends at step 1 stays ended, whatever the terminal head says after it
    calls = []
    def terminal_at_step_1(s, a, s_next):  # rows 0-15 end at step 1; nothing ends at any other step
        calls.append(len(calls))
        return torch.zeros(len(s)), torch.arange(len(s)).lt(16) & (len(calls) == 2)
    wm.reward_terminal = terminal_at_step_1
    out = adept.rollout(wm, pi, s0, horizon=6)
    assert out["valid"][:16, :2].all() and not out["valid"][:16, 2:].any() and out["valid"][16:].all()
    assert torch.equal(out["terminal"][:, 1], torch.arange(32).lt(16).float()) and not out["truncated"].any()


def _marked_buffer(n: int, r: float, s_dim: int = 2, a_dim: int = 1) -> adept.Buffer:
    """n transitions whose reward r marks where a batch's rows came from."""
    buf = adept.Buffer(n, s_dim, a_dim, torch.device("cpu"))
    buf.add({"s": torch.randn(n, s_dim), "a": torch.rand(n, a_dim) * 2 - 1, "r": torch.full((n,), r),
             "s_next": torch.randn(n, s_dim), "terminal": torch.zeros(n)})
    return buf


def test_policy_batches_draw_their_share_from_the_model_buffer():
    """B ~ D U D_hat: --model-ratio of each policy batch comes from D_hat once it holds data, the rest from D."""
    torch.manual_seed(0)
    D, D_hat = _marked_buffer(100, 0.0), _marked_buffer(100, 1.0)  # r = 0: dataset, r = 1: model
    assert (adept.policy_batch(D, D_hat, 32, 0.25)["r"] == 1).sum() == 8
    assert (adept.policy_batch(D, D_hat, 32, 0.5)["r"] == 1).sum() == 16
    assert (adept.policy_batch(D, adept.Buffer(100, 2, 1, torch.device("cpu")), 32, 0.5)["r"] == 0).all()  # empty
    assert (adept.policy_batch(D, None, 32, 0.5)["r"] == 0).all()  # no world model: the agent alone


def test_rank_correlation_is_spearmans():
    x, y = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4]), torch.tensor([0.3, 0.1, 0.4, 0.2, 0.5])
    assert adept.rank_correlation(x, y) == pytest.approx(-0.5)  # 1 - 6 sum d^2 / (n (n^2 - 1)), sum d^2 = 30
    assert adept.rank_correlation(x, x**3) == pytest.approx(1.0)  # any increasing map keeps the ranks


def test_uncertainty_is_zero_without_noise_and_grows_with_the_models_spread(toy_model):
    s, a = torch.tensor([[1.0, -0.5]]).repeat(500, 1), torch.tensor([[0.8]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    point = adept.WorldModel(2, 1, hidden=16)
    point.set_ranges(torch.full((1, 2), 0.3), torch.zeros(1))  # every sample clipped to one point: noise has no say
    assert torch.equal(adept.disagreement(point.sample_n(s, a, 5, g)), torch.zeros(500))
    two = torch.tensor([[[0.0, 0.0]], [[2.0, 4.0]]])  # N = 2 samples of one 2-D next state: stds sqrt(2), sqrt(8)
    assert adept.disagreement(two).shape == (1,) and adept.disagreement(two).item() == pytest.approx(math.sqrt(10))
    torch.manual_seed(3)
    u = adept.disagreement(toy_model.sample_n(s, a, 16, g))  # (500,), each from 16 samples
    # || (sigma, sigma) || = 0.42 for the true conditional; the K = 10 sampler under-disperses (see the test above)
    assert 0.5 * SIGMA_TOY * math.sqrt(2) < u.mean() < 1.2 * SIGMA_TOY * math.sqrt(2), u.mean()
    toy_model.guidance_weight = -1.0  # the unconditional branch: the marginal of s', far wider
    try:
        u_wide = adept.disagreement(toy_model.sample_n(s, a, 16, g))
    finally:
        toy_model.guidance_weight = 0.1
    assert u_wide.mean() > 2 * u.mean()


def _uncertain_model():
    torch.manual_seed(0)
    wm = adept.WorldModel(4, 2, hidden=16)
    wm.set_ranges(torch.tensor([[-1.0, -2.0, 0.0, -3.0], [1.0, 2.0, 5.0, 3.0]]), torch.tensor([-10.0, 10.0]))
    with torch.no_grad():
        wm.reward_net[-1].bias[1] = -100.0  # never terminal
    return wm, adept.TanhGaussianActor(4, 2, 16), torch.randn(32, 4)


def _seeded_rollout(wm, pi, s0, **kw):
    torch.manual_seed(1)
    return adept.rollout(wm, pi, s0, 6, generator=torch.Generator().manual_seed(2), **kw)


def test_the_uncertainty_penalty_enters_the_model_reward_exactly():
    wm, pi, s0 = _uncertain_model()
    plain = _seeded_rollout(wm, pi, s0, n_samples=5)
    penalized = _seeded_rollout(wm, pi, s0, n_samples=5, penalty=0.7)
    assert (plain["u"] > 0).all() and torch.equal(penalized["u"], plain["u"])
    assert torch.equal(penalized["r"], plain["r"] - 0.7 * plain["u"])
    assert torch.equal(penalized["s_next"], plain["s_next"])
    one = _seeded_rollout(wm, pi, s0)  # N = 1: the same states and rewards as N = 5's first samples, u = 0
    assert torch.equal(one["s_next"], plain["s_next"]) and torch.equal(one["r"], plain["r"]) and not one["u"].any()
    D_hat = adept.Buffer(1000, 4, 2, torch.device("cpu"))  # and D_hat stores the penalized reward
    D = adept.Buffer(32, 4, 2, torch.device("cpu"))
    D.add({"s": s0, "a": torch.zeros(32, 2), "r": torch.zeros(32), "s_next": s0, "terminal": torch.zeros(32)})
    args = Args(rollout_batch_size=32, horizon=6, uncertainty_samples=5, uncertainty_penalty=0.7)
    unpenalized = adept.Buffer(1000, 4, 2, torch.device("cpu"))
    for penalty, buf in ((0.7, D_hat), (0.0, unpenalized)):
        torch.manual_seed(1)
        a, g = dataclasses.replace(args, uncertainty_penalty=penalty), torch.Generator().manual_seed(2)
        roll = lambda s: adept.rollout(wm, pi, s, a.horizon, False, a.uncertainty_samples, a.uncertainty_penalty,
                                       a.uncertainty_threshold, g)
        pe = adept.policy_evaluation(roll, D, buf, a)
        assert pe["transitions"] == 32 * 6 and pe["truncated"] == 0 and pe["u_sum"] > 0
    gap = unpenalized.data["r"][:192] - D_hat.data["r"][:192]
    assert (gap > 0).all() and gap.sum().item() == pytest.approx(0.7 * pe["u_sum"], rel=1e-5)


def test_the_uncertainty_threshold_truncates_rollouts_and_does_not_terminate_them():
    wm, pi, s0 = _uncertain_model()
    plain = _seeded_rollout(wm, pi, s0, n_samples=5)
    cut = float(plain["u"][:, 0].median())  # half the rollouts pass it at their first step
    out = _seeded_rollout(wm, pi, s0, n_samples=5, threshold=cut)
    first = plain["u"][:, 0] > cut
    assert torch.equal(out["truncated"][first], torch.ones(int(first.sum()), dtype=torch.bool))
    assert out["valid"][:, 0].all() and not out["valid"][first, 1:].any()  # kept, and the rollout ends there
    assert not out["terminal"].any()  # a truncation: the last next state still bootstraps
    stop_at = (plain["u"] > cut).float().argmax(1)  # each rollout ends at its first step above the threshold
    ever = (plain["u"] > cut).any(1)
    assert torch.equal(out["valid"].sum(1)[ever], stop_at[ever] + 1) and out["valid"][~ever].all()
    assert torch.equal(out["truncated"], ever)
    assert not _seeded_rollout(wm, pi, s0, n_samples=5, threshold=1e9)["truncated"].any()


def test_uncertainty_flags_need_several_samples_and_name_the_run():
    for kw in (dict(uncertainty_penalty=1.0), dict(uncertainty_threshold=0.5)):
        with pytest.raises(adept.UserError, match="--uncertainty-samples"):
            adept.check_args(Args(**kw))
    name = adept.run_name(Args(uncertainty_samples=5, uncertainty_penalty=0.5, uncertainty_threshold=2.0))
    assert name == "hopper-random-adept-sac-samples5-upenalty0.5-uthreshold2-s0"
    assert adept.run_name(Args(uncertainty_samples=5, is_exponent=0)) == "hopper-random-adept-sac-lambda0-samples5-s0"


def test_several_samples_without_penalty_make_the_same_run_and_measure_u(tmp_path, data):
    one = adept.main(tiny(tmp_path))
    five = adept.main(tiny(tmp_path, uncertainty_samples=5))
    assert five["uncertainty_samples"] == 5 and five["uncertainty_penalty"] == 0
    cks = [load(tmp_path / name / "checkpoint.pt")
           for name in ("hopper-random-adept-sac-s0", "hopper-random-adept-sac-samples5-s0")]
    rows = [list(csv.DictReader(open(tmp_path / name / "metrics.csv")))
            for name in ("hopper-random-adept-sac-s0", "hopper-random-adept-sac-samples5-s0")]
    # Exactly the same run on the CPU. On CUDA the denoiser's matrix products over 5x the rows may take other
    # kernels (other summation orders), so the runs agree to rounding at first and then drift apart.
    if not CUDA:
        for part in ("agent", "wm", "D_hat"):
            a, b = dict(_tensors(cks[0][part])), dict(_tensors(cks[1][part]))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        for r1, r5 in zip(*rows):  # every diagnostic the same when u is measured
            for k in adept.DIAGNOSTICS + ("return", "normalized_score"):
                assert r1[k] == r5[k], k
    for r1, r5 in zip(*rows):
        assert float(r5["u_rollout"]) > 0 and float(r5["u_sim"]) > 0 and float(r5["truncated_share"]) == 0
        assert -1 <= float(r5["u_error_rank_corr"]) <= 1 and -1 <= float(r5["u_mean_error_rank_corr"]) <= 1
        assert "u_rollout" not in r1


def test_no_clip_lets_rollouts_leave_the_data_range():
    """--no-clip (Appendix C's ablation): generated states and rewards leave the data's range only without the
    clip; with it, they never do (the test above)."""
    torch.manual_seed(0)
    wm = adept.WorldModel(4, 2, hidden=16)
    wm.set_ranges(torch.tensor([[-0.1, -0.2, 0.0, -0.3], [0.1, 0.2, 0.5, 0.3]]), torch.tensor([-1.0, 2.0]))
    with torch.no_grad():
        wm.reward_net[-1].weight.zero_(), wm.reward_net[-1].bias.copy_(torch.tensor([5.0, -100.0]))
    pi, s0 = adept.TanhGaussianActor(4, 2, 16), torch.randn(32, 4)
    inside = lambda out: ((out["s_next"] >= wm.s_lo) & (out["s_next"] <= wm.s_hi)).all()  # noqa: E731
    torch.manual_seed(1)
    clipped = adept.rollout(wm, pi, s0, horizon=6)
    wm.clip = False
    torch.manual_seed(1)
    free = adept.rollout(wm, pi, s0, horizon=6)
    assert inside(clipped) and (clipped["r"] == 2.0).all()
    assert not inside(free) and (free["r"] == 5.0).all()
    assert adept.run_name(Args(clip=False)) == "hopper-random-adept-sac-noclip-s0"


# ---------------------------------------------------------------------------------------------------------------
# ADEPT end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agent", ["sac", "iql", "bc"])
def test_adept_closed_loop_runs_every_phase(tmp_path, data, agent):
    s = adept.main(tiny(tmp_path, agent=agent))
    c = s["counts"]
    assert s["mode"] == "adept" and c["world_model_pretrain_steps"] == 50
    assert c["rollouts"] == 4 * 8 and c["model_transitions"] > 0 and c["policy_updates"] == 40
    assert c["iwu_updates"] == 40 and c["evaluations"] == 2 and c["checkpoints"] == 2
    for key in ("eps_r", "eps_m", "eps_pi", "return_gap_bound", "sim_state_error", "sim_reward_error",
                "sim_return_error_h"):
        assert math.isfinite(s[key]) and s[key] >= 0, key
    assert 0 <= s["eps_pi"] <= 1
    run = tmp_path / f"hopper-random-adept-{agent}-s0"
    ck = load(run / "checkpoint.pt")
    assert ck["D_hat"]["size"] == c["model_transitions"]
    pre = load(next((tmp_path / "world_models").glob("*.pt")))["wm"]
    assert not torch.equal(ck["wm"]["noise_net.0.weight"], pre["noise_net.0.weight"])  # IWU moved the model
    initial = _initial_agent_state(tiny(tmp_path, agent=agent))["actor"]  # the policy updates moved every layer
    assert all(not torch.equal(initial[k], ck["agent"]["actor"][k]) for k in initial)


def test_no_importance_sampling_reuses_the_cached_model_and_never_adapts_it(tmp_path, data):
    adept.main(tiny(tmp_path, total_steps=20))
    s = adept.main(tiny(tmp_path, total_steps=20, importance_sampling=False))
    c = s["counts"]
    assert s["mode"] == "diff" and c["world_model_pretrain_steps"] == 0 and c["iwu_updates"] == 0  # cache hit
    assert c["rollouts"] > 0 and math.isfinite(s["sim_state_error"])
    ck = load(tmp_path / "hopper-random-diff-sac-s0/checkpoint.pt")
    pre = load(next((tmp_path / "world_models").glob("*.pt")))["wm"]
    assert all(torch.equal(ck["wm"][k], pre[k]) for k in pre)


def test_a_corrupt_world_model_cache_is_retrained(tmp_path, data):
    adept.main(tiny(tmp_path, total_steps=20, world_model=True))
    cache = next((tmp_path / "world_models").glob("*.pt"))
    cache.write_bytes(b"cut short")
    s = adept.main(tiny(tmp_path, total_steps=20, importance_sampling=False))
    assert s["counts"]["world_model_pretrain_steps"] == 50
    assert load(cache)["settings"]["world_model_steps"] == 50  # rewritten whole


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs (--cudagraphs): a capture's warm-up is undone; on a GPU, the graphed parts compute what eager ones do
# ---------------------------------------------------------------------------------------------------------------
def test_state_kept_undoes_updates_and_draws():
    """A capture first runs its steps for real: state_kept gives back the weights, the optimizer moments (zeroed
    where the block made them, which is a fresh Adam) and the generators, so the next update is the one made
    without the block."""
    torch.manual_seed(0)
    agent = adept.SAC(11, 3, Args(hidden=32), torch.device("cpu"))
    twin = copy.deepcopy(agent)  # never warmed up
    b = {"s": torch.randn(64, 11), "a": torch.rand(64, 3) * 2 - 1, "r": torch.randn(64), "s_next": torch.randn(64, 11),
         "terminal": torch.zeros(64)}
    torch.manual_seed(5)
    with adept.state_kept([getattr(agent, k) for k in agent.state], [torch.default_generator]):
        for _ in range(3):
            agent.update(b)
        assert not torch.equal(agent.actor.net[0].weight, twin.actor.net[0].weight)  # it did train
        assert agent.actor_opt.state  # and made Adam's moments
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))  # the generator is where it was
    outs = []
    for a in (agent, twin):
        torch.manual_seed(7)
        outs.append(a.update(b))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    x, y = dict(_tensors(agent.state_dict())), dict(_tensors(twin.state_dict()))
    assert x.keys() == y.keys() and len(x) > 20 and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("agent", ["sac", "iql", "bc"])
def test_graphed_step_parts_equal_eager_ones(tmp_path, data, agent):
    """The agent's update, the IWU and the PE rollouts (N = 3 samples, penalized), replayed as CUDA graphs, give the
    eager results on the same inputs and random streams: losses, weights after the updates, rollouts."""
    args = tiny(tmp_path, agent=agent, cuda=True, uncertainty_samples=3, uncertainty_penalty=1.0)
    run, _ = adept.setup(args, torch.device("cuda"), tmp_path / "run")
    eager = adept.step_functions(dataclasses.replace(run, args=dataclasses.replace(args, cudagraphs=False)))
    batch, s0 = adept.policy_batch(run.D, None, args.batch_size, 0.0), run.D.sample(args.rollout_batch_size)["s"]
    objs = [getattr(run.agent, k) for k in run.agent.state] + [run.wm, run.wm_opt]
    gens = [torch.cuda.default_generators[torch.cuda.current_device()], run.iwu_generator, run.uncertainty_generator]
    weights = lambda: [p.detach().clone() for o in objs if isinstance(o, torch.nn.Module) for p in o.parameters()]
    with adept.state_kept(objs, gens):
        want = (eager[0](batch), eager[1](), eager[2](s0))
        want_weights = weights()
    graphed = adept.step_functions(run)
    assert all(isinstance(f, adept.CudaGraph) for f in graphed)
    got = (graphed[0](batch), graphed[1](), graphed[2](s0))
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.allclose(w[k].float(), g[k].float(), rtol=1e-4, atol=1e-5), k
    for w, g in zip(want_weights, weights()):
        assert torch.allclose(w, g, rtol=1e-4, atol=1e-6)
    again = graphed[0](batch)  # a second replay is a second update, not the first again
    assert not torch.equal(again[next(iter(again))], got[0][next(iter(again))])


# ---------------------------------------------------------------------------------------------------------------
# Minari's official datasets: everything but the download
# ---------------------------------------------------------------------------------------------------------------
def make_official_dataset(ds_id: str, refs: tuple[float, float] | None, size: int = 300, env: str = "hopper") -> None:
    """A dataset under an official Minari id in the current store, with the metadata Minari's official MuJoCo sets
    carry (algorithm, author, code link, eval env, requirements, and the reference scores unless refs is None)."""
    episodes = adept.to_episodes(adept.collect(env, size, ds_id))
    scores = {"ref_min_score": refs[0], "ref_max_score": refs[1]} if refs else {}
    gym_id = adept.ENVS[env].gym_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            ds_id, episodes, env=gym_id, eval_env=gym_id, algorithm_name="SAC", author="Farama",
            author_email="contact@farama.org", description="a stand-in for Minari's official set",
            code_permalink="https://github.com/Farama-Foundation/minari-dataset-generation-scripts",
            requirements=["mujoco>=3.1.1"], data_format="hdf5", **scores)


def test_official_dataset_loads_end_to_end_with_its_reference_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    make_official_dataset("mujoco/hopper/medium-v0", refs=(-19.5, 3100.0))
    s = adept.main(tiny(tmp_path, dataset="mujoco/hopper/medium-v0", total_steps=20))
    assert s["reference_returns"] == {"random": -19.5, "expert": 3100.0, "source": "dataset metadata"}
    assert s["normalized_score"] == pytest.approx(100 * (s["return"] + 19.5) / (3100.0 + 19.5))
    assert s["counts"]["world_model_pretrain_steps"] == 50 and s["counts"]["iwu_updates"] == 20
    assert (tmp_path / "store/mujoco/hopper/medium-v0/transitions.npz").exists()


def test_a_dataset_of_another_simulator_with_the_same_shapes_is_refused(tmp_path, monkeypatch):
    """Walker2d's and HalfCheetah's states and actions have one shape (17, 6): the dataset's env spec tells them apart."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    make_official_dataset("mujoco/walker2d/medium-v0", refs=(0.0, 1.0), env="walker2d")
    with pytest.raises(adept.UserError, match="collected in Walker2d-v5, but --env halfcheetah is HalfCheetah-v5"):
        adept.load_transitions(Args(env="halfcheetah", dataset="mujoco/walker2d/medium-v0"))
    assert len(adept.load_transitions(Args(env="walker2d", dataset="mujoco/walker2d/medium-v0"))[0]["s"]) == 300


def test_official_dataset_without_reference_scores_falls_back_to_d4rl(tmp_path, monkeypatch):
    """Minari issue #323: some official sets lack the reference scores; D4RL's are used and the summary says so."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    make_official_dataset("mujoco/hopper/medium-v0", refs=None)
    adept.main(tiny(tmp_path, dataset="mujoco/hopper/medium-v0", world_model=False, total_steps=20))
    summary = json.loads((tmp_path / "hopper-mujoco-hopper-medium-v0-sac-s0/summary.json").read_text())
    assert summary["reference_returns"] == {"random": -20.272305, "expert": 3234.3, "source": "D4RL"}


# ---------------------------------------------------------------------------------------------------------------
# Shared files under concurrency and interruption; explicit state; the world-model cache key
# ---------------------------------------------------------------------------------------------------------------
BUILD_BOTH = """
import hashlib, json, sys, torch
import adept
args = adept.Args(dataset_size=5000, output_dir=sys.argv[1], world_model_steps=200, behavior_steps=20, hidden=16,
                  model_hidden=16, batch_size=16, world_model_batch_size=16, log_every=10**6, cuda=False)
data, refs = adept.load_transitions(args)
D = adept.dataset_buffer(data, adept.Normalizer(data["s"].mean(0), data["s"].std(0)), torch.device("cpu"))
wm, _, trained = adept.pretrained_world_model(args, D, torch.device("cpu"))
digest = lambda arrays: hashlib.sha1(b"".join(a.tobytes() for a in arrays)).hexdigest()
print("RESULT", json.dumps({"data": digest(data[k] for k in sorted(data)), "trained": trained,
                            "wm": digest(v.numpy() for v in wm.state_dict().values())}))
"""


def test_two_runs_building_the_same_dataset_and_world_model_at_once_both_succeed(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "store")}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_BOTH, str(tmp_path / "runs")], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o.split("RESULT ")[1]) for o in outs]
    assert results[0]["data"] == results[1]["data"] and results[0]["wm"] == results[1]["wm"]
    assert sorted(r["trained"] for r in results) == [0, 200]  # one trained the model, the other waited and loaded
    assert sum("writing" in o for o in outs) == 1  # and one built the dataset
    assert not list((tmp_path / "store").glob(".build-*")) and not list((tmp_path / "runs").rglob("*.tmp"))


def test_atomic_write_replaces_whole_files_with_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        adept.atomic_write(tmp_path / "a" / "f.bin", lambda f: f.write(b"one"))
        adept.atomic_write(tmp_path / "a" / "f.bin", lambda f: f.write(b"two"))
        with pytest.raises(ZeroDivisionError):
            adept.atomic_write(tmp_path / "a" / "f.bin", lambda f: f.write(b"half") and 1 / 0)
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"two"  # the failed write left the old file, and no temp
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.bin"]
    assert (tmp_path / "a" / "f.bin").stat().st_mode & 0o777 == 0o640  # 0666 minus the umask, as open() gives


def test_a_build_killed_midway_is_rebuilt_by_the_next_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    p = subprocess.Popen([sys.executable, "-u", "-c", "import adept; adept.load_transitions(adept.Args(dataset_size=50000))"],
                         cwd=HERE, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("writing"):  # collected, now writing the Minari files: kill it there
            p.kill()
            break
    p.wait(timeout=60)
    assert p.returncode == -9
    final = tmp_path / "adept/hopper/random-50000-v0"
    assert not final.exists() and list(tmp_path.glob(".build-*"))  # only the hidden build folder is left
    data, _ = adept.load_transitions(Args(dataset_size=50000))
    assert len(data["s"]) == 50000 and (final / "data").is_dir() and not list(tmp_path.glob(".build-*"))
    assert "writing" in capsys.readouterr().out  # rebuilt, not refused


@pytest.mark.parametrize("name", ["sac", "iql", "bc"])
def test_agent_state_lists_everything_that_trains(name):
    agent = adept.AGENTS[name](4, 2, Args(hidden=16), torch.device("cpu"))
    trains = {k for k, v in vars(agent).items()
              if isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) or torch.is_tensor(v)}
    assert trains and trains <= set(agent.state), trains - set(agent.state)


def test_a_number_in_agent_state_survives_a_checkpoint(tmp_path):
    class CountingSAC(adept.SAC):  # what a fork adds: a counter (a TD3-style delay, say)
        state = adept.SAC.state + ("updates",)

        def __init__(self, *a):
            super().__init__(*a)
            self.updates = 0

    a = CountingSAC(4, 2, Args(hidden=16), torch.device("cpu"))
    a.updates = 7
    with torch.no_grad():
        a.log_alpha.fill_(0.5)
    torch.save(a.state_dict(), tmp_path / "agent.pt")
    b = CountingSAC(4, 2, Args(hidden=16), torch.device("cpu"))
    b.load_state_dict(load(tmp_path / "agent.pt"))
    assert b.updates == 7 and b.log_alpha.item() == 0.5
    assert all(torch.equal(x, y) for x, y in zip(a.actor.parameters(), b.actor.parameters()))


def _another_value(f: dataclasses.Field):
    value = f.default
    if value is None:  # an optional number
        return 1e-5
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    choices = typing.get_args(typing.get_type_hints(Args)[f.name])  # a Literal's values, or () for a plain str
    return next((v for v in choices if v != value), value + "-other")


def test_cache_keys_cover_what_shapes_the_model_and_pi_D_and_are_shared_by_the_arms(monkeypatch):
    caches = {"world_models": adept.WORLD_MODEL_SETTINGS, "behavior_policies": adept.BEHAVIOR_SETTINGS}
    classified = set(adept.WORLD_MODEL_SETTINGS) | set(adept.BEHAVIOR_SETTINGS) | adept.RUN_ONLY
    assert {f.name for f in dataclasses.fields(Args)} == classified  # a new argument must be put in one of them
    for folder, fields in caches.items():
        path, settings = adept.cache_path(Args(), folder, fields)
        assert settings["format"] == adept.CACHE_FORMAT
        for f in dataclasses.fields(Args):
            other = adept.cache_path(Args(**{f.name: _another_value(f)}), folder, fields)[0]
            assert (other.name == path.name) == (f.name not in fields), (folder, f.name)  # the file name holds the key
        for arm in ({"importance_sampling": False}, {"agent": "iql"}, {"is_exponent": 0.0}, {"total_steps": 50_000}):
            assert adept.cache_path(Args(**arm), folder, fields)[0] == path  # the arms of a seed share the caches
        monkeypatch.setattr(adept, "CACHE_FORMAT", adept.CACHE_FORMAT + 1)
        assert adept.cache_path(Args(), folder, fields)[0] != path  # a new format never loads an old file
        monkeypatch.undo()
    # the world model does not depend on pi_D: the densities of a seed share one pretrained model
    assert adept.cache_path(Args(behavior_density="uniform"), *caches.popitem())[0] != \
        adept.cache_path(Args(), "behavior_policies", adept.BEHAVIOR_SETTINGS)[0]
    assert adept.cache_path(Args(behavior_density="uniform"), "world_models", adept.WORLD_MODEL_SETTINGS)[0] == \
        adept.cache_path(Args(), "world_models", adept.WORLD_MODEL_SETTINGS)[0]


def test_a_cached_world_model_that_does_not_fit_is_retrained_as_on_a_miss(tmp_path, data, capsys):
    clean = adept.main(tiny(tmp_path / "clean", total_steps=20))
    adept.main(tiny(tmp_path, total_steps=20))
    cache = next((tmp_path / "world_models").glob("*.pt"))
    ck = load(cache)
    ck["wm"]["noise_net.0.weight"] = torch.zeros(3, 3)  # a file of other code, with other shapes, under this key
    torch.save(ck, cache)
    capsys.readouterr()
    again = adept.main(tiny(tmp_path, total_steps=20, run_name="again"))  # the cache is the same
    assert "does not load" in capsys.readouterr().out and again["counts"]["world_model_pretrain_steps"] == 50
    # retrained from the fresh networks, so the run equals one that never had a cache (no half-loaded weights)
    assert again["normalized_score"] == clean["normalized_score"] and again["eps_m"] == clean["eps_m"]


# ---------------------------------------------------------------------------------------------------------------
# The importance-sampled update: behavior densities, tempered weights, resampling, paired seeds
# ---------------------------------------------------------------------------------------------------------------
def _fit(policy, s, a, steps=1500, batch=256):
    """Behavior cloning of `policy` on (s, a), as fit_behavior_policy does."""
    torch.manual_seed(0)
    bc = adept.BC(s.shape[1], a.shape[1], Args(lr=3e-3), torch.device("cpu"), policy)
    D = adept.Buffer(len(s), s.shape[1], a.shape[1], torch.device("cpu"))
    D.add({"s": s, "a": a, "r": torch.zeros(len(s)), "s_next": s, "terminal": torch.zeros(len(s))})
    for _ in range(steps):
        bc.update(D.sample(batch))
    return bc.actor


def test_fitted_behavior_density_represents_uniform_actions():
    """Random data: a ~ U[-1, 1]^6. Against the fitted Beta, a uniform pi_phi gets weights of ESS >= 0.9 at
    B_m = 1024; against the unbounded Gaussian of earlier versions it does not (the mechanism study's finding)."""
    torch.manual_seed(0)
    s, a = torch.randn(20_000, 11), torch.rand(20_000, 6) * 2 - 1
    uniform = adept.UniformPolicy(6)
    s_test, a_test = torch.randn(1024, 11), torch.rand(1024, 6) * 2 - 1
    ess = {}
    for name, policy in (("beta", adept.BetaActor(11, 6, 64)), ("gaussian", adept.GaussianActor(11, 6, 64))):
        pi_D = _fit(policy, s, a)
        w = _weights(uniform, pi_D, s_test, a_test, max_weight=math.inf)  # self-normalized, before truncation
        ess[name] = adept.effective_sample_size(w).item()
    assert ess["beta"] >= 0.9 and ess["gaussian"] < 0.6, ess


def test_fitted_behavior_density_fits_a_tanh_gaussian_policy():
    """Actions of a known tanh-Gaussian policy: the fitted Beta's mean log-likelihood on held-out data is within 0.1
    nat per action dimension of the true policy's, and not above it beyond sampling noise (a sign error in
    the tanh or Beta densities would put it there)."""
    torch.manual_seed(1)
    W = torch.randn(4, 3) * 0.4

    def draw(n):
        s = torch.randn(n, 4)
        u = s @ W + 0.4 * torch.randn(n, 3)
        a = torch.tanh(u)
        true = adept.gaussian_log_prob(u, s @ W, torch.full((n, 3), math.log(0.4))) - adept.tanh_log_det(u)
        return s, a, true

    s, a, _ = draw(20_000)
    pi_D = _fit(adept.BetaActor(4, 3, 64), s, a, steps=3000)
    s, a, true = draw(5000)
    with torch.no_grad():
        gap = (true.mean() - pi_D.log_prob(s, a).mean()).item() / 3
    assert -0.03 < gap < 0.1, gap  # KL >= 0: a fitted density beats the true one on held-out data only by noise


def test_behavior_densities_are_finite_on_the_closed_action_box():
    torch.manual_seed(0)
    edge = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 0.999999], [0.0, -0.9999, 1.0]])
    s = torch.randn(3, 4)
    for pi_D in (adept.BetaActor(4, 3, 16), adept.UniformPolicy(3), adept.GaussianActor(4, 3, 16)):
        assert torch.isfinite(pi_D.log_prob(s, edge)).all(), type(pi_D).__name__
        w = _weights(adept.TanhGaussianActor(4, 3, 16), pi_D, s, edge)  # a policy's data at the bounds
        assert torch.isfinite(w).all() and (w > 0).all()
    assert torch.allclose(adept.UniformPolicy(3).log_prob(s, edge), torch.full((3,), -3 * math.log(2)))
    beta = adept.BetaActor(4, 3, 16)
    a, _ = beta.sample(s)
    assert a.abs().max() <= 1
    grid = torch.linspace(-1, 1, 20001)  # a density on the box: it integrates to 1 (dx/da = 1/2 included)
    beta1 = adept.BetaActor(4, 1, 16)
    with torch.no_grad():
        beta1.net[-1].bias.copy_(torch.tensor([1.0, 0.3]))  # a skewed Beta
        density = beta1.log_prob(s[:1].repeat(len(grid), 1), grid[:, None]).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


def test_policy_shift_counts_actions_off_the_box_as_outside_pi_D():
    """A Gaussian policy (IQL's, BC's) centred at the bound with std 1 puts 52% of its samples off the box, where
    pi_D has no mass: eps_pi is then at least that (pi_D's density taken at the bound would make it 0 here, since
    the uniform 1/2 exceeds the Gaussian's density everywhere)."""
    torch.manual_seed(0)
    pi = adept.GaussianActor(4, 1, 16)
    with torch.no_grad():
        pi.net[-1].weight.zero_()
        pi.net[-1].bias.copy_(torch.tensor([20.0, 0.0]))  # tanh(mu) = 1, std 1
    s = torch.randn(4096, 4)
    outside = (pi.sample(s)[0].abs() > 1).float().mean().item()
    assert 0.49 < outside < 0.56  # P(z > 0) + P(z < -2) = 0.523
    assert 0.49 < adept.policy_shift(pi, adept.UniformPolicy(1), s).item() < 0.56  # its own draws: the same 52%
    sac = adept.TanhGaussianActor(4, 1, 16)  # squashed: always on the box, the estimate unchanged
    assert 0 <= adept.policy_shift(sac, adept.UniformPolicy(1), s).item() < 0.45


def test_policy_shift_is_the_total_variation_on_the_box():
    """A uniform policy against pi_D = 2 Beta(2, 2) - 1, whose density is 3x(1 - x) at x = (a + 1)/2: eps_pi is
    TV = integral of max(0, 1/2 - pi_D(a)) da over [-1, 1] (0.1925), estimated from 100k states."""
    torch.manual_seed(0)
    pi_D = adept.BetaActor(4, 1, 16)
    with torch.no_grad():
        pi_D.net[-1].weight.zero_(), pi_D.net[-1].bias.fill_(math.log(math.e - 1))  # 1 + softplus = 2
    a = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    x = (a + 1) / 2
    tv = ((0.5 - 3 * x * (1 - x)).clamp(min=0).sum() * (a[1] - a[0])).item()
    assert tv == pytest.approx(0.1925, abs=1e-3)
    eps_pi = adept.policy_shift(adept.UniformPolicy(1), pi_D, torch.randn(100_000, 4)).item()
    assert eps_pi == pytest.approx(tv, abs=0.005)


def test_return_gap_diagnostics_weigh_the_errors_and_follow_eq_9(monkeypatch):
    """A model whose next state and reward are clipped to one point (c, r_c) has known errors on any batch; with
    log pi_D set so that half the rows have ratio 3 and half 1, eps_m and eps_r are those errors weighted 3:1, and
    pi = pi_D (both uniform) makes eps_pi exactly 0, so that Eq. 9's bound is C = 2 r_max (eps_r/(1 - gamma)
    + gamma eps_m/(1 - gamma)^2)."""
    torch.manual_seed(0)
    n, gamma, r_max = 64, 0.99, 2.0
    wm = adept.WorldModel(3, 2, hidden=16)
    c, r_c = torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor([0.7])
    wm.set_ranges(c, r_c)
    pi = adept.UniformPolicy(2)
    b = {"s": torch.randn(n, 3), "a": torch.rand(n, 2) * 2 - 1, "r": torch.randn(n), "s_next": torch.randn(n, 3)}
    ratio = torch.tensor([3.0, 1.0]).repeat(n // 2)
    b["log_pi_D"] = pi.log_prob(b["s"], b["a"]) - ratio.log()
    out = adept.return_gap_diagnostics(wm, pi, pi, b, gamma, r_max, max_weight=1e9, self_normalize=True)
    eps_m = (ratio * ((c - b["s_next"]) ** 2).mean(-1)).sum() / ratio.sum()
    eps_r = (ratio * (r_c - b["r"]) ** 2).sum() / ratio.sum()
    assert out["eps_m"] == pytest.approx(eps_m.item(), rel=1e-5)
    assert out["eps_r"] == pytest.approx(eps_r.item(), rel=1e-5)
    assert out["eps_pi"] == 0.0
    C = 2 * r_max * (eps_r / (1 - gamma) + gamma * eps_m / (1 - gamma) ** 2)
    assert out["return_gap_bound"] == pytest.approx(C.item(), rel=1e-5)
    # a policy shift of 0.25 enters twice, as Eq. 9 has it: 2 eps_pi beside eps_r and beside eps_m
    monkeypatch.setattr(adept, "policy_shift", lambda *a: torch.tensor(0.25))
    out = adept.return_gap_diagnostics(wm, pi, pi, b, gamma, r_max, max_weight=1e9, self_normalize=True)
    C = 2 * r_max * ((eps_r + 0.5) / (1 - gamma) + gamma * (0.5 + eps_m) / (1 - gamma) ** 2)
    assert out["eps_pi"] == 0.25 and out["return_gap_bound"] == pytest.approx(C.item(), rel=1e-5)


def test_uniform_density_only_for_the_locally_built_random_data():
    adept.check_args(Args(behavior_density="uniform"))
    with pytest.raises(adept.UserError, match="uniform"):
        adept.check_args(Args(behavior_density="uniform", dataset="medium"))


def test_tempered_weights():
    torch.manual_seed(0)
    log_pi, log_pi_D = torch.randn(256) * 3, torch.randn(256)
    assert torch.equal(adept.importance_weights(log_pi, log_pi_D, exponent=0.0), torch.ones(256))  # the control
    half = adept.importance_weights(log_pi, log_pi_D, max_weight=math.inf, exponent=0.5)
    ratio = (0.5 * (log_pi - log_pi_D)).exp()
    assert torch.allclose(half, ratio / ratio.mean(), rtol=1e-4)  # w ~ (pi/pi_D)^(1/2), mean 1


def test_resampled_iwu_trains_on_the_heavy_transitions_with_unit_weights(monkeypatch):
    """--is-resample-pool: B_m rows drawn from the pool in proportion to Eq. 3's weights, then weighed equally.
    Half the dataset has a log ratio of +30 (marked r = 1), the other half 0 (r = 0): every drawn row is heavy."""
    torch.manual_seed(0)
    D = _marked_buffer(200, 0.0)
    D.data["r"][:100] = 1.0
    pi = adept.UniformPolicy(1)
    D.data["log_pi_D"] = pi.log_prob(D.data["s"], D.data["a"]) - torch.where(D.data["r"] == 1, 30.0, 0.0)
    seen = []
    monkeypatch.setattr(adept, "world_model_update", lambda wm, opt, b, w, g: seen.append((b, w)) or torch.zeros(()))
    g = torch.Generator().manual_seed(0)
    _, ess = adept.importance_sampled_update(None, None, pi, D, Args(is_resample_pool=64, is_batch_size=32), g)
    b, w = seen[-1]
    assert w is None and len(b["s"]) == 32 and (b["r"] == 1).all()
    assert 0.3 < ess.item() < 0.7  # the pool's weights: about half of its rows carry all the weight
    adept.importance_sampled_update(None, None, pi, D, Args(is_batch_size=32), g)  # the weighted update instead
    b, w = seen[-1]
    assert w is not None and len(b["s"]) == 32 and torch.equal(w > 1, b["r"] == 1)


def test_own_stream_draws_its_own_and_gives_the_generators_back():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with adept.own_stream(3, "a stream", torch.device("cpu")):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with adept.own_stream(3, "a stream", torch.device("cpu")):
        assert torch.equal(torch.rand(4), inside)  # the stream is fixed by (seed, name)
    with adept.own_stream(3, "another stream", torch.device("cpu")):
        assert not torch.equal(torch.rand(4), inside)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_own_stream_gives_back_the_cuda_generators_on_a_cpu_block():
    """The medium data is collected in a CPU block of a run that uses CUDA: manual_seed reseeds the GPU's generator
    too, and the block must give it back, or the run's draws on the GPU would depend on whether the data was built."""
    torch.rand(1, device="cuda")
    before = torch.cuda.get_rng_state()
    with adept.own_stream(3, "a stream", torch.device("cpu")):
        torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert len(adept.rng_state()["cuda"]) == torch.cuda.device_count()


def test_arms_of_a_seed_are_paired(tmp_path, data):
    """ADEPT, the w = 1 control and Diff+ of one seed share the pretrained model, pi_D and the policy's random
    stream until their models first differ: after 10 policy steps (one PE, at step 1) the three policies and model
    buffers are identical, whether the cache missed (the first run) or hit, while the three models differ."""
    arms = {"adept": {}, "control": {"is_exponent": 0.0}, "diff": {"importance_sampling": False}}
    cks = {}
    for name, kw in arms.items():
        adept.main(tiny(tmp_path, total_steps=10, eval_every=10, rollout_every=10, run_name=name, **kw))
        cks[name] = load(tmp_path / name / "checkpoint.pt")
    for name in ("control", "diff"):
        for part in ("agent", "D_hat"):
            a, b = dict(_tensors(cks["adept"][part])), dict(_tensors(cks[name][part]))
            assert all(torch.equal(a[k], b[k]) for k in a), (name, part)
        assert cks[name]["history"][0]["eps_pi"] == cks["adept"]["history"][0]["eps_pi"]  # paired diagnostics
    assert cks["control"]["history"][0]["is_ess"] == 1.0 > cks["adept"]["history"][0]["is_ess"]  # w = 1 vs Eq. 3
    w = {n: ck["wm"]["noise_net.0.weight"] for n, ck in cks.items()}
    assert not torch.equal(w["adept"], w["control"]) and not torch.equal(w["adept"], w["diff"])
    assert not torch.equal(w["control"], w["diff"])


def test_resampling_iwu_lr_and_run_names(tmp_path, data):
    s = adept.main(tiny(tmp_path, total_steps=20, is_resample_pool=256, iwu_lr=1e-5))
    assert s["counts"]["iwu_updates"] == 20 and s["is_resample_pool"] == 256 and s["iwu_lr"] == 1e-5
    assert 0 < s["is_ess"] <= 1
    run = tmp_path / "hopper-random-adept-sac-iwulr1e-05-pool256-s0"
    ck = load(run / "checkpoint.pt")
    assert ck["wm_opt"]["param_groups"][0]["lr"] == 1e-5
    pre = load(next((tmp_path / "world_models").glob("*.pt")))["wm"]
    assert not torch.equal(ck["wm"]["noise_net.0.weight"], pre["noise_net.0.weight"])  # the resampled IWU moved it
    names = {adept.run_name(Args(**kw)) for kw in ({}, {"is_exponent": 0.0}, {"behavior_density": "uniform"},
                                                   {"importance_sampling": False}, {"world_model": False})}
    assert len(names) == 5 and "hopper-random-adept-sac-lambda0-s0" in names
    diff = adept.main(tiny(tmp_path, total_steps=20, importance_sampling=False))
    assert math.isnan(diff["is_ess"])  # no IWU batches in Diff+


def test_simulator_check_measures_the_policy_evaluation_error(data):
    """sim_return_error_h = mean |model H-step return - simulator H-step return|: with a reward model that always
    says r_hi, the model's return is H r_hi, and the simulator's is what stepping it with the policy gives. With
    next states clipped to one point c, the state errors are the RMSE of c against the simulator's normalized
    states after 1 step (all start states) and after H (those whose episode lasts H steps)."""
    d, _ = data
    torch.manual_seed(0)
    norm = adept.Normalizer(d["s"].mean(0), d["s"].std(0))
    D = adept.dataset_buffer(d, norm, torch.device("cpu"))
    wm = adept.WorldModel(11, 3, hidden=16)
    c = D.data["s_next"][:1]
    wm.set_ranges(c, D.data["r"])
    with torch.no_grad():
        wm.reward_net[-1].weight.zero_(), wm.reward_net[-1].bias.copy_(torch.tensor([100.0, -100.0]))
    pi, env, H = adept.TanhGaussianActor(11, 3, 16), gym.make("Hopper-v5"), 5
    obs = d["s"][np.abs(d["s"][:, 5:]).max(1) < 9.9][:40]
    out = adept.simulator_errors(wm, pi, norm, env, obs, H, clips_velocity=True)
    errors, first, last, first_r = [], [], [], []
    sq = lambda o: ((c[0] - norm(torch.as_tensor(o, dtype=torch.float32)[None])[0]) ** 2).mean().item()
    for o in obs:
        env.reset(seed=0)
        env.unwrapped.set_state(np.concatenate([[0.0], o[:5]]), o[5:])
        ret, alive = 0.0, True
        for t in range(H):
            a = pi.act(norm(torch.as_tensor(o, dtype=torch.float32)[None]), True)[0].detach().numpy()
            o, r, terminated, _, _ = env.step(a)
            ret += r
            if t == 0:
                first.append(sq(o)), first_r.append(r)
            if terminated:
                alive = False
                break
        if alive:
            errors.append(abs(H * wm.r_hi.item() - ret)), last.append(sq(o))
    assert 0 < len(errors) < len(obs)  # some episodes end early: the H-step errors leave them out
    assert out["sim_return_error_h"] == pytest.approx(np.mean(errors), rel=1e-4)
    assert out["sim_state_error"] == pytest.approx(np.sqrt(np.mean(first)), rel=1e-4)
    assert out["sim_state_error_h"] == pytest.approx(np.sqrt(np.mean(last)), rel=1e-4)
    assert out["sim_reward_error"] == pytest.approx(np.sqrt(np.mean((wm.r_hi.item() - np.array(first_r)) ** 2)),
                                                    rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# results/: the importance-sampling study and the reports, at tiny size
# ---------------------------------------------------------------------------------------------------------------
def _results_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, HERE / "results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_is_study_writes_every_cell_and_skips_written_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    study = _results_module("is_study")
    argv = ["--env", "hopper", "--seed", "0", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--dataset-size", "2000", "--world-model-steps", "50", "--behavior-steps", "20", "--target-steps", "20",
            "40", "--updates", "20", "--every", "10", "--states", "20", "--real-transitions", "200",
            "--model-hidden", "32", "--hidden", "32", "--is-batch-size", "64"]
    out = study.main(study.parse(argv))
    cells = {p.stem: list(csv.DictReader(open(p))) for p in out.glob("*__*.csv")}
    assert set(cells) == {f"{t}__{a}" for t in ("sac20", "sac40") for a in study.ARMS}
    for name, rows in cells.items():
        assert [int(r["updates"]) for r in rows] == [0, 10, 20], name
        assert rows[0]["pe_return_error"] == cells["sac20__frozen" if "sac20" in name else "sac40__frozen"][0][
            "pe_return_error"]  # every arm starts from the same pretrained model, measured the same way
    assert len({r["pe_return_error"] for r in cells["sac20__frozen"]}) == 1  # the frozen model never changes
    eq3_last, frozen_last = cells["sac20__eq3"][-1], cells["sac20__frozen"][-1]
    assert any(eq3_last[c] != frozen_last[c] for c in ("dataset_state_error", "pe_return_error"))  # it moved the model
    assert float(cells["sac20__w1"][-1]["batch_ess"]) == 1.0 and 0 < float(cells["sac20__eq3"][-1]["batch_ess"]) < 1
    meta = json.loads((out / "meta.json").read_text())
    for t in meta["targets"].values():
        assert 0 < t["dataset_ess_fitted"] <= 1 and 0 < t["dataset_ess_uniform"] <= 1 and 0 <= t["eps_pi_fitted"] <= 1
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.csv")}
    capsys.readouterr()
    study.main(study.parse(argv))
    assert "[study]" not in capsys.readouterr().out  # nothing recomputed
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*.csv")}

    report = _results_module("report")
    report.study(tmp_path / "out", "hopper", tmp_path / "study.png")
    text = capsys.readouterr().out
    assert "| eq3 | 1 |" in text and "| ceiling | 1 |" in text and (tmp_path / "study.png").stat().st_size > 10_000
    w1, eq3_rows = report.read_csv(out / "sac20__w1.csv"), report.read_csv(out / "sac20__eq3.csv")
    d = [report.late_mean(eq3_rows, e) - report.late_mean(w1, e) for e in report.HEADLINE]
    below = int(all(x < 0 for x in d))
    assert f"| eq3 | 1 | {d[0]:+.3f} | {d[1]:+.3f} | {below} of 1 |" in text  # eq3 minus the control, seed 0
    eq3 = cells["sac20__eq3"]  # measured at 0, 10, 20 of 20 updates: the second half is the last measurement
    assert report.late_mean(report.read_csv(out / "sac20__eq3.csv"), "pe_return_error") == \
        pytest.approx(float(eq3[-1]["pe_return_error"]))
    assert report.late_mean([{"updates": u, "e": u} for u in (0, 2, 4, 6, 8)], "e") == 7.0  # the models at 6 and 8

    range_check = _results_module("range_check")
    share, excess = range_check.outside(np.array([[0.0, 0.0], [0.0, 3.0]]), np.array([-1.0, -1.0]),
                                        np.array([1.0, 1.0]), np.array([1.0, 2.0]))
    assert share == 0.5 and excess == 1.0  # the second state is 2 beyond the range in a dimension of std 2
    shares = range_check.main(["--env", "hopper", "--seed", "0", "--study", str(tmp_path / "out"), "--dataset-size",
                               "2000", "--states", "50", "--hidden", "32"])
    assert set(shares) == {"sac20", "sac40"} and all(0 <= s <= 1 and e >= 0 for s, e in shares.values())


def test_ablation_report_pairs_seeds_and_draws_the_curves(tmp_path, data, capsys, monkeypatch):
    for seed in (0, 1):
        for kw in ({}, {"is_exponent": 0.0}, {"world_model": False}):
            adept.main(tiny(tmp_path / "hopper-random", seed=seed, total_steps=60, **kw))
    report = _results_module("report")
    assert report.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = report.bootstrap_ci([0.0, 10.0])
    assert lo == 0.0 and hi == 10.0  # two seeds: the interval is their range
    capsys.readouterr()
    report.ablation(tmp_path / "hopper-random", tmp_path / "ablation.png")
    text = capsys.readouterr().out
    scores = {}
    for seed in (0, 1):
        for arm, name in (("adept-sac", "adept-sac"), ("sac", "sac")):
            rows = list(csv.DictReader(open(tmp_path / f"hopper-random/hopper-random-{name}-s{seed}/metrics.csv")))
            scores[arm, seed] = np.mean([float(r["normalized_score"]) for r in rows[-3:]])
    diffs = [scores["adept-sac", s] - scores["sac", s] for s in (0, 1)]
    assert f"| SAC | {diffs[0]:+.1f}, {diffs[1]:+.1f} | {np.mean(diffs):+.1f} |" in text
    assert "| ADEPT-SAC | 2 | 60 |" in text and (tmp_path / "ablation.png").stat().st_size > 10_000
    # An arm after SAC, which draws no model error: each arm keeps its color in both panels all the same.
    adept.main(tiny(tmp_path / "hopper-random", total_steps=60, is_exponent=0.5))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, png: figures.append(fig))
    report.ablation(tmp_path / "hopper-random", tmp_path / "ablation.png")
    score_ax, error_ax = figures[0].axes
    colors = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (score_ax, error_ax)]
    assert len(colors[0]) == 4 and len(colors[1]) == 3 and "SAC" not in colors[1]
    assert all(colors[0][arm] == color for arm, color in colors[1].items()), colors
    assert report.arm_and_seed("hopper-medium-replay", "hopper-medium-replay-adept-sac-s2") == ("adept-sac", 2)
    assert report.arm_and_seed("hopper-random", "hopper-random-adept-sac-lambda0-s1") == ("adept-sac-lambda0", 1)


# ---------------------------------------------------------------------------------------------------------------
# The paper's other datasets, built locally: medium-replay and medium (tiny budgets)
# ---------------------------------------------------------------------------------------------------------------
MEDIUM = dict(medium_return=-1e6, online_eval_every=100, online_steps_cap=1000, log_every=10**6)  # stops at 100


def test_medium_replay_holds_the_learners_transitions_and_medium_comes_from_its_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    acted, act = [], adept.TanhGaussianActor.act

    def recording_act(self, s, deterministic=False):  # the learner's stochastic actions, as it takes them
        out = act(self, s, deterministic)
        if not deterministic:
            acted.append(out.cpu().numpy())
        return out
    monkeypatch.setattr(adept.TanhGaussianActor, "act", recording_act)
    replay, refs = adept.load_transitions(Args(dataset="medium-replay", **MEDIUM))
    monkeypatch.setattr(adept.TanhGaussianActor, "act", act)
    assert refs["source"] == "dataset metadata" and refs["random"] == -20.272305
    learner = tmp_path / "adept/hopper/.medium-learner-return-1000000-eval100"
    with np.load(learner / "replay.npz") as z:  # what the learner collected until it stopped, in order
        assert len(z["s"]) == len(replay["s"]) == 100  # the first evaluation reached the (tiny) target
        for k in replay:
            np.testing.assert_array_equal(z[k], replay[k])
    # episodes split where the simulator ended them; the one open at the stop is cut as a truncation
    ends = replay["terminal"] + replay["timeout"] > 0
    np.testing.assert_array_equal(replay["s_next"][:-1][~ends[:-1]], replay["s"][1:][~ends[:-1]])
    assert replay["timeout"][-1] == 1 and not (replay["terminal"] * replay["timeout"]).any()
    assert not (replay["s"][1:][ends[:-1]] == replay["s_next"][:-1][ends[:-1]]).all(1).any()  # a reset follows
    ds = minari.load_dataset("adept/hopper/medium-replay-return-1000000-eval100-v0")
    assert ds.total_episodes == ends.sum()
    recipe = json.loads(ds.storage.metadata["adept_recipe"])
    assert recipe["environment_steps"] == 100 and recipe["warmup_random_steps"] == 50
    assert recipe["dataset"] == "medium-replay" and recipe["medium_return"] == -1e6
    assert recipe["reached_return"] == recipe["evaluations"][-1][1]
    # the learner's actions after the warm-up are its own policy's samples, in order, not uniform ones
    assert replay["a"].shape == (100, 3) and len(acted) == 50
    np.testing.assert_array_equal(np.concatenate(acted), replay["a"][50:])

    medium, _ = adept.load_transitions(Args(dataset="medium", dataset_size=300, **MEDIUM))
    policy_file = load(tmp_path / "adept/hopper/medium-policy-return-1000000-eval100.pt")
    actor = adept.TanhGaussianActor(11, 3, policy_file["hidden"])
    actor.load_state_dict(policy_file["actor"])
    with adept.own_stream(adept.DATA_SEED, "medium data hopper", torch.device("cpu")):
        again = adept.collect("hopper", 300, "check", actor)  # the saved policy, acting again, makes the same data
    for k in ("s", "a", "r", "s_next", "terminal", "timeout"):
        np.testing.assert_allclose(medium[k], again[k].astype(np.float32), rtol=1e-6, err_msg=k)
    recipe = json.loads(minari.load_dataset("adept/hopper/medium-300-return-1000000-eval100-v0")
                        .storage.metadata["adept_recipe"])
    assert recipe["dataset"] == "medium" and recipe["behavior_actions"] == "sampled"


def test_medium_learner_resumes_after_a_kill_and_stops_at_its_cap(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    never = dict(MEDIUM, medium_return=1e6)
    code = ("import adept; adept.load_transitions(adept.Args(dataset='medium-replay', medium_return=1e6, "
            "online_eval_every=100, online_steps_cap=10**6, log_every=10**6))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "adept/hopper/.medium-learner-return1000000-eval100/checkpoint.pt"
    for _ in range(3000):  # a few seconds on an idle machine; up to 5 minutes on a loaded one
        if checkpoint.exists() or p.poll() is not None:
            break
        import time
        time.sleep(0.1)
    p.kill()
    p.wait()
    first = load(checkpoint)
    assert first["step"] >= 100
    with pytest.raises(adept.UserError, match="did not reach the return 1000000 within --online-steps-cap"):
        adept.load_transitions(Args(dataset="medium-replay", **dict(never, online_steps_cap=first["step"] + 100)))
    assert f"resumed from {checkpoint} at step {first['step']}" in capsys.readouterr().out
    later = load(checkpoint)
    assert later["step"] == first["step"] + 100
    n = first["step"]
    for k in ("s", "a", "r", "s_next", "terminal"):  # the transitions before the kill are kept as they were
        np.testing.assert_array_equal(later["transitions"][k][:n], first["transitions"][k])
    assert later["transitions"]["timeout"][n - 1] == 1 - later["transitions"]["terminal"][n - 1]  # cut episode
    with pytest.raises(adept.UserError, match=f"at step {n + 100} .*past --online-steps-cap {n}"):  # a lower cap
        adept.load_transitions(Args(dataset="medium-replay", **dict(never, online_steps_cap=n)))


def test_dataset_ids_and_an_unknown_dataset_name():
    assert adept.dataset_id(Args(dataset="medium-replay")) == "adept/hopper/medium-replay-v0"
    assert adept.dataset_id(Args(dataset="medium", env="walker2d")) == "adept/walker2d/medium-1000000-v0"
    assert adept.dataset_id(Args(dataset="expert")) == "mujoco/hopper/expert-v0"
    assert adept.dataset_id(Args(dataset="mujoco/hopper/simple-replay-v0")) == "mujoco/hopper/simple-replay-v0"
    with pytest.raises(adept.UserError, match="replay"):
        adept.check_args(Args(dataset="replay"))


def test_a_dataset_of_another_env_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_official_dataset("mujoco/hopper/expert-v0", refs=(0.0, 1.0))
    with pytest.raises(adept.UserError, match="halfcheetah"):
        adept.load_transitions(Args(env="halfcheetah", dataset="mujoco/hopper/expert-v0"))
