"""The run directory (`runs/<bundle_id>/`): where its records are and how each is read.

status, report, select and export all read the same files; reading them here keeps one idea of
what a valid checkpoint is and which eval line counts for a step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sftc.errors import RunError
from sftc.io import read_json, sha256_file

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# --- run directory files ---------------------------------------------------------------------


def read_run_json(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    return read_json(path)


def bundle_dir_of(run_dir) -> Path:
    """The bundle a run executed. run.json names it; a relative name is tried against the project
    (the parent of runs/) first, then the working directory."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir)
    project = run_dir.resolve().parent.parent
    tried = []
    named = run.get("bundle_dir")
    if named:
        for base in ([Path(named)] if Path(named).is_absolute() else [project / named, Path.cwd() / named]):
            tried.append(str(base))
            if (base / "bundle.lock.json").is_file():
                return base
    bundle_id = run.get("bundle_id") or run_dir.name
    fallback = project / "bundles" / bundle_id
    tried.append(str(fallback))
    if (fallback / "bundle.lock.json").is_file():
        return fallback
    raise RunError(f"{run_dir}: cannot find the run's bundle (looked for bundle.lock.json in: {', '.join(tried)})")


def read_lock(run_dir) -> dict:
    return read_json(bundle_dir_of(run_dir) / "bundle.lock.json")


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of metrics.jsonl, in file order. A torn last line (the run was killed
    mid-write) is skipped; a torn line in the middle is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    train, evals = [], []
    if not path.is_file():
        return train, evals
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise RunError(f"{path}: line {n} is not JSON") from None
        if row.get("kind") == "train":
            train.append(row)
        elif row.get("kind") == "eval":
            evals.append(row)
    return train, evals


def latest_by_step(rows: list[dict]) -> list[dict]:
    """One row per step, the last one written: a resumed run re-logs the steps after its checkpoint,
    and only the re-run is the history of the weights that exist."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def checkpoint_dirs(run_dir) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_problems(ckpt_dir, bundle_id: str | None = None, verify_hashes: bool = True) -> list[str]:
    """Why a checkpoint directory is not a complete checkpoint of this bundle ([] when it is).
    checkpoint.json is written last, so its absence means the save never finished."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / "checkpoint.json"
    if not manifest_path.is_file():
        return [f"{ckpt_dir.name}: no checkpoint.json (save did not finish)"]
    try:
        manifest = read_json(manifest_path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{ckpt_dir.name}: checkpoint.json is not valid JSON"]
    problems = []
    if bundle_id is not None and manifest.get("bundle_id") != bundle_id:
        problems.append(f"{ckpt_dir.name}: written by bundle {manifest.get('bundle_id')!r}, not {bundle_id!r}")
    files = manifest.get("files") or {}
    if not files:
        problems.append(f"{ckpt_dir.name}: checkpoint.json lists no files")
    for rel, expected in sorted(files.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            problems.append(f"{ckpt_dir.name}/{rel}: missing")
        elif verify_hashes:
            want = str(expected).removeprefix("sha256:")
            if sha256_file(path) != want:
                problems.append(f"{ckpt_dir.name}/{rel}: sha256 differs from checkpoint.json")
    return problems


def read_best(run_dir) -> dict | None:
    path = Path(run_dir) / "best.json"
    return read_json(path) if path.is_file() else None


def candidates(run_dir) -> list[dict]:
    """Every evaluated step, as select_best wants it: eval lines of metrics.jsonl, completed by the
    metrics recorded in checkpoint.json for steps the log lacks. `on_disk` says whether the
    checkpoint still exists (rotation may have removed it)."""
    _, evals = read_metrics(run_dir)
    rows = {int(r["step"]): {k: v for k, v in r.items() if k != "kind"} for r in latest_by_step(evals)}
    for step, path in checkpoint_dirs(run_dir):
        manifest_path = path / "checkpoint.json"
        if step not in rows and manifest_path.is_file():
            metrics = read_json(manifest_path).get("metrics") or {}
            if metrics:
                rows[step] = {"step": step, **metrics}
    on_disk = {step for step, path in checkpoint_dirs(run_dir) if (path / "checkpoint.json").is_file()}
    out = []
    for step in sorted(rows):
        row = {k: v for k, v in rows[step].items() if _scalar(v)}
        row["step"] = step
        row["on_disk"] = step in on_disk
        out.append(row)
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


# Numbers logged next to the metrics that describe the evaluation itself, not the model.
DIAGNOSTICS = frozenset({"step", "eligible", "failed", "rank", "on_disk", "checkpoint", "kind", "n_prompts",
                         "eval_tokens", "generated_tokens", "generation_seconds", "replies_truncated", "epoch"})


def metric_names(lock: dict) -> list[str]:
    """eval_loss, the rules' declared metrics and whatever the selection rule names, in that order."""
    names = ["eval_loss"] + list((lock.get("eval_manifest") or {}).get("metrics") or [])
    select = (lock.get("spec") or {}).get("select") or {}
    names += list(select.get("require") or {}) + ([select["maximize"]] if select.get("maximize") else [])
    tie_break = select.get("tie_break") or []
    for entry in [tie_break] if isinstance(tie_break, dict) else tie_break:
        names += [v for v in entry.values() if v]
    out: list[str] = []
    for name in names:
        name = "eval_loss" if name == "val_loss" else name
        if name not in out:
            out.append(name)
    return out if len(out) > 1 else []


def project_root_of(bundle_dir, lock: dict) -> Path:
    """Where the lock's relative paths resolve. The compiler records project_root relative to the
    bundle directory; an absolute one is used as is."""
    bundle_dir = Path(bundle_dir)
    root = lock.get("project_root")
    if root:
        path = Path(root)
        return path if path.is_absolute() else (bundle_dir / path).resolve()
    return bundle_dir.resolve().parent.parent


def lock_location(bundle_dir, lock: dict, *candidates: str | None) -> str | None:
    """The first candidate that exists as a local path (resolved against the project), else the
    first one given as written (a hub id)."""
    root = project_root_of(bundle_dir, lock)
    given = [c for c in candidates if c]
    for value in given:
        path = Path(value) if Path(value).is_absolute() else root / value
        if path.exists():
            return str(path)
    return given[0] if given else None
