"""Drift after compile: `sftc verify` and `sftc run` refuse a bundle whose data file, tokenizer,
chat template or token-stream library changed since compile; `--allow-drift` lets only the
library drift through, and the run records it in run.json.

The library change is simulated where verify reads it (runtime.verify.installed_version), which
is what an upgraded transformers looks like to it; the lock stays untouched, so its hashes agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import sftc.runtime.verify
from sftc.cli import main
from tests.conftest import without_progress

REPO = Path(__file__).resolve().parents[2]
DRIFTED = "0.0.1+drift"


def _edit_data(root: Path, monkeypatch):
    path = root / "data" / "rows.jsonl"
    path.write_text(path.read_text() + json.dumps({"thread_id": "new", "prompt": "p", "completion": "c"}) + "\n")
    return "input data changed"


def _edit_tokenizer(root: Path, monkeypatch):
    config = root / "model" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["model_max_length"] = 12345
    config.write_text(json.dumps(data))
    return "tokenizer files changed"


def _edit_template(root: Path, monkeypatch):
    template = root / "templates" / "chat.jinja"
    template.write_text(template.read_text() + "{# reviewed #}")
    return "chat template changed"


def _upgrade_transformers(root: Path, monkeypatch):
    real = sftc.runtime.verify.installed_version
    monkeypatch.setattr(sftc.runtime.verify, "installed_version", lambda name: DRIFTED if name == "transformers" else real(name))
    return "transformers: compiled with"


CASES = {"data": _edit_data, "tokenizer": _edit_tokenizer, "template": _edit_template, "library": _upgrade_transformers}


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, result.output


@pytest.mark.parametrize("case", list(CASES))
def test_drift_is_refused_by_verify_and_run(project, monkeypatch, case, figures):
    (project.root / "templates").mkdir()
    shutil.copyfile(REPO / "templates" / "chat" / "access-policy.jinja", project.root / "templates" / "chat.jinja")
    bundle = project.compile(template={"chat": "templates/chat.jinja"}, schedule={"max_steps": 2},
                             checkpoint={"every_steps": 2, "keep_last": 1})
    run_dir = project.root / "runs" / "r"
    result, _ = _cli("verify", bundle)
    assert result.exit_code == 0, result.output  # clean before the change

    needle = CASES[case](project.root, monkeypatch)
    figures["drift_cases"] += 1
    caught = 0
    for command in (["verify", bundle], ["run", bundle, "--run-dir", run_dir]):
        result, out = _cli(*command)
        figures["tracebacks"] += int(result.exception is not None and not isinstance(result.exception, SystemExit))
        if result.exit_code == 2 and without_progress(out).startswith("error:") and needle in out and "Traceback" not in out:
            caught += 1
    figures["drift_caught"] += int(caught == 2)
    assert caught == 2, f"{case}: refused by {caught} of verify/run"
    assert not run_dir.exists(), "refused before the run directory was touched"

    result, out = _cli("run", bundle, "--run-dir", run_dir, "--allow-drift")
    if case != "library":
        # --allow-drift is for library versions only: changed inputs mean other tokens
        assert result.exit_code == 2 and needle in out, out[-2000:]
        assert not run_dir.exists()
        return
    assert result.exit_code == 0, out[-2000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["drift_allowed"] is True and record["status"] == "finished"
    drift = record["library_drift"]["token_stream"]["transformers"]
    assert drift["now"] == DRIFTED and drift["locked"] == json.loads((bundle / "bundle.lock.json").read_text())["libraries"]["transformers"]
    result, out = _cli("verify", bundle, "--allow-drift")
    assert result.exit_code == 0 and DRIFTED in out


def test_drift_in_a_library_that_does_not_shape_tokens_is_recorded_not_refused(project, monkeypatch):
    bundle = project.compile()
    real = sftc.runtime.verify.installed_version
    monkeypatch.setattr(sftc.runtime.verify, "installed_version", lambda name: "9.9.9" if name == "torch" else real(name))
    result, out = _cli("verify", bundle)
    assert result.exit_code == 0, out
    report = json.loads(out)
    assert report["library_drift"]["other"]["torch"]["now"] == "9.9.9"
    assert report["library_drift"]["token_stream"] == {}
