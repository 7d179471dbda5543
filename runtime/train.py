"""`sftc run BUNDLE`: train on exactly the bundle's tokens, and prove it.

verify -> load model (full / LoRA / QLoRA, as locked) -> contamination probe -> TRL SFTTrainer fed
the bundle's packed rows in the locked per-epoch order -> every update checked against the rows
and supervised tokens the bundle predicts -> checkpoints (resume bundles) with eval + selection ->
export of the best.

Every knob is set explicitly from the lock: TRL's SFTConfig defaults (bf16 on, gradient
checkpointing on, logging every 10 steps, NaN losses hidden from the log) are not what a locked
run means.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sftc.runtime import checkpoint as ckpt
from sftc.runtime.batching import LockedOrderSampler, RowCollator, choose_layout, collate_rows, plan_updates
from sftc.runtime.bundle import IGNORE, Bundle, TokenFile, load_bundle
from sftc.runtime.verify import verify_bundle
from sftc.errors import RunError
from sftc.io import atomic_write_json, atomic_write_text, read_json

HASHED_MICROBATCHES = 4


# --- the locked data order ------------------------------------------------------------------


def _row_hash(tf: TokenFile, rows: list[int]) -> str:
    """sha256 of the rows' tokens, concatenated in order: the same for every layout."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(np.ascontiguousarray(tf.row(r)[0], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _batch_hash(input_ids, n_real: list[int]) -> str:
    """sha256 of the real (unpadded) tokens of the batch rows, concatenated in order."""
    digest = hashlib.sha256()
    for i, n in enumerate(n_real):
        digest.update(input_ids[i, :n].cpu().numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


# --- model and tokenizer --------------------------------------------------------------------


def load_tokenizer(bundle: Bundle):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        bundle.tokenizer_path, trust_remote_code=bool(bundle.lock["model"].get("trust_remote_code"))
    )
    template = bundle.chat_template
    if template is not None:
        tok.chat_template = template
    return tok


