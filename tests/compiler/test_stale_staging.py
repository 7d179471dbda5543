"""A compile killed mid-staging leaves `bundles/.<id>.pidN.*.tmp`. The next compile cleans it up,
whether it rebuilds or reuses the bundle. A live writer's staging is never touched."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.compiler.conftest import base_spec

ROWS = [{"thread_id": f"t{i % 5}", "prompt": f"Key K{i} is stale.", "completion": f"Rotate K{i}."} for i in range(20)]


def test_a_reused_compile_removes_a_dead_writers_staging_and_keeps_a_live_ones(project):
    project.write_jsonl("data/rows.jsonl", ROWS)
    bundle, _, reused = project.compile(base_spec())
    assert not reused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the writer that was killed
    stale = bundle.parent / f".{bundle.name}.pid{dead.pid}.abcd1234.tmp"
    live = bundle.parent / f".{bundle.name}.pid{os.getpid()}.efgh5678.tmp"
    for staging in (stale, live):
        staging.mkdir()
        (staging / "train.safetensors").write_bytes(b"half-written")

    again, _, reused = project.compile(base_spec())
    assert reused and again == bundle
    assert not stale.exists(), "the dead writer's staging dir was left behind by a compile that reused the bundle"
    assert live.exists(), "a live writer's staging dir was removed"


def test_a_killed_compiles_work_directory_is_removed_by_the_next_compile(project):
    """The token store and streamed token files of a compile live in `.<name>-work.pid<N>.*.tmp`
    beside the bundles (compiler/bundle._build): a SIGKILL leaves it, GBs at scale."""
    project.write_jsonl("data/rows.jsonl", ROWS)
    bundles = project.root / "bundles"
    bundles.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = bundles / f".t-work.pid{dead.pid}.x1y2z3w4.tmp"
    work.mkdir()
    (work / "train.ids.i32").write_bytes(b"\0" * 64)
    bundle, _, reused = project.compile(base_spec())
    assert not reused and not work.exists()
    assert sorted(p.name for p in bundles.iterdir()) == [bundle.name], "a compile leaves only its bundle"
