"""`sftc status`: where a run stands, read from its directory alone (no model is loaded)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftc.errors import RunError, SftcError

from sftc.runtime.rundir import (DIAGNOSTICS, candidates, checkpoint_dirs, checkpoint_problems, read_best, read_lock,
                          read_metrics, read_run_json)


def _live_pid(run_dir: Path) -> int | None:
    """The pid recorded in run.lock if that process is alive. The file outlives the run (only the
    flock is released), and taking the flock here to test it could refuse a run starting just then."""
    import os
    import re

    try:  # a damaged run.lock (any bytes) only informs: never a UnicodeDecodeError
        text = (run_dir / "run.lock").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"pid (\d+)", text)
    if not match:
        return None
    pid = int(match.group(1))
    if pid <= 0:  # kill(0, 0) would ask about this process group, not a run
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a rotted pid past any C int
        return None
    except PermissionError:
        return pid
    return pid


def fmt_number(value: Any) -> str:
    """The one number format of `sftc status` and `sftc runs`: integers with thousands separators,
    other numbers to 4 significant digits (thousands and up as whole numbers with separators)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def run_state(run_dir) -> str:
    """running (a live `sftc run` holds run.lock), else what run.json says; a record still saying
    'running' with no live process means the process died: interrupted."""
    run_dir = Path(run_dir)
    if _live_pid(run_dir) is not None:
        return "running"
    try:
        recorded = read_run_json(run_dir).get("status")
    except SftcError:
        return "damaged"
    if recorded == "running":
        return "interrupted"
    return recorded or "-"


def status(run_dir, verify_hashes: bool = True) -> str:
    """Checkpoints (step, valid or why not, metrics), the selected one and why, and training progress.
    `verify_hashes=False` skips re-hashing weights (a large model takes a while)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    lines = [f"run {run_dir.name}"]
    try:
        lock = read_lock(run_dir)
    except SftcError as exc:  # a missing or damaged bundle still leaves the run's own records to show
        lock = None
        lines.append(f"  bundle: {str(exc).splitlines()[0]}")
    bundle_id = lock.bundle_id if lock else None
    run = read_run_json(run_dir)
    if lock:
        kind = lock.spec.parameterization.kind
        planned = lock.budget.optimizer_steps
        lines.append(f"  bundle {bundle_id}  parameterization {kind}  planned steps {fmt_number(planned)}")
    if run.get("world_size"):
        lines.append(f"  world size {run['world_size']}")
    pid = _live_pid(run_dir)
    if pid is not None:
        lines.append(f"  live: `sftc run` pid {pid} holds run.lock")
    elif run.get("status"):
        lines.append(f"  status {run['status']}" + (f": {run['error']}" if run.get("error") else ""))

    train, _ = read_metrics(run_dir)
    if train:
        last = train[-1]
        lines.append(f"  last train step {last.get('step')}: loss {fmt_number(last.get('loss'))}, "
                     f"lr {fmt_number(last.get('lr'))}, "
                     f"supervised tokens so far {fmt_number(last.get('supervised_tokens_total'))}")
    else:
        lines.append("  no train steps logged yet")

    evaluated = {c["step"]: c for c in candidates(run_dir)}
    best = read_best(run_dir)
    best_step = best.get("best_step") if best else None
    dirs = checkpoint_dirs(run_dir)
    lines.append(f"  checkpoints ({len(dirs)} on disk):" if dirs else "  no checkpoints on disk")
    for step, path in dirs:
        problems = checkpoint_problems(path, bundle_id, verify_hashes=verify_hashes)
        state = "valid" if not problems else "INVALID: " + "; ".join(problems)
        metrics = evaluated.get(step, {})
        shown = "  ".join(f"{k} {fmt_number(v)}" for k, v in sorted(metrics.items()) if k not in DIAGNOSTICS)
        mark = "*" if step == best_step else " "
        lines.append(f"  {mark} step {step:>6}  {state}" + (f"  {shown}" if shown else ""))
    gone = sorted(set(evaluated) - {s for s, _ in dirs})
    if gone:
        lines.append(f"  evaluated but rotated away: steps {', '.join(map(str, gone))}")

    if best is None:
        lines.append("  best: not selected yet (no best.json)")
    else:
        if best_step is not None:
            lines.append(f"  best: step {best_step}")
        else:
            lines.append(f"  best: none eligible (fallback step {fmt_number(best.get('fallback_step'))})")
        lines.append(f"  why: {best.get('why', '-')}")
    export = run_dir / "export"
    if export.is_dir():
        lines.append(f"  export: {export}")
    return "\n".join(lines)
