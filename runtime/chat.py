"""`sftc generate` and `sftc chat`: a quick try of an export, prompted the way it was trained.

Loads a full export, an adapter export (its base found the way `adapter_config.json` names it:
a path relative to the export directory, or a hub id) or `merged/`, and replies greedily with the
held-out evaluation's own generation code (runtime/evaluate/generate.py), so what a person sees
here is what the selection scored. Prompts go through the exported tokenizer's chat template,
which adds the training system message unless the conversation brings its own.

It lives in the runtime, not in review/, because it loads weights and runs the model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

from sftc.errors import RunError
from sftc.io import read_json
from sftc.runtime.export import is_hub_id, verify_export


def _load_failure(what: str, location: str, exc: Exception, hint: str) -> RunError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return RunError(f"{what} {location} could not be loaded: {first[:300]}", [hint])


def adapter_base_location(export_dir: Path, config: dict) -> tuple[str, str | None]:
    """(where to load the base from, revision) for an adapter export."""
    named = config.get("base_model_name_or_path")
    if not named:
        raise RunError(f"{export_dir / 'adapter_config.json'}: base_model_name_or_path is empty; "
                       "the adapter does not say which base it belongs to")
    local = export_dir / named
    if Path(named).is_absolute() or local.exists():
        return str(local), None
    if is_hub_id(named):
        return named, config.get("revision")
    raise RunError(
        f"{export_dir / 'adapter_config.json'}: base_model_name_or_path {named!r} is a path relative to the export, "
        f"and nothing is there ({local.resolve()})",
        ["put the base model there (the model card says which one and its config sha256), "
         "or load the self-contained merged/ export instead"],
    )


def load_export(export_dir) -> tuple[object, object, list[int]]:
    """(model, tokenizer, stop token ids) of an export directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per model would bury a one-line reply
    export_dir = Path(export_dir)
    adapter = export_dir / "adapter_config.json"
    if not adapter.is_file() and not (export_dir / "config.json").is_file():
        raise RunError(f"{export_dir}: not a model export (no config.json or adapter_config.json)",
                       ["point at runs/<id>/export or runs/<id>/export/merged"])
    if not verify_export(export_dir):
        print(f"sftc: warning: {export_dir} has no provenance.json (not an sftc export?); its files are loaded "
              "unverified", file=sys.stderr)
    if adapter.is_file():
        from peft import PeftModel

        location, revision = adapter_base_location(export_dir, read_json(adapter))
        try:
            base = AutoModelForCausalLM.from_pretrained(location, revision=revision)
        except (OSError, ValueError) as exc:
            raise _load_failure("the adapter's base model", location, exc,
                                f"fetch it first (`hf download {location}`) or load merged/ instead"
                                if is_hub_id(location) else "check the base model directory") from None
        try:
            model = PeftModel.from_pretrained(base, str(export_dir))
        except Exception as exc:  # noqa: BLE001 - safetensors, peft and json errors alike: the file is named
            raise _load_failure("the adapter in", str(export_dir), exc, "re-export the run") from None
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(export_dir)
        except Exception as exc:  # noqa: BLE001 - a SafetensorError or a JSON error is not an OSError
            raise _load_failure("the model in", str(export_dir), exc, "re-export the run") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer.json that is not UTF-8
        raise _load_failure("the tokenizer in", str(export_dir), exc, "re-export the run") from None
    stops: list[int] = []
    if (export_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(export_dir).eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [])
    return model.eval(), tokenizer, stops


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation as the model saw prompts in training: through the exported chat template,
    or as plain text for a model without one (continued pretraining)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]


def reply(model, tokenizer, stops: list[int], messages: list[dict], max_new_tokens: int) -> str:
    from sftc.runtime.evaluate.generate import generate_replies

    return generate_replies(model, tokenizer, [prompt_ids(tokenizer, messages)], max_new_tokens, 1, stops)[0]


def _opening(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system is not None else []


def generate_once(export_dir, prompt: str, system: str | None = None, max_new_tokens: int = 256) -> str:
    model, tokenizer, stops = load_export(export_dir)
    return reply(model, tokenizer, stops, _opening(system) + [{"role": "user", "content": prompt}], max_new_tokens)


def chat(export_dir, lines: Iterable[str], write: Callable[[str], None], system: str | None = None,
         max_new_tokens: int = 256, prompt_marker: Callable[[], None] | None = None) -> int:
    """One reply per input line, keeping the conversation; `/clear` starts over, `/exit` ends.
    Returns the number of replies."""
    model, tokenizer, stops = load_export(export_dir)
    history = _opening(system)
    replies = 0
    if prompt_marker:
        prompt_marker()
    try:
        for line in lines:
            text = line.rstrip("\n")
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/clear":
                history = _opening(system)
            elif text.strip():
                history.append({"role": "user", "content": text})
                answer = reply(model, tokenizer, stops, history, max_new_tokens)
                history.append({"role": "assistant", "content": answer})
                write(answer)
                replies += 1
            if prompt_marker:
                prompt_marker()
    except KeyboardInterrupt:  # Ctrl-C ends a chat like /exit, not with a traceback
        pass
    return replies
