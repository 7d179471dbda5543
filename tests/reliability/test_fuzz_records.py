"""Damaged run records: random byte flips, truncations and cut byte ranges in bundle.lock.json, a
checkpoint's checkpoint.json, best.json, metrics.jsonl, run.json and run.lock of one finished run
(issue 14). Every command that reads the damaged file must end in exit 0 or a clear exit-2 error
naming it, within a wall-clock bound: no traceback, no hang, and the damaged file is never deleted
because it could not be parsed (a reader leaves it byte for byte; `run` may quarantine or rewrite
it, never remove it).

The read-only commands (verify, status, runs, report) run in-process through click's CliRunner, so
an exception that is not a SystemExit is a traceback. `run` and `export` load a model, so a handful
of cases per file run them in one driver subprocess, under a timeout. Each case is seeded by its
file and number, so a failure names the exact damage to replay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftc.cli import main

from tests.reliability.conftest import REPO, subprocess_env

EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))  # scripts/reliability_report.py --fuzz-scale
SECONDS_PER_INPUT = 60
READ_CASES = 6 * EXAMPLES  # per record file, in-process
RUN_CASES = 2 * EXAMPLES  # per record file, `run` then `export` in the driver subprocess

# (name, path of the record in the project, commands that read it in-process)
RECORDS = {
    "bundle.lock.json": ("bundles/{id}/bundle.lock.json", ("verify", "status", "runs", "report")),
    "checkpoint.json": ("runs/{id}/checkpoints/checkpoint-{step}/checkpoint.json", ("status", "runs", "report")),
    "best.json": ("runs/{id}/best.json", ("status", "runs", "report")),
    "metrics.jsonl": ("runs/{id}/metrics.jsonl", ("status", "runs", "report")),
    "run.json": ("runs/{id}/run.json", ("status", "runs", "report")),
    "run.lock": ("runs/{id}/run.lock", ("status", "runs")),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One finished, exported run (checkpoints 2 and 4), copied for every damaged case."""
    from sftc.runtime.run import run_bundle
    from tests.reliability.conftest import module_project

    project = module_project(tmp_path_factory, tiny_model_dir, "records")
    root = project.root
    bundle = project.compile(schedule={"max_steps": 4}, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.run_dir(bundle)
    run_bundle(bundle, run_dir=run_dir)
    assert CliRunner().invoke(main, ["export", str(run_dir)]).exit_code == 0
    # the pid of the process that ran it (this one) would read as a live `sftc run`
    (run_dir / "run.lock").write_text("pid 999999999 since 2026-01-01T00:00:00+00:00\n")
    return root, bundle.name


def _damage(path: Path, rng: random.Random) -> str:
    """Flip bits of one byte, truncate at a random offset, or cut out a random byte range."""
    data = bytearray(path.read_bytes())
    how = rng.choice(["flip", "truncate", "cut"]) if data else "truncate"
    if how == "flip":
        at = rng.randrange(len(data))
        mask = 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        data[at] ^= mask
        what = f"byte {at} xor {mask:#04x}"
    elif how == "truncate":
        at = rng.randrange(len(data)) if data else 0
        del data[at:]
        what = f"truncated at {at}"
    else:
        lo = rng.randrange(len(data))
        hi = rng.randint(lo + 1, min(len(data), lo + rng.choice([1, 8, 64, 512])))
        del data[lo:hi]
        what = f"bytes {lo}:{hi} cut"
    path.write_bytes(bytes(data))
    return what


def _damaged_copy(finished, dest: Path, name: str, seed: str) -> tuple[Path, Path, Path, str]:
    """(project copy, its run dir, the damaged file, what was done) for one seeded case."""
    root, bundle_id = finished
    rng = random.Random(seed)
    shutil.copytree(root, dest, symlinks=True)
    rel = RECORDS[name][0].format(id=bundle_id, step=rng.choice([2, 4]))
    target = dest / rel
    what = f"{rel}: {_damage(target, rng)}"
    return dest, dest / "runs" / bundle_id, target, what


def _args(command: str, copy: Path, run_dir: Path) -> list[str]:
    bundle = copy / "bundles" / run_dir.name
    return {"verify": ["verify", str(bundle)], "status": ["status", str(run_dir)], "runs": ["runs", "--root", str(copy)],
            "report": ["report", str(run_dir)], "run": ["run", str(bundle), "--run-dir", str(run_dir)],
            "export": ["export", str(run_dir)]}[command]


def _judge(name: str, command: str, what: str, exit_code: int, output: str, traceback: str | None, seconds: float,
           figures) -> None:
    if traceback is not None:
        figures["tracebacks"] += 1
        pytest.fail(f"`sftc {command}` with {what}: a traceback\n{traceback}")
    if seconds > SECONDS_PER_INPUT:
        figures["hangs"] += 1
        pytest.fail(f"`sftc {command}` with {what}: took {seconds:.0f} s (bound {SECONDS_PER_INPUT} s)")
    assert exit_code in (0, 2), f"`sftc {command}` with {what}: exit {exit_code}\n{output}"
    if exit_code == 2:
        assert "error:" in output and name in output, f"`sftc {command}` with {what}: the error does not name {name}\n{output}"
        assert "Traceback" not in output, output


@pytest.mark.parametrize("name", list(RECORDS))
def test_readers_of_a_damaged_record_end_in_success_or_a_clear_error(finished, tmp_path, name, figures):
    for n in range(READ_CASES):
        copy, run_dir, target, what = _damaged_copy(finished, tmp_path / f"case{n}", name, f"{name}-read-{n}")
        damaged = target.read_bytes()
        figures["inputs_tried"] += 1
        figures["inputs_tried_records"] += 1
        for command in RECORDS[name][1]:
            started = time.monotonic()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a skipped damaged line warns; only the outcome counts
                result = CliRunner().invoke(main, _args(command, copy, run_dir))
            tb = None
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                import traceback

                tb = "".join(traceback.format_exception(*result.exc_info))
            _judge(name, command, what, result.exit_code, result.output, tb, time.monotonic() - started, figures)
            # a reader never rewrites, moves or deletes the record it could not parse
            assert target.is_file() and target.read_bytes() == damaged, f"`sftc {command}` changed {what}"
        shutil.rmtree(copy)


# What the random cases found, kept as cases: run.lock is read by `status` and `runs` to tell a live
# run; its bytes were decoded strictly (a UnicodeDecodeError traceback) and its pid passed to
# os.kill unchecked (OverflowError past a C long; pid 0 asks about this process group: "live").
PINNED_RUN_LOCKS = {
    "not-utf8": b"pid \xab\xcd since 2026-01-01T00:00:00+00:00\n",
    "pid-past-a-c-long": b"pid 99999999999999999999 since 2026-01-01T00:00:00+00:00\n",
    "pid-0": b"pid 0 since 2026-01-01T00:00:00+00:00\n",
}


@pytest.mark.parametrize("content", list(PINNED_RUN_LOCKS.values()), ids=list(PINNED_RUN_LOCKS))
def test_a_damaged_run_lock_is_not_a_live_run(finished, tmp_path, content, figures):
    root, bundle_id = finished
    shutil.copytree(root, tmp_path / "proj", symlinks=True)
    run_dir = tmp_path / "proj" / "runs" / bundle_id
    (run_dir / "run.lock").write_bytes(content)
    figures["inputs_tried"] += 1
    figures["inputs_tried_records"] += 1
    for args in (["status", str(run_dir)], ["runs", "--root", str(tmp_path / "proj")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.exception is None, (args, result.output, result.exception)
        assert "live" not in result.output and "running" not in result.output and "finished" in result.output, result.output
    assert (run_dir / "run.lock").read_bytes() == content


def test_runs_lists_every_other_run_when_one_runs_best_json_is_damaged(finished, tmp_path, figures):
    root, bundle_id = finished
    copy = tmp_path / "proj"
    shutil.copytree(root, copy, symlinks=True)
    shutil.copytree(copy / "runs" / bundle_id, copy / "runs" / "intact")
    best = copy / "runs" / bundle_id / "best.json"
    best.write_bytes(b"\x01" + best.read_bytes()[1:])
    figures["inputs_tried"] += 1
    figures["inputs_tried_records"] += 1
    result = CliRunner().invoke(main, ["runs", "--root", str(copy)])
    # before: the one damaged record was the whole command's exit 2
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].startswith("intact  finished"), result.output
    assert f"{bundle_id}: finished, records unreadable ({best}: the selection record is damaged" in result.output


# `run` and `export` of every case in one interpreter (a model load each, the imports once)
DRIVER = r"""
import json, sys, time, traceback
from click.testing import CliRunner
from sftc.cli import main
for case in json.load(sys.stdin):
    started = time.monotonic()
    result = CliRunner().invoke(main, case["args"])
    tb = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
    print(json.dumps({"id": case["id"], "exit": result.exit_code, "output": result.output[-6000:], "traceback": tb,
                      "seconds": time.monotonic() - started}), flush=True)
"""


def test_run_and_export_of_a_damaged_record_end_in_success_or_a_clear_error(finished, tmp_path, figures):
    cases, meta = [], {}
    for name in RECORDS:
        for n in range(RUN_CASES):
            copy, run_dir, target, what = _damaged_copy(finished, tmp_path / f"{name}-{n}", name, f"{name}-run-{n}")
            figures["inputs_tried"] += 1
            figures["inputs_tried_records"] += 1
            for command in ("run", "export"):
                case_id = f"{name}-{n}-{command}"
                cases.append({"id": case_id, "args": _args(command, copy, run_dir)})
                meta[case_id] = (name, command, what, target)
    timeout = SECONDS_PER_INPUT * (len(cases) + 1)
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        figures["hangs"] += 1
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"the driver ran past {timeout} s; finished cases:\n{done[-3000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"id"')]
    assert len(results) == len(cases), f"driver exit {proc.returncode}\n{proc.stderr[-6000:]}"
    for res in results:
        name, command, what, target = meta[res["id"]]
        _judge(name, command, what, res["exit"], res["output"], res["traceback"], res["seconds"], figures)
        # `run` may quarantine a damaged record or write it again; it never leaves it missing
        assert target.is_file(), f"`sftc {command}` with {what}: {target} is gone\n{res['output']}"
