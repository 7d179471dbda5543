"""Fixtures for the reliability tests, and the figures they measure.

The project fixtures are the runtime tests' (a tiny trainable model, real compiles). Each test
adds what it measured (inputs tried, drift cases caught, tracebacks seen) to `figures`; with
SFTC_RELIABILITY_FIGURES=<path> set the totals are written there at the end of the session, which
is how scripts/reliability_report.py builds reports/reliability.json from the same tests CI runs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

# the runtime tests' tiny model and project, shared rather than rebuilt
from tests.runtime.conftest import project, tiny_model_dir  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
FIGURES_ENV = "SFTC_RELIABILITY_FIGURES"
_FIGURES: Counter = Counter()


@pytest.fixture(scope="session")
def figures():
    yield _FIGURES
    out = os.environ.get(FIGURES_ENV)
    if out:
        path = Path(out)
        previous = json.loads(path.read_text()) if path.is_file() else {}
        merged = Counter(previous)
        merged.update(_FIGURES)
        path.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n", encoding="utf-8")


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


@pytest.fixture
def cproject(tmp_path, tiny_model_dir):
    """A compiler-test project (tests/compiler/conftest.py's helpers) with no data written yet."""
    from tests.compiler.conftest import Project as CompilerProject

    root = tmp_path / "cproj"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'rel-compile'\n", encoding="utf-8")
    shutil.copytree(tiny_model_dir, root / "model")
    return CompilerProject(root)


def module_project(tmp_path_factory, tiny_model_dir, name: str):
    """A runtime-test project (tiny model, the runtime tests' rows) for a module-scoped fixture:
    the runs a module shares are built once, then copied or resumed per case."""
    from tests.runtime.conftest import Project, _rows

    root = tmp_path_factory.mktemp(name) / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return Project(root)
