"""Checkpoint overhead and resume start-up, from real `sftc run` sessions on the demo bundle.

Run 1 (fresh): `runtime.train.run_bundle` in a child process, exactly what `sftc run` calls,
in a temporary run directory, stopped one step after the first checkpoint
(`checkpoint.every_steps` of specs/access-policy-full.yaml). Instrumented from outside, without
changing the runtime: wrappers around `runtime.train.save_checkpoint` (the whole save: HF state
files, eval, manifest hashes, fsync, rename, best.json, rotation), `evaluate_checkpoint` (the
held-out loss + behaviour eval that sftc runs inside every save) and `RunState.begin_update`
(a timestamp per optimizer step).

Run 2 (resume): the same command again; it finds checkpoint-<every_steps> and resumes.

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

CHILD = r"""
import json, os, sys, time
import runtime.train as T
events = {"steps": [], "saves": [], "evals": []}
_begin = T.RunState.begin_update
def begin_update(self):
    events["steps"].append(time.time())
    return _begin(self)
T.RunState.begin_update = begin_update
_save = T.save_checkpoint
def save_checkpoint(trainer, model):
    t = time.time(); path = _save(trainer, model); events["saves"].append([t, time.time()]); return path
T.save_checkpoint = save_checkpoint
_eval = T.evaluate_checkpoint
def evaluate_checkpoint(*a, **k):
    t = time.time(); out = _eval(*a, **k); events["evals"].append([t, time.time()]); return out
T.evaluate_checkpoint = evaluate_checkpoint
T.run_bundle(sys.argv[1], run_dir=sys.argv[2], stop_after_steps=int(sys.argv[3]))
print("EVENTS " + json.dumps(events))
"""


def session(bundle: Path, run_dir: Path, stop_after: int) -> dict:
    import subprocess

    launched = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(run_dir), str(stop_after)],
                         cwd=common.REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"sftc run failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("EVENTS "))
    events = json.loads(line[len("EVENTS "):])
    events["launched"] = launched
    events["ended"] = time.time()
    return events


def main() -> dict:
    from runtime.bundle import load_bundle

    bundle_dir = common.demo_bundle()
    bundle = load_bundle(bundle_dir)
    every = int(bundle.spec.checkpoint.every_steps)
    load = [common.loadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="sftc-bench-ckpt-"))
    try:
        run_dir = tmp / "run"
        fresh = session(bundle_dir, run_dir, every + 1)
        load.append(common.loadavg())
        resume = session(bundle_dir, run_dir, every + 2)
        load.append(common.loadavg())
        ckpt = run_dir / "checkpoints" / f"checkpoint-{every}"
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    steps = fresh["steps"]
    save_start, save_end = fresh["saves"][0]
    eval_s = sum(b - a for a, b in fresh["evals"])
    save_total = save_end - save_start
    # training time of one interval: from step 1's start to the save (steps 1..every, logging
    # included), minus nothing else: the save starts after step `every` ends
    train_interval = save_start - steps[0]
    step_times = [b - a for a, b in zip(steps[1:every], steps[2:every + 1])]
    result = {
        "machine": common.machine(),
        "loadavg": load,
        "bundle": bundle.bundle_id,
        "every_steps": every,
        "checkpoint_bytes": size,
        "interval_train_s": round(train_interval, 2),
        "median_step_s": round(common.median(step_times), 4) if step_times else None,
        "save_total_s": round(save_total, 3),
        "eval_in_save_s": round(eval_s, 3),
        "save_without_eval_s": round(save_total - eval_s, 3),
        "checkpoint_overhead_fraction": round((save_total - eval_s) / train_interval, 4),
        "checkpoint_with_eval_fraction": round(save_total / train_interval, 4),
        "startup_fresh_s": round(steps[0] - fresh["launched"], 2),
        "startup_resume_s": round(resume["steps"][0] - resume["launched"], 2),
        "targets": {"checkpoint_overhead_fraction": "<= 0.03"},
        "notes": "startup = child process launch to the first optimizer step (imports, verify, model load, probe, "
                 "trainer set-up; resume also loads model/optimizer/RNG state and skips ahead).",
    }
    common.write_result("checkpoint", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return result


if __name__ == "__main__":
    main()
