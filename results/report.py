"""Tables (markdown, printed) and figures (PNG) of the importance-sampling study and of the ablation.

    python results/report.py study results/is_study --png results/is_study/hopper.png --env hopper
    python results/report.py ablation results/ablation/hopper-random --png results/ablation/hopper-random.png

study: per target policy and arm, each error averaged over the measurements of the second half of the updates (the
    models after 12k, 14k, ..., 20k of 20k updates: one model's error swings by about +-30% from one measurement to
    the next, as SGD moves it), mean +- std over seeds, and its change against the frozen model (paired by seed);
    then each arm minus the w = 1 control per seed, on the H-step errors under the target policy. The figure has one
    panel per (target, error), one line per arm.
ablation: per arm, each run scored by the mean of its last 3 evaluations; mean +- std over seeds, a 95% percentile
    bootstrap interval over seeds (10,000 resamples, fixed seed), the best run, the model's errors and eps_pi (and
    the uncertainty u, the truncated share and Spearman(u, error) where runs measured them); and the paired
    difference ADEPT - each control, per seed and with its interval (with --reference R: each other arm - R). The
    figure: learning curves and the simulator-measured model error (state after H steps) over training, mean and
    spread over seeds, one line per arm. Then, through rliable (Agarwal et al., 2021), the field's aggregates over
    the runs and tasks (folders) of each budget (policy steps): the interquartile mean (IQM) of the scores with its
    95% stratified bootstrap interval (runs resampled within each task; --reps resamples, 10,000), the probability
    of improvement P(X > Y) of ADEPT over each other arm (with --reference R: of each other arm over R; ties count
    half; 2,000 resamples, as in rliable's examples), and with --profile-png the performance profiles (the fraction
    of runs scoring above each threshold, with 95% bands). The paired per-seed differences stay the first statistic:
    with 3 seeds an interval is little more than their range, and the IQM of 3 runs is their mean.

    python results/report.py ablation results/ablation/hopper-random results/ablation/halfcheetah-random \
        --reference control --profile-png profiles.png

milestones: every run of a folder, finished or still running, at each of --at policy steps: its score (the mean
    normalized score of the last 3 evaluations up to that step, the ablation's score), the model's H-step state and
    return errors against the simulator and eps_pi (means over the same evaluations); the figure: the curves of the
    score, the two errors and eps_pi, one line per run.
calibration: the uncertainty penalty's grid (runs named ...-samples<N>[-upenalty<x>][-uthreshold<y>]-s<seed>), one
    row per cell: the H-step errors averaged over the evaluations of the second half of the budget (--budget), the
    score, the mean u of the rollouts, the truncated share and Spearman(u, error); then, once all --cells penalized
    cells have run --budget steps, the choice, by the rule fixed before the grid ran: the cells whose return error
    is within 10% of the lowest, and of those the best score.

    python results/report.py milestones results/paper-budget/halfcheetah-random --at 100000 300000 1000000 \
        --png results/paper-budget/halfcheetah-random.png
    python results/report.py calibration results/penalty/calibration --budget 50000
"""

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ERRORS = ("onpolicy_state_error_h", "pe_return_error", "onpolicy_state_error", "dataset_state_error",
          "dataset_reward_error")
HEADLINE = ("onpolicy_state_error_h", "pe_return_error")  # the errors PE depends on: under the policy, H steps


def steps_axis(ax) -> None:
    """An x axis of policy steps, its ticks in thousands (300k, not 300000, which run into each other)."""
    ax.set_xlabel("policy steps")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))


def save_figure(fig, png: Path) -> None:
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"\nwrote {png}")


def read_csv(path: Path) -> list[dict]:
    return [{k: float(v) if v not in ("", "nan") else float("nan") for k, v in row.items()}
            for row in csv.DictReader(open(path))]


