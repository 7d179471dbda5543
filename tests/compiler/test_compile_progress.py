"""A compile that takes more than a second says which pass is running; a quick one says nothing."""

from __future__ import annotations

import time

import sftc.compiler.split as split_mod
from sftc.compiler import compile_spec
from tests.compiler.conftest import base_spec

ROWS = [{"thread_id": f"t{i}", "prompt": f"Key {i} is stale.", "completion": f"Rotate key {i}."} for i in range(20)]


def test_a_slow_pass_is_announced_and_a_warm_recompile_is_silent(project, monkeypatch, capsys):
    project.write_jsonl("data/rows.jsonl", ROWS)
    spec = project.write_spec(base_spec())
    real = split_mod.split_examples

    def slow_split(*args, **kwargs):
        time.sleep(1.5)  # a near-duplicate search over a large mix
        return real(*args, **kwargs)

    monkeypatch.setattr(split_mod, "split_examples", slow_split)
    compile_spec(spec, progress=True)
    err = capsys.readouterr().err
    assert "sftc: compile: splitting 20 rows by group (near-duplicate search) ..." in err, err
    assert "sftc: compile: writing the bundle ..." in err, err

    _, _, reused = compile_spec(spec, progress=True)
    assert reused and capsys.readouterr().err == ""
