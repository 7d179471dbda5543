"""The demo's comparison (demo/comparison.py): the 4-bit base's held-out loss, training memory
measured beside the lock's estimate, and reports whose metric file holds no timings."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")


def _qlora_bundle(project):
    from sftc.runtime.bundle import load_bundle

    bundle_dir = project.compile(parameterization={"kind": "qlora", "rank": 4, "dropout": 0.0})
    return load_bundle(bundle_dir)


def test_quantized_base_loss_is_the_token_weighted_held_out_loss(project):
    import torch
    from transformers import AutoModelForCausalLM

    from demo.comparison import quantized_base_loss

    bundle = _qlora_bundle(project)
    tokens = bundle.eval
    result = quantized_base_loss(project.root / "model", tokens, bundle.spec.parameterization.quantization)
    # the same loss by hand: -log p(label) at every supervised position but an example's first
    model = AutoModelForCausalLM.from_pretrained(str(project.root / "model"), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(tokens.n_rows):
            for ids, labels in tokens.examples(r):
                logp = model(input_ids=torch.tensor(ids[None])).logits[0].log_softmax(-1)
                for pos in range(1, len(ids)):
                    if labels[pos] != -100:
                        total -= float(logp[pos - 1, int(labels[pos])])
                        count += 1
    assert result["eval_tokens"] == count > 0
    assert result["base_eval_loss"] == pytest.approx(total / count, abs=1e-4)
    assert result["quantized_base_eval_loss"] != result["base_eval_loss"]  # 4-bit storage moved the logits
    assert result["quantization_loss_increase"] == pytest.approx(
        result["quantized_base_eval_loss"] - result["base_eval_loss"], abs=2e-4)


def test_measured_training_memory_matches_the_lock_estimate(project, tmp_path):
    from demo.comparison import training_memory

    bundle = _qlora_bundle(project)
    measured = training_memory(bundle.spec, project.root / "model", tmp_path)
    parts = bundle.lock.memory.parts
    for part in ("gradients_bytes", "optimizer_bytes"):
        assert measured[part] == parts[part], part
    # the estimate spreads the nested float32 constants per 256 blocks; bitsandbytes rounds up per tensor
    assert measured["weights_bytes"] == pytest.approx(parts["weights_bytes"], rel=1e-3)
    assert measured["weights_bytes"] < parts["weights_unquantized_bytes"] * 2  # 4-bit linears, not float32
    assert measured["activations_bytes"] > 0
    assert measured["optimizer_bytes_in_checkpoint"] is None  # no run, no checkpoint


def _result(memory_total: int) -> dict:
    run = {"run": "access-policy-qlora", "parameterization": "qlora", "trainable_parameters": 10, "total_parameters": 20,
           "best_step": None, "eligible": False, "reported_step": 9, "format_pass_rate": 0.5, "policy_pass_rate": 0.25,
           "eval_loss": 1.5, "memory_estimate": {"total_bytes": 2 * memory_total},
           "memory_measured": {"total_bytes": memory_total}, "tokens": 100, "supervised_tokens": 50, "bundle_id": "x"}
    return {"base_model": {"format_pass_rate": 0.0, "policy_pass_rate": 0.0}, "runs": [run], "eval_prompts": 4,
            "quantized_base": {"quant_type": "nf4", "double_quant": True, "base_eval_loss": 1.0,
                               "quantized_base_eval_loss": 1.25, "quantization_loss_increase": 0.25, "eval_tokens": 30}}


def test_reports_keep_timings_out_of_the_metric_and_rewrite_the_readme_block(tmp_path):
    from demo.comparison import write_comparison

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- comparison:begin -->\nold table\n<!-- comparison:end -->\noutro\n", encoding="utf-8")
    timings = {"access-policy-qlora": {"wall_s": 12.5, "peak_rss_mb": 1100.0}}
    write_comparison(_result(3 * 2**20), timings, reports=tmp_path, readme=readme)
    metric = (tmp_path / "comparison.json").read_text()
    assert "wall_s" not in metric and "peak_rss" not in metric
    assert json.loads((tmp_path / "timings.json").read_text()) == timings
    text = readme.read_text()
    assert text.startswith("intro\n<!-- comparison:begin -->\n| run |") and text.endswith("<!-- comparison:end -->\noutro\n")
    assert "old table" not in text
    assert "| qlora (4-bit base) | 10 | none eligible (best ineligible: 9) | 0.500 | 0.250 | 1.500 | 3.0 | 6.0 |" in text
    assert "1.0000 in float32, 1.2500 stored as nf4 with double quantization" in text
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # the same result gives the same bytes: comparison.json is a DVC metric
    first = (tmp_path / "comparison.json").read_bytes()
    write_comparison(_result(3 * 2**20), {"access-policy-qlora": {"wall_s": 99.0}}, reports=tmp_path, readme=readme)
    assert (tmp_path / "comparison.json").read_bytes() == first
