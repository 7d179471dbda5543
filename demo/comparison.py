"""The worked example's comparison of full, LoRA and QLoRA under a memory budget (issue 15).

`demo.pipeline compare` calls `write_comparison`. Everything in reports/comparison.json is a
function of the runs' files and the code: behaviour of the selected checkpoint, the lock's
memory estimate, training memory measured as exact tensor bytes, and the 4-bit base's held-out
loss. DVC treats it as a metric, so timings (wall time, peak RSS), which change on every run,
go to reports/timings.json instead. README.md's demo table is rewritten from comparison.json.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_BLOCK = "comparison"


def _bench_memory():
    # The step measurement lives with the benchmarks (it is runtime measurement, not a compiler
    # pass) and benchmarks/ is not a package: import the script by path.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_memory

    return bench_memory


def held_out_loss(model, tokens) -> tuple[float, int]:
    """Token-summed loss and token count over every held-out example, each run alone (no
    packing, so no attention layout can matter to the comparison of two base models)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(tokens.n_rows):
            for ids, labels in tokens.examples(r):
                scored = int((labels[1:] != -100).sum())
                if not scored:
                    continue
                out = model(input_ids=torch.tensor(ids[None], dtype=torch.long),
                            labels=torch.tensor(labels[None], dtype=torch.long))
                total += float(out.loss) * scored
                count += scored
    return total, count


def quantized_base_loss(model_dir: Path, tokens, quantization) -> dict:
    """Held-out loss of the base model as stored for training: unquantized (float32) and 4-bit
    (bitsandbytes, the spec's quant_type, double_quant and compute dtype), before any adapter.
    The gap is what QLoRA's adapters must recover before they can teach anything."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    losses = {}
    for label, kwargs in (
        ("float32", {}),
        ("4bit", {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype)), "device_map": {"": "cpu"}}),
    ):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
        total, count = held_out_loss(model, tokens)
        losses[label] = total / count if count else None
        losses["eval_tokens"] = count
    return {
        "quant_type": quantization.quant_type, "double_quant": quantization.double_quant,
        "base_eval_loss": round(losses["float32"], 4), "quantized_base_eval_loss": round(losses["4bit"], 4),
        "quantization_loss_increase": round(losses["4bit"] - losses["float32"], 4),
        "eval_tokens": losses["eval_tokens"],
    }


def checkpoint_optimizer_bytes(run_dir: Path) -> int | None:
    """Tensor bytes of the optimizer state the run itself saved (its newest checkpoint)."""
    import torch

    found = sorted(glob.glob(str(run_dir / "checkpoints" / "checkpoint-*" / "optimizer.pt")),
                   key=lambda p: int(Path(p).parent.name.split("-")[-1]))
    if not found:
        return None
    state = torch.load(found[-1], map_location="cpu", weights_only=True)
    return int(sum(v.nbytes for s in state.get("state", {}).values() for v in s.values() if torch.is_tensor(v)))


def training_memory(spec, model_dir: Path, run_dir: Path) -> dict:
    """What a training step of this run's spec holds, measured: exact weight, gradient and
    optimizer-state tensor bytes after one step, and the activations autograd stores for the
    backward (bench_memory.measure_step), on the run's base model at the locked micro-batch."""
    import torch

    torch.manual_seed(spec.seed)
    measured = _bench_memory().measure_step(model_dir, spec, "cpu", seed=spec.seed)
    parts = {k: measured[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes")}
    parts["activations_bytes"] = measured["activations_saved_bytes"] + measured["activations_logits_saved_bytes"]
    parts["total_bytes"] = sum(parts.values())
    parts["optimizer_bytes_in_checkpoint"] = checkpoint_optimizer_bytes(run_dir)
    return parts


def comparison_row(name: str, lock, best: dict, spec, model_dir: Path, run_dir: Path) -> dict:
    step = best.get("best_step")
    chosen = next((c for c in best.get("candidates", []) if c.get("step") == step), {})
    if step is None:  # report the best ineligible checkpoint's figures beside "none eligible"
        ranked = sorted((c for c in best.get("candidates", []) if c.get("format_pass_rate") is not None),
                        key=lambda c: (c["format_pass_rate"], c.get("policy_pass_rate") or 0), reverse=True)
        chosen = ranked[0] if ranked else {}
    memory = lock.memory
    estimate = {"total_bytes": memory.total_bytes, **{k: v for k, v in memory.parts.items()
                                                       if k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                                "activations_bytes")}}
    return {
        "run": name,
        "parameterization": lock.spec.parameterization.kind,
        "trainable_parameters": lock.parameters.trainable,
        "total_parameters": lock.parameters.total,
        "best_step": step,
        "eligible": step is not None,
        "reported_step": chosen.get("step"),
        "format_pass_rate": chosen.get("format_pass_rate"),
        "policy_pass_rate": chosen.get("policy_pass_rate"),
        "eval_loss": chosen.get("eval_loss"),
        "memory_estimate": estimate,
        "memory_measured": training_memory(spec, model_dir, run_dir),
        "tokens": lock.budget.total_tokens,
        "supervised_tokens": lock.budget.supervised_tokens,
        "bundle_id": lock.bundle_id,
    }


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if isinstance(n, (int, float)) else "-"


def _step(row: dict) -> str:
    if row["eligible"]:
        return str(row["best_step"])
    return f"none eligible (best ineligible: {row['reported_step']})" if row["reported_step"] else "none eligible"


def markdown_table(result: dict) -> str:
    """The demo table, from comparison.json alone (README.md and comparison.md show the same)."""
    base = result["base_model"]
    lines = [
        "| run | trainable params | best step | format pass | policy pass | eval loss | "
        "training memory MiB, measured | estimated |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model (after continued pretraining) | - | - | {_fmt(base['format_pass_rate'])} | "
        f"{_fmt(base['policy_pass_rate'])} | - | - | - |",
    ]
    for row in result["runs"]:
        kind = row["parameterization"]
        label = {"full": "full", "lora": "lora", "qlora": "qlora (4-bit base)"}.get(kind, kind)
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {_step(row)} | {_fmt(row['format_pass_rate'])} | "
            f"{_fmt(row['policy_pass_rate'])} | {_fmt(row['eval_loss'])} | "
            f"{_mib(row['memory_measured']['total_bytes'])} | {_mib(row['memory_estimate']['total_bytes'])} |")
    q = result.get("quantized_base")
    if q:
        lines += ["", f"Held-out loss of the base before any adapter: {q['base_eval_loss']:.4f} in float32, "
                      f"{q['quantized_base_eval_loss']:.4f} stored as {q['quant_type']}"
                      f"{' with double quantization' if q['double_quant'] else ''} "
                      f"(+{q['quantization_loss_increase']:.4f}, {q['eval_tokens']:,} supervised tokens)."]
    lines += ["", "Training memory, measured: exact bytes of weights, gradients and optimizer state after one "
                  "step of the spec's micro-batch, plus the activations autograd stores for the backward "
                  "(benchmarks/bench_memory.py measure_step, on the run's base model). Estimated: the lock's "
                  "memory_estimate (docs/memory.md)."]
    return "\n".join(lines)


