"""The sealed lock (sftc/lock.py): every edit of the lock or of a bundle file is refused with the
field or file named, unlisted files are refused, the base model is in the chain, the runtime holds
the bytes it verified, and nothing in a bundle names the machine's paths."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from sftc.cli import main
from sftc.errors import BundleError
from sftc.io import pretty_json, sha256_file
from sftc.lock import FORMAT_VERSION, LOCK_NAME, Lock, load_lock, seal
from sftc.runtime.bundle import load_bundle
from sftc.runtime.verify import verify_bundle


def _raw(bundle) -> dict:
    return json.loads((bundle / LOCK_NAME).read_text(encoding="utf-8"))


def _write(bundle, raw: dict) -> None:
    # the form sftc writes, so only the seal can tell the edit
    (bundle / LOCK_NAME).write_text(pretty_json(raw), encoding="utf-8")


def _refused(bundle) -> str:
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle)
    return str(caught.value)


def test_compiled_lock_is_typed_sealed_and_verifies(project):
    bundle = project.compile()
    lock = load_lock(bundle)
    assert isinstance(lock, Lock) and lock.format_version == FORMAT_VERSION == 3
    assert lock.seal.sha256 == seal(_raw(bundle))["sha256"]
    assert bundle.name == lock.bundle_id
    assert "per_device" not in _raw(bundle)["budget"]  # the batch layout is stored once, in spec.batch
    assert set(lock.model.files) >= {"config.json", "model.safetensors"}
    assert verify_bundle(bundle)["model_files_checked"] == len(lock.model.files)


def _edit_lr(raw, bundle):
    raw["spec"]["optimizer"]["lr"] = 0.5


def _edit_lr_rot(raw, bundle):
    raw["spec"]["optimizer"]["lr"] = float(str(raw["spec"]["optimizer"]["lr"]).replace("2", "3", 1))


def _edit_steps(raw, bundle):
    raw["budget"]["optimizer_steps"] += 1


def _edit_bundle_id(raw, bundle):
    raw["bundle_id"] = raw["bundle_id"][:-1] + ("0" if raw["bundle_id"][-1] != "0" else "1")


def _edit_trust_remote_code(raw, bundle):
    raw["spec"]["model"]["trust_remote_code"] = True


def _edit_token_file_and_its_hash(raw, bundle):
    path = bundle / "rejects.jsonl"
    path.write_bytes(path.read_bytes() + b'{"detail": "x", "file": "f", "reason": "r", "row": 1}\n')
    raw["files"]["rejects.jsonl"] = sha256_file(path)


@pytest.mark.parametrize("edit, field", [
    (_edit_lr, "spec.optimizer.lr"),
    (_edit_lr_rot, "spec.optimizer.lr"),
    (_edit_steps, "budget.optimizer_steps"),
    (_edit_bundle_id, "bundle_id"),
    (_edit_trust_remote_code, "spec.model.trust_remote_code"),
    (_edit_token_file_and_its_hash, "files.rejects.jsonl"),
])
def test_every_lock_edit_is_refused_naming_the_field(project, edit, field):
    bundle = project.compile()
    raw = _raw(bundle)
    edit(raw, bundle)
    _write(bundle, raw)
    message = _refused(bundle)
    assert f"{field}: edited after compile" in message and LOCK_NAME in message
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 2 and field in result.output and "Traceback" not in result.output


def test_run_refuses_an_edited_lock_before_training(project):
    from sftc.runtime.run import run_bundle

    bundle = project.compile()
    raw = _raw(bundle)
    raw["spec"]["optimizer"]["lr"] = 0.5
    _write(bundle, raw)
    with pytest.raises(BundleError, match="spec.optimizer.lr"):
        run_bundle(bundle, run_dir=project.root / "runs" / "x")
    assert not (project.root / "runs" / "x" / "checkpoints").exists()


def test_a_resealed_edit_is_refused_by_the_bundle_id(project):
    bundle = project.compile()
    raw = _raw(bundle)
    raw["spec"]["optimizer"]["lr"] = 0.5
    raw["seal"] = seal(raw)
    _write(bundle, raw)
    assert "bundle_id" in _refused(bundle) and "resealed" in _refused(bundle)


def test_a_reformatted_lock_is_refused(project):
    bundle = project.compile()
    (bundle / LOCK_NAME).write_text(json.dumps(_raw(bundle), sort_keys=True), encoding="utf-8")
    assert "not in the form sftc wrote" in _refused(bundle)


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: "{not json", "not valid JSON"),
    (lambda raw: {**raw, "files": list(raw["files"])}, "files: Input should be a valid dictionary"),
    (lambda raw: {**raw, "budget": {}}, "budget.optimizer_steps: Field required"),
    (lambda raw: {**raw, "spec": {**raw["spec"], "batch": {**raw["spec"]["batch"], "per_device": 0}}},
     "spec.batch.per_device"),
    (lambda raw: {**raw, "format_version": 99}, "format_version 99 is not readable"),
    (lambda raw: {**raw, "format_version": "2"}, 'format_version "2" is not readable'),
    (lambda raw: [raw], "a lock is a JSON object, found list"),
    (lambda raw: {**raw, "files": {**raw["files"], "../../outside": "0" * 64}}, "files: Value error, file name '../../outside'"),
])
def test_a_damaged_lock_is_a_clear_error(project, damage, expected):
    bundle = project.compile()
    damaged = damage(_raw(bundle))
    (bundle / LOCK_NAME).write_text(damaged if isinstance(damaged, str) else pretty_json(damaged), encoding="utf-8")
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    assert str(bundle / LOCK_NAME) in str(caught.value) and expected in str(caught.value)


def test_a_format_1_lock_says_recompile(project):
    bundle = project.compile()
    raw = _raw(bundle)
    old = {k: v for k, v in raw.items() if k not in ("seal", "inputs_hash")}
    old.update(format_version=1, bundle_hash="f" * 64, inputs={"model_path": "model"})
    (bundle / LOCK_NAME).write_text(pretty_json(old), encoding="utf-8")
    with pytest.raises(BundleError, match=r"format 1: untyped lock.*recompile with `sftc compile spec.yaml`"):
        load_lock(bundle)
    old["format_version"] = FORMAT_VERSION  # the old writer's content under the new number
    (bundle / LOCK_NAME).write_text(pretty_json(old), encoding="utf-8")
    with pytest.raises(BundleError, match="bundle_hash: Extra inputs are not permitted"):
        load_lock(bundle)


@pytest.mark.parametrize("name", ["rules.yaml", "eval.safetensors", "notes.txt"])
def test_files_the_lock_does_not_list_are_refused(project, name):
    # compiled with no rules and no eval split: a dropped-in rules.yaml or eval.safetensors was consumed before
    bundle = project.compile(split={"eval_fraction": 0.0})
    assert name not in load_lock(bundle).files
    (bundle / name).write_bytes((bundle / "train.safetensors").read_bytes() if name.endswith("safetensors") else b"x: 1\n")
    message = _refused(bundle)
    assert f"{bundle / name}: not listed in the lock" in message


def test_the_run_uses_the_bytes_it_verified(project):
    bundle = project.compile(eval={"rules": "rules.yaml", "max_new_tokens": 8})
    loaded = load_bundle(bundle)
    verify_bundle(loaded)
    rules_before, template_before = loaded.rules_text, loaded.chat_template
    prompts_before = loaded.eval_prompts()
    assert rules_before and template_before and prompts_before
    (bundle / "rules.yaml").write_text("version: 1\nchecks: []\nmetrics: {}\n", encoding="utf-8")
    shutil.rmtree(bundle)
    assert loaded.rules_text == rules_before and loaded.rules is not None
    assert loaded.chat_template == template_before and loaded.eval_prompts() == prompts_before
    assert loaded.train.n_rows > 0 and loaded.eval is not None


def test_a_changed_base_model_is_refused_before_loading(project):
    bundle = project.compile()
    config = project.root / "model" / "config.json"
    config.write_text(config.read_text(encoding="utf-8").replace("{", '{"edited": 1, ', 1), encoding="utf-8")
    assert "config.json: base model file changed since compile" in _refused(bundle)


def test_one_flipped_weight_byte_is_refused(project):
    bundle = project.compile()
    weights = project.root / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "model.safetensors: base model file changed since compile" in _refused(bundle)


def test_model_hashes_are_cached_by_size_and_mtime(project, monkeypatch):
    import sftc.hashcache

    bundle = project.compile()
    hashed = []
    real = sftc.hashcache.sha256_file
    monkeypatch.setattr(sftc.hashcache, "sha256_file", lambda path: hashed.append(path) or real(path))
    verify_bundle(bundle)
    assert hashed == []  # compile hashed them; the run only stats
    weights = project.root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: hashed again, still accepted
    verify_bundle(bundle)
    assert [p.endswith("model.safetensors") for p in map(str, hashed)] == [True]


def test_no_absolute_path_in_any_bundle_file(project):
    bundle = project.compile(eval={"rules": "rules.yaml"})
    roots = {str(project.root), str(project.root.resolve())}
    for path in bundle.rglob("*"):
        data = path.read_bytes()
        for root in roots:
            assert root.encode() not in data, f"{path.name} names {root}"


def test_an_unchanged_spec_finds_its_bundle(project):
    from sftc.compiler import compile_spec

    bundle = project.compile()
    again, lock, reused = compile_spec(project.root / "spec.yaml")
    assert reused and again == bundle and lock.bundle_id == bundle.name


def test_the_bundle_format_doc_holds_the_lock_field_table():
    from pathlib import Path

    from sftc.lock import field_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bundle-format.md").read_text(encoding="utf-8")
    assert field_table() in doc, "regenerate the table in docs/bundle-format.md from sftc.lock.field_table()"


def test_schema_lock_prints_the_lock_model():
    result = CliRunner().invoke(main, ["schema", "--lock"])
    schema = json.loads(result.output)
    assert result.exit_code == 0 and schema["title"] == "Lock" and "seal" in schema["required"]


def test_a_hub_model_is_its_id_and_snapshot_commit_and_is_checked(project, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(project.root / "model", snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shutil.rmtree(project.root / "model")
    bundle = project.compile(model={"path": "org/tiny"})
    lock = load_lock(bundle)
    assert (lock.model.source, lock.model.path, lock.model.revision) == ("hub", "org/tiny", commit)
    assert (lock.tokenizer.source, lock.tokenizer.path, lock.tokenizer.revision) == ("hub", "org/tiny", commit)
    assert str(cache).encode() not in (bundle / LOCK_NAME).read_bytes()
    verify_bundle(bundle)
    weights = snapshot / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "model.safetensors: base model file changed since compile" in _refused(bundle)
