"""`sftc runs`: every run of the project side by side, one line each."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from sftc.errors import SftcError
from sftc.io import atomic_write_json, atomic_write_text
from sftc.review.status import fmt_number, run_state
from sftc.runtime.rundir import (DIAGNOSTICS, candidates, latest_by_step, metric_names, read_best, read_lock,
                                 read_metrics)


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
        row: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "status": run_state(run_dir)}
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
        try:
            train, _ = read_metrics(run_dir)
            best = read_best(run_dir) or {}
        except SftcError as exc:  # one run's damaged best.json leaves every other run to list
            row.update(error=str(exc).splitlines()[0], unreadable="records")
            rows.append(row)
            continue
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


def format_runs(rows: list[dict]) -> str:
    """A fixed-width table, one line per run; metric columns are the union over runs."""
    if not rows:
        return "no runs"
    metric_names: list[str] = []
    for row in rows:
        for name in row.get("best_metrics", {}):
            if name not in metric_names:
                metric_names.append(name)
    headers = ["run", "status", "param", "trainable", "seq", "ex/upd", "sup_tok/upd", "total_tok", "data", "template",
               "step", "best"] + metric_names
    table, unreadable = [], []
    for row in rows:
        if "error" in row:
            unreadable.append(f"{row['run']}: {row.get('status') or '-'}, {row.get('unreadable', 'bundle')} unreadable "
                              f"({row['error']})")
            continue
        best = row.get("best_step")
        if best is None:
            best = "none eligible" if row.get("best_eligible") is False else "-"
        step = row.get("last_step")
        steps = f"{fmt_number(step)}/{fmt_number(row.get('optimizer_steps'))}"
        table.append([
            row["run"], row.get("status") or "-", row["parameterization"], fmt_number(row.get("trainable_params")),
            fmt_number(row.get("seq_length")),
            fmt_number(row.get("examples_per_update")), fmt_number(row.get("supervised_tokens_per_update")),
            fmt_number(row.get("total_tokens")), _short(row.get("data_hash")), _short(row.get("template_version")),
            steps, fmt_number(best),
        ] + [fmt_number(row["best_metrics"].get(m)) for m in metric_names])
    widths = [max([len(headers[i])] + [len(r[i]) for r in table]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines + unreadable)


# --- records for DVC: metrics and plots of one run -------------------------------------------

# A DVC metric is compared across commits: a duration or memory figure differs on every repro
# and would bury the change that matters, so none goes into these records.
_TIMING = re.compile(r"(second|_s$|_ms$|wall|rss|per_s|throughput|elapsed|duration|memory)")
LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm")


def _behaviour_names(rows: list[dict], rule: dict) -> list[str]:
    named = list((rule or {}).get("require") or {}) + ([rule["maximize"]] if (rule or {}).get("maximize") else [])
    names = ["eval_loss"] + [n for n in named if n != "eval_loss"]
    for row in rows:
        for key, value in row.items():
            if (key not in names and key not in DIAGNOSTICS and not _TIMING.search(key)
                    and isinstance(value, (int, float)) and not isinstance(value, bool)):
                names.append(key)
    return names


def dvc_records(run_dir) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, loss rows, behaviour rows) of a run, read from its directory alone: the selected
    checkpoint's metrics, train loss per step, eval metrics per checkpoint. No timings."""
    run_dir = Path(run_dir)
    train, _ = read_metrics(run_dir)
    loss = [{k: row.get(k) for k in LOSS_COLUMNS} for row in latest_by_step(train)]
    evaluated = candidates(run_dir)
    best = read_best(run_dir) or {}
    names = _behaviour_names(evaluated, best.get("rule") or {})
    behaviour = [{"step": c["step"], **{n: c.get(n) for n in names}} for c in evaluated]
    selected = best.get("best_step") if best.get("best_step") is not None else best.get("fallback_step")
    chosen = next((c for c in evaluated if c["step"] == selected), {})
    metrics = {
        "selected_step": selected,
        "eligible": best.get("best_step") is not None if best else None,
        **{n: chosen.get(n) for n in names},
        "final_train_loss": loss[-1]["loss"] if loss else None,
        "steps": loss[-1]["step"] if loss else None,
    }
    return metrics, loss, behaviour


def _csv(rows: list[dict], columns) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_dvc_records(run_dir, out_dir) -> list[Path]:
    """metrics.json, loss.csv and behaviour.csv for `dvc metrics` / `dvc plots`, written beside the
    run (a file inside a DVC output directory cannot also be a metric). Same run, same bytes."""
    metrics, loss, behaviour = dvc_records(run_dir)
    out_dir = Path(out_dir)
    written = [out_dir / "metrics.json", out_dir / "loss.csv", out_dir / "behaviour.csv"]
    atomic_write_json(written[0], metrics)
    atomic_write_text(written[1], _csv(loss, LOSS_COLUMNS))
    behaviour_columns = list(behaviour[0]) if behaviour else ["step", "eval_loss"]
    atomic_write_text(written[2], _csv(behaviour, behaviour_columns))
    return written
