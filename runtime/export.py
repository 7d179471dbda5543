"""Export the selected checkpoint as a Hugging Face model directory with its provenance.

`runs/<id>/export/` loads with `AutoModelForCausalLM.from_pretrained` (full) or
`AutoPeftModelForCausalLM.from_pretrained` (lora, qlora); `export/merged/` holds the adapter merged
into the base when the spec asks for it, with its own card. The tokenizer carries the chat template
the tokens were rendered with, made to render the training system message by default, and
README.md says where every part came from, so a deployed model can be traced back to its bundle,
data and selection (docs/export.md).

Nothing in an export names a path of the machine that made it: the base is a hub id (with its
revision) when one is known for certain, else a path relative to the export directory; the
bundle is named by its path in the project.

Only safetensors and JSON are copied: optimizer and RNG pickles stay in the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sftc.errors import RunError
from sftc.io import pretty_json, read_json, sha256_file, staging_dir
from sftc.lock import Lock
from sftc.runtime.bundle import Bundle, load_bundle
from sftc.runtime.model_card import model_card
from sftc.runtime.rundir import bundle_dir_of, checkpoint_problems, read_best

FULL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What huggingface_hub writes a cached snapshot as: <cache>/models--<org>--<name>/snapshots/<commit>
_CACHE_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def _export_step(run_dir: Path, best: dict, allow_ineligible: bool) -> tuple[int, bool]:
    step = best.get("best_step")
    if step is not None:
        return int(step), True
    fallback = best.get("fallback_step")
    allowed = allow_ineligible or (best.get("rule") or {}).get("export_if_none_eligible", False)
    if fallback is not None and allowed:
        return int(fallback), False
    hints = [best.get("why") or "best.json has no best_step"]
    if fallback is not None:
        hints.append(f"to export the best ineligible checkpoint (step {fallback}) anyway: "
                     f"sftc export {run_dir} --allow-ineligible, or set select.export_if_none_eligible: true")
    raise RunError(f"{run_dir}: no checkpoint meets the selection rule, so nothing is exported", hints)


# --- where the base model is, in terms that hold on another machine ---------------------------


def is_hub_id(value: str | None) -> bool:
    from sftc.compiler.template import _HUB_ID  # the compiler's one definition of a hub id

    return bool(value) and bool(_HUB_ID.match(value))


def _cache_snapshot_id(path: Path) -> tuple[str, str] | None:
    """(hub id, commit) when `path` is a snapshot in the Hugging Face cache, e.g. a project symlink
    into it: the cache layout itself says which repository and commit the files are."""
    real = path.resolve()
    if real.parent.name != "snapshots":
        return None
    match = _CACHE_SNAPSHOT.match(real.parent.parent.name)
    if not match:
        return None
    return f"{match['org']}/{match['name']}", real.name


def _declared_hub_id(local: Path) -> str | None:
    """The hub id the base's config.json says it was loaded from (`_name_or_path`, written by
    transformers 4). Lineage only: a model fine-tuned from that id and saved keeps the same value."""
    config = local / "config.json"
    try:
        name = read_json(config).get("_name_or_path") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) and is_hub_id(name) and not Path(name).exists() else None


def base_reference(bundle: Bundle, export_dir: Path) -> dict:
    """How the export names its base: a hub id (the lock's, or a cache snapshot the project links
    to) when certain, else the base's path relative to the export directory, which holds wherever
    the project is copied."""
    model = bundle.lock.model
    ref: dict[str, Any] = {"hub_id": None, "revision": None, "hub_id_source": None, "declared_hub_id": None,
                           "project_path": None, "relative_to_export": None,
                           "config_sha256": model.config_sha256}
    if model.source == "hub":
        ref.update(hub_id=model.path, revision=model.revision, hub_id_source="spec model.path",
                   adapter_base=model.path)
        return ref
    local = bundle.resolve(model.path)
    ref["project_path"] = model.path  # relative to the project, '..' for an allowed external path
    ref["relative_to_export"] = Path(os.path.relpath(local, export_dir)).as_posix()
    snapshot = _cache_snapshot_id(local)
    if snapshot is not None:
        ref.update(hub_id=snapshot[0], revision=snapshot[1], hub_id_source="hugging face cache snapshot")
    else:
        ref["declared_hub_id"] = _declared_hub_id(local)
    ref["adapter_base"] = ref["hub_id"] or ref["relative_to_export"]
    return ref


# --- files -----------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    # contents only, streamed (weight shards can be tens of GB); the checkpoint's timestamps and
    # modes are not part of what is exported
    shutil.copyfile(src, dst)


def _copy_full(ckpt: Path, stage: Path) -> list[str]:
    weights = sorted(p.name for p in ckpt.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in ckpt.glob("*.bin"))
        raise RunError(f"{ckpt}: no safetensors weights to export"
                       + (f" (found pickle file(s) {pickles}; sftc exports safetensors only)" if pickles else ""))
    if not (ckpt / "config.json").is_file():
        raise RunError(f"{ckpt}: config.json missing; cannot export a full model without it")
    names = weights + [n for n in FULL_FILES if (ckpt / n).is_file()]
    for name in names:
        _copy(ckpt / name, stage / name)
    return names


def _copy_adapter(ckpt: Path, stage: Path, base: dict) -> list[str]:
    missing = [n for n in ADAPTER_FILES if not (ckpt / n).is_file()]
    if missing:
        raise RunError(f"{ckpt}: adapter file(s) {missing} missing; cannot export a LoRA checkpoint without them")
    _copy(ckpt / "adapter_model.safetensors", stage / "adapter_model.safetensors")
    config = read_json(ckpt / "adapter_config.json")
    # The checkpoint names the base as the trainer saw it (an absolute path of this machine); the
    # export names it so it resolves elsewhere: a hub id, or the path relative to the export.
    config["base_model_name_or_path"] = base["adapter_base"]
    config["revision"] = base["revision"] if base["hub_id"] else None
    (stage / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(ADAPTER_FILES)


def _stop_ids(lock: Lock, existing: Any) -> list[int]:
    ids: list[int] = []
    for value in (existing, lock.tokenizer.eos_token_id, lock.template.terminator_id if lock.template else None):
        for i in ([value] if isinstance(value, int) else list(value or [])):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _write_generation_config(model_dir: Path, lock: Lock, source_dir: Path | None) -> None:
    """The turn terminator ends generation in the exported model as it did during held-out eval.
    Starts from model_dir's own generation config, else source_dir's (the base's), else defaults."""
    from transformers import GenerationConfig

    config = None
    for candidate in (model_dir, source_dir):
        if candidate is not None and (candidate / "generation_config.json").is_file():
            config = GenerationConfig.from_pretrained(candidate)
            break
    if config is None:
        config = GenerationConfig()
    stops = _stop_ids(lock, config.eos_token_id)
    if stops:
        config.eos_token_id = stops if len(stops) > 1 else stops[0]
    pad = lock.tokenizer.pad_token_id
    if config.pad_token_id is None and pad is not None:
        config.pad_token_id = pad
    config.save_pretrained(model_dir)


# --- the chat template, with the training system message as its default ------------------------


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal. Everything but ASCII letters, digits and spaces is a
    \\u / \\U escape (Jinja unescapes literals like Python's unicode-escape), so no quote, brace
    or `%}` in a system message can end the literal or the tag."""
    out = []
    for char in text:
        if char.isascii() and (char.isalnum() or char == " "):
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def template_with_system(template_text: str, system: str | None) -> str:
    """The bundle's template, prefixed so it adds the training system message exactly where the
    compiler did (compiler/template.py `Template.render`: when the conversation is empty or does
    not start with a system message). Transformers saves no default template variables with a
    tokenizer, so the default lives in the template itself."""
    if system is None:
        return template_text
    return ("{#- sftc: the training system message, used unless the conversation brings its own -#}\n"
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(system) + "}] + messages -%}"
            "{%- endif -%}\n" + template_text)


def _check_template(tokenizer, lock: Lock, template_text: str, exported: str) -> None:
    """The exported template, given no system message, renders what the compiler rendered with the
    training system message; a template it cannot wrap is refused rather than exported wrong."""
    from sftc.compiler.template import Template

    info = lock.template
    compiled = Template(template_text, info.version, info.source, info.path, info.terminator, info.terminator_id,
                        info.system)
    for messages, generation in (([{"role": "user", "content": "sftc probe"}], True),
                                 ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}], True)):
        want = compiled.render(tokenizer, messages, add_generation_prompt=generation)
        got = tokenizer.apply_chat_template(messages, chat_template=exported, tokenize=False,
                                            add_generation_prompt=generation)
        if got != want:
            raise RunError("export: the exported chat template does not reproduce the training prompt with its "
                           "system message", [f"compiled: {want[:200]!r}", f"exported: {got[:200]!r}"])


def _save_tokenizer(bundle: Bundle, targets: list[Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer_path)
    template_text = bundle.chat_template  # the verified bytes the tokens were rendered with
    if template_text is not None and bundle.lock.template is not None:
        exported = template_with_system(template_text, bundle.lock.template.system)
        _check_template(tokenizer, bundle.lock, template_text, exported)
        tokenizer.chat_template = exported
    for target in targets:
        tokenizer.save_pretrained(target)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _merge(stage: Path, target: Path, bundle: Bundle) -> dict:
    """Adapter merged into a float base loaded fresh from the locked base directory.

    For qlora the base is the original float weights, not a de-quantization of the 4-bit copy the
    adapter was trained against: the merged model differs from the evaluated one by the
    quantization error, and the model card says so.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec_model = bundle.spec.model
    base = AutoModelForCausalLM.from_pretrained(
        bundle.model_path, dtype=_torch_dtype(spec_model.dtype), trust_remote_code=spec_model.trust_remote_code,
    )
    model = PeftModel.from_pretrained(base, str(stage))
    merged = model.merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    return {"dtype": spec_model.dtype}


def _sha_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_export(export_dir) -> bool:
    """Check an export (or its merged/) against the sha256s its provenance.json lists, before any
    of it is loaded: a damaged or edited file is named, never fed to a loader. False when there is
    no provenance.json to check against (not an sftc export). Costs one read of the weights
    (~0.5 GB/s: ~30 s for a 7B model)."""
    export_dir = Path(export_dir).resolve()  # `sftc chat .` inside merged/ must still find ../provenance.json
    for root, prefix in ((export_dir, ""), (export_dir.parent, export_dir.name + "/")):
        provenance = root / "provenance.json"
        if provenance.is_file():
            break
    else:
        return False
    try:
        listed = read_json(provenance).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise RunError(f"{provenance}: unreadable ({exc}); re-export the run: sftc export RUN_DIR") from None
    if not isinstance(listed, dict):
        raise RunError(f"{provenance}: has no files table; re-export the run: sftc export RUN_DIR")
    mine = {name[len(prefix):]: digest for name, digest in listed.items()
            if isinstance(name, str) and name.startswith(prefix) and (prefix or not name.startswith("merged/"))}
    problems = []
    for name, digest in sorted(mine.items()):
        path = export_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from {provenance.name}")
    if problems:
        raise RunError(f"{export_dir}: the export does not match its provenance.json; it was damaged or edited",
                       problems + ["re-export the run (`sftc export RUN_DIR`), or copy the export again"])
    return True


def export_run(run_dir, allow_ineligible: bool = False) -> Path:
    """Write `run_dir/export/` from the checkpoint best.json selects; returns its path.

    Refuses when no checkpoint is eligible (unless `allow_ineligible` or the rule's
    export_if_none_eligible), when the selected checkpoint is gone or fails its hashes, or when the
    bundle's chat template no longer matches its lock.
    """
    run_dir = Path(run_dir)
    best = read_best(run_dir)
    if best is None:
        raise RunError(f"{run_dir}: no best.json; select a checkpoint before exporting")
    step, eligible = _export_step(run_dir, best, allow_ineligible)

    bundle = load_bundle(bundle_dir_of(run_dir))  # the sealed lock and verified bundle files
    lock = bundle.lock
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    if not ckpt.is_dir():
        raise RunError(f"{ckpt}: step {step} was selected but its checkpoint is not on disk "
                       "(rotation must never delete the best checkpoint)")
    problems = checkpoint_problems(ckpt, lock.bundle_id)
    if problems:
        raise RunError(f"{ckpt}: refusing to export a checkpoint that fails verification", problems)
    manifest = read_json(ckpt / "checkpoint.json")
    for key, locked in (("tokenizer_version", lock.tokenizer_version), ("template_version", lock.template_version)):
        if manifest.get(key) and locked and manifest[key] != locked:
            raise RunError(f"{ckpt}: checkpoint {key} {manifest[key]} differs from the bundle's {locked}")

    param = lock.spec.parameterization
    final = run_dir / "export"
    base = base_reference(bundle, final.resolve())
    with staging_dir(final, replace=True) as stage:
        if param.kind == "full":
            copied = _copy_full(ckpt, stage)
        else:
            copied = _copy_adapter(ckpt, stage, base)
        # an adapter export gets one too, from the base's: peft ignores it, `sftc chat` and deployers
        # read the stop ids from it
        _write_generation_config(stage, lock, bundle.model_dir if param.kind != "full" else None)
        merged_dir = stage / "merged" if param.kind != "full" and getattr(param, "merge_on_export", False) else None
        merged_info = None
        if merged_dir is not None:
            merged_info = _merge(stage, merged_dir, bundle)
            _write_generation_config(merged_dir, lock, None)
        _save_tokenizer(bundle, [stage] + ([merged_dir] if merged_dir else []))
        candidate = next((c for c in best.get("candidates", []) if c.get("step") == step), {})
        provenance = _provenance(run_dir, bundle, manifest, best, step, eligible, candidate, base, merged_info)
        if merged_dir is not None:
            (merged_dir / "README.md").write_text(model_card(provenance, lock, best, merged_card=True), encoding="utf-8")
        (stage / "README.md").write_text(model_card(provenance, lock, best), encoding="utf-8")
        provenance["files"] = _sha_files(stage)
        # the checkpoint's files that the export carries unchanged, by the hash checkpoint.json sealed;
        # the others (adapter_config.json naming this machine's base path, optimizer and RNG state) stay behind
        listed = manifest.get("files") or {}
        provenance["from_checkpoint"] = {
            name: provenance["files"][name] for name in copied
            if provenance["files"].get(name) == str(listed.get(name, "")).removeprefix("sha256:")}
        (stage / "provenance.json").write_text(pretty_json(provenance), encoding="utf-8")
    return final


def _project_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name  # outside the project: its name only, never this machine's path


def _provenance(run_dir: Path, bundle: Bundle, manifest: dict, best: dict, step: int, eligible: bool,
                candidate: dict, base: dict, merged_info: dict | None) -> dict:
    lock = bundle.lock
    spec = lock.spec
    metrics = dict(manifest.get("metrics") or {})
    for key, value in candidate.items():
        if key not in ("step", "eligible", "failed", "rank", "on_disk", "checkpoint") and key not in metrics:
            metrics[key] = value
    template = lock.template
    evaluation = lock.eval_manifest
    return {
        "bundle_id": lock.bundle_id,
        "inputs_hash": lock.inputs_hash,
        "bundle_dir": _project_path(bundle.dir, bundle.project_root),
        "name": lock.name,
        "run": run_dir.name,
        "step": step,
        "eligible": eligible,
        "checkpoint": f"checkpoints/checkpoint-{step}",
        "base_model": base,
        "parameterization": spec.parameterization.model_dump(mode="json"),
        "objective": spec.objective,
        "merged": merged_info,
        "prompt": {"chat_template": template is not None, "system": template.system if template else None,
                   "terminator": template.terminator if template else None,
                   "template_source": template.source if template else None},
        "data_manifest": {"hash": lock.data_manifest.hash,
                          "files": [{"path": f.path, "sha256": f.sha256} for f in lock.data_manifest.files]},
        "template_version": lock.template_version,
        "tokenizer_version": lock.tokenizer_version,
        "evaluation": {"hash": evaluation.hash, "rules_sha256": evaluation.rules_sha256,
                       "held_out_prompts": evaluation.prompts, "held_out_examples": evaluation.examples,
                       "scored": metrics.get("n_prompts")},
        "parameters": lock.parameters.model_dump(mode="json"),
        "budget": {**lock.budget.model_dump(mode="json"), **lock.batch.model_dump(mode="json"),
                   "examples_per_update": lock.batch.examples_per_update},
        "libraries": lock.libraries,
        "metrics": metrics,
        "selection": {"rule": best.get("rule"), "why": best.get("why"), "best_step": best.get("best_step"),
                      "lowest_loss_step": best.get("lowest_loss_step")},
    }
