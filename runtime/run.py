"""`sftc run BUNDLE`: train on exactly the bundle's tokens, and prove it.

The story of a run, in order:
  verify the bundle -> take the run directory's lock -> clean what killed sessions left ->
  pick the newest valid checkpoint, repair the records up to it, re-derive the selection ->
  load tokenizer and model as locked -> contamination probe -> train (TRL SFTTrainer, the
  locked order, every update checked; at each checkpoint: evaluate, select, rotate) ->
  check the run consumed what the bundle predicts -> export the selected checkpoint.
run.json records each session and how it ended, including a failure, a full disk and a signal.

Modules: batching (rows -> micro-batches), model (loading), trainer (the SFTTrainer subclass and
its config), checkpoint (save/validate/rotate), rundir (the records), evaluate/ (held-out metrics).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from sftc.errors import BundleError, RunError
from sftc.io import remove_stale_staging
from sftc.runtime import checkpoint as ckpt
from sftc.runtime import rundir
from sftc.runtime.progress import third_party_bars_kept
from sftc.runtime.batching import LockedOrderSampler, RowCollator, choose_layout, plan_updates
from sftc.runtime.bundle import Bundle, load_bundle
from sftc.runtime.model import load_model, load_tokenizer, pad_token_id, restore_adapter_dtype
from sftc.runtime.verify import verify_bundle


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: a KeyboardInterrupt (so every library unwinds as for Ctrl-C) that knows
    which signal it was."""

    def __init__(self, name: str):
        super().__init__(name)
        self.signal_name = name


@contextlib.contextmanager
def _signals_as_interrupts():
    """SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so both are recorded the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_bundle(bundle_dir, run_dir=None, fresh: bool = False, allow_drift: bool = False,
               stop_after_steps: int | None = None, allow_incomplete_history: bool = False,
               report_to: list[str] | None = None, project: str | None = None, run_name: str | None = None) -> Path:
    """Train on the bundle; resume from the newest valid checkpoint unless fresh. Returns the run dir.
    report_to / project / run_name override the spec file's `tracking:` (runtime/tracking.py)."""
    from sftc.runtime import distributed as dist_

    if dist_.env_ranks()[0] > 1:  # a torchrun worker: die with the agent even while verifying (minutes)
        dist_.die_with_launcher()
    bundle = load_bundle(bundle_dir)
    run_dir = Path(run_dir) if run_dir is not None else bundle.project_root / "runs" / bundle.bundle_id
    rundir.check_run_target(run_dir, bundle.dir)  # before verifying: a wrong --run-dir costs no hashing
    report = verify_bundle(bundle, allow_drift=allow_drift)
    d = dist_.setup(bundle.spec, report["layout"])
    clean = False
    try:
        with contextlib.ExitStack() as stack, _signals_as_interrupts(), third_party_bars_kept():
            error = None
            if d.is_main:  # one holder of the run lock, one writer of the run directory
                try:
                    stack.enter_context(rundir.run_lock(run_dir))
                    if fresh:
                        rundir.start_over(run_dir)
                except RunError as exc:
                    error = exc
                except OSError as exc:
                    error = RunError(f"{run_dir}: cannot use the run directory ({exc.strerror or exc}); "
                                     "give `sftc run` a writable directory with free space (--run-dir)")
            dist_.first_error(d, error)
            from sftc.runtime import tracking

            watch = tracking.settings(bundle.resolve(bundle.lock.spec_source), report_to, project, run_name,
                                      warn=lambda text: print(text, file=sys.stderr) if d.is_main else None)
            out = _run_locked(bundle, run_dir, report, stop_after_steps, d, allow_incomplete_history, watch)
        clean = True
        return out
    except RunInterrupted as exc:  # outside training (verify, loading, export): nothing half-done is kept
        raise RunError(f"interrupted by {exc.signal_name}; {run_dir} keeps every complete checkpoint. "
                       f"Run `sftc run {bundle_dir}` again to continue") from None
    finally:
        dist_.shutdown(d, clean)


def _clean_after_kills(bundle: Bundle, run_dir: Path) -> list[str]:
    """Staging left by killed processes: a checkpoint save (find_resume removes those), an export
    (RUN/.export.*.tmp) and a compile (bundles/.<id>.*.tmp). Only those whose owner is dead."""
    removed = remove_stale_staging(run_dir)
    removed += remove_stale_staging(bundle.dir.resolve().parent)
    return removed


def _project_relative(path: Path, run_dir: Path) -> str:
    """A path as run.json records it: relative to the project (the parent of runs/), which is
    where rundir.bundle_dir_of looks first; never an absolute path of this machine."""
    return os.path.relpath(Path(path).resolve(), run_dir.resolve().parent.parent)


