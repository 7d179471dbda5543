"""Everything measured on the held-out split at a checkpoint: eval loss and behaviour metrics.

The RNG is snapshotted and restored around it, so evaluating never shifts training: a run with
evaluation trains bit-identically to one without.
"""

from __future__ import annotations

from typing import Any

from sftc.runtime.bundle import Bundle


def evaluate_model(model, bundle: Bundle, tokenizer, pad_id: int) -> dict:
    """Held-out loss and behaviour metrics of `model`; the generated samples come back under
    the key '_samples' for the checkpoint to store."""
    from sftc.runtime.checkpoint import rng_restore, rng_snapshot
    from sftc.runtime.evaluate.generate import behaviour_metrics
    from sftc.runtime.evaluate.loss import eval_loss

    spec = bundle.spec
    state = rng_snapshot()
    was_training = model.training
    model.eval()
    metrics: dict[str, Any] = {}
    try:
        if bundle.eval is not None and bundle.eval.n_rows:
            metrics.update(eval_loss(model, bundle.eval, pad_id, spec.eval.batch_size))
        if bundle.rules is not None:
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
                template = bundle.lock.template
                stop = [template.terminator_id] if template is not None else None
                result = behaviour_metrics(
                    model, tokenizer, prompts, bundle.rules,
                    spec.eval.max_new_tokens, spec.eval.batch_size, eos_token_ids=stop,
                )
            finally:
                if config is not None:
                    config.use_cache = cache
            samples = result.pop("samples", None)
            if samples is not None:
                metrics["_samples"] = samples
            metrics.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None})
    finally:
        model.train(was_training)
        rng_restore(state)
    return metrics