def write_comparison(result: dict, timings: dict, reports: Path = REPO / "reports", readme: Path = REPO / "README.md") -> None:
    from sftc.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    atomic_write_json(reports / "comparison.json", result)
    atomic_write_json(reports / "timings.json", timings)
    text = ["# Access-policy assistant: held-out behaviour by parameterization", "",
            f"Held-out threads never seen in training; {result['eval_prompts']} prompts, greedy decoding, "
            "scored by evals/access_policy.yaml. Best checkpoint chosen by the spec's rule (format >= 0.95, "
            "then policy pass rate, then eval loss). Wall time and peak RSS per run: reports/timings.json.", "",
            markdown_table(result)]
    atomic_write_text(reports / "comparison.md", "\n".join(text) + "\n")
    atomic_write_bytes(reports / "comparison.png", plot(result))
    update_readme(result, readme)


def update_readme(result: dict, readme: Path = REPO / "README.md") -> None:
    """Rewrite README.md's `<!-- comparison:begin -->` block from comparison.json."""
    _bench_memory().rewrite_marked(readme, {README_BLOCK: markdown_table(result)})


def plot(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, rows = result["base_model"], result["runs"]
    names = ["base"] + [row["parameterization"] for row in rows]
    fmt = [base["format_pass_rate"]] + [row["format_pass_rate"] or 0 for row in rows]
    pol = [base["policy_pass_rate"]] + [row["policy_pass_rate"] or 0 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], fmt, width=0.4, label="format pass rate")
    left.bar([i + 0.2 for i in x], pol, width=0.4, label="policy pass rate")
    left.set_xticks(list(x), names)
    left.set_ylim(0, 1.05)
    left.set_title("Held-out behaviour (selected or best ineligible checkpoint)")
    left.legend(loc="lower right")
    for i, row in enumerate(rows):
        color = f"C{i}"
        measured = row["memory_measured"]["total_bytes"] / 2**20
        estimated = row["memory_estimate"]["total_bytes"] / 2**20
        policy = row["policy_pass_rate"] or 0
        right.scatter(measured, policy, s=70, color=color, label=f"{row['parameterization']} measured")
        right.scatter(estimated, policy, s=70, facecolors="none", edgecolors=color, label=f"{row['parameterization']} estimate")
        right.annotate(f"{row['parameterization']} ({row['trainable_parameters']:,} trainable)",
                       (measured, policy), textcoords="offset points", xytext=(5, 5))
    right.set_xlabel("training memory per step (MiB): weights + gradients + optimizer + stored activations")
    right.set_ylabel("policy pass rate")
    right.set_title("Behaviour under a memory budget")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
