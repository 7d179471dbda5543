"""`sftc runs`: every run of the project side by side, one line each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sftc.errors import SftcError
from sftc.runtime.rundir import DIAGNOSTICS, metric_names, read_best, read_lock, read_metrics


# --- overview of all runs --------------------------------------------------------------------


def _short(value: Any, n: int = 12) -> str:
    if not value:
        return "-"
    text = str(value).removeprefix("sha256:")
    return text[:n]


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
        except (SftcError, OSError) as exc:
            row["error"] = str(exc).splitlines()[0]
            rows.append(row)
            continue
        spec, budget, params = lock.spec, lock.budget, lock.parameters
        param = spec.parameterization
        kind = param.kind
        if kind in ("lora", "qlora"):
            kind = f"{kind} r={param.rank}"
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
            "bundle_id": lock.bundle_id,
            "parameterization": kind,
            "trainable_params": params.trainable,
            "trainable_fraction": params.trainable_fraction,
            "seq_length": lock.packing.seq_length,
            "examples_per_update": lock.batch.examples_per_update,
            "supervised_tokens_per_update": budget.supervised_tokens_per_update.mean,
            "total_tokens": budget.total_tokens,
            "optimizer_steps": budget.optimizer_steps,
            "last_step": train[-1].get("step") if train else None,
            "data_hash": lock.data_manifest.hash,
            "template_version": lock.template_version,
            "tokenizer_version": lock.tokenizer_version,
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
