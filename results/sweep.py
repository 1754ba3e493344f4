"""A grid of adept.py runs as Ray tasks, one run each, from a frozen copy of one commit's code.

    python results/sweep.py --output-dir runs/ablation --envs hopper halfcheetah --arms adept control diff alone \\
        --seeds 0 1 2 --total-steps 100000 --world-model-steps 100000 --behavior-steps 20000
    python results/sweep.py --output-dir runs --arms adept 'pool4096=--is-resample-pool 4096' -- --eval-every 10000

The grid: every (env, dataset, agent, arm, seed), with the budgets (--total-steps, --world-model-steps,
--behavior-steps) and the adept.py flags after `--` common to all runs. A run's flags are, in this order (a later
flag wins): --env, --dataset, --agent, --seed, the budgets, the arm's flags, the flags after `--`, --output-dir.

Arms. `adept` (ADEPT-<agent>, no flag), `control` (--is-exponent 0, the w = 1 control), `diff`
(--no-importance-sampling, Diff+<agent>) and `alone` (--no-world-model, the agent alone) are built in; any other arm
is NAME=FLAGS, FLAGS adept.py flags split as a shell would (quote the whole spec): 'pool4096=--is-resample-pool 4096',
'uniform=--behavior-density uniform', 'iql=--agent iql --no-world-model'. NAME labels the arm in the sweep's output;
the run folder keeps adept.py's own name (<env>-<dataset>-[adept-|diff-]<agent>[-<settings>]-s<seed>), so that
results/report.py finds it. Two specs that name the same run folder are an error.

Where things go. Each run is `python <worktree>/adept.py ... --output-dir <output-dir>/<env>-<dataset>`: its folder
<output-dir>/<env>-<dataset>/<run-name>/ (checkpoint.pt, metrics.csv, summary.json), its log beside it in
<run-name>.log (appended to by each attempt), and the caches of the runs of that task (world_models/,
behavior_policies/) in <output-dir>/<env>-<dataset>/, shared by the arms of a seed as adept.py shares them. Runs
are submitted arm by arm, seeds inner, so that the first arm's runs pretrain each seed's world model before the later
arms need it (a run that needs a model another run is pretraining waits on its lock, holding its CPU).

The code of one commit. The sweep resolves --commit (default: HEAD of the repository that holds this file, or of
--repo), makes a git worktree of it (`git worktree add --detach`) in <output-dir>/.code/<commit>/, or reuses the one
there, and runs that copy's adept.py: editing or committing in the repository while a grid runs changes nothing
under a running run. When a run ends, the commit is added to its summary.json (key "commit", written atomically);
while it runs, <run folder>/sweep.json records the commit (and the command, host and process id). A run folder that
records another commit, or none, is not continued: that run is reported as failed, and the others go on.

Resuming. A run that has a checkpoint continues from it (--resume), one without starts fresh, one whose summary.json
shows it finished (at least its --total-steps) is left alone and counted as skipped. A sweep stopped at any point
(Ctrl-C, a killed process, a dead machine), rerun with the same command, loses at most the steps since each run's
last checkpoint (every --eval-every steps). Ray retries a task whose worker died (--max-retries), and that retry
resumes the same way. Each run is a subprocess, so a run that crashes does not take its Ray worker down; it is
killed if its worker dies (Linux), and it holds <run-name>.lock beside its folder, so that two sweeps never run the
same run at once.

Output: one line per finished, skipped or failed run (its name, score: the mean normalized score of its last 3
evaluations, and wall time; or the last lines of its log), then a count of each. Exit code 1 if any run failed
(2 for a bad command line), 130 if interrupted.

Resources. Each run asks Ray for --cpus-per-run CPUs (default 1; the sweep sets no thread count: adept.py's default is
--threads 1 since commit 444dca6, so with --cpus-per-run 2 pass `-- --threads 2`) and --gpus-per-run GPUs (default 0:
the run sees no GPU and runs on the CPU; with CUDA, a fraction such as 0.25 lets 4 runs share one GPU). By default Ray
starts here, on this machine's cores (--num-cpus), bound to the loopback address (127.0.0.1) only, with no dashboard
and no usage reporting: Ray 2.60 on Linux maps a loopback node address to the machine's outward one unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which the sweep sets for its own local instance (then every Ray process listens
on 127.0.0.1 alone, checked with `ss -ltnp`).

A cluster (--address HOST:PORT of a running Ray head, or `auto`) needs:
  - the same Python environment (requirements.txt) on every worker;
  - the repository on the driver: it makes the commit's worktree in the output folder (.code/), and every worker's
    runs use that copy, as the driver checked it;
  - a filesystem shared by the driver and the workers for the output folder (runs, logs, and the caches
    world_models/ and behavior_policies/), and for the Minari store (MINARI_DATASETS_PATH, passed on to the runs
    with the driver's other MINARI_*, HF_*, MUJOCO_* and ADEPT_* variables), so that a run resumed on another worker
    finds its checkpoint and the runs of a seed share their caches;
  - file locks that work across machines on that filesystem: adept.py's caches and datasets and the sweep's run locks
    use fcntl/flock locks, which NFS gives with lock support (NFSv4, or v3 with lockd), but not every FUSE filesystem.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN_ARMS = {"adept": [], "control": ["--is-exponent", "0"], "diff": ["--no-importance-sampling"],
                "alone": ["--no-world-model"]}
PASSED_ENV = ("MINARI_", "HF_", "MUJOCO_", "ADEPT_")  # prefixes of the driver's variables every run gets
BUDGETS = ("total_steps", "world_model_steps", "behavior_steps")


# ----------------------------------------------------------------------------------------------------------------
# The command line and the grid
# ----------------------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """-> the sweep's options, and the adept.py flags after `--`"""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="results/sweep.py", description=__doc__.split("\n")[0],
        epilog="Flags after `--` go to every run's adept.py. See the module docstring for arms, resuming and clusters.")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="runs go to <output-dir>/<env>-<dataset>/<run-name>/, the code to <output-dir>/.code/")
    p.add_argument("--envs", nargs="+", default=["hopper"], help="adept.py --env values (default: hopper)")
    p.add_argument("--datasets", nargs="+", default=["random"], help="adept.py --dataset values (default: random)")
    p.add_argument("--agents", nargs="+", default=["sac"], help="adept.py --agent values (default: sac)")
    p.add_argument("--arms", nargs="+", default=["adept", "control", "diff", "alone"],
                   help="built in: adept, control (--is-exponent 0), diff (--no-importance-sampling), alone "
                        "(--no-world-model); or NAME=FLAGS, e.g. 'pool4096=--is-resample-pool 4096' (default: the "
                        "four built-in arms)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default: 0 1 2)")
    p.add_argument("--total-steps", type=int, help="adept.py --total-steps (default: adept.py's)")
    p.add_argument("--world-model-steps", type=int, help="adept.py --world-model-steps (default: adept.py's)")
    p.add_argument("--behavior-steps", type=int, help="adept.py --behavior-steps (default: adept.py's)")
    p.add_argument("--commit", default="HEAD", help="the code the runs run: a git revision of --repo (default: HEAD)")
    p.add_argument("--repo", type=Path, default=HERE.parent,
                   help="the git repository of adept.py (default: the one that holds this file)")
    p.add_argument("--address", help="join this running Ray cluster (HOST:PORT or auto) instead of starting Ray here")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: this machine's cores)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs Ray reserves for each run (default: 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="GPUs Ray reserves for each run (default: 0, and the run sees no GPU). With CUDA a fraction "
                        "such as 0.25 lets several runs (here 4) share one GPU")
    p.add_argument("--max-retries", type=int, default=3, help="Ray's retries of a run whose worker died (default: 3)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    return p.parse_args(argv), extra


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """'adept' (a built-in arm) or 'NAME=FLAGS' -> (name, adept.py flags)"""
    if "=" in spec:
        name, flags = spec.split("=", 1)
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"arm {spec!r}: NAME=FLAGS needs a name without spaces")
        return name, shlex.split(flags)
    if spec not in BUILTIN_ARMS:
        raise ValueError(f"arm {spec!r}: use one of {', '.join(BUILTIN_ARMS)}, or NAME=FLAGS")
    return spec, list(BUILTIN_ARMS[spec])


