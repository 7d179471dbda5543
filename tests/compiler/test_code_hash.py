"""The bundle hash covers exactly the code that shapes bundle bytes (compiler/bundle.py HASHED_CODE).

A module a compile runs but the hash leaves out would let a fixed masking or packing bug reuse a
bundle built by the buggy code; a review module in the hash would change every bundle id on a
formatting change to `sftc diff`. The list is explicit, so this test keeps it honest: every sftc
module loaded by a real compile is either hashed or listed as not shaping bytes, and the review
layer is neither loaded nor hashed.
"""

from __future__ import annotations

import copy as copy_module
import json
import subprocess
import sys

from sftc.compiler.bundle import HASHED_CODE, UNHASHED_DURING_COMPILE, code_hash

from tests.compiler.conftest import base_spec


def test_every_module_a_compile_loads_is_hashed_or_declared_unshaping(project):
    project.write_jsonl("data/rows.jsonl", [
        {"thread_id": f"t{i}", "prompt": f"Key {i} is stale.", "completion": f"Request rotation evidence for key {i}."}
        for i in range(20)])
    spec = project.write_spec(base_spec())
    code = ("import json, sys; from sftc.compiler import compile_spec; "
            f"compile_spec({str(spec)!r}); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'sftc' or m.startswith('sftc.'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project.root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    unaccounted = loaded - set(HASHED_CODE) - set(UNHASHED_DURING_COMPILE)
    assert not unaccounted, f"a compile runs {sorted(unaccounted)}: add them to HASHED_CODE (or say why not)"
    assert not any(m.startswith("sftc.review") for m in loaded | set(HASHED_CODE))


def test_code_hash_changes_with_hashed_code_only(tmp_path, monkeypatch):
    import importlib.util

    before = code_hash()
    origin = importlib.util.find_spec("sftc.compiler.pack").origin
    real = open(origin, "rb").read()
    import sftc.compiler.bundle as bundle_mod

    original_find = importlib.util.find_spec

    def patched(name, *args, **kwargs):
        spec = original_find(name, *args, **kwargs)
        if name == "sftc.compiler.pack":
            # a copy: for an imported module find_spec returns its own __spec__, and changing that
            # would change the code hash of every later compile in this process
            spec = copy_module.copy(spec)
            changed = tmp_path / "pack.py"
            changed.write_bytes(real + b"\n# a changed packing pass\n")
            spec.origin = str(changed)
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", patched)
    assert bundle_mod.code_hash() != before
    monkeypatch.undo()
    assert bundle_mod.code_hash() == before, "the test changed the code hash of later compiles in this process"