def bootstrap_ci(x, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of x (resampling x with replacement)."""
    x = np.asarray(x, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), (n, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def late_mean(rows: list[dict], key: str) -> float:
    """Mean of `key` over the measurements after half of the run's updates (the last one included)."""
    half = rows[-1]["updates"] / 2
    return float(np.mean([r[key] for r in rows if r["updates"] > half]))


def paired_change(runs: dict, reference: dict, key: str) -> list[float]:
    """Per seed (in order), late_mean of `key` in a run minus that of the reference run of the same seed."""
    return [late_mean(rows, key) - late_mean(reference[s], key) for s, rows in sorted(runs.items()) if s in reference]


def study(folder: Path, env: str, png: Path | None) -> None:
    cells = defaultdict(dict)  # (target label, arm) -> seed -> rows
    for csv_path in sorted(folder.glob(f"{env}-random-s*/*__*.csv")):
        seed = int(csv_path.parent.name.rsplit("-s", 1)[1])
        target, arm = csv_path.stem.split("__")
        cells[(target, arm)][seed] = read_csv(csv_path)
    targets = sorted({t for t, _ in cells}, key=lambda t: int("".join(c for c in t if c.isdigit()) or 0))
    arms = list(dict.fromkeys(a for _, a in sorted(cells, key=lambda k: _arm_order(k[1]))))
    print(f"### {env}-random: errors over the second half of the model updates, mean +- std over seeds "
          f"(change against the frozen model, same seeds)\n")
    for target in targets:
        print(f"target {target}\n")
        print("| arm | seeds | " + " | ".join(ERRORS) + " | batch ESS |")
        print("|---|---|" + "---|" * (len(ERRORS) + 1))
        frozen = cells.get((target, "frozen"), {})
        for arm in arms:
            runs = cells.get((target, arm))
            if not runs:
                continue
            parts = []
            for e in ERRORS:
                late = np.array([late_mean(rows, e) for rows in runs.values()])
                delta = paired_change(runs, frozen, e)
                change = f" ({np.mean(delta):+.3g})" if arm != "frozen" and delta else ""
                parts.append(f"{late.mean():.3g} +- {late.std():.2g}{change}")
            ess = [late_mean(rows, "batch_ess") for rows in runs.values()]
            print(f"| {arm} | {len(runs)} | " + " | ".join(parts) + f" | {np.nanmean(ess):.3f} |"
                  if not np.all(np.isnan(ess)) else f"| {arm} | {len(runs)} | " + " | ".join(parts) + " | - |")
        print()
        # The question of the study: does an update beat the w = 1 control (more model training without weights)?
        w1 = cells.get((target, "w1"), {})
        print(f"target {target}, each arm minus the w = 1 control, per seed (negative: more accurate than w = 1)\n")
        print("| arm | seeds | " + " | ".join(HEADLINE) + " | seeds below w = 1 (both errors) |")
        print("|---|---|" + "---|" * (len(HEADLINE) + 1))
        for arm in arms:
            d = {e: paired_change(cells.get((target, arm), {}), w1, e) for e in HEADLINE}
            n = len(d[HEADLINE[0]])
            if arm == "w1" or not n:
                continue
            below = sum(all(d[e][i] < 0 for e in HEADLINE) for i in range(n))
            print(f"| {arm} | {n} | " + " | ".join(", ".join(f"{x:+.3f}" for x in d[e]) for e in HEADLINE)
                  + f" | {below} of {n} |")
        print()
    if png:
        shown = ERRORS[:3]
        fig, axes = plt.subplots(len(targets), len(shown), figsize=(5 * len(shown), 3.6 * len(targets)),
                                 squeeze=False)
        for i, target in enumerate(targets):
            for j, e in enumerate(shown):
                ax = axes[i, j]
                for arm in arms:
                    runs = cells.get((target, arm))
                    if not runs:
                        continue
                    x = [r["updates"] for r in next(iter(runs.values()))]
                    y = np.array([[r[e] for r in rows][: len(x)] for rows in runs.values() if len(rows) >= len(x)])
                    ax.plot(x, y.mean(0), label=arm, linestyle="--" if arm in ("frozen", "ceiling") else "-")
                    ax.fill_between(x, y.min(0), y.max(0), alpha=0.12)
                ax.set_title(f"{env}, target {target}: {e}", fontsize=9)
                ax.set_xlabel("model updates")
        axes[0, -1].legend(fontsize=7)
        save_figure(fig, png)


def _arm_order(arm: str) -> int:
    order = ("frozen", "w1", "eq3", "eq3_uniform", "lambda0.5", "lr3e-5", "resample", "ceiling")
    return order.index(arm) if arm in order else len(order)


ABLATION_ARMS = {"adept-sac": "ADEPT-SAC", "adept-sac-lambda0": "w = 1 control (--is-exponent 0)",
                 "diff-sac": "Diff+SAC", "sac": "SAC", "iql": "IQL"}


def arm_and_seed(folder: str, run: str) -> tuple[str, int]:
    """Run folder name <env>-<dataset>-<arm>-s<seed> inside the folder <env>-<dataset> -> (arm, seed); the dataset
    may hold dashes (medium-replay)."""
    arm, seed = run.removeprefix(folder + "-").rsplit("-s", 1)
    return arm, int(seed)


def finished_steps(run: Path) -> int | None:
    """The budget a run last finished (summary.json's total_steps), or None while it has not finished one. A run
    extended in stages rewrites summary.json at the end of each stage, while its metrics.csv grows in the next."""
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("total_steps") if summary.exists() else None


def finished_rows(run: Path) -> list[dict] | None:
    """A finished run's evaluations up to the budget it finished, or None."""
    total = finished_steps(run)
    rows = [r for r in read_csv(run / "metrics.csv") if total is not None and r["step"] <= total]
    return rows if rows and rows[-1]["step"] == total else None


def load_runs(folder: Path) -> dict:
    """The finished runs of a folder <env>-<dataset>, each up to the budget it finished: arm -> seed -> rows of
    metrics.csv, seeds in numerical order."""
    runs = defaultdict(dict)
    for (arm, seed), run in sorted((arm_and_seed(folder.name, m.parent.name), m.parent)
                                   for m in folder.glob("*/metrics.csv")):
        rows = finished_rows(run)
        if rows is not None:
            runs[arm][seed] = rows
    return runs


def run_score(rows: list[dict]) -> float:
    """A run's score: the mean normalized score of its last 3 evaluations."""
    return float(np.mean([r["normalized_score"] for r in rows[-3:]]))


def ordered(arms) -> list[str]:
    """The arms in the report's order, then the others in the order given."""
    return [a for a in ABLATION_ARMS if a in arms] + [a for a in arms if a not in ABLATION_ARMS]


UNCERTAINTY = {"u_rollout": "mean u", "truncated_share": "truncated", "u_error_rank_corr": "Spearman(u, err)"}
SHORT_ARMS = {"adept": "adept-{}", "control": "adept-{}-lambda0", "diff": "diff-{}", "alone": "{}"}  # as sweep.py


def resolve_arm(name: str, arms) -> str:
    """An arm of `arms` by its key (adept-sac-lambda0) or by the sweep's name (adept, control, diff, alone)."""
    if name in arms:
        return name
    if name in SHORT_ARMS:
        found = [a for a in arms if any(a == SHORT_ARMS[name].format(agent) for agent in ("sac", "iql", "bc"))]
        if len(found) == 1:
            return found[0]
        if found:
            raise SystemExit(f"error: --reference {name} is ambiguous here ({', '.join(found)}): name one")
    raise SystemExit(f"error: --reference {name}: no such arm (arms: {', '.join(ordered(arms))})")


def label(arm: str) -> str:
    return ABLATION_ARMS.get(arm, arm)


def ablation(folder: Path, png: Path | None, reference: str | None = None) -> None:
    runs = load_runs(folder)
    score = {arm: {s: run_score(rows) for s, rows in seeds.items()} for arm, seeds in runs.items()}
    arms = ordered(runs)
    # the uncertainty's columns where some run measured it (--uncertainty-samples > 1)
    extra = [k for k in UNCERTAINTY if any(k in rows[-1] for seeds in runs.values() for rows in seeds.values())]
    print(f"### {folder.name}: score = mean normalized score of each run's last 3 evaluations\n")
    print("| arm | seeds | steps | mean +- std | 95% bootstrap CI | best run | per seed | sim state err (H) "
          "| sim return err (H) | eps_pi |" + "".join(f" {UNCERTAINTY[k]} |" for k in extra))
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
    mixed = []
    for arm in arms:
        s = np.array(list(score[arm].values()))
        lo, hi = bootstrap_ci(s)
        def err(key):  # mean over seeds of each run's last 3 evaluations; "-" where the arm has no model
            per_seed = np.array([window_mean(rows, key, rows[-1]["step"]) for rows in runs[arm].values()])
            n = int((~np.isnan(per_seed)).sum())
            if n == 0:
                return "-"
            return f"{np.nanmean(per_seed):.3g}" + (f" ({n} of {len(per_seed)} seeds)" if n < len(per_seed) else "")

        steps = sorted({int(rows[-1]["step"]) for rows in runs[arm].values()})
        if len(steps) > 1:
            mixed.append(ABLATION_ARMS.get(arm, arm))
        steps = str(steps[0]) if len(steps) == 1 else "-".join(map(str, (steps[0], steps[-1])))
        print(f"| {ABLATION_ARMS.get(arm, arm)} | {len(s)} | {steps} | {s.mean():.1f} +- {s.std():.1f} | "
              f"[{lo:.1f}, {hi:.1f}] | {s.max():.1f} | {', '.join(f'{x:.1f}' for x in s)} | "
              f"{err('sim_state_error_h')} | {err('sim_return_error_h')} | {err('eps_pi')} |"
              + "".join(f" {err(k)} |" for k in extra))
    if mixed:
        print(f"\n(seeds at different budgets, pooled in one mean: {', '.join(mixed)}; see the steps column)")
    try:
        pairs = comparisons(arms, reference)
    except SystemExit as e:  # not in this folder
        print(f"\n(no paired differences: {str(e).removeprefix('error: ')})")
        pairs = []
    budget = {arm: {seed: rows[-1]["step"] for seed, rows in seeds.items()} for arm, seeds in runs.items()}
    lines, unpaired = [], []
    for x, y in pairs:
        common = [s for s in sorted(set(score[x]) & set(score[y])) if budget[x][s] == budget[y][s]]
        if not common:
            unpaired.append(label(y if reference is None else x))
            continue
        d = np.array([score[x][s] - score[y][s] for s in common])
        lo, hi = bootstrap_ci(d)
        some = (f" (seeds {', '.join(map(str, common))})"  # not every seed of the two arms
                if len(common) < max(len(score[x]), len(score[y])) else "")
        lines.append(f"| {label(y if reference is None else x)} | {', '.join(f'{v:+.1f}' for v in d)}{some} | "
                     f"{d.mean():+.1f} | [{lo:+.1f}, {hi:+.1f}] |")
    if lines:
        if reference is None:
            print("\nPaired difference ADEPT-SAC - control, per seed (the same seeds):\n")
            print("| control | per seed | mean | 95% bootstrap CI |")
        else:
            print(f"\nPaired difference arm - {label(pairs[0][1])}, per seed (the same seeds):\n")
            print("| arm | per seed | mean | 95% bootstrap CI |")
        print("|---|---|---|---|")
        print("\n".join(lines))
    if unpaired:
        print(f"\n(not paired: {', '.join(unpaired)}: no seed at the same budget in both arms)")
    if png:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for i, arm in enumerate(arms):  # one color per arm in both panels, though SAC has no model error
            for ax, key in zip(axes, ("normalized_score", "sim_state_error_h")):
                seeds = list(runs[arm].values())
                n = min(len(rows) for rows in seeds)
                y = np.array([[r.get(key, np.nan) for r in rows[:n]] for rows in seeds])
                if np.all(np.isnan(y)):
                    continue
                x = [r["step"] for r in seeds[0][:n]]
                color = f"C{i % 10}"
                ax.plot(x, np.nanmean(y, 0), label=ABLATION_ARMS.get(arm, arm), color=color)
                ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), alpha=0.15, color=color)
        axes[0].set_title(f"{folder.name}: normalized score (mean, min-max over seeds)", fontsize=9)
        axes[1].set_title("model state error after H steps, against the simulator", fontsize=9)
        for ax in axes:
            steps_axis(ax)
        axes[0].legend(fontsize=7)
        save_figure(fig, png)


