"""Pass 4: the chat template and the tokenizer, each pinned by the hash of its bytes.

Templates render through transformers' `apply_chat_template`, which compiles them in Jinja2's
ImmutableSandboxedEnvironment: a template is code from a file, and the sandbox keeps it away
from Python internals. Changing the template changes the training distribution, so its sha256
is the template's version and part of the bundle hash.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sftc.errors import SpecError
from sftc.io import sha256_bytes, sha256_tree
from sftc.yaml import read_text_file

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)
_PROBE_ANSWER = "SFTC_ANSWER_PROBE_7f3a"
MAX_TEMPLATE_BYTES = 1 << 20
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


# Limits on one render. A chat template is code from a file, and transformers' sandbox keeps it
# away from Python internals but not from spending time or memory: `{{ 'a' * 10**10 }}` or nested
# `range(100000)` loops would hang or kill the compile. A real template renders a row in well
# under a millisecond, into text a few times the row's size.
RENDER_SECONDS = 5.0
MAX_RENDERED_CHARS = 1 << 24
RENDER_MEMORY_HEADROOM = 2 << 30  # address space a render may add before it gets a MemoryError


class TemplateRenderError(SpecError):
    """The chat template failed on a row: an error in the template, not in the row."""


class _RenderTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _RenderTimeout()


@contextmanager
def render_limits():
    """The scope renders run in (re-entrant: the outermost sets it up, so a pass over 38k rows pays
    for it once). It caps the address space: RLIMIT_AS turns any allocation past the headroom (a
    filter, `~` concatenation, a multiplied string) into a MemoryError inside the render, whichever
    jinja operation made it (Linux; elsewhere the time and output limits still hold). In the main
    thread it installs the SIGALRM handler guarded_render's wall clock needs.
    """
    global _scope_depth, _timed
    _scope_depth += 1
    if _scope_depth > 1:
        try:
            yield
        finally:
            _scope_depth -= 1
        return
    restore = []
    try:
        if threading.current_thread() is threading.main_thread():
            restore.append(lambda previous=signal.signal(signal.SIGALRM, _on_alarm): signal.signal(signal.SIGALRM, previous))
            _timed = True
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            with open("/proc/self/statm", "rb") as handle:
                in_use = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            cap = in_use + RENDER_MEMORY_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
            restore.append(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))
        except (ImportError, OSError, ValueError):
            pass
        yield
    finally:
        _scope_depth -= 1
        _timed = False
        for undo in reversed(restore):
            undo()


_scope_depth = 0
_timed = False


def _timed_render(render):
    if not _timed:
        return render()
    signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        return render()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def guarded_render(render, where: str, what: str) -> str:
    """Run `render()` (one apply_chat_template call) under the time, memory and output limits.

    Any failure is a TemplateRenderError naming the template (`where`) and the row (`what`). The
    wall-clock limit is a SIGALRM timer, since a jinja loop can spin without calling back into
    sftc; signals only reach the main thread, so elsewhere only memory and output are bounded.
    """
    try:
        if _scope_depth:  # inside a pass's scope already: only the timer is per render
            text = _timed_render(render)
        else:
            with render_limits():
                text = _timed_render(render)
    except _RenderTimeout:
        raise TemplateRenderError(f"{where}: rendering {what} took more than {RENDER_SECONDS:g} s; refused "
                                  "(a loop in the template?)") from None
    except MemoryError:
        raise TemplateRenderError(f"{where}: rendering {what} needed more than "
                                  f"{RENDER_MEMORY_HEADROOM >> 30} GiB; refused") from None
    except RecursionError:
        raise TemplateRenderError(f"{where}: rendering {what} recursed too deeply; refused") from None
    except Exception as exc:  # jinja errors, SecurityError from the sandbox, or anything the template raised
        raise TemplateRenderError(f"{where}: rendering {what} failed: {exc.__class__.__name__}: "
                                  f"{str(exc)[:300]}") from None
    if not isinstance(text, str):
        raise TemplateRenderError(f"{where}: rendering {what} gave a {type(text).__name__}, not text")
    if len(text) > MAX_RENDERED_CHARS:
        raise TemplateRenderError(f"{where}: rendering {what} gave {len(text)} characters, more than "
                                  f"{MAX_RENDERED_CHARS}; refused")
    return text


@dataclass
class Template:
    text: str
    version: str
    source: str  # "file" or "tokenizer"
    path: str | None
    terminator: str
    terminator_id: int
    system: str | None
    # strings that tokenize to a control token of this template; text holding one is a
    # control_token_in_text reject (compiler/tokens.py) unless data.allow_control_tokens
    control_tokens: tuple[str, ...] = ()

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool, row: str = "a conversation") -> str:
        """The template applied by transformers (its sandbox), under sftc's limits (guarded_render)."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}, *messages]
        return guarded_render(
            lambda: tokenizer.apply_chat_template(
                messages, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt
            ),
            f"template.chat: {self.path or 'the tokenizer template'}", row,
        )


