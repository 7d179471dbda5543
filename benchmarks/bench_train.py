"""CPU training throughput: sftc's packed rows vs TRL padded vs TRL padding-free, plus dense stream rows.

Same model (models/access-base, fp32, sdpa), same data (the demo bundle's train examples),
same optimizer, same loss (TRL's fused LM head, which SFTTrainer patches onto the model and
sftc's trainer inherits), same batch of 8, same number of steps, fixed torch threads.
Only the batches differ, and each is made by the real code path:

  sftc_varlen   runtime.batching.collate(..., "varlen") over 8 bundle rows: the rows flattened into
                one with no pad, run with runtime.attention's varlen sdpa (causal SDPA per example).
                What `sftc run` feeds for sdpa (runtime.batching.choose_layout): the default path,
                used for the ratios.
  sftc_segments runtime.batching.collate(..., "segments") over the same rows: each packed example its
                own right-padded row, no attention mask, plain sdpa (what `sftc run` feeds for eager).
  sftc_packed   runtime.batching.collate(..., "packed_rows") over the same rows (stacked, position
                ids reset per example, no attention mask), plain sdpa: transformers builds a dense
                block-diagonal mask. With flash-attention this is what `sftc run` feeds.
  sftc_varlen_eq  the same path with as many packed rows per micro-batch as hold about 8 examples
                (the padded baseline's batch): the same examples per step, so the same work per
                update; a small model on CPU runs faster per token on smaller micro-batches
  trl_padded    SFTTrainer(packing=False) prepares the same examples; its
                DataCollatorForLanguageModeling pads 8 examples with an attention mask.
  trl_flat      SFTTrainer(packing=True, bfd) (TRL's default packing: padding-free), its
                collator flattens 8 packed rows into one row with position ids.
  dense_stream  8 x seq_length rows cut from the bundle's token and label streams: no padding,
                no example boundaries, plain causal attention over the whole row. Not a ceiling
                (it was called one): attention over a full row costs more than per-example
                attention, so sftc's varlen path beats it by construction. A reference only.

Which batches: each setup's batches are drawn evenly across its whole epoch (batch k of n at
(k + 1/2) / n of the way through), not the first n: the longest examples sit at the start of a
bfd-packed stream, and three early TRL batches carried 1.60 padded positions per real token
against 1.48 over the whole epoch. The padded baseline's positions per real token is reported
over the measured batches and over the whole epoch, so the sample can be checked.

The TRL sides get the bundle's examples already tokenized (input_ids + labels) so that they
train on exactly the tokens sftc trains on; TRL's preparation still truncates, filters and
packs them with its own code.

One step = forward + backward + clip + AdamW step. The setups are interleaved and rotated
within each repeat (the machine is shared), warmup steps are dropped, and the median of the
repeats is reported, with the min and max of the repeats' tokens/s next to it. Throughput is real (non-pad) tokens per second and supervised (scored)
tokens per second.

    .venv/bin/python benchmarks/bench_train.py [--steps 5] [--warmup 1] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 8
SETUPS = ("sftc_varlen", "sftc_varlen_eq", "sftc_segments", "sftc_packed", "trl_padded", "trl_flat", "dense_stream")
# the layout `sftc run` chooses for sdpa (runtime.batching.choose_layout): the default path
DEFAULT = "sftc_varlen"


def spread(total: int, count: int) -> list[int]:
    """`count` indices evenly across range(total): a stratified draw over the whole epoch."""
    if total < count:
        raise SystemExit(f"the epoch has {total} batches, fewer than the {count} to measure: lower --steps")
    return [int((k + 0.5) * total / count) for k in range(count)]


def attention_for(setup: str) -> str:
    """sftc's default path runs the attention `sftc run` loads for sdpa; every other setup stock sdpa."""
    from sftc.runtime.attention import register

    return register() if setup.startswith("sftc_varlen") else "sdpa"


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    # SFTTrainer computes the loss through this patched head (chunked log-probs, no full logits);
    # sftc's BundleTrainer inherits it, so every setup uses it.
    add_fused_lm_head(model, outputs=("log_probs",))
    model.train()
    return model