def _run_locked(bundle: Bundle, run_dir: Path, report: dict, stop_after_steps: int | None, dist=None,
                allow_incomplete_history: bool = False, watch=None) -> Path:
    import transformers
    from transformers import PrinterCallback, set_seed

    from sftc.runtime import distributed as dist_
    from sftc.runtime import tracking
    from sftc.runtime.probe import run_probe
    from sftc.runtime.progress import Progress
    from sftc.runtime.trainer import RunState, keep_fsdp_unwrapped, make_trainer_class, training_args

    spec = bundle.spec
    layout = report["layout"]
    d = dist if dist is not None else dist_.Dist()

    # --- where this session starts (rank 0 reads and repairs the records; the others follow) ---
    found, error = None, None
    if d.is_main:
        try:
            _clean_after_kills(bundle, run_dir)
            resume, manifest, skipped = ckpt.find_resume(run_dir / "checkpoints", bundle.lock)
            skipped = [why.replace(str(run_dir) + os.sep, "") for why in skipped]
            log = rundir.repair_metrics(run_dir, int(manifest["global_step"]) if resume is not None else 0)
            rundir.check_history(run_dir, allow_incomplete_history, log)  # before minutes of model loading
            if resume is None:
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / rundir.BEST_JSON).unlink()  # derived from checkpoints, and there are none
            finished = _already_finished(run_dir, bundle, manifest)
            if finished:  # best.json is an output: derived from the records even with nothing to train
                rundir.derive_best(run_dir, spec.select.model_dump(mode="json"), bundle.bundle_id,
                                   allow_incomplete_history=allow_incomplete_history, log=log)
            found = (resume, manifest, skipped, finished)
        except (RunError, OSError) as exc:
            error = exc if isinstance(exc, RunError) else RunError(
                f"{run_dir}: cannot prepare the run directory ({exc.strerror or exc}); free space or make it "
                "writable, then run again")
    dist_.first_error(d, error)
    # every rank resumes from the checkpoint rank 0 found (the run directory is shared)
    resume, manifest, skipped, finished = dist_.broadcast_object(d, found)
    start_step = int(manifest["global_step"]) if manifest else 0
    if finished:  # nothing to train or export: say so before minutes of model loading and probing
        if d.is_main:
            print(f"sftc: {finished}; nothing to do (`sftc run --fresh` trains it again)", file=sys.stderr)
        return run_dir

    # --- the plan: this rank's micro-batches (checked one by one); the totals are summed over ranks ---
    max_steps = bundle.lock.budget.optimizer_steps
    plan = plan_updates(bundle.train.epochs, layout["per_device"], layout["grad_accum"], max_steps,
                        world_size=d.world_size, rank=d.rank)
    # each rank checks the rows it will train on against their sealed row_sha256 and hashes no
    # other row (runtime/bundle.py; the probe below reads a few of epoch 0's); the ranks' plans
    # split the stream, so the supervised tokens it predicts are the sum of theirs
    rows_here = [r for u in plan for mb in u["microbatches"] for r in mb]
    error = None
    try:
        bundle.train.verify_rows(rows_here)
        if bundle.eval is not None and (d.fsdp or d.is_main):  # the ranks that evaluate (runtime/checkpoint.py)
            bundle.eval.verify_rows(range(bundle.eval.n_rows))  # small, read whole at every evaluation
    except BundleError as exc:  # a mapped file read past its end is SIGBUS, not an exception: nothing else to catch
        error = exc
    dist_.first_error(d, error)
    predicted = dist_.all_sum(d, [bundle.train.supervised(rows_here)])[0]

    # --- the model, as locked, and the probe that its layout keeps examples apart ---
    set_seed(spec.seed)
    tokenizer = load_tokenizer(bundle)
    pad_id = pad_token_id(bundle, tokenizer)
    model = load_model(bundle)
    execution_layout = choose_layout(spec.model.attn_implementation)
    probe = run_probe(model, bundle, pad_id, layout=execution_layout)
    if d.rank == 0:
        print(f"sftc: layout {execution_layout} for {spec.model.attn_implementation}; contamination probe "
              f"max |packed - alone| = {probe['max_abs_diff']:.2e} (tolerance {probe['tolerance']:.0e})", file=sys.stderr)
    if d.fsdp:
        if resume is not None:  # full weights into the unsharded model, then shard
            dist_.load_full_weights(model, resume)
        model = dist_.shard_fsdp(model, d)
        dist_.verify_sharding(model, d, "after fully_shard")
    elif spec.distributed.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    run = RunState(bundle, run_dir, plan, pad_id, tokenizer,
                   supervised_total=int(manifest.get("supervised_tokens_total", 0)) if manifest else 0,
                   stop_after_steps=stop_after_steps, dist=d, start_step=start_step,
                   allow_incomplete_history=allow_incomplete_history)
    run.last_checkpoint = resume
    if d.is_main:
        run.progress = Progress(max_steps, start_step, every=getattr(watch, "progress_every_steps", None))
    if d.is_main and resume is not None:
        # the selection and rotation a kill right after the last checkpoint's rename never did
        ckpt.settle(run)
    BundleTrainer, RunCallback = make_trainer_class()
    trainer = BundleTrainer(
        model=model,
        args=training_args(bundle, run_dir, layout, model, dist=d, tracking=watch),
        train_dataset=bundle.train_dataset(),
        processing_class=tokenizer,
        data_collator=RowCollator(pad_id, execution_layout),
        callbacks=[RunCallback(run)],
        run=run,
        sampler=LockedOrderSampler(bundle.train.epochs),
    )
    run.trainer = trainer
    tracking.attach(trainer, run_dir)
    if d.fsdp:
        keep_fsdp_unwrapped(trainer, model)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    restore_adapter_dtype(model, bundle.spec)
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at every save

    record = {
        "bundle_id": bundle.bundle_id,
        "bundle_dir": _project_relative(bundle.dir, run_dir),
        "world_size": layout["world_size"],
        "layout": layout,
        "distributed": d.record(),
        "drift_allowed": report["library_drift"]["drift_allowed"],
        "library_drift": report["library_drift"],
        "probe": probe,
        "execution_layout": execution_layout,
        "resumed_from": f"checkpoints/{resume.name}" if resume else None,
        "resumed_step": start_step,
        "skipped_checkpoints": skipped,
        "optimizer_steps": max_steps,
        "supervised_tokens_predicted": predicted,
        "supervised_tokens_locked": bundle.lock.budget.supervised_tokens,
        "allow_incomplete_history": allow_incomplete_history,
        "versions": {"transformers": transformers.__version__},
        "started_at": rundir.now(),
        "status": "running",
    }
    sessions = rundir.earlier_sessions(run_dir) if d.is_main and resume is not None else []
    record["sessions"] = sessions + [{"started_at": record["started_at"], "resumed_step": start_step}]
    _record(d, run_dir, record)
    if d.is_main:
        trainer.add_callback(tracking.config_callback(trainer, {
            "bundle_id": bundle.bundle_id, "objective": spec.objective, "parameterization": spec.parameterization.kind,
            "optimizer_steps": max_steps, "examples_per_update": bundle.lock.batch.examples_per_update,
            "supervised_tokens": bundle.lock.budget.supervised_tokens, "world_size": layout["world_size"],
            "execution_layout": execution_layout, "resumed_step": start_step}))
    run.progress.start(record["resumed_from"])

    # --- training; every way it can end is recorded ---
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            with tracking.environment(getattr(watch, "project", None)):
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised or turned into a clear error
            raise _ended_badly(d, run_dir, record, run, trainer, exc) from None
    run.progress.close_bar()  # what follows (export, summary) prints below the finished bar

    step = trainer.state.global_step
    record.update(
        consumption={
            "first_microbatches": run.hashed,
            "supervised_tokens_total": run.supervised_total,
            "checked_against_plan": plan is not None,
        },
        finished_at=rundir.now(),
        final_step=step,
        distributed=d.record(),
    )
    if step < max_steps:
        record["status"] = "stopped"
        _record(d, run_dir, record)
        return run_dir
    if run.supervised_total != predicted:
        record.update(status="failed", error="supervised token total differs from the bundle's prediction")
        _record(d, run_dir, record, failing=True)
        raise RunError(
            f"the run scored {run.supervised_total} supervised tokens over {step} updates; "
            f"the bundle's rows and order predict {predicted}"
        )
    record["status"] = "finished"
    _record(d, run_dir, record)
    if d.is_main:
        _export(run_dir, record, allow_incomplete_history)
        run.progress.finish(_summary(run_dir, record))
    return run_dir


