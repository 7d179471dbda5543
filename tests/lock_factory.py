"""A valid, sealed format-2 lock without compiling (for tests of readers that need no model).

`sample_lock(**sections)` deep-merges the given sections over a plausible lock, validates it with
the Lock model, derives the bundle id from the content and seals it, exactly as the compiler does.
"""

from __future__ import annotations

import copy
from pathlib import Path

from sftc.io import pretty_json
from sftc.lock import FORMAT_VERSION, LOCK_NAME, Lock, bundle_id_for, seal

SPEC = {
    "name": "demo-lora", "objective": "sft",
    "parameterization": {"kind": "lora", "rank": 16},
    "model": {"path": "model"},
    "data": {"files": ["data/rows.jsonl"], "format": "prompt_completion", "fields": {"group": "thread_id"}},
    "optimizer": {"lr": 1.0e-4},
    "schedule": {"kind": "cosine", "max_steps": 600},
}

STATS = {"min": 1, "mean": 1.0, "max": 1}


def _base(spec: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION, "sftc_version": "0.1.0", "bundle_id": "", "name": spec["name"],
        "inputs_hash": "sha256:" + "1" * 64, "spec": spec, "spec_source": "specs/demo.yaml", "project_root": "../..",
        "data_manifest": {"files": [{"path": "data/rows.jsonl", "sha256": "2" * 64, "rows_read": 10, "accepted": 10,
                                     "rejected": {}}],
                          "rows_read": 10, "train_examples": 8, "eval_examples": 2, "rejected": {},
                          "hash": "sha256:" + "3" * 64},
        "split": {"by": "group", "seed": 13, "eval_fraction": 0.2, "near_duplicate_threshold": 0.85,
                  "train_groups": ["T1"], "eval_groups": ["T2"], "train_rows": 8, "eval_rows": 2,
                  "merged_near_duplicates": [], "disjoint": True, "overlap": []},
        "template": {"source": "tokenizer", "path": None, "version": "sha256:" + "4" * 64, "terminator": "</s>",
                     "terminator_id": 2, "system": None},
        "tokenizer": {"source": "local", "path": "model", "revision": None, "files": ["tokenizer.json"],
                      "version": "sha256:" + "5" * 64, "eos_token": "</s>", "eos_token_id": 2, "pad_token": None,
                      "pad_token_id": None, "vocab_size": 512},
        "model": {"source": "local", "path": "model", "revision": None, "files": {"config.json": "6" * 64},
                  "architecture": "LlamaForCausalLM", "model_type": "llama"},
        "libraries": {"python": "3.11.7"}, "token_stream_libraries": ["transformers"],
        "tokenize": {"max_length": 512, "examples": 10, "truncated_rejected": 0, "mean_length": 10.0, "max_length_seen": 12},
        "packing": {"strategy": "bfd", "seq_length": 512, "rows": 4, "examples": 8, "ideal_rows": 4,
                    "overflow_tokens_dropped": 0, "orphaned_supervised_tokens": 0, "boundary_safe": True},
        "budget": {"source_examples_per_update": STATS, "supervised_tokens_per_update": STATS, "tokens_per_update": STATS,
                   "optimizer_steps": 600, "epochs": 1.0, "train_rows": 4, "total_tokens": 100, "supervised_tokens": 50,
                   "packing_efficiency": 1.0, "padding_fraction": 0.0, "lr_per_example": 1.0e-4, "warmup_steps": 0},
        "parameters": {"total": 100, "trainable": 10, "trainable_fraction": 0.1, "base": 90, "embedding": 10,
                       "tied_embeddings": True, "quantizable_linear": 50, "quantizable_linear_layers": 4,
                       "hidden_size": 8, "intermediate_size": 16, "num_layers": 2, "num_attention_heads": 2,
                       "kv_dim": 8, "vocab_size": 512, "trainable_tensors": 4, "trainable_small": 0,
                       "trainable_factored": 0},
        "memory": {"total_bytes": 1000, "total_gib": 0.0, "basis": "test", "parts": {"weights_bytes": 1000}},
        "eval_manifest": {"prompts": 2, "examples": 2, "rules_path": None, "rules_sha256": None, "metrics": [],
                          "hash": "sha256:" + "7" * 64},
        "files": {},
        "token_index": {},
    }


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("parameterization", "files"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def sample_lock(spec: dict | None = None, **sections) -> dict:
    """A sealed lock payload (JSON dict); `spec` and `sections` are merged over the defaults."""
    spec_dict = _merge(SPEC, spec or {})
    draft = Lock.model_validate({**_merge(_base(spec_dict), sections), "seal": {"sha256": "", "fields": {}}})
    payload = draft.model_dump(mode="json")
    payload["bundle_id"] = bundle_id_for(payload["name"], payload)
    payload["seal"] = seal(payload)
    return payload


def write_lock(bundle_dir: Path, payload: dict) -> Path:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / LOCK_NAME).write_text(pretty_json(payload), encoding="utf-8")
    return bundle_dir
