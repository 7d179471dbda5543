"""`sftc report`: PNG charts and a small HTML page for one run, from its directory alone.

The charts answer the reviewer's three questions: did loss go down (train and held-out), did
held-out behaviour improve and which checkpoint was picked against which constraints, and how many
supervised tokens each update actually carried (packing makes that vary even at a fixed batch).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from sftc.errors import RunError, SftcError
from sftc.io import atomic_write_text
from sftc.lock import Lock

from sftc.runtime.rundir import candidates, read_best, read_lock, read_metrics
from sftc.runtime.select import parse_constraint

# Numbers logged with eval lines that are not behaviour metrics.
_NOT_METRICS = {"step", "eval_loss", "val_loss", "n_prompts", "generated_tokens", "generation_seconds",
                "replies_truncated", "rank", "on_disk", "eligible", "epoch"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _behaviour_names(cands: list[dict], lock: Lock | None) -> list[str]:
    declared = list(lock.eval_manifest.metrics) if lock else []
    if declared:
        return [m for m in declared if any(_finite(c.get(m)) for c in cands)]
    names: list[str] = []
    for c in cands:
        for k, v in c.items():
            if k not in _NOT_METRICS and _finite(v) and k not in names:
                names.append(k)
    return names


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mark_best(ax, best_step: int | None, label: str = "selected") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best_step is not None:
        ax.axvline(best_step, color="tab:green", linestyle=":", linewidth=1.5, label=f"{label} (step {best_step})")


def _loss_chart(plt, path: Path, train: list[dict], cands: list[dict], best_step: int | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    pts = [(r["step"], r["loss"]) for r in train if _finite(r.get("loss"))]
    if pts:
        ax.plot(*zip(*pts), color="tab:blue", linewidth=1, alpha=0.8, label="train loss")
    evals = [(c["step"], c["eval_loss"]) for c in cands if _finite(c.get("eval_loss"))]
    if evals:
        ax.plot(*zip(*evals), color="tab:orange", marker="o", linewidth=1.5, label="held-out loss")
        low = min(evals, key=lambda p: p[1])
        ax.annotate(f"lowest held-out loss {low[1]:.3g}", low, textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8, color="tab:orange")
    _mark_best(ax, best_step)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    if pts or evals:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _behaviour_chart(plt, path: Path, cands: list[dict], names: list[str], best: dict | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    rule = (best or {}).get("rule") or {}
    best_step = (best or {}).get("best_step")
    eligible = {c["step"]: c.get("eligible", True) for c in (best or {}).get("candidates", [])}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown: list[float] = []
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        pts = [(c["step"], c[name]) for c in cands if _finite(c.get(name))]
        if not pts:
            continue
        shown += [v for _, v in pts]
        label = name + (" (maximized)" if name == rule.get("maximize") else "")
        ax.plot(*zip(*pts), color=color, linewidth=1.5, label=label)
        for step, value in pts:
            # Hollow markers: checkpoints the constraints rule out.
            ok = eligible.get(step, True)
            ax.plot([step], [value], marker="o", color=color, markerfacecolor=color if ok else "white")
            if len(pts) <= 12:
                ax.annotate(f"{value:.3g}", (step, value), textcoords="offset points", xytext=(0, -12 if i % 2 else 6),
                            ha="center", fontsize=7, color=color)
            if step == best_step:
                ax.plot([step], [value], marker="*", markersize=16, color=color, markeredgecolor="black")
        if name in (rule.get("require") or {}):
            op, bound = parse_constraint(rule["require"][name])
            shown.append(bound)
            ax.axhline(bound, color=color, linestyle="--", linewidth=1, alpha=0.8,
                       label=f"required: {name} {op} {bound:g}")
    _mark_best(ax, best_step)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out pass rate")
    if shown:
        # Zoom to where the checkpoints differ: rates of 0.91 and 0.97 look equal on a 0..1 axis.
        low, high = min(shown), max(shown)
        pad = max(0.02, (high - low) * 0.15)
        bottom, top = max(-0.02, low - pad), (min(1.02, high + pad) if high <= 1 else high + pad)
        if top - bottom < 0.1:  # all equal: keep a readable span instead of a microscope
            bottom, top = max(-0.02, min(bottom, top - 0.1)), max(top, bottom + 0.1)
        ax.set_ylim(bottom, top)
    title = "Held-out behaviour per checkpoint"
    if best is not None and best_step is None:
        title += " (no checkpoint eligible)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no behaviour metrics logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _tokens_chart(plt, path: Path, train: list[dict], lock: Lock | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    pts = [(r["step"], r["supervised_tokens"]) for r in train if _finite(r.get("supervised_tokens"))]
    if pts:
        steps, values = zip(*pts)
        ax.plot(steps, values, color="tab:purple", linewidth=1, marker="." if len(pts) < 80 else None,
                label="supervised tokens in the update")
        mean = sum(values) / len(values)
        ax.axhline(mean, color="tab:purple", linestyle="--", linewidth=1, label=f"observed mean {mean:.0f}")
        if lock is not None:
            planned = lock.budget.supervised_tokens_per_update.mean
            ax.axhline(planned, color="gray", linestyle=":", linewidth=1, label=f"planned mean {planned:.0f} (lock)")
        ax.set_ylim(0, max(values) * 1.15)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no train steps logged", ha="center", va="center", transform=ax.transAxes)
    _mark_best(ax, None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("supervised tokens")
    ax.set_title("Supervised tokens per update")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def render_report(run_dir, out_dir=None) -> Path:
    """Write loss.png, behaviour.png, tokens.png and report.html (default `run_dir/report/`);
    returns the path of report.html."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = read_lock(run_dir)
    except SftcError:
        lock = None  # charts only need the run's own files; the lock adds the plan to compare with
    train, _ = read_metrics(run_dir)
    cands = candidates(run_dir)
    best = read_best(run_dir)
    best_step = best.get("best_step") if best else None
    names = _behaviour_names(cands, lock)

    plt = _pyplot()
    _loss_chart(plt, out / "loss.png", train, cands, best_step)
    _behaviour_chart(plt, out / "behaviour.png", cands, names, best)
    _tokens_chart(plt, out / "tokens.png", train, lock)

    columns = ["eval_loss", *names]
    rows = {c["step"]: c for c in (best or {}).get("candidates", [])}
    table = ["<tr><th>step</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
             + "<th>eligible</th><th>why not</th></tr>"]
    for c in cands:
        sel = rows.get(c["step"], {})
        style = ' style="font-weight:bold;background:#e6f4ea"' if c["step"] == best_step else ""
        table.append(
            f"<tr{style}><td>{c['step']}{' (selected)' if c['step'] == best_step else ''}</td>"
            + "".join(f"<td>{_cell(c.get(col))}</td>" for col in columns)
            + f"<td>{_cell(sel.get('eligible', '-'))}</td><td>{_cell('; '.join(sel.get('failed', [])))}</td></tr>"
        )
    title = f"sftc run {run_dir.name}"
    why = (best or {}).get("why", "no checkpoint selected yet")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>bundle <code>{html.escape(lock.bundle_id if lock else '-')}</code>,
parameterization <code>{html.escape(lock.spec.parameterization.kind if lock else '-')}</code></p>
<h2>Selected checkpoint</h2><p>{html.escape(why)}</p>
<table>{''.join(table)}</table>
<h2>Held-out behaviour</h2><img src="behaviour.png" alt="behaviour metrics per checkpoint">
<h2>Loss</h2><img src="loss.png" alt="train and held-out loss">
<h2>Supervised tokens per update</h2><img src="tokens.png" alt="supervised tokens per update">
</body></html>
"""
    report = out / "report.html"
    atomic_write_text(report, page)
    return report
