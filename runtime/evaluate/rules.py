"""The rules file: the declared checks and metrics held-out replies are scored by, and its loader.

Loss says how surprised the model is by the reference answers; it does not say whether the replies
it would actually give are valid and correct. Checkpoints are selected on the numbers this module
produces, so the rules live in a versioned file (hashed into the bundle) and scoring is strict and
deterministic: the same replies and rules always give the same metrics.

The rules file format is documented in docs/eval-rules.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftc.errors import SpecError
from sftc.io import sha256_bytes
from sftc.yaml import load_yaml_text, read_text_file

RULES_VERSION = 1
# Names the runtime itself writes next to the declared metrics; a metric may not shadow them.
RESERVED_NAMES = frozenset({"step", "kind", "eval_loss", "n_prompts", "samples", "check_pass_rates",
                            "replies_truncated", "generated_tokens", "generation_seconds"})
_NAME = r"^[a-z][a-z0-9_]{0,63}$"


class RulesError(SpecError):
    """A rules file is malformed, or does not fit the rows it is applied to."""


# --- the file format -------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _CheckBase(_Strict):
    name: str = Field(pattern=_NAME, description="Check name, used by metrics and shown per sample.")


class JsonValidCheck(_CheckBase):
    """The reply parses as JSON (no duplicate keys, no NaN/Infinity)."""

    kind: Literal["json_valid"]


class JsonSchemaCheck(_CheckBase):
    """The parsed reply validates against a JSON Schema (draft 2020-12)."""

    kind: Literal["json_schema"]
    schema_: dict = Field(alias="schema", description="The JSON Schema.")


class JsonFieldEqualsCheck(_CheckBase):
    """A field of the parsed reply equals a row field or a constant."""

    kind: Literal["json_field_equals"]
    field: str = Field(min_length=1, description="Dot path into the reply JSON, e.g. 'decision' or 'a.b.0'.")
    row_field: str | None = Field(None, description="Row field holding the expected value.")
    value: Union[str, int, float, bool, None] = Field(None, description="Constant expected value.")
    ignore_case: bool = Field(False, description="Compare strings case-insensitively.")

    @model_validator(mode="after")
    def _one_expected(self) -> "JsonFieldEqualsCheck":
        if (self.row_field is None) == ("value" not in self.model_fields_set):
            raise ValueError("give exactly one of row_field or value")
        return self


class RegexCheck(_CheckBase):
    """A regular expression matches the reply text (or one field of the parsed reply)."""

    kind: Literal["regex"]
    pattern: str = Field(description="Python regular expression.")
    field: str | None = Field(None, description="Dot path into the reply JSON; default: the whole reply text.")
    match: Literal["search", "fullmatch"] = Field("search", description="Anywhere, or the whole text.")
    ignore_case: bool = False


class ContainsRowFieldCheck(_CheckBase):
    """The reply text (or one field of the parsed reply) contains a row field's value."""

    kind: Literal["contains_row_field"]
    row_field: str = Field(description="Row field whose value must appear.")
    field: str | None = Field(None, description="Dot path into the reply JSON; default: the whole reply text.")
    ignore_case: bool = False


Check = Annotated[
    Union[JsonValidCheck, JsonSchemaCheck, JsonFieldEqualsCheck, RegexCheck, ContainsRowFieldCheck],
    Field(discriminator="kind"),
]
_JSON_KINDS = ("json_valid", "json_schema", "json_field_equals")
_KIND_NAMES = ("json_valid", "json_schema", "json_field_equals", "regex", "contains_row_field")


class RulesFile(_Strict):
    version: Literal[1] = Field(description="Format version of the rules file.")
    parse: Literal["json", "text"] = Field(description="How a reply is read before checks.")
    checks: list[Check] = Field(min_length=1)
    metrics: dict[str, list[str]] = Field(
        min_length=1, description="metric name -> checks that must all pass for a row to count."
    )


def _file_problems(rules: RulesFile) -> list[str]:
    """What pydantic cannot see: cross references, compilable patterns and schemas."""
    import jsonschema

    problems = []
    names = [c.name for c in rules.checks]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"checks: check name {dup!r} is used more than once")
    for i, check in enumerate(rules.checks):
        where = f"checks[{i}] ({check.name})"
        uses_json = check.kind in _JSON_KINDS or getattr(check, "field", None) is not None
        if uses_json and rules.parse != "json":
            problems.append(f"{where}: kind {check.kind!r} with a JSON field needs 'parse: json' (found {rules.parse!r})")
        if isinstance(check, JsonSchemaCheck):
            try:
                jsonschema.Draft202012Validator.check_schema(check.schema_)
            except jsonschema.SchemaError as exc:
                path = "/".join(str(p) for p in exc.path) or "(root)"
                problems.append(f"{where}.schema: not a valid JSON Schema at {path}: {exc.message}")
        if isinstance(check, RegexCheck):
            try:
                re.compile(check.pattern)
            except re.error as exc:
                problems.append(f"{where}.pattern: not a valid regular expression: {exc}")
    for metric, members in rules.metrics.items():
        if not re.match(_NAME, metric):
            problems.append(f"metrics.{metric}: metric names are lowercase snake_case ({_NAME})")
        if metric in RESERVED_NAMES:
            problems.append(f"metrics.{metric}: reserved name; pick another")
        if not members:
            problems.append(f"metrics.{metric}: lists no checks")
        for member in members:
            if member not in names:
                problems.append(f"metrics.{metric}: unknown check {member!r}; declared checks: {', '.join(names)}")
    return problems