def comparisons(arms: list[str], reference: str | None) -> list[tuple[str, str]]:
    """(X, Y) pairs compared as X - Y and P(X > Y): ADEPT-SAC against each other arm by default; with a reference,
    each other arm against it."""
    if reference is None:
        return [("adept-sac", a) for a in arms if a != "adept-sac"] if "adept-sac" in arms else []
    ref = resolve_arm(reference, arms)
    return [(a, ref) for a in arms if a != ref]


# ------------------------------------------------------------------------------------------------------------------
# rliable's aggregates (imported when used: rliable brings arch, scipy, pandas and seaborn)
# ------------------------------------------------------------------------------------------------------------------
def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of a (runs x tasks) array: rliable's, the mean of the middle 50% of all its scores."""
    from rliable import metrics
    return float(metrics.aggregate_iqm(np.asarray(scores, dtype=float)))


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """rliable's P(X > Y) of two (runs x tasks) arrays: per task the share of (run of X, run of Y) pairs in which
    X's is higher, ties counting half (Mann-Whitney U / (n_x n_y)), averaged over the tasks."""
    from rliable import metrics
    return float(metrics.probability_of_improvement(np.asarray(x, dtype=float), np.asarray(y, dtype=float)))


def interval(func, *arrays: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """rliable's point estimate and 95% stratified-bootstrap percentile interval of func(*arrays), each array
    (runs x tasks) resampled over its runs within each task. rliable draws from numpy's global generator: seeded
    here, so that each interval is the same whatever else is computed."""
    from rliable import library
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        key = "x" if len(arrays) == 1 else "x,y"
        point, ci = library.get_interval_estimates({key: arrays[0] if len(arrays) == 1 else tuple(arrays)},
                                                   func, reps=reps)
    finally:
        np.random.set_state(state)
    return float(np.ravel(point[key])[0]), float(np.ravel(ci[key][0])[0]), float(np.ravel(ci[key][1])[0])


def budgets(folders: list[Path]) -> dict:
    """budget (policy steps of the runs) -> task (folder name) -> arm -> seed -> score"""
    names = [folder.name for folder in folders]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a folder is one task: two folders of one name would mix their runs
        raise SystemExit(f"error: the folders name one task twice ({', '.join(twice)}): report them one at a time")
    out = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        for arm, seeds in load_runs(folder).items():
            for seed, rows in seeds.items():
                out[int(rows[-1]["step"])][folder.name].setdefault(arm, {})[seed] = run_score(rows)
    return out


def score_matrices(tasks: dict) -> tuple[dict, list[str]]:
    """arm -> (runs x tasks) array, for the arms that every task has, each task's runs in seed order and cut to
    the fewest of any task; and a note for each arm left out or cut."""
    arms, notes, matrices = ordered(sorted({a for arms in tasks.values() for a in arms})), [], {}
    for arm in arms:
        missing = [t for t in tasks if arm not in tasks[t]]
        if missing:
            notes.append(f"{label(arm)} left out: no finished run in {', '.join(missing)}")
            continue
        n = min(len(tasks[t][arm]) for t in tasks)
        if any(len(tasks[t][arm]) > n for t in tasks):
            notes.append(f"{label(arm)}: the first {n} seeds of each task (the fewest any task has)")
        matrices[arm] = np.array([[tasks[t][arm][s] for s in sorted(tasks[t][arm])[:n]] for t in tasks]).T
    return matrices, notes


def aggregates(folders: list[Path], reference: str | None = None, profile_png: Path | None = None,
               reps: int = 10_000, pair_reps: int = 2_000) -> dict:
    """rliable's IQM with its interval per arm and the probability of improvement per compared pair, for each
    budget over its tasks (printed; the profiles drawn into profile_png). -> {budget: {"iqm": {arm: (point, lo,
    hi)}, "poi": {(x, y): (point, lo, hi)}}}"""
    from rliable import library

    found, out, profiles = budgets(folders), {}, []
    for budget in sorted(found):
        tasks = found[budget]
        matrices, notes = score_matrices(tasks)
        if not matrices:
            continue
        print(f"\n### rliable aggregates at {budget} policy steps: {len(tasks)} task{'s' * (len(tasks) > 1)} "
              f"({', '.join(tasks)})\n")
        for note in notes:
            print(f"- {note}")
        print(f"{chr(10) if notes else ''}IQM of the runs' scores, 95% stratified bootstrap interval ({reps:,} "
              "resamples of the runs within each task):\n")
        print("| arm | runs x tasks | IQM | 95% CI | mean |")
        print("|---|---|---|---|---|")
        res = {"iqm": {}, "poi": {}}
        for arm, m in matrices.items():
            res["iqm"][arm] = interval(lambda x: np.array([iqm(x)]), m, reps=reps)
            point, lo, hi = res["iqm"][arm]
            print(f"| {label(arm)} | {m.shape[0]} x {m.shape[1]} | {point:.1f} | [{lo:.1f}, {hi:.1f}] | "
                  f"{m.mean():.1f} |")
        try:
            pairs = comparisons(list(matrices), reference)
        except SystemExit as e:  # the reference has no runs at this budget
            print(f"\n(no probability of improvement: {str(e).removeprefix('error: ')})")
            pairs = []
        if pairs:
            print(f"\nProbability of improvement P(X > Y) over the runs of each task, averaged over the tasks (ties "
                  f"count half), 95% stratified bootstrap interval ({pair_reps:,} resamples):\n")
            print("| X | Y | P(X > Y) | 95% CI |")
            print("|---|---|---|---|")
            for x, y in pairs:
                res["poi"][x, y] = interval(probability_of_improvement, matrices[x], matrices[y], reps=pair_reps)
                point, lo, hi = res["poi"][x, y]
                print(f"| {label(x)} | {label(y)} | {point:.2f} | [{lo:.2f}, {hi:.2f}] |")
        out[budget] = res
        profiles.append((budget, tasks, matrices))
    if profile_png and profiles:
        fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 3.8), squeeze=False)
        for ax, (budget, tasks, matrices) in zip(axes[0], profiles):
            every = np.concatenate([m.ravel() for m in matrices.values()])
            taus = np.linspace(min(every.min(), 0.0), every.max() * 1.05 + 1e-9, 101)
            state = np.random.get_state()
            np.random.seed(0)
            dist, cis = library.create_performance_profile(matrices, taus, reps=pair_reps)
            np.random.set_state(state)
            for arm in matrices:
                ax.plot(taus, dist[arm], label=label(arm))
                ax.fill_between(taus, cis[arm][0], cis[arm][1], alpha=0.15)
            ax.set_title(f"{budget} steps: {', '.join(tasks)}", fontsize=9)
            ax.set_xlabel("normalized score (mean of the last 3 evaluations) tau")
            ax.set_ylabel("fraction of runs with score > tau")
            ax.set_ylim(-0.02, 1.02)
        axes[0, 0].legend(fontsize=7)
        save_figure(fig, profile_png)
    return out


