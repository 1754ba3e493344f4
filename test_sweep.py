"""Tests for results/sweep.py (a grid of runs on a local Ray instance) and the rliable aggregates of
results/report.py: seeded, offline, tiny budgets, temporary folders only. Run: python -m pytest -q test_sweep.py"""

import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # Minari's download fails at once instead of retrying

HERE = Path(__file__).resolve().parent
TINY = ["--dataset-size", "1000", "--eval-every", "50", "--eval-episodes", "2", "--log-every", "50", "--batch-size",
        "32", "--hidden", "32", "--model-hidden", "32", "--is-batch-size", "64", "--rollout-every", "10",
        "--rollout-batch-size", "8", "--model-buffer-size", "1000", "--diag-samples", "64", "--sim-check-states", "16"]
BUDGETS = ["--world-model-steps", "50", "--behavior-steps", "20"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def _results_module(name):
    spec = importlib.util.spec_from_file_location(name, HERE / "results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_module = _results_module("sweep")
report = _results_module("report")


@pytest.fixture(scope="session", autouse=True)
def minari_store(tmp_path_factory):
    """A private Minari store, shared by the tests' runs (the first run builds the tiny dataset, the others wait)."""
    store = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    return store


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository of one commit holding this checkout's adept.py: the code the sweeps run."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "adept.py").write_bytes((HERE / "adept.py").read_bytes())
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run([*GIT, "-C", str(path), "add", "adept.py"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-qm", "adept.py"], check=True)
    return path


def head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def sweep_argv(repo: Path, out: Path, *argv: str, extra=()) -> list[str]:
    return [sys.executable, str(HERE / "results" / "sweep.py"), "--repo", str(repo), "--output-dir", str(out),
            "--num-cpus", "2", *argv, "--", *TINY, *extra]


def run_sweep(repo: Path, out: Path, *argv: str, extra=()) -> subprocess.CompletedProcess:
    r = subprocess.run(sweep_argv(repo, out, *argv, extra=extra), capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr)  # shown when a test fails
    return r


def tensors(tree, prefix=""):
    """Every tensor of a nested state dict, by its path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensors(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensors(v, f"{prefix}{i}.")
    elif torch.is_tensor(tree):
        yield prefix, tree


# ---------------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------------
def test_arm_specs_and_the_grid():
    assert sweep_module.parse_arm("control") == ("control", ["--is-exponent", "0"])
    assert sweep_module.parse_arm("pool=--is-resample-pool 4096 --iwu-lr 3e-5") == \
        ("pool", ["--is-resample-pool", "4096", "--iwu-lr", "3e-5"])
    assert sweep_module.parse_arm("q='--run-name' 'a b'") == ("q", ["--run-name", "a b"])  # split as a shell would
    for bad in ("nosuch", "=--seed 1", "a b=--seed 1"):
        with pytest.raises(ValueError):
            sweep_module.parse_arm(bad)
    opts, extra = sweep_module.parse(["--output-dir", "o", "--arms", "adept", "alone", "--seeds", "0", "1",
                                      "--datasets", "mujoco/hopper/expert-v0", "--total-steps", "10", "--",
                                      "--eval-every", "5"])
    runs = sweep_module.grid(opts, extra)
    assert [r["label"] for r in runs] == ["adept, sac, seed 0", "adept, sac, seed 1", "alone, sac, seed 0",
                                          "alone, sac, seed 1"]  # arm by arm, seeds inner
    assert {r["task"] for r in runs} == {"hopper-mujoco-hopper-expert-v0"}  # as adept.py names the run folders
    assert runs[2]["argv"] == ["--env", "hopper", "--dataset", "mujoco/hopper/expert-v0", "--agent", "sac", "--seed",
                               "0", "--total-steps", "10", "--no-world-model", "--eval-every", "5"]


def test_a_tiny_grid_finishes_on_local_ray_with_the_commit_in_every_summary(repo, tmp_path):
    out = tmp_path / "out"
    t = time.perf_counter()
    r = run_sweep(repo, out, "--arms", "adept", "alone", "--seeds", "0", "1", "--total-steps", "100", *BUDGETS)
    took = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert "a local Ray instance on 127.0.0.1, 2 CPUs" in r.stdout  # bound to the loopback address alone
    assert "sweep: 4 finished, 0 skipped (already finished), 0 failed, of 4 runs" in r.stdout
    commit, task = head(repo), out / "hopper-random"
    names = [f"hopper-random-{arm}-s{seed}" for arm in ("adept-sac", "sac") for seed in (0, 1)]
    for name in names:
        summary = json.loads((task / name / "summary.json").read_text())
        assert summary["commit"] == commit and summary["total_steps"] == 100, name
        assert not (task / name / "sweep.json").exists()  # the in-progress record is gone once the summary has it
        assert f"commit {commit}, fresh" in (task / f"{name}.log").read_text()
        assert f"] finished {name} " in r.stdout
    assert (out / ".code" / commit / "adept.py").read_bytes() == (repo / "adept.py").read_bytes()  # the worktree
    print(f"4-run sweep: {took:.1f} s")

    # Called as a Ray task would call it: a finished run is left alone; under another commit it is refused
    spec = {"name": names[0], "label": "adept", "run_dir": str(task / names[0]), "task_dir": str(task),
            "log": str(task / f"{names[0]}.log"), "commit": commit, "worktree": str(out / ".code" / commit),
            "repo": str(repo), "argv": [], "total_steps": 100, "env": {}, "gpus": 0}
    before = (task / names[0] / "summary.json").read_text()
    assert sweep_module.execute(spec)["status"] == "skipped"
    # a cluster worker, whose clone lacks the driver's worktree metadata, uses the shared code as it is; the driver
    # remakes a worktree that git cannot read
    wt, dot_git = out / ".code" / commit, out / ".code" / commit / ".git"
    dot_git.write_text("gitdir: /nonexistent/.git/worktrees/x\n")
    assert sweep_module.execute(spec)["status"] == "skipped"
    assert dot_git.read_text().startswith("gitdir: /nonexistent") and (wt / "adept.py").is_file()  # left alone
    assert sweep_module.worktree(repo, commit, wt) == wt and sweep_module.git(wt, "rev-parse", "HEAD") == commit
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "another"], check=True)
    other = head(repo)
    res = sweep_module.execute({**spec, "commit": other, "worktree": str(out / ".code" / other)})
    assert res["status"] == "failed" and f"made by commit {commit}, not {other}" in res["error"]
    assert (task / names[0] / "summary.json").read_text() == before  # left as it was
    recorded = json.loads(before)["args"]
    for args, total in (({**recorded, "total_steps": 200, "threads": 2}, 100), ({**recorded, "eval_every": 7}, 100)):
        res = sweep_module.execute({**spec, "args": args, "total_steps": total})  # free settings; then another grid
        assert res["status"] == ("skipped" if args["eval_every"] == recorded["eval_every"] else "failed"), res
    assert "made with other settings (eval_every" in res["error"]
    (task / names[0] / "checkpoint.pt").rename(task / "checkpoint.pt")  # a finished stage without its checkpoint
    res = sweep_module.execute({**spec, "args": recorded, "total_steps": 200})
    assert res["status"] == "failed" and "no checkpoint to continue it from" in res["error"]
    assert (task / names[0] / "summary.json").read_text() == before
    (task / "checkpoint.pt").rename(task / names[0] / "checkpoint.pt")
    code = out / ".code" / commit / "adept.py"
    code.write_text(code.read_text() + "\n# edited\n")  # the commit's code edited in place: runs refused
    res = sweep_module.execute(spec)
    assert res["status"] == "failed" and "has been edited" in res["error"]


def test_a_run_killed_after_its_first_checkpoint_is_resumed_by_the_sweep_to_the_same_weights(repo, tmp_path):
    """The sweep runs ADEPT-SAC and, under another run name, the same run uninterrupted; ADEPT-SAC's process is
    killed once its first checkpoint (step 200 of 800) is written; the same sweep command then resumes it."""
    out = tmp_path / "out"
    argv = ["--arms", "adept", "ref=--run-name ref", "--seeds", "0", "--total-steps", "800", *BUDGETS]
    extra = ["--eval-every", "200", "--log-every", "200"]
    run_dir = out / "hopper-random" / "hopper-random-adept-sac-s0"
    proc = subprocess.Popen(sweep_argv(repo, out, *argv, extra=extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.time() + 900
    while killed is None and time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.csv"
        if (run_dir / "checkpoint.pt").exists() and metrics.exists() and (run_dir / "sweep.json").exists():
            rows = list(csv.DictReader(open(metrics)))
            assert len(rows) == 1, "missed the point after the first checkpoint"
            killed = json.loads((run_dir / "sweep.json").read_text())["pid"]
            os.kill(killed, signal.SIGKILL)  # adept.py, which this test started through the sweep
        time.sleep(0.01)
    text = proc.communicate(timeout=900)[0]
    print(text)
    assert killed and proc.returncode == 1
    assert "failed   hopper-random-adept-sac-s0" in text and "killed by signal 9 (SIGKILL)" in text
    assert "finished ref " in text  # the other run went on
    assert not (run_dir / "summary.json").exists() and len(list(csv.DictReader(open(run_dir / "metrics.csv")))) == 1
    assert json.loads((run_dir / "sweep.json").read_text())["commit"] == head(repo)

    r = run_sweep(repo, out, *argv, extra=extra)
    assert r.returncode == 0
    assert "finished hopper-random-adept-sac-s0" in r.stdout and "resumed from its checkpoint" in r.stdout
    assert "skipped  ref " in r.stdout and "1 finished, 1 skipped" in r.stdout
    resumed = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    whole = torch.load(out / "hopper-random" / "ref" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert resumed["step"] == whole["step"] == 800
    for part in ("agent", "wm"):
        a, b = dict(tensors(resumed[part])), dict(tensors(whole[part]))
        assert a.keys() == b.keys() and len(a) > 5, part
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}.{k}"
    assert json.loads((run_dir / "summary.json").read_text())["commit"] == head(repo)
    scores = [[float(r["normalized_score"]) for r in csv.DictReader(open(d / "metrics.csv"))]
              for d in (run_dir, out / "hopper-random" / "ref")]
    assert scores[0] == scores[1] and len(scores[0]) == 4  # the same evaluations, the first before the kill


def test_failing_runs_are_reported_while_the_others_finish(repo, tmp_path):
    out = tmp_path / "out"
    r = run_sweep(repo, out, "--arms", "alone", "bad=--no-such-flag", "negative=--iwu-lr -1", "--seeds", "0",
                  "--total-steps", "50", *BUDGETS)
    assert r.returncode == 1
    assert "sweep: 1 finished, 0 skipped (already finished), 2 failed, of 3 runs" in r.stdout
    assert "Unrecognized options: --no-such-flag" in r.stdout  # adept.py does not take the flag: no run at all
    assert "exit code 2" in r.stdout and "--iwu-lr must be positive" in r.stdout  # the run started and failed
    task = out / "hopper-random"
    assert json.loads((task / "hopper-random-sac-s0" / "summary.json").read_text())["commit"] == head(repo)
    assert not (task / "hopper-random-adept-sac-iwulr-1-s0").exists()  # a run that could not start leaves no folder
    assert "--iwu-lr must be positive" in (task / "hopper-random-adept-sac-iwulr-1-s0.log").read_text()
    for bad, message in ((("--commit", "no-such-rev"), "error: --commit no-such-rev: no such commit in"),
                         (("--cpus-per-run", "64"), "error: --cpus-per-run 64 but Ray has 2 CPUs")):
        r = run_sweep(repo, out, "--arms", "alone", "--seeds", "0", "--total-steps", "50", *BUDGETS, *bad)
        assert r.returncode == 2 and message in r.stderr, bad  # a bad command line: exit code 2, no traceback
        assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# rliable's aggregates in results/report.py
# ---------------------------------------------------------------------------------------------------------------
def iqm_by_hand(scores) -> float:
    """The mean of the middle half of all the scores (n divisible by 4 here)."""
    v = np.sort(np.ravel(scores))
    return float(v[len(v) // 4: len(v) - len(v) // 4].mean())


def improvement_by_hand(x, y) -> float:
    """Per task, the share of (run of x, run of y) pairs in which x's is higher, ties counting half; mean over tasks."""
    per_task = []
    for t in range(x.shape[1]):
        pairs = [(a > b) + 0.5 * (a == b) for a in x[:, t] for b in y[:, t]]
        per_task.append(sum(pairs) / len(pairs))
    return float(np.mean(per_task))


def test_rliable_aggregates_match_a_direct_computation():
    scores = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # 4 runs x 2 tasks
    assert report.iqm(scores) == pytest.approx(iqm_by_hand(scores)) == pytest.approx((3 + 4 + 10 + 20) / 4)
    x = np.array([[1.0, 5.0], [3.0, 6.0], [5.0, 7.0]])
    y = np.array([[2.0, 5.0], [4.0, 6.0]])  # another number of runs; ties in task 2
    assert report.probability_of_improvement(x, y) == pytest.approx(improvement_by_hand(x, y)) == \
        pytest.approx((3 / 6 + 4 / 6) / 2)
    assert report.probability_of_improvement(x, x) == 0.5
    # the interval resamples the runs within each task: constant tasks give a point interval
    constant = np.array([[1.0, 5.0]] * 4)
    assert report.interval(lambda s: np.array([report.iqm(s)]), constant, reps=200) == (3.0, 3.0, 3.0)
    point, lo, hi = report.interval(lambda s: np.array([report.iqm(s)]), scores, reps=500)
    assert point == pytest.approx(9.25) and scores.min() <= lo <= point <= hi <= scores.max()
    assert report.interval(lambda s: np.array([report.iqm(s)]), scores, reps=500) == (point, lo, hi)  # seeded
    point, lo, hi = report.interval(report.probability_of_improvement, x, y, reps=300)
    assert point == pytest.approx(7 / 12) and 0 <= lo <= point <= hi <= 1


def write_run(folder: Path, arm: str, seed: int, scores: list[float], every: int = 100) -> None:
    run = folder / f"{folder.name}-{arm}-s{seed}"
    run.mkdir(parents=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "normalized_score"])
        w.writeheader()
        w.writerows({"step": every * (i + 1), "normalized_score": s} for i, s in enumerate(scores))
    (run / "summary.json").write_text(json.dumps({"total_steps": every * len(scores)}))


def test_report_aggregates_the_tasks_of_a_budget_against_any_reference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truth = {}  # arm -> (runs x tasks) of run scores (the mean of the last 3 evaluations)
    for t, task in enumerate(("hopper-random", "walker2d-random")):
        for arm in ("adept-sac", "adept-sac-lambda0", "sac"):
            for seed in range(4):
                evals = list(np.round(rng.uniform(0, 50, 5), 3))
                write_run(tmp_path / task, arm, seed, evals)
                truth.setdefault(arm, np.zeros((4, 2)))[seed, t] = np.mean(evals[-3:])
    write_run(tmp_path / "hopper-random", "diff-sac", 0, [1.0, 2.0, 3.0, 4.0, 5.0])  # in one task only: left out
    write_run(tmp_path / "walker2d-random", "iql", 0, [5.0, 5.0, 5.0], every=200)  # another budget (600 steps)
    folders = [tmp_path / "hopper-random", tmp_path / "walker2d-random"]
    res = report.aggregates(folders, reference="control", reps=200, pair_reps=100)
    text = capsys.readouterr().out
    assert set(res) == {500, 600} and set(res[500]["iqm"]) == {"adept-sac", "adept-sac-lambda0", "sac"}
    for arm, m in truth.items():
        assert res[500]["iqm"][arm][0] == pytest.approx(iqm_by_hand(m))
    assert set(res[500]["poi"]) == {("adept-sac", "adept-sac-lambda0"), ("sac", "adept-sac-lambda0")}
    for (a, b), (point, lo, hi) in res[500]["poi"].items():
        assert point == pytest.approx(improvement_by_hand(truth[a], truth[b])) and lo <= point <= hi
    assert "Diff+SAC left out: no finished run in walker2d-random" in text
    assert "rliable aggregates at 500 policy steps: 2 tasks (hopper-random, walker2d-random)" in text
    assert "(no probability of improvement: --reference control: no such arm" in text  # at 600 steps: IQL alone
    default = report.aggregates(folders[:1], reps=100, pair_reps=100)  # ADEPT-SAC against each other arm
    assert set(default[500]["poi"]) == {("adept-sac", a) for a in ("adept-sac-lambda0", "diff-sac", "sac")}
    report.ablation(folders[0], None, reference="sac")  # the paired table, each arm minus SAC
    text = capsys.readouterr().out
    d = truth["adept-sac"][:, 0] - truth["sac"][:, 0]
    assert "Paired difference arm - SAC, per seed" in text
    assert f"| ADEPT-SAC | {', '.join(f'{v:+.1f}' for v in d)} | {d.mean():+.1f} |" in text
    write_run(tmp_path / "elsewhere" / "hopper-random", "sac", 0, [1.0, 2.0, 3.0])  # another grid's task of one name
    with pytest.raises(SystemExit, match=r"name one task twice \(hopper-random\)"):
        report.aggregates([folders[0], tmp_path / "elsewhere" / "hopper-random"], reps=10, pair_reps=10)


def test_report_ablation_shows_the_uncertainty_where_runs_measured_it(tmp_path, capsys):
    folder = tmp_path / "hopper-random"
    write_run(folder, "adept-sac-lambda0", 0, [1.0, 2.0, 3.0, 4.0])  # N = 1: no u
    run = folder / "hopper-random-adept-sac-samples5-s0"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "normalized_score", "u_rollout", "truncated_share", "u_error_rank_corr"])
        w.writeheader()
        w.writerows({"step": 100 * (i + 1), "normalized_score": 10.0 + i, "u_rollout": u, "truncated_share": 0.1 * i,
                     "u_error_rank_corr": 0.5} for i, u in enumerate([9.0, 0.02, 0.04, 0.06]))
    (run / "summary.json").write_text(json.dumps({"total_steps": 400}))
    report.ablation(folder, None, reference="control")
    text = capsys.readouterr().out
    assert "| eps_pi | mean u | truncated | Spearman(u, err) |" in text
    assert "| adept-sac-samples5 | 1 | 400 | 12.0 +- 0.0 |" in text
    assert "| - | 0.04 | 0.2 | 0.5 |" in text  # the last 3 evaluations: u's first 9.0 left out
    assert "| - | - | - | - | - | - |" in text  # the control: no model errors, no u
    assert "| adept-sac-samples5 | +9.0 | +9.0 |" in text  # 12 - 3


def test_report_scores_each_run_at_the_budget_it_finished(tmp_path, capsys):
    """A run extended in stages: its summary.json is the last finished stage's (200 steps), its metrics.csv grows
    in the next. The ablation scores it at 200 beside a run that finished 200, and pairs only seeds at one budget;
    milestones calls it running; a column that one seed lacks is averaged over the seeds that have it, and says so."""
    folder = tmp_path / "hopper-random"
    write_run(folder, "sac", 0, [1.0, 2.0])
    write_run(folder, "sac", 1, [5.0, 5.0, 5.0])  # finished 300: no pair with a seed 1 at 200
    write_run(folder, "adept-sac", 0, [3.0, 5.0, 90.0, 90.0])  # metrics to 400, summary at 200
    write_run(folder, "adept-sac", 1, [6.0, 6.0])
    write_run(folder, "diff-sac", 0, [7.0, 7.0, 7.0])  # finished 300: no seed to pair with ADEPT-SAC's at 200
    for seed, errors in ((0, [0.5, 0.7, 9.0, 9.0]), (1, None)):  # seed 1 did not measure the return error
        run = folder / f"hopper-random-adept-sac-s{seed}"
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        with open(run / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["step", "normalized_score"] + ["sim_return_error_h"] * (errors is not None))
            w.writeheader()
            w.writerows({**r, **({"sim_return_error_h": e} if errors else {})} for r, e in zip(rows, errors or rows))
        (run / "summary.json").write_text(json.dumps({"total_steps": 200}))
    report.ablation(folder, None)
    text = capsys.readouterr().out
    assert "| ADEPT-SAC | 2 | 200 | 5.0 +- 1.0 |" in text  # (3 + 5)/2 = 4 and 6: the rows after 200 left out
    assert "| 0.6 (1 of 2 seeds) |" in text
    assert "| SAC | 2 | 200-300 |" in text
    assert "(seeds at different budgets, pooled in one mean: SAC; see the steps column)" in text
    assert "| SAC | +2.5 (seeds 0) | +2.5 |" in text  # seed 0 alone: 4 - 1.5; seed 1's runs ended at other budgets
    assert "(not paired: Diff+SAC: no seed at the same budget in both arms)" in text
    report.milestones(folder, [200], None)
    text = capsys.readouterr().out
    assert "| adept-sac-s0 | running | 400 |" in text and "| sac-s0 | yes | 200 |" in text


def write_cell(folder: Path, name: str, ret_error: float, scores: list[float], done: bool = True) -> None:
    """A calibration run of 4 evaluations (of a 400-step budget) whose H-step return error is ret_error after 200."""
    run = folder / name
    run.mkdir(parents=True)
    keys = ["step", "normalized_score", "sim_return_error_h", "sim_state_error_h", "eps_pi", "u_rollout",
            "truncated_share", "u_error_rank_corr"]
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for i, score in enumerate(scores[: 4 if done else 2]):
            w.writerow({"step": 100 * (i + 1), "normalized_score": score, "sim_state_error_h": 0.3, "eps_pi": 0.9,
                        "sim_return_error_h": 5.0 if i < 2 else ret_error, "u_rollout": 0.04,
                        "truncated_share": 0.0, "u_error_rank_corr": 0.4})


def test_calibration_picks_the_best_score_among_the_lowest_return_errors(tmp_path, capsys):
    """The rule: candidates within 10% of the lowest late H-step return error, then the best score of them; the
    errors of the first half of the budget do not count, and nothing is chosen before every cell has finished."""
    folder = tmp_path / "calibration"
    write_cell(folder, "hopper-random-adept-sac-samples5-s10", 0.10, [1, 2, 3, 99])  # no penalty: not a candidate
    write_cell(folder, "hopper-random-adept-sac-samples5-upenalty2-s10", 0.20, [9, 9, 10, 10])
    write_cell(folder, "hopper-random-adept-sac-samples5-upenalty5-s10", 0.21, [9, 9, 20, 20])
    write_cell(folder, "hopper-random-adept-sac-samples5-upenalty10-uthreshold0.1-s10", 0.30, [40, 40, 40, 40])
    write_cell(folder, "hopper-random-adept-sac-samples5-upenalty20-s10", 0.25, [9, 9, 9, 9], done=False)
    assert report.calibration(folder, budget=400, cells=4) is None  # lambda_u = 20 has not finished
    assert "no choice yet: 3 of the grid's 4 cells" in capsys.readouterr().out
    shutil.rmtree(folder / "hopper-random-adept-sac-samples5-upenalty20-s10")
    assert report.calibration(folder, budget=400, cells=4) is None  # nor begun
    pick = report.calibration(folder, budget=400, cells=3)
    assert (pick["lam"], pick["thr"], pick["ret"]) == (5.0, None, pytest.approx(0.21))
    assert pick["score"] == pytest.approx((9 + 20 + 20) / 3)
    assert report.penalty_setting("hopper-random-adept-sac-samples5-upenalty10-uthreshold0.1-s10") == (10.0, 0.1)
    assert report.penalty_setting("hopper-random-adept-sac-samples5-upenalty1e-05-s10") == (1e-05, None)  # :g's "-"
    assert report.penalty_setting("hopper-random-adept-sac-samples5-uthreshold2-s10") == (0.0, 2.0)
    rows = report.read_csv(folder / "hopper-random-adept-sac-samples5-upenalty2-s10/metrics.csv")
    assert report.window_mean(rows, "normalized_score", 300) == pytest.approx((9 + 9 + 10) / 3)
    assert math.isnan(report.window_mean(rows, "normalized_score", 500))  # not reached
    report.milestones(folder, [300], None)
    assert "| adept-sac-samples5-upenalty2-s10 | running | 400 | 9.3 |" in capsys.readouterr().out  # no summary.json
    write_cell(folder, "hopper-random-adept-sac-lambda0-samples5-upenalty10-s0", 0.01, [50] * 4)  # not a grid cell
    assert report.calibration(folder, budget=400, cells=3)["lam"] == 5.0
    write_cell(folder, "hopper-random-adept-sac-samples5-upenalty10-s0", 0.01, [50] * 4)  # another seed's grid
    with pytest.raises(SystemExit, match="seeds 0, 10"):
        report.calibration(folder, budget=400, cells=3)
