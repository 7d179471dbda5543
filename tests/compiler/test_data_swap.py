"""A data file replaced while a compile runs: the lock records the bytes that became tokens.

v0.1 hashed the path after reading, so a file swapped mid-compile gave a bundle whose tokens were
the old content and whose lock recorded the new file's sha256, and it verified. Now the manifest
hashes the bytes as they are read, and a file that changed since the compile began is refused.
"""

from __future__ import annotations

import json

import pytest

import sftc.compiler.data as data_mod
from sftc.errors import DataError
from sftc.io import sha256_file
from tests.compiler.conftest import base_spec


def _rows(tag: str, n: int = 20) -> list[dict]:
    return [{"thread_id": f"t{i}", "prompt": f"{tag} key {i} is stale.", "completion": f"{tag}: rotate key {i}."}
            for i in range(n)]


def test_file_swapped_after_its_rows_were_read_keeps_the_read_bytes_hash(project, monkeypatch):
    project.write_jsonl("data/rows.jsonl", _rows("old"))
    original = sha256_file(project.root / "data/rows.jsonl")
    real = data_mod.iter_rows

    def read_then_swap(path, display, digest=None):
        yield from real(path, display, digest)
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows("new")), encoding="utf-8")

    monkeypatch.setattr(data_mod, "iter_rows", read_then_swap)
    bundle, lock, _ = project.compile(base_spec())
    recorded = lock.data_manifest.files[0].sha256.removeprefix("sha256:")
    assert recorded == original != sha256_file(project.root / "data/rows.jsonl")


def test_file_swapped_before_its_rows_were_read_is_refused(project, monkeypatch):
    project.write_jsonl("data/rows.jsonl", _rows("old"))
    real = data_mod.read_data

    def swap_then_read(files, spec, rows_store=None):
        (project.root / "data/rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("new")), encoding="utf-8")
        return real(files, spec, rows_store)

    monkeypatch.setattr(data_mod, "read_data", swap_then_read)
    with pytest.raises(DataError, match="data changed while compiling"):
        project.compile(base_spec())
    assert not [p for p in project.leftovers() if not p.startswith(".")]
