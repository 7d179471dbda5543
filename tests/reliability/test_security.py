"""Security: what a spec, a template, a data path or a checkpoint file can make sftc do.

YAML tags that construct objects are refused before anything runs; a chat template that reaches
for Python internals dies in the Jinja sandbox at compile with an error naming template.chat;
paths cannot leave the project (symlinks included) unless the spec says allow_external_paths;
trust_remote_code is off unless the spec turns it on, and the lock records it; nothing is
unpickled except through torch's weights_only loader, which a planted pickle cannot get past.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftc.compiler.spec import load_spec_text
from sftc.runtime import checkpoint as ckpt
from sftc.cli import main
from sftc.errors import SftcError, SpecError
from sftc.io import pretty_json

from tests.compiler.conftest import base_spec
from tests.conftest import without_progress

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO / "templates" / "chat" / "access-policy.jinja").read_text()
ROWS = [{"thread_id": f"T{i}", "prompt": f"Key number {i} is stale.", "completion": f"Rotate key {i}."} for i in range(10)]


def _write_rows(project):
    project.write_jsonl("data/rows.jsonl", ROWS)


# --- YAML ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/apply:subprocess.check_output [["touch", "{marker}"]]',
    "!!python/name:os.system",
    "!!python/module:os",
    '!!python/object/new:os.system ["touch {marker}"]',
    "!!python/object:collections.OrderedDict {{}}",
    '!!python/tuple ["a"]',
])
def test_yaml_tags_that_construct_objects_are_refused(tmp_path, tag, figures):
    marker = tmp_path / "pwned"
    figures["inputs_tried"] += 1
    with pytest.raises(SpecError) as err:
        load_spec_text(f"name: {tag.format(marker=marker)}\nseed: 1\n", "evil.yaml")
    assert "not valid YAML" in str(err.value) and "evil.yaml" in str(err.value)
    assert not marker.exists(), "the tag was executed"


# --- Jinja sandbox -------------------------------------------------------------------------------

PAYLOADS = {
    "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler-globals": "{{ cycler.__init__.__globals__ }}",
    "cycler-os-popen": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "namespace-globals": "{{ namespace.__init__.__globals__ }}",
    "list-mutation": "{% set x = [] %}{{ x.append(1) }}",
    "huge-range": "{{ range(10**9)|list|length }}",
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_template_reaching_python_internals_fails_in_the_sandbox(cproject, name, figures):
    _write_rows(cproject)
    marker = cproject.root / "pwned"
    payload = PAYLOADS[name].replace("MARKER", str(marker))
    (cproject.root / "templates").mkdir()
    (cproject.root / "templates" / "evil.jinja").write_text(payload + TEMPLATE, encoding="utf-8")
    spec = cproject.write_spec(base_spec(template={"chat": "templates/evil.jinja"}))
    figures["inputs_tried"] += 1
    result = CliRunner().invoke(main, ["compile", str(spec)])
    assert result.exit_code == 2, result.output
    out = result.output
    assert without_progress(out).startswith("error:") and "Traceback" not in out
    assert "template.chat: templates/evil.jinja: rendering" in out and "failed" in out, out
    assert "SecurityError" in out or "sandbox" in out.lower() or "MAX_RANGE" in out, out
    assert not marker.exists()
    assert not (cproject.root / "bundles").exists() or not list((cproject.root / "bundles").iterdir())


def test_payload_in_a_branch_only_real_rows_reach_is_still_caught(cproject):
    """The terminator probe renders user+assistant only; a payload behind the system branch is
    reached when rows are rendered with template.system, and must fail there just as cleanly."""
    _write_rows(cproject)
    evil = TEMPLATE.replace("{%- for message in messages -%}",
                            "{%- for message in messages -%}{% if message['role'] == 'system' %}"
                            "{{ cycler.__init__.__globals__ }}{% endif %}", 1)
    assert evil != TEMPLATE
    (cproject.root / "templates").mkdir()
    (cproject.root / "templates" / "evil.jinja").write_text(evil, encoding="utf-8")
    spec = cproject.write_spec(base_spec(template={"chat": "templates/evil.jinja", "system": "Be careful."}))
    result = CliRunner().invoke(main, ["compile", str(spec)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and without_progress(result.output).startswith("error:")
    assert "SecurityError" in result.output or "unsafe" in result.output, result.output


# --- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,spec_overrides", [
    ("data.files[0]", {"data": {"files": ["../outside.jsonl"]}}),
    ("data.files[0]", {"data": {"files": ["/etc/passwd"]}}),
    ("data.files[0]", {"data": {"files": ["data/link.jsonl"]}}),  # a symlink pointing out
    ("template.chat", {"template": {"chat": "../outside.jinja"}}),
    ("eval.rules", {"eval": {"rules": "/etc/hostname"}}),
    ("model.tokenizer", {"model": {"tokenizer": "../outside-tok"}}),
    ("model.path", {"model": {"path": "./model/../../outside-model"}}),
])
def test_paths_cannot_leave_the_project(cproject, key, spec_overrides, figures):
    _write_rows(cproject)
    outside = cproject.root.parent
    (outside / "outside.jsonl").write_text((cproject.root / "data" / "rows.jsonl").read_text())
    (outside / "outside.jinja").write_text(TEMPLATE)
    shutil.copytree(cproject.root / "model", outside / "outside-tok", dirs_exist_ok=True)
    shutil.copytree(cproject.root / "model", outside / "outside-model", dirs_exist_ok=True)
    (cproject.root / "data" / "link.jsonl").symlink_to(outside / "outside.jsonl")
    figures["inputs_tried"] += 1
    with pytest.raises(SftcError) as err:
        cproject.compile(base_spec(**spec_overrides))
    assert key in str(err.value) and "leaves the project" in str(err.value) and "allow_external_paths" in str(err.value)
    assert not (cproject.root / "bundles").exists()


def test_symlinked_data_outside_is_accepted_only_when_allowed(cproject):
    outside = cproject.root.parent / "shared.jsonl"
    outside.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (cproject.root / "data").mkdir()
    (cproject.root / "data" / "rows.jsonl").symlink_to(outside)
    with pytest.raises(SpecError):
        cproject.compile(base_spec())
    bundle, _, _ = cproject.compile(base_spec(allow_external_paths=True))
    assert json.loads((bundle / "bundle.lock.json").read_text())["data_manifest"]["rows_read"] == len(ROWS)


def test_a_model_path_missing_from_the_project_is_never_read_from_the_cwd(cproject, tmp_path, monkeypatch):
    # `model.path: elsewhere` did not exist in the project but did under the cwd, and was loaded from there
    _write_rows(cproject)
    cwd = tmp_path / "cwd"
    shutil.copytree(cproject.root / "model", cwd / "elsewhere")
    shutil.copytree(cproject.root / "model", cwd / "org" / "name")
    monkeypatch.chdir(cwd)
    for location in ("elsewhere", "org/name"):
        with pytest.raises(SftcError) as err:
            cproject.compile(base_spec(model={"path": location}))
        assert "model.path" in str(err.value) and location in str(err.value), str(err.value)
    assert not (cproject.root / "bundles").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_a_model_file_symlinked_out_of_the_project_is_refused(cproject, name):
    _write_rows(cproject)
    outside = cproject.root.parent / f"outside-{name}"
    shutil.move(cproject.root / "model" / name, outside)
    (cproject.root / "model" / name).symlink_to(outside)
    with pytest.raises(SftcError) as err:
        cproject.compile(base_spec())
    message = str(err.value)
    assert "model.path" in message and name in message and "leave the project" in message, message
    assert not (cproject.root / "bundles").exists()
    bundle, _, _ = cproject.compile(base_spec(allow_external_paths=True))
    assert (bundle / "train.safetensors").is_file()


# --- trust_remote_code ---------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_the_spec_says_so_and_the_lock_records_it(project, monkeypatch):
    bundle = project.compile()
    lock = json.loads((bundle / "bundle.lock.json").read_text())
    assert lock["spec"]["model"]["trust_remote_code"] is False

    # the runtime loads the model and tokenizer with exactly the locked value
    import transformers

    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.model import load_model, load_tokenizer

    seen = []

    def spy(real):
        def wrapper(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        spy(transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(transformers.AutoTokenizer.from_pretrained))
    loaded = load_bundle(bundle)
    load_tokenizer(loaded)
    load_model(loaded)
    assert seen == [False, False]

    turned_on = project.compile(model={"trust_remote_code": True})
    assert turned_on != bundle, "trust_remote_code is part of the bundle hash"
    assert json.loads((turned_on / "bundle.lock.json").read_text())["spec"]["model"]["trust_remote_code"] is True


# --- nothing is unpickled ------------------------------------------------------------------------

SOURCE_DIRS = ("compiler", "runtime", "sftc", "demo", "scripts")


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _kw(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_no_unsafe_deserialization_in_the_code():
    """torch.load only with weights_only=True; no pickle/marshal/shelve loads, no yaml.load with
    an unsafe loader, no numpy allow_pickle, no eval/exec, no trust_remote_code=True literal."""
    problems, scanned = [], 0
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            scanned += 1
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            rel = path.relative_to(REPO)
            for node, owner, name in _calls(tree):
                where = f"{rel}:{node.lineno}"
                if owner == "torch" and name == "load":
                    wo = _kw(node, "weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if owner in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib") and name in ("load", "loads", "open", "Unpickler"):
                    problems.append(f"{where}: {owner}.{name}")
                if owner == "yaml" and name in ("unsafe_load", "full_load", "load_all"):
                    problems.append(f"{where}: yaml.{name}")
                if owner == "yaml" and name == "load":
                    loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                    text = ast.unparse(loader) if loader is not None else ""
                    if text not in ("_StrictLoader", "yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader"):
                        problems.append(f"{where}: yaml.load with Loader={text or 'default'}")
                if name == "load" and owner in ("np", "numpy"):
                    ap = _kw(node, "allow_pickle")
                    if isinstance(ap, ast.Constant) and ap.value is True:
                        problems.append(f"{where}: numpy load with allow_pickle=True")
                if isinstance(node.func, ast.Name) and name in ("eval", "exec"):  # not `model(...).eval()`
                    problems.append(f"{where}: {name}()")
                trc = _kw(node, "trust_remote_code")
                if isinstance(trc, ast.Constant) and trc.value is True:
                    problems.append(f"{where}: trust_remote_code=True hard-coded")
    assert scanned > 20
    assert problems == []


def test_the_scanner_catches_what_it_looks_for():
    # the scan above proves nothing if it cannot see a violation
    bad = "import torch, pickle\ntorch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\n"
    found = [(o, n) for node, o, n in _calls(ast.parse(bad)) if (o, n) in (("torch", "load"), ("pickle", "loads"))]
    assert len(found) == 3
    assert _kw(list(_calls(ast.parse("torch.load('x', weights_only=False)")))[0][0], "weights_only").value is False


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_a_valid_checkpoint_is_never_executed(project, tmp_path, figures):
    """optimizer.pt replaced by a pickle that runs a shell command, and checkpoint.json updated
    so its hash matches (an attacker with write access to the run dir): resume must refuse it
    through torch's weights_only loader, with a clear error and no traceback, and never run it."""
    bundle = project.compile(schedule={"max_steps": 4}, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.root / "runs" / "r"
    from sftc.runtime.run import run_bundle

    run_bundle(bundle, run_dir=run_dir, stop_after_steps=2)
    target = run_dir / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "pwned"
    (target / "optimizer.pt").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    manifest = json.loads((target / ckpt.MANIFEST).read_text())
    manifest["files"]["optimizer.pt"] = hashlib.sha256((target / "optimizer.pt").read_bytes()).hexdigest()
    if hasattr(ckpt, "SEAL"):  # the seal is a plain sha256: whoever can write the run dir can reseal it
        manifest.pop(ckpt.SEAL, None)
        manifest[ckpt.SEAL] = ckpt.seal(manifest)
    (target / ckpt.MANIFEST).write_text(pretty_json(manifest))
    assert ckpt.validate(target)[1] is None, "the planted file must pass the hash check"

    figures["inputs_tried"] += 1
    result = CliRunner().invoke(main, ["run", str(bundle), "--run-dir", str(run_dir)])
    assert not marker.exists(), "the planted pickle was executed"
    figures["tracebacks"] += int(result.exception is not None and not isinstance(result.exception, SystemExit))
    assert result.exit_code == 2, (result.output[-2000:], result.exception)
    assert result.output.lstrip().splitlines()[-1].startswith("error:") or "error:" in result.output
    assert "weights_only" in result.output and "checkpoint" in result.output, result.output[-2000:]
