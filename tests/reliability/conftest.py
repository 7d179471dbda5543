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

from tests.runtime.conftest import CORPUS, Project, _rows

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from demo.tiny_model import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(out, CORPUS, seed=7, vocab_size=512, hidden_size=64, num_layers=2)
    return out


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'rel-test'\n", encoding="utf-8")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return Project(root)


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
