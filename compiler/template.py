"""Pass 4: the chat template and the tokenizer, each pinned by the hash of its bytes.

Templates render through transformers' `apply_chat_template`, which compiles them in Jinja2's
ImmutableSandboxedEnvironment: a template is code from a file, and the sandbox keeps it away
from Python internals. Changing the template changes the training distribution, so its sha256
is the template's version and part of the bundle hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sftc.errors import SpecError
from sftc.io import sha256_bytes, sha256_tree

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)
_PROBE_ANSWER = "SFTC_ANSWER_PROBE_7f3a"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def tokenizer_files(directory: Path) -> list[str]:
    return sorted(name for name in TOKENIZER_FILES if (directory / name).is_file())


def tokenizer_version(directory: Path) -> tuple[str, list[str]]:
    names = tokenizer_files(directory)
    return "sha256:" + sha256_tree(directory, names), names


def load_tokenizer(location: str, revision: str | None, trust_remote_code: bool, key: str):
    """AutoTokenizer, with failures turned into an error that names the path."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raises bare Exception subclasses for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise SpecError(f"{key}: the tokenizer at {location} could not be loaded: {first[:300]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise SpecError(f"{key}: {location} gives a slow tokenizer; sftc needs a fast one (offset mapping for the mask)")
    return tokenizer


@dataclass
class Template:
    text: str
    version: str
    source: str  # "file" or "tokenizer"
    path: str | None
    terminator: str
    terminator_id: int
    system: str | None

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}, *messages]
        return tokenizer.apply_chat_template(
            messages, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def detect_terminator(tokenizer, template_text: str, declared: str | None) -> tuple[str, int]:
    """The end-of-turn string the template writes right after an answer.

    It must be supervised (the model has to learn when to stop), so it must be one token.
    """
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template_text, tokenize=False)
    at = rendered.find(_PROBE_ANSWER)
    if at < 0:
        raise SpecError("template: the template does not write the assistant's content verbatim")
    after = rendered[at + len(_PROBE_ANSWER) :]
    if declared is not None:
        if not after.startswith(declared):
            raise SpecError(
                f"template.terminator: {declared!r} does not follow the answer in the rendered template "
                f"(found {after[:20]!r})"
            )
        terminator = declared
    else:
        specials = sorted(
            {t for t in tokenizer.all_special_tokens} | {t.content for t in tokenizer.added_tokens_decoder.values()},
            key=len, reverse=True,
        )
        terminator = next((t for t in specials if t and after.startswith(t)), None)
        if terminator is None:
            raise SpecError(
                f"template.terminator: no special token follows the answer (found {after[:20]!r}); "
                "set template.terminator to the end-of-turn string"
            )
    ids = tokenizer(terminator, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SpecError(f"template.terminator: {terminator!r} is {len(ids)} tokens; it must be a single token")
    return terminator, ids[0]


def load_template(spec, tokenizer, chat_path: Path | None, display: str | None) -> Template | None:
    """The template for this run; None for text (continued pretraining) runs."""
    if spec.data.format == "text":
        return None
    if chat_path is not None:
        try:
            raw = chat_path.read_bytes()
        except FileNotFoundError:
            raise SpecError(f"template.chat: {display}: file not found") from None
        text, source = raw.decode("utf-8"), "file"
    else:
        text = tokenizer.chat_template
        if not isinstance(text, str) or not text:
            raise SpecError("template.chat: the tokenizer has no chat template; set template.chat to a file")
        raw, source = text.encode("utf-8"), "tokenizer"
    try:
        terminator, terminator_id = detect_terminator(tokenizer, text, spec.template.terminator)
    except SpecError:
        raise
    except Exception as exc:  # jinja errors, including SecurityError from the sandbox
        raise SpecError(f"template.chat: the template failed to render: {exc.__class__.__name__}: {exc}") from None
    return Template(text, "sha256:" + sha256_bytes(raw), source, display, terminator, terminator_id, spec.template.system)


def local_dir(location: str, revision: str | None, key: str) -> Path:
    """A model or tokenizer location as a local directory (hub ids resolve through the local cache only)."""
    path = Path(location)
    if path.is_dir():
        return path
    if not _HUB_ID.match(location):
        raise SpecError(f"{key}: {location}: directory not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, revision=revision, local_files_only=True))
    except Exception:
        raise SpecError(
            f"{key}: {location!r} is neither a local directory nor a hub id in the local cache "
            "(no download is attempted at compile time)"
        ) from None
