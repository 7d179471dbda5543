"""Fixtures for multi-process tests: the runtime tests' tiny model and project, and a torchrun helper.

Every multi-process run is a real `torchrun --standalone --nproc-per-node N` of `run_bundle` on
CPU (gloo), with OMP_NUM_THREADS=1 so two ranks fit on a small shared machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.runtime.conftest import final_tensors, project, tiny_model_dir, train_losses  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def torchrun(bundle: Path, run_dir: Path, nproc: int, env: dict | None = None, stop_after: int | None = None,
             timeout: int = 150) -> subprocess.CompletedProcess:
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
        "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {}),
    }
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
           "-m", "tests.distributed.launch_run", str(bundle), str(run_dir), str(stop_after) if stop_after else "-"]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
