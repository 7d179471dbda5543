"""Pass 5: tokenize with the real tokenizer and build the label mask, checked after truncation.

For a prompt/completion row the template renders twice: the prompt with the generation prompt,
and the whole conversation. The answer span is everything after the prompt render, from the
answer's first character through the turn terminator. Each token is supervised iff it starts
inside that span; every other position gets -100:

    <|user|>\\n Key T102 is stale. <|end|>\\n <|assistant|>\\n {"decision": ...} <|end|> \\n
    -100        -100 ...            -100       -100           ^^^^ answer ^^^^   term  -100

Multi-turn conversations supervise every assistant turn the same way (render the prefix up to
each answer with the generation prompt; the full render must extend it). This needs no
`{% generation %}` markers, and it verifies prefix-consistency row by row: a template that
rewrites earlier turns (e.g. drops reasoning) makes the row a reject with that reason, instead
of a silently wrong mask.

Truncation happens here, before packing; a row whose answer loses any token is rejected (or
fails the compile) and counted, never trained on with its answer cut away.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from sftc.compiler.data import Example, Reject
from sftc.compiler.store import IGNORE_INDEX, TokenStore
from sftc.compiler.template import MAX_RENDERED_CHARS, render_limits
from sftc.errors import DataError

__all__ = ["IGNORE_INDEX", "Tokenized", "tokenize_chat", "tokenize_text", "check_mask"]
MAX_ROW_CHARS = MAX_RENDERED_CHARS // 4  # a multi-turn row renders once per answer prefix and whole


@dataclass
class Tokenized:
    tokens: TokenStore  # ids and labels of each kept example, on disk (compiler/store.py)
    examples: list[Example] = field(default_factory=list)  # source row of each entry
    prompt_ids: list[np.ndarray] = field(default_factory=list)  # last prompt (for behaviour eval)
    rejects: list[Reject] = field(default_factory=list)
    truncated_rejected: int = 0


def answer_spans(example: Example, template, tokenizer, messages: list[dict] | None = None
                 ) -> tuple[str, list[tuple[int, int]], str] | str:
    """(full text, supervised character spans, final prompt text) or a reject reason. `messages`:
    the example's, when the caller has them already (each access may read them from disk)."""
    messages = example.messages if messages is None else messages
    row = example.where
    full = template.render(tokenizer, messages, add_generation_prompt=False, row=row)
    spans = []
    prompt_text = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = template.render(tokenizer, messages[:i], add_generation_prompt=True, row=row)
        if not full.startswith(prefix):
            return "template_not_prefix_consistent"
        at = full.find(message["content"], len(prefix))
        if at < 0:
            return "template_altered_answer"
        end = at + len(message["content"])
        if not full.startswith(template.terminator, end):
            return "no_terminator_after_answer"
        spans.append((len(prefix), end + len(template.terminator)))
        prompt_text = prefix
    return full, spans, prompt_text


def tokenize_chat(examples: list[Example], template, tokenizer, max_length: int, on_truncated: str,
                  store: TokenStore, with_prompts: bool = False, workers: int = 1) -> Tokenized:
    """Tokenize and mask chat rows into `store`; `with_prompts` also keeps the last prompt's ids (eval only)."""
    controls = control_token_pattern(template.control_tokens)

    def serial(rows: list[Example], out: Tokenized) -> None:
        for start in range(0, len(rows), _CHUNK):
            # rendered text is tokenized and dropped a chunk at a time, never held for every row
            _render_chunk(rows[start : start + _CHUNK], template, tokenizer, controls, max_length, on_truncated, out,
                          with_prompts)
        # out.rejects holds the render rejects of each chunk before its tokenizer rejects, not all render
        # rejects first: the bundle sorts rejects by (file, row), so its bytes do not depend on the chunking

    return _tokenize(examples, store, serial, workers)


class _Collected:
    """A Ray task's token arrays, held to be sent back: a Ray worker shares no disk with the compile."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def append(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.ids.append(np.asarray(ids, dtype=np.int32))
        self.labels.append(np.asarray(labels, dtype=np.int32))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(every example's ids end to end, the same for labels, where each example ends)."""
        empty = np.zeros(0, dtype=np.int32)
        ends = np.cumsum([len(ids) for ids in self.ids]).tolist()
        return (np.concatenate(self.ids) if self.ids else empty,
                np.concatenate(self.labels) if self.labels else empty, ends)


