"""Fixtures for the `sftc diff` tests: a tiny project that compiles in about a second.

The model directory is built once per session (tokenizer + config.json; compile never reads
weights) by tests/conftest.py's one builder. Each test gets its own project root (a `pyproject.toml` marker)
with a copy of it under `model/`, so specs can use project-relative paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_tiny_model

REPO = Path(__file__).resolve().parents[2]

CORPUS = [
    "Please grant access to the billing system for the new contractor.",
    "Deny: the request has no ticket and no manager approval attached.",
    "Escalate to security on-call because the account downloads bulk data at night.",
    "Rotate the stale key and send evidence of the rotation within 24 hours.",
] * 8


def rows(n: int = 48, start: int = 0) -> list[dict]:
    """Prompt/completion rows, two per thread (the group key), all distinct."""
    topics = ["billing", "payroll", "warehouse", "crm", "vpn", "wiki", "builds", "backups"]
    out = []
    for i in range(start, start + n):
        out.append({
            "thread_id": f"T{i // 2:03d}",
            "prompt": f"Ticket {i}: user {i * 7 % 13} asks for access to {topics[i % 8]} system number {i}.",
            "completion": json.dumps({"decision": ["approve", "deny", "escalate"][i % 3], "ticket": i}),
        })
    return out


def seed_spec(name: str, per_device: int, grad_accum: int, nodes: int, procs: int) -> dict:
    """The issue's seed example; `distributed` must agree with batch.world_size."""
    return {
        "name": name,
        "objective": "sft",
        "parameterization": {"kind": "full"},
        "model": {"path": "model"},
        "data": {"files": ["data/rows.jsonl"], "format": "prompt_completion", "fields": {"group": "thread_id"},
                 "max_reject_fraction": 0.5},
        "tokenize": {"max_length": 128},
        "packing": {"strategy": "bfd", "seq_length": 256},
        "batch": {"per_device": per_device, "grad_accum": grad_accum, "world_size": nodes * procs},
        "distributed": {"nodes": nodes, "procs_per_node": procs},
        "optimizer": {"lr": 1.0e-4},
        "schedule": {"epochs": 4},
    }


RUN_A = seed_spec("run-a", 4, 8, 1, 4)
RUN_B = seed_spec("run-b", 2, 16, 2, 4)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", CORPUS, weights=False)


class Project:
    def __init__(self, root: Path):
        self.root = root

    def write_rows(self, data: list, rel: str = "data/rows.jsonl") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in data), encoding="utf-8")
        return path

    def write_spec(self, spec: dict | str, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return path

    def git(self, *args: str) -> str:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
        done = subprocess.run(["git", *args], cwd=self.root, env=env, capture_output=True, text=True, check=True)
        return done.stdout


@pytest.fixture
def project(tmp_path, tiny_model, monkeypatch) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'diff-test'\n", encoding="utf-8")
    shutil.copytree(tiny_model, root / "model")
    project = Project(root)
    project.write_rows(rows())
    # diff resolves REV:PATH from the repository that holds cwd, like git itself
    monkeypatch.chdir(root)
    return project