# --- loading ---------------------------------------------------------------------------------


def _describe(error: dict, raw: Any) -> str:
    loc = list(error["loc"])
    # The discriminator tag pydantic puts in the location is noise to a reader; a check's name is not.
    parts: list[str] = []
    for i, part in enumerate(loc):
        if i == 2 and loc[0] == "checks" and isinstance(part, str) and part in _KIND_NAMES:
            continue
        parts.append(f"[{part}]" if isinstance(part, int) else (("." if parts else "") + str(part)))
    path = "".join(parts) or "(top level)"
    if len(loc) >= 2 and loc[0] == "checks" and isinstance(loc[1], int):
        try:
            name = raw["checks"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = None
        if name:
            path = path.replace(f"checks[{loc[1]}]", f"checks[{loc[1]}] ({name})", 1)
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    if error["type"] == "union_tag_invalid":
        return f"{path}: unknown check kind {error.get('input', {}).get('kind')!r}; allowed: {', '.join(_KIND_NAMES)}"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{path}: {error['msg']} (found {shown})"



@dataclass(frozen=True)
class Rules:
    """A validated rules file, with its patterns and schemas compiled once."""

    source: str
    sha256: str
    spec: RulesFile
    _regex: dict = dataclass_field(default_factory=dict, repr=False, compare=False)
    _schema: dict = dataclass_field(default_factory=dict, repr=False, compare=False)

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def parse(self) -> str:
        return self.spec.parse

    @property
    def checks(self) -> list:
        return list(self.spec.checks)

    @property
    def check_names(self) -> list[str]:
        return [c.name for c in self.spec.checks]

    @property
    def metrics(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.spec.metrics.items()}

    @property
    def metric_names(self) -> list[str]:
        return list(self.spec.metrics)

    @property
    def row_fields(self) -> list[str]:
        """Row fields the checks read: every scored row must carry them."""
        return sorted({c.row_field for c in self.spec.checks if getattr(c, "row_field", None)})


def load_rules_text(text: str, source: str = "<rules>") -> Rules:
    # the one strict loader (sftc/yaml.py): the same guards as a spec
    raw = load_yaml_text(text, source, "rules file", RulesError)
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: a rules file is a YAML mapping (version, parse, checks, metrics); "
                         f"found {type(raw).__name__}")
    try:
        spec = RulesFile.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{source}: {_describe(e, raw)}" for e in exc.errors()]
        raise RulesError(f"{source}: {len(problems)} problem(s) in the rules file", problems) from None
    problems = [f"{source}: {p}" for p in _file_problems(spec)]
    if problems:
        raise RulesError(f"{source}: {len(problems)} problem(s) in the rules file", problems)

    import jsonschema

    regex = {c.name: re.compile(c.pattern, re.IGNORECASE if c.ignore_case else 0)
             for c in spec.checks if isinstance(c, RegexCheck)}
    schema = {c.name: jsonschema.Draft202012Validator(c.schema_) for c in spec.checks if isinstance(c, JsonSchemaCheck)}
    return Rules(source=source, sha256="sha256:" + sha256_bytes(text.encode("utf-8")), spec=spec, _regex=regex, _schema=schema)


def load_rules(path) -> Rules:
    path = Path(path)
    text, data = read_text_file(path, "rules file", RulesError)  # size, encoding and readability guards
    rules = load_rules_text(text, str(path))
    # "sha256:<hex>" of the bytes on disk, the form the lock uses for template and tokenizer versions.
    return Rules(source=rules.source, sha256="sha256:" + sha256_bytes(data), spec=rules.spec, _regex=rules._regex,
                 _schema=rules._schema)


def row_problems(rules: Rules, rows: list[dict]) -> list[str]:
    """Rows that lack a field the checks read. Meant for compile time, so a run cannot score every
    row as failed because of a renamed column."""
    problems = []
    for i, row in enumerate(rows):
        fields = row.get("fields", row)
        missing = [f for f in rules.row_fields if f not in fields]
        if missing:
            problems.append(f"eval row {row.get('index', i)}: missing field(s) {missing} needed by {rules.source}")
    return problems
