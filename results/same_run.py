"""Whether two metrics.csv of one run (a rerun and its first attempt, or runs on two machines) agree: every cell of
the evaluations both hold, but the timings, compared as text (every digit).

    python results/same_run.py <first attempt>/metrics.csv <rerun>/metrics.csv
"""
import csv
import sys

TIMINGS = {"train_steps_per_second", "wall_seconds"}
a, b = (list(csv.DictReader(open(p))) for p in sys.argv[1:3])
n = min(len(a), len(b))
differ = [(r["step"], k) for r, q in zip(a[:n], b[:n]) for k in r if k not in TIMINGS and r[k] != q.get(k)]
print(f"{n} evaluations in both (to step {a[n - 1]['step'] if n else '-'}); cells that differ: "
      f"{len(differ)}{' ' + str(differ[:10]) if differ else ''}")
sys.exit(1 if differ else 0)
