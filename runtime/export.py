"""Export the selected checkpoint as a Hugging Face model directory with its provenance.

`runs/<id>/export/` loads with `AutoModelForCausalLM.from_pretrained` (full) or
`AutoPeftModelForCausalLM.from_pretrained` (lora, qlora); `export/merged/` holds the adapter merged
into the base when the spec asks for it. The tokenizer carries the exact chat template the tokens
were rendered with, and README.md says where every part came from, so a deployed model can be
traced back to its bundle, data and selection.

Only safetensors and JSON are copied: optimizer and RNG pickles stay in the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sftc.errors import BundleError, RunError
from sftc.io import pretty_json, read_json, sha256_file

from sftc.runtime.rundir import bundle_dir_of, checkpoint_problems, lock_location, read_best

FULL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _export_step(run_dir: Path, best: dict, allow_ineligible: bool) -> tuple[int, bool]:
    step = best.get("best_step")
    if step is not None:
        return int(step), True
    fallback = best.get("fallback_step")
    allowed = allow_ineligible or (best.get("rule") or {}).get("export_if_none_eligible", False)
    if fallback is not None and allowed:
        return int(fallback), False
    raise RunError(
        f"{run_dir}: no checkpoint meets the selection rule, so nothing is exported",
        [best.get("why") or "best.json has no best_step",
         "to export the best ineligible checkpoint anyway: set select.export_if_none_eligible or force the export"],
    )


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
        shutil.copy2(ckpt / name, stage / name)
    return names


def _copy_adapter(ckpt: Path, stage: Path, base_location: str) -> list[str]:
    missing = [n for n in ADAPTER_FILES if not (ckpt / n).is_file()]
    if missing:
        raise RunError(f"{ckpt}: adapter file(s) {missing} missing; cannot export a LoRA checkpoint without them")
    shutil.copy2(ckpt / "adapter_model.safetensors", stage / "adapter_model.safetensors")
    config = read_json(ckpt / "adapter_config.json")
    # The checkpoint may name the base as the trainer saw it (a temp path, a relative path); the
    # export points at the base the lock pinned, so AutoPeftModelForCausalLM finds it.
    config["base_model_name_or_path"] = base_location
    (stage / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(ADAPTER_FILES)


def _stop_ids(lock: dict, existing: Any) -> list[int]:
    ids: list[int] = []
    for value in (existing, (lock.get("tokenizer") or {}).get("eos_token_id"),
                  (lock.get("template") or {}).get("terminator_id")):
        for i in ([value] if isinstance(value, int) else list(value or [])):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _write_generation_config(model_dir: Path, lock: dict, source_dir: Path | None) -> None:
    """The turn terminator ends generation in the exported model as it did during held-out eval."""
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
    pad = (lock.get("tokenizer") or {}).get("pad_token_id")
    if config.pad_token_id is None and pad is not None:
        config.pad_token_id = pad
    config.save_pretrained(model_dir)


def _save_tokenizer(tokenizer_location: str, target: Path, template_text: str | None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_location)
    if template_text is not None:
        tokenizer.chat_template = template_text
    tokenizer.save_pretrained(target)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _merge(stage: Path, target: Path, lock: dict, base_location: str) -> dict:
    """Adapter merged into a float base loaded fresh from the lock's model path.

    For qlora the base is the original float weights, not a de-quantization of the 4-bit copy the
    adapter was trained against: the merged model differs from the evaluated one by the
    quantization error, and the model card says so.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec_model = lock["spec"]["model"]
    dtype_name = spec_model.get("dtype", "float32")
    base = AutoModelForCausalLM.from_pretrained(
        base_location, revision=spec_model.get("revision"), dtype=_torch_dtype(dtype_name),
        trust_remote_code=bool(spec_model.get("trust_remote_code", False)),
    )
    model = PeftModel.from_pretrained(base, str(stage))
    merged = model.merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    return {"dtype": dtype_name, "base": base_location}


