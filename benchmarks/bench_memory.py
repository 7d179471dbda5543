"""Training memory: sftc's estimate (compiler/model.py estimate_memory) against published numbers
and against what a training step holds, measured.

    .venv/bin/python benchmarks/bench_memory.py            # both; writes results/memory.json
    .venv/bin/python benchmarks/bench_memory.py --docs     # and rewrites the tables in docs/memory.md

Measured (measure_step): one optimizer step of the demo's three specs (full, lora, qlora) on a
model of the demo's size, built like demo/build_base.py. Parameter, gradient and optimizer-state
bytes are exact sums of tensor.nbytes after the step (bitsandbytes Params4bit data plus its
quantization state); stored activations are the bytes autograd saved for the backward
(saved-tensor hooks, each storage once, parameters excluded); on CUDA the step's
max_memory_allocated as well. The RSS delta over a baseline taken after imports and model load
is reported beside them, as the coarse figure it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXTERNAL, REPO, RESULTS, code_state, shown_path, write_result  # noqa: E402

DOCS = REPO / "docs" / "memory.md"
GB = 1e9  # the QLoRA paper's GB are decimal

# What each published row says, where it says it, and the sftc spec of that setup.
QLORA = "QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314)"
PUBLISHED = [
    {
        "setup": "LLaMA-65B QLoRA: nf4 + double quant, r=64 all linear, bf16 compute, paged AdamW 32-bit, "
                 "gradient checkpointing, 1 x 512 tokens",
        "config": "model-configs/llama_65b_hf",
        "published": "fits one 48 GB GPU",
        "published_bytes": 48 * GB,
        "bound": "at most",
        "source": f"{QLORA}, abstract and section 4: finetunes a 65B model on a single 48 GB GPU",
        "spec": {"parameterization": {"kind": "qlora", "rank": 64, "alpha": 16, "dropout": 0.05,
                                      "quantization": {"compute_dtype": "bfloat16", "double_quant": True}},
                 "model": {"dtype": "bfloat16"}, "optimizer": {"name": "paged_adamw_32bit"},
                 "distributed": {"activation_checkpointing": True}},
    },
    {
        "setup": "LLaMA-65B full 16-bit finetuning: bf16 weights and gradients, 32-bit Adam states, 1 x 512 tokens",
        "config": "model-configs/llama_65b_hf",
        "published": "more than 780 GB",
        "published_bytes": 780 * GB,
        "bound": "at least",
        "source": f"{QLORA}, introduction: regular 16-bit finetuning of LLaMA 65B requires more than 780 GB",
        "spec": {"parameterization": {"kind": "full"}, "model": {"dtype": "bfloat16"},
                 "optimizer": {"name": "paged_adamw_32bit"}},
    },
    {
        "setup": "LLaMA-7B (Llama-2-7B shapes) LoRA weights at 0.2% of sftc's base count, bf16",
        "config": "model-configs/mlc_llm_model_presets/llama2_7b.config.json",
        "published": "26 MB of LoRA parameters",
        "published_bytes": 26e6,
        "bound": "about",
        "source": f"{QLORA}, section 2: LoRA weights of 0.2% of a 7B LLaMA take 26 MB",
        "spec": {"parameterization": {"kind": "full"}, "model": {"dtype": "bfloat16"}},
        "part": "0.2% of the base at bf16",
    },
]


def make_spec(overrides: dict, seq_length: int = 512, per_device: int = 1):
    """A complete spec around the parts a memory setup decides (the rest cannot change the estimate)."""
    from sftc.compiler.spec import parse_spec

    raw = {
        "name": "memory", "objective": "sft", "parameterization": {"kind": "full"},
        "model": {"path": "model"},
        "data": {"files": ["rows.jsonl"], "format": "prompt_completion", "fields": {"group": "id"}},
        "packing": {"seq_length": seq_length}, "batch": {"per_device": per_device},
        "optimizer": {"lr": 1e-4}, "schedule": {"epochs": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_spec(raw)


def estimate_for(config, spec) -> dict:
    from sftc.compiler.model import count_parameters, estimate_memory

    counts = count_parameters(config, spec)
    return {"parameters": counts, "memory": estimate_memory(counts, spec, spec.seq_length)}


def published_rows() -> list[dict]:
    from transformers import AutoConfig

    rows = []
    for row in PUBLISHED:
        path = EXTERNAL / row["config"]
        if not path.exists():
            rows.append({**{k: row[k] for k in ("setup", "published", "source")}, "skipped": f"no {row['config']}"})
            continue
        config = AutoConfig.from_pretrained(str(path))
        result = estimate_for(config, make_spec(row["spec"]))
        memory, counts = result["memory"], result["parameters"]
        if row.get("part") == "0.2% of the base at bf16":
            estimate = round(0.002 * counts["base"]) * 2
        else:
            estimate = memory["total_bytes"]
        rows.append({
            "setup": row["setup"], "published": row["published"], "source": row["source"], "bound": row["bound"],
            "estimate_bytes": int(estimate), "ratio": round(estimate / row["published_bytes"], 3),
            "parts": {k: v for k, v in memory.items() if k.endswith("_bytes")} if "part" not in row else {},
            "trainable": counts["trainable"], "trainable_fraction": counts["trainable_fraction"],
        })
    return rows


# --- measured on the demo's model size -------------------------------------------------------


def build_demo_sized_model(out: Path) -> Path:
    """A model of the demo's shape (demo/build_base.py DEMO_SIZES), random weights: memory
    depends on shapes and dtypes, not on what the weights learned."""
    sys.path.insert(0, str(REPO / "demo"))
    from build_base import DEMO_SIZES

    from demo.tiny_model import build_tiny

    corpus = [f"policy {i} grants role {i % 7} read access to system {i % 13}" for i in range(400)]
    return build_tiny(out, corpus, seed=7, **DEMO_SIZES)


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and hasattr(t, "untyped_storage"):
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _quant_state_tensors(param) -> list:
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if t is not None and hasattr(t, "nbytes")]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_for_training(model_dir: Path, spec, device: str):
    """The model as sftc's runtime prepares it for each parameterization (runtime model loading):
    4-bit base through bitsandbytes, peft's k-bit preparation, LoRA from compiler.model.lora_config."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftc.compiler.model import lora_config

    param = spec.parameterization
    kwargs = {"dtype": getattr(torch, spec.model.dtype), "attn_implementation": spec.model.attn_implementation}
    if param.kind == "qlora":
        from transformers import BitsAndBytesConfig

        q = param.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if param.kind != "qlora":
        model = model.to(device)
    model.config.use_cache = False
    if param.kind in ("lora", "qlora"):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if param.kind == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, lora_config(param))
        if param.kind == "qlora":  # the runtime keeps adapters in the locked compute dtype
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(getattr(torch, param.quantization.compute_dtype))
    if spec.distributed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def measure_step(model_dir: Path, spec, device: str = "cpu", seed: int = 0) -> dict:
    """Bytes one optimizer step holds, by part, for `spec` on the model in `model_dir`."""
    import torch
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = load_for_training(model_dir, spec, device)
    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=spec.optimizer.name, use_cpu=device == "cpu",
                             report_to=[], learning_rate=spec.optimizer.lr)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    params = list(model.parameters())
    weight_tensors = params + [t for p in params for t in _quant_state_tensors(p)]
    weight_storages = _storages(weight_tensors)
    vocab = model.config.vocab_size
    tokens = spec.batch.per_device * spec.seq_length
    ids = torch.randint(0, vocab, (spec.batch.per_device, spec.seq_length), device=device)

    saved: dict[int, int] = {}
    logits_saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_storages:
            bucket = logits_saved if t.numel() % (tokens * vocab) == 0 and t.numel() >= tokens * vocab else saved
            bucket[ptr] = t.untyped_storage().nbytes()
        return t

    cuda = device.startswith("cuda")
    if cuda:
        # a first step creates the optimizer state; the second is the steady state measured
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5") if Path("/proc/self/clear_refs").exists() else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    rss_peak = _rss_kib("VmHWM")
    result = {
        "weights_bytes": sum(weight_storages.values()),
        "gradients_bytes": sum(_storages(p.grad for p in params if p.grad is not None).values()),
        "optimizer_bytes": sum(_storages(v for s in optimizer.state.values() for v in s.values()
                                         if torch.is_tensor(v)).values()),
        "activations_saved_bytes": sum(saved.values()),
        "activations_logits_saved_bytes": sum(logits_saved.values()),
        "rss_delta_bytes": max(0, rss_peak - rss_before) * 1024,
    }
    if cuda:
        torch.cuda.synchronize()
        result["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        result["cuda_step_peak_over_weights_bytes"] = int(torch.cuda.max_memory_allocated() - before)
    return result


def measured_rows(device: str = "cpu") -> list[dict]:
    """Full, LoRA and QLoRA as the demo's specs declare them, measured beside the estimate."""
    from sftc.compiler.model import load_config
    from sftc.compiler.spec import load_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_sized_model(Path(tmp) / "model")
        for name in ("access-policy-full", "access-policy-lora", "access-policy-qlora"):
            spec = load_spec(REPO / "specs" / f"{name}.yaml")
            for checkpointing in (False, True):
                variant = spec.model_copy(update={"distributed": spec.distributed.model_copy(
                    update={"activation_checkpointing": checkpointing})})
                estimate = estimate_for(load_config(model_dir, variant), variant)["memory"]
                measured = measure_step(model_dir, variant, device)
                rows.append({"spec": f"specs/{name}.yaml", "kind": spec.parameterization.kind,
                             "activation_checkpointing": checkpointing, "device": device,
                             "micro_batch_tokens": estimate["micro_batch_tokens"],
                             "measured": measured, "estimate": {k: v for k, v in estimate.items() if k.endswith("_bytes")},
                             "ratios": _ratios(estimate, measured)})
    return rows


def _ratios(estimate: dict, measured: dict) -> dict:
    """estimate / measured per part; stored activations compare to the saved-tensor bytes
    (the estimate's logits part also counts the logits' gradient, which autograd does not save)."""
    def ratio(a, b):
        return round(a / b, 3) if b else None
    return {
        "weights": ratio(estimate["weights_bytes"], measured["weights_bytes"]),
        "gradients": ratio(estimate["gradients_bytes"], measured["gradients_bytes"]),
        "optimizer": ratio(estimate["optimizer_bytes"], measured["optimizer_bytes"]),
        "activations_layers": ratio(estimate["activations_layers_bytes"], measured["activations_saved_bytes"]),
    }


GPU_SETUPS = {
        "full bf16, adamw_torch": {"parameterization": {"kind": "full"}, "model": {"dtype": "bfloat16"}},
        "lora r=16 all-linear bf16, adamw_torch": {"parameterization": {"kind": "lora", "rank": 16, "dropout": 0.05},
                                                   "model": {"dtype": "bfloat16"}},
        "qlora nf4+dq r=16 bf16 compute, paged_adamw_32bit": {
            "parameterization": {"kind": "qlora", "rank": 16, "dropout": 0.05,
                                 "quantization": {"compute_dtype": "bfloat16"}},
            "model": {"dtype": "bfloat16"}, "optimizer": {"name": "paged_adamw_32bit"}},
    }


def gpu_spec(label: str, checkpointing: bool):
    return make_spec({**GPU_SETUPS[label], "distributed": {"activation_checkpointing": checkpointing}},
                     seq_length=512, per_device=4)


def gpu_rows(config_dir: Path, device: str = "cuda") -> list[dict]:
    """torch.cuda.max_memory_allocated of a steady-state step beside the estimate's total, for
    full / LoRA / QLoRA of a real published config (random weights), checkpointing off and on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        config = AutoConfig.from_pretrained(str(config_dir))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
        for label, overrides in GPU_SETUPS.items():
            for checkpointing in (False, True):
                spec = gpu_spec(label, checkpointing)
                estimate = estimate_for(config, spec)["memory"]
                measured = measure_step(model_dir, spec, device)
                torch.cuda.empty_cache()
                rows.append({"setup": label, "config": config_dir.name, "activation_checkpointing": checkpointing,
                             "micro_batch_tokens": estimate["micro_batch_tokens"], "measured": measured,
                             "estimate": {k: v for k, v in estimate.items() if k.endswith("_bytes")},
                             "ratio_total": round(estimate["total_bytes"] / measured["cuda_max_allocated_bytes"], 3)
                             if "cuda_max_allocated_bytes" in measured else None})
                print(label, checkpointing, rows[-1]["ratio_total"], flush=True)
    return rows


# --- docs --------------------------------------------------------------------------------------


def _mb(n) -> str:
    return f"{n / 1e6:,.1f}" if isinstance(n, (int, float)) else "-"


def docs_tables(result: dict, gpu: dict | None = None) -> dict[str, str]:
    pub = ["| setup | published | sftc estimate | estimate / published | source |", "|---|---|---|---|---|"]
    for row in result["published"]:
        if "skipped" in row:
            pub.append(f"| {row['setup']} | {row['published']} | skipped: {row['skipped']} | - | {row['source']} |")
            continue
        est = row["estimate_bytes"]
        shown = f"{est / GB:,.2f} GB" if est > GB else f"{est / 1e6:,.1f} MB"
        pub.append(f"| {row['setup']} | {row['published']} | {shown} | {row['ratio']:.3f} | {row['source']} |")
    for row in result["published"]:
        if row.get("parts"):
            parts = ", ".join(f"{k.removesuffix('_bytes')} {v / GB:,.2f}" for k, v in row["parts"].items()
                              if v and k not in ("total_bytes",))
            pub.append("")
            pub.append(f"*{row['setup']}*, GB by part: {parts}.")
    meas = ["| spec | checkpointing | part | estimate MB | measured MB | estimate / measured |", "|---|---|---|---|---|---|"]
    for row in result["measured"]:
        m, e, r = row["measured"], row["estimate"], row["ratios"]
        label = f"{row['spec']} ({row['micro_batch_tokens']} tokens)"
        ck = "on" if row["activation_checkpointing"] else "off"
        meas += [
            f"| {label} | {ck} | weights | {_mb(e['weights_bytes'])} | {_mb(m['weights_bytes'])} | {r['weights']} |",
            f"| | | gradients | {_mb(e['gradients_bytes'])} | {_mb(m['gradients_bytes'])} | {r['gradients']} |",
            f"| | | optimizer | {_mb(e['optimizer_bytes'])} | {_mb(m['optimizer_bytes'])} | {r['optimizer']} |",
            f"| | | stored activations (layers) | {_mb(e['activations_layers_bytes'])} | "
            f"{_mb(m['activations_saved_bytes'])} | {r['activations_layers']} |",
            f"| | | logits (saved / estimate incl. gradient) | {_mb(e['activations_logits_bytes'])} | "
            f"{_mb(m['activations_logits_saved_bytes'])} | |",
            f"| | | RSS delta of the step (coarse) | | {_mb(m['rss_delta_bytes'])} | |",
        ]
    blocks = {"published": "\n".join(pub), "measured": "\n".join(meas)}
    if gpu:
        blocks["gpu"] = gpu_table(gpu)
    return blocks


def gpu_table(gpu: dict) -> str:
    """The H200 rows: measured bytes from the results file, the estimate from the current code."""
    from transformers import AutoConfig

    config_dir = EXTERNAL / "model-configs" / "qwen2.5_0.5b_instruct"
    config = AutoConfig.from_pretrained(str(config_dir))
    lines = [f"{gpu.get('gpu_device', 'GPU')}, {gpu['rows'][0]['config']} config with random weights, 4 x 512 tokens "
             "(estimates from the current code, measurements from the results file):", "",
             "| setup | checkpointing | weights / grads / optimizer MB, measured (estimate) | stored activations MB, "
             "measured (estimate) | max_memory_allocated MB | sftc estimate MB | estimate / measured |",
             "|---|---|---|---|---|---|---|"]
    for row in gpu["rows"]:
        e = estimate_for(config, gpu_spec(row["setup"], row["activation_checkpointing"]))["memory"]
        m = row["measured"]
        state = " / ".join(f"{_mb(m[k])} ({_mb(e[k])})" for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes"))
        lines.append(
            f"| {row['setup']} | {'on' if row['activation_checkpointing'] else 'off'} | {state} | "
            f"{_mb(m['activations_saved_bytes'])} ({_mb(e['activations_layers_bytes'])}) | "
            f"{_mb(m['cuda_max_allocated_bytes'])} | {_mb(e['total_bytes'])} | "
            f"{e['total_bytes'] / m['cuda_max_allocated_bytes']:.3f} |")
    return "\n".join(lines)


def rewrite_marked(path: Path, blocks: dict[str, str]) -> None:
    """Replace each `<!-- NAME:begin -->...<!-- NAME:end -->` block of `path`; the rest is untouched."""
    from sftc.io import atomic_write_text

    text = path.read_text(encoding="utf-8")
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: no <!-- {name}:begin --> ... <!-- {name}:end --> block to rewrite")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    atomic_write_text(path, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", action="store_true", help="rewrite the generated tables in docs/memory.md")
    parser.add_argument("--device", default="cpu", help="where the measured steps run (cpu, cuda)")
    parser.add_argument("--out", default="memory", help="results/<out>.json")
    parser.add_argument("--gpu-config", type=Path, help="also measure this config's full/lora/qlora on --device")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = {"published": published_rows(), "measured": measured_rows(args.device), "code": code_state()}
    if args.gpu_config:
        result["gpu"] = gpu_rows(args.gpu_config, args.device)
        result["gpu_device"] = torch.cuda.get_device_name()
    if args.gpu_config:  # argv as an artifact may hold it: relative, never this machine's path
        result["argv"] = [shown_path(Path(a)) if Path(a).exists() else a for a in sys.argv[1:]]
    path = write_result(args.out, result)
    print(json.dumps(result["published"], indent=1))
    print(docs_tables(result)["measured"])
    print(f"wrote {path.relative_to(REPO)}")
    if args.docs:
        gpu_file = RESULTS / "memory-h200.json"
        gpu = None
        if gpu_file.exists():
            data = json.loads(gpu_file.read_text())
            gpu = {"rows": data["gpu"], "gpu_device": data.get("gpu_device"), "code": data["code"]}
        rewrite_marked(DOCS, docs_tables(result, gpu))


if __name__ == "__main__":
    main()
