"""Score replies by a rules file: each declared check per reply, and the metrics over rows.

Strict and deterministic: the same replies and rules always give the same metrics, because
checkpoints are selected on them.
"""

from __future__ import annotations

import json
from typing import Any

from sftc.runtime.evaluate.rules import (ContainsRowFieldCheck, JsonFieldEqualsCheck, JsonSchemaCheck, JsonValidCheck,
                                         RegexCheck, Rules, RulesError)


class _Invalid(Exception):
    pass


def _reject_constant(name: str):
    raise _Invalid(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Invalid("duplicate key")
    return dict(pairs)


def parse_json_reply(text: str) -> tuple[bool, Any]:
    """Strict JSON: whitespace around it is allowed, anything else (prose, code fences, duplicate keys,
    NaN) makes the reply invalid, because a client parsing it would fail or be misled too."""
    try:
        return True, json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, _Invalid, RecursionError):
        return False, None


_MISSING = object()


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return _MISSING
    return obj


def _json_equal(a: Any, b: Any, ignore_case: bool) -> bool:
    # bool is an int in Python; in JSON true != 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) and isinstance(b, str) and ignore_case:
        return a.casefold() == b.casefold()
    return type(a) is type(b) and a == b


def _row_value(fields: dict, name: str, check: str) -> Any:
    if name not in fields:
        shown = ", ".join(sorted(map(str, fields))) or "none"
        raise RulesError(f"check {check!r} reads row field {name!r}, which this row lacks (its fields: {shown})")
    return fields[name]


def score(reply_text: str, fields: dict, rules: Rules) -> dict[str, bool]:
    """Each declared check, passed or not, for one reply. A check that needs parsed JSON fails when
    the reply does not parse."""
    parsed_ok, parsed = parse_json_reply(reply_text) if rules.parse == "json" else (False, None)
    results: dict[str, bool] = {}
    for check in rules.spec.checks:
        target: Any = reply_text
        if getattr(check, "field", None) is not None and check.kind in ("regex", "contains_row_field"):
            target = _get_path(parsed, check.field) if parsed_ok else _MISSING
            if target is not _MISSING and not isinstance(target, str):
                target = json.dumps(target, ensure_ascii=False) if isinstance(target, (dict, list)) else str(target)
        if isinstance(check, JsonValidCheck):
            ok = parsed_ok
        elif isinstance(check, JsonSchemaCheck):
            ok = parsed_ok and rules._schema[check.name].is_valid(parsed)
        elif isinstance(check, JsonFieldEqualsCheck):
            expected = _row_value(fields, check.row_field, check.name) if check.row_field else check.value
            got = _get_path(parsed, check.field) if parsed_ok else _MISSING
            ok = got is not _MISSING and _json_equal(got, expected, check.ignore_case)
        elif isinstance(check, RegexCheck):
            if target is _MISSING:
                ok = False
            else:
                pattern = rules._regex[check.name]
                ok = bool(pattern.fullmatch(target) if check.match == "fullmatch" else pattern.search(target))
        elif isinstance(check, ContainsRowFieldCheck):
            needle = _row_value(fields, check.row_field, check.name)
            needle = needle if isinstance(needle, str) else json.dumps(needle, ensure_ascii=False)
            if target is _MISSING or needle == "":
                ok = False  # an empty needle is "contained" everywhere: never evidence of a pass
            elif check.ignore_case:
                ok = needle.casefold() in target.casefold()
            else:
                ok = needle in target
        else:  # pragma: no cover - the discriminated union admits nothing else
            raise RulesError(f"unknown check kind {check.kind!r}")
        results[check.name] = bool(ok)
    return results


def aggregate(per_row: list[dict[str, bool]], rules: Rules | None = None) -> dict[str, float | None]:
    """Declared metrics: the share of rows where every named check passed. Without rules, the pass
    rate of each check. None (not 0.0) when there are no rows: no evidence is not a failing score."""
    if rules is None:
        names = sorted({k for row in per_row for k in row})
        groups = {n: [n] for n in names}
    else:
        groups = rules.metrics
    out: dict[str, float | None] = {}
    for metric, members in groups.items():
        if not per_row:
            out[metric] = None
            continue
        passed = sum(1 for row in per_row if all(row.get(m, False) for m in members))
        out[metric] = passed / len(per_row)
    return out
