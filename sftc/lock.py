"""The Lock: the typed, versioned, sealed record of a compiled bundle (`bundle.lock.json`).

It is the only contract between `sftc compile` and everything that reads a bundle (runtime,
review, export). Each fact is stored once; a value derivable from others is a property here or
was computed once by the compiler, so no reader re-derives it with a fallback.

The seal: `seal.sha256` is the sha256 of the canonical lock without the seal (so it covers every
listed file's sha256, the spec, the budget, the bundle id ...), and `seal.fields` holds a short
hash per field so a refused edit names the field that changed. The bundle id is
`<name>-<first 12 hex of the content hash>`, the content being the lock without its id, its seal
and the files rendered from the lock (REPORT.md and launch.sh name the bundle id, so
they cannot be inside the hash the id comes from; they are inside the seal). Anyone can recompute
a sha256, so the seal detects edits and rot, not a forger who rewrites the lock, its seal and its
id together; the id check makes such a forgery a different bundle.

`load_lock` is the one loader: every damaged lock is a BundleError naming the file and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, JsonValue, ValidationError, field_validator, model_validator

from sftc.compiler.spec import BatchSpec, OmitUnset, Spec
from sftc.errors import BundleError
from sftc.io import canonical_json, pretty_json, sha256_bytes

FORMAT_VERSION = 3
LOCK_NAME = "bundle.lock.json"
# Files rendered from the lock itself (each names the bundle id): sealed, but outside the content
# hash the bundle id is derived from.
RENDERED_FILES = ("REPORT.md", "launch.sh")
# How deep seal.fields names a changed value (spec.optimizer.lr is depth 3); lists are leaves.
SEAL_DEPTH = 3
# The base-model files sealed into the lock (model.files) and checked before loading: what
# from_pretrained reads for the weights and the architecture, and any code a trust_remote_code
# model would import. Tokenizer files are covered by tokenizer.version.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf", "*.py")
FORMAT_HISTORY = {
    1: "untyped lock; bundle id = hash of the compile inputs; no seal",
    2: "typed Lock (sftc/lock.py); sealed; bundle id = hash of the lock content (docs/bundle-format.md)",
    3: "token files carry a sha256 per row and the lock seals their index (token_index), so a rank verifies "
       "only the rows it reads",
}


class Record(OmitUnset):
    """Every level of the lock: unknown keys are refused, nothing is mutated after compile (the
    spec's own base). Optional keys a pass writes only when they apply (data.sources, a
    save_to_disk input) are left out of the JSON while None (`_omit_when_none`)."""


class Stats(Record):
    min: int = Field(description="Smallest value over the planned run.")
    mean: float = Field(description="Mean over the planned run, 2 decimals.")
    max: int = Field(description="Largest value over the planned run.")


class DataFile(Record):
    _omit_when_none = ("source", "weight", "format", "fingerprint", "split", "repo", "revision")

    path: str = Field(description="Data file, relative to the project (hf://datasets/<id>/<file> for a hub dataset's file).")
    sha256: str = Field(description="sha256 of the bytes the compiler read.")
    rows_read: int = Field(description="Rows read from this file.")
    accepted: int = Field(description="Rows accepted from this file.")
    rejected: dict[str, int] = Field(description="Rejected rows of this file, by reason.")
    source: int | None = Field(None, description="Index in data.sources (data.sources only).")
    weight: float | None = Field(None, description="That source's weight (data.sources only).")
    format: str | None = Field(None, description="That source's row format (data.sources only).")
    fingerprint: str | None = Field(None, description="datasets fingerprint of a save_to_disk input.")
    split: str | None = Field(None, description="Split read from a save_to_disk DatasetDict.")
    repo: str | None = Field(None, description="Hub dataset id of a file read from the local Hugging Face cache.")
    revision: str | None = Field(None, description="Commit of that cached hub dataset snapshot.")


class SourceUse(Record):
    source: int = Field(description="Index in data.sources.")
    weight: float
    train_examples: int = Field(description="Train examples of the source before weighting.")
    used: int = Field(description="Train examples after weighting (repeats counted).")


class DataManifest(Record):
    _omit_when_none = ("sources",)

    files: list[DataFile] = Field(description="Every input data file, in spec order.")
    rows_read: int = Field(description="Rows read over all files.")
    train_examples: int = Field(description="Examples in train.safetensors (before packing).")
    eval_examples: int = Field(description="Examples in eval.safetensors.")
    rejected: dict[str, int] = Field(description="Rejected rows by reason (rejects.jsonl lists each).")
    hash: str = Field(description="sha256 over the data files' sha256s, in order.")
    sources: list[SourceUse] | None = Field(None, description="data.sources only: what each weight did.")


class Split(Record):
    by: Literal["group"] = Field(description="Unit of the split: whole groups go to one side.")
    seed: int = Field(description="split.seed used.")
    eval_fraction: float = Field(description="Requested fraction of groups held out.")
    near_duplicate_threshold: float | None = Field(description="Similarity above which groups were merged.")
    train_groups: list[str] = Field(description="Groups on the train side, sorted.")
    eval_groups: list[str] = Field(description="Groups held out, sorted.")
    train_rows: int = Field(description="Examples on the train side.")
    eval_rows: int = Field(description="Examples held out.")
    merged_near_duplicates: list[list[str]] = Field(description="Groups merged as near duplicates.")
    group_keys_normalized: bool = Field(True, description="split.normalize_group_keys: keys differing only in case, "
                                        "whitespace or '_' / '-' were one group.")
    merged_group_spellings: list[list[str]] = Field(default_factory=list, description="Keys merged as one group by that normalisation.")
    near_identical_groups: list[list[str]] = Field(
        default_factory=list, description="Pairs of keys one edit apart left as separate groups (at most 200 listed).")
    near_identical_group_pairs: int = Field(0, description="How many such pairs there are in all.")
    disjoint: bool = Field(description="No group on both sides.")
    overlap: list[str] = Field(description="Groups on both sides (always empty when disjoint).")


class Template(Record):
    source: Literal["file", "tokenizer"] = Field(description="Where the chat template came from.")
    path: str | None = Field(description="Template file relative to the project (source file); the bundle holds a copy.")
    version: str = Field(description="sha256 of the template text: what rendered the tokens.")
    terminator: str = Field(description="Token that ends a supervised answer.")
    terminator_id: int = Field(description="Its id.")
    system: str | None = Field(description="System message rendered into every example.")


class Tokenizer(Record):
    source: Literal["local", "hub"] = Field(description="A project directory, or a hub id from the local cache.")
    path: str = Field(description="Directory relative to the project, or the hub id.")
    revision: str | None = Field(description="Hub commit of the cached snapshot (hub only).")
    files: list[str] = Field(description="Tokenizer files the version covers.")
    version: str = Field(description="sha256 over the tokenizer files: what tokenized the data.")
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    vocab_size: int = Field(description="len(tokenizer), added tokens included.")


class BaseModelRecord(Record):
    source: Literal["local", "hub"] = Field(description="A project directory, or a hub id from the local cache.")
    path: str = Field(description="Directory relative to the project, or the hub id.")
    revision: str | None = Field(description="Hub commit of the cached snapshot (hub only).")
    files: dict[str, str] = Field(
        description="sha256 of the config, weight and code files, checked before the model is loaded."
    )
    architecture: str | None
    model_type: str | None

    @property
    def config_sha256(self) -> str:
        return "sha256:" + self.files["config.json"]


class Tokenize(Record):
    max_length: int = Field(description="tokenize.max_length.")
    examples: int = Field(description="Examples tokenized (train + eval).")
    truncated_rejected: int = Field(description="Examples rejected because truncation would cut the answer.")
    mean_length: float
    max_length_seen: int


class Packing(Record):
    _omit_when_none = ("ideal_rows",)

    strategy: str = Field(description="packing.strategy used.")
    seq_length: int = Field(description="Row length packed to.")
    rows: int = Field(description="Packed train rows.")
    examples: int = Field(description="Examples packed.")
    ideal_rows: int | None = Field(None, description="Rows a perfect packing would need (packed strategies).")
    overflow_tokens_dropped: int
    orphaned_supervised_tokens: int
    boundary_safe: bool = Field(description="No example reads another one (false only for 'wrapped').")


class Budget(Record):
    """The batch budget over the exact planned run (compiler/budget.py). The batch layout itself is
    spec.batch (Lock.batch): not repeated here."""

    source_examples_per_update: Stats
    supervised_tokens_per_update: Stats
    tokens_per_update: Stats
    optimizer_steps: int = Field(gt=0, description="Optimizer updates of the run.")
    epochs: float = Field(description="Passes over the train rows the steps amount to.")
    train_rows: int
    total_tokens: int
    supervised_tokens: int = Field(description="Tokens the loss scores over the run.")
    packing_efficiency: float
    padding_fraction: float
    lr_per_example: float
    warmup_steps: int = Field(ge=0, description="Warmup updates: ceil(schedule.warmup_ratio x optimizer_steps).")


class Parameters(Record):
    """compiler/model.py count_parameters, from the real module tree (LoRA through peft)."""

    total: int
    trainable: int
    trainable_fraction: float
    base: int
    embedding: int
    tied_embeddings: bool
    quantizable_linear: int = Field(description="Parameters of the linear layers qlora quantizes.")
    quantizable_linear_layers: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    kv_dim: int
    vocab_size: int
    trainable_tensors: int
    trainable_small: int = Field(description="Trainable parameters in tensors too small for 8-bit optimizer state.")
    trainable_factored: int = Field(description="Elements of Adafactor's factored state.")


class Memory(Record):
    """compiler/model.py estimate_memory: the total, and its parts as that estimate reports them."""

    total_bytes: int
    total_gib: float
    basis: str
    parts: dict[str, JsonValue] = Field(description="The estimate's breakdown (bytes per part, ...).")

    @classmethod
    def from_estimate(cls, estimate: dict) -> "Memory":
        rest = {k: v for k, v in estimate.items() if k not in ("total_bytes", "total_gib", "basis")}
        return cls(total_bytes=estimate["total_bytes"], total_gib=estimate["total_gib"], basis=estimate["basis"], parts=rest)


class EvalManifest(Record):
    prompts: int = Field(description="Lines of eval_prompts.jsonl.")
    examples: int = Field(description="Examples in eval.safetensors.")
    rules_path: str | None = Field(description="Rules file the bundle's rules.yaml was copied from, relative to the project.")
    rules_sha256: str | None
    metrics: list[str] = Field(description="Metrics the rules declare.")
    hash: str = Field(description="sha256 over the eval groups, the prompts file and the rules.")


class Seal(Record):
    sha256: str = Field(description="sha256 of the canonical lock without this seal.")
    fields: dict[str, str] = Field(description="Short sha256 of each field (dotted path), to name an edited one.")


class Lock(Record):
    """bundle.lock.json, format 3."""

    format_version: Literal[3] = Field(description="Lock format; 3 since token files carry per-row digests.")
    sftc_version: str = Field(description="sftc that compiled the bundle.")
    bundle_id: str = Field(description="<name>-<first 12 hex of the content hash>.")
    name: str = Field(description="spec.name.")
    inputs_hash: str = Field(
        description="sha256 over the compile inputs (spec, data, template, tokenizer, model files, rules, "
        "token-stream libraries, compiler code): a recompile of unchanged inputs finds this bundle."
    )
    spec: Spec = Field(description="The spec with every default filled in.")
    spec_source: str = Field(description="Spec file relative to the project.")
    project_root: str = Field(description="The project, relative to the bundle directory.")
    data_manifest: DataManifest = Field(description="What was read and what became of each row.")
    split: Split = Field(description="The group split (compiler/split.py).")
    template: Template | None = Field(description="None for plain text (continued pretraining).")
    tokenizer: Tokenizer = Field(description="The tokenizer that tokenized the data.")
    model: BaseModelRecord = Field(description="The base model, its files sealed. Its load options are spec.model.")
    libraries: dict[str, str] = Field(description="Installed versions at compile.")
    token_stream_libraries: list[str] = Field(description="Libraries whose version can change the tokens.")
    tokenize: Tokenize = Field(description="Tokenization totals.")
    packing: Packing = Field(description="The packing pass (compiler/pack.py).")
    budget: Budget = Field(description="The batch budget over the planned run (compiler/budget.py).")
    parameters: Parameters = Field(description="Parameter counts (compiler/model.py).")
    memory: Memory = Field(description="Memory estimate per device (compiler/model.py).")
    eval_manifest: EvalManifest = Field(description="What the held-out evaluation uses.")
    files: dict[str, str] = Field(description="sha256 of every file of the bundle directory but this lock.")
    token_index: dict[str, str] = Field(
        description="Per token file: sha256 of its header and every tensor but input_ids and labels (the "
        "offsets, order and row_sha256, a sha256 per row). A rank checks this index, then only the rows it "
        "reads against their row_sha256; `files` keeps each token file's whole sha256 (docs/bundle-format.md)."
    )
    seal: Seal = Field(description="sha256 of everything above, and a short hash per field to name an edit.")

    @field_validator("files")
    @classmethod
    def _inside_the_bundle(cls, files: dict[str, str]) -> dict[str, str]:
        # a listed name is opened under the bundle directory: never an absolute path or a way out of it
        for name in files:
            parts = name.split("/")
            if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"file name {name!r} is not a plain path inside the bundle")
            if name == LOCK_NAME:
                raise ValueError(f"{LOCK_NAME} cannot list itself")
        return files

    @model_validator(mode="after")
    def _indexed_files_are_listed(self) -> "Lock":
        unlisted = sorted(set(self.token_index) - set(self.files))
        if unlisted:
            raise ValueError(f"token_index names {unlisted}, which files does not list")
        return self

    @property
    def batch(self) -> BatchSpec:
        return self.spec.batch

    @property
    def tokenizer_version(self) -> str:
        return self.tokenizer.version

    @property
    def template_version(self) -> str | None:
        return self.template.version if self.template else None

    def to_json(self) -> str:
        return pretty_json(self.model_dump(mode="json"))


def model_file_names(model_dir: str | os.PathLike) -> list[str]:
    """The model directory's files that model.files seals (top level, sorted)."""
    root = Path(model_dir)
    names = {p.name for pattern in MODEL_FILE_PATTERNS for p in root.glob(pattern) if p.is_file()}
    return sorted(names)


