"""GPU training throughput: bf16, SDPA vs flash-attention varlen, and MFU. Needs CUDA.

Without a CUDA device it writes results/gpu.json with {"ran": false, "why": ...} and exits 0,
so `make bench` records that the GPU section did not run instead of failing.

On a GPU: the demo bundle's rows (or --bundle), a model built from --model (default
models/access-base; a bigger one, e.g. a Qwen2.5-0.5B directory, gives meaningful MFU), bf16,
batch of 8 rows, each setup fed by the real code path:
  sftc_varlen_sdpa    runtime.batching.collate(..., "varlen") with runtime.attention's varlen sdpa:
                      what `sftc run` does for sdpa (a Python loop of SDPA calls per layer; on a
                      GPU this measures what the launches cost against flash varlen)
  trl_padded_sdpa     TRL's padded collator (attention mask), sdpa: the baseline
  sftc_packed_sdpa    runtime.batching.collate_rows (stacked rows, reset position ids, no mask), sdpa
  sftc_packed_flash   the same batch with attn_implementation=flash_attention_2 (when installed):
                      transformers derives varlen boundaries from the position ids
  trl_flat_flash      TRL's padding-free collator (flattened row + cu_seq_lens), flash_attention_2
MFU = 6 * trainable params * tokens/s / peak bf16 FLOP/s (--peak-tflops, default 989 for
H100 SXM dense bf16; attention FLOPs ignored, so this understates MFU for long rows).

    .venv/bin/python benchmarks/bench_gpu.py [--model DIR] [--steps 20] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        result = {"ran": False, "why": "no CUDA device on this machine (torch.cuda.is_available() is False); "
                  "bf16, flash-attention/SDPA varlen and MFU were not measured", "machine": common.machine()}
        common.write_result("gpu", result)
        print(json.dumps(result, indent=2))
        return result

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer import add_fused_lm_head

    import bench_train
    from sftc.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle or common.demo_bundle())
    model_path = Path(args.model or bundle.model_path)
    tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer_path)
    pad_id = int(bundle.lock.tokenizer.pad_token_id)
    n = args.warmup + args.steps
    from sftc.runtime.attention import register

    trl = bench_train.trl_batches(bundle, tokenizer, Path(bundle.model_path), n, bundle.spec.seed)
    batches = {"sftc_packed": bench_train.sftc_batches(bundle, pad_id, n),
               "sftc_varlen": bench_train.sftc_batches(bundle, pad_id, n, "varlen"),
               "trl_padded": trl["trl_padded"], "trl_flat": trl["trl_flat"]}
    has_flash = importlib.util.find_spec("flash_attn") is not None
    setups = [("sftc_varlen_sdpa", "sftc_varlen", register()), ("trl_padded_sdpa", "trl_padded", "sdpa"),
              ("sftc_packed_sdpa", "sftc_packed", "sdpa")]
    if has_flash:
        setups += [("sftc_packed_flash", "sftc_packed", "flash_attention_2"), ("trl_flat_flash", "trl_flat", "flash_attention_2")]
    out = {}
    for name, data, attn in setups:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation=attn).cuda()
        model.config.use_cache = False
        add_fused_lm_head(model, outputs=("log_probs",))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tokens = 0
        for k in range(n):
            batch = {key: v.cuda() if torch.is_tensor(v) else v for key, v in batches[data][k].items()}
            if k == args.warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            o = model(**batch, use_cache=False, fused_lm_head=True)
            (-o.log_probs.sum() / o.label_mask.sum().clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= args.warmup:
                tokens += bench_train.real_tokens(batches[data][k], pad_id)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tps = tokens / seconds
        out[name] = {"tokens_per_s": round(tps, 1), "mfu": round(6 * params * tps / (args.peak_tflops * 1e12), 4),
                     "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = {"ran": True, "machine": common.machine(), "model": common.shown_path(model_path), "flash_attn_installed": has_flash,
              "setups": out}
    common.write_result("gpu", result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
