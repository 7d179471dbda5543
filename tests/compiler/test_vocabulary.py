"""The tokenizer and the model's vocabulary are compared at compile (issue 14, found on real files):
Qwen2.5's tokenizer (ids up to 151,645) over a 32,000-vocab config compiled silently and then
crashed `sftc run` in the embedding."""

from __future__ import annotations

import pytest

from sftc.errors import SftcError

from .conftest import base_spec
from .test_external_tokenizers import ROWS, _install


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_compile(project):
    _install(project, "qwen2.5-instruct", 32000)
    project.write_jsonl("data/rows.jsonl", ROWS)
    with pytest.raises(SftcError) as err:
        project.compile(base_spec())
    message = str(err.value)
    assert "disagree on the vocabulary" in message and "vocab_size 32000" in message, message
    assert "token id 151645" in message  # <|im_end|>, the terminator every row supervises
    assert project.leftovers() == []


def test_the_same_tokenizer_with_its_own_vocabulary_compiles(project):
    _install(project, "qwen2.5-instruct", 151936)  # Qwen2.5-0.5B-Instruct's config.json vocab_size
    project.write_jsonl("data/rows.jsonl", ROWS)
    bundle, _, _ = project.compile(base_spec())
    assert (bundle / "train.safetensors").is_file()