def trl_batches(bundle, tokenizer, model_path: Path, n_batches: int, seed: int) -> dict[str, list[dict]]:
    """TRL's own preparation and collators over the bundle's examples (one per dataset row)."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tf = bundle.train
    ids, labels = [], []
    for r in range(tf.n_rows):
        for a, b in tf.examples(r):
            ids.append(a.astype(np.int64).tolist())
            labels.append(b.astype(np.int64).tolist())
    dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
    seq_length = int(bundle.lock.packing.seq_length)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, packing in (("trl_padded", False), ("trl_flat", True)):
            # a throwaway model: SFTTrainer patches the model it is given; only its data side is used
            scratch = AutoModelForCausalLM.from_pretrained(model_path)
            args = SFTConfig(output_dir=tmp, max_length=seq_length, packing=packing, packing_strategy="bfd",
                             per_device_train_batch_size=BATCH, report_to="none", use_cpu=True, bf16=False,
                             activation_checkpointing=False, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = SFTTrainer(model=scratch, args=args, train_dataset=dataset, processing_class=tokenizer)
            ds, collator = trainer.train_dataset, trainer.data_collator
            assert getattr(collator, "padding_free", False) == packing, (name, collator)
            # HF Trainer draws batches with a seeded RandomSampler; so do we, then measure batches
            # spread over that whole epoch
            order = np.random.default_rng(seed).permutation(len(ds)).tolist()
            picked = spread(len(order) // BATCH, n_batches)
            out[name] = [collator([ds[i] for i in order[k * BATCH:(k + 1) * BATCH]]) for k in picked]
            if not packing:
                # the padding of the whole epoch, to check the measured batches against
                positions = real = 0
                for k in range(len(order) // BATCH):
                    batch = collator([ds[i] for i in order[k * BATCH:(k + 1) * BATCH]])
                    positions += int(batch["input_ids"].numel())
                    real += int(batch["attention_mask"].sum())
                out["epoch_padded_positions_per_real_token"] = round(positions / real, 3)
            del trainer, scratch
    return out


def rows_for_equal_examples(bundle) -> int:
    """Packed rows per micro-batch that hold about BATCH examples, the padded baseline's batch."""
    tf = bundle.train
    per_row = sum(len(tf.row(r)[2]) for r in range(tf.n_rows)) / tf.n_rows
    return max(1, round(BATCH / per_row))


