"""Build the worked example's base model: tokenizer + randomly initialised tiny Llama.

    python demo/build_base.py --corpus data/access_policy/corpus.jsonl \
        --rows data/access_policy/sft_rows.jsonl --out models/access-base --seed 7

The tokenizer is trained on the domain corpus plus the SFT prompt/completion texts, so
policy ids, key-id shapes and the JSON reply syntax become compact token sequences.
The model itself is untrained: continued pretraining on the corpus and SFT are the
pipeline's job.  Sizes are chosen so every linear layer is 64-aligned (QLoRA on CPU)
and the whole thing trains in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Allow `python demo/build_base.py` from the repo root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.tiny_model import END_TOKEN, SPECIAL_TOKENS, build_tiny, param_count  # noqa: E402

# Demo model sizes: 4 x (attn 256->256/128 + MLP 256->768) + 2048x256 tied embedding
# ~= 3.7M params.  head_dim 64, GQA with 2 kv heads (k/v proj 256->128).
DEMO_SIZES = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=1024)


def read_texts(corpus: Path, rows: Path | None) -> list[str]:
    """Corpus documents first, then prompts and completions, in file order (stable)."""
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8") if line.strip()]
    if rows is not None:
        for line in rows.open(encoding="utf-8"):
            if not line.strip():
                continue
            row = json.loads(line)
            # Bad rows (empty/whitespace completions) are simply skipped: they carry
            # no text worth learning merges from.
            for field in ("prompt", "completion"):
                value = row.get(field) or ""
                if value.strip():
                    texts.append(value)
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the tiny access-policy base model.")
    ap.add_argument("--corpus", type=Path, default=Path("data/access_policy/corpus.jsonl"))
    ap.add_argument("--rows", type=Path, default=Path("data/access_policy/sft_rows.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("models/access-base"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    texts = read_texts(args.corpus, args.rows)
    out = build_tiny(args.out, texts, seed=args.seed, **DEMO_SIZES)
    t_build = time.perf_counter() - t0

    # Reload through the Auto* API exactly as the runtime will, and smoke-test it.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one-shard "Loading weights" bar is just noise here
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True, tokenize=False)
    end_ids = tok.encode(END_TOKEN, add_special_tokens=False)
    if len(end_ids) != 1:
        raise SystemExit(f"{END_TOKEN} must be a single token, got {end_ids}")

    print(f"texts: {len(texts)} ({sum(map(len, texts))} chars)")
    print(f"tokenizer: {len(tok)} tokens; special ids: "
          + ", ".join(f"{t}={tok.convert_tokens_to_ids(t)}" for t in SPECIAL_TOKENS))
    print(f"chat template smoke test: {rendered!r} -> {tok(rendered)['input_ids']}")
    print(f"model: {param_count(model):,} params, vocab {model.config.vocab_size}, "
          f"hidden {model.config.hidden_size}, layers {model.config.num_hidden_layers}")
    print(f"saved to {out} in {t_build:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
