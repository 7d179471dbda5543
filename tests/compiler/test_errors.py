"""Bad specs and bad data: a clear SftcError naming the key or file, exit code 2 from the CLI,
no traceback, and nothing left behind (no bundle directory, no staging temp dir)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftc.cli import main
from sftc.errors import DataError, SftcError, SpecError

from .conftest import base_spec, external_path, read_jsonl
from tests.conftest import without_progress

ROWS = [
    {"thread_id": f"T{i}", "prompt": f"Key number {i} is stale.", "completion": f"Rotate key {i}."} for i in range(10)
]


def _assert_clean(project):
    assert project.leftovers() == [], "a failed compile left something under bundles/"
    assert not list(project.root.rglob("*.tmp")), "a failed compile left a temp file or dir"


def _cli_fails(project, spec, *needles):
    """Compile through the CLI; it must exit 2 with a message containing every needle."""
    path = project.write_spec(spec) if not hasattr(spec, "is_file") else spec
    result = CliRunner().invoke(main, ["compile", str(path)])
    output = result.output  # stdout and stderr together
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert without_progress(output).startswith("error:")
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    _assert_clean(project)
    return output


@pytest.fixture
def rows(project):
    project.write_jsonl("data/rows.jsonl", ROWS)


def test_unknown_nested_key(project, rows):
    spec = base_spec()
    spec["packing"]["stratgy"] = "bfd"
    out = _cli_fails(project, spec, "packing.stratgy", "unknown key", "strategy")
    with pytest.raises(SpecError):
        project.compile(spec)
    assert "spec.yaml" in out


def test_several_problems_are_reported_together(project, rows):
    spec = base_spec(batch={"per_device": "four"}, optimizer={"lrr": 1})
    del spec["optimizer"]["lr"]
    out = _cli_fails(project, spec, "batch.per_device", "'four'", "optimizer.lrr", "optimizer.lr: required key is missing")
    assert "3 problem(s)" in out


def test_wrong_type(project, rows):
    _cli_fails(project, base_spec(batch={"per_device": "four"}), "batch.per_device", "four")


def test_missing_data_file(project, rows):
    out = _cli_fails(project, base_spec(data={"files": ["data/missing.jsonl"]}), "data.files[0]", "data/missing.jsonl", "not found")
    with pytest.raises(SftcError):
        project.compile(base_spec(data={"files": ["data/missing.jsonl"]}))
    assert "rows.jsonl" not in out


def test_malformed_json_line_is_a_counted_reject(project):
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(4, '{"thread_id": "T99", "prompt": "broken", ')
    project.write_jsonl("data/rows.jsonl", lines)
    bundle, lock, _ = project.compile(base_spec(data={"max_reject_fraction": 0.2}))
    rejects = read_jsonl(bundle / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(5, "malformed_json")]  # the 5th line, as sed -n 5p
    assert lock.data_manifest.rejected == {"malformed_json": 1}
    assert lock.data_manifest.rows_read == 11
    assert lock.data_manifest.train_examples + lock.data_manifest.eval_examples == 10


def test_too_many_malformed_lines_fail_listing_reasons(project):
    lines = [json.dumps(r) for r in ROWS] + ["{not json", "[1, 2", '{"thread_id": "X", "prompt": 1, "completion": "y"}']
    project.write_jsonl("data/rows.jsonl", lines)
    out = _cli_fails(project, base_spec(data={"max_reject_fraction": 0.05}),
                     "data.max_reject_fraction", "3 of 13", "malformed_json: 2", "wrong_type: 1", "data/rows.jsonl:11")
    with pytest.raises(DataError):
        project.compile(base_spec(data={"max_reject_fraction": 0.05}))
    assert "allowed 5.0%" in out


def test_unloadable_tokenizer(project, rows):
    source = external_path("tokenizers", "llama2-unloadable")
    shutil.copytree(source, project.root / "tok")
    out = _cli_fails(project, base_spec(model={"tokenizer": "tok"}), "model.tokenizer", "could not be loaded", "tok")
    assert len(out) < 2000


def test_unloadable_tokenizer_via_the_real_command(project, rows):
    """The installed entry point, in a fresh process: exit 2 and one clear line, no traceback."""
    shutil.copytree(external_path("tokenizers", "llama2-unloadable"), project.root / "tok")
    spec = project.write_spec(base_spec(model={"tokenizer": "tok"}))
    sftc = shutil.which("sftc", path=str(Path(sys.executable).parent)) or "sftc"
    proc = subprocess.run([sftc, "compile", str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "model.tokenizer" in proc.stderr and "could not be loaded" in proc.stderr
    _assert_clean(project)


def test_yaml_python_tag_is_refused_and_not_executed(project, rows, tmp_path):
    marker = tmp_path / "pwned"
    text = project.write_spec(base_spec()).read_text()
    text = text.replace("name: t", f'name: !!python/object/apply:os.system ["touch {marker}"]')
    spec = project.write_spec(text)
    _cli_fails(project, spec, "spec.yaml", "not valid YAML", "python/object")
    assert not marker.exists()
    spec = project.write_spec("name: !!python/object:collections.OrderedDict {}\n")
    _cli_fails(project, spec, "not valid YAML")


def test_duplicate_yaml_key_is_refused(project, rows):
    text = project.write_spec(base_spec()).read_text() + "seed: 1\nseed: 2\n"
    _cli_fails(project, project.write_spec(text), "duplicate key 'seed'")


def test_path_escaping_the_project_is_refused_unless_allowed(project, rows):
    outside = project.root.parent / "x.jsonl"
    outside.write_text((project.root / "data" / "rows.jsonl").read_text())
    _cli_fails(project, base_spec(data={"files": ["../x.jsonl"]}), "data.files[0]", "'../x.jsonl'", "leaves the project",
               "allow_external_paths")
    _cli_fails(project, base_spec(data={"files": [str(outside)]}), "leaves the project")
    bundle, lock, _ = project.compile(base_spec(data={"files": ["../x.jsonl"]}, allow_external_paths=True))
    assert lock.data_manifest.rows_read == len(ROWS)
    assert bundle.parent == project.root / "bundles"


def test_model_path_escaping_the_project_is_refused(project, rows):
    _cli_fails(project, base_spec(model={"path": "../model"}), "model.path", "leaves the project")


def test_wrapped_needs_allow_mixing(project, rows):
    _cli_fails(project, base_spec(packing={"strategy": "wrapped"}), "packing.strategy", "wrapped", "allow_mixing")
    bundle, lock, _ = project.compile(base_spec(packing={"strategy": "wrapped", "allow_mixing": True, "seq_length": 32}))
    assert lock.packing.strategy == "wrapped"
    assert lock.packing.boundary_safe is False


def test_continued_pretraining_refuses_prompt_completion(project, rows):
    _cli_fails(project, base_spec(objective="continued_pretraining"), "data.format", "continued_pretraining", "'text'")


def test_sft_refuses_text_data(project, rows):
    _cli_fails(project, base_spec(data={"format": "text"}), "data.format", "sft")


def test_missing_spec_file(project):
    result = CliRunner().invoke(main, ["compile", str(project.root / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output and "not found" in result.output
    assert "Traceback" not in result.output


def test_spec_that_is_not_a_mapping(project):
    _cli_fails(project, project.write_spec("- just\n- a list\n"), "must be a YAML mapping")


def test_no_accepted_row(project):
    project.write_jsonl("data/rows.jsonl", [{"thread_id": "T1", "prompt": "x", "completion": ""}])
    _cli_fails(project, base_spec(data={"max_reject_fraction": 1.0}), "no row was accepted", "data/rows.jsonl:1", "empty_completion")


def test_unsupported_data_suffix(project):
    (project.root / "data").mkdir()
    (project.root / "data" / "rows.csv").write_text("thread_id,prompt,completion\n")
    _cli_fails(project, base_spec(data={"files": ["data/rows.csv"]}), "data/rows.csv", ".csv")


def test_failure_while_writing_leaves_no_partial_bundle(project, rows, monkeypatch):
    """A crash after staging began (here: making launch.sh executable, after every file was written)
    removes the temp dir; no bundle appears."""
    import sftc.compiler.bundle

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sftc.compiler.bundle.os, "chmod", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        project.compile(base_spec())
    assert (project.root / "bundles").is_dir()  # staging had started
    _assert_clean(project)


def test_eval_group_that_does_not_exist(project, rows):
    """A typo in split.eval_groups must not silently leave the held-out set empty."""
    out = _cli_fails(project, base_spec(split={"eval_groups": ["T1", "T404"]}), "split.eval_groups", "T404")
    assert "'T1'" not in out.split("split.eval_groups:")[1].split("not the group")[0]