def grid(opts: argparse.Namespace, extra: list[str]) -> list[dict]:
    """Every run of the grid, arm by arm with the seeds inner: {label, task, argv} (argv without --output-dir)."""
    budgets = []
    for key in BUDGETS:
        if getattr(opts, key) is not None:
            budgets += [f"--{key.replace('_', '-')}", str(getattr(opts, key))]
    arms = [parse_arm(a) for a in opts.arms]
    runs = []
    for env in opts.envs:
        for dataset in opts.datasets:
            for agent in opts.agents:
                for arm, flags in arms:
                    for seed in opts.seeds:
                        argv = ["--env", env, "--dataset", dataset, "--agent", agent, "--seed", str(seed), *budgets,
                                *flags, *extra]
                        task = f"{env}-{dataset.replace('/', '-')}"  # as adept.py's run names begin
                        runs.append({"label": f"{arm}, {agent}, seed {seed}", "task": task, "argv": argv})
    return runs


NAMER = r"""
import contextlib, dataclasses, io, json, sys
sys.path.insert(0, sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    import adept
out = []
for argv in json.load(open(sys.argv[2])):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = adept.parse_args(argv) if hasattr(adept, "parse_args") else adept.tyro.cli(adept.Args, args=argv)
        out.append({"name": adept.run_name(args), "total_steps": args.total_steps,
                    "args": json.loads(json.dumps(dataclasses.asdict(args), default=str))})
    except SystemExit:
        msg = " ".join(w for w in err.getvalue().split() if set(w) not in ({"-"}, {"─"}, {"│"}))  # tyro's frame
        out.append({"error": msg or "invalid arguments"})
json.dump(out, open(sys.argv[3], "w"))
"""


