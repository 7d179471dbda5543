"""Export of the selected checkpoint: loads back as a standard HF model (full) or adapter (lora),
carries its provenance, and refuses checkpoints that fail their hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftc.errors import RunError
from sftc.io import pretty_json, sha256_file
from sftc.runtime.export import export_run
from sftc.runtime.select import select_best

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO / "templates" / "chat" / "access-policy.jinja").read_text(encoding="utf-8")
BUNDLE_ID = "demo-0123456789ab"
CORPUS = ['{"decision": "approve", "policy": "AC-101", "reply": "Approved under AC-101."}',
          "Vendor wants admin access to the billing database without a ticket."] * 30


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, one_thread):
    from demo.tiny_model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("base"), CORPUS, vocab_size=320)


def _prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Vendor wants admin access."}],
                                         tokenize=True, add_generation_prompt=True, return_dict=False)


def _greedy(model, ids: list[int], n: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _make_run(root: Path, base_dir: Path, parameterization: dict, save, steps=(200, 400, 600), rule=None) -> Path:
    """A project with a bundle lock (the fields export reads) and a run whose checkpoints `save` writes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    bundle = root / "bundles" / BUNDLE_ID
    bundle.mkdir(parents=True)
    (bundle / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    rule = rule or {"require": {"format_pass_rate": ">= 0.98"}, "maximize": "policy_pass_rate",
                    "tie_break": [{"minimize": "eval_loss"}], "export_if_none_eligible": False}
    lock = {
        "bundle_id": BUNDLE_ID, "bundle_hash": "f" * 64, "name": "demo", "project_root": "../..",
        "spec": {"objective": "sft", "parameterization": parameterization,
                 "model": {"path": "base", "revision": None, "dtype": "float32", "trust_remote_code": False},
                 "select": rule},
        "inputs": {"model_path": "base", "tokenizer_path": "base"},
        "model": {"path": "base", "config_sha256": sha256_file(base_dir / "config.json")},
        "tokenizer": {"path": "base", "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "template": {"source": "file", "terminator": "<|end|>",
                     "terminator_id": tokenizer.convert_tokens_to_ids("<|end|>")},
        "template_version": "sha256:" + sha256_file(bundle / "chat_template.jinja"),
        "tokenizer_version": "sha256:" + "1" * 64,
        "data_manifest": {"hash": "sha256:" + "d" * 64,
                          "files": [{"path": "data/access_policy/sft_rows.jsonl", "sha256": "e" * 64}]},
        "budget": {"optimizer_steps": 600, "examples_per_update": 8, "per_device": 4, "grad_accum": 2, "world_size": 1,
                   "supervised_tokens_per_update": {"min": 200, "mean": 240.5, "max": 260}, "total_tokens": 123456},
        "parameters": {"total": 115000, "trainable": 115000, "trainable_fraction": 1.0},
        "eval_manifest": {"hash": "sha256:" + "a" * 64, "rules_sha256": "sha256:" + "b" * 64, "prompts": 40,
                          "metrics": ["format_pass_rate", "policy_pass_rate"]},
        "libraries": {"torch": torch.__version__},
    }
    (bundle / "bundle.lock.json").write_text(pretty_json(lock))
    (root / "base").symlink_to(base_dir)
    run = root / "runs" / BUNDLE_ID
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"bundle_id": BUNDLE_ID, "bundle_dir": f"bundles/{BUNDLE_ID}"}))
    metrics = {200: (1.91, 0.93, 0.99), 400: (1.77, 0.91, 1.00), 600: (1.79, 0.97, 0.98)}
    cands = []
    for step in steps:
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save(ckpt, step)
        (ckpt / "optimizer.pt").write_bytes(b"pickle bytes that must never be exported")
        loss, policy, fmt = metrics[step]
        m = {"eval_loss": loss, "policy_pass_rate": policy, "format_pass_rate": fmt}
        cands.append({"step": step, **m})
        files = {p.relative_to(ckpt).as_posix(): sha256_file(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
        (ckpt / "checkpoint.json").write_text(pretty_json({
            "bundle_id": BUNDLE_ID, "global_step": step, "metrics": m, "files": files,
            "tokenizer_version": lock["tokenizer_version"], "template_version": lock["template_version"]}))
    (run / "best.json").write_text(pretty_json(select_best(cands, rule)))
    return run


def test_full_export_reloads_generates_and_carries_provenance(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {}

    def save(ckpt, step):
        torch.manual_seed(step)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # each step's weights differ
        model.save_pretrained(ckpt)
        models[step] = model

    run = _make_run(tmp_path, base_dir, {"kind": "full"}, save)
    out = export_run(run)
    assert out == run / "export"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "provenance.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pth", ".pkl")) for n in names)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _prompt(tokenizer)
    assert _greedy(loaded, ids) == _greedy(models[600], ids)  # step 600 won, not 400 (lowest loss)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in loaded.generation_config.eos_token_id

    card = (out / "README.md").read_text()
    for needle in (BUNDLE_ID, "sha256:" + "d" * 64, "Step 600 selected", "policy_pass_rate", "sha256:" + "1" * 64,
                   "examples per update", "trainable parameters"):
        assert needle in card, needle
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["step"] == 600 and provenance["eligible"] is True
    assert provenance["metrics"]["policy_pass_rate"] == 0.97
    assert provenance["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")

    # Re-export replaces the previous export and leaves no staging directories behind.
    (out / "stale.txt").write_text("from an older export")
    export_run(run)
    assert not (run / "export" / "stale.txt").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_tampered_checkpoint_is_refused_and_old_export_kept(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    run = _make_run(tmp_path, base_dir, {"kind": "full"}, lambda ckpt, step: base.save_pretrained(ckpt), steps=(600,))
    export_run(run)
    before = sha256_file(run / "export" / "model.safetensors")
    weights = run / "checkpoints" / "checkpoint-600" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError) as err:
        export_run(run)
    assert "model.safetensors: sha256 differs" in str(err.value)
    assert sha256_file(run / "export" / "model.safetensors") == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_none_eligible_is_not_exported_unless_allowed(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    rule = {"require": {"format_pass_rate": ">= 1.5"}, "maximize": "policy_pass_rate",
            "tie_break": [{"minimize": "eval_loss"}], "export_if_none_eligible": False}
    run = _make_run(tmp_path, base_dir, {"kind": "full"}, lambda ckpt, step: base.save_pretrained(ckpt),
                    steps=(200, 600), rule=rule)
    with pytest.raises(RunError, match="no checkpoint meets the selection rule"):
        export_run(run)
    assert not (run / "export").exists()
    out = export_run(run, allow_ineligible=True)
    assert json.loads((out / "provenance.json").read_text())["step"] == 600
    assert "does NOT meet the selection constraints" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_export_reloads_and_merges(tmp_path, base_dir, kind):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = {}

    def save(ckpt, step):
        torch.manual_seed(step)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.5)  # a trained adapter is not a no-op
        model.save_pretrained(ckpt)
        adapters[step] = model.eval()

    param = {"kind": kind, "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
             "merge_on_export": True}
    run = _make_run(tmp_path, base_dir, param, save, steps=(400, 600))
    out = export_run(run)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "merged"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = _prompt(tokenizer)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert _greedy(reloaded, ids) == _greedy(adapters[600], ids)

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = adapters[600](input_ids=x).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=x).logits,
                                  atol=1e-3), "the adapter changes the model"
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == TEMPLATE
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "merged/" in card
    assert ("4-bit base" in card) == (kind == "qlora")