def _summary(run_dir: Path, record: dict) -> str:
    """The last line of a run: steps, the selection and what was exported."""
    best = rundir.read_best(run_dir) or {}
    chosen = (f"selected step {best['best_step']}" if best.get("best_step") is not None
              else "no checkpoint met the selection constraints")
    export = record.get("export") or {}
    where = f"exported to {export['path']}" if export.get("exported") else "nothing exported"
    return f"run finished: {record.get('final_step')} steps, {chosen}, {where}"



def _already_finished(run_dir: Path, bundle: Bundle, manifest: dict | None) -> str | None:
    """What the run directory says when this bundle already trained to the end and exported (or
    finished with nothing eligible to export): the newest valid checkpoint is the last step and
    run.json says finished. None otherwise."""
    if not manifest or int(manifest["global_step"]) < bundle.lock.budget.optimizer_steps:
        return None
    with contextlib.suppress(RunError):
        record = rundir.read_run_json(run_dir)
        export = record.get("export") or {}
        if record.get("status") == "finished" and record.get("bundle_id") == bundle.bundle_id and export:
            done = f"{_project_relative(run_dir, run_dir)} already finished all {manifest['global_step']} steps"
            if export.get("exported") and (run_dir.parent.parent / export.get("path", "")).is_dir():
                return f"{done}; exported to {export['path']}"
            if not export.get("exported"):
                return f"{done}; nothing was exported ({export.get('why', 'no checkpoint eligible')})"
    return None