def _tokenize(examples: list[Example], store: TokenStore, serial, workers: int) -> Tokenized:
    """`serial(rows, out)` over the examples: in this process, or over contiguous ranges in worker
    processes (compiler/workers.py), each range's examples appended to `store` in order."""
    from sftc.compiler.workers import map_ranges

    out = Tokenized(store)
    store.flush()  # a forked worker must not inherit buffered writes
    parent = os.getpid()

    def task(k: int, lo: int, hi: int):
        rows = examples[lo:hi]
        if os.getpid() == parent:  # one range, run here
            serial(rows, out)
            return None
        part = Tokenized(store.part(k))
        serial(rows, part)
        part.tokens.finish()
        # the parent holds the same Example objects: it gets back their positions, not copies
        index = {id(example): i for i, example in enumerate(rows, lo)}
        return (part.tokens.state(), [index[id(e)] for e in part.examples], part.rejects, part.truncated_rejected,
                part.prompt_ids)

    def gather(lo: int, hi: int):  # on Ray: the rows go with their content, not where it is on this disk
        return lo, [example.detached() for example in examples[lo:hi]]

    def work(k: int, inputs):  # on a Ray worker, from the gathered rows alone; the tokens come back
        lo, rows = inputs
        part = Tokenized(_Collected())
        serial(rows, part)
        index = {id(example): i for i, example in enumerate(rows, lo)}
        return (part.tokens.arrays(), [index[id(e)] for e in part.examples], part.rejects, part.truncated_rejected,
                part.prompt_ids)

    for result in map_ranges(task, len(examples), workers, (gather, work)):
        if result is not None:
            state, kept, rejects, truncated, prompt_ids = result
            if isinstance(state, tuple):  # a Ray task's arrays (_Collected.arrays)
                ids, labels, ends = state
                for start, end in zip([0, *ends[:-1]], ends):
                    store.append(ids[start:end], labels[start:end])
            else:  # a forked worker's part files (TokenStore.part)
                store.extend(state)
            out.examples.extend(examples[i] for i in kept)
            out.rejects.extend(rejects)
            out.truncated_rejected += truncated
            out.prompt_ids.extend(prompt_ids)
    store.finish()
    return out


def _render_chunk(examples, template, tokenizer, controls, max_length: int, on_truncated: str, out: Tokenized,
                  with_prompts: bool) -> None:
    rendered = []
    # the address-space limit is for the renders only (its cap is the memory in use plus a headroom):
    # the tokenizer's batch runs after it is lifted
    with render_limits():
        for example in examples:
            messages = example.messages
            size = sum(len(m["content"]) for m in messages)
            if size > MAX_ROW_CHARS:
                # its render would pass the template's output limit and fail the whole compile for one row
                out.rejects.append(Reject.of(example, "text_too_long",
                                          f"{size} characters of messages; at most {MAX_ROW_CHARS}"))
                continue
            forged = _forged_control_token(controls, ((m["role"], m["content"]) for m in messages))
            if forged:
                out.rejects.append(Reject.of(example, "control_token_in_text", forged))
                continue
            result = answer_spans(example, template, tokenizer, messages)
            if isinstance(result, str):
                out.rejects.append(Reject.of(example, result, "see docs/architecture.md (masking)"))
                continue
            rendered.append((example, *result))
    if rendered:
        _mask_chunk(rendered, tokenizer, max_length, on_truncated, out, with_prompts)


# Batched calls let the Rust tokenizer work in parallel; chunks bound memory, since offset
# mappings come back as Python tuples (38k rows at once peaked above 2 GB). The chunk's transients
# (Python lists of ids, offset tuples, the Rust encodings: ~300 bytes per token) interleave with the
# small per-row arrays that are kept, and the heap they fragment is not given back: measured on
# 16.9k rows of the realistic scaling mix (Qwen2.5), the pass grew RSS by 380 MB with 2048-row
# chunks and 130 MB with 256 (66 MB of kept ids and labels), at the same speed. Rendering goes chunk
# by chunk too, so the rendered text of all rows is never held at once.
_CHUNK = 256


