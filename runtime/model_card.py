"""The export's model card: Hub-valid front matter and a body that says where every part came from.

The front matter is built by huggingface_hub's own `ModelCardData` (with `EvalResult` for the
`model-index`), so what the Hub's card spec accepts is decided by the Hub's library, not by a
hand-written YAML dump. Everything in the card comes from `provenance.json`; nothing names a
path of the machine that trained the model.
"""

from __future__ import annotations

import json
from typing import Any

from sftc.lock import Lock
from sftc.runtime.rundir import DIAGNOSTICS

TASK = "text-generation"
QLORA_MERGE_NOTE = ("The merge uses the original float base weights; the adapter was trained and evaluated against "
                    "the 4-bit base, so merged outputs can differ slightly from the metrics below.")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and {"min", "mean", "max"} <= set(value):
        return f"mean {_fmt(value['mean'])} (min {_fmt(value['min'])}, max {_fmt(value['max'])})"
    return "-" if value is None else str(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_metrics(p: dict) -> dict[str, float]:
    """The selected checkpoint's model metrics: loss and behaviour, not counts about the evaluation."""
    return {k: v for k, v in sorted(p["metrics"].items()) if _number(v) and k not in DIAGNOSTICS}


def front_matter(p: dict, library: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    base = p["base_model"]
    evaluation = p["evaluation"]
    results = [
        EvalResult(task_type=TASK, dataset_type=f"sftc-held-out/{p['bundle_id']}",
                   dataset_name=f"{p['name']} held-out split ({evaluation['scored']} prompts)",
                   dataset_split="eval", metric_type=name, metric_name=name, metric_value=value)
        for name, value in model_metrics(p).items()
    ]
    data = ModelCardData(
        model_name=p["name"],
        # Only a hub id: the Hub's spec links base_model to a model page, a local path means nothing there.
        base_model=base.get("hub_id") or base.get("declared_hub_id"),
        # no `datasets`: sftc's data are project files, not Hub datasets; the body lists the data manifest
        library_name=library,
        pipeline_tag=TASK,
        tags=["sftc", "sft" if p["objective"] == "sft" else str(p["objective"]), p["parameterization"]["kind"]]
        + (["peft", "lora"] if library == "peft" else []),
        eval_results=results or None,
    )
    return "---\n" + data.to_yaml() + "\n---\n"


def _how_to_load(p: dict, merged_card: bool) -> list[str]:
    kind = p["parameterization"]["kind"]
    base = p["base_model"]
    if kind == "full" or merged_card:
        what = "Full fine-tune." if kind == "full" else (
            f"The {kind.upper()} adapter merged into the {p['merged']['dtype']} base; self-contained.")
        lines = [f"{what} Load with `AutoModelForCausalLM.from_pretrained(\"<this dir>\")`."]
        if merged_card and kind == "qlora":
            lines += [QLORA_MERGE_NOTE]
        return lines + [""]
    lines = [f"{kind.upper()} adapter. `adapter_config.json` names its base as `{base['adapter_base']}`"]
    if base.get("hub_id"):
        lines[-1] += (f" (a Hugging Face hub id, revision `{base.get('revision')}`), so "
                      "`AutoPeftModelForCausalLM.from_pretrained(\"<this dir>\")` works anywhere the hub or its "
                      "cache is reachable.")
    else:
        lines[-1] += (f": a path relative to this directory, where the base sits when the training project is "
                      f"copied whole (project path `{base.get('project_path')}`, config sha256 "
                      f"`{base.get('config_sha256')}`). Put the base there and load from inside this directory "
                      "(peft resolves the path against the working directory): "
                      "`cd <this dir> && python -c 'from peft import AutoPeftModelForCausalLM; "
                      "AutoPeftModelForCausalLM.from_pretrained(\".\")'`; or load it yourself: "
                      "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"<this dir>\")`.")
    if base.get("declared_hub_id") and not base.get("hub_id"):
        lines += [f"The base's config.json declares it was made from `{base['declared_hub_id']}`; that is lineage, "
                  "not proof the weights are the same, so the adapter does not point there."]
    if p["merged"]:
        lines += ["`merged/` holds the adapter merged into the base, the self-contained option "
                  "(`AutoModelForCausalLM.from_pretrained(\"<this dir>/merged\")`)."]
        if kind == "qlora":
            lines += [QLORA_MERGE_NOTE]
    return lines + [""]


def _prompting(p: dict) -> list[str]:
    prompt = p.get("prompt") or {}
    if not prompt.get("chat_template"):
        return ["No chat template: this is a text model (continued pretraining).", ""]
    lines = ["## Prompting", "",
             "The tokenizer's chat template is the one the training tokens were rendered with; prompt with "
             "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`."]
    if prompt.get("system") is not None:
        lines += ["It renders the training system message by default (when the conversation does not start with "
                  "a system message of its own), so a user message alone gives exactly the prompt tokens the model "
                  "was trained and evaluated on. The training system message:", "", "```text", prompt["system"], "```"]
    lines += ["", f"Generation stops at `{prompt.get('terminator')}`. Try it: `sftc generate <this dir> --prompt \"...\"` "
              "or `sftc chat <this dir>`.", ""]
    return lines


def _selection(p: dict, best: dict, lock: Lock) -> list[str]:
    lines = ["## Why this checkpoint", "", best.get("why", "-"), ""]
    rule = p["selection"]["rule"] or {}
    lines += [f"Rule: require {json.dumps(rule.get('require', {}))}, maximize `{rule.get('maximize')}`, "
              f"tie-break {json.dumps(rule.get('tie_break', []))}.", ""]
    cands = best.get("candidates") or []
    if not cands:
        return lines
    names: list[str] = []
    for c in cands:
        for k, v in c.items():
            if k not in DIAGNOSTICS and k not in names and _number(v):
                names.append(k)
    names = [n for n in names if n in ("eval_loss", "val_loss") or n in lock.eval_manifest.metrics
             or n in rule.get("require", {}) or n == rule.get("maximize")] or names
    lines += ["| step | eligible | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for c in cands:
        mark = " (exported)" if c.get("step") == p["step"] else ""
        lines.append(f"| {c.get('step')}{mark} | {'yes' if c.get('eligible') else 'no'} | "
                     + " | ".join(_fmt(c.get(n)) for n in names) + " |")
    return lines + [""]


def _provenance_lines(p: dict) -> list[str]:
    budget = p["budget"] or {}
    params = p["parameters"] or {}
    base = p["base_model"]
    origin = f"hub `{base['hub_id']}` revision `{base.get('revision')}`" if base.get("hub_id") else (
        f"project path `{base.get('project_path')}`")
    evaluation = p["evaluation"]
    lines = ["## Provenance", "",
             f"- bundle: `{p['bundle_id']}` (inputs hash `{p['inputs_hash']}`), at `{p['bundle_dir']}` in the project",
             f"- base model: {origin}, config sha256 `{base.get('config_sha256')}`",
             f"- objective: {p['objective']}; parameterization: `{json.dumps(p['parameterization'], sort_keys=True)}`",
             f"- trainable parameters: {_fmt(params.get('trainable'))} of {_fmt(params.get('total'))} "
             f"({_fmt(params.get('trainable_fraction'))})",
             f"- data manifest: `{p['data_manifest']['hash']}` (project files, not on the Hub)"]
    for f in p["data_manifest"]["files"]:
        lines.append(f"  - `{f['path']}` sha256 `{f['sha256']}`")
    lines += [f"- chat template version: `{p['template_version']}`",
              f"- tokenizer version: `{p['tokenizer_version']}`",
              f"- eval manifest: `{evaluation.get('hash')}`, rules `{evaluation.get('rules_sha256')}`",
              f"- budget: {_fmt(budget.get('optimizer_steps'))} optimizer steps, "
              f"{_fmt(budget.get('examples_per_update'))} examples per update "
              f"(per_device {_fmt(budget.get('per_device'))} x grad_accum {_fmt(budget.get('grad_accum'))} "
              f"x world_size {_fmt(budget.get('world_size'))}), supervised tokens per update "
              f"{_fmt(budget.get('supervised_tokens_per_update'))}, total tokens {_fmt(budget.get('total_tokens'))}",
              f"- checkpoint: `{p['checkpoint']}` of run `{p['run']}`", ""]
    libs = p["libraries"] or {}
    if libs:
        lines += ["Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libs.items())), ""]
    return lines


def model_card(p: dict, lock: Lock, best: dict, merged_card: bool = False) -> str:
    """README.md of the export (or of `merged/` when `merged_card`)."""
    kind = p["parameterization"]["kind"]
    library = "peft" if kind in ("lora", "qlora") and not merged_card else "transformers"
    title = f"# {p['name']} (step {p['step']}{', merged' if merged_card else ''})"
    lines = [front_matter(p, library), title, ""]
    if not p["eligible"]:
        lines += ["> **Warning:** this checkpoint does NOT meet the selection constraints; it was exported "
                  "because export of an ineligible checkpoint was allowed.", ""]
    lines += _how_to_load(p, merged_card)
    lines += _prompting(p)

    evaluation = p["evaluation"]
    scored, held_out = evaluation.get("scored"), evaluation.get("held_out_prompts")
    lines += ["## Held-out metrics of this checkpoint", ""]
    if scored is not None:
        lines += [f"Behaviour scored on {scored} of the {held_out} held-out prompts (greedy decoding); "
                  f"eval loss over all {evaluation.get('held_out_examples')} held-out examples.", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in model_metrics(p).items()]
    lines += [""]
    lines += _selection(p, best, lock)
    lines += _provenance_lines(p)
    where = "../provenance.json" if merged_card else "`provenance.json`"
    lines += [f"{where} holds all of this in machine-readable form, with the sha256 of every exported file.", ""]
    return "\n".join(lines)
