"""Behaviour-eval generation throughput: batched with the KV cache vs one prompt at a time.

The eval that `sftc run` does at every checkpoint: runtime.evaluate.generate_ids (greedy,
left-padded, KV cache on, prompts sorted by length) over the demo bundle's held-out prompts,
with the spec's max_new_tokens and the template's terminator as a stop token. The model is the
demo's trained export when present (it stops like a trained model does; a base model rambles to
max_new_tokens and would flatter batching), else models/access-base.

Batched = the spec's eval.batch_size; sequential = batch_size 1 on the same prompts. Interleaved,
repeated, median. Also reports how many replies are identical between the two (greedy, so they
should all be, up to float differences from left padding).

    .venv/bin/python benchmarks/bench_eval.py [--prompts 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.evaluate import generate_ids

    threads = common.set_threads()
    bundle = load_bundle(common.demo_bundle())
    spec = bundle.spec
    export = common.REPO / "runs" / spec.name / "export"
    model_path = export if (export / "model.safetensors").exists() else Path(bundle.model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = True
    tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer_path)
    prompts = [p["prompt_ids"] for p in bundle.eval_prompts()[: args.prompts]]
    stop = [bundle.lock.template.terminator_id]
    max_new = spec.eval.max_new_tokens
    batch = spec.eval.batch_size

    generate_ids(model, tokenizer, prompts[:2], max_new, batch, stop)  # warm-up
    times = {"batched": [], "sequential": []}
    outputs = {}
    load = [common.loadavg()]
    for rep in range(args.repeats):
        order = ("batched", "sequential") if rep % 2 == 0 else ("sequential", "batched")
        for name in order:
            start = time.perf_counter()
            outputs[name] = generate_ids(model, tokenizer, prompts, max_new, batch if name == "batched" else 1, stop)
            times[name].append(time.perf_counter() - start)
        load.append(common.loadavg())
    generated = {k: sum(len(g["ids"]) for g in v) for k, v in outputs.items()}
    same = sum(a["ids"] == b["ids"] for a, b in zip(outputs["batched"], outputs["sequential"]))
    med = {k: common.median(v) for k, v in times.items()}
    result = {
        "machine": common.machine(),
        "loadavg": load,
        "torch_threads": threads,
        "model": common.shown_path(model_path),
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "batch_size": batch,
        "generated_tokens": generated,
        "replies_identical": f"{same}/{len(prompts)}",
        "batched_s": round(med["batched"], 3),
        "sequential_s": round(med["sequential"], 3),
        "batched_tokens_per_s": round(generated["batched"] / med["batched"], 1),
        "sequential_tokens_per_s": round(generated["sequential"] / med["sequential"], 1),
        "eval_batched_speedup": round(med["sequential"] / med["batched"], 2),
        "repeat_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    common.write_result("eval", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return result


if __name__ == "__main__":
    main()
