"""Compile benchmark: `sftc compile` vs TRL SFTTrainer's own dataset preparation, same run.

OrgAccess easy (38,280 rows, ../shared/external/datasets/orgaccess), the real Qwen2.5 tokenizer
and ChatML template, max_length 1024, bfd packing. Both sides get the same prompt/completion
rows. TRL's side is the dataset preparation SFTTrainer does in its constructor (chat template,
tokenize, completion mask, labels, pack); sftc's side is a cold compile (validate, split with
near-duplicate merging, template, tokenize + mask, pack, budget, parameter count, hashing,
bundle write). Then a warm recompile of unchanged inputs through the CLI, and the compile's
peak RSS. Writes benchmarks/results/compile.json.

    .venv/bin/python benchmarks/bench_compile.py [--rows N]
"""

from __future__ import annotations

import os
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = Path(os.environ.get("SFTC_EXTERNAL", REPO.parent / "shared" / "external"))
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def make_project(tmp: Path, rows: int | None) -> Path:
    import pyarrow.parquet as pq

    table = pq.read_table(EXTERNAL / "datasets/orgaccess/easy-00000-of-00001.parquet").to_pylist()
    if rows:
        table = table[:rows]
    (tmp / "pyproject.toml").write_text("")
    (tmp / "data").mkdir()
    with open(tmp / "data/orgaccess.jsonl", "w") as handle:
        for row in table:
            handle.write(json.dumps({
                "user_role": row["user_role"],
                "prompt": f"Role: {row['user_role']}\nPermissions: {row['permissions']}\nRequest: {row['query']}",
                "completion": f"{row['expected_response']}: {row['rationale']}",
            }) + "\n")
    model = tmp / "models/qwen"
    model.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXTERNAL / "tokenizers/qwen2.5-instruct" / name, model / name)
    shutil.copy(EXTERNAL / "model-configs/qwen2.5_0.5b_instruct/config.json", model / "config.json")
    (tmp / "specs").mkdir()
    (tmp / "specs/orgaccess.yaml").write_text("""
name: orgaccess-bench
objective: sft
parameterization: {kind: lora, rank: 16, alpha: 32}
model: {path: models/qwen}
data: {files: [data/orgaccess.jsonl], format: prompt_completion, fields: {group: user_role}, max_reject_fraction: 0.2}
tokenize: {max_length: 1024}
packing: {strategy: bfd, seq_length: 1024}
batch: {per_device: 8, grad_accum: 4}
optimizer: {lr: 1.0e-4}
schedule: {epochs: 1}
""")
    return tmp


def trl_prepare(project: Path) -> dict:
    """TRL SFTTrainer's dataset preparation on the same rows (conversational prompt/completion,
    so it applies the same ChatML template), measured around the constructor."""
    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(project / "models/qwen")
    config = AutoConfig.from_pretrained(project / "models/qwen")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    model = AutoModelForCausalLM.from_config(config)
    rows = load_dataset("json", data_files=str(project / "data/orgaccess.jsonl"), split="train")
    rows = rows.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]},
                    remove_columns=["prompt", "completion", "user_role"])
    args = SFTConfig(output_dir=str(project / "trl-out"), max_length=1024, packing=True, packing_strategy="bfd",
                     report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, per_device_train_batch_size=8)
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    seconds = time.perf_counter() - start
    packed = trainer.train_dataset
    lengths = [len(x) for x in packed["input_ids"]]
    return {"seconds": round(seconds, 2), "rows": len(packed), "tokens": sum(lengths)}


def sftc_cold(project: Path) -> dict:
    """Cold compile in a child process, for its wall time and peak RSS."""
    code = (
        "import time,json,sys; t=time.perf_counter(); from compiler import compile_spec; "
        f"b,l,r=compile_spec({str(project / 'specs/orgaccess.yaml')!r}, force=True); "
        "print(json.dumps({'seconds': time.perf_counter()-t, 'bundle': str(b), 'reused': r}))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(max(peak_kb, before) / 1024, 1)
    return result


def sftc_warm(project: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv/bin/sftc"), "compile", str(project / "specs/orgaccess.yaml")],
                         capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout, out.stdout
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=None, help="Limit rows (default: all 38,280).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp), args.rows)
        cold = sftc_cold(project)
        warm = sftc_warm(project)
        trl = trl_prepare(project)
        lock = json.loads((Path(cold["bundle"]) / "bundle.lock.json").read_text())
    result = {
        "machine": machine(),
        "rows": lock["data_manifest"]["rows_read"],
        "sftc_compile_s": round(cold["seconds"], 2),
        "trl_prepare_s": trl["seconds"],
        "compile_vs_trl_ratio": round(cold["seconds"] / trl["seconds"], 3),
        "warm_recompile_s": round(warm, 3),
        "compile_peak_rss_mb": cold["peak_rss_mb"],
        "packing_efficiency": lock["budget"]["packing_efficiency"],
        "packed_rows": lock["packing"]["rows"],
        "ideal_rows": lock["packing"]["ideal_rows"],
        "trl_packed_rows": trl["rows"],
        "rejected": lock["data_manifest"]["rejected"],
        "targets": {"compile_vs_trl_ratio": "<= 1.0", "warm_recompile_s": "<= 2", "compile_peak_rss_mb": "<= 2048",
                    "packing_efficiency": ">= 0.97"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
