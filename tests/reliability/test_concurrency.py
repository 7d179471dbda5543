"""Concurrency: two real `sftc run` processes on one run directory (the second refuses with a
clear message while the first trains on, untouched), and two `sftc compile` processes racing on
one spec (exactly one complete bundle, both report it, no temp dir left).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from sftc.runtime.verify import verify_bundle

from tests.compiler.conftest import base_spec

from .conftest import REPO, subprocess_env
from tests.conftest import without_progress


def _sftc(*args) -> list[str]:
    return [sys.executable, "-m", "sftc.cli", *[str(a) for a in args]]


def test_second_run_on_the_same_run_dir_is_refused(project, figures):
    bundle = project.compile(schedule={"max_steps": 8}, checkpoint={"every_steps": 4, "keep_last": 2})
    run_dir = project.root / "runs" / "shared"
    env = subprocess_env()
    first = subprocess.Popen(_sftc("run", bundle, "--run-dir", run_dir), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / "run.lock"
        deadline = time.monotonic() + 90
        while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(_sftc("run", bundle, "--run-dir", run_dir), cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        figures["concurrency_cases"] += 1
        assert second.returncode == 2, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert without_progress(second.stderr).startswith("error:")
        assert "another `sftc run`" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and len(record["sessions"]) == 1, "the refused run left a trace"
    figures["concurrency_ok"] += 1


def test_compile_racing_on_one_spec_gives_one_complete_bundle(cproject, figures):
    cproject.write_jsonl("data/rows.jsonl", [
        {"thread_id": f"T{i}", "prompt": f"Key number {i} is stale.", "completion": f"Rotate key {i}."} for i in range(24)
    ])
    spec = cproject.write_spec(base_spec())
    env = subprocess_env()
    procs = [subprocess.Popen(_sftc("compile", spec, "--quiet"), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    figures["concurrency_cases"] += 1
    for rc, out, err in results:
        assert rc == 0, err[-2000:]
    paths = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(paths) == 1, paths
    bundles = cproject.root / "bundles"
    assert [p.name for p in bundles.iterdir()] == [paths.pop().rsplit("/", 1)[-1]], "one bundle, no temp dir"
    assert not list(cproject.root.rglob("*.tmp"))
    bundle = next(bundles.iterdir())
    verify_bundle(bundle)  # complete: every file matches the lock
    figures["concurrency_ok"] += 1
