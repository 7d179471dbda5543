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

    from sftc.runtime.evaluate import behaviour_metrics, load_rules

    lock = json.loads((bundle_dir / "bundle.lock.json").read_text())
    prompts = [json.loads(line) for line in (bundle_dir / "eval_prompts.jsonl").read_text().splitlines() if line]
    cap = lock["spec"]["eval"]["max_prompts"]
    prompts = prompts[:cap] if cap else prompts
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/access-base")
    model = AutoModelForCausalLM.from_pretrained(REPO / "models/access-base", dtype=torch.float32)
    ev = lock["spec"]["eval"]
    stop = [lock["template"]["terminator_id"], tokenizer.eos_token_id]
    metrics = behaviour_metrics(model, tokenizer, prompts, load_rules(bundle_dir / "rules.yaml"),
                                ev["max_new_tokens"], ev["batch_size"], eos_token_ids=stop)
    return {k: v for k, v in metrics.items() if k != "samples"}


def compare() -> None:
    from sftc.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    table = []
    baseline = None
    for name in SFT_RUNS:
        run_dir = REPO / "runs" / name
        record = json.loads((run_dir / "run.json").read_text())
        bundle_dir = Path(record["bundle_dir"])
        if not bundle_dir.is_absolute():
            bundle_dir = REPO / bundle_dir
        lock = json.loads((bundle_dir / "bundle.lock.json").read_text())
        best = json.loads((run_dir / "best.json").read_text())
        resources = json.loads((run_dir / "resources.json").read_text())
        step = best.get("best_step")
        chosen = next((c for c in best.get("candidates", []) if c.get("step") == step), {})
        if baseline is None:
            baseline = base_scores(bundle_dir)
        table.append({
            "run": name,
            "parameterization": lock["spec"]["parameterization"]["kind"],
            "trainable_parameters": lock["parameters"]["trainable"],
            "total_parameters": lock["parameters"]["total"],
            "best_step": step,
            "format_pass_rate": chosen.get("format_pass_rate"),
            "policy_pass_rate": chosen.get("policy_pass_rate"),
            "eval_loss": chosen.get("eval_loss"),
            "peak_rss_mb": resources["peak_rss_mb"],
            "memory_estimate_gib": lock["memory_estimate"]["total_gib"],
            "wall_s": resources["wall_s"],
            "tokens": lock["budget"]["total_tokens"],
            "supervised_tokens": lock["budget"]["supervised_tokens"],
            "bundle_id": lock["bundle_id"],
        })
    result = {"base_model": baseline, "runs": table, "eval_prompts": baseline.get("n_prompts")}
    reports = REPO / "reports"
    atomic_write_json(reports / "comparison.json", result)
    lines = [
        "# Access-policy assistant: held-out behaviour by parameterization",
        "",
        f"Held-out threads never seen in training; {baseline.get('n_prompts')} prompts, greedy decoding, "
        "scored by evals/access_policy.yaml. Best checkpoint chosen by the spec's rule (format >= 0.95, "
        "then policy pass rate, then eval loss). Estimated memory is the compiler's per-device estimate "
        "(weights, gradients, optimizer, activations); peak RSS is the training process on CPU, "
        "dominated here by the ~1 GB of Python libraries, so at this model size it does not separate the methods.",
        "",
        "| run | trainable params | best step | format pass | policy pass | eval loss | est. train memory MiB | peak RSS MB | wall s | tokens | supervised |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base model (after CPT) | - | - | {baseline['format_pass_rate']:.3f} | {baseline['policy_pass_rate']:.3f} | - | - | - | - | - | - |",
    ]
    for row in table:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(
            f"| {row['run']} | {row['trainable_parameters']:,} | {row['best_step']} | {fmt(row['format_pass_rate'])} | "
            f"{fmt(row['policy_pass_rate'])} | {fmt(row['eval_loss'])} | {row['memory_estimate_gib'] * 1024:.0f} | "
            f"{row['peak_rss_mb']} | {row['wall_s']} | "
            f"{row['tokens']:,} | {row['supervised_tokens']:,} |"
        )
    atomic_write_text(reports / "comparison.md", "\n".join(lines) + "\n")
    atomic_write_bytes(reports / "comparison.png", _plot(baseline, table))


def _plot(baseline: dict, table: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base"] + [row["parameterization"] for row in table]
    fmt = [baseline["format_pass_rate"]] + [row["format_pass_rate"] or 0 for row in table]
    pol = [baseline["policy_pass_rate"]] + [row["policy_pass_rate"] or 0 for row in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], fmt, width=0.4, label="format pass rate")
    left.bar([i + 0.2 for i in x], pol, width=0.4, label="policy pass rate")
    left.set_xticks(list(x), names)
    left.set_ylim(0, 1.05)
    left.set_title("Held-out behaviour (best checkpoint)")
    left.legend(loc="lower right")
    for row in table:
        right.scatter(row["peak_rss_mb"], row["policy_pass_rate"] or 0, s=60)
        right.annotate(f"{row['parameterization']} ({row['trainable_parameters']:,} trainable)",
                       (row["peak_rss_mb"], row["policy_pass_rate"] or 0), textcoords="offset points", xytext=(5, 5))
    right.set_xlabel("peak RSS of training (MB)")
    right.set_ylabel("policy pass rate")
    right.set_title("Behaviour under a memory budget")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


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
