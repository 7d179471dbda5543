"""Same inputs, same bundle: id and every byte. Any changed input: a different id."""

from __future__ import annotations

import json

import pytest

from .conftest import base_spec

ROWS = [
    {"thread_id": f"G{g}", "prompt": f"Incident {g}: the stale key k{g} was used from a new address ({t}).",
     "completion": f"Escalate incident {g} to the security on-call."}
    for g in range(8) for t in range(2)
]


def _files(bundle) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.fixture
def spec(project):
    project.write_jsonl("data/rows.jsonl", ROWS)
    return project.write_spec(base_spec(
        split={"eval_fraction": 0.25}, tokenize={"max_length": 64}, packing={"strategy": "bfd", "seq_length": 96},
        batch={"per_device": 2, "grad_accum": 2}, schedule={"epochs": 2},
    ))


def test_two_compiles_into_two_dirs_are_byte_identical(project, spec):
    a, lock_a, reused_a = project.compile(spec, bundles_dir=project.root / "out-a")
    b, lock_b, reused_b = project.compile(spec, bundles_dir=project.root / "out-b")
    assert not reused_a and not reused_b
    assert a.name == b.name == lock_a.bundle_id == lock_b.bundle_id
    assert lock_a.inputs_hash == lock_b.inputs_hash
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    assert {"bundle.lock.json", "train.safetensors", "eval.safetensors", "rejects.jsonl", "REPORT.md"} <= set(files_a)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two compiles of the same spec"
    # the lock's own file table matches what is on disk
    import hashlib

    listed = json.loads(files_a["bundle.lock.json"])["files"]
    assert set(listed) == set(files_a) - {"bundle.lock.json"}
    assert all(hashlib.sha256(files_a[n]).hexdigest() == h for n, h in listed.items())


def test_forced_rebuild_in_place_is_byte_identical(project, spec):
    a, _, _ = project.compile(spec)
    before = _files(a)
    again, _, reused = project.compile(spec)
    assert reused and again == a
    rebuilt, _, reused = project.compile(spec, force=True)
    assert not reused and rebuilt == a
    assert _files(rebuilt) == before
    assert [p.name for p in (project.root / "bundles").iterdir()] == [a.name]  # no temp dir left


def test_changed_data_changes_the_id(project, spec):
    a, lock_a, _ = project.compile(spec)
    rows = list(ROWS)
    rows[3] = {**rows[3], "completion": "Escalate it now."}
    project.write_jsonl("data/rows.jsonl", rows)
    b, lock_b, reused = project.compile(spec)
    assert not reused
    assert lock_a.bundle_id != lock_b.bundle_id
    assert lock_a.data_manifest.hash != lock_b.data_manifest.hash
    assert a.exists() and b.exists()  # content-addressed: the old bundle stays as it was


def test_changed_spec_knob_changes_the_id(project, spec):
    """A spec change that alters nothing but a knob still changes the id (the canonical spec is hashed)."""
    _, lock_a, _ = project.compile(spec)
    changed = project.write_spec(base_spec(
        split={"eval_fraction": 0.25}, tokenize={"max_length": 64}, packing={"strategy": "bfd", "seq_length": 96},
        batch={"per_device": 2, "grad_accum": 2}, schedule={"epochs": 2}, optimizer={"lr": 2.0e-4},
    ), "spec2.yaml")
    _, lock_b, _ = project.compile(changed)
    assert lock_a.bundle_id != lock_b.bundle_id
    assert lock_b.spec.optimizer.lr == 2.0e-4


def test_changed_tokenizer_or_template_changes_the_id(project, spec):
    _, lock_a, _ = project.compile(spec)
    (project.root / "templates").mkdir()
    template = (project.root / "model" / "chat_template.jinja")
    text = template.read_text() if template.exists() else None
    if text is None:
        pytest.skip("tiny model has no separate chat_template.jinja")
    # a Jinja comment: the render is unchanged, but the template's bytes (its version) are not
    (project.root / "templates" / "t.jinja").write_text("{# v2 #}" + text)
    data = base_spec(
        split={"eval_fraction": 0.25}, tokenize={"max_length": 64}, packing={"strategy": "bfd", "seq_length": 96},
        batch={"per_device": 2, "grad_accum": 2}, schedule={"epochs": 2}, template={"chat": "templates/t.jinja"},
    )
    _, lock_b, _ = project.compile(project.write_spec(data, "spec3.yaml"))
    assert lock_a.bundle_id != lock_b.bundle_id
    assert lock_a.template_version != lock_b.template_version
    assert lock_b.template.source == "file"
