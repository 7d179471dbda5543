"""The worked example's DVC stages: pretrain, sft <name>, compare.

Each stage compiles a spec into `bundles/<name>/<bundle id>/`, runs it in a child process into
`runs/<name>/` (so DVC outputs have fixed paths while bundle ids stay content-addressed) and
records the child's wall time and peak RSS, which only the parent can measure honestly.

    .venv/bin/python -m demo.pipeline pretrain
    .venv/bin/python -m demo.pipeline sft access-policy-lora
    .venv/bin/python -m demo.pipeline compare
    .venv/bin/python -m demo.pipeline records access-policy-lora   # DVC metrics/plots of an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT_RUNS = ("access-policy-full", "access-policy-lora", "access-policy-qlora")


def compile_and_run(name: str) -> dict:
    from sftc.compiler import compile_spec
    from sftc.io import atomic_write_json

    bundles = REPO / "bundles" / name
    if bundles.exists():  # one bundle per stage output: drop bundles of earlier spec versions
        shutil.rmtree(bundles)
    bundle, lock, _ = compile_spec(REPO / "specs" / f"{name}.yaml", bundles_dir=bundles)
    run_dir = REPO / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # DVC re-runs a stage only when its inputs changed: start clean
    start = time.perf_counter()
    # paths relative to the project: run.json records the bundle path it was given, and an absolute
    # one would not resolve after `dvc pull` into another checkout
    child = subprocess.Popen([str(REPO / ".venv/bin/sftc"), "run", os.path.relpath(bundle, REPO),
                              "--run-dir", os.path.relpath(run_dir, REPO)], cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sftc run {bundle} failed (exit {os.waitstatus_to_exitcode(status)})")
    resources = {"bundle_id": lock.bundle_id, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    atomic_write_json(run_dir / "resources.json", resources)
    from sftc.review.report import render_report

    render_report(run_dir)  # loss curves, behaviour per checkpoint, tokens per update
    write_run_records(name)
    return resources


def write_run_records(name: str) -> None:
    """DVC's metrics and plots of runs/<name> (selected metrics, loss and behaviour per checkpoint),
    beside the run in reports/runs/<name>/: a file inside the runs/<name> output cannot also be a
    DVC metric. Timings stay in runs/<name>/resources.json, out of every DVC metric."""
    from sftc.review.runs import write_dvc_records

    write_dvc_records(REPO / "runs" / name, REPO / "reports" / "runs" / name)


def pretrain() -> None:
    """Continued pretraining on the corpus, then promote its export to models/access-base."""
    compile_and_run("access-policy-cpt")
    export = REPO / "runs/access-policy-cpt/export"
    target = REPO / "models/access-base"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(export, target)


def base_scores(bundle_dir: Path) -> dict:
    """The base model's held-out behaviour on the same prompts and rules: the baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.evaluate import behaviour_metrics

    bundle = load_bundle(bundle_dir)  # the sealed lock and the verified prompts and rules
    ev = bundle.spec.eval
    prompts = bundle.eval_prompts()
    prompts = prompts[:ev.max_prompts] if ev.max_prompts else prompts
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/access-base")
    model = AutoModelForCausalLM.from_pretrained(REPO / "models/access-base", dtype=torch.float32)
    stop = [bundle.lock.template.terminator_id, tokenizer.eos_token_id]
    metrics = behaviour_metrics(model, tokenizer, prompts, bundle.rules, ev.max_new_tokens, ev.batch_size, eos_token_ids=stop)
    from sftc.runtime.rundir import CLOCK_METRIC_KEYS

    # comparison.json is a hashed DVC output: no clock readings (generation time) in it
    return {k: v for k, v in metrics.items() if k != "samples" and k not in CLOCK_METRIC_KEYS}


def compare() -> None:
    """Behaviour, training memory (estimated and measured) and the 4-bit base's held-out loss per
    run (demo/comparison.py); timings apart, in reports/timings.json."""
    from demo.comparison import comparison_row, quantized_base_loss, write_comparison
    from sftc.lock import load_lock
    from sftc.runtime.bundle import load_bundle

    rows, timings, baseline, quantized = [], {}, None, None
    for name in SFT_RUNS:
        run_dir = REPO / "runs" / name
        record = json.loads((run_dir / "run.json").read_text())
        bundle_dir = Path(record["bundle_dir"])
        if not bundle_dir.is_absolute():
            bundle_dir = REPO / bundle_dir
        lock = load_lock(bundle_dir)
        best = json.loads((run_dir / "best.json").read_text())
        timings[name] = json.loads((run_dir / "resources.json").read_text())
        if baseline is None:
            baseline = base_scores(bundle_dir)
        model_dir = REPO / "models/access-base"
        rows.append(comparison_row(name, lock, best, lock.spec, model_dir, run_dir))
        if lock.spec.parameterization.kind == "qlora" and quantized is None:
            quantized = quantized_base_loss(model_dir, load_bundle(bundle_dir).eval, lock.spec.parameterization.quantization)
    result = {"base_model": baseline, "runs": rows, "eval_prompts": baseline.get("n_prompts"), "quantized_base": quantized}
    write_comparison(result, timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("pretrain")
    sft = sub.add_parser("sft")
    sft.add_argument("name", choices=SFT_RUNS)
    sub.add_parser("compare")
    records = sub.add_parser("records")
    records.add_argument("name", choices=("access-policy-cpt",) + SFT_RUNS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.stage == "pretrain":
        pretrain()
    elif args.stage == "sft":
        compile_and_run(args.name)
    elif args.stage == "records":
        write_run_records(args.name)
    else:
        compare()


if __name__ == "__main__":
    main()