def pad_token_id(bundle: Bundle, tokenizer) -> int:
    tok = bundle.lock["tokenizer"]
    for value in (tok.get("pad_token_id"), tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise RunError(f"{bundle.dir}: the tokenizer has neither a pad nor an eos token to pad rows with")


def load_model(bundle: Bundle):
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    spec = bundle.spec
    locked = bundle.lock["model"]
    dtype_name = locked.get("dtype") or spec.model.dtype
    attn = locked.get("attn_implementation") or spec.model.attn_implementation
    if choose_layout(attn) == "varlen":  # sdpa, plus its varlen path for the flattened micro-batch
        from sftc.runtime.attention import register

        attn = register()
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype_name),
        "attn_implementation": attn,
        "trust_remote_code": bool(locked.get("trust_remote_code", spec.model.trust_remote_code)),
    }
    if locked.get("revision"):
        kwargs["revision"] = locked["revision"]
    param = spec.parameterization
    if param.kind == "qlora":
        from transformers import BitsAndBytesConfig

        q = param.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(bundle.model_path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise RunError(f"cannot load model {bundle.model_path} as locked ({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'quantization_config')}): {exc}") from None
    # Training never uses the KV cache, and a cache left on makes packed examples read each other.
    model.config.use_cache = False
    if param.kind in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if param.kind == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        set_seed(spec.seed)  # the adapters' initial weights are random
        config = LoraConfig(
            r=param.rank,
            lora_alpha=param.alpha,
            lora_dropout=param.dropout,
            target_modules=param.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model


# --- the trainer ----------------------------------------------------------------------------


def restore_adapter_dtype(model, spec) -> None:
    """SFTTrainer casts LoRA weights of a 4-bit model to bfloat16 (the QLoRA paper's bf16 compute).
    The spec's compute dtype is the locked choice: with float32 compute, bf16 adapters round away
    updates smaller than 1/256 of a weight, so they are cast back before the optimizer is built."""
    import torch

    if spec.parameterization.kind != "qlora":
        return
    dtype = getattr(torch, spec.parameterization.quantization.compute_dtype)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunState:
    """What the run tracks beside HF's TrainerState: consumption checks, metrics, checkpoints."""

    def __init__(self, bundle: Bundle, run_dir: Path, plan: list[dict] | None, pad_id: int, tokenizer,
                 supervised_total: int, stop_after_steps: int | None, dist=None):
        from sftc.runtime.distributed import Dist

        self.dist = dist if dist is not None else Dist()
        self.trainer = None
        self.bundle = bundle
        self.run_dir = run_dir
        self.plan = plan
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.supervised_total = supervised_total
        self.stop_after_steps = stop_after_steps
        self.mb_in_update = 0
        self.update_supervised = 0
        self.update_tokens = 0
        self.update_started = None
        self.last_update: dict | None = None
        self.hashed: list[dict] = []
        self.metrics_path = run_dir / "metrics.jsonl"
        self.candidates = [
            {k: v for k, v in line.items() if k != "kind"} for line in read_metrics(self.metrics_path) if line["kind"] == "eval"
        ]
        self.best_step: int | None = None
        self.selection: dict = {}
        self.last_checkpoint: Path | None = None

    # called for every training micro-batch, before the forward
    def observe(self, step: int, inputs: dict) -> None:
        rows = inputs.pop("sftc_rows").tolist()
        lengths = inputs.pop("sftc_lengths").tolist()
        labels = inputs["labels"]
        supervised = int((labels[:, 1:] != IGNORE).sum())
        if self.plan is not None:
            if step >= len(self.plan):
                raise RunError(f"the trainer ran past the bundle's {len(self.plan)} updates (at update {step + 1})")
            expected = self.plan[step]["microbatches"]
            if self.mb_in_update >= len(expected) or expected[self.mb_in_update] != rows:
                want = expected[self.mb_in_update] if self.mb_in_update < len(expected) else "no micro-batch"
                raise RunError(
                    f"data order diverged from the bundle's locked order at update {step + 1}, "
                    f"micro-batch {self.mb_in_update + 1}: got rows {rows}, the bundle says {want}"
                )
            if len(self.hashed) < HASHED_MICROBATCHES:
                got = _batch_hash(inputs["input_ids"], lengths)
                want_hash = _row_hash(self.bundle.train, rows)
                if got != want_hash:
                    raise RunError(f"update {step + 1}: the input_ids fed to the model are not the bundle's rows {rows}")
                self.hashed.append({"update": step + 1, "microbatch": self.mb_in_update + 1, "rows": rows, "sha256": got})
        self.mb_in_update += 1
        self.update_supervised += supervised
        self.update_tokens += int(sum(lengths))

    def begin_update(self) -> None:
        self.update_started = time.perf_counter()

    def end_update(self, step: int) -> None:
        """Called after optimizer step `step` (1-based)."""
        if self.plan is not None:
            want_mb = len(self.plan[step - 1]["microbatches"])
            if self.mb_in_update != want_mb:
                raise RunError(f"update {step} used {self.mb_in_update} micro-batches, the bundle plans {want_mb}")
            want_sup = int(sum(self.bundle.train.row_supervised[r] for mb in self.plan[step - 1]["microbatches"] for r in mb))
            if want_sup != self.update_supervised:
                where = f" on rank {self.dist.rank} of {self.dist.world_size}" if self.dist.active else ""
                raise RunError(
                    f"update {step} scored {self.update_supervised} supervised tokens{where}, the bundle predicts {want_sup}"
                )
        if self.dist.active:
            # each rank checked its own slice above; the update's totals are the sum over ranks
            from sftc.runtime.distributed import all_sum

            self.update_supervised, self.update_tokens = all_sum(self.dist, [self.update_supervised, self.update_tokens])
        elapsed = time.perf_counter() - (self.update_started or time.perf_counter())
        self.supervised_total += self.update_supervised
        self.last_update = {
            "supervised_tokens": self.update_supervised,
            "supervised_tokens_total": self.supervised_total,
            "tokens": self.update_tokens,
            "tokens_per_s": self.update_tokens / elapsed if elapsed > 0 else None,
        }
        self.mb_in_update = self.update_supervised = self.update_tokens = 0

    def append_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return  # one writer: rank 0
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl lines; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            line = json.loads(raw)
            if isinstance(line, dict) and "kind" in line and "step" in line:
                lines.append(line)
    return lines


def truncate_metrics(path: Path, step: int) -> None:
    """Drop what a killed run logged after the checkpoint it resumes from: those steps run again."""
    kept = [line for line in read_metrics(path) if line["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))


def _make_trainer_class():
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class BundleTrainer(SFTTrainer):
        def __init__(self, *args, run: RunState, sampler: LockedOrderSampler, **kwargs):
            self.run = run
            self.locked_sampler = sampler
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            return self.locked_sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "sftc_rows" in inputs:
                self.run.observe(self.state.global_step, inputs)
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            value = loss[0] if isinstance(loss, tuple) else loss
            if model.training and not torch.isfinite(value.detach()).all():
                last = self.run.last_checkpoint
                raise RunError(
                    f"non-finite loss ({float(value.detach())}) at update {self.state.global_step + 1}; "
                    "stopped before the optimizer step, so no weight saw it. "
                    + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet.")
                    + " Lower optimizer.lr, keep optimizer.max_grad_norm set, or check the data of this update."
                )
            return loss

        def _save_checkpoint(self, model, trial):
            save_checkpoint(self, model)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.run.dist.fsdp:
                return  # loaded into the unsharded model before fully_shard (runtime/distributed.py)
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or not self.run.dist.fsdp:
                return super()._load_optimizer_and_scheduler(checkpoint)
            from sftc.runtime.distributed import load_full_optimizer_state

            state = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
            load_full_optimizer_state(self.model, getattr(self.optimizer, "optimizer", self.optimizer), state)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    class RunCallback(TrainerCallback):
        def __init__(self, run: RunState):
            self.run = run

        def on_train_begin(self, args, state, control, **kwargs):
            # prove the engine on the model the trainer actually steps (after accelerate's prepare)
            d = self.run.dist
            if self.run.bundle.spec.distributed.activation_checkpointing:
                inner = self.run.trainer.model
                on = bool(getattr(inner, "is_activation_checkpointing", False))
                if not on:
                    raise RunError("distributed.activation_checkpointing is set but the model does not recompute "
                                   "its layers (is_activation_checkpointing is False)")
                d.checks["activation_checkpointing"] = on
            if not d.active:
                return
            from sftc.runtime.distributed import verify_replicated, verify_sharding

            stepped = self.run.trainer.model_wrapped
            if d.fsdp:
                verify_sharding(stepped, d, "model the trainer steps")
            else:
                verify_replicated(stepped, d)

        def on_step_begin(self, args, state, control, **kwargs):
            self.run.begin_update()

        def on_step_end(self, args, state, control, **kwargs):
            self.run.end_update(state.global_step)
            if self.run.stop_after_steps is not None and state.global_step >= self.run.stop_after_steps:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or "train_loss" in logs or self.run.last_update is None:
                return
            record = {
                "kind": "train",
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                **self.run.last_update,
            }
            self.run.append_metrics(record)
            self.run.last_update = None

    return BundleTrainer, RunCallback


def save_checkpoint(trainer, model) -> Path:
    """HF's own state files into a staging dir, then eval, selection, sampler state, manifest, rename."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState

    run: RunState = trainer.run
    bundle = run.bundle
    spec = bundle.spec
    step = trainer.state.global_step
    root = run.run_dir / "checkpoints"
    if trainer.hp_search_backend is None:
        trainer.store_flos()  # a collective with several ranks: every rank gets here
    if run.dist.active:
        return _save_checkpoint_ranks(trainer, root, step)

    def fill(staging: Path) -> dict:
        out = str(staging)
        trainer.save_model(out, _internal_call=True)
        trainer._save_optimizer_and_scheduler(out)
        trainer._save_scaler(out)
        trainer._save_rng_state(out)
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
            trainer.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
        trainer.state.save_to_json(os.path.join(out, TRAINER_STATE_NAME))
        if run.plan is not None and step < len(run.plan):
            nxt = run.plan[step]
            sampler = {"epoch": nxt["epoch"], "next_update_in_epoch": nxt["update_in_epoch"],
                       "rows_consumed_in_epoch": nxt["update_in_epoch"] * trainer.args.gradient_accumulation_steps
                       * trainer.args.per_device_train_batch_size}
        else:
            sampler = {"epoch": None, "finished": True}
        (staging / ckpt.SAMPLER_STATE).write_text(json.dumps({**sampler, "global_step": step}, indent=2) + "\n")

        metrics = evaluate_checkpoint(trainer, model, staging)
        return record_evaluation(run, trainer, step, metrics, sampler)

    path = ckpt.write_checkpoint(root, step, fill)
    run.last_checkpoint = path
    ckpt.write_best(run.run_dir, run.selection)
    # keep the fallback too: with nothing eligible it is what a forced export would use
    keep = run.best_step if run.best_step is not None else (run.selection or {}).get("fallback_step")
    deleted = ckpt.rotate(root, spec.checkpoint.keep_last, keep)
    if deleted:
        run.append_metrics({"kind": "rotate", "step": step, "deleted": deleted, "best_step": run.best_step})
    return path


def _sampler_state(run: RunState, trainer, step: int) -> dict:
    if run.plan is not None and step < len(run.plan):
        nxt = run.plan[step]
        return {"epoch": nxt["epoch"], "next_update_in_epoch": nxt["update_in_epoch"],
                "rows_consumed_in_epoch": nxt["update_in_epoch"] * trainer.args.gradient_accumulation_steps
                * trainer.args.per_device_train_batch_size * run.dist.world_size}
    return {"epoch": None, "finished": True}


def _rng_state() -> dict:
    """This process's RNG, in HF Trainer's rng_state file layout."""
    import random

    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def _save_checkpoint_ranks(trainer, root: Path, step: int) -> Path:
    """A checkpoint of a multi-process run, in the single-process layout (full weights, full
    optimizer state keyed by parameter index) plus one rng_state_<rank>.pth per rank.

    Every rank joins the gathers (the FSDP2 state dicts, the RNG states) and, under fsdp, the
    evaluation (each forward all-gathers the layers); then rank 0 alone stages, writes the
    manifest and renames, as in one process. An error on rank 0 is raised on every rank.
    """
    import torch
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState

    from sftc.runtime import distributed as dist_

    run: RunState = trainer.run
    d = run.dist
    bundle = run.bundle
    spec = bundle.spec
    inner = trainer.model  # unwrapped: the FSDP2 root, or the module inside DDP
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    model_state = optim_state = None
    if d.fsdp:
        model_state = dist_.full_model_state(inner)
        optim_state = dist_.full_optimizer_state(inner, optimizer)
    rng = dist_.gather_objects(d, _rng_state())
    metrics: dict = {}
    if d.fsdp or d.is_main:  # DDP: rank 0 alone evaluates its (identical) replica
        metrics = evaluate_checkpoint(trainer, inner, None)
    samples = metrics.pop("_samples", None)
    path, error = None, None
    if d.is_main:
        def fill(staging: Path) -> dict:
            out = str(staging)
            if d.fsdp:
                trainer._save(out, state_dict=model_state)
                torch.save(optim_state, staging / "optimizer.pt")
                torch.save(trainer.lr_scheduler.state_dict(), staging / "scheduler.pt")
            else:
                trainer.save_model(out, _internal_call=True)
                trainer._save_optimizer_and_scheduler(out)
            trainer._save_scaler(out)
            for rank, state in enumerate(rng):
                torch.save(state, staging / f"rng_state_{rank}.pth")
            for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
                trainer.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            trainer.state.save_to_json(os.path.join(out, TRAINER_STATE_NAME))
            sampler = _sampler_state(run, trainer, step)
            (staging / ckpt.SAMPLER_STATE).write_text(json.dumps({**sampler, "global_step": step}, indent=2) + "\n")
            if samples is not None:
                (staging / "eval_samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
            return record_evaluation(
                run, trainer, step, metrics, sampler,
                distributed={"world_size": d.world_size, "strategy": d.strategy, "state": "full",
                             "rng_files": [f"rng_state_{r}.pth" for r in range(d.world_size)]},
            )

        try:
            path = ckpt.write_checkpoint(root, step, fill)
            ckpt.write_best(run.run_dir, run.selection)
            keep = run.best_step if run.best_step is not None else (run.selection or {}).get("fallback_step")
            deleted = ckpt.rotate(root, spec.checkpoint.keep_last, keep)
            if deleted:
                run.append_metrics({"kind": "rotate", "step": step, "deleted": deleted, "best_step": run.best_step})
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    dist_.first_error(d, error)
    path = dist_.broadcast_object(d, str(path) if path is not None else None)
    run.last_checkpoint = Path(path)
    return run.last_checkpoint


def record_evaluation(run, trainer, step: int, metrics: dict, sampler: dict, **extra) -> dict:
    """Log a checkpoint's eval, re-select the best, and return its checkpoint.json content."""
    run.append_metrics({"kind": "eval", "step": step, **metrics})
    run.candidates = [c for c in run.candidates if c["step"] != step] + [{"step": step, **metrics}]
    run.selection = select(run.candidates, run.bundle.spec)
    run.best_step = run.selection.get("best_step")
    return {
        **ckpt.identity(run.bundle.lock),
        "global_step": step,
        "epoch": trainer.state.epoch,
        "supervised_tokens_total": run.supervised_total,
        "metrics": metrics,
        "best_metric": best_metric(run.candidates, run.best_step, run.bundle.spec),
        "sampler": sampler,
        **extra,
        "written_at": _now(),
    }


def evaluate_checkpoint(trainer, model, staging: Path | None) -> dict:
    """Held-out loss and behaviour metrics; RNG restored afterwards so eval never shifts training.
    With no staging dir the generated samples come back under the key '_samples'."""
    run: RunState = trainer.run
    bundle = run.bundle
    spec = bundle.spec
    state = ckpt.rng_snapshot()
    was_training = model.training
    model.eval()
    metrics: dict[str, Any] = {}
    try:
        if bundle.eval is not None and bundle.eval.n_rows:
            from sftc.runtime.evaluate.loss import eval_loss

            metrics.update(eval_loss(model, bundle.eval, run.pad_id, spec.eval.batch_size))
        if bundle.rules_path is not None:
            from sftc.runtime.evaluate import behaviour_metrics, load_rules

            prompts = bundle.eval_prompts()
            if spec.eval.max_prompts:
                prompts = prompts[: spec.eval.max_prompts]
            config = getattr(model, "config", None)
            cache = getattr(config, "use_cache", None)
            if config is not None:
                config.use_cache = True  # generation only; training stays cache-free
            try:
                # the template's terminator must stop generation even when the base model's
                # generation_config only knows its pretraining eos
                template = bundle.lock.get("template") or {}
                stop = [template["terminator_id"]] if template.get("terminator_id") is not None else None
                result = behaviour_metrics(
                    model, run.tokenizer, prompts, load_rules(bundle.rules_path),
                    spec.eval.max_new_tokens, spec.eval.batch_size, eos_token_ids=stop,
                )
            finally:
                if config is not None:
                    config.use_cache = cache
            samples = result.pop("samples", None)
            if samples is not None and staging is None:
                metrics["_samples"] = samples
            elif samples is not None:
                (staging / "eval_samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
            metrics.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None})
    finally:
        model.train(was_training)
        ckpt.rng_restore(state)
    return metrics


def select(candidates: list[dict], spec) -> dict:
    from sftc.runtime.select import select_best

    return select_best(candidates, spec.select.model_dump(mode="json"))


def best_metric(candidates: list[dict], best_step: int | None, spec) -> dict | None:
    if best_step is None:
        return None
    best = next((c for c in candidates if c["step"] == best_step), None)
    if best is None:
        return None
    name = spec.select.maximize or next(
        (o.minimize or o.maximize for o in spec.select.tie_break), "eval_loss"
    )
    return {"step": best_step, "name": name, "value": best.get(name)}


# --- entry point ----------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunError(
                f"{run_dir}: another `sftc run` is training in this run directory ({holder}); "
                "wait for it to finish, or give this run another run directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {_now()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _start_over(run_dir: Path) -> None:
    for name in ("checkpoints", "export"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "best.json", "run.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


def training_args(bundle: Bundle, run_dir: Path, layout: dict, model, dist=None):
    import torch
    from trl import SFTConfig

    spec = bundle.spec
    opt, sched = spec.optimizer, spec.schedule
    cuda = torch.cuda.is_available()
    max_steps = int(bundle.lock["budget"]["optimizer_steps"])
    model_dtype = bundle.lock["model"].get("dtype") or spec.model.dtype
    autocast = spec.distributed.mixed_precision if not (dist is not None and dist.fsdp) else "no"
    if autocast == "fp16" and not cuda:
        raise RunError("distributed.mixed_precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if model_dtype == "float16" and not cuda:
        raise RunError("model.dtype float16 needs a CUDA device (fp16 mixed precision); use float32 or bfloat16 on CPU")
    extra: dict[str, Any] = {}
    if dist is not None and dist.active:
        extra = {
            "ddp_backend": "nccl" if dist.device.startswith("cuda") else "gloo",
            # accelerate deals each rank every world_size-th micro-batch of the locked sampler
            # (BatchSamplerShard), the slicing docs/bundle-format.md fixes; the consumption check
            # compares every micro-batch with it. No dispatching, no splitting of batches.
            "accelerator_config": {"split_batches": False, "dispatch_batches": False, "even_batches": True},
        }
    return SFTConfig(
        **extra,
        # the loss of an update is the sum over every rank's supervised tokens / their global count
        average_tokens_across_devices=True,
        output_dir=str(run_dir / "checkpoints"),
        seed=spec.seed,
        data_seed=spec.seed,
        max_steps=max_steps,
        per_device_train_batch_size=layout["per_device"],
        gradient_accumulation_steps=layout["grad_accum"],
        optim="adamw_torch",
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        max_grad_norm=opt.max_grad_norm if opt.max_grad_norm is not None else 0.0,
        lr_scheduler_type=sched.kind,
        # the lock's integer step count when it has one (a float < 1 would be read as a ratio)
        warmup_steps=int(bundle.lock["budget"].get("warmup_steps", math.ceil(sched.warmup_ratio * max_steps))),
        # distributed.mixed_precision: FSDP2's MixedPrecisionPolicy when sharded, else autocast
        bf16=model_dtype == "bfloat16" or (autocast == "bf16"),
        fp16=model_dtype == "float16" or (autocast == "fp16"),
        activation_checkpointing=False,
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # HF would log a NaN loss as the running mean; we stop instead
        save_strategy="steps",
        save_steps=spec.checkpoint.every_steps,
        save_total_limit=None,  # rotation is ours: it must never delete the selected best
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        padding_free=False,
        disable_tqdm=not sys.stderr.isatty(),
        ddp_find_unused_parameters=False,
    )


def run_bundle(bundle_dir, run_dir=None, fresh: bool = False, allow_drift: bool = False,
               stop_after_steps: int | None = None) -> Path:
    """Train on the bundle; resume from the newest valid checkpoint unless fresh. Returns the run dir."""
    from sftc.runtime import distributed as dist_

    bundle = load_bundle(bundle_dir)
    report = verify_bundle(bundle, allow_drift=allow_drift)
    run_dir = Path(run_dir) if run_dir is not None else bundle.project_root / "runs" / bundle.bundle_id
    d = dist_.setup(bundle.spec, report["layout"])
    clean = False
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if d.is_main:  # one holder of the run lock, one writer of the run directory
                try:
                    stack.enter_context(run_lock(run_dir))
                    if fresh:
                        _start_over(run_dir)
                except RunError as exc:
                    error = exc
            dist_.first_error(d, error)
            out = _run_locked(bundle, run_dir, report, stop_after_steps, d)
        clean = True
        return out
    finally:
        dist_.shutdown(d, clean)


def _run_locked(bundle: Bundle, run_dir: Path, report: dict, stop_after_steps: int | None, dist=None) -> Path:
    import transformers
    from transformers import PrinterCallback, set_seed

    from sftc.runtime import distributed as dist_
    from sftc.runtime.probe import run_probe

    spec = bundle.spec
    layout = report["layout"]
    d = dist if dist is not None else dist_.Dist()
    found = None
    if d.is_main:
        found = ckpt.find_resume(run_dir / "checkpoints", bundle.lock)
        resume, manifest, _ = found
        if resume is not None:
            truncate_metrics(run_dir / "metrics.jsonl", int(manifest["global_step"]))
        elif (run_dir / "metrics.jsonl").exists():
            # nothing valid to resume: whatever was logged belongs to a run that left no checkpoint
            truncate_metrics(run_dir / "metrics.jsonl", 0)
    # every rank resumes from the checkpoint rank 0 found (the run directory is shared)
    resume, manifest, skipped = dist_.broadcast_object(d, found)
    start_step = int(manifest["global_step"]) if manifest else 0

    set_seed(spec.seed)
    tokenizer = load_tokenizer(bundle)
    pad_id = pad_token_id(bundle, tokenizer)
    model = load_model(bundle)
    execution_layout = choose_layout(bundle.lock["model"]["attn_implementation"])
    probe = run_probe(model, bundle, pad_id, layout=execution_layout)
    if d.rank == 0:
        print(f"sftc: layout {execution_layout} for {bundle.lock['model']['attn_implementation']}; contamination probe "
              f"max |packed - alone| = {probe['max_abs_diff']:.2e} (tolerance {probe['tolerance']:.0e})", file=sys.stderr)
    if d.fsdp:
        if resume is not None:  # full weights into the unsharded model, then shard
            dist_.load_full_weights(model, resume)
        model = dist_.shard_fsdp(model, d)
        dist_.verify_sharding(model, d, "after fully_shard")
    elif spec.distributed.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    max_steps = int(bundle.lock["budget"]["optimizer_steps"])
    # this rank's micro-batches (checked one by one), and the whole stream (for the global totals)
    plan = plan_updates(bundle.train.epochs, layout["per_device"], layout["grad_accum"], max_steps,
                        world_size=d.world_size, rank=d.rank)
    stream = plan if not d.active else plan_updates(
        bundle.train.epochs, layout["per_device"], layout["grad_accum"] * d.world_size, max_steps)
    predicted = int(sum(bundle.train.row_supervised[r] for u in stream for mb in u["microbatches"] for r in mb))

    dataset = bundle.train_dataset()
    run = RunState(bundle, run_dir, plan, pad_id, tokenizer,
                   supervised_total=int(manifest.get("supervised_tokens_total", 0)) if manifest else 0,
                   stop_after_steps=stop_after_steps, dist=d)
    run.last_checkpoint = resume
    BundleTrainer, RunCallback = _make_trainer_class()
    args = training_args(bundle, run_dir, layout, model, dist=d)
    trainer = BundleTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=RowCollator(pad_id, execution_layout),
        callbacks=[RunCallback(run)],
        run=run,
        sampler=LockedOrderSampler(bundle.train.epochs),
    )
    run.trainer = trainer
    if d.fsdp:
        _keep_fsdp_unwrapped(trainer, model)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    restore_adapter_dtype(model, bundle.spec)
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at every save

    record = {
        "bundle_id": bundle.bundle_id,
        "bundle_dir": str(bundle.dir.resolve()),
        "world_size": layout["world_size"],
        "layout": layout,
        "distributed": d.record(),
        "drift_allowed": report["library_drift"]["drift_allowed"],
        "library_drift": report["library_drift"],
        "probe": probe,
        "execution_layout": execution_layout,
        "resumed_from": str(resume) if resume else None,
        "resumed_step": start_step,
        "skipped_checkpoints": skipped,
        "optimizer_steps": max_steps,
        "supervised_tokens_predicted": predicted,
        "supervised_tokens_locked": bundle.lock["budget"].get("supervised_tokens"),
        "versions": {"transformers": transformers.__version__},
        "started_at": _now(),
        "status": "running",
    }
    sessions = []
    if (run_dir / "run.json").exists() and resume is not None:
        with contextlib.suppress(Exception):
            previous = read_json(run_dir / "run.json")
            sessions = previous.get("sessions", [])
    record["sessions"] = sessions + [{"started_at": record["started_at"], "resumed_step": start_step}]
    _write_run_record(d, run_dir, record)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except RunError as exc:
            record.update(status="failed", error=str(exc), finished_at=_now())
            _write_run_record(d, run_dir, record)
            raise

    step = trainer.state.global_step
    record.update(
        consumption={
            "first_microbatches": run.hashed,
            "supervised_tokens_total": run.supervised_total,
            "checked_against_plan": plan is not None,
        },
        finished_at=_now(),
        final_step=step,
        distributed=d.record(),
    )
    if step < max_steps:
        record["status"] = "stopped"
        _write_run_record(d, run_dir, record)
        return run_dir
    if predicted is not None and run.supervised_total != predicted:
        record.update(status="failed", error="supervised token total differs from the bundle's prediction")
        _write_run_record(d, run_dir, record)
        raise RunError(
            f"the run scored {run.supervised_total} supervised tokens over {step} updates; "
            f"the bundle's rows and order predict {predicted}"
        )
    record["status"] = "finished"
    _write_run_record(d, run_dir, record)
    if d.is_main:
        _export(run_dir, record)
    return run_dir


def _write_run_record(d, run_dir: Path, record: dict) -> None:
    if d.is_main:
        atomic_write_json(run_dir / "run.json", record)


def _keep_fsdp_unwrapped(trainer, model) -> None:
    """accelerate's prepare would wrap the FSDP2 model in DDP on CPU (and refuses DTensor
    parameters there); prepare it the way transformers prepares a model it sharded itself: autocast
    only, no wrapper, no device move. verify_sharding proves the result at train begin."""
    original = trainer.accelerator.prepare_model

    def prepare_model(m, device_placement=None, evaluation_mode=False):
        if m is model:
            return original(m, device_placement=False, evaluation_mode=True)
        return original(m, device_placement=device_placement, evaluation_mode=evaluation_mode)

    trainer.accelerator.prepare_model = prepare_model



def bundle_select(run_dir: Path) -> dict:
    record = read_json(run_dir / "run.json")
    return read_json(Path(record["bundle_dir"]) / "bundle.lock.json")["spec"]["select"]


def _export(run_dir: Path, record: dict) -> None:
    """Export the selected checkpoint. A run where no checkpoint met the constraints finished
    training but exports nothing (unless the spec says export_if_none_eligible): say so, and
    record it, instead of failing a finished run."""
    from sftc.runtime.export import export_run

    best = read_json(run_dir / "best.json") if (run_dir / "best.json").is_file() else {}
    if best.get("best_step") is None and not bundle_select(run_dir).get("export_if_none_eligible"):
        record["export"] = {"exported": False, "why": best.get("why", "no checkpoint was evaluated")}
        atomic_write_json(run_dir / "run.json", record)
        print(f"sftc: no checkpoint met the selection constraints; nothing exported ({record['export']['why']})",
              file=sys.stderr)
        return
    path = export_run(run_dir, allow_ineligible=best.get("best_step") is None)
    record["export"] = {"exported": True, "path": str(path)}
    atomic_write_json(run_dir / "run.json", record)
