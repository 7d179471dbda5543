"""Storage faults: a truncated or bit-flipped checkpoint file is caught by its hash and the run
falls back to the previous valid checkpoint with a warning naming the file; a full disk during a
save stops training with a clear "error:" (exit 2, no traceback), keeps the last good checkpoint
valid, and leaves no staging dir; the run then resumes once there is space again.
"""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from sftc.runtime import checkpoint as ckpt
from sftc.runtime.run import run_bundle
from sftc.cli import main
from sftc.errors import RunError

from tests.runtime.conftest import final_tensors, train_losses


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01  # one bit: the smallest corruption there is
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


CORRUPTIONS = {
    "truncated-weights": ("model.safetensors", _truncate),
    "bitflip-rng": ("rng_state.pth", _flip),
    "bitflip-trainer-state": ("trainer_state.json", lambda p: p.write_text(p.read_text().replace("1", "2", 1))),
    "truncated-manifest": (ckpt.MANIFEST, _truncate),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run and one stopped at step 4 (checkpoints 2 and 4), shared by the cases."""
    from tests.reliability.conftest import module_project

    project = module_project(tmp_path_factory, tiny_model_dir, "storage")
    root = project.root
    bundle = project.compile(schedule={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    ref = root / "runs" / "reference"
    run_bundle(bundle, run_dir=ref)
    stopped = root / "runs" / "stopped"
    run_bundle(bundle, run_dir=stopped, stop_after_steps=4)
    return bundle, ref, stopped


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_file_falls_back_to_previous(reference, tmp_path, case, figures):
    import shutil

    bundle, ref, stopped = reference
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    name, corrupt = CORRUPTIONS[case]
    corrupt(run_dir / "checkpoints" / "checkpoint-4" / name)
    assert ckpt.validate(run_dir / "checkpoints" / "checkpoint-4")[0] is None

    figures["storage_faults"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle(bundle, run_dir=run_dir)
    messages = [str(w.message) for w in caught if issubclass(w.category, ckpt.CheckpointWarning)]
    assert any("checkpoint-4" in m and name in m for m in messages), messages
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_step"] == 2 and record["resumed_from"].endswith("checkpoint-2")
    assert record["status"] == "finished"
    # falling back cost two steps of work, not correctness
    assert train_losses(run_dir) == train_losses(ref)
    ref_w, got_w = final_tensors(ref, 6), final_tensors(run_dir, 6)
    assert all(__import__("torch").equal(ref_w[k], got_w[k]) for k in ref_w)
    figures["storage_faults_survived"] += 1


def test_every_checkpoint_corrupted_starts_over(reference, tmp_path):
    import shutil

    bundle, ref, stopped = reference
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    for step in (2, 4):
        _flip(run_dir / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        run_bundle(bundle, run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_from"] is None and record["resumed_step"] == 0
    assert len(record["skipped_checkpoints"]) == 2
    assert train_losses(run_dir) == train_losses(ref)


def test_disk_full_during_a_save_stops_cleanly(reference, tmp_path, monkeypatch, figures):
    import shutil

    bundle, ref, stopped = reference
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    for step in (4,):  # resume from 2 so checkpoint-4 is written again and fails
        shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{step}")
    monkeypatch.setenv(ckpt.ENOSPC_ENV, "4")
    figures["storage_faults"] += 1
    result = CliRunner().invoke(main, ["run", str(bundle), "--run-dir", str(run_dir)])
    out = result.output
    assert result.exit_code == 2, (out[-2000:], result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in out
    error = out[out.index("error:"):]
    assert "could not write checkpoint-4" in error and "No space left on device" in error, error
    assert "checkpoint-2, is intact" in error and "resume" in error
    checkpoints = run_dir / "checkpoints"
    assert [s for s, _ in ckpt.checkpoint_dirs(checkpoints)] == [2]
    assert ckpt.validate(checkpoints / "checkpoint-2")[1] is None
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == [], "staging dir left behind"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]

    # space again: the same command resumes from the good checkpoint and finishes as if nothing happened
    monkeypatch.delenv(ckpt.ENOSPC_ENV)
    result = CliRunner().invoke(main, ["run", str(bundle), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["resumed_step"] == 2
    assert train_losses(run_dir) == train_losses(ref)
    figures["storage_faults_survived"] += 1


def test_storage_error_from_a_non_oserror_writer_is_still_a_clear_error(tmp_path):
    """safetensors' Rust writer reports a full disk as SafetensorError, not OSError."""

    class SafetensorError(Exception):
        pass

    def fill(staging):
        (staging / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    with pytest.raises(RunError) as err:
        ckpt.write_checkpoint(tmp_path, 3, fill)
    assert "could not write checkpoint-3" in str(err.value) and "no earlier checkpoint" in str(err.value)
    assert list(tmp_path.iterdir()) == []

    def bug(staging):
        raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError):  # a bug keeps its type (and its traceback)
        ckpt.write_checkpoint(tmp_path, 3, bug)
    assert list(tmp_path.iterdir()) == []


def test_leftover_staging_dirs_are_removed_on_resume(tmp_path):
    """A SIGKILL mid-save leaves .checkpoint-N.*.tmp (and mid-rotation .trash-*): found by the
    fault campaign. Resume (under the run lock) removes them, so kills do not leak disk."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".checkpoint-4.abc.tmp").mkdir()
    (root / ".checkpoint-4.abc.tmp" / "optimizer.pt").write_bytes(b"x" * 100)
    (root / ".trash-checkpoint-2-99").mkdir()
    (root / "notes.txt").write_text("not ours")
    assert ckpt.find_resume(root, {"bundle_id": "b", "data_manifest": {}, "eval_manifest": {}})[0] is None
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_a_kill_between_the_two_renames_of_a_replace_loses_nothing(tmp_path):
    """staging_dir(replace=True) moves the old directory aside, then renames the new one in. A
    SIGKILL between the two leaves no `final`; the next writer puts the old one back instead of
    deleting it with the dead writer's staging."""
    import subprocess
    import sys

    from sftc.io import KILL_IN_STAGING_ENV, remove_stale_staging
    from tests.reliability.conftest import subprocess_env

    final = tmp_path / "export"
    final.mkdir()
    (final / "weights").write_text("the old export\n")
    code = ("import sys; from sftc.io import staging_dir\n"
            "with staging_dir(sys.argv[1], replace=True) as stage:\n"
            "    (stage / 'weights').write_text('the new export\\n')\n")
    env = subprocess_env(**{KILL_IN_STAGING_ENV: "export.aside"})
    proc = subprocess.run([sys.executable, "-c", code, str(final)], env=env, timeout=120)
    assert proc.returncode == -9, "the hook did not kill the writer between the renames"
    assert not final.exists() and any(p.name.endswith(".old") for p in tmp_path.iterdir())

    removed = remove_stale_staging(tmp_path)
    assert removed and (final / "weights").read_text() == "the old export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
