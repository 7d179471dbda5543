"""Shared by every test directory: the one tiny-model builder, spec merging, one torch thread.

Each test directory keeps its own project fixture (what a compiler, runtime or review test needs
of a project differs), but they build their tiny models and merge spec overrides here.
"""

import copy
import os
from pathlib import Path

import pytest


def build_tiny_model(out: Path, corpus: list[str], weights: bool = True, **sizes) -> Path:
    """A tiny chat model directory from demo.tiny_model (a real tokenizer trained on `corpus`).
    Without `weights`, only config and tokenizer files stay: all a compile reads, and each test's
    project copy stays small."""
    from demo.tiny_model import build_tiny

    build_tiny(out, corpus, seed=7, **sizes)
    if not weights:
        for path in out.glob("*.safetensors"):
            path.unlink()
    return out


def without_progress(output: str) -> str:
    """CLI output without the progress lines (`sftc: ...`) a slow step prints before its result:
    on a loaded machine even a tiny compile can pass the one-second mark (sftc/stages.py)."""
    return "\n".join(line for line in output.splitlines() if not line.startswith("sftc: ")).lstrip()


def deep_merge(base: dict, overrides: dict, replace: tuple[str, ...] = ()) -> dict:
    """`base` with `overrides` merged in, mapping by mapping; keys in `replace` are replaced whole
    (a parameterization of another kind must not keep the old kind's fields)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in replace:
            merged[key] = deep_merge(merged[key], value, replace)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a shared 2-core box spin-waiting
    # threads make each step ~10x slower. Subprocesses inherit OMP_NUM_THREADS.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
