"""Pass 2: read rows and account for every one of them.

Each input row ends in exactly one place: accepted (later train or eval) or rejected with its
file, 1-based line (.jsonl) or row (.json, .parquet, datasets) number and reason. A row with no
answer is not "missing metadata", it is a training example with nothing to teach, so it is
rejected, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from sftc.errors import DataError, SftcError
from sftc.io import sha256_file

ROLES = ("system", "user", "assistant")


class Example:
    """One accepted row, in the shape its format needs.

    `row` is the 0-based index of the row among its file's rows (blank .jsonl lines not counted):
    it feeds `ref`, the internal key that seeded choices hash (data.sources weights), so it must
    not change. What users see is `at` (1-based: the physical .jsonl line, blank lines counted,
    else the row index + 1) in `where`.

    The row's content (its fields, and messages or text) can live on disk while a compile runs
    (`spill`, compiler/store.RowStore): a compile of millions of rows then holds a few hundred
    bytes per row instead of every row's text two or three times over (issue 17). Slots, not a
    dataclass __dict__, for the same reason.
    """

    __slots__ = ("file", "row", "group", "source", "at", "unit", "_content", "_store")

    def __init__(self, file: str, row: int, group: str, fields: dict[str, Any] | None,
                 messages: list[dict[str, str]] | None = None, text: str | None = None, source: int | None = None,
                 at: int = 0, unit: str = "row"):
        self.file, self.row, self.group = file, row, group
        self.source = source  # index in data.sources (None for data.files): its mixing weight
        self.at = at  # 1-based line (.jsonl) or row (others), as an editor counts
        self.unit = unit  # "line" for .jsonl, "row" for .json, .parquet and datasets
        # fields: the row as read; messages: prompt_completion rows become [user, assistant]; text: text rows
        self._content = (fields, messages, text)
        self._store = None

    def spill(self, store) -> None:
        """Move the content to `store` (a RowStore); it is read back on each access."""
        if self._store is None:
            self._content, self._store = store.put(self._content), store

    def detached(self) -> "Example":
        """A copy that holds its content (sent to another machine: a Ray task, compiler/workers.py)."""
        fields, messages, text = self.content
        return Example(self.file, self.row, self.group, fields, messages, text, self.source, self.at, self.unit)

    @property
    def content(self) -> tuple:
        return self._content if self._store is None else self._store.get(self._content)

    @property
    def fields(self) -> dict[str, Any] | None:
        return self.content[0]

    @property
    def messages(self) -> list[dict[str, str]] | None:
        return self.content[1]

    @property
    def text(self) -> str | None:
        return self.content[2]

    def __repr__(self) -> str:
        return f"Example({self.where!r}, group={self.group!r})"

    @property
    def ref(self) -> str:
        """Internal key (0-based row index) hashed by seeded choices; never shown to users."""
        return f"{self.file}:{self.row}"

    @property
    def where(self) -> str:
        return where(self.file, self.at, self.unit)


def where(file: str, at: int, unit: str) -> str:
    """A row as users look it up: `file:line` for .jsonl (an editor's go-to-line, `sed -n Np`), `file row N` else."""
    return f"{file}:{at}" if unit == "line" else f"{file} row {at}"


@dataclass
class Reject:
    file: str
    row: int  # 0-based row index (internal order), as Example.row
    reason: str
    detail: str
    at: int | None = None  # 1-based, as Example.at; default row + 1
    unit: str = "row"

    def __post_init__(self):
        if self.at is None:
            self.at = self.row + 1

    @classmethod
    def of(cls, example: Example, reason: str, detail: str) -> "Reject":
        return cls(example.file, example.row, reason, detail, example.at, example.unit)

    @property
    def where(self) -> str:
        return where(self.file, self.at, self.unit)

    def as_dict(self) -> dict:
        # one position key: "line" (1-based physical line) for .jsonl, "row" (1-based) for the rest
        return {"file": self.file, self.unit: self.at, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class DataInput:
    """One input of a compile: a data file, or a directory written by datasets' save_to_disk.

    A hub dataset id becomes one input per data file of its cached snapshot (`repo`, `revision`
    set; read like any data file)."""

    path: Path
    display: str
    source: int | None = None  # index in data.sources; None for data.files
    dataset: bool = False
    split: str | None = None
    repo: str | None = None  # hub dataset id, for a file of a cached hub snapshot
    revision: str | None = None  # the snapshot's commit

    def __iter__(self):
        # unpacks as the (path, display) pair that callers used before data.sources existed
        return iter((self.path, self.display))


def resolve_data_inputs(data_spec, resolve, display) -> tuple[list[DataInput], list[str]]:
    """Every file or dataset a spec's data section names, resolved; plus what is missing.

    `resolve(value, key)` applies the spec's path policy, `display(path)` makes the path the lock records.
    """
    inputs, problems = [], []
    if data_spec.sources is None:
        for i, name in enumerate(data_spec.files):
            path = resolve(name, f"data.files[{i}]")
            if not path.is_file():
                problems.append(f"data.files[{i}]: {name}: file not found")
            inputs.append(DataInput(path, display(path)))
        return inputs, problems
    for s, source in enumerate(data_spec.sources):
        if source.dataset is not None:
            key = f"data.sources[{s}].dataset"
            path = resolve(source.dataset, key)
            from sftc.compiler.template import is_hub_id

            if not path.exists() and is_hub_id(source.dataset):
                try:
                    inputs.extend(hub_dataset_inputs(source.dataset, getattr(source, "revision", None), key, s,
                                                     source.split))
                except SftcError as exc:
                    problems.append(str(exc))
                continue
            if getattr(source, "revision", None) is not None:
                problems.append(f"data.sources[{s}].revision: applies to a hub dataset id; {source.dataset} is a "
                                "directory in the project")
            if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
                problems.append(f"{key}: {source.dataset}: not a dataset saved with save_to_disk "
                                "(no state.json or dataset_dict.json)")
            inputs.append(DataInput(path, display(path), s, dataset=True, split=source.split))
            continue
        for i, name in enumerate(source.files):
            path = resolve(name, f"data.sources[{s}].files[{i}]")
            if not path.is_file():
                problems.append(f"data.sources[{s}].files[{i}]: {name}: file not found")
            inputs.append(DataInput(path, display(path), s))
    return inputs, problems


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")


def _in_split(rel: PurePosixPath, split: str) -> bool:
    """A hub dataset file belongs to a split named by a folder (`test/0.parquet`) or its file name's
    start (`data/train-00000-of-00001.parquet`, `train.jsonl`), as the hub's default layout names them."""
    return split in rel.parts[:-1] or re.match(rf"{re.escape(split)}(?:[-_.0-9]|$)", rel.name) is not None


def hub_dataset_inputs(repo_id: str, revision: str | None, key: str, source: int, split: str | None) -> list[DataInput]:
    """The data files (.parquet, .jsonl, .json; sorted) of a hub dataset's snapshot in the local
    Hugging Face cache, each an input read like a project file. Never downloads: the one resolver
    of hub ids (compiler/template.py local_dir) asks the cache only."""
    from sftc.compiler.template import local_dir

    snapshot = local_dir(repo_id, revision, key, repo_type="dataset")
    commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
    files = sorted(
        PurePosixPath(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob("*")
        if p.suffix.lower() in DATA_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(snapshot).parts)
        and not p.name.startswith("dataset_info")  # the hub's metadata, not rows
    )
    at = f"{repo_id}@{commit}"
    if not files:
        raise DataError(f"{key}: {at} has no data file ({', '.join(DATA_SUFFIXES)}) in the local cache snapshot")
    if split is not None:
        chosen = [f for f in files if _in_split(f, split)]
        if not chosen:
            listed = ", ".join(map(str, files[:10])) + (f", ... ({len(files)} files)" if len(files) > 10 else "")
            raise DataError(f"data.sources[{source}].split: no file of {at} belongs to split {split!r} "
                            f"(a folder or file name starting with it); files: {listed}")
        files = chosen
    else:
        # with no split named, only train files (or files of no named split) are read as training
        # rows: a lone test.jsonl beside data.jsonl must not end up in training either
        held_out = [name for name in _SPLIT_NAMES if name != "train" and any(_in_split(f, name) for f in files)]
        if held_out:
            raise DataError(f"data.sources[{source}].split: {at} holds files of the split(s) {held_out}; no split given "
                            "(set split, e.g. split: train, so eval or test rows do not end up in training)")
    return [DataInput(snapshot / rel, f"hf://datasets/{repo_id}/{rel}", source, repo=repo_id, revision=commit)
            for rel in files]


def dataset_sha256(path: Path) -> str:
    """One hash over a saved dataset's files (Arrow shards, state.json, dataset_info.json).

    datasets' own `_fingerprint` is recorded too, but it is derived from the transforms that made
    the dataset, not its bytes: two saves with the same fingerprint can hold different rows.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + sha256_file(file).encode() + b"\0")
    return digest.hexdigest()


def input_sha256(item: DataInput) -> str:
    return dataset_sha256(item.path) if isinstance(item, DataInput) and item.dataset else sha256_file(item.path)


def data_hashes(inputs: list[DataInput]) -> list[dict]:
    """What the bundle hash covers of the data: each input's display path and content hash."""
    return [{"path": item.display, "sha256": input_sha256(item)} for item in inputs]


def _iter_dataset_rows(item: DataInput) -> tuple[Iterator[tuple[int, int, Any, str | None]], dict]:
    """Rows of a save_to_disk dataset (load_from_disk: memory-mapped Arrow), and what identifies it."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(item.path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid ... for a bad directory
        raise DataError(f"{item.display}: cannot load the dataset ({exc.__class__.__name__}: {str(exc)[:300]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if item.split is None and len(names) == 1:
            split = names[0]
        elif item.split in loaded:
            split = item.split
        else:
            found = f"found {item.split!r}" if item.split else "no split given"
            raise DataError(f"data.sources[{item.source}].split: {item.display} holds splits {names}; {found}")
        loaded = loaded[split]
    elif item.split is not None:
        raise DataError(f"data.sources[{item.source}].split: {item.display} is a single Dataset, it has no splits; "
                        "remove split")
    else:
        split = None
    identity = {"fingerprint": loaded._fingerprint, "split": split}
    return ((i, i + 1, row, None) for i, row in enumerate(loaded)), identity


@dataclass
class DataResult:
    examples: list[Example]
    rejects: list[Reject]
    files: list[dict] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.examples) + len(self.rejects)


def iter_rows(path: Path, display: str, digest=None) -> Iterator[tuple[int, int, Any, str | None]]:
    """Yield (row index, position, row or None, problem or None).

    The row index starts at 0 and skips blank .jsonl lines (the internal order); the position is
    what users look up: the 1-based physical line of a .jsonl file (blank lines counted), else the
    1-based row. Positions are "line"s for .jsonl (`row_unit`) and "row"s otherwise.

    jsonl is decoded line by line so one bad line (bad encoding, malformed JSON, a null byte)
    costs one reject, not the whole file. `digest` (a hashlib object) is fed every byte read, so
    the manifest records the sha256 of the bytes that became rows, not of whatever the path
    holds afterwards (a file replaced during a compile would otherwise be recorded as its new self).
    """
    suffix = path.suffix.lower()
    if digest is None:
        digest = hashlib.sha256()
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            number = -1
            for at, raw in enumerate(handle, start=1):
                digest.update(raw)
                if not raw.strip():
                    continue  # blank lines are layout, not rows (but they count as lines)
                number += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, at, None, f"bad_encoding: not UTF-8 at byte {exc.start}"
                    continue
                try:
                    yield number, at, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield number, at, None, f"malformed_json: {exc.msg} at column {exc.colno}"
                except RecursionError:
                    yield number, at, None, "malformed_json: nested too deeply"
                except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
                    yield number, at, None, f"malformed_json: {str(exc)[:200]}"
    elif suffix == ".json":
        try:
            raw_bytes = path.read_bytes()
            digest.update(raw_bytes)
            data = json.loads(raw_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, 4300-digit ints
            raise DataError(f"{display}: not a valid UTF-8 JSON file ({str(exc)[:300]})") from None
        except RecursionError:
            raise DataError(f"{display}: not a valid JSON file for sftc (nested too deeply)") from None
        if not isinstance(data, list):
            raise DataError(f"{display}: a .json data file must hold a list of rows, found {type(data).__name__}")
        yield from ((i, i + 1, row, None) for i, row in enumerate(data))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        raw_bytes = path.read_bytes()
        digest.update(raw_bytes)
        try:
            table = pq.read_table(pa.BufferReader(raw_bytes))
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{display}: cannot read parquet ({exc.__class__.__name__}: {exc})") from None
        yield from ((i, i + 1, row, None) for i, row in enumerate(table.to_pylist()))
    else:
        raise DataError(f"{display}: unsupported data file type {suffix!r}; allowed: .jsonl, .json, .parquet")


def row_unit(path: Path, item=None) -> str:
    """How a file's rows are numbered for users: "line" (.jsonl), else "row"."""
    dataset = isinstance(item, DataInput) and item.dataset
    return "line" if not dataset and Path(path).suffix.lower() == ".jsonl" else "row"


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


def _check_messages(value: Any, key: str, names=None) -> tuple[list[dict] | None, tuple[str, str] | None]:
    role_key = getattr(names, "role", None) or "role"
    content_key = getattr(names, "content", None) or "content"
    role_names = getattr(names, "roles", None)
    if not isinstance(value, list) or not value:
        return None, ("wrong_type", f"{key} must be a non-empty list of {{{role_key}, {content_key}}}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {role_key, content_key} - {"name"}:
            return None, ("wrong_type", f"{key}[{i}] must be an object with {role_key} and {content_key}")
        role, content = message.get(role_key), message.get(content_key)
        if not isinstance(role, str):  # before any lookup: a list or mapping is not even hashable
            found = "missing" if role is None else type(role).__name__
            return None, ("wrong_type", f"{key}[{i}].{role_key} is {found}, expected a string")
        if role_names is not None:
            if role not in role_names:
                return None, ("bad_role", f"{key}[{i}].{role_key} is {role!r}; data fields.roles maps {', '.join(map(repr, role_names))}")
            role = role_names[role]
        if role not in ROLES:
            return None, ("bad_role", f"{key}[{i}].{role_key} is {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            return None, ("wrong_type", f"{key}[{i}].{content_key} is {type(content).__name__}, expected a string")
        if role == "assistant" and not content.strip():
            return None, ("empty_completion", f"{key}[{i}] is an assistant turn with no content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        return None, ("ends_without_answer", f"the last message of {key} is {messages[-1]['role']!r}, not an answer")
    return messages, None


def split_transcript(text: str, markers: dict[str, str], key: str) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """A transcript such as OASST/Guanaco's '### Human: ... ### Assistant: ...' cut into messages at
    the declared markers. A trailing marker with nothing after it is the cue for the answer and dropped."""
    pattern = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
    cuts = list(pattern.finditer(text))
    if not cuts:
        return None, ("no_turns", f"{key} holds none of the turn markers {sorted(markers)}")
    if text[: cuts[0].start()].strip():
        return None, ("no_turns", f"{key} has text before its first turn marker {cuts[0].group()!r}")
    messages = []
    for i, cut in enumerate(cuts):
        end = cuts[i + 1].start() if i + 1 < len(cuts) else len(text)
        messages.append({"role": markers[cut.group()], "content": text[cut.end():end].strip()})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    for i, message in enumerate(messages):
        if not message["content"]:
            reason = "empty_completion" if message["role"] == "assistant" else "empty_prompt"
            return None, (reason, f"{key}: turn {i + 1} ({message['role']}) is empty")
    return messages, None


def validate_row(row: Any, data_spec, fmt: str, names=None) -> tuple[Example | None, tuple[str, str] | None, str]:
    """Check one row; returns (example, (reason, detail) or None, dedup key). `names` is the field
    map of the row's source (default data_spec.fields)."""
    if not isinstance(row, dict):
        return None, ("not_an_object", f"row is {type(row).__name__}, expected an object"), ""
    names = names or data_spec.fields
    needed = {"prompt_completion": [names.prompt, names.completion], "conversational": [names.messages],
              "text": [names.text]}[fmt]
    missing = sorted(k for k in [names.group, *needed] if k not in row or row[k] is None)
    if missing:
        # the fields the row does have: a wrong field name in the spec is then one look away
        keys = sorted(map(str, row))
        present = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in keys[:20]) or "none"
        if len(keys) > 20:
            present += f", ... ({len(keys)} fields)"
        return None, ("missing_field", f"missing {missing}; the row has: {present}"), ""
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
        if names.turn_markers:
            turns, problem = split_transcript(prompt, names.turn_markers, names.prompt)
            if problem:
                return None, problem, ""
            messages = [*turns, {"role": "assistant", "content": completion}]
            return Example("", 0, group, row, messages=messages), None, json.dumps(messages)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        key = json.dumps([prompt, completion])
        return Example("", 0, group, row, messages=messages), None, key
    if fmt == "conversational":
        messages, problem = _check_messages(row[names.messages], names.messages, names)
        if problem:
            return None, problem, ""
        return Example("", 0, group, row, messages=messages), None, json.dumps(messages)
    text, problem = _text_field(row, names.text)
    if problem:
        return None, ("wrong_type", problem), ""
    if not text.strip():
        return None, ("empty_text", f"{names.text} is empty"), ""
    return Example("", 0, group, row, text=text), None, text


def read_data(files: list, data_spec, rows_store=None) -> DataResult:
    """Read and validate every row of every input; exact duplicates of an accepted row are rejected.

    `files`: DataInputs (or (path, display) pairs). A source's own format and field map apply to its rows.
    With `rows_store` (compiler/store.RowStore), each accepted row's content goes there as it is read.
    """
    result = DataResult([], [])
    # an accepted row by the sha256 of its content: the duplicate check holds 32 bytes a row, not its text
    first_seen: dict[bytes, Example] = {}
    for item in files:
        item = item if isinstance(item, DataInput) else DataInput(*item)
        path, display = item.path, item.display
        source = data_spec.sources[item.source] if item.source is not None else None
        fmt = (source.format if source else None) or data_spec.format
        names = (source.fields if source else None) or data_spec.fields
        identity = {}
        if item.dataset:
            rows_iter, identity = _iter_dataset_rows(item)
        elif not path.is_file():
            raise DataError(f"data.files: {display}: file not found")
        read_digest = None
        if not item.dataset:
            read_digest = hashlib.sha256()
            rows_iter = iter_rows(path, display, read_digest)
        reasons: Counter = Counter()
        accepted = 0
        rows = 0
        unit = row_unit(path, item)
        for number, at, row, problem in rows_iter:
            rows += 1
            if problem:
                reason, _, detail = problem.partition(": ")
                result.rejects.append(Reject(display, number, reason, detail, at, unit))
                reasons[reason] += 1
                continue
            bad = lone_surrogate(row)
            if bad is not None:
                result.rejects.append(Reject(display, number, "bad_encoding", f"lone UTF-16 surrogate in {bad}",
                                             at, unit))
                reasons["bad_encoding"] += 1
                continue
            example, rejected, key = validate_row(row, data_spec, fmt, names)
            if rejected is None:
                key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
                if key in first_seen:
                    rejected = ("duplicate", f"same content as {first_seen[key].where}")
            if rejected:
                result.rejects.append(Reject(display, number, *rejected, at, unit))
                reasons[rejected[0]] += 1
                continue
            example.file, example.row, example.source = display, number, item.source
            example.at, example.unit = at, unit
            # one string per group, not one per row (most groups hold several rows): issue 17 memory
            example.group = sys.intern(example.group)
            first_seen[key] = example
            if rows_store is not None:
                example.spill(rows_store)
            result.examples.append(example)
            accepted += 1
        entry = {
            "path": display, "sha256": read_digest.hexdigest() if read_digest is not None else input_sha256(item),
            "rows_read": rows, "accepted": accepted,
            "rejected": dict(sorted(reasons.items())),
        }
        if item.source is not None:  # only with data.sources, so data.files manifests keep their bytes
            entry.update({"source": item.source, "weight": source.weight, "format": fmt})
        if item.dataset:
            entry.update(identity)
        if item.repo is not None:  # a file of a cached hub dataset: which repo, at which commit
            entry.update({"repo": item.repo, "revision": item.revision})
        result.files.append(entry)
    return result


def weigh_sources(examples: list[Example], data_spec, seed: int):
    """Apply data.sources weights to the tokenized train examples: (the examples' indices, each
    repeated as often as it is used, or None for all once; the record or None).

    A weight w repeats every example floor(w) times and adds a seeded choice of round(frac(w) * n)
    more (w < 1 keeps that many, none repeated), so a mixture is reproducible from the spec alone
    and eval is never reweighted. Examples keep their order; packing shuffles them later.
    """
    if data_spec.sources is None:
        return None, None
    by_source: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_source.setdefault(example.source, []).append(index)
    copies = [1] * len(examples)
    record = []
    for s, source in enumerate(data_spec.sources):
        members = by_source.get(s, [])
        whole, fraction = divmod(source.weight, 1.0)
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{s}:{examples[i].ref}".encode()).digest())
        extra = set(ranked[: int(math.floor(fraction * len(members) + 0.5))])
        for i in members:
            copies[i] = int(whole) + (1 if i in extra else 0)
        record.append({"source": s, "weight": source.weight, "train_examples": len(members),
                       "used": sum(copies[i] for i in members)})
    if not any(copies):
        raise DataError(f"data.sources: the weights {[s.weight for s in data_spec.sources]} leave no train example")
    return np.repeat(np.arange(len(examples), dtype=np.int64), copies), record
