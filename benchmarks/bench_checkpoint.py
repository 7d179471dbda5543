"""Checkpoint overhead and resume start-up, from real `sftc run` sessions on the demo bundle.

Run 1 (fresh): `runtime.run.run_bundle` in a child process, exactly what `sftc run` calls,
in a temporary run directory. So that the benchmark fits in minutes on 2 shared cores, the save
interval is shortened to SAVE_AT steps (a wrapper on `training_args`; the bundle is untouched)
and the run stops one step after that save; the overhead is then
save time / (checkpoint.every_steps of specs/access-policy-full.yaml x median step time),
i.e. the share at the demo's real interval. `--full-interval` runs the real interval instead. Instrumented from outside, without
changing the runtime: wrappers around `runtime.checkpoint.save_checkpoint` (the whole save: HF state
files, eval, manifest hashes, fsync, rename, best.json, rotation), `evaluate_checkpoint` (the
held-out loss + behaviour eval that sftc runs inside every save) and `RunState.begin_update`
(a timestamp per optimizer step).

Run 2 (resume): the same command again; it finds that checkpoint and resumes from it.

Reported:
  checkpoint_overhead_fraction   pure save time (save minus eval) / training time of one interval
  checkpoint_with_eval_fraction  the whole save including the eval it runs / training time
  startup_fresh_s, startup_resume_s  from process launch to the first optimizer step

    .venv/bin/python benchmarks/bench_checkpoint.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SAVE_AT = 5  # 4 measured steps after a warm-up step, then the save

CHILD = r"""
import json, os, sys, time
import sftc.runtime.trainer as T
import sftc.runtime.evaluate.held_out as H
from sftc.runtime.run import run_bundle
events = {"steps": [], "saves": [], "evals": []}
_args = T.training_args
def training_args(*a, **k):
    args = _args(*a, **k)
    if int(sys.argv[4]):
        args.save_steps = int(sys.argv[4])
    return args
T.training_args = training_args
_begin = T.RunState.begin_update
def begin_update(self):
    events["steps"].append(time.time())
    return _begin(self)
T.RunState.begin_update = begin_update
_save = T.save_checkpoint
def save_checkpoint(trainer, model):
    t = time.time(); path = _save(trainer, model); events["saves"].append([t, time.time()]); return path
T.save_checkpoint = save_checkpoint
_eval = H.evaluate_model
def evaluate_model(*a, **k):
    t = time.time(); out = _eval(*a, **k); events["evals"].append([t, time.time()]); return out
H.evaluate_model = evaluate_model
run_bundle(sys.argv[1], run_dir=sys.argv[2], stop_after_steps=int(sys.argv[3]))
print("EVENTS " + json.dumps(events))
"""


def session(bundle: Path, run_dir: Path, stop_after: int, save_at: int) -> dict:
    import subprocess

    launched = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(run_dir), str(stop_after), str(save_at)],
                         cwd=common.REPO, capture_output=True, text=True, env={**__import__("os").environ, **common.thread_env()})
    if out.returncode:
        raise SystemExit(f"sftc run failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("EVENTS "))
    events = json.loads(line[len("EVENTS "):])
    events["launched"] = launched
    events["ended"] = time.time()
    return events


def main() -> dict:
    import argparse

    from sftc.runtime.bundle import load_bundle

    parser = argparse.ArgumentParser()
    parser.add_argument("--full-interval", action="store_true", help="save at the spec's every_steps (slow)")
    cli = parser.parse_args()

    bundle_dir = common.demo_bundle()
    bundle = load_bundle(bundle_dir)
    every = int(bundle.spec.checkpoint.every_steps)
    load = [common.loadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="sftc-bench-ckpt-"))
    try:
        run_dir = tmp / "run"
        save_at = every if cli.full_interval else SAVE_AT
        fresh = session(bundle_dir, run_dir, save_at + 1, 0 if cli.full_interval else save_at)
        load.append(common.loadavg())
        # a second fresh start (1 step, own run dir) so fresh and resume both start with warm file caches
        fresh_warm = session(bundle_dir, tmp / "run2", 1, 0)
        load.append(common.loadavg())
        resume = session(bundle_dir, run_dir, save_at + 2, 0 if cli.full_interval else save_at)
        load.append(common.loadavg())
        ckpt = run_dir / "checkpoints" / f"checkpoint-{save_at}"
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    steps = fresh["steps"]
    save_start, save_end = fresh["saves"][0]
    eval_s = sum(b - a for a, b in fresh["evals"])
    save_total = save_end - save_start
    # step times (logging included) between consecutive step starts, first step (warm-up) excluded;
    # the last step before the save ends where the save starts
    bounds = steps[1:save_at] + [save_start]
    step_times = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    median_step = common.median(step_times)
    train_interval = every * median_step
    result = {
        "machine": common.machine(),
        "loadavg": load,
        "bundle": bundle.bundle_id,
        "torch_threads": common.bench_threads(),
        "every_steps": every,
        "saved_at_step": save_at,
        "interval_train_s_note": "every_steps x median step time",
        "checkpoint_bytes": size,
        "interval_train_s": round(train_interval, 2),
        "median_step_s": round(median_step, 4),
        "step_times_s": [round(x, 3) for x in step_times],
        "save_total_s": round(save_total, 3),
        "eval_in_save_s": round(eval_s, 3),
        "save_without_eval_s": round(save_total - eval_s, 3),
        "checkpoint_overhead_fraction": round((save_total - eval_s) / train_interval, 4),
        "checkpoint_with_eval_fraction": round(save_total / train_interval, 4),
        "startup_fresh_s": round(fresh_warm["steps"][0] - fresh_warm["launched"], 2),
        "startup_fresh_first_s": round(steps[0] - fresh["launched"], 2),
        "startup_resume_s": round(resume["steps"][0] - resume["launched"], 2),
        "targets": {"checkpoint_overhead_fraction": "<= 0.03"},
        "notes": "startup = child process launch to the first optimizer step (imports, verify, model load, probe, "
                 "trainer set-up; resume also loads model/optimizer/RNG state and skips ahead). startup_fresh_s is a "
                 "second fresh start (warm file cache, like the resume); startup_fresh_first_s the first one.",
    }
    common.write_result("checkpoint", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return result


if __name__ == "__main__":
    main()
