"""Build a tiny Llama-style base model + byte-level BPE tokenizer from local text.

There is no model hub in this project's environments (CI, air-gapped boxes), so the
worked example and the test-suite make their own "pretrained" base model:

* ``demo/build_base.py`` calls :func:`build_tiny` with demo sizes (~3.7M params);
* tests call :func:`build_tiny` with its small defaults to get a throwaway model in a
  temp dir in a couple of seconds.

Design constraints baked in here:

* Every ``nn.Linear`` has in/out features that are multiples of 64, because the
  bitsandbytes CPU 4-bit kernels (QLoRA path) require it.  :func:`check_linear_dims`
  enforces this after init instead of trusting the arithmetic.
* The tokenizer carries the access-policy chat template and the role/end special
  tokens, so ``apply_chat_template`` works on the saved artifact with no extra setup,
  and ``<|end|>`` is a single token that generation can stop on.
* Deterministic: BPE training has no randomness given identical input order, and the
  weights come from ``torch.manual_seed(seed)``; two builds give identical files.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Iterable

# Order matters: ids are assigned in this order (0..5), and tests/docs may rely on
# <|endoftext|> == 0 and <pad> == 1.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
END_TOKEN = "<|end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS, END_TOKEN]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHAT_TEMPLATE = REPO_ROOT / "templates" / "chat" / "access-policy.jinja"

_ALIGN = 64  # bitsandbytes CPU 4-bit: linear dims must be multiples of 64


def _round_up(n: int, k: int = _ALIGN) -> int:
    return int(math.ceil(n / k) * k)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 style, no unk needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the chat template puts content right after "\n", and we
    # want "<|user|>\nhello" to tokenize the same as the raw prompt "hello".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets are needed by TRL/transformers features that map characters to tokens
    # (e.g. assistant/completion masks); trim_offsets=False keeps them exact.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Full byte alphabet: any input (emoji, stray unicode) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def wrap_tokenizer(tok, chat_template: str, model_max_length: int):
    """Wrap a raw tokenizer as a transformers fast tokenizer with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        # No dedicated BOS: the chat format starts with a role token. Reusing eos as
        # bos (GPT-2 convention) gives config.bos_token_id a valid value; nothing
        # prepends it automatically since the post-processor adds no tokens.
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS, END_TOKEN],
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=chat_template,
    )
    return fast


def make_config(*, vocab_size: int, hidden_size: int, intermediate_size: int,
                num_layers: int, num_heads: int, num_kv_heads: int,
                max_position_embeddings: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
    head_dim = hidden_size // num_heads
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # Tied embeddings: at this size the embedding matrix is a big share of params.
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def check_linear_dims(model, align: int = _ALIGN) -> None:
    """Fail loudly if any nn.Linear would break the bitsandbytes CPU 4-bit kernel."""
    import torch.nn as nn

    bad = [f"{name}: {m.in_features}->{m.out_features}"
           for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and (m.in_features % align or m.out_features % align)]
    if bad:
        raise ValueError(f"linear dims must be multiples of {align}: " + ", ".join(bad))


def param_count(model) -> int:
    # Count unique tensors so the tied embedding/lm_head is counted once.
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build_tiny(
    out_dir,
    corpus_texts: Iterable[str],
    seed: int = 7,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 512,
    chat_template: str | None = None,
) -> Path:
    """Train a tokenizer on ``corpus_texts`` and save it with a fresh Llama model.

    Defaults give a ~115k-param model (mostly the 512x64 embedding) for unit tests.
    Returns ``Path(out_dir)``, loadable with ``AutoTokenizer`` and
    ``AutoModelForCausalLM.from_pretrained``.
    ``num_kv_heads`` defaults to ``num_heads`` (plain MHA), which keeps k/v projection
    widths multiples of 64 for small hidden sizes.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if vocab_size % _ALIGN:
        raise ValueError(f"vocab_size must be a multiple of {_ALIGN}, got {vocab_size}")
    out = Path(out_dir)
    if chat_template is None:
        chat_template = DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")

    raw = train_tokenizer(corpus_texts, vocab_size)
    tok = wrap_tokenizer(raw, chat_template, model_max_length=max_position_embeddings)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    # A small corpus may not fill the requested vocab; the embedding still gets a
    # 64-aligned row count >= the tokenizer size (spare rows are simply never used).
    model_vocab = max(vocab_size, _round_up(len(tok)))
    config = make_config(
        vocab_size=model_vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_id=ids[EOS_TOKEN], eos_id=ids[EOS_TOKEN], pad_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    check_linear_dims(model)
    # Stop on either the chat turn terminator or the document terminator: SFT on
    # prompt/completion rows appends eos, chat-format training ends turns with <|end|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids[EOS_TOKEN],
        eos_token_id=[ids[END_TOKEN], ids[EOS_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
    )

    # transformers 5 always writes safetensors and dropped the flag; older 4.x needs it.
    # Only now create the directory: a config rejected above leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    # A one-shard "Writing model shards" progress bar is noise in test/CI logs; silence
    # it for this call only and restore the caller's setting.
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, **save_kwargs)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(out)
    return out
