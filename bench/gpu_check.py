"""GPU check of adept.py (run by bench/gpu_check.sh): the speed of a step, and exact resume on the device.

1. Speed: the ADEPT-SAC step and the SAC step at the paper's settings (batch 256, hidden 256, B_m 1024, K 10,
   H 10, 250 rollouts every 250 steps), eager and with CUDA graphs, train_steps_per_second after warm-up, their
   ratios, and whether the graphed ADEPT-SAC step takes at most 5 ms.
2. Resume: ADEPT-SAC at the paper's settings for --steps policy steps, twice without a stop (A, B: how close two
   uninterrupted runs are, since GPU kernels need not be bit-for-bit repeatable), and once stopped halfway and
   resumed with --resume (C). C passes when it is as close to A as B is (within 10x, or both under 1e-6).
   The runs use CUDA graphs (--cudagraphs, on by default on CUDA): a capture must not change a run's state.

Writes <out>/gpu_check.json after each part; a part that fails is recorded with its traceback and the next parts
still run, so that one device run says as much as it can. On a machine without CUDA it runs on the CPU (to test the
script) and says so.
    python bench/gpu_check.py --out /tmp/out [--steps 1000 --speed-steps 3000]
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adept  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", default="bench-out")
p.add_argument("--steps", type=int, default=1000, help="policy steps of each resume run")
p.add_argument("--speed-steps", type=int, default=3000, help="policy steps of each timed run")
p.add_argument("--dataset-size", type=int, default=100_000)
cli = p.parse_args()
out = Path(cli.out)
out.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix="adept-gpu-check-"))
os.environ.setdefault("MINARI_DATASETS_PATH", str(work / "store"))
os.environ["HF_HUB_OFFLINE"] = "1"
cuda = torch.cuda.is_available()
report = {"device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA here: a test of the script only)",
          "torch": torch.__version__}
print(report, flush=True)


def args(**kw) -> adept.Args:
    base = dict(dataset_size=cli.dataset_size, output_dir=str(work / "runs"), world_model_steps=500,
                behavior_steps=200, eval_episodes=2, log_every=500, cuda=True)
    return adept.Args(**{**base, **kw})


def actor_distance(run_a: str, run_b: str) -> float:
    """Largest absolute difference between the final actor and world-model weights of two runs."""
    a, b = (torch.load(work / "runs" / r / "checkpoint.pt", map_location="cpu", weights_only=False)
            for r in (run_a, run_b))
    pairs = [(a["agent"]["actor"], b["agent"]["actor"]), (a["wm"], b["wm"])]
    return max((x[k].float() - y[k].float()).abs().max().item() for x, y in pairs for k in x)


def save() -> None:  # after each part: a part that fails or runs out of time leaves the others' results
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


def part(name: str, fn) -> None:
    """Run one part of the check; an exception is recorded in the report (the next parts still run)."""
    try:
        report[name] = fn()
    except Exception:
        report[name] = {"passed": False, "error": traceback.format_exc()[-3000:]}
    print({name: report[name]}, flush=True)
    save()


def resume() -> dict:
    t0 = time.perf_counter()
    half, n = cli.steps // 2, cli.steps
    adept.main(args(run_name="pretrain", total_steps=1))  # fills the world-model cache: A, B and C all load it
    sa = adept.main(args(run_name="A", total_steps=n, eval_every=half))
    sb = adept.main(args(run_name="B", total_steps=n, eval_every=half))
    adept.main(args(run_name="C", total_steps=half, eval_every=half))
    sc = adept.main(args(run_name="C", total_steps=n, eval_every=half, resume=True))
    d_ab, d_ac = actor_distance("A", "B"), actor_distance("A", "C")
    return {"steps": n, "stopped_at": half, "cudagraphs": sc["args"]["cudagraphs"],
            "max_weight_diff_two_uninterrupted": d_ab, "max_weight_diff_resumed": d_ac,
            "score_A": sa["normalized_score"], "score_B": sb["normalized_score"], "score_resumed": sc["normalized_score"],
            "passed": d_ac <= max(10 * d_ab, 1e-6), "device_of_run": sc["device"], "seconds": time.perf_counter() - t0}


def speed(graphs: bool) -> dict:
    """The ADEPT-SAC and SAC steps at the paper's settings, eager or with CUDA graphs (--cudagraphs)."""
    common, mode, res = dict(total_steps=cli.speed_steps, eval_every=cli.speed_steps, eval_episodes=1), \
        "graphed" if graphs else "eager", {"steps": cli.speed_steps}
    for name, kw in (("adept_sac", {}), ("sac", {"world_model": False})):
        s = adept.main(args(run_name=f"speed-{name}-{mode}", cudagraphs=graphs, **kw, **common))
        res[f"{name}_{mode}_steps_per_second"] = s["train_steps_per_second"]
        res[f"{name}_{mode}_ms_per_step"] = 1000 / s["train_steps_per_second"]
        if name == "adept_sac":
            res[f"adept_sac_{mode}_rollout_transitions_per_second"] = s["rollout_transitions_per_second"]
    res[f"ratio_adept_sac_over_sac_{mode}"] = res[f"adept_sac_{mode}_ms_per_step"] / res[f"sac_{mode}_ms_per_step"]
    res["device_of_run"] = s["device"]
    return res


part("speed_eager", lambda: speed(False))
part("speed_graphed", lambda: speed(True))
e, g = report["speed_eager"], report["speed_graphed"]
if "error" not in e and "error" not in g:
    report["speed"] = {**{f"{k}_speedup_graphed_over_eager": e[f"{k}_eager_ms_per_step"] / g[f"{k}_graphed_ms_per_step"]
                          for k in ("adept_sac", "sac")},
                       "adept_sac_graphed_at_most_5_ms": g["adept_sac_graphed_ms_per_step"] <= 5.0}
    print(report["speed"], flush=True)
    save()
part("resume", resume)  # with graphs where CUDA is there (the default)
sys.exit(0 if all(report[k].get("passed", True) for k in ("resume", "speed_eager", "speed_graphed")) else 1)
