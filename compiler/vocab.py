"""The tokenizer and the model must agree on the vocabulary, checked at compile.

A token id at or past the model's `vocab_size` has no embedding row: the run crashes in the
embedding (IndexError on CPU, a device-side assert on CUDA) after the compile said all was well.
Found with Qwen2.5's tokenizer (ids up to 151,645) over a 32,000-vocab config.
"""

from __future__ import annotations

from sftc.errors import SpecError


def vocabulary_record(tokenizer, config, largest_token_id: int) -> dict:
    """The numbers the check compares: what the lock can show a reviewer. `largest_token_id` is
    the largest id in the compiled rows (-1 for none), counted as they were tokenized."""
    largest = int(largest_token_id)
    return {
        "config_vocab_size": getattr(config, "vocab_size", None),
        "tokenizer_size": len(tokenizer),
        "largest_token_id": largest,
    }


def check_vocabulary(tokenizer, config, largest_token_id: int, source: str) -> dict:
    """Refuse a bundle whose token ids the model cannot embed; returns vocabulary_record."""
    record = vocabulary_record(tokenizer, config, largest_token_id)
    vocab = record["config_vocab_size"]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        # text-only configs name it; a composite (vision) config nests it, where it cannot be compared
        return record
    problems = []
    if record["largest_token_id"] >= vocab:
        problems.append(f"the compiled rows use token id {record['largest_token_id']} (at or past "
                        f"{vocab}), but model.path's config.json has vocab_size {vocab}")
    if record["tokenizer_size"] > vocab:
        problems.append(f"the tokenizer has {record['tokenizer_size']} tokens (ids up to "
                        f"{record['tokenizer_size'] - 1}), more than the model's vocab_size {vocab}")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= vocab:
            problems.append(f"tokenizer {name} {value} is past the model's vocab_size {vocab}")
    if problems:
        raise SpecError(
            f"{source}: model.tokenizer and model.path disagree on the vocabulary; training would crash in the "
            "embedding. Use the model's own tokenizer, or a model whose embeddings cover this tokenizer "
            "(resize them and save the model first)", problems)
    return record
