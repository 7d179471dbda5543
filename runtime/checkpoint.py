"""Resume bundles: what a checkpoint is, how one is written, found, validated and rotated.

A checkpoint directory counts only if its `checkpoint.json` exists, its own fields still match the
seal (a sha256 over its canonical content) stored in it, and every file it lists hashes the same,
with no file it does not list. One validator and one save path serve 1 and N ranks. The manifest is written last, inside a temp sibling that
is renamed into place, so a crash at any moment leaves either the previous state or a complete
checkpoint; a truncated or edited one is detected and skipped, never loaded.

Model, optimizer, scheduler, RNG and trainer state files are the ones HF Trainer writes (and reads
back with `torch.load(weights_only=True)` in transformers 5.23); this module adds the staging, the
manifest, the sampler state and the eval/selection record around them. Staging directories carry
their writer's pid, so a later start removes exactly those no live process owns.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sftc.errors import RunError
from sftc.io import canonical_json, fsync_path, owner_alive, pretty_json, read_json, sha256_bytes, sha256_file

MANIFEST = "checkpoint.json"
SEAL = "manifest_sha256"  # checkpoint.json's own seal: sha256 of its canonical content without this key
SAMPLER_STATE = "sampler_state.json"
NAME_RE = re.compile(r"^checkpoint-(\d+)$")
# A test hook: SIGKILL this process right after checkpoint-<N> is renamed into place, the harshest
# moment to die (nothing after the rename has run).
KILL_AFTER_ENV = "SFTC_FAULT_KILL_AFTER_CHECKPOINT"
# Test hooks for the fault campaign (scripts/fault_campaign.py) and tests/reliability:
# SFTC_FAULT_KILL_DURING_CHECKPOINT=<N>[:<phase>] SIGKILLs this process while checkpoint-<N> is
# half-written: phase "files" (default) after the state files are in the staging dir but before
# any manifest, "manifest" after half of checkpoint.json is written. Neither may ever be loaded.
KILL_DURING_ENV = "SFTC_FAULT_KILL_DURING_CHECKPOINT"
KILL_PHASES = ("files", "manifest")
# SFTC_FAULT_ENOSPC_DURING_CHECKPOINT=<N> makes the save of checkpoint-<N> fail with ENOSPC after
# the state files are written (no real disk can be filled on demand in CI).
ENOSPC_ENV = "SFTC_FAULT_ENOSPC_DURING_CHECKPOINT"
# What a full disk looks like when it surfaces through a library that does not raise OSError
# (safetensors' Rust writer raises SafetensorError with the io error's text).
# torch.save reports a short write (full disk, `ulimit -f`) as RuntimeError "... unexpected pos N vs M"
# or "PytorchStreamWriter failed writing file".
_STORAGE_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "os error 28",
                      "Read-only file system", "File too large", "unexpected pos",
                      "PytorchStreamWriter failed writing")


class CheckpointWarning(UserWarning):
    pass


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Directories named checkpoint-<step>, oldest first; not yet validated."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = NAME_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def seal(fields: dict) -> str:
    return "sha256:" + sha256_bytes(canonical_json({k: v for k, v in fields.items() if k != SEAL}).encode("utf-8"))


def validate(path: Path, verify_hashes: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, None) for a valid checkpoint, (None, why) otherwise: the one checkpoint validator
    (resume, rotation, selection, status and export all ask it). `verify_hashes=False` trusts the
    listed files' bytes (a listing need not re-hash every weight file) but still checks the seal."""
    manifest_path = path / MANIFEST
    fix = f"delete {path.name} (an earlier checkpoint is used), or run with --fresh"
    if not manifest_path.is_file():
        return None, f"{manifest_path}: missing (the checkpoint was never completed)"
    try:
        manifest = read_json(manifest_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{manifest_path}: not valid JSON ({exc}); {fix}"
    except OSError as exc:
        return None, f"{manifest_path}: cannot be read ({exc.strerror or exc})"
    if not isinstance(manifest, dict):
        return None, f"{manifest_path}: a JSON {type(manifest).__name__}, expected an object; {fix}"
    if manifest.get(SEAL) is None:
        return None, f"{manifest_path}: no {SEAL} seal over its own fields (edited, or written by an older sftc); {fix}"
    if manifest[SEAL] != seal(manifest):
        return None, (f"{manifest_path}: its fields do not match its {SEAL} seal (the record was edited or "
                      f"corrupted after it was written); {fix}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"{manifest_path}: no 'files' hashes"
    for rel, expected in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return None, f"{file}: listed in {MANIFEST} but missing"
        if verify_hashes and sha256_file(file) != str(expected).removeprefix("sha256:"):
            return None, f"{file}: sha256 differs from {MANIFEST} (corrupted or edited)"
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(on_disk - set(files))
    if extra:
        return None, f"{path}: file(s) {extra} are not in {MANIFEST}"
    return manifest, None


IDENTITY_KEYS = ("bundle_id", "tokenizer_version", "template_version", "data_manifest_hash", "eval_manifest_hash")


def identity(lock) -> dict:
    """What a checkpoint must share with the bundle resuming it (a Lock, or its JSON form)."""
    if isinstance(lock, dict):
        return {
            "bundle_id": lock["bundle_id"],
            "tokenizer_version": lock.get("tokenizer_version"),
            "template_version": lock.get("template_version"),
            "data_manifest_hash": (lock.get("data_manifest") or {}).get("hash"),
            "eval_manifest_hash": (lock.get("eval_manifest") or {}).get("hash"),
        }
    return {
        "bundle_id": lock.bundle_id,
        "tokenizer_version": lock.tokenizer_version,
        "template_version": lock.template_version,
        "data_manifest_hash": lock.data_manifest.hash,
        "eval_manifest_hash": lock.eval_manifest.hash,
    }


def find_resume(root: Path, lock: dict) -> tuple[Path | None, dict | None, list[str]]:
    """Newest valid checkpoint under root, its manifest, and why newer ones were skipped.

    A corrupted checkpoint is skipped with a warning naming the file; a valid checkpoint from
    another bundle (or tokenizer, template, data) is refused outright: resuming it would train a
    mixture of two runs.
    """
    want = identity(lock)
    skipped = []
    remove_leftovers(root)
    for step, path in reversed(checkpoint_dirs(root)):
        manifest, why = validate(path)
        if manifest is None:
            warnings.warn(f"skipping checkpoint-{step}: {why}", CheckpointWarning, stacklevel=2)
            skipped.append(why)
            continue
        differs = [k for k in IDENTITY_KEYS if manifest.get(k) != want[k]]
        if differs:
            raise RunError(
                f"{path}: written by another bundle or inputs, refusing to resume it",
                [f"{k}: checkpoint has {manifest.get(k)!r}, this bundle {want[k]!r}" for k in differs]
                + [f"use a different run directory, or pass --fresh to start {root.parent} over"],
            )
        return path, manifest, skipped
    return None, None, skipped


def remove_leftovers(root: Path) -> list[str]:
    """Delete staging and trash dirs a killed save or rotation left behind; returns their names.

    Their names carry the writer's pid; one whose writer is alive is left alone (find_resume runs
    under the run directory's lock, so that would be a bug, but deleting a live save is worse).
    Without this every kill mid-save leaks a checkpoint's worth of disk.
    """
    if not root.is_dir():
        return []
    removed = []
    for child in root.iterdir():
        ours = (child.name.startswith(".checkpoint-") and child.name.endswith(".tmp")) or child.name.startswith(".trash-")
        if child.is_dir() and ours and not owner_alive(child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return sorted(removed)


def _fault_hook(step: int, phase: str) -> None:
    """The test hooks above; a no-op unless their environment variables name this step."""
    kill = os.environ.get(KILL_DURING_ENV)
    if kill:
        want_step, _, want_phase = kill.partition(":")
        if want_step == str(step) and (want_phase or "files") == phase:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    if phase == "files" and os.environ.get(ENOSPC_ENV) == str(step):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), MANIFEST)


def is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return any(t in text for t in _STORAGE_FULL_TEXT)


def manifest_files(staging: Path) -> dict[str, str]:
    return {
        str(p.relative_to(staging)): sha256_file(p)
        for p in sorted(staging.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _fsync_tree(root: Path, recursive: bool = True) -> None:
    for p in [*(root.rglob("*") if recursive else []), root]:
        fsync_path(p)


def write_checkpoint(root: Path, step: int, fill: Callable[[Path], dict]) -> Path:
    """Stage checkpoint-<step>: `fill(staging)` writes the state files and returns the manifest
    fields; the manifest (with every file's hash) goes in last, then fsync and rename.

    An existing directory of the same name (an invalid leftover of an interrupted run, since
    resume starts from the newest valid one) is replaced.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.pid{os.getpid()}.", suffix=".tmp", dir=root))
    try:
        fields = fill(staging)
        _fault_hook(step, "files")
        manifest = {**fields, "files": manifest_files(staging)}
        manifest[SEAL] = seal(manifest)
        text = pretty_json(manifest)
        if os.environ.get(KILL_DURING_ENV):
            (staging / MANIFEST).write_text(text[: len(text) // 2], encoding="utf-8")
            _fault_hook(step, "manifest")
        (staging / MANIFEST).write_text(text, encoding="utf-8")
        _fsync_tree(staging)
        if final.exists():
            _remove(final)
        os.rename(staging, final)
        _fsync_tree(root, recursive=False)  # the rename itself
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and is_storage_error(exc):
            # A full disk (or a vanished mount) is an operator's problem, not a bug: say what was
            # kept, and let the CLI print it without a traceback. The staging dir is gone already.
            valid = [s for s, p in reversed(checkpoint_dirs(root)) if validate(p)[0] is not None]
            kept = f"the last good checkpoint, checkpoint-{valid[0]}, is intact" if valid else "no earlier checkpoint exists"
            raise RunError(
                f"could not write checkpoint-{step} in {root}: {exc}; the save was abandoned and nothing "
                f"half-written was kept, {kept}. Free space there and run again to resume"
            ) from exc
        raise
    if os.environ.get(KILL_AFTER_ENV) == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    return final


def _remove(path: Path) -> None:
    """Rename out of the checkpoint namespace first, so a crash mid-delete leaves no half checkpoint."""
    trash = path.with_name(f".trash-{path.name}.pid{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(root: Path, keep_last: int, best_step: int | None, protect: tuple[int, ...] = ()) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep_last`, never the best nor a `protect`ed one
    (the checkpoint this session resumed from). Returns deleted steps.
    A damaged one (its seal broken) does not count towards keep_last: it could never be resumed from,
    and a later save of that step replaces it. File contents are not hashed here (that would read
    every checkpoint's weights at every save), so a newer checkpoint whose weights rotted still counts:
    hence the resume checkpoint is protected explicitly (found by scripts/fault_campaign.py: a
    resume from checkpoint-4 with rotted 6 and 8 on disk deleted checkpoint-4 before loading it)."""
    complete = [(s, p) for s, p in checkpoint_dirs(root) if validate(p, verify_hashes=False)[0] is not None]
    keep = {s for s, _ in complete[-keep_last:]} | set(protect)
    if best_step is not None:
        keep.add(best_step)
    deleted = []
    for step, path in complete:
        if step not in keep:
            _remove(path)
            deleted.append(step)
    return deleted


# --- RNG, snapshot and restore around evaluation --------------------------------------------


def rng_snapshot(all_devices: bool = False) -> dict[str, Any]:
    """This process's RNG in HF Trainer's rng_state file layout, so one snapshot serves both the
    restore after evaluation and the checkpoint's rng_state(_<rank>).pth. HF keeps the current CUDA
    device's state in one process and every device's under torch.distributed; `all_devices`
    follows it, since HF's loader expects that shape back."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all() if all_devices else torch.cuda.random.get_rng_state()
    return state


def rng_restore(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        if isinstance(state["cuda"], (list, tuple)):
            torch.cuda.random.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.random.set_rng_state(state["cuda"])


# --- saving a checkpoint of a run (1 or N ranks) ---------------------------------------------


def sampler_state(run, trainer, step: int) -> dict:
    """Where the locked order stands after update `step`: what a resume starts from."""
    if run.plan is not None and step < len(run.plan):
        nxt = run.plan[step]
        return {"epoch": nxt["epoch"], "next_update_in_epoch": nxt["update_in_epoch"],
                "rows_consumed_in_epoch": nxt["update_in_epoch"] * trainer.args.gradient_accumulation_steps
                * trainer.args.per_device_train_batch_size * run.dist.world_size}
    return {"epoch": None, "finished": True}


def save_checkpoint(trainer, model) -> Path:
    """checkpoint-<step> of a run of any world size, in the single-process layout (full weights,
    full optimizer state keyed by parameter index, HF's state files) plus one RNG file per rank.

    Every rank joins the gathers (the FSDP2 state dicts, the RNG states) and, under fsdp, the
    evaluation (each forward all-gathers the layers); then rank 0 alone stages, writes the sealed
    manifest and renames, derives best.json and rotates. An error on rank 0 is raised on every rank.
    """
    import torch
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState

    from sftc.runtime import distributed as dist_
    from sftc.runtime.evaluate.held_out import evaluate_model

    run = trainer.run
    d = run.dist
    step = trainer.state.global_step
    root = run.run_dir / "checkpoints"
    if trainer.hp_search_backend is None:
        trainer.store_flos()  # a collective with several ranks: every rank gets here
    inner = trainer.model if d.active else model  # unwrapped: the FSDP2 root, or the module inside DDP
    model_state = optim_state = None
    if d.fsdp:
        model_state = dist_.full_model_state(inner)
        optim_state = dist_.full_optimizer_state(inner, getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    rng = dist_.gather_objects(d, rng_snapshot(all_devices=d.active))
    metrics: dict = {}
    if d.fsdp or d.is_main:  # DDP: rank 0 alone evaluates its (identical) replica
        metrics = evaluate_model(inner, run.bundle, run.tokenizer, run.pad_id)
    samples = metrics.pop("_samples", None)

    def fill(staging: Path) -> dict:
        out = str(staging)
        if d.fsdp:
            trainer._save(out, state_dict=model_state)
            torch.save(optim_state, staging / "optimizer.pt")
            torch.save(trainer.lr_scheduler.state_dict(), staging / "scheduler.pt")
        else:
            trainer.save_model(out, _internal_call=True)
            trainer._save_optimizer_and_scheduler(out)
        _sort_adapter_sets(staging, run.bundle.spec.model.path)
        # HF pickles its TrainingArguments here (absolute output_dir included). Nothing reads it on
        # resume, it can only be loaded by unpickling, and it would put a machine path in the run.
        (staging / "training_args.bin").unlink(missing_ok=True)
        trainer._save_scaler(out)
        rng_files = [f"rng_state_{r}.pth" for r in range(d.world_size)] if d.active else ["rng_state.pth"]
        for name, state in zip(rng_files, rng):
            torch.save(state, staging / name)
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
            trainer.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
        trainer.state.save_to_json(os.path.join(out, TRAINER_STATE_NAME))
        sampler = sampler_state(run, trainer, step)
        (staging / SAMPLER_STATE).write_text(json.dumps({**sampler, "global_step": step}, indent=2) + "\n")
        if samples is not None:
            (staging / "eval_samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
        extra = {}
        if d.active:
            extra["distributed"] = {"world_size": d.world_size, "strategy": d.strategy, "state": "full",
                                    "rng_files": rng_files}
        return record_evaluation(run, trainer, step, metrics, sampler, **extra)

    path, error = None, None
    if d.is_main:
        try:
            path = write_checkpoint(root, step, fill)
            run.last_checkpoint = path
            settle(run, step)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            if not d.active:
                raise
            error = exc
    dist_.first_error(d, error)
    path = dist_.broadcast_object(d, str(path) if path is not None else None)
    run.last_checkpoint = Path(path)
    return run.last_checkpoint


def _sort_adapter_sets(staging: Path, base: str | None = None) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which differs per process
    (PYTHONHASHSEED): the same adapter would get different checkpoint and export bytes after a
    resume. Written sorted, in peft's own format, it is the same bytes in every process.
    peft also records the base by the absolute path it was loaded from (and repeats it in an
    auto-generated README.md): the checkpoint names it as the spec does (`base`, project-relative
    or a hub id) and drops that README, so no checkpoint holds a path of this machine (the export
    writes its own card)."""
    path = staging / "adapter_config.json"
    if not path.is_file():
        return
    (staging / "README.md").unlink(missing_ok=True)
    config = json.loads(path.read_text(encoding="utf-8"))
    if base is not None:
        config["base_model_name_or_path"] = base
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def record_evaluation(run, trainer, step: int, metrics: dict, sampler: dict, **extra) -> dict:
    """Log a checkpoint's eval, select with it, and return its checkpoint.json content."""
    from sftc.runtime import rundir

    from sftc.runtime import tracking

    run.append_metrics({"kind": "eval", "step": step, **metrics})
    metrics = {k: v for k, v in metrics.items() if k not in rundir.CLOCK_METRIC_KEYS}  # those went to timings.jsonl
    selection = rundir.derive_best(run.run_dir, run.select_spec, run.bundle.bundle_id,
                                   allow_incomplete_history=run.allow_incomplete_history, write=False)
    mine = next((c for c in selection.get("candidates", []) if c["step"] == step), {})
    run.progress.evaluation({"step": step, **metrics}, mine.get("eligible"), "; ".join(mine.get("failed") or []))
    if run.dist.is_main:
        tracking.log_metrics(trainer, metrics)
    return {
        **identity(run.bundle.lock),
        "global_step": step,
        "epoch": run.data_epoch(step),  # passes over the train rows, not HF's run progress
        "supervised_tokens_total": run.supervised_total,
        "metrics": metrics,
        "best_metric": best_metric(selection, run.bundle.spec),
        "sampler": sampler,
        **extra,
    }


def best_metric(selection: dict, spec) -> dict | None:
    best_step = selection.get("best_step")
    best = next((c for c in selection.get("candidates", []) if c["step"] == best_step), None)
    if best is None:
        return None
    name = spec.select.maximize or next((o.minimize or o.maximize for o in spec.select.tie_break), "eval_loss")
    return {"step": best_step, "name": name, "value": best.get(name)}


def settle(run, step: int | None = None) -> dict:
    """Derive best.json from every evaluation record, then rotate to keep_last plus the selected
    checkpoint. Run after each checkpoint and at every start, so a kill between a checkpoint's
    rename and this (the harshest moment) is repaired by the next start, not carried forward."""
    from sftc.runtime import rundir

    selection = rundir.derive_best(run.run_dir, run.select_spec, run.bundle.bundle_id,
                                   allow_incomplete_history=run.allow_incomplete_history)
    # keep the fallback too: with nothing eligible it is what a forced export would use
    keep = selection.get("best_step") if selection.get("best_step") is not None else selection.get("fallback_step")
    resumed = () if run.last_checkpoint is None else (int(Path(run.last_checkpoint).name.rsplit("-", 1)[-1]),)
    deleted = rotate(run.run_dir / "checkpoints", run.bundle.spec.checkpoint.keep_last, keep, protect=resumed)
    if deleted:
        run.append_metrics({"kind": "rotate", "step": step if step is not None else run.start_step,
                            "deleted": deleted, "best_step": selection.get("best_step")})
    run.selection = selection
    if run.dist.is_main:
        from sftc.runtime import tracking

        tracking.log_selection(run.trainer, selection)
    return selection
