"""What a person sees of a run that is not on a terminal, and what a tracker receives.

`sftc run` piped (DVC, CI, nohup, SLURM logs): a plain progress line at least once per logging
interval, one line per evaluation with its eligibility, the export and a final summary, and no
raw dict lines. With `tracking.report_to: [tensorboard]`, HF's TensorBoard callback writes loss,
learning rate and grad norm, and sftc's behaviour metrics land beside them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.runtime.conftest import REPO

STEPS, EVERY, SAVE = 8, 3, 4


def _with_tracking(project, tracking: dict) -> None:
    """`tracking:` is read from the spec file at run time (it is not part of the bundle)."""
    path = project.root / "spec.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["tracking"] = tracking
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_piped_run_prints_progress_evaluations_export_and_summary(project):
    bundle = project.compile(schedule={"max_steps": STEPS}, checkpoint={"every_steps": SAVE, "keep_last": 2},
                             eval={"rules": "rules.yaml", "max_new_tokens": 8, "max_prompts": 4, "batch_size": 4})
    _with_tracking(project, {"progress_every_steps": EVERY})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sftc", "run", str(bundle)], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    steps = [int(m.group(1)) for m in re.finditer(rf"^sftc: step (\d+)/{STEPS} \(\d+%\) loss \S+ .*tokens/s \S+ eta \S+$",
                                                   err, re.MULTILINE)]
    # at least one line per interval of EVERY steps, the first and the last step included
    assert steps[0] == 1 and steps[-1] == STEPS, err
    for lo in range(0, STEPS, EVERY):
        assert any(lo < s <= lo + EVERY for s in steps), (lo, steps)
    evals = re.findall(r"^sftc: eval step (\d+): .*format_pass_rate \S+.* -> (not )?eligible", err, re.MULTILINE)
    assert [int(s) for s, _ in evals] == [SAVE, 2 * SAVE], err
    assert re.search(r"^sftc: exported step \d+ to runs/", err, re.MULTILINE) or "nothing exported" in err, err
    assert re.search(rf"^sftc: run finished: {STEPS} steps, ", err, re.MULTILINE), err
    assert "{'loss'" not in err and "{'loss'" not in proc.stdout  # no raw dict lines
    assert "\r" not in err  # no bar when piped

    # the same bundle again: it says the run is done before loading a model or probing
    again = subprocess.run([sys.executable, "-m", "sftc", "run", str(bundle)], cwd=project.root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"^sftc: runs/\S+ already finished all {STEPS} steps; (exported to|nothing was exported)",
                     again.stderr, re.MULTILINE), again.stderr
    assert "contamination probe" not in again.stderr


def test_tensorboard_receives_loss_lr_grad_norm_and_behaviour(project):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = project.compile(schedule={"max_steps": STEPS}, checkpoint={"every_steps": SAVE, "keep_last": 2},
                             eval={"rules": "rules.yaml", "max_new_tokens": 8, "max_prompts": 4, "batch_size": 4})
    first_id = bundle.name
    _with_tracking(project, {"report_to": ["tensorboard"], "project": "access", "run_name": "tb-test"})
    from sftc.compiler import compile_spec

    # the spec file changed in tracking only: the same bundle, not a new one
    recompiled, _, reused = compile_spec(project.root / "spec.yaml")
    assert recompiled.name == first_id and reused, "tracking changed the bundle id: it must not be hashed"

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "sftc", "run", str(bundle)], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logdir = project.run_dir(bundle) / "tensorboard"
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {logdir}"
    scalars, texts = {}, set()
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        texts |= set(acc.Tags().get("tensors", []))
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert tag in scalars and len(scalars[tag]) == STEPS, (tag, sorted(scalars))
    for tag in ("eval/format_pass_rate", "eval/policy_pass_rate", "eval/eval_loss"):
        assert tag in scalars and [s for s, _ in scalars[tag]] == [SAVE, 2 * SAVE], (tag, sorted(scalars))
    losses = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (project.run_dir(bundle) / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"}
    assert [round(v, 5) for _, v in scalars["train/loss"]] == [round(losses[s], 5) for s in sorted(losses)]
    assert any(t.startswith("sftc/config") for t in texts), sorted(texts)


def test_wandb_run_receives_the_config(project, tmp_path):
    """W&B starts its run when training begins: the config must be sent after that, or it reaches
    no run. The real client, offline; its run file holds what it would have uploaded."""
    pytest.importorskip("wandb")
    bundle = project.compile(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "sftc", "run", str(bundle), "--report-to", "wandb", "--project", "access"],
                          cwd=project.root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    recorded = runs[0].read_bytes()  # protobuf records; wandb 0.31 has no Python reader for them
    # the run config's `sftc` entry, as W&B stores a config value (compact JSON)
    assert b'{"bundle_id":"' + bundle.name.encode() + b'"' in recorded, "no sftc config in the W&B run"
    # sent before the run began, it went through on_log instead: a logged string that set W&B up
    # early (before the run's project was in the environment)
    assert b"sftc_config" not in recorded
    assert b"train/loss" in recorded


def test_unknown_or_missing_tracker_is_a_clear_error(project, monkeypatch):
    bundle = project.compile(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "sftc", "run", str(bundle), "--report-to", "neptune"],
                          cwd=project.root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown tracker" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_tracker_settings_do_not_outlive_the_run(tmp_path, monkeypatch):
    """A second run in the same process must not log to the first one's directory or project."""
    pytest.importorskip("tensorboard")
    from transformers.integrations import TensorBoardCallback

    from sftc.runtime import tracking

    for key in ("TENSORBOARD_LOGGING_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "users-own")
    before = dict(os.environ)
    kwargs = tracking.training_kwargs(["tensorboard", "wandb"], tmp_path / "run-a", "access", None)
    assert kwargs["project"] == "access" and dict(os.environ) == before
    with tracking.environment("access"):
        assert os.environ["WANDB_PROJECT"] == os.environ["MLFLOW_EXPERIMENT_NAME"] == "access"
    assert dict(os.environ) == before, "the project leaked out of the run"

    class FakeTrainer:  # the one attribute attach() reads: HF's callback handler
        def __init__(self):
            self.callback_handler = type("H", (), {"callbacks": [TensorBoardCallback()]})()

    for name in ("run-a", "run-b"):
        trainer = FakeTrainer()
        tracking.attach(trainer, tmp_path / name)
        assert trainer.callback_handler.callbacks[0].logging_dir == str(tmp_path / name / "tensorboard")
