"""Shared helpers for the benchmark scripts: machine description, load average, medians,
results files, and the demo bundle every CPU benchmark trains on.

Each bench_*.py imports this by path (benchmarks/ is not a package), so every script still
runs alone: `.venv/bin/python benchmarks/bench_train.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EXTERNAL = Path(os.environ.get("SFTC_EXTERNAL", REPO.parent / "shared" / "external"))
# Bundles the benchmarks compile go here, never into the project's bundles/ (a DVC output).
CACHE = Path(os.environ.get("SFTC_BENCH_CACHE", Path(tempfile.gettempdir()) / "sftc-bench-cache"))
DEMO_SPEC = REPO / "specs" / "access-policy-full.yaml"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def loadavg() -> list[float]:
    """The machine is shared: every result records the load it was measured under."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def median(values) -> float:
    return float(statistics.median(values))


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def demo_bundle() -> Path:
    """The demo's full-SFT bundle (access-base model, access-policy data), compiled into the
    benchmark cache; a warm recompile when it is already there."""
    from compiler import compile_spec

    bundle, _, _ = compile_spec(str(DEMO_SPEC), bundles_dir=CACHE / "bundles")
    return bundle


def set_threads() -> int:
    """Fixed intra-op threads, the same for every setup (2 on the reference machine)."""
    import torch

    n = int(os.environ.get("SFTC_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def run_child(code: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
