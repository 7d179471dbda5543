"""The `sftc` CLI around the compiler: schema, compile (warm recompile), inspect."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftc.cli import main

from .conftest import base_spec

ROWS = [
    {"thread_id": "T102", "prompt": "Key T102 is stale.", "completion": "Ask for rotation evidence within 24 hours."},
    {"thread_id": "R550", "prompt": "A privileged role changed.", "completion": "Escalate privileged-role changes."},
    {"thread_id": "P771", "prompt": "Session idle limit?", "completion": "Cite the session-timeout policy."},
]


@pytest.fixture
def spec(project):
    project.write_jsonl("data/rows.jsonl", ROWS)
    return project.write_spec(base_spec(split={"eval_groups": ["R550"]}))


def test_schema_prints_json_with_descriptions():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["title"] == "Spec"
    assert "description" in schema["properties"]["objective"]
    assert "parameterization" in schema["required"] and "objective" in schema["required"]
    packing = schema["$defs"]["PackingSpec"]["properties"]
    assert set(packing["strategy"]["enum"]) == {"none", "bfd", "bfd_split", "wrapped"}
    assert packing["allow_mixing"]["description"]
    assert schema["$defs"]["PackingSpec"]["additionalProperties"] is False
    described = [k for d in schema["$defs"].values() for k, v in d.get("properties", {}).items() if v.get("description")]
    assert len(described) > 40


def test_compile_then_warm_recompile_is_up_to_date(project, spec):
    runner = CliRunner()
    first = runner.invoke(main, ["compile", str(spec)])
    assert first.exit_code == 0, first.output
    assert first.output.startswith("compiled: ")
    assert "disjoint=True" in first.output and "rows/update" in first.output
    bundle = first.output.splitlines()[0].split(": ", 1)[1]
    second = runner.invoke(main, ["compile", str(spec)])
    assert second.exit_code == 0
    assert second.output.startswith(f"up to date: {bundle}")
    quiet = runner.invoke(main, ["compile", "--quiet", str(spec)])
    assert quiet.output.strip() == bundle
    forced = runner.invoke(main, ["compile", "--force", str(spec)])
    assert forced.output.startswith(f"compiled: {bundle}")


def test_warm_recompile_does_not_rebuild(project, spec, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(spec)]).exit_code == 0
    import sftc.compiler.bundle

    def no_build(*args, **kwargs):
        raise AssertionError("an unchanged spec must not be rebuilt")

    monkeypatch.setattr(sftc.compiler.bundle, "_build", no_build)
    result = runner.invoke(main, ["compile", str(spec)])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output


def test_inspect_marks_supervised_tokens(project, spec):
    bundle, lock, _ = project.compile(spec)
    result = CliRunner().invoke(main, ["inspect", str(bundle), "--row", "0", "--no-color"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[[" in out and "]]" in out
    assert "\x1b[" not in out
    assert "position ids restart at 0" in out
    terminator = lock.template.terminator
    # every supervised span ends with the terminator, and the answers are inside [[...]]
    spans = [s.split("]]", 1)[0] for s in out.split("[[")[1:]]
    assert len(spans) == 2  # two train examples packed in row 0
    assert all(s.endswith(terminator) for s in spans)
    assert {s[: -len(terminator)] for s in spans} == {ROWS[0]["completion"], ROWS[2]["completion"]}
    assert "Key T102 is stale." in out and "[[Key T102" not in out
    assert "\u2016" in out  # example boundary shown

    evaluated = CliRunner().invoke(main, ["inspect", str(bundle), "--split", "eval", "--no-color"])
    assert evaluated.exit_code == 0
    assert "[[" + ROWS[1]["completion"] + terminator + "]]" in evaluated.output

    # (color=True: click strips ANSI codes when stdout is not a terminal unless told otherwise)
    colored = CliRunner().invoke(main, ["inspect", str(bundle), "--color"], color=True)
    assert "\x1b[1;32m" in colored.output and "[[" not in colored.output


def test_inspect_bad_row_is_a_clear_error(project, spec):
    bundle, _, _ = project.compile(spec)
    result = CliRunner().invoke(main, ["inspect", str(bundle), "--row", "99", "--no-color"])
    assert result.exit_code == 2
    assert "--row 99" in result.output and "Traceback" not in result.output


def test_inspect_a_directory_that_is_not_a_bundle(project):
    result = CliRunner().invoke(main, ["inspect", str(project.root)])
    assert result.exit_code == 2
    assert "not a bundle" in result.output
