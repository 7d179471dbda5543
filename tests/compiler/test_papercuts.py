"""Small things a new user trips on: `inspect --color` when piped, the offline hub-model error,
the wrong-field error, and `sftc runs`' status column."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import base_spec


def _rows(n: int = 6) -> list[dict]:
    return [{"thread_id": f"t{i}", "prompt": f"Is key T10{i} stale?", "completion": f"Key T10{i} is stale."}
            for i in range(n)]


def _sftc(project, *args: str) -> subprocess.CompletedProcess:
    """The CLI with stdout a pipe, as under DVC, CI or `| less -R`."""
    return subprocess.run([sys.executable, "-m", "sftc.cli", *args], cwd=project.root, capture_output=True,
                          text=True, timeout=300)


def test_inspect_color_marks_supervised_tokens_when_piped(project):
    project.write_jsonl("data/rows.jsonl", _rows())
    bundle, _, _ = project.compile(base_spec())
    colored = _sftc(project, "inspect", str(bundle), "--color")
    assert colored.returncode == 0, colored.stderr
    assert "\x1b[1;32m" in colored.stdout  # supervised tokens, green
    plain = _sftc(project, "inspect", str(bundle))
    assert "\x1b[" not in plain.stdout and "[[" in plain.stdout  # piped default: bracket marks, no escapes


def test_offline_hub_model_error_says_how_to_fetch_it(project):
    project.write_jsonl("data/rows.jsonl", _rows())
    spec = project.write_spec(base_spec(model={"path": "sftc-test-org/not-in-any-cache", "revision": "v1"}))
    done = _sftc(project, "compile", str(spec))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "`hf download sftc-test-org/not-in-any-cache --revision v1`" in done.stderr
    assert "model.path" in done.stderr


def test_wrong_field_error_lists_the_fields_rows_have(project):
    project.write_jsonl("data/rows.jsonl", [{"thread_id": "a", "question": "q?", "completion": "a."}])
    spec = project.write_spec(base_spec(data={"max_reject_fraction": 1.0}))
    done = _sftc(project, "compile", str(spec))
    assert done.returncode == 2
    assert "missing ['prompt']; the row has: completion, question, thread_id" in done.stderr


def test_runs_under_a_root_that_is_not_there_is_an_error(project):
    proc = _sftc(project, "runs", "--root", str(project.root / "nowhere"))
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_shows_each_runs_status(project):
    from sftc.review.runs import format_runs, list_runs

    for name, status in (("a-finished", "finished"), ("b-died", "running"), ("c-new", None)):
        run = project.root / "runs" / name
        run.mkdir(parents=True)
        if status:
            (run / "run.json").write_text(json.dumps({"bundle_id": name, "bundle_dir": "bundles/x", "status": status}))
    rows = list_runs(project.root)
    # a record left at 'running' with no live process holding run.lock: the process died
    assert [(r["run"], r["status"]) for r in rows] == [("a-finished", "finished"), ("b-died", "interrupted"),
                                                       ("c-new", "-")]
    assert "b-died: interrupted, bundle unreadable" in format_runs(rows)
