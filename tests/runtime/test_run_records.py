"""The run directory's records can be trusted: checkpoint.json seals its own fields, best.json is
derived (never state), metrics.jsonl never loses a line, storage errors and stop signals are
recorded, and staging left by killed processes is cleaned (issues 13 and 14)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftc.cli import main
from sftc.errors import RunError
from sftc.io import remove_stale_staging, sha256_file, staging_dir
from sftc.runtime import checkpoint as ckpt
from sftc.runtime import rundir
from sftc.runtime.run import run_bundle

from .conftest import PYTHON, REPO, run_in_subprocess, train_losses


def _rot_supervised_total(manifest_path: Path) -> None:
    """A one-digit rot that keeps the JSON valid and every listed file's hash right."""
    text = manifest_path.read_text()
    value = json.loads(text)["supervised_tokens_total"]
    rotted = value + 1 if value % 10 != 9 else value - 1
    manifest_path.write_text(text.replace(f'"supervised_tokens_total": {value}', f'"supervised_tokens_total": {rotted}'))
    assert json.loads(manifest_path.read_text())["supervised_tokens_total"] == rotted


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- checkpoint.json seals its own fields -------------------------------------------------------


def test_a_rotted_checkpoint_json_field_is_refused_by_name(tmp_path):
    def fill(staging: Path) -> dict:
        (staging / "model.safetensors").write_bytes(b"weights")
        return {"bundle_id": "b-1", "global_step": 2, "supervised_tokens_total": 1234}

    path = ckpt.write_checkpoint(tmp_path, 2, fill)
    assert ckpt.validate(path)[1] is None
    _rot_supervised_total(path / ckpt.MANIFEST)
    manifest, why = ckpt.validate(path)
    assert manifest is None
    assert str(path / ckpt.MANIFEST) in why and "seal" in why and "--fresh" in why
    # status and export ask the same validator
    assert rundir.checkpoint_problems(path, "b-1") == [why.replace(f"{tmp_path}{os.sep}", "")]