def sftc_batches(bundle, pad_id: int, n_batches: int, layout: str = "packed_rows", per_batch: int = BATCH) -> list[dict]:
    from sftc.runtime.batching import collate

    tf = bundle.train
    order = tf.epochs[0].tolist()  # the locked order, as `sftc run` draws it
    batches = []
    for k in spread(len(order) // per_batch, n_batches):
        rows = []
        for r in order[k * per_batch:(k + 1) * per_batch]:
            i, lab, lengths = tf.row(r)
            rows.append({"input_ids": i, "labels": lab, "seq_lengths": lengths})
        batches.append(collate(rows, pad_id, layout)[0])
    return batches


def dense_batches(bundle, n_batches: int) -> list[dict]:
    """Full rows of real tokens, no padding, no boundaries, plain causal attention (a reference,
    not a ceiling), cut at places spread over the whole stream.

    The bundle's own token and label streams cut into 8 x seq_length: the same share of scored
    positions as the packed rows, because TRL's fused LM head computes logits only at scored
    positions (scoring every position would add LM-head work that the others do not do)."""
    import torch

    seq_length = int(bundle.lock.packing.seq_length)
    flat = torch.from_numpy(bundle.train.input_ids.astype("int64"))
    flat_labels = torch.from_numpy(bundle.train.labels.astype("int64"))
    need = BATCH * seq_length
    batches = []
    for k in spread(len(flat) // need, n_batches):
        sl = slice(k * need, (k + 1) * need)
        batches.append({"input_ids": flat[sl].reshape(BATCH, seq_length).clone(),
                        "labels": flat_labels[sl].reshape(BATCH, seq_length).clone()})
    return batches


def real_tokens(batch: dict, pad_id: int) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch and batch["input_ids"].shape[0] > 1:
        # stacked packed rows: the pad tail is where a row's input ids are pad *and* labels ignored
        # (count from the row layout instead: positions up to each row's last non-pad token)
        ids = batch["input_ids"]
        nonpad = (ids != pad_id).int()
        last = ids.shape[1] - nonpad.flip(1).argmax(1)
        return int(last.sum())
    return int(batch["input_ids"].numel())


def examples_in(batch: dict, pad_id: int) -> int:
    if "position_ids" not in batch:
        return int(batch["input_ids"].shape[0]) if "attention_mask" in batch else 0  # dense: no examples
    starts = batch["position_ids"] == 0
    # a pad tail restarts the positions too: count only starts whose token is real
    return int((starts & (batch["input_ids"] != pad_id)).sum())


def measure(model, init_state, batches: list[dict], warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps after `warmup` unmeasured ones, from the same weights."""
    import torch

    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    times = []
    for k in range(warmup + steps):
        batch = batches[k % len(batches)]
        start = time.perf_counter()
        out = model(**batch, use_cache=False, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return times


def ratios(setups: dict) -> dict:
    out = {}
    tps = {k: v["tokens_per_s"] for k, v in setups.items()}
    if DEFAULT in tps:
        for key, other in (("train_speedup_vs_padded", "trl_padded"), ("train_vs_dense_stream", "dense_stream"),
                           ("train_speedup_vs_trl_flat", "trl_flat"), ("default_vs_segments", "sftc_segments"),
                           ("default_vs_packed_rows", "sftc_packed")):
            if other in tps:
                out[key] = round(tps[DEFAULT] / tps[other], 3)
        if "trl_padded" in setups:
            # What removing the pad alone could buy over the padded baseline at equal cost per
            # position: its processed positions / real tokens. A speedup above it has to come
            # from elsewhere (shorter attention, fewer steps' overhead).
            pad = setups["trl_padded"]
            out["padded_baseline_positions_per_real_token"] = round(pad["positions_per_step"] / pad["real_tokens_per_step"], 3)
            if "sftc_varlen_eq" in tps:
                out["train_speedup_vs_padded_equal_examples"] = round(tps["sftc_varlen_eq"] / tps["trl_padded"], 3)
            out["supervised_speedup_vs_padded"] = round(setups[DEFAULT]["supervised_tokens_per_s"]
                                                        / setups["trl_padded"]["supervised_tokens_per_s"], 3)
    return out


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="measured steps per setup per repeat")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundle", default=None, help="default: the demo bundle (specs/access-policy-full.yaml)")
    parser.add_argument("--orgaccess", action="store_true",
                        help="OrgAccess lengths: the bench_compile bundle (Qwen2.5 tokens, max_length 1024) on the same "
                             "tiny model, token ids folded into its vocabulary (throughput depends on lengths, not ids)")
    parser.add_argument("--pack-length", type=int, default=None,
                        help="the demo data packed at this seq_length instead of the spec's (a scratch compile)")
    parser.add_argument("--model", default=None, help="default: the bundle's model (models/access-base for the demo)")
    parser.add_argument("--scale-10m", action="store_true",
                        help="a ~10M-parameter model of the same shape family instead (common.SCALED_10M), "
                             "the size of the issue's lab figures")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--out", default=None, help="results/<out>.json (default train, or train_orgaccess)")
    args = parser.parse_args()
    setups_run = tuple(args.setups.split(","))

    import torch
    from transformers import AutoTokenizer

    from sftc.runtime.bundle import load_bundle

    threads = common.set_threads()
    if args.orgaccess:
        import bench_packing

        args.bundle = args.bundle or bench_packing.orgaccess_bundle()
        args.model = args.model or str(common.REPO / "models" / "access-base")
    if args.pack_length:
        args.bundle = args.bundle or common.demo_variant_bundle(args.pack_length)
        args.model = args.model or str(common.REPO / "models" / "access-base")
    bundle = load_bundle(args.bundle or common.demo_bundle())
    model_path = Path(args.model or bundle.model_path)
    if args.scale_10m:
        model_path = common.scaled_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer_path)
    pad_id = int(bundle.lock.tokenizer.pad_token_id)
    n = args.warmup + args.steps
    eq_rows = rows_for_equal_examples(bundle)
    batches = {"sftc_varlen": sftc_batches(bundle, pad_id, n, "varlen"),
               "sftc_varlen_eq": sftc_batches(bundle, pad_id, n, "varlen", per_batch=eq_rows),
               "sftc_segments": sftc_batches(bundle, pad_id, n, "segments"),
               "sftc_packed": sftc_batches(bundle, pad_id, n), "dense_stream": dense_batches(bundle, n)}
    epoch_padding = None
    if {"trl_padded", "trl_flat"} & set(setups_run):
        batches.update(trl_batches(bundle, tokenizer, model_path, n, seed=bundle.spec.seed))
        epoch_padding = batches.pop("epoch_padded_positions_per_real_token")
    batches = {k: v for k, v in batches.items() if k in setups_run}

    # what each step processes, from the measured batches themselves (warmup excluded)
    shape = {}
    for name, bs in batches.items():
        measured = [bs[k % len(bs)] for k in range(args.warmup, n)]
        shape[name] = {
            "positions_per_step": sum(int(b["input_ids"].numel()) for b in measured) / args.steps,
            "real_tokens_per_step": sum(real_tokens(b, pad_id) for b in measured) / args.steps,
            "supervised_tokens_per_step": sum(int((b["labels"][:, 1:] != -100).sum()) for b in measured) / args.steps,
            "batch_shape": list(measured[0]["input_ids"].shape),
            # examples: position-id restarts where there are position ids (a pad tail counts as
            # none only when it has no real token), else one per row
            "examples_per_step": sum(examples_in(b, pad_id) for b in measured) / args.steps,
        }

    model = load_model(model_path)
    vocab = int(model.config.vocab_size)
    folded = int(bundle.train.input_ids.max()) >= vocab or pad_id >= vocab
    if folded:
        # Only lengths and layout matter for throughput: map ids into the model's vocabulary
        # (after the token counts above were taken with the real pad id).
        for bs in batches.values():
            for b in bs:
                b["input_ids"] = b["input_ids"] % vocab
                b["labels"] = torch.where(b["labels"] == -100, b["labels"], b["labels"] % vocab)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    times: dict[str, list[list[float]]] = {s: [] for s in setups_run}
    load = [common.loadavg()]
    for rep in range(args.repeats):
        rotation = setups_run[rep % len(setups_run):] + setups_run[: rep % len(setups_run)]  # no setup always runs first
        for name in rotation:
            model.set_attn_implementation(attention_for(name))
            assert model.config._attn_implementation == attention_for(name)
            times[name].append(measure(model, init, batches[name], args.warmup, args.steps))
        load.append(common.loadavg())
        print(f"repeat {rep + 1}: " + ", ".join(f"{s} {sum(times[s][-1]):.2f}s" for s in setups_run), flush=True)

    setups = {}
    for name in setups_run:
        # median over repeats of each (fixed) batch's step time, then summed: a spike from another
        # job on the shared machine hits one step of one repeat, not the result
        secs = sum(common.median([rep[k] for rep in times[name]]) for k in range(args.steps))
        per_step = secs / args.steps
        setups[name] = {
            **shape[name],
            "seconds_per_step": round(per_step, 4),
            "tokens_per_s": round(shape[name]["real_tokens_per_step"] / per_step, 1),
            "supervised_tokens_per_s": round(shape[name]["supervised_tokens_per_step"] / per_step, 1),
            "positions_per_s": round(shape[name]["positions_per_step"] / per_step, 1),
            "repeat_seconds": [round(sum(t), 3) for t in times[name]],
            # the spread of whole repeats (the same batches each time): how much the load moved it
            "tokens_per_s_min_median_max": [round(shape[name]["real_tokens_per_step"] * args.steps / x, 1)
                                            for x in (max(map(sum, times[name])), common.median(list(map(sum, times[name]))),
                                                      min(map(sum, times[name])))],
        }
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "machine": common.machine(),
        "loadavg": load,
        "torch_threads": threads,
        "device": "cpu",
        "model": {"path": common.shown_path(model_path),
                  "parameters": n_params, "dtype": "float32",
                  "attn_implementation": {name: attention_for(name) for name in setups_run}},
        "bundle": bundle.bundle_id,
        "seq_length": int(bundle.lock.packing.seq_length),
        "batch_rows": BATCH,
        "equal_examples_rows": eq_rows,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "setups": setups,
        "token_ids_folded_mod": vocab if folded else None,
        **ratios(setups),
        "padded_positions_per_real_token_epoch": epoch_padding,
        "batches_drawn": "evenly across the whole epoch of each setup (benchmarks/bench_train.py spread)",
        "inputs": {"bundle": bundle.bundle_id, "model": str(model_path.name), "setups": list(setups_run)},
        "targets": {"train_speedup_vs_padded": ">= 1.6"},
    }
    common.write_result(args.out or ("train_orgaccess" if args.orgaccess else "train"), result)
    print(__import__("json").dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2))
    return result


if __name__ == "__main__":
    main()