def run_names(worktree: Path, argvs: list[list[str]]) -> list[dict]:
    """adept.py's run name, total steps and arguments of each argv, by the commit's own parser and run_name, in one
    process: [{name, total_steps, args} or {error}]"""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.json").write_text(json.dumps(argvs))
        r = subprocess.run([sys.executable, "-c", NAMER, str(worktree), f"{tmp}/in.json", f"{tmp}/out.json"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            raise RuntimeError(f"could not read adept.py's run names from {worktree}: {r.stderr.strip()[-2000:]}")
        return json.loads(Path(tmp, "out.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# The code of one commit
# ----------------------------------------------------------------------------------------------------------------
def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def resolve_commit(repo: Path, revision: str) -> str:
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except RuntimeError:
        raise ValueError(f"--commit {revision}: no such commit in {repo}") from None


@contextlib.contextmanager
def locked(path: Path, wait: bool = True):
    """An flock on `path` for the block; wait=False raises BlockingIOError at once if another process holds it.
    Yields the open file (a child process that inherits it keeps the lock while it lives)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def worktree(repo: Path, commit: str, path: Path, remake: bool = True) -> Path:
    """A git worktree of `commit` at `path`, made (git worktree add --detach) or reused; one process makes it while
    others wait. The driver (remake=True) checks it with git, and remakes one that git cannot read here (made from a
    clone that is gone: a new checkout). A run's task (remake=False) uses one that git cannot read as it is: on a
    cluster worker the worktree, in the shared output folder, belongs to the driver's clone, and the driver checked
    it before any run started (remaking it there would delete the code under the runs of other workers)."""
    with locked(path.parent / f"{path.name}.lock"):
        if path.exists():
            try:
                head = git(path, "rev-parse", "HEAD")
            except RuntimeError:
                if not remake:
                    if not (path / "adept.py").is_file():
                        raise RuntimeError(f"{path} holds no adept.py, and git cannot read it here") from None
                    return path
                shutil.rmtree(path)  # the sweep's own copy of the commit's code
                git(repo, "worktree", "prune")
            else:
                if head != commit:
                    raise RuntimeError(f"{path} holds commit {head}, not {commit}; delete it and run again")
                if git(path, "status", "--porcelain", "--untracked-files=no"):  # the runs would not run the commit
                    raise RuntimeError(f"{path}, the code of commit {commit[:10]}, has been edited; delete it and run "
                                       "again")
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # --force: also where a deleted worktree of this path is still registered in the repository
        git(repo, "worktree", "add", "--force", "--detach", str(path), commit)
        return path


# ----------------------------------------------------------------------------------------------------------------
# One run: the Ray task's body (a plain function, so that it can be called without Ray)
# ----------------------------------------------------------------------------------------------------------------
def write_json(path: Path, obj: dict) -> None:
    """Write atomically: a temporary file beside `path`, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_lines(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


# Started in the child before it becomes adept.py: the kernel kills it when the Ray worker that started it dies
# (PR_SET_PDEATHSIG survives the exec), so a dead worker leaves no run behind to race with the retry.
CHILD = ("import ctypes, os, signal, sys\n"
         "try:\n"
         "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
         "except (OSError, AttributeError):\n"
         "    pass\n"
         "if os.getppid() != int(sys.argv[1]):\n"
         "    sys.exit(137)  # the parent is already gone\n"
         "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


def result(spec: dict, status: str, **kw) -> dict:
    return {"status": status, "name": spec["name"], "label": spec["label"], "log": spec["log"], **kw}


def scored(spec: dict, status: str, summary: dict, **kw) -> dict:
    score = summary.get("normalized_score_last3", summary.get("normalized_score"))
    return result(spec, status, score=score, final=summary.get("normalized_score"),
                  steps=summary.get("total_steps"), wall=summary.get("wall_seconds"), **kw)


def execute(spec: dict) -> dict:
    """Run (or resume, or leave) one run. -> {status: finished | skipped | failed, name, label, log, ...}"""
    run_dir, task_dir, commit = Path(spec["run_dir"]), Path(spec["task_dir"]), spec["commit"]
    log = Path(spec["log"])
    try:
        wt = worktree(Path(spec["repo"]), commit, Path(spec["worktree"]), remake=False)  # the driver made it
        with locked(task_dir / f"{spec['name']}.lock", wait=False) as lock:
            return _execute(spec, wt, run_dir, log, commit, lock)
    except BlockingIOError:
        return result(spec, "failed", error=f"another process holds {task_dir / (spec['name'] + '.lock')}: a sweep "
                                             "is running this run already")
    except Exception as e:  # noqa: BLE001 - reported as this run's failure; the others go on
        return result(spec, "failed", error=f"{type(e).__name__}: {e}")


# adept.py's arguments that do not change what a run computes up to its budget: a run may be continued or left
# finished under a command that differs in these alone (a stage raises --total-steps)
FREE_ARGS = {"total_steps", "resume", "threads", "cuda", "cudagraphs", "output_dir", "log_every", "tensorboard"}


def other_settings(recorded: dict | None, wanted: dict | None) -> list[str]:
    """The arguments in which the run on disk and this command differ, FREE_ARGS aside ([] where either is unknown:
    runs of older sweeps recorded none while under way)."""
    if not recorded or not wanted:
        return []
    return [f"{k} {recorded[k]!r} there, {wanted[k]!r} here" for k in sorted(recorded.keys() & wanted.keys())
            if k not in FREE_ARGS and recorded[k] != wanted[k]]


def _execute(spec: dict, wt: Path, run_dir: Path, log: Path, commit: str, lock) -> dict:
    summary_path, marker = run_dir / "summary.json", run_dir / "sweep.json"
    summary, mark = read_json(summary_path), read_json(marker)
    recorded = (summary or {}).get("commit") or (mark or {}).get("commit")
    differ = other_settings((summary or {}).get("args") or (mark or {}).get("args"), spec.get("args"))
    if differ:  # the same run name, other settings (an --output-dir shared by two grids): never mix them
        return result(spec, "failed", error=f"{run_dir} was made with other settings ({'; '.join(differ)}): left as "
                      "it is (use another --output-dir)")
    if summary is not None:
        if recorded != commit:
            return result(spec, "failed", error=f"{run_dir} was made by commit {recorded or '(none recorded)'}, not "
                          f"{commit}: left as it is (run it with --commit {recorded}, or use another --output-dir)"
                          if recorded else f"{run_dir} records no commit (not made by this sweep): left as it is; "
                          "move it away or use another --output-dir")
        if "commit" not in summary:  # finished, but the sweep stopped before recording the commit
            write_json(summary_path, {**summary, "commit": commit})
            marker.unlink(missing_ok=True)
        if summary.get("total_steps", 0) >= spec["total_steps"]:
            return scored(spec, "skipped", summary)
    resume = (run_dir / "checkpoint.pt").exists()
    if not resume and summary is not None:  # a finished stage without its checkpoint: starting over would erase it
        return result(spec, "failed", error=f"{run_dir} holds a run of {summary.get('total_steps')} steps but no "
                      "checkpoint to continue it from: left as it is (a copy of committed results?)")
    if resume and recorded != commit:
        return result(spec, "failed", error=f"{run_dir} holds a checkpoint of commit {recorded}, not {commit}: not "
                      "continued" if recorded else f"{run_dir} holds a checkpoint that records no commit (not made by "
                      "this sweep): not continued; move it away or use another --output-dir")
    cmd = [sys.executable, str(wt / "adept.py"), *spec["argv"], *(["--resume"] if resume else [])]
    env = {**os.environ, **spec["env"]}
    if not spec["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves it alone for a task without GPUs: hide them
    run_dir.mkdir(parents=True, exist_ok=True)
    note = {"commit": commit, "command": shlex.join(cmd), "host": socket.gethostname(), "started": time.time(),
            "args": spec.get("args")}
    write_json(marker, note)
    t0 = time.time()
    with open(log, "a") as out:
        out.write(f"=== results/sweep.py, {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}, "
                  f"commit {commit}, {'resumed' if resume else 'fresh'}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(os.getpid()), *cmd[1:]], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=spec["task_dir"],
                                pass_fds=(lock.fileno(),))
        with contextlib.suppress(OSError):  # a note only: nothing may stop this process from waiting on its child,
            write_json(marker, {**note, "pid": proc.pid})  # whose run lock it shares
        rc = proc.wait()
    seconds = time.time() - t0
    summary = read_json(summary_path)
    if rc == 0 and summary is not None:
        if summary.get("total_steps", 0) < spec["total_steps"]:
            return result(spec, "failed", error=f"adept.py ended, but {summary_path} is of "
                          f"{summary.get('total_steps')} steps, not {spec['total_steps']}")
        write_json(summary_path, {**summary, "commit": commit})
        marker.unlink(missing_ok=True)
        return scored(spec, "finished", summary, resumed=resume, seconds=seconds)
    if not (run_dir / "checkpoint.pt").exists():  # it never got going: leave no folder, as adept.py does
        marker.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    why = f"killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit code {rc}"
    tail = last_lines(log)
    return result(spec, "failed", error=f"{why} after {duration(seconds)}; the end of {log}:\n{tail}",
                  brief=f"{why}: {tail.splitlines()[-1]}", seconds=seconds)


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------
def start_ray(opts: argparse.Namespace):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at niceness 15, and a run inherits it: beside any other busy process (a run started by
    # hand, a build) it gets a few percent of a core. The runs are the work here: give them normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not opts.address:  # read when ray is imported: else Ray maps 127.0.0.1 to this machine's outward address
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if opts.address:
        ray.init(address=opts.address, log_to_driver=False, logging_level="warning")
        where = f"the Ray cluster at {opts.address}"
    else:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=200 * 2**20, log_to_driver=False, logging_level="warning")
        nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        where = f"a local Ray instance on {', '.join(nodes)}"
        if nodes != ["127.0.0.1"]:
            where += " (warning: not the loopback address alone; was ray imported before the sweep started it?)"
    resources = ray.cluster_resources()
    print(f"sweep: {where}, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    if resources.get("CPU", 0) < opts.cpus_per_run:
        raise ValueError(f"--cpus-per-run {opts.cpus_per_run:g} but Ray has {resources.get('CPU', 0):g} CPUs")
    if resources.get("GPU", 0) < opts.gpus_per_run:
        raise ValueError(f"--gpus-per-run {opts.gpus_per_run:g} but Ray has {resources.get('GPU', 0):g} GPUs")
    if __name__ != "__main__":  # Ray pickles a function of an imported module by reference: send this one whole
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def progress(i: int, n: int, r: dict) -> str:
    head = f"[{i}/{n}] {r['status']:8s} {r['name']} ({r['label']})"
    if r["status"] == "failed":
        text = f"{head}: {r['error']}" + (f"\n{r['command']}" if r.get("command") else "")
        return text.replace("\n", "\n    ")
    wall = duration(r["wall"]) if r.get("wall") is not None else "?"
    score = f"{r['score']:.1f}" if r.get("score") is not None else "?"
    final = f", final evaluation {r['final']:.1f}" if r.get("final") is not None else ""
    extra = ""
    if r["status"] == "finished":
        extra = f", {duration(r['seconds'])} in this sweep" + (", resumed from its checkpoint" if r["resumed"] else "")
    elif r["status"] == "skipped":
        extra = ", already finished"
    return f"{head}: score {score} (mean of the last 3 evaluations{final}), {r.get('steps')} steps, wall {wall}{extra}"


def main(argv: list[str] | None = None) -> int:
    opts, extra = parse(sys.argv[1:] if argv is None else argv)
    out = opts.output_dir.resolve()
    try:
        runs = grid(opts, extra)
        repo = Path(git(opts.repo, "rev-parse", "--show-toplevel"))
        commit = resolve_commit(repo, opts.commit)
        wt = worktree(repo, commit, out / ".code" / commit)
        names = run_names(wt, [r["argv"] for r in runs])
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if subprocess.run(["git", "-C", str(repo), "diff", "--quiet", commit, "--", "adept.py"]).returncode:
        print(f"sweep: note: the working tree's adept.py differs from commit {commit[:10]}; the runs run the "
              "commit's", flush=True)
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
    specs, failed, seen = [], [], {}
    for r, named in zip(runs, names):
        if "error" in named:
            failed.append({"status": "failed", "name": f"{r['task']} (flags not taken)", "label": r["label"],
                           "error": named["error"], "brief": named["error"],
                           "command": f"adept.py {shlex.join(r['argv'])}"})
            continue
        task_dir = out / r["task"]
        spec = {**r, "name": named["name"], "total_steps": named["total_steps"], "args": named["args"],
                "task_dir": str(task_dir),
                "run_dir": str(task_dir / named["name"]), "log": str(task_dir / f"{named['name']}.log"),
                "argv": [*r["argv"], "--output-dir", str(task_dir)], "commit": commit, "worktree": str(wt),
                "repo": str(repo), "env": env, "gpus": opts.gpus_per_run}
        if spec["run_dir"] in seen:
            print(f"error: arms {seen[spec['run_dir']]} and {r['label']} both name the run {spec['run_dir']}",
                  file=sys.stderr)
            return 2
        seen[spec["run_dir"]] = r["label"]
        specs.append(spec)
    n = len(specs) + len(failed)
    print(f"sweep: {n} runs of commit {commit[:10]} (code in {wt}), output in {out}", flush=True)
    if opts.dry_run:
        for s in specs:
            print(f"{s['name']} ({s['label']}): python {wt / 'adept.py'} {shlex.join(s['argv'])}")
        for f in failed:
            print(progress(0, n, f))
        return 1 if failed else 0
    done = []
    for f in failed:  # a run whose flags adept.py does not take fails here; the others go on
        done.append(f)
        print(progress(len(done), n, f), flush=True)
    ray = None
    try:
        if specs:
            try:
                ray = start_ray(opts)
            except ValueError as e:  # Ray has fewer CPUs or GPUs than one run asks for
                print(f"error: {e}", file=sys.stderr)
                return 2
            task = ray.remote(execute).options(num_cpus=opts.cpus_per_run, num_gpus=opts.gpus_per_run,
                                               max_retries=opts.max_retries)
            pending = {task.remote(s): s for s in specs}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ready[0])
                try:
                    r = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - the worker died more often than --max-retries allows
                    r = result(s, "failed", error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
                done.append(r)
                print(progress(len(done), n, r), flush=True)
    except KeyboardInterrupt:
        print(f"\nsweep: interrupted after {len(done)} of {n} runs; the same command resumes the rest from their "
              "checkpoints", file=sys.stderr, flush=True)
        return 130
    finally:
        if ray is not None:
            ray.shutdown()
    count = {k: sum(r["status"] == k for r in done) for k in ("finished", "skipped", "failed")}
    print(f"sweep: {count['finished']} finished, {count['skipped']} skipped (already finished), "
          f"{count['failed']} failed, of {n} runs", flush=True)
    for r in done:
        if r["status"] == "failed":
            print(f"  failed: {r['name']} ({r['label']}): {r.get('brief') or r['error'].splitlines()[0]}", flush=True)
    return 1 if count["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