def test_end_to_end_real_run_selects_exports_reports(project):
    """A real compiled bundle trained by the runtime: best.json, export, status and report agree."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from sftc.review.report import render_report
    from sftc.review.runs import format_runs, list_runs
    from sftc.review.status import status
    from tests.runtime.conftest import run_in_subprocess

    bundle = project.compile(
        parameterization={"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "merge_on_export": True},
        eval={"rules": "rules.yaml", "max_new_tokens": 24, "batch_size": 8},
        select={"require": {"format_pass_rate": ">= 0.0"}, "maximize": "policy_pass_rate"},
    )
    run = project.run_dir(bundle)
    proc = run_in_subprocess(bundle, run, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((run / "best.json").read_text())
    assert best["best_step"] is not None
    assert {"format_pass_rate", "policy_pass_rate", "eval_loss"} <= set(best["candidates"][0])

    out = export_run(run)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["step"] == best["best_step"] and provenance["bundle_id"] == bundle.name
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert len(_greedy(model, _prompt(tokenizer), 4)) == 4
    assert (out / "merged" / "model.safetensors").is_file()

    text = status(run)
    assert f"* step {best['best_step']:>6}  valid" in text
    page = render_report(run)
    assert all((page.parent / n).stat().st_size > 5000 for n in ("loss.png", "behaviour.png", "tokens.png"))
    assert bundle.name in format_runs(list_runs(project.root))
