"""`sftc diff`: compiled consequences of a spec change, not the changed knob alone."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from sftc.review.diff import (
    CATEGORIES, EXIT_CHANGED, EXIT_FAIL_ON, EXIT_SAME, changed_fields, diff_command, diff_paths, flatten,
    parse_fail_on, ratio, textconv,
)
from sftc.errors import SftcError
from tests.review.conftest import RUN_A, RUN_B, Project, rows, seed_spec


def run(capsys, a, b, fmt="json", fail_on=(), color=None):
    code = diff_command(str(a), str(b), fmt, tuple(fail_on), color)
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def seed(tmp_path_factory, tiny_model):
    """run_a (4 x 8 x 4) and run_b (2 x 16 x 8) in one project, compiled once for the module."""
    root = tmp_path_factory.mktemp("seed") / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text("", encoding="utf-8")
    shutil.copytree(tiny_model, root / "model")
    project = Project(root)
    project.write_rows(rows())
    return project.write_spec(RUN_A, "specs/run_a.yaml"), project.write_spec(RUN_B, "specs/run_b.yaml")


# --- the seed example ------------------------------------------------------------------------


def test_seed_batch_change_doubles_examples_per_update(seed, capsys):
    a, b = seed
    code, out = run(capsys, a, b, "json")
    report = json.loads(out)
    assert code == EXIT_CHANGED
    assert report["derived"]["budget"]["examples_per_update"] == {"before": 128, "after": 256, "ratio": 2.0}
    lr_pe = report["derived"]["budget"]["lr_per_example"]
    assert lr_pe["ratio"] == pytest.approx(0.5)
    assert report["derived"]["budget"]["lr"]["ratio"] == 1.0
    fields = {f["key"]: (f["before"], f["after"]) for f in report["changed_fields"]}
    assert fields["batch.per_device"] == (4, 2)
    assert fields["batch.grad_accum"] == (8, 16)
    assert fields["batch.world_size"] == (4, 8)
    assert fields["distributed.nodes"] == (1, 2)
    assert "budget" in report["categories_changed"] and "spec" in report["categories_changed"]
    assert "data" not in report["categories_changed"] and "tokenizer" not in report["categories_changed"]
    # every derived quantity has the same shape, changed or not, so scripts can read any of them
    for category in report["derived"].values():
        for quantity in category.values():
            assert set(quantity) == {"before", "after", "ratio"}
    assert report["bundle_id"]["before"].startswith("run-a-") and report["bundle_id"]["after"].startswith("run-b-")


def test_seed_terminal_and_markdown(seed, capsys):
    a, b = seed
    code, out = run(capsys, a, b, "terminal", color=False)
    assert code == EXIT_CHANGED
    assert "\x1b[" not in out
    assert "batch.per_device" in out and "4 -> 2" in out
    line = next(l for l in out.splitlines() if "examples per update" in l and "source" not in l)
    assert "128 -> 256" in line and "×2.0" in line and "4×8×4 -> 2×16×8" in line
    assert "lr per example" in out
    # fields come first, then the compiled consequences
    assert out.index("batch.per_device") < out.index("examples per update")

    code, out = run(capsys, a, b, "markdown")
    assert code == EXIT_CHANGED
    assert "| `batch.per_device` | `4` | `2` |" in out
    assert any(l.startswith("| budget | examples per update") and "| 128 | 256 | ×2.0 |" in l for l in out.splitlines())

    code, out = run(capsys, a, b, "terminal", color=True)
    assert "\x1b[" in out


def test_fail_on_categories(seed, capsys):
    a, b = seed
    assert run(capsys, a, b, "json", ("data,budget",))[0] == EXIT_FAIL_ON
    assert run(capsys, a, b, "json", ("tokenizer", "data"))[0] == EXIT_CHANGED
    assert run(capsys, a, b, "json", ("any",))[0] == EXIT_FAIL_ON
    with pytest.raises(SftcError, match="unknown category budgt"):
        diff_command(str(a), str(b), "json", ("budgt",), None)
    with pytest.raises(SftcError, match="unknown format"):
        diff_command(str(a), str(b), "html", (), None)


def test_unchanged_spec_is_no_change(seed, capsys):
    a, _ = seed
    code, out = run(capsys, a, a, "json")
    report = json.loads(out)
    assert code == EXIT_SAME
    assert report["changed"] is False and report["categories_changed"] == [] and report["changed_fields"] == []
    # fail-on only fires on a change
    code, out = run(capsys, a, a, "terminal", ("any",))
    assert code == EXIT_SAME and "no change: both compile to run-a-" in out


def test_bundle_directory_side(seed, capsys):
    from sftc.compiler import compile_spec

    a, b = seed
    bundle_a, _, _ = compile_spec(a)
    code, out = run(capsys, bundle_a, b, "json")
    report = json.loads(out)
    assert report["a"]["kind"] == "bundle" and report["b"]["kind"] == "spec"
    assert report["derived"]["budget"]["examples_per_update"]["ratio"] == 2.0
    assert run(capsys, bundle_a, a, "json")[0] == EXIT_SAME


# --- data, errors, git -----------------------------------------------------------------------


def test_changed_data_file_shows_new_hash_and_counts(project, capsys):
    from sftc.compiler import compile_spec
    from sftc.io import sha256_file

    spec = project.write_spec(seed_spec("run-a", 4, 8, 1, 4), "specs/x.yaml")
    before_dir, before, _ = compile_spec(spec)
    # more rows, one of them broken: the diff must show the new hash and the new counts
    data = project.write_rows(rows(48) + rows(8, start=48) + [{"thread_id": "T900", "prompt": "hi", "completion": "  "}])
    code, out = run(capsys, before_dir, spec, "json")
    report = json.loads(out)
    derived = report["derived"]["data"]
    assert code == EXIT_CHANGED
    assert report["changed_fields"] == []  # the spec did not change; its data did
    assert derived["hash"]["before"] == before.data_manifest.hash != derived["hash"]["after"]
    assert derived["files.data/rows.jsonl.sha256"]["after"] == sha256_file(data)
    assert derived["rows_read"] == {"before": 48, "after": 57, "ratio": pytest.approx(57 / 48, abs=1e-6)}
    assert derived["accepted"]["before"] == 48 and derived["accepted"]["after"] == 56
    assert derived["rejected.empty_completion"] == {"before": 0, "after": 1, "ratio": None}
    assert {"data", "split", "budget"} <= set(report["categories_changed"])
    assert "spec" not in report["categories_changed"]
    code, out = run(capsys, before_dir, spec, "terminal")
    assert "rejected: empty_completion" in out and "0 -> 1" in out
    assert run(capsys, before_dir, spec, "json", ("data",))[0] == EXIT_FAIL_ON


def test_misspelled_key_is_a_clear_error(project):
    good = project.write_spec(seed_spec("run-a", 4, 8, 1, 4), "specs/good.yaml")
    bad = dict(seed_spec("run-a", 4, 8, 1, 4))
    bad["batch"] = {"per_devce": 4, "grad_accum": 8, "world_size": 4}
    bad_path = project.write_spec(bad, "specs/bad.yaml")
    with pytest.raises(SftcError) as info:
        diff_paths(str(good), str(bad_path))
    text = str(info.value)
    assert "bad.yaml" in text and "batch.per_devce: unknown key" in text and "per_device" in text
    with pytest.raises(SftcError, match="not found"):
        diff_paths(str(good), "specs/nope.yaml")


def test_git_revision_side(project, capsys):
    project.write_spec(seed_spec("x", 4, 8, 1, 4), "specs/x.yaml")
    project.git("init", "-q")
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "spec")
    project.write_spec(seed_spec("x", 2, 8, 1, 4), "specs/x.yaml")

    code, out = run(capsys, "HEAD:specs/x.yaml", "specs/x.yaml", "json")
    report = json.loads(out)
    assert code == EXIT_CHANGED
    assert report["a"]["kind"] == "git"
    assert report["derived"]["budget"]["examples_per_update"] == {"before": 128, "after": 64, "ratio": 0.5}
    assert [f["key"] for f in report["changed_fields"]] == ["batch.per_device"]
    # the temp copy is gone, and the revision's bundle was not left in the project's cache
    assert not list((project.root / "specs").glob(".sftc-diff-*"))
    assert sorted(p.name for p in (project.root / "bundles").iterdir()) == [report["b"]["bundle_id"]]

    # same content at HEAD and in the working tree: no change
    project.git("commit", "-q", "-am", "halve per_device")
    assert run(capsys, "HEAD:specs/x.yaml", "specs/x.yaml", "json")[0] == EXIT_SAME

    # an error in the revision names the revision, not the hidden temp file
    broken = dict(seed_spec("x", 4, 8, 1, 4), batchh={"per_device": 4})
    project.write_spec(broken, "specs/x.yaml")
    project.git("commit", "-q", "-am", "typo")
    with pytest.raises(SftcError) as info:
        diff_paths("HEAD:specs/x.yaml", "HEAD~1:specs/x.yaml")
    assert "HEAD:specs/x.yaml" in str(info.value) and "batchh: unknown key" in str(info.value)
    assert ".sftc-diff" not in str(info.value)
    assert not list((project.root / "specs").glob(".sftc-diff-*"))
    with pytest.raises(SftcError, match="git show"):
        diff_paths("HEAD:specs/missing.yaml", "HEAD~1:specs/x.yaml")


def test_textconv_summary_and_git_diff(project):
    spec = project.write_spec(seed_spec("x", 4, 8, 1, 4), "specs/x.yaml")
    summary = textconv(spec)
    assert "examples_per_update: 128 (4 per_device x 8 grad_accum x 4 world_size)" in summary
    assert "batch.per_device: 4" in summary and "bundle: x-" in summary

    # end to end: git hands textconv a temp copy of the old blob outside the project
    (project.root / ".gitattributes").write_text("specs/*.yaml diff=sftc\n", encoding="utf-8")
    project.git("init", "-q")
    project.git("config", "diff.sftc.textconv", f"{sys.executable} -m sftc.review.diff textconv")
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "spec")
    project.write_spec(seed_spec("x", 2, 8, 1, 4), "specs/x.yaml")
    out = project.git("diff", "specs/x.yaml")
    assert "-examples_per_update: 128 (4 per_device" in out
    assert "+examples_per_update: 64 (2 per_device" in out
    assert "-batch.per_device: 4" in out and "+batch.per_device: 2" in out
    assert not list(project.root.glob(".sftc-diff-*"))

    # a spec that does not compile still converts (git would abort the diff otherwise)
    bad = project.write_spec("name: x\nbatch: {per_devce: 1}\n", "specs/bad.yaml")
    text = textconv(bad)
    assert text.startswith("# sftc: does not compile") and "per_devce" in text


# --- pure helpers ----------------------------------------------------------------------------


def test_flatten_and_changed_fields():
    spec = {"batch": {"per_device": 4}, "data": {"files": ["a", "b"]}, "select": {"tie_break": [{"minimize": "eval_loss"}]}}
    assert dict(flatten(spec)) == {
        "batch.per_device": 4, "data.files": ["a", "b"], "select.tie_break[0].minimize": "eval_loss",
    }
    changes = changed_fields({"parameterization": {"kind": "full"}, "name": "a"},
                             {"parameterization": {"kind": "lora", "rank": 16}, "name": "a"})
    assert changes == [
        {"key": "parameterization.kind", "before": "full", "after": "lora"},
        {"key": "parameterization.rank", "before": "(absent)", "after": 16},
    ]


def test_ratio_and_fail_on_parsing():
    assert ratio(128, 256) == 2.0
    assert ratio(0, 0) == 1.0 and ratio(0, 3) is None and ratio("a", "b") is None and ratio(True, False) is None
    assert ratio({"min": 2, "mean": 3.0, "max": 4}, {"min": 4, "mean": 3.0, "max": 2}) == {"min": 2.0, "mean": 1.0, "max": 0.5}
    assert parse_fail_on(("data,budget", " split ")) == ["data", "budget", "split"]
    assert parse_fail_on("any") == list(CATEGORIES)
    assert parse_fail_on(()) == []


def test_textconv_of_a_device_or_a_huge_file_ends_with_its_error(tmp_path):
    """git hands textconv blob files, but a device would never end and a huge file fill memory:
    both are shown as a spec that does not compile, at once."""
    from sftc.review.diff import textconv

    assert textconv("/dev/zero").startswith("# sftc: does not compile: /dev/zero: the spec file is not a regular file")
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"a" * (3 << 20))
    out = textconv(huge)
    assert out.startswith("# sftc: does not compile:") and "at most" in out and len(out) < (2 << 20)