# --- the seal ----------------------------------------------------------------------------------


def _leaves(value: Any, prefix: str, depth: int, out: dict[str, str]) -> None:
    if isinstance(value, dict) and depth < SEAL_DEPTH and value:
        for key, item in value.items():
            _leaves(item, f"{prefix}.{key}" if prefix else str(key), depth + 1, out)
    else:
        out[prefix] = sha256_bytes(canonical_json(value).encode())[:16]


def field_hashes(payload: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    _leaves({k: v for k, v in payload.items() if k != "seal"}, "", 0, out)
    return out


def content_hash(payload: dict) -> str:
    """What the bundle id comes from: the lock minus its id, its seal and the rendered files."""
    content = {k: v for k, v in payload.items() if k not in ("bundle_id", "seal")}
    content["files"] = {k: v for k, v in (payload.get("files") or {}).items() if k not in RENDERED_FILES}
    return sha256_bytes(canonical_json(content).encode())


def bundle_id_for(name: str, payload: dict) -> str:
    return f"{name}-{content_hash(payload)[:12]}"


def seal(payload: dict) -> dict:
    """The seal of a lock payload (a JSON dict without `seal`)."""
    body = {k: v for k, v in payload.items() if k != "seal"}
    return {"sha256": sha256_bytes(canonical_json(body).encode()), "fields": field_hashes(body)}


def seal_problems(raw: dict) -> list[str]:
    """Why a parsed lock no longer matches its seal (empty when intact)."""
    recorded = raw.get("seal") if isinstance(raw.get("seal"), dict) else {}
    now = seal(raw)
    if recorded.get("sha256") == now["sha256"] and recorded.get("fields") == now["fields"]:
        problems = []
    else:
        then = recorded.get("fields") if isinstance(recorded.get("fields"), dict) else {}
        changed = sorted(k for k in set(then) | set(now["fields"]) if then.get(k) != now["fields"].get(k))
        problems = [f"{k}: edited after compile (its value no longer matches the seal)" for k in changed]
        if not problems:
            problems = ["seal.sha256: edited after compile (the fields match, the lock hash does not)"]
    name = raw.get("name")
    # only when the seal matches: otherwise the edited field is already named, and the id differs because of it
    if not problems and isinstance(name, str) and raw.get("bundle_id") != bundle_id_for(name, raw):
        problems.append(
            f"bundle_id: {raw.get('bundle_id')!r} is not the hash of this lock's content "
            f"({bundle_id_for(name, raw)!r}): the content was changed and resealed"
        )
    return problems


# --- the one loader ----------------------------------------------------------------------------


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors()[:20]:
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        found = "" if error["type"] == "missing" else f" (found {json.dumps(error.get('input'), default=str)[:80]})"
        problems.append(f"{where}: {error['msg']}{found}")
    return problems


def parse_lock(text: str | bytes, source: str, sealed: bool = True) -> Lock:
    """A Lock from the bytes of a bundle.lock.json; `source` names the file in every error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError(f"{source}: not UTF-8 text ({exc.reason}); compile the bundle again") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg}); compile the bundle again") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{source}: a lock is a JSON object, found {type(raw).__name__}; compile the bundle again")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        known = FORMAT_HISTORY.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        spec_source = raw.get("spec_source")
        again = f"sftc compile {spec_source}" if isinstance(spec_source, str) else "sftc compile <spec>"
        raise BundleError(
            f"{source}: format_version {json.dumps(version, default=str)[:40]} is not readable by sftc's lock format "
            f"{FORMAT_VERSION}" + (f" (format {version}: {known})" if known else "") + f"; recompile with `{again}`"
        )
    try:
        lock = Lock.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(
            f"{source}: not a valid format-{FORMAT_VERSION} lock ({exc.error_count()} problem(s)); "
            "recompile the bundle instead of editing the lock", _validation_problems(exc)
        ) from None
    if sealed:
        problems = seal_problems(raw)
        if text != pretty_json(raw):
            problems.append("the file is not in the form sftc wrote (spacing, key order or a duplicate key edited)")
        if problems:
            raise BundleError(
                f"{source}: the lock was changed after compile ({len(problems)} problem(s)); the lock is sealed: "
                "recompile the spec instead of editing the bundle", problems
            )
    return lock


def load_lock(bundle_dir: str | os.PathLike, sealed: bool = True) -> Lock:
    """The one way to read a bundle's lock."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / LOCK_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a bundle, or an incomplete one (compile it again)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_lock(data, str(path), sealed=sealed)


def lock_schema() -> dict:
    return Lock.model_json_schema()


def field_table() -> str:
    """The lock's fields as a Markdown table (docs/bundle-format.md holds this output; a test keeps
    the two equal)."""
    import typing

    def type_name(annotation) -> str:
        text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
        return text or str(annotation).replace("typing.", "").replace("sftc.lock.", "").replace("sftc.compiler.spec.", "")

    rows = ["| field | type | what |", "|---|---|---|"]

    def walk(model, prefix: str) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            kind = type_name(info.annotation).replace("|", "\\|")
            rows.append(f"| `{path}` | `{kind}` | {(info.description or '').replace('|', '/')} |")
            inner = [a for a in (info.annotation, *typing.get_args(info.annotation))
                     if isinstance(a, type) and issubclass(a, Record)]
            inner += [a for arg in typing.get_args(info.annotation) for a in typing.get_args(arg)
                      if isinstance(a, type) and issubclass(a, Record)]
            listed = any(typing.get_origin(a) is list for a in (info.annotation, *typing.get_args(info.annotation)))
            for sub in dict.fromkeys(inner):
                walk(sub, path + ("[]." if listed else "."))

    walk(Lock, "")
    return "\n".join(rows) + "\n"
