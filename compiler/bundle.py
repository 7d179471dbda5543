"""Pass 9: the locked bundle, and the driver that runs every pass in order.

The bundle id is `<name>-<first 12 hex of bundle_hash>`; bundle_hash covers the canonical spec,
the data bytes, the template and tokenizer, the model config, the rules file and the versions of
the libraries that shape the token stream. Nothing in the bundle depends on the clock or on
where the project lives, so two compiles of the same inputs give identical bytes.

The inputs are hashed first, before anything heavy is imported: an unchanged spec finds its
bundle already built and returns in well under a second.
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
from sftc.io import canonical_json, pretty_json, read_json, sha256_bytes, sha256_file, staging_dir

FORMAT_VERSION = 1
# a change in any of these can change the token stream (rendering, tokenization, packing)
TOKEN_STREAM_LIBRARIES = ("jinja2", "tokenizers", "transformers", "trl")
RECORDED_LIBRARIES = TOKEN_STREAM_LIBRARIES + ("torch", "peft", "accelerate", "datasets", "safetensors", "bitsandbytes", "numpy", "pyarrow")
# The code that shapes a bundle's bytes, listed explicitly: a fixed masking or packing bug must not
# reuse a bundle built by the buggy version, and a change to `sftc diff` or `sftc status` (review/)
# or to the runtime must not change a bundle id. Paths are the module names inside the package.
HASHED_CODE = (
    "sftc.io", "sftc.errors",
    "sftc.compiler.spec", "sftc.compiler.data", "sftc.compiler.split", "sftc.compiler.template",
    "sftc.compiler.tokens", "sftc.compiler.pack", "sftc.compiler.budget", "sftc.compiler.model",
    "sftc.compiler.report", "sftc.compiler.bundle",
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
    hashes: dict

    @property
    def bundle_hash(self) -> str:
        return sha256_bytes(canonical_json(self.hashes).encode())

    @property
    def bundle_id(self) -> str:
        return f"{self.spec.name}-{self.bundle_hash[:12]}"


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def resolve_inputs(spec_path: str | os.PathLike) -> Inputs:
    from sftc.compiler.template import local_dir, tokenizer_version
    from sftc.compiler.model import config_sha256

    spec_path = Path(spec_path)
    spec = spec_mod.load_spec(spec_path)
    root = spec_mod.project_root(spec_path)
    src = str(spec_path)

    def resolve(value: str, key: str) -> Path:
        return spec_mod.resolve_path(root, value, key, spec, src)

    problems = []
    data_files = []
    for i, name in enumerate(spec.data.files):
        path = resolve(name, f"data.files[{i}]")
        if not path.is_file():
            problems.append(f"{src}: data.files[{i}]: {name}: file not found")
        data_files.append((path, _display(path, root)))
    model_location = spec.model.path
    if (root / model_location).exists() or Path(model_location).is_absolute() or model_location.startswith("."):
        model_location = str(resolve(spec.model.path, "model.path"))
    tok_location = spec.model.tokenizer or spec.model.path
    if (root / tok_location).exists() or Path(tok_location).is_absolute() or tok_location.startswith("."):
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

    tok_version, _ = tokenizer_version(tokenizer_dir)
    hashes = {
        "format_version": FORMAT_VERSION,
        "spec": spec_mod.canonical_spec(spec),
        "data": [{"path": display, "sha256": sha256_file(path)} for path, display in data_files],
        "template": ("sha256:" + sha256_file(chat_path)) if chat_path else "tokenizer",
        "tokenizer": tok_version,
        "model_config": config_sha256(model_dir),
        "rules": ("sha256:" + sha256_file(rules_path)) if rules_path else None,
        "libraries": library_versions(TOKEN_STREAM_LIBRARIES),
        # the compiler's own code is an input too (HASHED_CODE)
        "compiler": code_hash(),
    }
    return Inputs(spec, spec_path, root, data_files, model_dir, tokenizer_dir, chat_path, rules_path, hashes)


def default_bundles_dir(inputs: Inputs) -> Path:
    return inputs.root / "bundles"


def existing_bundle(path: Path, bundle_hash: str) -> bool:
    """A complete bundle with this hash is already there (the rename only happens when complete)."""
    lock = path / "bundle.lock.json"
    if not lock.is_file():
        return False
    try:
        return read_json(lock).get("bundle_hash") == bundle_hash
    except (OSError, ValueError):
        return False


def compile_spec(spec_path: str | os.PathLike, bundles_dir: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, dict, bool]:
    """Compile a spec; returns (bundle dir, lock, reused). Reuses an identical earlier bundle."""
    inputs = resolve_inputs(spec_path)
    out_root = Path(bundles_dir) if bundles_dir else default_bundles_dir(inputs)
    final = out_root / inputs.bundle_id
    if not force and existing_bundle(final, inputs.bundle_hash):
        return final, read_json(final / "bundle.lock.json"), True
    lock = _build(inputs, final, replace=force)
    return final, lock, False


def _build(inputs: Inputs, final: Path, replace: bool = False) -> dict:
    from sftc.compiler.budget import compute_budget
    from sftc.compiler.data import read_data
    from sftc.compiler.model import count_parameters, estimate_memory, load_config
    from sftc.compiler.pack import pack, unpacked
    from sftc.compiler.split import split_examples
    from sftc.compiler.template import load_template, load_tokenizer, tokenizer_version
    from sftc.compiler.tokens import check_mask, tokenize_chat, tokenize_text

    spec, src = inputs.spec, str(inputs.spec_path)
    data = read_data(inputs.data_files, spec.data)
    if not data.examples:
        names = ", ".join(f"{f['path']} ({f['rows_read']} rows)" for f in data.files)
        raise DataError(f"{src}: data.files: no row was accepted ({len(data.rejects)} rejected) in {names}",
                        [f"{r.file}:{r.row}: {r.reason}: {r.detail}" for r in data.rejects[:10]])
    split = split_examples(data.examples, spec.split)

    tokenizer = load_tokenizer(str(inputs.tokenizer_dir), spec.model.revision, spec.model.trust_remote_code, f"{src}: model.tokenizer")
    tok_version, tok_files = tokenizer_version(inputs.tokenizer_dir)
    template = load_template(spec, tokenizer, inputs.chat_path, _display(inputs.chat_path, inputs.root) if inputs.chat_path else None)
    if template is None:
        train_tok, eval_tok = tokenize_text(split.train, tokenizer), tokenize_text(split.eval, tokenizer)
    else:
        # bfd cuts every example to one packed row: check the answer against that cut too, so packing
        # can never drop an answer that tokenization let through (it becomes an answer_truncated reject)
        train_limit = spec.tokenize.max_length
        if spec.packing.strategy == "bfd":
            train_limit = min(train_limit, spec.seq_length)
        train_tok = tokenize_chat(split.train, template, tokenizer, train_limit, spec.tokenize.on_truncated_answer)
        eval_tok = tokenize_chat(split.eval, template, tokenizer, spec.tokenize.max_length, spec.tokenize.on_truncated_answer,
                                 with_prompts=True)
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
            + [f"e.g. {r.file}:{r.row}: {r.reason}: {r.detail}" for r in rejects[:5]],
        )
    if not train_tok.input_ids:
        raise DataError(f"{src}: no train example survived tokenization")
    accounted = len(train_tok.input_ids) + len(eval_tok.input_ids) + len(rejects)
    assert accounted == rows_read, f"row accounting bug: {accounted} accounted for, {rows_read} read"

    packed = pack(train_tok.input_ids, train_tok.labels, spec.packing.strategy, spec.seq_length, spec.seed)
    budget, order = compute_budget(spec, packed)
    eval_rows = unpacked(eval_tok.input_ids, eval_tok.labels) if eval_tok.input_ids else None

    config = load_config(inputs.model_dir, spec)
    parameters = count_parameters(config, spec)
    memory = estimate_memory(parameters, spec, spec.seq_length)

    rules_info = None
    if inputs.rules_path is not None:
        from sftc.runtime.evaluate import load_rules

        rules = load_rules(inputs.rules_path)
        rules_info = {"sha256": "sha256:" + sha256_file(inputs.rules_path), "metrics": list(rules.metric_names)}

    eval_prompts = []
    if template is not None:
        for index, (example, prompt_ids) in enumerate(zip(eval_tok.examples, eval_tok.prompt_ids)):
            eval_prompts.append({
                "index": index, "group": example.group, "source": example.ref,
                "prompt_ids": [int(t) for t in prompt_ids],
                "prompt_text": tokenizer.decode(prompt_ids),
                "reference": example.messages[-1]["content"],
                "fields": example.fields,
            })

    from safetensors.numpy import save_file

    bundle_id = inputs.bundle_id
    with staging_dir(final, replace=replace) as stage:
        save_file({**packed.tensors(), "order": order}, str(stage / "train.safetensors"))
        if eval_rows is not None:
            save_file(eval_rows.tensors(), str(stage / "eval.safetensors"))
        (stage / "eval_prompts.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False, sort_keys=True, default=str) + "\n" for p in eval_prompts), encoding="utf-8"
        )
        (stage / "rejects.jsonl").write_text(
            "".join(json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True) + "\n" for r in rejects), encoding="utf-8"
        )
        if inputs.rules_path is not None:
            (stage / "rules.yaml").write_bytes(inputs.rules_path.read_bytes())
        if template is not None:
            (stage / "chat_template.jinja").write_text(template.text, encoding="utf-8")

        data_manifest = {
            "files": data.files,
            "rows_read": rows_read,
            "train_examples": len(train_tok.input_ids),
            "eval_examples": len(eval_tok.input_ids),
            "rejected": dict(sorted(reasons.items())),
        }
        data_manifest["hash"] = "sha256:" + sha256_bytes(canonical_json([f["sha256"] for f in data.files]).encode())
        lengths = np.array([len(a) for a in train_tok.input_ids + eval_tok.input_ids])
        lock = {
            "format_version": FORMAT_VERSION,
            "sftc_version": __version__,
            "bundle_id": bundle_id,
            "bundle_hash": inputs.bundle_hash,
            "name": spec.name,
            "spec": spec_mod.canonical_spec(spec),
            "spec_source": _display(inputs.spec_path.resolve(), inputs.root),
            "project_root": os.path.relpath(inputs.root.resolve(), final.parent.resolve() / bundle_id),
            "inputs": {
                "model_path": _display(inputs.model_dir.resolve(), inputs.root) if Path(inputs.model_dir).exists() else str(inputs.model_dir),
                "tokenizer_path": _display(inputs.tokenizer_dir.resolve(), inputs.root),
                "template_path": _display(inputs.chat_path, inputs.root) if inputs.chat_path else None,
                "rules_path": _display(inputs.rules_path, inputs.root) if inputs.rules_path else None,
                "data_files": [display for _, display in inputs.data_files],
            },
            "data_manifest": data_manifest,
            "split": split.record,
            "template_version": template.version if template else None,
            "template": {
                "source": template.source, "path": template.path, "terminator": template.terminator,
                "terminator_id": template.terminator_id, "system": template.system,
            } if template else None,
            "tokenizer_version": tok_version,
            "tokenizer": {
                "path": _display(inputs.tokenizer_dir.resolve(), inputs.root), "files": tok_files,
                "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
                "vocab_size": len(tokenizer),
            },
            "model": {
                "path": spec.model.path, "revision": spec.model.revision,
                "config_sha256": inputs.hashes["model_config"],
                "architecture": (getattr(config, "architectures", None) or [None])[0],
                "model_type": getattr(config, "model_type", None), "dtype": spec.model.dtype,
                "attn_implementation": spec.model.attn_implementation,
                "trust_remote_code": spec.model.trust_remote_code,
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
            "budget": budget,
            "parameters": parameters,
            "memory_estimate": memory,
            "eval_manifest": {
                "prompts": len(eval_prompts), "examples": len(eval_tok.input_ids),
                "rules_sha256": rules_info["sha256"] if rules_info else None,
                "metrics": rules_info["metrics"] if rules_info else [],
                "hash": "sha256:" + sha256_bytes(canonical_json({
                    "groups": split.record["eval_groups"],
                    "prompts": sha256_bytes((stage / "eval_prompts.jsonl").read_bytes()),
                    "rules": rules_info["sha256"] if rules_info else None,
                }).encode()),
            },
        }
        from sftc.compiler.report import render_deepspeed, render_launch, render_report

        (stage / "launch.sh").write_text(render_launch(lock), encoding="utf-8")
        deepspeed = render_deepspeed(lock)  # zero2 / zero3 only (docs/distributed.md)
        if deepspeed is not None:
            (stage / "deepspeed.json").write_text(deepspeed, encoding="utf-8")
        os.chmod(stage / "launch.sh", 0o755)
        (stage / "REPORT.md").write_text(render_report(lock, packed, tokenizer), encoding="utf-8")
        lock["files"] = {
            p.relative_to(stage).as_posix(): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()
        }
        (stage / "bundle.lock.json").write_text(pretty_json(lock), encoding="utf-8")
    return lock


def load_lock(bundle_dir: str | os.PathLike) -> dict:
    path = Path(bundle_dir) / "bundle.lock.json"
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no bundle.lock.json)")
    try:
        return read_json(path)
    except ValueError as exc:
        raise BundleError(f"{path}: unreadable lock ({exc})") from None
