"""Reading run directories (`runs/<bundle_id>/`), and the one-line-per-run overview.

status, report, select and export all read the same files; reading them here keeps one idea of
what a valid checkpoint is and which eval line counts for a step.
"""

from __future__ import annotations

import json
import math
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


# --- overview of all runs --------------------------------------------------------------------


def _short(value: Any, n: int = 12) -> str:
    if not value:
        return "-"
    text = str(value).removeprefix("sha256:")
    return text[:n]


def _mean(value: Any) -> Any:
    return value.get("mean") if isinstance(value, dict) else value


def list_runs(project_root) -> list[dict]:
    """One row per `runs/*/` directory: what it trained (from the bundle lock) and what it selected."""
    root = Path(project_root) / "runs"
    rows = []
    if not root.is_dir():
        return rows
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir)}
        try:
            lock = read_lock(run_dir)
        except (RunError, OSError, json.JSONDecodeError) as exc:
            row["error"] = str(exc).splitlines()[0]
            rows.append(row)
            continue
        spec = lock.get("spec", {})
        param = spec.get("parameterization", {})
        kind = param.get("kind", "?")
        if kind in ("lora", "qlora"):
            kind = f"{kind} r={param.get('rank')}"
        budget = lock.get("budget", {})
        params = lock.get("parameters", {})
        packing = lock.get("packing", {})
        train, _ = read_metrics(run_dir)
        best = read_best(run_dir) or {}
        best_step = best.get("best_step")
        shown_step = best_step if best_step is not None else best.get("fallback_step")
        best_metrics = {}
        wanted = metric_names(lock)
        for cand in best.get("candidates", []):
            if cand.get("step") == shown_step:
                best_metrics = {k: v for k, v in cand.items() if (k in wanted if wanted else k not in DIAGNOSTICS)
                                and isinstance(v, (int, float)) and not isinstance(v, bool)}
        row.update({
            "bundle_id": lock.get("bundle_id"),
            "parameterization": kind,
            "trainable_params": params.get("trainable"),
            "trainable_fraction": params.get("trainable_fraction"),
            "seq_length": packing.get("seq_length") or spec.get("tokenize", {}).get("max_length"),
            "examples_per_update": budget.get("examples_per_update"),
            "supervised_tokens_per_update": _mean(budget.get("supervised_tokens_per_update")),
            "total_tokens": budget.get("total_tokens"),
            "optimizer_steps": budget.get("optimizer_steps"),
            "last_step": train[-1].get("step") if train else None,
            "data_hash": (lock.get("data_manifest") or {}).get("hash"),
            "template_version": lock.get("template_version"),
            "tokenizer_version": lock.get("tokenizer_version"),
            "best_step": best_step,
            "best_eligible": best_step is not None if best else None,
            "best_metrics": best_metrics,
        })
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def format_runs(rows: list[dict]) -> str:
    """A fixed-width table, one line per run; metric columns are the union over runs."""
    if not rows:
        return "no runs"
    metric_names: list[str] = []
    for row in rows:
        for name in row.get("best_metrics", {}):
            if name not in metric_names:
                metric_names.append(name)
    headers = ["run", "param", "trainable", "seq", "ex/upd", "sup_tok/upd", "total_tok", "data", "template",
               "step", "best"] + metric_names
    table, unreadable = [], []
    for row in rows:
        if "error" in row:
            unreadable.append(f"{row['run']}: unreadable ({row['error']})")
            continue
        best = row.get("best_step")
        if best is None:
            best = "none eligible" if row.get("best_eligible") is False else "-"
        step = row.get("last_step")
        steps = f"{_fmt(step)}/{_fmt(row.get('optimizer_steps'))}"
        table.append([
            row["run"], row["parameterization"], _fmt(row.get("trainable_params")), _fmt(row.get("seq_length")),
            _fmt(row.get("examples_per_update")), _fmt(row.get("supervised_tokens_per_update")),
            _fmt(row.get("total_tokens")), _short(row.get("data_hash")), _short(row.get("template_version")),
            steps, _fmt(best),
        ] + [_fmt(row["best_metrics"].get(m)) for m in metric_names])
    widths = [max([len(headers[i])] + [len(r[i]) for r in table]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines + unreadable)


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
