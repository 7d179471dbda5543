"""What counts as a checkpoint, what resume refuses, rotation, and the checks before any step."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from sftc.runtime import checkpoint as ckpt
from sftc.runtime.bundle import load_bundle
from sftc.runtime.run import run_bundle
from sftc.runtime.rundir import run_lock
from sftc.runtime.verify import verify_bundle
from sftc.errors import BundleError, RunError
from sftc.io import pretty_json

LOCK = {"bundle_id": "b-1", "tokenizer_version": "sha256:t", "template_version": "sha256:c",
        "data_manifest": {"hash": "sha256:d"}, "eval_manifest": {"hash": "sha256:e"}}


def _write(root: Path, step: int, lock: dict = LOCK, payload: bytes = b"weights") -> Path:
    def fill(staging: Path) -> dict:
        (staging / "model.safetensors").write_bytes(payload + str(step).encode())
        (staging / "sub").mkdir()
        (staging / "sub" / "state.json").write_text("{}")
        return {**ckpt.identity(lock), "global_step": step}

    return ckpt.write_checkpoint(root, step, fill)


def test_manifest_last_and_every_file_hashed(tmp_path):
    path = _write(tmp_path, 3)
    manifest, why = ckpt.validate(path)
    assert why is None
    assert set(manifest["files"]) == {"model.safetensors", "sub/state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"

    weights = path / "model.safetensors"
    weights.write_bytes(b"weightz3")
    manifest, why = ckpt.validate(path)
    assert manifest is None and "model.safetensors" in why and "sha256" in why

    weights.write_bytes(b"weights3")
    (path / "sub" / "extra.pt").write_bytes(b"x")
    assert "sub/extra.pt" in ckpt.validate(path)[1]

    (path / "sub" / "extra.pt").unlink()
    assert ckpt.validate(path)[1] is None
    (path / ckpt.MANIFEST).unlink()
    assert "never completed" in ckpt.validate(path)[1]


def test_failed_write_leaves_nothing(tmp_path):
    def fill(staging: Path) -> dict:
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 5, fill)
    assert list(tmp_path.iterdir()) == []


def test_resume_skips_corrupted_and_refuses_other_bundle(tmp_path):
    _write(tmp_path, 2)
    newest = _write(tmp_path, 4)
    (newest / "sub" / "state.json").write_text('{"edited": true}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, manifest, skipped = ckpt.find_resume(tmp_path, LOCK)
    assert path.name == "checkpoint-2" and manifest["global_step"] == 2
    assert any("checkpoint-4" in str(w.message) and "state.json" in str(w.message) for w in caught)
    assert len(skipped) == 1

    other = {**LOCK, "tokenizer_version": "sha256:other"}
    with pytest.raises(RunError) as err:
        ckpt.find_resume(tmp_path, other)
    assert "tokenizer_version" in str(err.value) and "checkpoint-2" in str(err.value)

    assert ckpt.find_resume(tmp_path / "none", LOCK)[0] is None


def test_rotation_keeps_last_and_never_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _write(tmp_path, step)
    deleted = ckpt.rotate(tmp_path, keep_last=2, best_step=1)
    assert deleted == [2, 3]
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [1, 4, 5]


# --- verify: before any step -------------------------------------------------------------------


def test_bundle_edited_after_compile_is_refused(project):
    bundle = project.compile()
    eval_prompts = bundle / "eval_prompts.jsonl"
    eval_prompts.write_text(eval_prompts.read_text() + "\n")
    with pytest.raises(BundleError) as err:
        run_bundle(bundle)
    assert "eval_prompts.jsonl" in str(err.value) and "edited after compile" in str(err.value)
    assert not (project.run_dir(bundle)).exists(), "refused before the run directory was touched"

    (bundle / "train.safetensors").unlink()
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert "train.safetensors" in str(err.value) and "missing" in str(err.value)


def test_tokenizer_or_data_changed_on_disk_is_refused(project):
    bundle = project.compile()
    config = project.root / "model" / "tokenizer_config.json"
    original = config.read_text()
    config.write_text(original.replace("<pad>", "<pad>", 1) + " ")
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert "tokenizer files changed" in str(err.value)
    config.write_text(original)

    rows = project.root / "data" / "rows.jsonl"
    rows.write_text(rows.read_text() + "\n")
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert "rows.jsonl" in str(err.value) and "input data changed" in str(err.value)


def test_library_drift_refused_unless_allowed(project, monkeypatch):
    # the lock is sealed, so drift is the installed version moving, not an edited lock
    from sftc.runtime import verify

    bundle = project.compile()
    locked = json.loads((bundle / "bundle.lock.json").read_text())["libraries"]
    real = verify.installed_version
    monkeypatch.setattr(verify, "installed_version",
                        lambda name: "0.0.1" if name in ("transformers", "torch") else real(name))
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert f"transformers: compiled with {locked['transformers']}" in str(err.value)
    assert "torch" not in str(err.value)  # torch does not shape the token stream

    report = verify_bundle(bundle, allow_drift=True)
    assert report["library_drift"]["token_stream"]["transformers"] == {"locked": locked["transformers"], "now": "0.0.1"}
    assert report["library_drift"]["other"]["torch"] == {"locked": locked["torch"], "now": "0.0.1"}
    assert report["library_drift"]["drift_allowed"] is True


def test_world_size_rederives_grad_accum_or_refuses(project, monkeypatch):
    bundle = project.compile()  # per_device 2 x grad_accum 2 x world 1 = 4 rows per update
    monkeypatch.setenv("WORLD_SIZE", "2")
    layout = verify_bundle(bundle)["layout"]
    assert layout["grad_accum"] == 1 and layout["grad_accum_rederived"] and layout["examples_per_update"] == 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert "4 examples per update" in str(err.value) and "world size 3" in str(err.value)


# --- run directory safety ------------------------------------------------------------------------


def test_second_run_on_same_run_dir_is_refused(project):
    bundle = project.compile()
    run_dir = project.run_dir(bundle)
    with run_lock(run_dir):
        with pytest.raises(RunError) as err:
            run_bundle(bundle)
        assert "another `sftc run`" in str(err.value) and f"pid {__import__('os').getpid()}" in str(err.value)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(project, monkeypatch):
    # The spec caps optimizer.lr at 10, which no longer overflows a tiny model within a few steps;
    # a diverged weight (NaN) after update 2 is what a blow-up leaves behind, so plant one there.
    import torch

    from sftc.runtime.trainer import RunState

    end_update = RunState.end_update

    def diverge_after_update_2(self, step):
        end_update(self, step)
        if step == 2:
            with torch.no_grad():
                next(p for p in self.trainer.model.parameters() if p.requires_grad).fill_(float("nan"))

    monkeypatch.setattr(RunState, "end_update", diverge_after_update_2)
    bundle = project.compile(
        optimizer={"lr": 1.0e-3, "max_grad_norm": 1.0},
        schedule={"kind": "constant", "warmup_ratio": 0.0, "max_steps": 6},
        checkpoint={"every_steps": 1, "keep_last": 3},
    )
    with pytest.raises(RunError) as err:
        run_bundle(bundle)
    message = str(err.value)
    match = re.search(r"non-finite loss \((nan|inf|-inf)\) at update (\d+)", message)
    assert match, message
    bad = int(match.group(2))
    assert bad > 1 and f"checkpoint-{bad - 1}" in message
    run_dir = project.run_dir(bundle)
    # nothing was saved for the update that saw the bad loss; the ones before are intact
    assert [s for s, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")] == list(range(1, bad))
    assert ckpt.validate(run_dir / "checkpoints" / f"checkpoint-{bad - 1}")[1] is None
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == bad - 1
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "non-finite" in record["error"]
    assert load_bundle(bundle).rules is None
