"""Trackers users already run (TensorBoard, trackio, W&B, MLflow), through HF's own `report_to`.

What HF logs by itself reaches the tracker: loss, learning rate, grad norm per step. What only
sftc knows is sent to the same trackers here: the bundle id, budget and parameterization as
config, the held-out behaviour metrics of every checkpoint, and which checkpoint was selected and
why. sftc's metrics go through each tracker callback's own `on_log`, so they land where HF's land
(`eval/format_pass_rate` next to `train/loss`) with no second client of any tracker.

The trackers are not part of the bundle: they observe a run and do not change its tokens, so the
compiler leaves `tracking:` out of the hashed spec (a new tracker never changes a bundle id) and
`sftc run` reads it from the spec file the lock names, or from `--report-to`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from sftc.errors import RunError

# tracker name -> (module that must import, HF integration callback class name)
TRACKERS = {
    "tensorboard": ("tensorboard", "TensorBoardCallback"),
    "trackio": ("trackio", "TrackioCallback"),
    "wandb": ("wandb", "WandbCallback"),
    "mlflow": ("mlflow", "MLflowCallback"),
}


def check_available(names: list[str]) -> list[str]:
    """The trackers asked for, each importable, or one error naming what to install."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        raise RunError(f"tracking.report_to asks for {', '.join(missing)}, not installed here; "
                       f"pip install {' '.join(TRACKERS[n][0] for n in missing)} (or drop it from tracking.report_to)")
    return list(names)


def training_kwargs(names: list[str], run_dir: Path, project: str | None, run_name: str | None) -> dict[str, Any]:
    """SFTConfig fields for the trackers. Nothing here touches the process environment: where
    TensorBoard writes is set on its callback (`attach`), and the project names W&B and MLflow read
    from the environment are set only while this run trains (`environment`)."""
    if not names:
        return {"report_to": "none"}
    kwargs: dict[str, Any] = {"report_to": list(names), "run_name": run_name or run_dir.name}
    if project:
        kwargs["project"] = project  # trackio reads it from the args
    return kwargs


def attach(trainer, run_dir: Path) -> None:
    """TensorBoard writes under RUN_DIR/tensorboard, not inside checkpoints/ where HF would put it
    by default. Set on this trainer's callback, before its writer opens, rather than through HF's
    TENSORBOARD_LOGGING_DIR: an environment variable would outlive the run and send a second run in
    the same process to the first one's directory."""
    for cb in _tracker_callbacks(trainer):
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is None:
            cb.logging_dir = str(Path(run_dir) / "tensorboard")


@contextlib.contextmanager
def environment(project: str | None):
    """W&B and MLflow take the project only from the environment (WANDB_PROJECT,
    MLFLOW_EXPERIMENT_NAME, read when training begins): set for this run's training, then put back
    as they were, so nothing leaks into a later run of the same process."""
    if not project:
        yield
        return
    keys = ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME")
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: project for k in keys})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tracker_callbacks(trainer) -> list:
    wanted = {cls for _, cls in TRACKERS.values()}
    return [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ in wanted]


def log_metrics(trainer, metrics: dict[str, Any], prefix: str = "eval") -> None:
    """Numbers of one checkpoint's evaluation to every tracker, at the trainer's global step."""
    if trainer is None:
        return
    from sftc.runtime.rundir import DIAGNOSTICS  # counts and flags of the evaluation, not the model's metrics

    logs = {f"{prefix}_{k}": float(v) for k, v in metrics.items()
            if k not in DIAGNOSTICS and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    if not logs:
        return
    for cb in _tracker_callbacks(trainer):
        cb.on_log(trainer.args, trainer.state, trainer.control, logs=logs)


def config_callback(trainer, config: dict[str, Any]):
    """A callback that sends the run's config once the trackers have started their runs.

    W&B and MLflow start a run in their callback's on_train_begin (HF's `setup`): config sent
    before `train()` reached no W&B run at all and would have opened an MLflow run of its own.
    Added with `trainer.add_callback`, this comes after the trackers' callbacks, which the
    Trainer puts first, so its on_train_begin runs after theirs."""
    from transformers import TrainerCallback

    class SendConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            log_config(trainer, config)

    return SendConfig()


def log_config(trainer, config: dict[str, Any]) -> None:
    """The run's identity (bundle id, budget, parameterization) as tracker config, once the
    trackers are set up (config_callback)."""
    if trainer is None:
        return
    text = json.dumps(config, sort_keys=True, default=str)
    for cb in _tracker_callbacks(trainer):
        name = type(cb).__name__
        if name == "TensorBoardCallback":
            if getattr(cb, "tb_writer", None) is not None:  # opened in its on_train_begin, on the main process
                cb.tb_writer.add_text("sftc/config", f"```json\n{json.dumps(config, indent=2, sort_keys=True, default=str)}\n```")
                cb.tb_writer.flush()
        elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None and cb._wandb.run is not None:
            cb._wandb.config.update({"sftc": config}, allow_val_change=True)
        elif name == "MLflowCallback" and getattr(cb, "_ml_flow", None) is not None:
            flat = {f"sftc.{k}": (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in config.items()}
            cb._ml_flow.log_params({k: str(v)[:500] for k, v in flat.items()})
        else:  # trackio and any other: a text entry through the callback's own on_log
            cb.on_log(trainer.args, trainer.state, trainer.control, logs={"sftc_config": text})


def log_selection(trainer, selection: dict[str, Any]) -> None:
    """The selected step and why, as a number (selected_step) and a text entry."""
    if trainer is None or not selection:
        return
    best = selection.get("best_step")
    numbers = {"selected_step": best} if isinstance(best, int) else {}
    log_metrics(trainer, numbers, prefix="select")
    why = selection.get("why")
    if why:
        for cb in _tracker_callbacks(trainer):
            if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                cb.tb_writer.add_text("sftc/selection", str(why), trainer.state.global_step)
                cb.tb_writer.flush()


def settings(spec_file: Path | None, report_to: list[str] | None = None, project: str | None = None,
             run_name: str | None = None, warn=print):
    """The run's TrackingSpec: the spec file's `tracking:` section (read now, not locked), with the
    command line's choices over it. A spec file that is gone or no longer valid leaves tracking off,
    with a warning: it never stops a run."""
    from sftc.compiler.spec import TrackingSpec, load_spec

    base = TrackingSpec()
    if spec_file is not None and Path(spec_file).is_file():
        try:
            base = load_spec(spec_file).tracking
        except Exception as exc:  # noqa: BLE001 - any problem with the file means: no tracking from it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warn(f"sftc: tracking settings not read from {spec_file} ({first[:200]}); tracking off unless --report-to")
    overrides: dict[str, Any] = {}
    if report_to is not None:
        overrides["report_to"] = [n for n in report_to if n and n != "none"]
    if project is not None:
        overrides["project"] = project
    if run_name is not None:
        overrides["run_name"] = run_name
    return TrackingSpec.model_validate({**base.model_dump(), **overrides}) if overrides else base