def _sha_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _swap_into_place(stage: Path, final: Path) -> None:
    """Rename the finished export over the old one. Directories cannot be exchanged atomically with
    a portable call, so the old one is moved aside first: `export/` is at any moment either the old
    complete export, absent for the two renames, or the new complete one; never a mix."""
    for file in stage.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.rename(final, old / final.name)
    os.rename(stage, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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

    bundle_dir = bundle_dir_of(run_dir)
    lock = read_json(bundle_dir / "bundle.lock.json")
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    if not ckpt.is_dir():
        raise RunError(f"{ckpt}: step {step} was selected but its checkpoint is not on disk "
                       "(rotation must never delete the best checkpoint)")
    problems = checkpoint_problems(ckpt, lock.get("bundle_id"))
    if problems:
        raise RunError(f"{ckpt}: refusing to export a checkpoint that fails verification", problems)
    manifest = read_json(ckpt / "checkpoint.json")
    for key in ("tokenizer_version", "template_version"):
        if manifest.get(key) and lock.get(key) and manifest[key] != lock[key]:
            raise RunError(f"{ckpt}: checkpoint {key} {manifest[key]} differs from the bundle's {lock[key]}")

    template_path = bundle_dir / "chat_template.jinja"
    template_text = None
    if template_path.is_file():
        found = "sha256:" + sha256_file(template_path)
        expected = lock.get("template_version")
        if expected and found != expected:
            raise BundleError(f"{template_path}: edited after compile (template_version {found}, lock says {expected})")
        template_text = template_path.read_text(encoding="utf-8")

    spec = lock["spec"]
    param = spec["parameterization"]
    kind = param["kind"]
    base_location = lock_location(bundle_dir, lock, (lock.get("inputs") or {}).get("model_path"), lock["model"]["path"])
    tokenizer_location = lock_location(bundle_dir, lock, (lock.get("inputs") or {}).get("tokenizer_path"),
                                       (lock.get("tokenizer") or {}).get("path")) or base_location

    final = run_dir / "export"
    stage = Path(tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=run_dir))
    try:
        if kind == "full":
            copied = _copy_full(ckpt, stage)
            _write_generation_config(stage, lock, None)
        else:
            copied = _copy_adapter(ckpt, stage, base_location)
        _save_tokenizer(tokenizer_location, stage, template_text)
        merged_info = None
        if kind != "full" and param.get("merge_on_export"):
            merged_dir = stage / "merged"
            merged_info = _merge(stage, merged_dir, lock, base_location)
            _write_generation_config(merged_dir, lock, None)
            _save_tokenizer(tokenizer_location, merged_dir, template_text)
        candidate = next((c for c in best.get("candidates", []) if c.get("step") == step), {})
        provenance = _provenance(run_dir, bundle_dir, lock, manifest, best, step, eligible, candidate, copied,
                                 base_location, merged_info)
        (stage / "README.md").write_text(_model_card(provenance, lock, best), encoding="utf-8")
        provenance["files"] = _sha_files(stage)
        (stage / "provenance.json").write_text(pretty_json(provenance), encoding="utf-8")
        _swap_into_place(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def _provenance(run_dir: Path, bundle_dir: Path, lock: dict, manifest: dict, best: dict, step: int, eligible: bool,
                candidate: dict, copied: list[str], base_location: str, merged_info: dict | None) -> dict:
    spec = lock["spec"]
    metrics = dict(manifest.get("metrics") or {})
    for key, value in candidate.items():
        if key not in ("step", "eligible", "failed", "rank", "on_disk", "checkpoint") and key not in metrics:
            metrics[key] = value
    data = lock.get("data_manifest") or {}
    return {
        "bundle_id": lock.get("bundle_id"),
        "bundle_hash": lock.get("bundle_hash"),
        "bundle_dir": str(bundle_dir),
        "run": run_dir.name,
        "step": step,
        "eligible": eligible,
        "checkpoint": f"checkpoints/checkpoint-{step}",
        "checkpoint_files": manifest.get("files"),
        "exported_from_checkpoint": copied,
        "base_model": {"path": base_location, "revision": spec["model"].get("revision"),
                       "config_sha256": (lock.get("model") or {}).get("config_sha256")},
        "parameterization": spec["parameterization"],
        "objective": spec.get("objective"),
        "merged": merged_info,
        "data_manifest": {"hash": data.get("hash"),
                          "files": [{"path": f.get("path"), "sha256": f.get("sha256")} for f in data.get("files", [])]},
        "template_version": lock.get("template_version"),
        "tokenizer_version": lock.get("tokenizer_version"),
        "eval_manifest": lock.get("eval_manifest"),
        "parameters": lock.get("parameters"),
        "budget": lock.get("budget"),
        "libraries": lock.get("libraries"),
        "metrics": metrics,
        "selection": {"rule": best.get("rule"), "why": best.get("why"), "best_step": best.get("best_step"),
                      "lowest_loss_step": best.get("lowest_loss_step")},
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and {"min", "mean", "max"} <= set(value):
        return f"mean {_fmt(value['mean'])} (min {_fmt(value['min'])}, max {_fmt(value['max'])})"
    return "-" if value is None else str(value)


def _model_card(p: dict, lock: dict, best: dict) -> str:
    param = p["parameterization"]
    kind = param["kind"]
    library = "peft" if kind in ("lora", "qlora") else "transformers"
    lines = ["---", f"library_name: {library}", f"base_model: {json.dumps(p['base_model']['path'])}",
             "tags: [sftc, sft]", "---", "", f"# {lock.get('name', p['bundle_id'])} (step {p['step']})", ""]
    if not p["eligible"]:
        lines += ["> **Warning:** this checkpoint does NOT meet the selection constraints; it was exported "
                  "because export of an ineligible checkpoint was allowed.", ""]
    if kind == "full":
        lines += ["Full fine-tune. Load with `AutoModelForCausalLM.from_pretrained(\"<this dir>\")`.", ""]
    else:
        lines += [f"{kind.upper()} adapter over `{p['base_model']['path']}`. Load with "
                  "`AutoPeftModelForCausalLM.from_pretrained(\"<this dir>\")`."]
        if p["merged"]:
            lines += [f"`merged/` holds the adapter merged into the {p['merged']['dtype']} base "
                      "(`AutoModelForCausalLM.from_pretrained(\"<this dir>/merged\")`)."]
            if kind == "qlora":
                lines += ["The merge uses the original float base weights; the adapter was trained and evaluated "
                          "against the 4-bit base, so merged outputs can differ slightly from the metrics below."]
        lines += [""]
    lines += ["The tokenizer's chat template is the one the training tokens were rendered with; prompt with "
              "`apply_chat_template(..., add_generation_prompt=True)`.", ""]

    lines += ["## Held-out metrics of this checkpoint", "", "| metric | value |", "|---|---|"]
    for key, value in sorted(p["metrics"].items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Why this checkpoint", "", best.get("why", "-"), ""]
    rule = p["selection"]["rule"] or {}
    lines += [f"Rule: require {json.dumps(rule.get('require', {}))}, maximize `{rule.get('maximize')}`, "
              f"tie-break {json.dumps(rule.get('tie_break', []))}.", ""]
    cands = best.get("candidates") or []
    if cands:
        names = []
        for c in cands:
            for k, v in c.items():
                if (k not in ("step", "eligible", "failed", "rank", "on_disk", "checkpoint") and k not in names
                        and isinstance(v, (int, float)) and not isinstance(v, bool)):
                    names.append(k)
        names = [n for n in names if n in ("eval_loss", "val_loss") or n in (lock.get("eval_manifest") or {}).get(
            "metrics", []) or n in rule.get("require", {}) or n == rule.get("maximize")] or names
        lines += ["| step | eligible | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for c in cands:
            mark = " (exported)" if c.get("step") == p["step"] else ""
            lines.append(f"| {c.get('step')}{mark} | {'yes' if c.get('eligible') else 'no'} | "
                         + " | ".join(_fmt(c.get(n)) for n in names) + " |")
        lines.append("")

    budget = p["budget"] or {}
    params = p["parameters"] or {}
    lines += ["## Provenance", "",
              f"- bundle: `{p['bundle_id']}` (hash `{p['bundle_hash']}`)",
              f"- base model: `{p['base_model']['path']}` revision `{p['base_model']['revision']}`, "
              f"config sha256 `{p['base_model']['config_sha256']}`",
              f"- objective: {p['objective']}; parameterization: `{json.dumps(param, sort_keys=True)}`",
              f"- trainable parameters: {_fmt(params.get('trainable'))} of {_fmt(params.get('total'))} "
              f"({_fmt(params.get('trainable_fraction'))})",
              f"- data manifest: `{p['data_manifest']['hash']}`"]
    for f in p["data_manifest"]["files"]:
        lines.append(f"  - `{f['path']}` sha256 `{f['sha256']}`")
    eval_manifest = p["eval_manifest"] or {}
    lines += [f"- chat template version: `{p['template_version']}`",
              f"- tokenizer version: `{p['tokenizer_version']}`",
              f"- eval manifest: `{eval_manifest.get('hash')}`, rules `{eval_manifest.get('rules_sha256')}`, "
              f"{eval_manifest.get('prompts')} held-out prompts",
              f"- budget: {_fmt(budget.get('optimizer_steps'))} optimizer steps, "
              f"{_fmt(budget.get('examples_per_update'))} examples per update "
              f"(per_device {_fmt(budget.get('per_device'))} x grad_accum {_fmt(budget.get('grad_accum'))} "
              f"x world_size {_fmt(budget.get('world_size'))}), supervised tokens per update "
              f"{_fmt(budget.get('supervised_tokens_per_update'))}, total tokens {_fmt(budget.get('total_tokens'))}",
              f"- checkpoint: `{p['checkpoint']}` of run `{p['run']}`", ""]
    libs = p["libraries"] or {}
    if libs:
        lines += ["Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())), ""]
    lines += ["`provenance.json` holds all of this in machine-readable form, with the sha256 of every exported file.", ""]
    return "\n".join(lines)
