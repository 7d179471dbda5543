"""The one strict YAML loader, for every YAML file a person writes (specs, rules files).

PyYAML's safe_load is the base (no tags, no Python objects). On top of it, every way a few bytes
of YAML can turn into a traceback or a hang downstream is refused with a message naming the file
and line:

- size: more than `max_bytes` of text is refused before parsing;
- depth: the composer recurses once per nesting level (5,000 `[` is a RecursionError), so the
  event stream, which PyYAML parses without recursion, is checked for depth first;
- expansion: aliases can make a few lines stand for billions of values ("billion laughs"), which
  a validator would walk; the constructed value is counted with a cap;
- keys: duplicate keys are an error instead of last-one-wins, and keys must be strings (`? [a, b]`
  is unhashable, `1:` or `on:` are not names of anything in a spec or a rules file);
- encoding: bytes that are not UTF-8 are refused with the line of the first bad byte.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sftc.errors import SftcError, SpecError

MAX_BYTES = 1 << 20  # a spec or rules file is a few KiB; 1 MiB leaves room for long regexes and schemas
MAX_DEPTH = 64
MAX_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """safe_load with duplicate and non-string keys refused."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            if isinstance(key_node, yaml.SequenceNode):
                found = "a list key"  # unhashable: `key in seen` would be a bare TypeError
            elif isinstance(key_node, yaml.MappingNode):
                found = "a mapping key"
            else:
                found = f"a {type(key).__name__ if key is not None else 'null'} key ({_short(key)})"
            raise yaml.constructor.ConstructorError(
                None, None, f"found {found}; keys must be plain strings (quote them)", key_node.start_mark,
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _where(mark) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""


def _check_depth(text: str, source: str, what: str, error: type[SftcError]) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise error(f"{source}:{_where(event.start_mark)} the {what} is nested more than {MAX_DEPTH} "
                            "levels deep; refused")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_expansion(value: Any, source: str, what: str, error: type[SftcError]) -> None:
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise error(f"{source}: the {what} expands to more than {MAX_VALUES} values (YAML aliases?); refused")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_yaml_text(text: str, source: str, what: str = "spec", error: type[SftcError] = SpecError,
                   max_bytes: int = MAX_BYTES) -> Any:
    """Parse `text` (the content of `source`) under every guard above; bad input raises `error`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise error(f"{source}: the {what} is {size} bytes; at most {max_bytes} are read (is it the right file?)")
    try:
        _check_depth(text, source, what, error)
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}:{_where(mark)} not valid YAML for a {what}: {problem} (plain YAML only, no tags)") from None
    except RecursionError:  # the depth check makes this unreachable for nesting; kept as the last guard
        raise error(f"{source}: not valid YAML for a {what}: nested too deeply") from None
    _check_expansion(value, source, what, error)
    return value


def decode_utf8(data: bytes, source: str, what: str, error: type[SftcError]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{source}: line {line}: the {what} is not UTF-8 text (byte {exc.start}: "
                    f"{data[exc.start:exc.start + 1]!r})") from None


def read_text_file(path: str | os.PathLike, what: str = "spec file", error: type[SftcError] = SpecError,
                   max_bytes: int = MAX_BYTES) -> tuple[str, bytes]:
    """(UTF-8 text, raw bytes) of a file a person wrote; the bytes are what a caller hashes."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the read or never end
            raise error(f"{path}: the {what} is not a regular file")
        size = info.st_size
        if size > max_bytes:
            raise error(f"{path}: the {what} is {size} bytes; at most {max_bytes} are read (is it the right file?)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what}") from None
    except PermissionError:
        raise error(f"{path}: the {what} cannot be read (permission denied)") from None
    return decode_utf8(data, str(path), what, error), data


def read_yaml_file(path: str | os.PathLike, what: str = "spec file", error: type[SftcError] = SpecError,
                   max_bytes: int = MAX_BYTES) -> Any:
    text, _ = read_text_file(path, what, error, max_bytes)
    return load_yaml_text(text, str(path), what.removesuffix(" file"), error, max_bytes)