def all_runs(folder: Path) -> dict:
    """Every run of a folder, finished or not: run folder name -> rows of metrics.csv."""
    return {m.parent.name: read_csv(m) for m in sorted(folder.glob("*/metrics.csv"))}


def window_mean(rows: list[dict], key: str, upto: float, n: int = 3) -> float:
    """Mean of `key` over the last n evaluations at or before step `upto` (nan if the run has not reached it)."""
    if not rows or rows[-1]["step"] < upto:
        return float("nan")
    v = [r.get(key, np.nan) for r in rows if r["step"] <= upto][-n:]
    return float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")


MILESTONE_KEYS = (("normalized_score", "score", ".1f"), ("sim_state_error_h", "state err (H)", ".3g"),
                  ("sim_return_error_h", "return err (H)", ".3g"), ("eps_pi", "eps_pi", ".3g"))


def short_name(run: str) -> str:
    """A run's name without its <env>-<dataset>- prefix: adept-sac-samples5-upenalty2-s10."""
    return re.sub(r"^[a-z0-9]+-(random|medium-replay|medium|expert|simple)-", "", run)


def milestones(folder: Path, at: list[int], png: Path | None) -> None:
    runs = all_runs(folder)
    print(f"### {folder.name}: at each step, means over the last 3 evaluations up to it ('-': not reached)\n")
    print("| run | finished | latest step | " + " | ".join(f"{name} @ {s / 1000:g}k" for s in at
                                                        for _, name, _ in MILESTONE_KEYS) + " |")
    print("|---|---|---|" + "---|" * (len(at) * len(MILESTONE_KEYS)))
    for name, rows in runs.items():
        cells = []
        for step in at:
            for key, _, fmt in MILESTONE_KEYS:
                v = window_mean(rows, key, step)
                cells.append("-" if np.isnan(v) else format(v, fmt))
        done = "yes" if finished_steps(folder / name) == rows[-1]["step"] else "running"
        print(f"| {short_name(name)} | {done} | {int(rows[-1]['step'])} | {' | '.join(cells)} |")
    if png:
        fig, axes = plt.subplots(1, len(MILESTONE_KEYS), figsize=(4.2 * len(MILESTONE_KEYS), 3.6))
        for i, (name, rows) in enumerate(runs.items()):  # one color per run in every panel
            x = [r["step"] for r in rows]
            for ax, (key, title, _) in zip(axes, MILESTONE_KEYS):
                y = [r.get(key, np.nan) for r in rows]
                if not np.all(np.isnan(y)):
                    ax.plot(x, y, label=short_name(name), color=f"C{i % 10}")
        for ax, (key, title, _) in zip(axes, MILESTONE_KEYS):
            ax.set_title(f"{folder.name}: {title}" if key == "normalized_score" else title, fontsize=9)
            steps_axis(ax)
        axes[0].legend(fontsize=7)
        save_figure(fig, png)