def detect_terminator(tokenizer, template_text: str, declared: str | None, where: str = "the template") -> tuple[str, int]:
    """The end-of-turn string the template writes right after an answer.

    It must be supervised (the model has to learn when to stop), so it must be one token.
    """
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    rendered = guarded_render(lambda: tokenizer.apply_chat_template(messages, chat_template=template_text, tokenize=False),
                              f"template.chat: {where}", "the terminator probe conversation")
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


def control_tokens(tokenizer, template_text: str | None) -> tuple[str, ...]:
    """Strings that become a special or control token when text containing them is tokenized.

    transformers' own rule first (`_get_control_tokens`: every special added token, and added
    tokens written literally in the template, what `apply_chat_template(sanitize_control_tokens=
    True)` guards). It misses role markers a template builds from pieces (`'<|' + role + '|>'`),
    so added tokens that appear in a rendered probe conversation count too.
    """
    added = [t for t in tokenizer.added_tokens_decoder.values() if t.content and not t.content.isspace()]
    found = {t.content for t in added if t.special}
    found |= {t for t in tokenizer.all_special_tokens if t and not t.isspace()}
    if template_text is not None:
        try:
            found |= set(tokenizer._get_control_tokens(template_text))  # private in transformers 5; the rule itself
        except Exception:  # an older transformers or a template jinja cannot parse: the probe below still runs
            pass
        probe = [{"role": "system", "content": _PROBE_ANSWER}, {"role": "user", "content": _PROBE_ANSWER},
                 {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            rendered = guarded_render(lambda: tokenizer.apply_chat_template(probe, chat_template=template_text,
                                                                            tokenize=False), "template.chat", "a probe")
        except SpecError:  # templates that refuse a system turn: user and assistant only
            rendered = guarded_render(lambda: tokenizer.apply_chat_template(probe[1:], chat_template=template_text,
                                                                            tokenize=False), "template.chat", "a probe")
        rendered = rendered.replace(_PROBE_ANSWER, "\0")
        found |= {t.content for t in added if t.content in rendered}
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


def load_template(spec, tokenizer, chat_path: Path | None, display: str | None) -> Template | None:
    """The template for this run; None for text (continued pretraining) runs."""
    if spec.data.format == "text":
        return None
    if chat_path is not None:
        text, raw = read_text_file(chat_path, "chat template", SpecError, max_bytes=MAX_TEMPLATE_BYTES)
        source = "file"
    else:
        text = tokenizer.chat_template
        if not isinstance(text, str) or not text:
            raise SpecError("template.chat: the tokenizer has no chat template; set template.chat to a file")
        raw, source = text.encode("utf-8"), "tokenizer"
    try:
        terminator, terminator_id = detect_terminator(tokenizer, text, spec.template.terminator, display or "the tokenizer template")
    except SpecError:
        raise
    except Exception as exc:  # jinja errors, including SecurityError from the sandbox
        raise SpecError(f"template.chat: the template failed to render: {exc.__class__.__name__}: {exc}") from None
    controls = () if getattr(spec.data, "allow_control_tokens", False) else control_tokens(tokenizer, text)
    return Template(text, "sha256:" + sha256_bytes(raw), source, display, terminator, terminator_id, spec.template.system,
                    controls)


def is_hub_id(location: str) -> bool:
    return bool(_HUB_ID.match(location))


def local_dir(location: str, revision: str | None, key: str, repo_type: str = "model") -> Path:
    """A model or tokenizer location (or, with repo_type "dataset", a hub dataset id) as a local
    directory: hub ids resolve through the local cache only, never the network."""
    path = Path(location)
    # Project paths arrive resolved against the spec's project (absolute). A relative location is a
    # hub id, never a directory under the current working directory: `model.path: m` missing from
    # the project but present in the cwd was loaded from outside the project.
    if path.is_absolute():
        if path.is_dir():
            return path
        raise SpecError(f"{key}: {location}: directory not found")
    if not _HUB_ID.match(location):
        raise SpecError(f"{key}: {location}: not a directory in the project, and not a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, repo_type=repo_type, revision=revision, local_files_only=True))
    except Exception:
        fetch = f"hf download {location}" + (" --repo-type dataset" if repo_type == "dataset" else "") \
            + (f" --revision {revision}" if revision else "")
        if repo_type == "dataset":
            raise SpecError(
                f"{key}: {location!r} is neither a directory in the project nor a hub dataset id in the local "
                f"Hugging Face cache{f' at revision {revision!r}' if revision else ''} (no download is attempted "
                f"at compile time); fetch it once with `{fetch}`, or save it with save_to_disk into the project"
            ) from None
        raise SpecError(
            f"{key}: {location!r} is neither a local directory nor a hub id in the local cache "
            f"(no download is attempted at compile or run time); fetch it once with `{fetch}`, "
            "or point model.path (and model.tokenizer) at a local directory"
        ) from None
