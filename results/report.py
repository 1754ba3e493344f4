"""Tables (markdown, printed) and figures (PNG) of the importance-sampling study and of the ablation.

    python results/report.py study results/is_study --png results/is_study/hopper.png --env hopper
    python results/report.py ablation results/ablation/hopper-random --png results/ablation/hopper-random.png

study: per target policy and arm, each error averaged over the measurements of the second half of the updates (the
    models after 12k, 14k, ..., 20k of 20k updates: one model's error swings by about +-30% from one measurement to
    the next, as SGD moves it), mean +- std over seeds, and its change against the frozen model (paired by seed);
    then each arm minus the w = 1 control per seed, on the H-step errors under the target policy. The figure has one
    panel per (target, error), one line per arm.
ablation: per arm, each run scored by the mean of its last 3 evaluations; mean +- std over seeds, a 95% percentile
    bootstrap interval over seeds (10,000 resamples, fixed seed), the best run; and the paired difference ADEPT -
    each control, per seed and with its interval. The figure: learning curves and the simulator-measured model
    error (state after H steps) over training, mean and spread over seeds, one line per arm.
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ERRORS = ("onpolicy_state_error_h", "pe_return_error", "onpolicy_state_error", "dataset_state_error",
          "dataset_reward_error")
HEADLINE = ("onpolicy_state_error_h", "pe_return_error")  # the errors PE depends on: under the policy, H steps


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
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        print(f"wrote {png}")


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


def ablation(folder: Path, png: Path | None) -> None:
    runs = defaultdict(dict)  # arm -> seed -> rows
    for metrics in sorted(folder.glob("*/metrics.csv")):
        if not (metrics.parent / "summary.json").exists():  # finished runs only
            continue
        arm, seed = arm_and_seed(folder.name, metrics.parent.name)
        runs[arm][seed] = read_csv(metrics)
    score = {arm: {s: float(np.mean([r["normalized_score"] for r in rows[-3:]])) for s, rows in seeds.items()}
             for arm, seeds in runs.items()}
    arms = [a for a in ABLATION_ARMS if a in runs] + [a for a in runs if a not in ABLATION_ARMS]
    print(f"### {folder.name}: score = mean normalized score of each run's last 3 evaluations\n")
    print("| arm | seeds | steps | mean +- std | 95% bootstrap CI | best run | per seed | sim state err (H) "
          "| sim return err (H) | eps_pi |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        s = np.array(list(score[arm].values()))
        lo, hi = bootstrap_ci(s)
        def err(key):  # mean over seeds of the run's last 3 evaluations; "-" where the arm has no model
            v = np.array([r.get(key, np.nan) for rows in runs[arm].values() for r in rows[-3:]])
            return f"{v[~np.isnan(v)].mean():.3g}" if (~np.isnan(v)).any() else "-"

        steps = int(next(iter(runs[arm].values()))[-1]["step"])
        print(f"| {ABLATION_ARMS.get(arm, arm)} | {len(s)} | {steps} | {s.mean():.1f} +- {s.std():.1f} | "
              f"[{lo:.1f}, {hi:.1f}] | {s.max():.1f} | {', '.join(f'{x:.1f}' for x in s)} | "
              f"{err('sim_state_error_h')} | {err('sim_return_error_h')} | {err('eps_pi')} |")
    if "adept-sac" in score:
        print("\nPaired difference ADEPT-SAC - control, per seed (the same seeds):\n")
        print("| control | per seed | mean | 95% bootstrap CI |")
        print("|---|---|---|---|")
        for arm in arms[1:]:
            common = sorted(set(score["adept-sac"]) & set(score[arm]))
            if not common:
                continue
            d = np.array([score["adept-sac"][s] - score[arm][s] for s in common])
            lo, hi = bootstrap_ci(d)
            print(f"| {ABLATION_ARMS.get(arm, arm)} | {', '.join(f'{x:+.1f}' for x in d)} | {d.mean():+.1f} | "
                  f"[{lo:+.1f}, {hi:+.1f}] |")
    if png:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for arm in arms:
            for ax, key in zip(axes, ("normalized_score", "sim_state_error_h")):
                seeds = list(runs[arm].values())
                n = min(len(rows) for rows in seeds)
                y = np.array([[r.get(key, np.nan) for r in rows[:n]] for rows in seeds])
                if np.all(np.isnan(y)):
                    continue
                x = [r["step"] for r in seeds[0][:n]]
                ax.plot(x, np.nanmean(y, 0), label=ABLATION_ARMS.get(arm, arm))
                ax.fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), alpha=0.15)
        axes[0].set_title(f"{folder.name}: normalized score (mean, min-max over seeds)", fontsize=9)
        axes[1].set_title("model state error after H steps, against the simulator", fontsize=9)
        for ax in axes:
            ax.set_xlabel("policy steps")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        print(f"\nwrote {png}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("study", "ablation"))
    p.add_argument("folder", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--env", default="hopper")
    a = p.parse_args()
    study(a.folder, a.env, a.png) if a.what == "study" else ablation(a.folder, a.png)
