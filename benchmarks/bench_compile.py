"""Compile benchmark: `sftc compile` vs TRL SFTTrainer's own dataset preparation, same run.

OrgAccess easy (38,280 rows, $SFTC_EXTERNAL/datasets/orgaccess, default ../shared/external),
the real Qwen2.5 tokenizer and ChatML template, max_length 1024, bfd packing. Both sides get the
same prompt/completion rows. TRL's side is the dataset preparation SFTTrainer does in its
constructor (chat template, tokenize, completion mask, labels, pack); sftc's side is a cold
compile (validate, split with near-duplicate merging, template, tokenize + mask, pack, budget,
parameter count, hashing, bundle write). Then a warm recompile of unchanged inputs through the
CLI, and the compile's peak RSS.

Both sides run in child processes, interleaved (sftc, trl, trl, sftc, ...) because the machine
is shared; medians are reported. Each child reports its own peak RSS (RUSAGE_SELF), its import
time, and its core time:
  sftc_compile_s   compile_spec() wall time, imports of torch/transformers/trl/peft included
                   (compile imports them lazily, so they are part of what `sftc compile` costs)
  trl_prepare_s    the SFTTrainer constructor only (TRL's imports, the model and load_dataset
                   come before it and are not counted): the definition the targets were set with
  *_process_s      child launch to done, both sides including every import: the user-visible cost
compile_vs_trl_ratio = sftc_compile_s / trl_prepare_s (unchanged definition);
compile_vs_trl_ratio_process compares the whole processes.

The project (data, tokenizer, spec) is written to $SFTC_BENCH_CACHE/orgaccess and the bundle
stays in its bundles/ so bench_packing.py can read it. Writes benchmarks/results/compile.json.

    .venv/bin/python benchmarks/bench_compile.py [--rows N] [--repeats 2] [--profile]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sftc.lock import load_lock  # noqa: E402

REPO = common.REPO
EXTERNAL = common.EXTERNAL
RESULTS = common.RESULTS
PROJECT = common.CACHE / "orgaccess"


def machine() -> dict:
    return common.machine()


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



SFTC_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch, transformers, trl, peft  # what compile imports lazily; timed apart for the record
t1 = time.perf_counter()
from sftc.compiler import split as split_module
split_s = []
original = split_module.split_examples
def timed(*args, **kwargs):  # the split pass (near-duplicate search): work TRL does not do
    start = time.perf_counter()
    try:
        return original(*args, **kwargs)
    finally:
        split_s.append(time.perf_counter() - start)
split_module.split_examples = timed  # compile_spec imports it at call time
from sftc.compiler import compile_spec
b, l, r = compile_spec(sys.argv[1], force=True)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t0, "import_s": t1 - t0, "split_s": sum(split_s), "bundle": str(b), "reused": r,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRL_CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
t1 = time.perf_counter()
project = Path(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(project / "models/qwen")
config = AutoConfig.from_pretrained(project / "models/qwen")
# a 1-layer stand-in: TRL's data preparation does not depend on the model's size
config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
config.num_attention_heads, config.num_key_value_heads = 2, 1
model = AutoModelForCausalLM.from_config(config)
rows = load_dataset("json", data_files=str(project / "data/orgaccess.jsonl"), split="train")
rows = rows.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                           "completion": [{"role": "assistant", "content": r["completion"]}]},
                remove_columns=["prompt", "completion", "user_role"])
args = SFTConfig(output_dir=str(project / "trl-out"), max_length=1024, packing=True, packing_strategy="bfd",
                 report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, per_device_train_batch_size=8)
t2 = time.perf_counter()
trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
t3 = time.perf_counter()
packed = trainer.train_dataset
lengths = [len(x) for x in packed["input_ids"]]
print(json.dumps({"seconds": t3 - t2, "process_s": t3 - t0, "import_s": t1 - t0, "rows": len(packed),
                  "tokens": sum(lengths), "examples": len(rows),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(code: str, *argv: str) -> dict:
    import tempfile

    launched = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sftc-bench-hfds-") as cache:
        # A fresh datasets cache per run: `datasets` caches load_dataset and every map() result on
        # disk, so a second TRL run on the same file finished in 1.4 s instead of ~40 s. Both
        # sides must be cold (sftc compiles with force=True).
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - launched  # includes interpreter start-up
    return result


def trl_prepare(project: Path) -> dict:
    """TRL SFTTrainer's dataset preparation on the same rows (conversational prompt/completion,
    so it applies the same ChatML template), timed around the constructor, in a child process."""
    return _child(TRL_CHILD, str(project))


def sftc_cold(project: Path) -> dict:
    """Cold compile (force=True) in a child process: wall time, import share and peak RSS."""
    return _child(SFTC_CHILD, str(project / "specs/orgaccess.yaml"))


def sftc_warm(project: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv/bin/sftc"), "compile", str(project / "specs/orgaccess.yaml")],
                         capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout, out.stdout
    return time.perf_counter() - start


def profile(project: Path, top: int = 25) -> list[dict]:
    """cProfile of one cold compile (in this process, imports included): where the time goes."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    from sftc.compiler import compile_spec

    compile_spec(str(project / "specs/orgaccess.yaml"), force=True)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "cumulative_s": round(ct, 2),
                     "own_s": round(tt, 2), "calls": nc})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:top]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=None, help="Limit rows (default: all 38,280).")
    parser.add_argument("--repeats", type=int, default=2, help="cold compile / TRL pairs, interleaved ABBA")
    parser.add_argument("--profile", action="store_true", help="also cProfile one cold compile")
    args = parser.parse_args()
    shutil.rmtree(PROJECT, ignore_errors=True)
    PROJECT.mkdir(parents=True)
    project = make_project(PROJECT, args.rows)
    load = [common.loadavg()]
    colds, trls = [], []
    for rep in range(args.repeats):
        # ABBA: neither side always runs first on a machine whose load drifts
        for side in (("sftc", "trl") if rep % 2 == 0 else ("trl", "sftc")):
            if side == "sftc":
                colds.append(sftc_cold(project))
            else:
                trls.append(trl_prepare(project))
            load.append(common.loadavg())
            print(f"repeat {rep + 1} {side}: {(colds if side == 'sftc' else trls)[-1]['seconds']:.1f}s", flush=True)
    warm = [sftc_warm(project) for _ in range(3)]
    lock = load_lock(Path(colds[-1]["bundle"]))
    med = common.median
    sftc_s, trl_s = med([c["seconds"] for c in colds]), med([t["seconds"] for t in trls])
    split_s = med([c["split_s"] for c in colds])
    # Rows each side tokenized, from each side's own output: sftc tokenizes every row it accepts
    # (rows rejected for their length were tokenized too, then dropped); TRL every example it got.
    manifest = lock.data_manifest
    not_tokenized = sum(n for reason, n in manifest.rejected.items() if "trunc" not in reason and "token" not in reason)
    sftc_tokenized = manifest.rows_read - not_tokenized
    trl_tokenized = trls[-1]["examples"]
    sftc_proc, trl_proc = med([c["process_s"] for c in colds]), med([t["process_s"] for t in trls])
    result = {
        "machine": machine(),
        "loadavg": load,
        "rows": lock.data_manifest.rows_read,
        "repeats": args.repeats,
        "sftc_compile_s": round(sftc_s, 2),
        "trl_prepare_s": round(trl_s, 2),
        "compile_vs_trl_ratio": round(sftc_s / trl_s, 3),
        "sftc_import_s": round(med([c["import_s"] for c in colds]), 2),
        "compile_vs_trl_ratio_excl_imports": round((sftc_s - med([c["import_s"] for c in colds])) / trl_s, 3),
        # equal work: the same rows on both sides, or else both per-example costs
        "sftc_rows_tokenized": sftc_tokenized,
        "trl_rows_tokenized": trl_tokenized,
        "compile_vs_trl_ratio_per_example": round((sftc_s / sftc_tokenized) / (trl_s / trl_tokenized), 3),
        "sftc_split_s": round(split_s, 2),
        "compile_vs_trl_ratio_excl_split": round((sftc_s - split_s) / trl_s, 3),
        "ratio_runs": [round(c["seconds"] / t["seconds"], 3) for c, t in zip(colds, trls)],
        "inputs": {"files": common.input_files(EXTERNAL / "datasets/orgaccess/easy-00000-of-00001.parquet",
                                               project / "data/orgaccess.jsonl"),
                   "tokenizer": "$SFTC_EXTERNAL/tokenizers/qwen2.5-instruct", "max_length": 1024, "rows_limit": args.rows},
        "sftc_process_s": round(sftc_proc, 2),
        "trl_process_s": round(trl_proc, 2),
        "compile_vs_trl_ratio_process": round(sftc_proc / trl_proc, 3),
        "warm_recompile_s": round(med(warm), 3),
        "compile_peak_rss_mb": round(max(c["peak_rss_mb"] for c in colds), 1),
        "trl_peak_rss_mb": round(max(t["peak_rss_mb"] for t in trls), 1),
        "sftc_compile_runs_s": [round(c["seconds"], 2) for c in colds],
        "trl_prepare_runs_s": [round(t["seconds"], 2) for t in trls],
        "packing_efficiency": lock.budget.packing_efficiency,
        "packed_rows": lock.packing.rows,
        "ideal_rows": lock.packing.ideal_rows,
        "trl_packed_rows": trls[-1]["rows"],
        "trl_packing_efficiency": round(trls[-1]["tokens"] / (trls[-1]["rows"] * 1024), 4),
        "trl_examples": trls[-1]["examples"],
        "rejected": lock.data_manifest.rejected,
        "bundle": common.shown_path(Path(colds[-1]["bundle"])),
        "targets": {"compile_vs_trl_ratio": "<= 1.0", "warm_recompile_s": "<= 2", "compile_peak_rss_mb": "<= 2048",
                    "packing_efficiency": ">= 0.97"},
    }
    if args.profile:
        result["profile_top"] = profile(project)
    common.write_result("compile", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "profile_top")}, indent=2))
    return result


if __name__ == "__main__":
    main()
