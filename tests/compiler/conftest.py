"""Shared fixtures for the compiler tests.

* `tiny_model`: a throwaway chat model directory (config.json + tokenizer files, no weights:
  compile reads only those), from tests/conftest.py's one builder.
* `project`: a temporary project root (a `pyproject.toml` marker) holding a copy of the tiny
  model under `model/`, with helpers to write data, write specs and compile.
* `external`: the directory of real third-party material (tokenizers, model configs), from the
  environment variable SFTC_EXTERNAL, default `<repo>/../shared/external`; tests that need it
  are skipped, with the path in the reason, only when it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import build_tiny_model, deep_merge  # noqa: F401  (deep_merge: used by importers)

REPO = Path(__file__).resolve().parents[2]
EXTERNAL = Path(os.environ.get("SFTC_EXTERNAL", str(REPO.parent / "shared" / "external")))
IGNORE_INDEX = -100

# Files a model directory needs for compile (weights are never read by the compiler).
MODEL_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "added_tokens.json",
)

# Enough text for a byte-level BPE to learn the words of the access-policy examples.
TINY_CORPUS = [
    "Stale key. Request rotation evidence. Ask for rotation evidence within 24 hours.",
    "Key T102 is stale. Follow access policy. Approve access after rotation proof.",
    "Escalate privileged-role changes. Cite the session-timeout policy.",
    "Expired key. Wrong size. Offer an exchange label. Request key-rotation evidence.",
    "We found a stale access key belonging to Victor Haddad in the Workday tenant.",
    "The owner wants to keep it, but no exception ticket has been filed yet.",
    "Escalating to the security on-call now, because AC-101 treats sudden use of a stale credential.",
    "Please attach a ticket and the signed contract first, because AC-107 requires both.",
] * 8


def external_path(*parts: str) -> Path:
    """A path under the external material; skips the test (naming the path) when absent."""
    path = EXTERNAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"external test material not found at {path} (set SFTC_EXTERNAL to its directory)")
    return path


@pytest.fixture(scope="session")
def external() -> Path:
    if not EXTERNAL.is_dir():
        pytest.skip(f"external test material not found at {EXTERNAL} (set SFTC_EXTERNAL to its directory)")
    return EXTERNAL


def write_tiny_llama_config(directory: Path, vocab_size: int, **extra) -> None:
    """A tiny LlamaConfig (meta-device counting makes even a large vocab cheap)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, **extra,
    ).save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TINY_CORPUS, weights=False)


def base_spec(**overrides) -> dict:
    spec = {
        "name": "t",
        "objective": "sft",
        "parameterization": {"kind": "full"},
        "model": {"path": "model"},
        "data": {
            "files": ["data/rows.jsonl"], "format": "prompt_completion",
            "fields": {"group": "thread_id"}, "max_reject_fraction": 0.5,
        },
        "split": {"eval_fraction": 0.0},
        "tokenize": {"max_length": 128},
        "packing": {"strategy": "bfd", "seq_length": 256},
        "batch": {"per_device": 1, "grad_accum": 1},
        "optimizer": {"lr": 1.0e-4},
        "schedule": {"epochs": 1},
    }
    return deep_merge(spec, overrides)


class Project:
    def __init__(self, root: Path):
        self.root = root

    def write_jsonl(self, rel: str, rows: list) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
        return rel

    def write_spec(self, spec: dict | str, rel: str = "spec.yaml") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return path

    def compile(self, spec: dict | Path, bundles_dir: Path | None = None, force: bool = False):
        from sftc.compiler import compile_spec

        path = spec if isinstance(spec, Path) else self.write_spec(spec)
        return compile_spec(path, bundles_dir=bundles_dir, force=force)

    def leftovers(self) -> list[str]:
        """Anything under bundles/ (a bundle, or a staging temp dir) after a failed compile."""
        bundles = self.root / "bundles"
        return sorted(p.name for p in bundles.iterdir()) if bundles.exists() else []


@pytest.fixture
def project(tmp_path, tiny_model) -> Project:
    root = tmp_path / "proj"
    (root / "model").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'test-project'\n", encoding="utf-8")
    for name in MODEL_FILES:
        if (tiny_model / name).is_file():
            shutil.copyfile(tiny_model / name, root / "model" / name)
    return Project(root)


# --- reading a bundle back ---------------------------------------------------------------------


def load_tokens(bundle: Path, which: str = "train") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(bundle / f"{which}.safetensors"))


def segments(data: dict[str, np.ndarray]):
    """Yield (row, ids, labels) for every example segment of every row."""
    rows = len(data["row_offsets"]) - 1
    for row in range(rows):
        lo = int(data["row_offsets"][row])
        seg = data["seq_lengths"][data["seq_offsets"][row] : data["seq_offsets"][row + 1]]
        for length in seg:
            yield row, data["input_ids"][lo : lo + length], data["labels"][lo : lo + length]
            lo += int(length)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_TOKENIZERS: dict[str, object] = {}


def bundle_tokenizer(bundle: Path, lock: dict):
    """The bundle's tokenizer, loaded from where the lock says (cached by its version hash)."""
    from transformers import AutoTokenizer

    version = lock.tokenizer_version
    if version not in _TOKENIZERS:
        root = (bundle / lock.project_root).resolve()
        _TOKENIZERS[version] = AutoTokenizer.from_pretrained(str(root / lock.tokenizer.path))
    return _TOKENIZERS[version]
