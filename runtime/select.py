"""Choose the checkpoint to ship by the spec's rule: constraints, then the product metric, then
tie-breaks. Loss is only ever a tie-break unless the spec says otherwise.

The result (written to best.json) keeps every candidate with the reasons it was or was not
eligible, and a sentence saying why the winner won, so a reviewer does not have to redo it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sftc.io import atomic_write_json

# Rates are ratios of small integers; two of them that print the same are the same.
_DIGITS = 9
_CONSTRAINT = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?[0-9.eE+-]+)\s*$")
# The seed document and older specs say val_loss for what the runtime logs as eval_loss.
_ALIASES = {"val_loss": "eval_loss", "eval_loss": "val_loss"}


def parse_constraint(text: str) -> tuple[str, float]:
    match = _CONSTRAINT.match(str(text))
    if not match:
        raise ValueError(f"constraint {text!r}: expected '<op> <number>' with op one of >=, <=, >, <, ==")
    return match.group(1), float(match.group(2))


def _value(candidate: dict, metric: str) -> float | None:
    value = candidate.get(metric)
    if value is None and metric in _ALIASES:
        value = candidate.get(_ALIASES[metric])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), _DIGITS)


def _meets(value: float, op: str, bound: float) -> bool:
    bound = round(bound, _DIGITS)
    return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound,
            "==": value == bound}[op]


def _num(value: Any) -> str:
    return "missing" if value is None else f"{value:.6g}"


def normalize_rule(select_spec: dict) -> dict:
    """The rule as best.json records it: tie_break as a list of {minimize|maximize: metric}."""
    tie_break = select_spec.get("tie_break")
    if tie_break is None:
        tie_break = [{"minimize": "eval_loss"}]
    elif isinstance(tie_break, dict):
        tie_break = [tie_break]
    clean = []
    for entry in tie_break:
        entry = {k: v for k, v in dict(entry).items() if v is not None}
        if len(entry) != 1 or next(iter(entry)) not in ("minimize", "maximize"):
            raise ValueError(f"tie_break entry {entry!r}: give exactly one of minimize or maximize")
        clean.append(entry)
    require = dict(select_spec.get("require") or {})
    for metric, text in require.items():
        parse_constraint(text)
    return {
        "require": require,
        "maximize": select_spec.get("maximize"),
        "tie_break": clean,
        "export_if_none_eligible": bool(select_spec.get("export_if_none_eligible", False)),
    }


def _objectives(rule: dict) -> list[tuple[str, str]]:
    objectives = [(rule["maximize"], "maximize")] if rule["maximize"] else []
    for entry in rule["tie_break"]:
        (direction, metric), = entry.items()
        objectives.append((metric, direction))
    return objectives


def _order_key(candidate: dict, objectives: list[tuple[str, str]]) -> tuple:
    key: list = []
    for metric, direction in objectives:
        value = _value(candidate, metric)
        # A missing value sorts after every present one, whatever the direction.
        key.append((1, 0.0) if value is None else (0, -value if direction == "maximize" else value))
    # All equal: the earliest step, the least trained of equals.
    key.append(int(candidate["step"]))
    return tuple(key)


def _failures(candidate: dict, rule: dict) -> list[str]:
    failed = []
    for metric, text in rule["require"].items():
        op, bound = parse_constraint(text)
        value = _value(candidate, metric)
        if value is None:
            failed.append(f"{metric} missing (required {op} {bound:g})")
        elif not _meets(value, op, bound):
            failed.append(f"{metric} {_num(value)} fails {op} {bound:g}")
    if rule["maximize"] and _value(candidate, rule["maximize"]) is None:
        failed.append(f"{rule['maximize']} missing (the metric to maximize)")
    return failed


def _decision(winner: dict, pool: list[dict], objectives: list[tuple[str, str]]) -> str:
    """Which objective separated the winner from the rest of `pool`, in words."""
    if len(pool) == 1:
        return "the only eligible checkpoint"
    if not objectives:
        return "the earliest step (the rule names no metric to order by)"
    first_metric, first_dir = objectives[0]
    first_word = "highest" if first_dir == "maximize" else "lowest"
    tied_steps: list[int] = []
    remaining = pool
    for k, (metric, direction) in enumerate(objectives):
        win_value = _value(winner, metric)
        tied = [c for c in remaining if _value(c, metric) == win_value]
        others = [c for c in remaining if c is not winner and c not in tied]
        if len(tied) == 1:
            best_other = min(others, key=lambda c: _order_key(c, objectives[k:]))
            word = "higher" if direction == "maximize" else "lower"
            if k == 0:
                return (f"{first_word} {metric} ({_num(win_value)}; next best step {best_other['step']}: "
                        f"{_num(_value(best_other, metric))})")
            tied_steps = sorted(c["step"] for c in pool if c is not winner
                                and _value(c, first_metric) == _value(winner, first_metric))
            return (f"{first_word} {first_metric} ({_num(_value(winner, first_metric))}), tied with step(s) "
                    f"{', '.join(map(str, tied_steps))}; tie broken by {word} {metric} "
                    f"({_num(win_value)} vs {_num(_value(best_other, metric))} at step {best_other['step']})")
        remaining = tied
    steps = sorted(c["step"] for c in remaining if c is not winner)
    return (f"tied on every objective with step(s) {', '.join(map(str, steps))}; the earliest step wins")


def select_best(candidates: list[dict], select_spec: dict) -> dict:
    """Apply the selection rule to evaluated checkpoints.

    candidates: `{"step": int, "eval_loss": float, "<metric>": float, ...}`.
    select_spec: the spec's `select` section as a dict.
    Returns `{"best_step", "fallback_step", "export_step", "lowest_loss_step", "rule", "candidates", "why"}`;
    `best_step` is None when no candidate meets the constraints, and `fallback_step` is then the
    best ineligible one by the same ordering (exported only if the rule or the user allows it).
    """
    rule = normalize_rule(select_spec)
    objectives = _objectives(rule)
    rows = []
    for cand in sorted(candidates, key=lambda c: int(c["step"])):
        failed = _failures(cand, rule)
        rows.append({**{k: v for k, v in cand.items()}, "step": int(cand["step"]), "eligible": not failed,
                     "failed": failed})
    ranked = sorted(rows, key=lambda c: (not c["eligible"], _order_key(c, objectives)))
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    eligible = [r for r in ranked if r["eligible"]]
    loss_known = [r for r in rows if _value(r, "eval_loss") is not None]
    lowest_loss = min(loss_known, key=lambda r: (_value(r, "eval_loss"), r["step"])) if loss_known else None

    result: dict[str, Any] = {
        "best_step": None, "fallback_step": None, "export_step": None,
        "lowest_loss_step": lowest_loss["step"] if lowest_loss else None,
        "rule": rule, "candidates": rows, "why": "",
    }
    if not rows:
        result["why"] = "No checkpoint has been evaluated, so none can be selected."
        return result

    excluded = [f"step {r['step']} ({'; '.join(r['failed'])})" for r in rows if not r["eligible"]]
    if eligible:
        winner = eligible[0]
        result["best_step"] = result["export_step"] = winner["step"]
        why = f"Step {winner['step']} selected: {_decision(winner, eligible, objectives)}."
        if rule["require"]:
            reqs = " and ".join(f"{m} {t.strip()}" for m, t in rule["require"].items())
            why += f" {len(eligible)} of {len(rows)} checkpoints meet {reqs}."
        if excluded:
            why += " Excluded: " + "; ".join(excluded) + "."
        if lowest_loss and lowest_loss["step"] != winner["step"]:
            contrast = ""
            if rule["maximize"]:
                contrast = (f": its {rule['maximize']} is {_num(_value(lowest_loss, rule['maximize']))} vs "
                            f"{_num(_value(winner, rule['maximize']))}")
            if not lowest_loss["eligible"]:
                contrast += " (and it is ineligible)" if contrast else ": it is ineligible"
            why += (f" The lowest eval_loss ({_num(_value(lowest_loss, 'eval_loss'))}) is at step "
                    f"{lowest_loss['step']}, not selected{contrast}.")
        result["why"] = why
        return result

    fallback = ranked[0]
    result["fallback_step"] = fallback["step"]
    why = f"No checkpoint meets the requirements: {'; '.join(excluded)}."
    why += f" The best ineligible checkpoint by the same ordering is step {fallback['step']};"
    if rule["export_if_none_eligible"]:
        result["export_step"] = fallback["step"]
        why += " it is exported anyway because export_if_none_eligible is true."
    else:
        why += " nothing is exported unless select.export_if_none_eligible is true or export is forced."
    result["why"] = why
    return result


def select_run(run_dir, select_spec: dict | None = None, write: bool = True) -> dict:
    """Select among a run's evaluated checkpoints (metrics.jsonl) by its bundle's rule, and write
    best.json. Steps whose checkpoint no longer exists stay candidates (they were evaluated), so if
    rotation ever removed the winner, export fails loudly instead of shipping the runner-up."""
    from sftc.runtime.rundir import candidates as run_candidates
    from sftc.runtime.rundir import read_lock

    run_dir = Path(run_dir)
    lock = read_lock(run_dir) if select_spec is None else None
    if select_spec is None:
        select_spec = lock.spec.select.model_dump(mode="json")
    result = select_best(run_candidates(run_dir), select_spec)
    for row in result["candidates"]:
        row["checkpoint"] = f"checkpoints/checkpoint-{row['step']}"
    if lock is not None:
        result["bundle_id"] = lock.bundle_id
    if write:
        atomic_write_json(run_dir / "best.json", result)
    return result