def test_resume_skips_a_rotted_checkpoint_json_and_finishes_like_the_reference(project):
    bundle = project.compile(schedule={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    reference = project.root / "runs" / "reference"
    run_bundle(bundle, run_dir=reference)

    rotted = project.root / "runs" / "rotted"
    run_bundle(bundle, run_dir=rotted, stop_after_steps=4)
    _rot_supervised_total(rotted / "checkpoints" / "checkpoint-4" / ckpt.MANIFEST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle(bundle, run_dir=rotted)  # before: loaded the rot, then failed every later run
    skipped = [str(w.message) for w in caught if issubclass(w.category, ckpt.CheckpointWarning)]
    assert any("checkpoint-4" in m and "seal" in m for m in skipped), skipped
    record = json.loads((rotted / "run.json").read_text())
    assert record["resumed_step"] == 2 and record["status"] == "finished"
    assert train_losses(rotted) == train_losses(reference)


# --- best.json is derived; rotation holds across resumes ---------------------------------------


def _export_bytes(run_dir: Path) -> dict[str, str]:
    export = run_dir / "export"
    return {str(p.relative_to(export)): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}


LORA = {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}


# LoRA too: peft writes adapter_config.json's target_modules in per-process hash order, so a
# resumed session wrote other bytes than the reference until checkpoints sorted it
@pytest.mark.parametrize("param", [{"kind": "full"}, LORA], ids=["full", "lora"])
def test_kill_right_after_the_final_checkpoint_exports_what_the_uninterrupted_run_does(project, param):
    lr = {"lr": 2.0e-3} if param["kind"] == "full" else {"lr": 2.0e-2}
    bundle = project.compile(parameterization=param, optimizer=lr,
                             schedule={"kind": "constant", "warmup_ratio": 0.0, "max_steps": 6},
                             checkpoint={"every_steps": 2, "keep_last": 1})
    run_dir = project.run_dir(bundle)
    run_bundle(bundle, run_dir=run_dir)
    reference = {"best": json.loads((run_dir / "best.json").read_text())["best_step"],
                 "kept": [s for s, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")],
                 "export": _export_bytes(run_dir)}
    # the case that went wrong: the final checkpoint is the best one, so a stale best.json differs
    assert reference["best"] == 6 and reference["kept"] == [6], reference

    run_dir.rename(run_dir.with_name("reference"))  # the same run directory name for both runs
    killed = run_in_subprocess(bundle, run_dir, env={ckpt.KILL_AFTER_ENV: "6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run_dir / "best.json").read_text())["best_step"] != 6  # stale: the kill came first
    assert len(ckpt.checkpoint_dirs(run_dir / "checkpoints")) > 1  # rotation never ran

    # `sftc export` alone selects from the records, not from the stale best.json
    exported = CliRunner().invoke(main, ["export", str(run_dir)])
    assert exported.exit_code == 0, exported.output
    assert _export_bytes(run_dir) == reference["export"]

    resumed = run_in_subprocess(bundle, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "best.json").read_text())["best_step"] == reference["best"]
    assert [s for s, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")] == reference["kept"]
    assert _export_bytes(run_dir) == reference["export"]


# --- metrics.jsonl: quarantine, never delete ----------------------------------------------------


def _lines(*records) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def test_unparseable_metrics_lines_are_quarantined_and_block_selection_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    eval_2 = json.dumps({"eval_loss": 1.5, "kind": "eval", "step": 2}, sort_keys=True)
    damaged = eval_2.replace('"eval_loss": 1.5', '"eval_loss": 1.\x005')  # a flipped byte mid-file
    torn = '{"kind": "train", "loss": 0.'
    text = (_lines({"kind": "train", "step": 1, "loss": 2.0}) + damaged + "\n"
            + _lines({"kind": "train", "step": 3, "loss": 1.0}, {"kind": "eval", "step": 4, "eval_loss": 1.2})
            + torn)
    (run_dir / "metrics.jsonl").write_text(text)

    with pytest.warns(rundir.MetricsWarning, match="line"):
        log = rundir.repair_metrics(run_dir, through_step=4)
    quarantine = run_dir / "metrics.jsonl.quarantine-1"
    assert quarantine.read_text() == damaged + "\n"  # byte for byte, nothing deleted
    assert (run_dir / "metrics.jsonl.torn-1").read_text() == torn + "\n"
    assert [(line["kind"], line["step"]) for line in log.lines] == [("train", 1), ("train", 3), ("eval", 4)]
    assert "\x00" not in (run_dir / "metrics.jsonl").read_text() and torn not in (run_dir / "metrics.jsonl").read_text()

    # the lost eval of step 2 is a hole in the history a selection would be made from
    with pytest.raises(RunError) as err:
        rundir.derive_best(run_dir, {"tie_break": {"minimize": "eval_loss"}})
    message = str(err.value)
    assert "metrics.jsonl.quarantine-1" in message and "step 2" in message and "--allow-incomplete-history" in message
    assert not (run_dir / "best.json").exists()
    best = rundir.derive_best(run_dir, {"tie_break": {"minimize": "eval_loss"}}, allow_incomplete_history=True)
    assert best["best_step"] == 4 and best["incomplete_history"]

    # a checkpoint that still holds step 2's sealed metrics fills the hole
    def fill(staging: Path) -> dict:
        (staging / "model.safetensors").write_bytes(b"w")
        return {"bundle_id": "b", "global_step": 2, "metrics": {"eval_loss": 1.5}}

    ckpt.write_checkpoint(run_dir / "checkpoints", 2, fill)
    assert rundir.check_history(run_dir) == []
    assert rundir.derive_best(run_dir, {"tie_break": {"minimize": "eval_loss"}})["best_step"] == 4


def test_a_damaged_eval_line_makes_export_refuse_until_allowed(project):
    bundle = project.compile(schedule={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 1})
    run_dir = project.run_dir(bundle)
    run_bundle(bundle, run_dir=run_dir)
    on_disk = {s for s, _ in ckpt.checkpoint_dirs(run_dir / "checkpoints")}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # the eval line of a rotated checkpoint: no other record holds its numbers
    n = next(i for i, line in enumerate(lines) if '"kind": "eval"' in line and json.loads(line)["step"] not in on_disk)
    lines[n] = lines[n][:-1]  # torn in the middle of the file
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    runner = CliRunner()
    refused = runner.invoke(main, ["export", str(run_dir)])
    assert refused.exit_code == 2, refused.output
    assert "evaluation history is incomplete" in refused.output and "--allow-incomplete-history" in refused.output
    assert "Traceback" not in refused.output
    allowed = runner.invoke(main, ["export", str(run_dir), "--allow-incomplete-history"])
    assert allowed.exit_code == 0, allowed.output
    # `sftc run` quarantines the line (never deletes it) and refuses the same way
    rerun = runner.invoke(main, ["run", str(bundle), "--run-dir", str(run_dir)])
    assert rerun.exit_code == 2 and "--allow-incomplete-history" in rerun.output, rerun.output
    assert (run_dir / "metrics.jsonl.quarantine-1").read_text() == lines[n] + "\n"


# --- a damaged best.json / run.json is named, never a traceback ----------------------------------


def test_a_flipped_first_byte_of_best_json_is_a_clear_error_and_run_rederives_it(project):
    bundle = project.compile(schedule={"max_steps": 4}, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.run_dir(bundle)
    run_bundle(bundle, run_dir=run_dir)
    best = run_dir / "best.json"
    good = json.loads(best.read_text())
    data = bytearray(best.read_bytes())
    data[0] ^= 0x01
    best.write_bytes(bytes(data))

    runner = CliRunner()
    result = runner.invoke(main, ["status", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert str(best) in result.output and "sftc run" in result.output and "Traceback" not in result.output
    # run and export derive best.json from the records again instead of trusting it
    for args in (["run", str(bundle), "--run-dir", str(run_dir)], ["export", str(run_dir)]):
        best.write_bytes(bytes(data))
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
        assert json.loads(best.read_text())["best_step"] == good["best_step"]

    (run_dir / "run.json").write_text('{"status": 7}')
    with pytest.raises(RunError) as err:
        rundir.read_run_json(run_dir)
    assert str(run_dir / "run.json") in str(err.value) and "status" in str(err.value)


# --- storage errors and stop signals are recorded ------------------------------------------------


def test_torch_save_short_write_is_a_storage_error_recorded_once(project, monkeypatch, capsys):
    import torch

    bundle = project.compile(schedule={"max_steps": 6}, checkpoint={"every_steps": 2, "keep_last": 3})
    run_dir = project.run_dir(bundle)
    real_save, real_write = torch.save, rundir.atomic_write_json

    def short_write(obj, f, *args, **kwargs):
        # what torch.save raises when the disk fills or `ulimit -f` is hit mid-file
        if ".checkpoint-4." in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4160 vs 4054")
        return real_save(obj, f, *args, **kwargs)

    def full_disk_for_failures(path, obj):
        if Path(path).name == "run.json" and obj.get("status") == "failed":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, obj)

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(rundir, "atomic_write_json", full_disk_for_failures)
    with pytest.raises(RunError) as err:
        run_bundle(bundle, run_dir=run_dir)
    message = str(err.value)
    assert "unexpected pos" in message and "checkpoint-2" in message and "Free space" in message, message
    stderr = capsys.readouterr().err
    assert stderr.count("could not record status 'failed'") == 1, stderr
    root = run_dir / "checkpoints"
    assert [s for s, _ in ckpt.checkpoint_dirs(root)] == [2] and ckpt.validate(root / "checkpoint-2")[1] is None
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "staging left behind"

    # with run.json writable, the failure is recorded; after space is freed the run resumes
    monkeypatch.setattr(rundir, "atomic_write_json", real_write)
    with pytest.raises(RunError):
        run_bundle(bundle, run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "unexpected pos" in record["error"]
    monkeypatch.setattr(torch, "save", real_save)
    run_bundle(bundle, run_dir=run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_recorded_and_says_how_to_resume(project, signum):
    bundle = project.compile(schedule={"kind": "constant", "warmup_ratio": 0.0, "max_steps": 400},
                             checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.run_dir(bundle)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([PYTHON, "-m", "sftc", "run", str(bundle), "--run-dir", str(run_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "checkpoint-2" / ckpt.MANIFEST).is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 2, stderr[-3000:]
    assert f"interrupted by {name}" in stderr and "Resume with `sftc run" in stderr and "checkpoint-" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and record["stopped_by"] == name
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


# --- staging left by killed processes ------------------------------------------------------------


def test_stale_staging_of_dead_writers_is_removed_and_live_ones_are_kept(tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    dead, live = _dead_pid(), os.getppid()
    for name in (f".demo-0123.pid{dead}.x1abcdef.tmp", f".demo-0123.pid{dead}.x2abcdef.old", ".demo-0123.legacy_8.tmp",
                 f".demo-0123.pid{live}.x3abcdef.tmp"):
        (bundles / name).mkdir()
        (bundles / name / "train.safetensors").write_bytes(b"x" * 64)
    (bundles / "demo-0123").mkdir()
    (bundles / ".not-staging.tmp").mkdir()  # not a name staging_dir gives: never touched
    assert remove_stale_staging(bundles) == sorted([f".demo-0123.pid{dead}.x1abcdef.tmp", f".demo-0123.pid{dead}.x2abcdef.old",
                                                    ".demo-0123.legacy_8.tmp"])
    assert sorted(p.name for p in bundles.iterdir()) == sorted(["demo-0123", ".not-staging.tmp",
                                                                f".demo-0123.pid{live}.x3abcdef.tmp"])

    # the next staging_dir in that directory (a compile, an export) cleans up after a killed one
    (bundles / f".other.pid{dead}.yabcdefg.tmp").mkdir()
    with staging_dir(bundles / "demo-4567") as stage:
        assert f".pid{os.getpid()}." in stage.name
        (stage / "f").write_text("x")
    assert not (bundles / f".other.pid{dead}.yabcdefg.tmp").exists() and (bundles / "demo-4567" / "f").is_file()

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / f".checkpoint-4.pid{dead}.abc.tmp").mkdir()
    (root / f".trash-checkpoint-2.pid{dead}").mkdir()
    (root / f".checkpoint-6.pid{live}.abc.tmp").mkdir()
    assert ckpt.remove_leftovers(root) == sorted([f".checkpoint-4.pid{dead}.abc.tmp", f".trash-checkpoint-2.pid{dead}"])
    assert [p.name for p in root.iterdir()] == [f".checkpoint-6.pid{live}.abc.tmp"]


def test_a_read_only_run_directory_is_a_clear_error_in_run_and_export(project, monkeypatch):
    bundle = project.compile(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    run_dir = project.run_dir(bundle)
    run_bundle(bundle, run_dir=run_dir)
    exported = _export_bytes(run_dir)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    import sftc.runtime.export as export_module

    monkeypatch.setattr(export_module, "staging_dir", read_only)
    monkeypatch.setattr(rundir, "run_lock", read_only)
    runner = CliRunner()
    for args in (["export", str(run_dir)], ["run", str(bundle), "--run-dir", str(run_dir)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Read-only file system" in result.output and "Traceback" not in result.output, result.output
    assert _export_bytes(run_dir) == exported  # the previous export is untouched


@pytest.mark.parametrize("command", ["status", "report", "export"])
def test_a_directory_that_is_not_a_run_is_refused_and_nothing_is_written_there(tmp_path, command):
    from click.testing import CliRunner

    from sftc.cli import main

    (tmp_path / "notes.txt").write_text("not a run\n")
    result = CliRunner().invoke(main, [command, str(tmp_path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "not a run directory" in result.output and str(tmp_path) in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "a report or export was written anyway"


def test_run_refuses_to_write_into_its_bundle_or_a_directory_of_other_things(project, tmp_path):
    from click.testing import CliRunner

    from sftc.cli import main

    bundle = project.compile(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    mine = tmp_path / "my-work"  # another tool's output: names sftc also uses, content it did not write
    (mine / "export").mkdir(parents=True)
    (mine / "export" / "notes.txt").write_text("mine\n")
    (mine / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    (mine / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    for target, words in ((bundle / "run", "inside the bundle"), (mine, "is not a run directory")):
        result = CliRunner().invoke(main, ["run", str(bundle), "--run-dir", str(target), "--fresh"])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert words in result.output, result.output
    assert (mine / "export" / "notes.txt").read_text() == "mine\n", "--fresh removed a directory sftc did not write"
    assert (mine / "checkpoints" / "checkpoint-500").is_dir()
    assert not (bundle / "run").exists()
    assert CliRunner().invoke(main, ["verify", str(bundle)]).exit_code == 0


@pytest.mark.parametrize("timings", ['{"sessions": 5}', '{"sessions": [1, 2]}', '{"sessions": [{"resumed_step": 99}, 3]}',
                                     '{"sessions": [{"started_at": "t0", "resumed_step": 99}, {"started_at": "t1"}]}'])
def test_a_damaged_timings_json_never_changes_the_sessions_run_json_lists(tmp_path, timings):
    """timings.json only informs: a damaged one adds no clock, drops no session and rewrites no
    field of run.json's sessions (a resume merges the two)."""
    from sftc.runtime import rundir

    record = {"bundle_id": "b", "bundle_dir": "bundles/b", "status": "stopped",
              "sessions": [{"started_at": "a", "resumed_step": 0}, {"started_at": "b", "resumed_step": 4}]}
    rundir.write_run_json(tmp_path, record)
    assert rundir.earlier_sessions(tmp_path) == record["sessions"]  # the clocks come back from timings.json
    (tmp_path / rundir.TIMINGS).write_text(timings)
    got = rundir.earlier_sessions(tmp_path)
    assert [s["resumed_step"] for s in got] == [0, 4]
    assert all(set(s) <= {"resumed_step", "started_at", "finished_at"} for s in got)
