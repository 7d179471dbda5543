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


def code_state() -> dict:
    """Which code was measured (read-only git queries): the tree is shared and edited while we run."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    # results/ is what this run writes, not code that was measured
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
             if not line[3:].startswith("benchmarks/results/")]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "dirty": bool(dirty), "modified_files": dirty}


def shown_path(path: Path) -> str:
    """A path as an artifact may hold it: relative to the project or to $SFTC_EXTERNAL, never absolute."""
    path = Path(path).resolve()
    for root, name in ((REPO, ""), (EXTERNAL.resolve(), "$SFTC_EXTERNAL/"), (CACHE.resolve(), "$SFTC_BENCH_CACHE/")):
        if path.is_relative_to(root):
            return name + str(path.relative_to(root))
    return path.name


def count_rows(path: Path) -> int | None:
    """Rows of a data file, counted from the file (JSONL lines or parquet rows), not remembered."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def input_files(*paths) -> list[dict]:
    """What a result measured: each input file's sha256 and row count, for the result file."""
    from sftc.io import sha256_file

    return [{"path": shown_path(p), "sha256": sha256_file(p), "rows": count_rows(p)} for p in paths]


# What `make bench` reads and which command makes it: (path, scripts that need it, how to get it)
PREREQUISITES = [
    (REPO / "models" / "access-base" / "config.json", ("train", "train_pack256", "train_orgaccess", "train_orgaccess_10m",
                                                      "packing", "checkpoint", "eval"),
     "dvc repro pretrain   (the demo base model, a DVC output)"),
    (REPO / "data" / "access_policy" / "sft_rows.jsonl", ("train", "train_pack256", "packing", "checkpoint", "eval"),
     "dvc repro generate   (the demo data, a DVC output)"),
    (EXTERNAL / "datasets" / "orgaccess" / "easy-00000-of-00001.parquet",
     ("compile", "packing", "train_orgaccess", "train_orgaccess_10m"),
     "set SFTC_EXTERNAL to the shared external folder (datasets/orgaccess)"),
    (EXTERNAL / "tokenizers" / "qwen2.5-instruct" / "tokenizer.json",
     ("compile", "packing", "train_orgaccess", "train_orgaccess_10m", "scaling"),
     "set SFTC_EXTERNAL to the shared external folder (tokenizers/qwen2.5-instruct)"),
]


def missing_prerequisites(names) -> list[str]:
    """One line per missing input of the named scripts: the path and the command that makes it."""
    lines = []
    for path, needed_by, how in PREREQUISITES:
        users = sorted(set(names) & set(needed_by))
        if users and not path.exists():
            lines.append(f"{shown_path(path)} is missing (needed by {', '.join(users)}): {how}")
    return lines


def median(values) -> float:
    return float(statistics.median(values))


def write_result(name: str, result: dict) -> Path:
    """results/<name>.json, written whole or not at all, with the code and the arguments it measured."""
    from sftc.io import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    result.setdefault("code", code_state())
    result.setdefault("measured_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    result.setdefault("argv", sys.argv[1:])
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def demo_bundle() -> Path:
    """The demo's full-SFT bundle (access-base model, access-policy data), compiled into the
    benchmark cache; a warm recompile when it is already there."""
    from sftc.compiler import compile_spec

    bundle, _, _ = compile_spec(str(DEMO_SPEC), bundles_dir=CACHE / "bundles")
    return bundle


# A ~10M-parameter Llama of the demo model's shape (its vocabulary and tokenizer), the size the
# issue's lab figures were taken on: 6 layers, hidden 384, 6 heads (2 kv heads), MLP 1024.
SCALED_10M = {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1024,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64}


def scaled_model(base: Path, shape: dict = SCALED_10M) -> Path:
    """`base` with a bigger body and fresh random weights, saved once under the cache. Throughput
    depends on the shape, not the weights, so the benchmark needs no trained 10M model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = CACHE / "models" / ("scaled-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items())))
    if not (out / "config.json").exists():
        config = AutoConfig.from_pretrained(base)
        for key, value in shape.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out)
    return out


def bench_threads() -> int:
    """Intra-op threads for every CPU measurement: fixed, the same for every setup, default 1.

    Why 1 and not the 2 cores: on this shared machine (load average 4-6 on 2 cores while other
    jobs run) a 2-thread OpenMP region stalls whenever one of its threads is descheduled; measured
    here, 2000 small matmuls took 1.8 s on 1 thread and 33.7 s on 2. One thread degrades with the
    load instead of collapsing, so ratios between interleaved setups stay meaningful. Set
    SFTC_BENCH_THREADS=2 on an idle machine.
    """
    return int(os.environ.get("SFTC_BENCH_THREADS", "1"))


def demo_variant_bundle(seq_length: int) -> Path:
    """The demo bundle with another packing.seq_length: a copy of the demo's inputs in a scratch
    project under the cache (specs may not point outside their project), compiled there."""
    import re
    import shutil

    from sftc.compiler import compile_spec

    project = CACHE / f"demo-pack{seq_length}"
    for rel in ("data/access_policy/sft_rows.jsonl", "models/access-base", "templates/chat/access-policy.jinja",
                "evals/access_policy.yaml"):
        src, dst = REPO / rel, project / rel
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (project / "pyproject.toml").write_text("")
    spec = DEMO_SPEC.read_text()
    spec, n = re.subn(r"packing:\s*\{strategy: bfd, seq_length: \d+\}", f"packing: {{strategy: bfd, seq_length: {seq_length}}}", spec)
    if n != 1:
        raise SystemExit(f"{DEMO_SPEC}: could not find its packing line to vary")
    (project / "specs").mkdir(exist_ok=True)
    (project / "specs" / DEMO_SPEC.name).write_text(spec)
    bundle, _, _ = compile_spec(str(project / "specs" / DEMO_SPEC.name))
    return bundle


def set_threads() -> int:
    import torch

    n = bench_threads()
    torch.set_num_threads(n)
    return n


def thread_env() -> dict:
    """The same thread count for child processes (`sftc run` sessions) that set none themselves."""
    n = str(bench_threads())
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def run_child(code: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