def _record(d, run_dir: Path, record: dict, failing: bool = False) -> None:
    if not d.is_main:
        return
    try:
        rundir.write_run_json(run_dir, record, tolerate_storage_errors=failing)
    except OSError as exc:
        raise RunError(f"{run_dir / rundir.RUN_JSON}: cannot record the run ({exc.strerror or exc}); free space "
                       "or make the run directory writable, then run again (training resumes from the last "
                       "checkpoint)") from None


def _kept(run_dir: Path, run) -> str:
    """What the next run resumes from, asked of the disk: a signal can land between a checkpoint's
    rename and the moment the run notes it."""
    complete = [path for _, path in reversed(ckpt.checkpoint_dirs(run_dir / "checkpoints"))
                if ckpt.validate(path, verify_hashes=False)[0] is not None]
    if not complete:
        return "no checkpoint was written yet, so the next run starts from the beginning"
    return f"kept {complete[0].name} (the last complete checkpoint), which the next run resumes from"


def _ended_badly(d, run_dir: Path, record: dict, run, trainer, exc: BaseException) -> BaseException:
    """Record how training ended and return the error to raise: a clear one for a signal or a full
    disk, the original for anything else. Writing run.json may itself fail on a full disk; that is
    reported once, never chained onto the real error."""
    step = trainer.state.global_step
    record.update(finished_at=rundir.now(), final_step=step)
    bundle_arg = record["bundle_dir"]
    if isinstance(exc, KeyboardInterrupt):
        name = getattr(exc, "signal_name", "SIGINT")
        record.update(status="interrupted", stopped_by=name)
        _record(d, run_dir, record, failing=True)
        return RunError(f"interrupted by {name} at update {step}: {_kept(run_dir, run)}. "
                        f"Resume with `sftc run {bundle_arg}`")
    if isinstance(exc, RunError):
        record.update(status="failed", error=str(exc))
        _record(d, run_dir, record, failing=True)
        return exc
    if ckpt.is_storage_error(exc):
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        record.update(status="failed", error=f"storage: {first}")
        _record(d, run_dir, record, failing=True)
        return RunError(f"a write in {run_dir} failed ({first}): the disk is full, over a size limit or read-only. "
                        f"{_kept(run_dir, run).capitalize()}; no half-written checkpoint was kept. Free space "
                        f"there and resume with `sftc run {bundle_arg}`")
    record.update(status="failed", error=f"{exc.__class__.__name__}: {exc}"[:500])
    _record(d, run_dir, record, failing=True)
    return exc


def _export(run_dir: Path, record: dict, allow_incomplete_history: bool = False) -> None:
    """Export the selected checkpoint. A run where no checkpoint met the constraints finished
    training but exports nothing (unless the spec says export_if_none_eligible): say so, and
    record it, instead of failing a finished run."""
    from sftc.runtime.export import export_run

    best = rundir.read_best(run_dir) or {}
    if best.get("best_step") is None and not (best.get("rule") or {}).get("export_if_none_eligible"):
        record["export"] = {"exported": False, "why": best.get("why", "no checkpoint was evaluated")}
        rundir.write_run_json(run_dir, record)
        print(f"sftc: no checkpoint met the selection constraints; nothing exported ({record['export']['why']}). "
              f"To export the best ineligible one anyway: sftc export {_project_relative(run_dir, run_dir)} "
              "--allow-ineligible", file=sys.stderr)
        return
    try:
        path = export_run(run_dir, allow_ineligible=best.get("best_step") is None)
    except OSError as exc:
        record["export"] = {"exported": False, "why": f"storage: {exc.strerror or exc}"}
        rundir.write_run_json(run_dir, record, tolerate_storage_errors=True)
        raise RunError(f"{run_dir}: training finished, but the export could not be written ({exc.strerror or exc}); "
                       f"the checkpoints are kept. Free space or make the directory writable, then "
                       f"`sftc export {run_dir}`") from None
    record["export"] = {"exported": True, "path": _project_relative(path, run_dir)}
    rundir.write_run_json(run_dir, record)
    print(f"sftc: exported step {best.get('export_step', best.get('best_step'))} to {record['export']['path']}", file=sys.stderr)