NUMBER = r"\d[\d.]*(?:e[-+]\d+)?"  # a float as adept.py's run names write it (:g), 1e-05 included


def penalty_setting(run: str) -> tuple[float, float | None]:
    """(lambda_u, threshold) from a run name's -upenalty<x> and -uthreshold<y> (0 and None where absent)."""
    penalty, threshold = (re.search(f"-{key}({NUMBER})-", run) for key in ("upenalty", "uthreshold"))
    return float(penalty.group(1)) if penalty else 0.0, float(threshold.group(1)) if threshold else None


def calibration(folder: Path, budget: int, cells: int = 8) -> dict | None:
    """The grid of one seed's ADEPT runs with N samples (adept-<agent>-samples<N>[-upenalty..][-uthreshold..]-s<seed>),
    each scored up to the budget; the choice among the finished penalized cells by the rule of results/README.md."""
    runs = {name: [r for r in rows if r["step"] <= budget] for name, rows in all_runs(folder).items()
            if re.fullmatch(rf".*-adept-[a-z]+-samples\d+(-upenalty{NUMBER})?(-uthreshold{NUMBER})?-s\d+", name)}
    runs = {name: rows for name, rows in runs.items() if rows}
    seeds = {name.rsplit("-s", 1)[1] for name in runs}
    if len(seeds) > 1:
        raise SystemExit(f"error: {folder} holds the grids of seeds {', '.join(sorted(seeds))}: give one seed's")
    def late(rows, key):  # the mean over the evaluations after half of the budget; nan before it
        v = np.array([r.get(key, np.nan) for r in rows if r["step"] > budget / 2], dtype=float)
        return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")

    rows_out = []
    for name, rows in runs.items():
        lam, thr = penalty_setting(name)
        done = rows[-1]["step"] >= budget
        rows_out.append(dict(name=name, lam=lam, thr=thr, step=int(rows[-1]["step"]), done=done,
                             state=late(rows, "sim_state_error_h"), ret=late(rows, "sim_return_error_h"),
                             score=run_score(rows), u=late(rows, "u_rollout"), trunc=late(rows, "truncated_share"),
                             rho=late(rows, "u_error_rank_corr"), eps_pi=late(rows, "eps_pi")))
    rows_out.sort(key=lambda r: (r["thr"] is not None, r["lam"]))
    print(f"### {folder.name}: means over the evaluations after {budget // 2} steps; score: last 3 evaluations\n")
    print("| lambda_u | threshold | steps | H-step return err | H-step state err | score | eps_pi | mean u | "
          "truncated | Spearman(u, err) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['lam']:g} | {'-' if r['thr'] is None else format(r['thr'], 'g')} | {r['step']} | "
              f"{r['ret']:.3g} | {r['state']:.3g} | {r['score']:.1f} | {r['eps_pi']:.3g} | {r['u']:.3g} | "
              f"{r['trunc']:.3f} | {r['rho']:.2f} |")
    penalized = [r for r in rows_out if (r["lam"] > 0 or r["thr"] is not None) and r["done"]]
    if len(penalized) < cells:
        print(f"\nno choice yet: {len(penalized)} of the grid's {cells} cells have run {budget} steps")
        return None
    if any(np.isnan(r["ret"]) for r in penalized):
        raise SystemExit("error: a finished cell has no H-step return error after half of the budget")
    best = min(r["ret"] for r in penalized)
    pick = max((r for r in penalized if r["ret"] <= 1.1 * best), key=lambda r: r["score"])
    print(f"\nchoice: lambda_u = {pick['lam']:g}, threshold {pick['thr']} (H-step return error {pick['ret']:.3g}, "
          f"lowest {best:.3g}; score {pick['score']:.1f})")
    return pick


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("study", "ablation", "milestones", "calibration"))
    p.add_argument("folders", type=Path, nargs="+", metavar="folder",
                   help="study: one folder; ablation: one or more <env>-<dataset> folders (the tasks)")
    p.add_argument("--png", type=Path, help="the figure (ablation: of one folder)")
    p.add_argument("--env", default="hopper", help="study: the environment")
    p.add_argument("--reference", help="ablation: compare each other arm with this one (a folder's arm name such "
                   "as adept-sac-lambda0, or the sweep's adept, control, diff, alone); default: ADEPT-SAC against "
                   "each other arm")
    p.add_argument("--profile-png", type=Path, help="ablation: draw rliable's performance profiles here")
    p.add_argument("--reps", type=int, default=10_000, help="ablation: bootstrap resamples of the IQM intervals")
    p.add_argument("--at", type=int, nargs="+", default=[100_000, 300_000, 1_000_000],
                   help="milestones: the policy steps to report")
    p.add_argument("--budget", type=int, default=50_000, help="calibration: the grid's policy steps")
    p.add_argument("--cells", type=int, default=8, help="calibration: the grid's penalized cells")
    a = p.parse_args()
    if a.what in ("study", "milestones", "calibration") or a.png:
        if len(a.folders) > 1:
            p.error("study, milestones, calibration and --png take one folder")
    if a.what == "study":
        study(a.folders[0], a.env, a.png)
    elif a.what == "milestones":
        milestones(a.folders[0], a.at, a.png)
    elif a.what == "calibration":
        calibration(a.folders[0], a.budget, a.cells)
    else:
        for i, folder in enumerate(a.folders):
            print("\n" * (i > 0), end="")
            ablation(folder, a.png, a.reference)
        aggregates(a.folders, a.reference, a.profile_png, a.reps)
