"""GPU check of adept.py (run by bench/gpu_check.sh): exact resume on the device, and the speed of a step.

1. Resume: ADEPT-SAC at the paper's settings for --steps policy steps, twice without a stop (A, B: how close two
   uninterrupted runs are, since GPU kernels need not be bit-for-bit repeatable), and once stopped halfway and
   resumed with --resume (C). C passes when it is as close to A as B is (within 10x, or both under 1e-6).
   The runs use CUDA graphs (--cudagraphs, on by default on CUDA): a capture must not change a run's state.
2. Speed: the ADEPT-SAC step and the SAC step at the paper's settings (batch 256, hidden 256, B_m 1024, K 10,
   H 10, 250 rollouts every 250 steps), eager and with CUDA graphs, train_steps_per_second after warm-up, their
   ratios, and whether the graphed ADEPT-SAC step takes at most 5 ms.

Writes <out>/gpu_check.json. On a machine without CUDA it runs on the CPU (to test the script) and says so.
    python bench/gpu_check.py --out /tmp/out [--steps 1000 --speed-steps 3000]
"""

import argparse
import json
import os
import sys
import tempfile
import time
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
    a, b = (torch.load(work / "runs" / r / "checkpoint.pt", map_location="cpu", weights_only=False) for r in (run_a, run_b))
    pairs = [(a["agent"]["actor"], b["agent"]["actor"]), (a["wm"], b["wm"])]
    return max((x[k].float() - y[k].float()).abs().max().item() for x, y in pairs for k in x)


# ---- 1. resume ----
t0 = time.perf_counter()
half, n = cli.steps // 2, cli.steps
adept.main(args(run_name="pretrain", total_steps=1))  # fills the world-model cache, so that A, B and C all load it
sa = adept.main(args(run_name="A", total_steps=n, eval_every=half))
sb = adept.main(args(run_name="B", total_steps=n, eval_every=half))
adept.main(args(run_name="C", total_steps=half, eval_every=half))
sc = adept.main(args(run_name="C", total_steps=n, eval_every=half, resume=True))
d_ab, d_ac = actor_distance("A", "B"), actor_distance("A", "C")
report["resume"] = {
    "steps": n, "stopped_at": half, "max_weight_diff_two_uninterrupted": d_ab, "max_weight_diff_resumed": d_ac,
    "score_A": sa["normalized_score"], "score_B": sb["normalized_score"], "score_resumed": sc["normalized_score"],
    "passed": d_ac <= max(10 * d_ab, 1e-6), "device_of_run": sc["device"], "seconds": time.perf_counter() - t0}
print(report["resume"], flush=True)

# ---- 2. speed at the paper's settings, with and without CUDA graphs (--cudagraphs), in this one process ----
common = dict(total_steps=cli.speed_steps, eval_every=cli.speed_steps, eval_episodes=1)
speed = {"steps": cli.speed_steps}
for graphs in ("eager", "graphed"):
    for name, kw in (("adept_sac", {}), ("sac", {"world_model": False})):
        s = adept.main(args(run_name=f"speed-{name}-{graphs}", cudagraphs=graphs == "graphed", **kw, **common))
        speed[f"{name}_{graphs}_steps_per_second"] = s["train_steps_per_second"]
        speed[f"{name}_{graphs}_ms_per_step"] = 1000 / s["train_steps_per_second"]
        if name == "adept_sac":
            speed[f"adept_sac_{graphs}_rollout_transitions_per_second"] = s["rollout_transitions_per_second"]
    speed[f"ratio_adept_sac_over_sac_{graphs}"] = (speed[f"adept_sac_{graphs}_ms_per_step"]
                                                   / speed[f"sac_{graphs}_ms_per_step"])
for name in ("adept_sac", "sac"):
    eager, graphed = speed[f"{name}_eager_ms_per_step"], speed[f"{name}_graphed_ms_per_step"]
    speed[f"{name}_speedup_graphed_over_eager"] = eager / graphed
speed["adept_sac_graphed_at_most_5_ms"] = speed["adept_sac_graphed_ms_per_step"] <= 5.0
speed["device_of_run"] = s["device"]
report["speed"] = speed
print(report["speed"], flush=True)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
sys.exit(0 if report["resume"]["passed"] else 1)
