"""Fixtures for the runtime tests: a tiny trainable model and a real compiled bundle.

The model is built once per session by `demo.tiny_model.build_tiny` (hidden 64, 2 layers, weights
included); each test gets its own project copy and compiles its spec with the real compiler, so
the runtime is tested on exactly what `sftc compile` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_tiny_model, deep_merge

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

DECISIONS = ["approve", "deny", "escalate", "request_evidence", "revoke"]
SUBJECTS = ["stale key", "expired badge", "admin role", "vpn token", "service account", "shared login"]


def _rows(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        decision = DECISIONS[i % len(DECISIONS)]
        subject = SUBJECTS[i % len(SUBJECTS)]
        policy = f"AC-{101 + i % 7}"
        rows.append({
            "thread_id": f"t{i // 2}",
            "prompt": f"Ticket {i}: the {subject} of user u{i % 11} needs a decision under {policy}.",
            "completion": json.dumps({"decision": decision, "policy": policy, "reply": f"{decision} per {policy}."}),
            "expected_decision": decision,
            "policy_id": policy,
        })
    return rows


CORPUS = [r["prompt"] + " " + r["completion"] for r in _rows()] * 3

RULES = """version: 1
parse: json
checks:
  - {name: valid_format, kind: json_valid}
  - {name: decision_matches, kind: json_field_equals, field: decision, row_field: expected_decision}
metrics:
  format_pass_rate: [valid_format]
  policy_pass_rate: [decision_matches]
"""


def base_spec(**overrides) -> dict:
    spec = {
        "name": "rt",
        "seed": 1234,
        "objective": "sft",
        "parameterization": {"kind": "full"},
        "model": {"path": "model", "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"files": ["data/rows.jsonl"], "format": "prompt_completion",
                 "fields": {"group": "thread_id"}, "max_reject_fraction": 0.2},
        "split": {"eval_fraction": 0.2, "seed": 13},
        "tokenize": {"max_length": 96},
        "packing": {"strategy": "bfd", "seq_length": 160},
        "batch": {"per_device": 2, "grad_accum": 2},
        "optimizer": {"lr": 2.0e-3, "max_grad_norm": 1.0, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_ratio": 0.1, "max_steps": 8},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "eval": {"batch_size": 8},
        "verify": {"probe_examples": 4, "probe_tolerance": 1.0e-4},
    }
    return deep_merge(spec, overrides, replace=("parameterization",))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", CORPUS, vocab_size=512, hidden_size=64, num_layers=2)


class Project:
    def __init__(self, root: Path):
        self.root = root

    def compile(self, **overrides) -> Path:
        from sftc.compiler import compile_spec

        spec = base_spec(**overrides)
        if spec.get("eval", {}).get("rules"):
            (self.root / spec["eval"]["rules"]).write_text(RULES, encoding="utf-8")
        path = self.root / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        bundle, _, _ = compile_spec(path)
        return bundle

    def run_dir(self, bundle: Path) -> Path:
        return self.root / "runs" / bundle.name


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'rt-test'\n", encoding="utf-8")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return Project(root)


def run_in_subprocess(bundle: Path, run_dir: Path, env: dict | None = None, timeout: int = 120,
                      fresh: bool = False) -> subprocess.CompletedProcess:
    """`run_bundle` in a fresh interpreter (what `sftc run` does), so it can be SIGKILLed."""
    code = (
        "import sys; from sftc.runtime.run import run_bundle; "
        f"run_bundle({str(bundle)!r}, run_dir={str(run_dir)!r}, fresh={fresh!r})"
    )
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([PYTHON, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def final_tensors(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints" / f"checkpoint-{step}"
    files = sorted(ck.glob("*.safetensors"))
    assert files, f"no weights in {ck}"
    tensors = {}
    for f in files:
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return tensors
