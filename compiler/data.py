"""Pass 2: read rows and account for every one of them.

Each input row ends in exactly one place: accepted (later train or eval) or rejected with its
file, row number and reason. A row with no answer is not "missing metadata", it is a training
example with nothing to teach, so it is rejected, never silently dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sftc.errors import DataError
from sftc.io import sha256_file

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One accepted row, in the shape its format needs."""

    file: str
    row: int
    group: str
    fields: dict[str, Any]
    messages: list[dict[str, str]] | None = None  # prompt_completion rows become [user, assistant]
    text: str | None = None  # text rows (continued pretraining)

    @property
    def ref(self) -> str:
        return f"{self.file}:{self.row}"


@dataclass
class Reject:
    file: str
    row: int
    reason: str
    detail: str

    def as_dict(self) -> dict:
        return {"file": self.file, "row": self.row, "reason": self.reason, "detail": self.detail}


@dataclass
class DataResult:
    examples: list[Example]
    rejects: list[Reject]
    files: list[dict] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.examples) + len(self.rejects)


def iter_rows(path: Path, display: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row number, row or None, problem or None); row numbers start at 0.

    jsonl is decoded line by line so one bad line (bad encoding, malformed JSON, a null byte)
    costs one reject, not the whole file.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            number = -1
            for raw in handle:
                if not raw.strip():
                    continue  # blank lines are layout, not rows
                number += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, None, f"bad_encoding: not UTF-8 at byte {exc.start}"
                    continue
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield number, None, f"malformed_json: {exc.msg} at column {exc.colno}"
                except RecursionError:
                    yield number, None, "malformed_json: nested too deeply"
                except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
                    yield number, None, f"malformed_json: {str(exc)[:200]}"
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, 4300-digit ints
            raise DataError(f"{display}: not a valid UTF-8 JSON file ({str(exc)[:300]})") from None
        except RecursionError:
            raise DataError(f"{display}: not a valid JSON file for sftc (nested too deeply)") from None
        if not isinstance(data, list):
            raise DataError(f"{display}: a .json data file must hold a list of rows, found {type(data).__name__}")
        yield from ((i, row, None) for i, row in enumerate(data))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{display}: cannot read parquet ({exc.__class__.__name__}: {exc})") from None
        yield from ((i, row, None) for i, row in enumerate(table.to_pylist()))
    else:
        raise DataError(f"{display}: unsupported data file type {suffix!r}; allowed: .jsonl, .json, .parquet")


def lone_surrogate(row: Any) -> str | None:
    """Where a row holds a lone UTF-16 surrogate ("\\ud800" is valid JSON but not text), or None.

    Such a string cannot be tokenized (the tokenizer raises TypeError) nor written as UTF-8 into
    the bundle, so the row is a bad_encoding reject instead of a crash halfway through compile.
    """
    stack = [("row", row)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{where} at character {exc.start}"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{where} key", key))
                stack.append((f"{where}.{key}" if isinstance(key, str) and lone_surrogate(key) is None else f"{where}.?", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def _text_field(row: dict, key: str) -> tuple[str | None, str | None]:
    """(value, problem) for a required string field."""
    if key not in row or row[key] is None:
        return None, "missing"
    value = row[key]
    if not isinstance(value, str):
        return None, f"wrong_type: {key} is {type(value).__name__}, expected a string"
    return value, None


def _group_key(row: dict, key: str) -> tuple[str | None, str | None]:
    if key not in row or row[key] is None or row[key] == "":
        return None, "missing"
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"wrong_type: {key} is {type(value).__name__}, expected a string or integer"
    return str(value), None


def _check_messages(value: Any, key: str) -> tuple[list[dict] | None, tuple[str, str] | None]:
    if not isinstance(value, list) or not value:
        return None, ("wrong_type", f"{key} must be a non-empty list of {{role, content}}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - {"name"}:
            return None, ("wrong_type", f"{key}[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return None, ("bad_role", f"{key}[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            return None, ("wrong_type", f"{key}[{i}].content is {type(content).__name__}, expected a string")
        if role == "assistant" and not content.strip():
            return None, ("empty_completion", f"{key}[{i}] is an assistant turn with no content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        return None, ("ends_without_answer", f"the last message of {key} is {messages[-1]['role']!r}, not an answer")
    return messages, None


def validate_row(row: Any, data_spec, fmt: str) -> tuple[Example | None, tuple[str, str] | None, str]:
    """Check one row; returns (example, (reason, detail) or None, dedup key)."""
    if not isinstance(row, dict):
        return None, ("not_an_object", f"row is {type(row).__name__}, expected an object"), ""
    names = data_spec.fields
    needed = {"prompt_completion": [names.prompt, names.completion], "conversational": [names.messages],
              "text": [names.text]}[fmt]
    missing = sorted(k for k in [names.group, *needed] if k not in row or row[k] is None)
    if missing:
        return None, ("missing_field", f"missing {missing}"), ""
    group, problem = _group_key(row, names.group)
    if problem:
        return None, ("missing_field" if problem == "missing" else "wrong_type", f"{names.group}: {problem}"), ""
    if fmt == "prompt_completion":
        prompt, p1 = _text_field(row, names.prompt)
        completion, p2 = _text_field(row, names.completion)
        if p1 or p2:
            return None, ("wrong_type", p1 or p2), ""
        if not completion.strip():
            return None, ("empty_completion", f"{names.completion} is empty"), ""
        if not prompt.strip():
            return None, ("empty_prompt", f"{names.prompt} is empty"), ""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        key = json.dumps([prompt, completion])
        return Example("", 0, group, row, messages=messages), None, key
    if fmt == "conversational":
        messages, problem = _check_messages(row[names.messages], names.messages)
        if problem:
            return None, problem, ""
        return Example("", 0, group, row, messages=messages), None, json.dumps(messages)
    text, problem = _text_field(row, names.text)
    if problem:
        return None, ("wrong_type", problem), ""
    if not text.strip():
        return None, ("empty_text", f"{names.text} is empty"), ""
    return Example("", 0, group, row, text=text), None, text


def read_data(files: list[tuple[Path, str]], data_spec) -> DataResult:
    """Read and validate every row of every file; exact duplicates of an accepted row are rejected."""
    result = DataResult([], [])
    first_seen: dict[str, str] = {}
    for path, display in files:
        if not path.is_file():
            raise DataError(f"data.files: {display}: file not found")
        reasons: Counter = Counter()
        accepted = 0
        rows = 0
        for number, row, problem in iter_rows(path, display):
            rows += 1
            if problem:
                reason, _, detail = problem.partition(": ")
                result.rejects.append(Reject(display, number, reason, detail))
                reasons[reason] += 1
                continue
            bad = lone_surrogate(row)
            if bad is not None:
                result.rejects.append(Reject(display, number, "bad_encoding", f"lone UTF-16 surrogate in {bad}"))
                reasons["bad_encoding"] += 1
                continue
            example, rejected, key = validate_row(row, data_spec, data_spec.format)
            if rejected is None and key in first_seen:
                rejected = ("duplicate", f"same content as {first_seen[key]}")
            if rejected:
                result.rejects.append(Reject(display, number, *rejected))
                reasons[rejected[0]] += 1
                continue
            example.file, example.row = display, number
            first_seen[key] = example.ref
            result.examples.append(example)
            accepted += 1
        result.files.append({
            "path": display, "sha256": sha256_file(path), "rows_read": rows, "accepted": accepted,
            "rejected": dict(sorted(reasons.items())),
        })
    return result
