"""Resume bundles: what a checkpoint is, how one is written, found, validated and rotated.

A checkpoint directory counts only if its `checkpoint.json` exists and every file it lists hashes
the same, with no file it does not list. The manifest is written last, inside a temp sibling that
is renamed into place, so a crash at any moment leaves either the previous state or a complete
checkpoint; a truncated or edited one is detected and skipped, never loaded.

Model, optimizer, scheduler, RNG and trainer state files are the ones HF Trainer writes (and reads
back with `torch.load(weights_only=True)` in transformers 5.23); this module adds the staging, the
manifest, the sampler state and the eval/selection record around them.
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
from sftc.io import atomic_write_json, fsync_path, pretty_json, read_json, sha256_file

MANIFEST = "checkpoint.json"
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
_STORAGE_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "os error 28")


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


def validate(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a valid checkpoint, (None, why) otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, f"{manifest_path}: missing (the checkpoint was never completed)"
    try:
        manifest = read_json(manifest_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{manifest_path}: not valid JSON ({exc})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"{manifest_path}: no 'files' hashes"
    for rel, expected in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return None, f"{file}: listed in {MANIFEST} but missing"
        if sha256_file(file) != expected:
            return None, f"{file}: sha256 differs from {MANIFEST} (corrupted or edited)"
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(on_disk - set(files))
    if extra:
        return None, f"{path}: file(s) {extra} are not in {MANIFEST}"
    return manifest, None


IDENTITY_KEYS = ("bundle_id", "tokenizer_version", "template_version", "data_manifest_hash", "eval_manifest_hash")


def identity(lock: dict) -> dict:
    return {
        "bundle_id": lock["bundle_id"],
        "tokenizer_version": lock.get("tokenizer_version"),
        "template_version": lock.get("template_version"),
        "data_manifest_hash": (lock.get("data_manifest") or {}).get("hash"),
        "eval_manifest_hash": (lock.get("eval_manifest") or {}).get("hash"),
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

    Only called by find_resume, which the runtime calls under the run directory's lock, so no
    live writer owns them. Without this every kill mid-save leaks a checkpoint's worth of disk.
    """
    if not root.is_dir():
        return []
    removed = []
    for child in root.iterdir():
        if child.is_dir() and (
            (child.name.startswith(".checkpoint-") and child.name.endswith(".tmp")) or child.name.startswith(".trash-")
        ):
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
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=root))
    try:
        fields = fill(staging)
        _fault_hook(step, "files")
        manifest = {**fields, "files": manifest_files(staging)}
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
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(root: Path, keep_last: int, best_step: int | None) -> list[int]:
    """Delete valid-looking checkpoints beyond the newest `keep_last`, never the best. Returns deleted steps."""
    complete = [(s, p) for s, p in checkpoint_dirs(root) if (p / MANIFEST).is_file()]
    keep = {s for s, _ in complete[-keep_last:]}
    if best_step is not None:
        keep.add(best_step)
    deleted = []
    for step, path in complete:
        if step not in keep:
            _remove(path)
            deleted.append(step)
    return deleted


# --- RNG, snapshot and restore around evaluation --------------------------------------------


def rng_snapshot() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def rng_restore(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])


def write_best(run_dir: Path, selection: dict) -> None:
    best = selection.get("best_step")
    record = dict(selection)
    record["checkpoint"] = f"checkpoints/checkpoint-{best}" if best is not None else None
    atomic_write_json(run_dir / "best.json", record)