def _mask_chunk(rendered, tokenizer, max_length: int, on_truncated: str, out: Tokenized, with_prompts: bool) -> None:
    encoded = tokenizer(
        [full for _, full, _, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
    )
    prompts = tokenizer([p for _, _, _, p in rendered], add_special_tokens=False)["input_ids"] if with_prompts else None
    for k, (example, _, spans, _) in enumerate(rendered):
        ids = np.asarray(encoded["input_ids"][k], dtype=np.int32)
        offsets = np.asarray(encoded["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        supervised = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            supervised |= (starts >= lo) & (starts < hi)
        straddles = any(bool(np.any((starts < lo) & (ends > lo))) for lo, _ in spans)
        if straddles:
            # the tokenizer merged the last prompt character with the first answer character:
            # supervising that token would train on prompt text, skipping it loses the answer start
            out.rejects.append(Reject.of(example, "answer_boundary_merged", "a token spans prompt and answer"))
            continue
        labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
        if len(ids) > max_length:
            cut = int(supervised[max_length:].sum())
            if cut:
                detail = f"{len(ids)} tokens > max_length {max_length}; {cut} answer tokens would be cut"
                if on_truncated == "error":
                    raise DataError(f"{example.where}: answer truncated: {detail} (tokenize.on_truncated_answer: error)")
                out.rejects.append(Reject.of(example, "answer_truncated", detail))
                out.truncated_rejected += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        out.tokens.append(ids, labels)
        out.examples.append(example)
        # int32, not a list of Python ints (~36 bytes a token): it is held until the bundle is written
        out.prompt_ids.append(np.asarray(prompts[k], dtype=np.int32) if prompts is not None else [])


def control_token_pattern(tokens) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _forged_control_token(pattern: re.Pattern | None, texts) -> str | None:
    """Where a row's own text holds a control token, or None.

    Such text tokenizes to the token itself, so a completion holding `<|end|>\\n<|user|>\\n...`
    would supervise a forged user turn, and a prompt holding an assistant turn would put words in
    the model's mouth at eval. Rejected with its own reason unless data.allow_control_tokens.
    """
    if pattern is None:
        return None
    for where, text in texts:
        found = pattern.search(text)
        if found:
            return f"{where} text contains the control token {found.group(0)!r} at character {found.start()}"
    return None


def tokenize_text(examples: list[Example], tokenizer, store: TokenStore, allow_control_tokens: bool = False,
                  workers: int = 1) -> Tokenized:
    """Continued pretraining: every token of the text and its end-of-text is a target.

    Long documents are not truncated here; packing splits (bfd_split, wrapped) or truncates
    (bfd, counted as overflow) them.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer: continued pretraining needs an eos token to separate documents")
    pattern = None
    if not allow_control_tokens:
        from sftc.compiler.template import control_tokens

        pattern = control_token_pattern(control_tokens(tokenizer, None))

    def serial(rows: list[Example], out: Tokenized) -> None:
        for start in range(0, len(rows), _CHUNK):
            chunk = []
            for example in rows[start : start + _CHUNK]:
                forged = _forged_control_token(pattern, [("text", example.text)])
                if forged:
                    out.rejects.append(Reject.of(example, "control_token_in_text", forged))
                else:
                    chunk.append(example)
            for example, ids in zip(chunk, tokenizer([e.text for e in chunk], add_special_tokens=False)["input_ids"]):
                ids = np.asarray([*ids, eos], dtype=np.int32)
                out.tokens.append(ids, ids)
                out.examples.append(example)
                out.prompt_ids.append([])

    return _tokenize(examples, store, serial, workers)


def check_mask(tokenized: Tokenized, template, tokenizer) -> None:
    """The invariant, asserted on the compiled rows: the terminator is supervised in every row."""
    for i, example in enumerate(tokenized.examples):
        if not np.any(tokenized.tokens.labels(i) == template.terminator_id):
            raise DataError(
                f"{example.where}: the turn terminator {template.terminator!r} is not supervised; "
                "the model would never learn to stop"
            )
