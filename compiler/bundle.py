"""Pass 9: the locked bundle, and the driver that runs every pass in order.

The lock is a `sftc.lock.Lock`, sealed; the bundle id is `<name>-<first 12 hex of the lock's
content hash>`, which covers every bundle file's sha256 (sftc/lock.py). Nothing in the bundle
depends on the clock or on where the project lives, so two compiles of the same inputs give
identical bytes.

The inputs are hashed first (`inputs_hash`: the canonical spec, the data bytes, the template and
tokenizer, the base model's files, the rules file, the token-stream libraries and the compiler's
code), before anything heavy is imported: an unchanged spec finds its bundle already built by
that hash, recorded in its lock, and returns in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from sftc.compiler import spec as spec_mod
from sftc import __version__
from sftc.errors import BundleError, DataError, SftcError
from sftc.hashcache import cached_sha256
from sftc.io import canonical_json, pretty_json, remove_stale_staging, sha256_bytes, sha256_file, staging_dir
from sftc.lock import (FORMAT_VERSION, LOCK_NAME, RENDERED_FILES, Lock, Memory, bundle_id_for, load_lock, model_file_names,
                       seal)

# a change in any of these can change the token stream (rendering, tokenization, packing)
TOKEN_STREAM_LIBRARIES = ("jinja2", "tokenizers", "transformers", "trl")
RECORDED_LIBRARIES = TOKEN_STREAM_LIBRARIES + ("torch", "peft", "accelerate", "datasets", "safetensors", "bitsandbytes", "numpy", "pyarrow")
# The code that shapes a bundle's bytes, listed explicitly: a fixed masking or packing bug must not
# reuse a bundle built by the buggy version, and a change to `sftc diff` or `sftc status` (review/)
# or to the runtime must not change a bundle id. Paths are the module names inside the package.
HASHED_CODE = (
    "sftc.io", "sftc.errors", "sftc.lock", "sftc.hashcache", "sftc.yaml",
    "sftc.compiler.spec", "sftc.compiler.data", "sftc.compiler.split", "sftc.compiler.template",
    "sftc.compiler.tokens", "sftc.compiler.store", "sftc.compiler.workers", "sftc.compiler.pack",
    "sftc.compiler.budget", "sftc.compiler.model", "sftc.compiler.vocab", "sftc.compiler.report", "sftc.compiler.bundle",
    # the runtime code a compile runs: the rules file's model (its metric names are locked) and the
    # selection rule's parser (it decides which select.require values compile)
    "sftc.runtime.evaluate.rules", "sftc.runtime.select",
)
# Imported during a compile but never shaping a bundle's bytes: package __init__ files, what
# `sftc.runtime.evaluate`'s __init__ re-exports, and the progress lines of sftc.stages. tests/compiler/test_code_hash.py checks that every
# sftc module a compile loads is in one of the two lists.
UNHASHED_DURING_COMPILE = (
    "sftc", "sftc.compiler", "sftc.runtime", "sftc.templates", "sftc.runtime.evaluate",
    "sftc.runtime.evaluate.generate", "sftc.runtime.evaluate.score", "sftc.stages",
)


def code_hash() -> str:
    """sha256 over the source of HASHED_CODE and the launch template, by module name (so the hash is
    the same for a checkout and an installed wheel)."""
    import importlib.util

    from sftc.compiler.report import package_template

    digest = hashlib.sha256()
    for name in HASHED_CODE:
        origin = importlib.util.find_spec(name).origin
        digest.update(name.encode() + b"\0" + sha256_file(origin).encode() + b"\n")
    digest.update(b"templates/launch.sh.j2\0" + sha256_bytes(package_template("launch.sh.j2").encode()).encode() + b"\n")
    return digest.hexdigest()


def library_versions(names=RECORDED_LIBRARIES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass
class Inputs:
    """Every input of a compile, resolved and hashed (cheap: no torch, no tokenizer loading)."""

    spec: spec_mod.Spec
    spec_path: Path
    root: Path
    data_files: list[tuple[Path, str]]
    model_dir: Path
    tokenizer_dir: Path
    chat_path: Path | None
    rules_path: Path | None
    model_files: dict[str, str]
    hashes: dict

    @property
    def inputs_hash(self) -> str:
        return "sha256:" + sha256_bytes(canonical_json(self.hashes).encode())


def _display(path: Path, root: Path) -> str:
    """A path as the lock records it: relative to the project (with '..' for an allowed external
    path), never absolute, so a bundle means the same on any machine."""
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def _is_local(location: str, root: Path) -> bool:
    return (root / location).exists() or Path(location).is_absolute() or location.startswith(".")


def location_record(written: str, directory: Path, root: Path, revision: str | None) -> dict:
    """Where a model or tokenizer came from: a project directory, or a hub id and the commit of the
    cached snapshot it resolved to (never the cache's machine path)."""
    if _is_local(written, root):
        return {"source": "local", "path": _display(directory, root), "revision": None}
    snapshot = Path(directory)
    commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
    return {"source": "hub", "path": written, "revision": commit}


def resolve_inputs(spec_path: str | os.PathLike) -> Inputs:
    from sftc.compiler.template import local_dir, tokenizer_version
    from sftc.compiler.model import config_sha256

    spec_path = Path(spec_path)
    spec = spec_mod.load_spec(spec_path)
    root = spec_mod.project_root(spec_path)
    src = str(spec_path)

    def resolve(value: str, key: str) -> Path:
        return spec_mod.resolve_path(root, value, key, spec, src)

    from sftc.compiler.data import data_hashes, resolve_data_inputs

    data_files, data_problems = resolve_data_inputs(spec.data, resolve, lambda path: _display(path, root))
    problems = [f"{src}: {problem}" for problem in data_problems]
    model_location = spec.model.path
    if _is_local(model_location, root):
        model_location = str(resolve(spec.model.path, "model.path"))
    tok_location = spec.model.tokenizer or spec.model.path
    if _is_local(tok_location, root):
        tok_location = str(resolve(tok_location, "model.tokenizer"))
    chat_path = resolve(spec.template.chat, "template.chat") if spec.template.chat else None
    if chat_path is not None and not chat_path.is_file():
        problems.append(f"{src}: template.chat: {spec.template.chat}: file not found")
    rules_path = resolve(spec.eval.rules, "eval.rules") if spec.eval.rules else None
    if rules_path is not None and not rules_path.is_file():
        problems.append(f"{src}: eval.rules: {spec.eval.rules}: file not found")
    try:
        model_dir = local_dir(model_location, spec.model.revision, f"{src}: model.path")
    except SftcError as exc:
        problems.append(str(exc))
        model_dir = None
    try:
        tokenizer_dir = local_dir(tok_location, spec.model.revision, f"{src}: model.tokenizer")
    except SftcError as exc:
        problems.append(str(exc))
        tokenizer_dir = None
    if problems:
        raise SftcError(f"{src}: {len(problems)} input(s) cannot be used", problems)
    spec_mod.refuse_links_out(root, model_dir, "model.path", spec, src)
    spec_mod.refuse_links_out(root, tokenizer_dir, "model.tokenizer", spec, src)

    tok_version, _ = tokenizer_version(tokenizer_dir)
    config_sha256(model_dir)  # a clear error when config.json is missing
    names = model_file_names(model_dir)
    by_path = cached_sha256([model_dir / n for n in names], root)
    model_files = {n: by_path[model_dir / n] for n in names}
    hashes = {
        "format_version": FORMAT_VERSION,
        "spec": spec_mod.canonical_spec(spec),
        "data": data_hashes(data_files),
        "template": ("sha256:" + sha256_file(chat_path)) if chat_path else "tokenizer",
        "tokenizer": tok_version,
        "model_files": model_files,
        "rules": ("sha256:" + sha256_file(rules_path)) if rules_path else None,
        "libraries": library_versions(TOKEN_STREAM_LIBRARIES),
        # the compiler's own code is an input too (HASHED_CODE)
        "compiler": code_hash(),
    }
    return Inputs(spec, spec_path, root, data_files, model_dir, tokenizer_dir, chat_path, rules_path, model_files, hashes)


def default_bundles_dir(inputs: Inputs) -> Path:
    return inputs.root / "bundles"


def find_existing(out_root: Path, inputs: Inputs) -> tuple[Path, Lock] | None:
    """A complete, intact bundle compiled from exactly these inputs (the rename only happens when
    complete; a damaged or edited one is not reused, it is rebuilt)."""
    for path in sorted(Path(out_root).glob(f"{inputs.spec.name}-*/{LOCK_NAME}")):
        try:
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and raw.get("inputs_hash") == inputs.inputs_hash and raw.get("name") == inputs.spec.name:
            try:
                return path.parent, load_lock(path.parent)
            except BundleError:
                continue
    return None


def compile_spec(spec_path: str | os.PathLike, bundles_dir: str | os.PathLike | None = None, force: bool = False,
                 progress: bool = False, workers: int | None = None) -> tuple[Path, Lock, bool]:
    """Compile a spec; returns (bundle dir, lock, reused). Reuses an identical earlier bundle.
    With `progress`, a compile that takes more than a second says which pass is running (stderr).
    `workers` processes run the per-row passes, the near-duplicate hashing and tokenization
    (default: the usable cores, compiler/workers.py); the bundle's bytes are the same for any number."""
    from sftc.stages import Stages

    with Stages("compile", enabled=progress) as stages:
        stages.stage("hashing the inputs")
        inputs = resolve_inputs(spec_path)
        out_root = Path(bundles_dir) if bundles_dir else default_bundles_dir(inputs)
        # a compile killed mid-staging left `.<id>.pidN.*.tmp`; a compile that reuses a bundle
        # must clean it as much as one that rebuilds (staging_dir does it for those)
        remove_stale_staging(out_root)
        if not force:
            found = find_existing(out_root, inputs)
            if found is not None:
                return found[0], found[1], True
        final, lock = _build(inputs, out_root, stages.stage, workers)
    return final, lock, False


def _build(inputs: Inputs, out_root: Path, say=lambda text: None, workers: int | None = None) -> tuple[Path, Lock]:
    """Run every pass in a work directory beside the bundles (`.<name>-work.pid<N>.<random>.tmp`:
    the token store and the streamed token files, compiler/store.py), removed however the compile
    ends; one left by a killed compile is removed by the next compile into the same directory."""
    import shutil
    import tempfile

    Path(out_root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{inputs.spec.name}-work.pid{os.getpid()}.", suffix=".tmp", dir=out_root))
    if workers is None:
        from sftc.compiler.workers import default_workers

        workers = default_workers()
    try:
        return _build_in(inputs, Path(out_root), work, say, workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_in(inputs: Inputs, out_root: Path, work: Path, say, workers: int) -> tuple[Path, Lock]:
    from sftc.compiler.budget import compute_budget
    from sftc.compiler.data import read_data
    from sftc.compiler.model import count_parameters, estimate_memory, load_config
    from sftc.compiler.pack import pack, unpacked
    from sftc.compiler.split import split_examples
    from sftc.compiler.store import RowStore, Tensor, TokenStore, write_lines, write_safetensors
    from sftc.compiler.template import load_template, load_tokenizer, tokenizer_version
    from sftc.compiler.tokens import check_mask, tokenize_chat, tokenize_text

    spec, src = inputs.spec, str(inputs.spec_path)
    say(f"reading {len(inputs.data_files)} data input(s)")
    rows_store = RowStore(work)
    data = read_data(inputs.data_files, spec.data, rows_store)
    rows_store.flush()
    # the bundle's identity was hashed from the files before reading; the rows came from the bytes
    # read since. A file replaced in between would give tokens of one content under the other's hash.
    changed = [f"{was['path']}: sha256 {was['sha256'][:12]}... when the compile began, {now['sha256'][:12]}... "
               "in the bytes read" for was, now in zip(inputs.hashes["data"], data.files) if was["sha256"] != now["sha256"]]
    if changed:
        raise DataError(f"{src}: data changed while compiling; nothing was written. Compile again once the data "
                        "files are settled", changed)
    if not data.examples:
        names = ", ".join(f"{f['path']} ({f['rows_read']} rows)" for f in data.files)
        raise DataError(f"{src}: data.files: no row was accepted ({len(data.rejects)} rejected) in {names}",
                        [f"{r.where}: {r.reason}: {r.detail}" for r in data.rejects[:10]])
    say(f"splitting {len(data.examples)} rows by group (near-duplicate search)")
    split = split_examples(data.examples, spec.split, workers, work)

    say(f"tokenizing {len(split.train) + len(split.eval)} examples with the real tokenizer")
    tokenizer = load_tokenizer(str(inputs.tokenizer_dir), spec.model.revision, spec.model.trust_remote_code, f"{src}: model.tokenizer")
    tok_version, tok_files = tokenizer_version(inputs.tokenizer_dir)
    template = load_template(spec, tokenizer, inputs.chat_path, _display(inputs.chat_path, inputs.root) if inputs.chat_path else None)
    if template is None:
        allow = spec.data.allow_control_tokens
        train_tok = tokenize_text(split.train, tokenizer, TokenStore(work, "train"), allow, workers)
        eval_tok = tokenize_text(split.eval, tokenizer, TokenStore(work, "eval"), allow, workers)
    else:
        # bfd cuts every example to one packed row: check the answer against that cut too, so packing
        # can never drop an answer that tokenization let through (it becomes an answer_truncated reject)
        train_limit = spec.tokenize.max_length
        if spec.packing.strategy == "bfd":
            train_limit = min(train_limit, spec.seq_length)
        train_tok = tokenize_chat(split.train, template, tokenizer, train_limit, spec.tokenize.on_truncated_answer,
                                  TokenStore(work, "train"), workers=workers)
        eval_tok = tokenize_chat(split.eval, template, tokenizer, spec.tokenize.max_length, spec.tokenize.on_truncated_answer,
                                 TokenStore(work, "eval"), with_prompts=True, workers=workers)
        check_mask(train_tok, template, tokenizer)
        check_mask(eval_tok, template, tokenizer)

    rejects = sorted(data.rejects + train_tok.rejects + eval_tok.rejects, key=lambda r: (r.file, r.row))
    rows_read = data.rows_read
    reasons: dict[str, int] = {}
    for reject in rejects:
        reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
    fraction = len(rejects) / rows_read
    if fraction > spec.data.max_reject_fraction:
        raise DataError(
            f"{src}: data.max_reject_fraction: {len(rejects)} of {rows_read} rows rejected ({fraction:.1%}), "
            f"allowed {spec.data.max_reject_fraction:.1%}",
            [f"{reason}: {n}" for reason, n in sorted(reasons.items())]
            + [f"e.g. {r.where}: {r.reason}: {r.detail}" for r in rejects[:5]],
        )
    train_examples, eval_examples = len(train_tok.tokens), len(eval_tok.tokens)
    if not train_examples:
        raise DataError(f"{src}: no train example survived tokenization")
    accounted = train_examples + eval_examples + len(rejects)
    assert accounted == rows_read, f"row accounting bug: {accounted} accounted for, {rows_read} read"

    from sftc.compiler.data import weigh_sources

    picks, weighting = weigh_sources(train_tok.examples, spec.data, spec.seed)
    say(f"packing ({spec.packing.strategy} @ {spec.seq_length}) and computing the budget")
    packed = pack(train_tok.tokens, picks, spec.packing.strategy, spec.seq_length, spec.seed)
    budget, order = compute_budget(spec, packed)
    eval_rows = unpacked(eval_tok.tokens) if eval_examples else None

    say("counting parameters and estimating memory")
    config = load_config(inputs.model_dir, spec)
    from sftc.compiler.vocab import check_vocabulary

    check_vocabulary(tokenizer, config, max(train_tok.tokens.max_id, eval_tok.tokens.max_id), src)
    lengths = np.concatenate([train_tok.tokens.lengths(), eval_tok.tokens.lengths()])
    parameters = count_parameters(config, spec)
    memory = estimate_memory(parameters, spec, spec.seq_length)

    rules_info = None
    rules_bytes = None
    if inputs.rules_path is not None:
        from sftc.runtime.evaluate.rules import RulesError, load_rules_text
        from sftc.yaml import read_text_file

        # the bytes parsed are the bytes copied and hashed (a file swapped mid-compile cannot split them)
        rules_text, rules_bytes = read_text_file(inputs.rules_path, "rules file", RulesError)
        rules = load_rules_text(rules_text, _display(inputs.rules_path, inputs.root))
        rules_info = {"sha256": "sha256:" + sha256_bytes(rules_bytes), "metrics": list(rules.metric_names)}
        from sftc.runtime.evaluate.rules import RESERVED_NAMES

        undeclared = spec_mod.undeclared_select_metrics(spec, rules.metric_names, RESERVED_NAMES)
        if undeclared:
            raise spec_mod.SpecError(f"{src}: select names metrics no evaluation reports", [f"{src}: {p}" for p in undeclared])
        # With rules, every checkpoint generates up to eval.max_new_tokens per held-out prompt, and a
        # reply that never ends runs all the way: at the model's positions or past them that is not
        # a longer answer, only a run that seems to hang (32768 on a 512-position model: 10+ minutes
        # for one step's evaluation, found by tests/reliability/test_fuzz_extremes.py). Refused here;
        # below it, generation stops each batch at the model's positions (runtime/evaluate/generate.py).
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        if positions and spec.eval.max_new_tokens >= positions:
            raise spec_mod.SpecError(
                f"{src}: eval.max_new_tokens: {spec.eval.max_new_tokens} generated tokens would fill the model's "
                f"{positions} positions (max_position_embeddings) before any prompt; set it below {positions}, "
                "to the length of the longest answer the rules need")

    def eval_prompt_lines():
        # one line at a time, written as made: at 10% of a few million rows, the prompts' dicts, id
        # lists and JSON held together were the largest thing left in memory
        for index, (example, prompt_ids) in enumerate(zip(eval_tok.examples, eval_tok.prompt_ids)):
            prompt_ids = [int(t) for t in prompt_ids]  # held as int32 arrays; decoded and written as ints
            fields, messages, _ = example.content  # one read when the content is on disk
            yield json.dumps({
                "index": index, "group": example.group, "source": example.where,
                "prompt_ids": prompt_ids,
                "prompt_text": tokenizer.decode(prompt_ids),
                "reference": messages[-1]["content"],
                "fields": fields,
            }, ensure_ascii=False, sort_keys=True, default=str) + "\n"

    # The token files, eval prompts and rejects are streamed to the work directory, hashed as
    # written; the other files are built in memory. Each sha256 is part of the lock, the lock's
    # content hash names the bundle directory, and the hashed bytes are the written bytes.
    say("writing the token files")
    token_files = {"train.safetensors": {**packed.token_tensors(), "order": Tensor.of(order)}}
    if eval_rows is not None:
        token_files["eval.safetensors"] = eval_rows.token_tensors()
    streamed: dict[str, str] = {}
    token_index: dict[str, str] = {}
    for name, tensors in token_files.items():
        streamed[name], token_index[name] = write_safetensors(work / name, tensors)
    prompt_count = len(eval_tok.examples) if template is not None else 0
    streamed["eval_prompts.jsonl"] = write_lines(work / "eval_prompts.jsonl",
                                                 eval_prompt_lines() if template is not None else ())
    streamed["rejects.jsonl"] = write_lines(work / "rejects.jsonl", (
        json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True) + "\n" for r in rejects))
    contents: dict[str, bytes] = {}
    if rules_bytes is not None:
        contents["rules.yaml"] = rules_bytes
    if template is not None:
        contents["chat_template.jinja"] = template.text.encode("utf-8")

    data_manifest = {
        "files": data.files,
        "rows_read": rows_read,
        "train_examples": train_examples,
        "eval_examples": eval_examples,
        "rejected": dict(sorted(reasons.items())),
    }
    data_manifest["hash"] = "sha256:" + sha256_bytes(canonical_json([f["sha256"] for f in data.files]).encode())
    if weighting is not None:  # data.sources only: train examples per source before and after weights
        data_manifest["sources"] = weighting
    root = inputs.root
    payload = {
        "format_version": FORMAT_VERSION,
        "sftc_version": __version__,
        "name": spec.name,
        "inputs_hash": inputs.inputs_hash,
        "spec": spec_mod.canonical_spec(spec),
        "spec_source": _display(inputs.spec_path, root),
        # the same depth for every bundle of out_root, whatever its id
        "project_root": Path(os.path.relpath(root.resolve(), out_root.resolve() / "_")).as_posix(),
        "data_manifest": data_manifest,
        "split": split.record,
        "template": {
            "source": template.source, "path": template.path, "version": template.version,
            "terminator": template.terminator, "terminator_id": template.terminator_id, "system": template.system,
        } if template else None,
        "tokenizer": {
            **location_record(spec.model.tokenizer or spec.model.path, inputs.tokenizer_dir, root, spec.model.revision),
            "files": tok_files, "version": tok_version,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "vocab_size": len(tokenizer),
        },
        "model": {
            **location_record(spec.model.path, inputs.model_dir, root, spec.model.revision),
            "files": inputs.model_files,
            "architecture": (getattr(config, "architectures", None) or [None])[0],
            "model_type": getattr(config, "model_type", None),
        },
        "libraries": library_versions(),
        "token_stream_libraries": list(TOKEN_STREAM_LIBRARIES),
        "tokenize": {
            "max_length": spec.tokenize.max_length, "examples": int(len(lengths)),
            "truncated_rejected": train_tok.truncated_rejected + eval_tok.truncated_rejected,
            "mean_length": round(float(lengths.mean()), 2) if len(lengths) else 0,
            "max_length_seen": int(lengths.max()) if len(lengths) else 0,
        },
        "packing": packed.record,
        "budget": budget.model_dump(mode="json"),
        "parameters": parameters,
        "memory": Memory.from_estimate(memory).model_dump(mode="json"),
        "eval_manifest": {
            "prompts": prompt_count, "examples": eval_examples,
            "rules_path": _display(inputs.rules_path, root) if inputs.rules_path else None,
            "rules_sha256": rules_info["sha256"] if rules_info else None,
            "metrics": rules_info["metrics"] if rules_info else [],
            "hash": "sha256:" + sha256_bytes(canonical_json({
                "groups": split.record["eval_groups"],
                "prompts": streamed["eval_prompts.jsonl"],
                "rules": rules_info["sha256"] if rules_info else None,
            }).encode()),
        },
        "files": _file_hashes(contents, streamed),
        "token_index": token_index,
    }
    # Validated before anything is rendered or written (a pass that produced a record the Lock does
    # not describe is a compiler bug, caught here with the field named), then taken back as the
    # model's own JSON form: what is sealed is exactly what is written and what a reader parses.
    payload = json.loads(json.dumps(payload, default=_json_default))
    draft = Lock.model_validate({**payload, "bundle_id": "", "seal": {"sha256": "", "fields": {}}})
    payload = draft.model_dump(mode="json")
    payload["bundle_id"] = bundle_id_for(spec.name, payload)
    draft = draft.model_copy(update={"bundle_id": payload["bundle_id"]})

    from sftc.compiler.report import render_launch, render_report

    contents["launch.sh"] = render_launch(draft).encode("utf-8")
    contents["REPORT.md"] = render_report(draft, packed, tokenizer).encode("utf-8")
    assert set(contents) - set(payload["files"]) <= set(RENDERED_FILES), "a rendered file must be listed in RENDERED_FILES"
    payload["files"] = _file_hashes(contents, streamed)
    payload["seal"] = seal(payload)
    lock = Lock.model_validate(payload)
    assert lock.model_dump(mode="json") == payload, "the Lock must dump to exactly the sealed payload"
    contents[LOCK_NAME] = pretty_json(payload).encode("utf-8")

    final = Path(out_root) / lock.bundle_id
    # an existing directory with this id has this content; it was not reused because it is damaged
    # or --force was given, so it is replaced
    say("writing the bundle")
    with staging_dir(final, replace=final.exists()) as stage:
        for name in streamed:
            os.replace(work / name, stage / name)
        for name, data in contents.items():
            (stage / name).write_bytes(data)
        os.chmod(stage / "launch.sh", 0o755)
    train_tok.tokens.close()
    eval_tok.tokens.close()
    rows_store.close()
    return final, lock


def _file_hashes(contents: dict[str, bytes], streamed: dict[str, str]) -> dict[str, str]:
    """The lock's `files`: every bundle file's sha256, by name."""
    return dict(sorted({**{name: sha256_bytes(data) for name, data in contents.items()}, **streamed}.items()))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"lock value of type {type(value).__name__} is not JSON")
