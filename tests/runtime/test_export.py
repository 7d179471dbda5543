"""Export of the selected checkpoint: loads back as a standard HF model (full) or adapter (lora),
carries its provenance, and refuses checkpoints that fail their hashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sftc.errors import RunError
from sftc.io import pretty_json, sha256_file
from sftc.runtime.export import export_run
from sftc.runtime.select import select_best

SELECT = {"require": {"format_pass_rate": ">= 0.98"}, "maximize": "policy_pass_rate",
          "tie_break": [{"minimize": "eval_loss"}]}
# (eval_loss, policy_pass_rate, format_pass_rate) per step: 600 wins by policy, 400 has the lowest loss
METRICS = {200: (1.91, 0.93, 0.99), 400: (1.77, 0.91, 1.00), 600: (1.79, 0.97, 0.98)}
SCORED = 2  # n_prompts: behaviour scored on fewer prompts than the bundle holds (eval.max_prompts)
TRICKY_SYSTEM = 'Follow "access policy" %} {{ x }}\n\tAnswer as JSON. Naïve 😀 \\ end'
LORA = {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "merge_on_export": True}


def _sealed(manifest: dict) -> dict:
    """checkpoint.json as the runtime writes it: sealed over its own fields (runtime/checkpoint.py)."""
    from sftc.runtime import checkpoint

    seal = getattr(checkpoint, "seal", None)  # the seal lands with the checkpoint engineer's change
    return {**manifest, checkpoint.SEAL: seal(manifest)} if seal else manifest


def _prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Vendor wants admin access."}],
                                         tokenize=True, add_generation_prompt=True, return_dict=False)


def _greedy(model, ids: list[int], n: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _make_run(project, parameterization: dict, save, steps=(200, 400, 600), select=None,
              system: str | None = None) -> Path:
    """A bundle compiled by the real compiler, and a run of it (no training) whose checkpoints
    `save` writes, each with its sealed checkpoint.json, and the best.json that selects among them."""
    bundle = project.compile(parameterization=parameterization, template={"system": system},
                             eval={"rules": "rules.yaml"}, tokenize={"max_length": 160}, select=select or SELECT)
    lock = json.loads((bundle / "bundle.lock.json").read_text())
    run = project.run_dir(bundle)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"bundle_id": bundle.name, "bundle_dir": f"bundles/{bundle.name}"}))
    cands = []
    for step in steps:
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save(ckpt, step)
        (ckpt / "optimizer.pt").write_bytes(b"pickle bytes that must never be exported")
        loss, policy, fmt = METRICS[step]
        m = {"eval_loss": loss, "policy_pass_rate": policy, "format_pass_rate": fmt, "n_prompts": SCORED}
        cands.append({"step": step, **m})
        files = {p.relative_to(ckpt).as_posix(): sha256_file(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
        (ckpt / "checkpoint.json").write_text(pretty_json(_sealed({
            "bundle_id": bundle.name, "global_step": step, "metrics": m, "files": files,
            "tokenizer_version": lock["tokenizer"]["version"],
            "template_version": (lock.get("template") or {}).get("version")})))
    (run / "best.json").write_text(pretty_json(select_best(cands, lock["spec"]["select"])))
    return run


def _full_saver(model_dir: Path, into: dict):
    def save(ckpt, step):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(step)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # each step's weights differ
        model.save_pretrained(ckpt)
        into[step] = model.eval()
    return save


def _lora_saver(model_dir: Path, into: dict):
    def save(ckpt, step):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(step)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.5)  # a trained adapter is not a no-op
        model.save_pretrained(ckpt)
        into[step] = model.eval()
    return save


def test_full_export_reloads_generates_and_carries_provenance(project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models: dict = {}
    run = _make_run(project, {"kind": "full"}, _full_saver(project.root / "model", models))
    lock = json.loads((project.root / "bundles" / run.name / "bundle.lock.json").read_text())
    out = export_run(run)
    assert out == run / "export"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "provenance.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pth", ".pkl")) for n in names)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == (project.root / "bundles" / run.name / "chat_template.jinja").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _prompt(tokenizer)
    assert _greedy(loaded, ids) == _greedy(models[600], ids)  # step 600 won, not 400 (lowest loss)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in loaded.generation_config.eos_token_id

    card = (out / "README.md").read_text()
    for needle in (run.name, lock["data_manifest"]["hash"], "Step 600 selected", "policy_pass_rate",
                   lock["tokenizer"]["version"], "examples per update", "trainable parameters"):
        assert needle in card, needle
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["step"] == 600 and provenance["eligible"] is True
    assert provenance["metrics"]["policy_pass_rate"] == 0.97
    assert provenance["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    sealed = json.loads((run / "checkpoints" / "checkpoint-600" / "checkpoint.json").read_text())["files"]
    assert provenance["from_checkpoint"]["model.safetensors"] == sealed["model.safetensors"]

    # Re-export replaces the previous export, byte for byte the same, and leaves no staging directories behind.
    (out / "stale.txt").write_text("from an older export")
    export_run(run)
    assert not (run / "export" / "stale.txt").exists()
    assert json.loads((out / "provenance.json").read_text()) == provenance  # its files: the sha256 of every other file
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_tampered_checkpoint_is_refused_and_old_export_kept(project):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(project.root / "model")
    run = _make_run(project, {"kind": "full"}, lambda ckpt, step: base.save_pretrained(ckpt), steps=(600,))
    export_run(run)
    before = sha256_file(run / "export" / "model.safetensors")
    weights = run / "checkpoints" / "checkpoint-600" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError) as err:
        export_run(run)
    assert "model.safetensors" in str(err.value) and "sha256 differs" in str(err.value)
    assert sha256_file(run / "export" / "model.safetensors") == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_none_eligible_is_not_exported_unless_allowed(project):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(project.root / "model")
    select = {**SELECT, "require": {"format_pass_rate": ">= 1.0"}}
    run = _make_run(project, {"kind": "full"}, lambda ckpt, step: base.save_pretrained(ckpt), steps=(200, 600),
                    select=select)
    with pytest.raises(RunError, match="no checkpoint meets the selection rule") as err:
        export_run(run)
    assert "--allow-ineligible" in str(err.value) and "step 600" in str(err.value)
    assert not (run / "export").exists()
    out = export_run(run, allow_ineligible=True)
    assert json.loads((out / "provenance.json").read_text())["step"] == 600
    assert "does NOT meet the selection constraints" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_export_reloads_and_merges(project, kind, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters: dict = {}
    run = _make_run(project, {**LORA, "kind": kind}, _lora_saver(project.root / "model", adapters), steps=(400, 600))
    out = export_run(run)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "merged"} <= {p.name for p in out.iterdir()}
    # the base, relative to the export directory: runs/<id>/export -> <project>/model
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../../model"

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = _prompt(tokenizer)
    monkeypatch.chdir(out)  # peft resolves a relative base against the working directory
    reloaded = AutoPeftModelForCausalLM.from_pretrained(".").eval()
    assert _greedy(reloaded, ids) == _greedy(adapters[600], ids)

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = adapters[600](input_ids=x).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(project.root / "model")(input_ids=x).logits,
                                  atol=1e-3), "the adapter changes the model"
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == tokenizer.chat_template
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "merged/" in card
    assert ("4-bit base" in card) == (kind == "qlora")


def test_end_to_end_real_run_selects_exports_reports(project, monkeypatch):
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
    monkeypatch.chdir(out)  # the adapter names its base relative to the export directory
    model = AutoPeftModelForCausalLM.from_pretrained(".")
    assert len(_greedy(model, _prompt(tokenizer), 4)) == 4
    assert (out / "merged" / "model.safetensors").is_file()

    text = status(run)
    assert f"* step {best['best_step']:>6}  valid" in text
    monkeypatch.undo()
    page = render_report(run)
    assert all((page.parent / n).stat().st_size > 5000 for n in ("loss.png", "behaviour.png", "tokens.png"))
    assert bundle.name in format_runs(list_runs(project.root))


# --- portable exports (issue 13): no machine path, a base that resolves elsewhere, the system prompt --


def test_export_names_no_path_of_the_machine(project, tiny_model_dir, tmp_path):
    run = _make_run(project, LORA, _lora_saver(project.root / "model", {}), steps=(600,), system=TRICKY_SYSTEM)
    out = export_run(run)
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "README.md").is_file()
    machine = {str(project.root), str(project.root.resolve()), str(tiny_model_dir), str(tmp_path)}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            leaked = [m for m in machine if m.encode() in data]
            assert not leaked, f"{path.relative_to(out)} names {leaked}"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["bundle_dir"] == f"bundles/{run.name}"
    assert provenance["base_model"]["project_path"] == "model"
    assert provenance["base_model"]["relative_to_export"] == "../../../model"


def test_copied_export_loads_with_the_training_project_deleted(project, tmp_path, monkeypatch):
    """What a deployer has: the export directory (adapter and merged/) and the base, no project."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained: dict = {}
    run = _make_run(project, LORA, _lora_saver(project.root / "model", trained), steps=(600,))
    out = export_run(run)
    ids = torch.tensor([_prompt(AutoTokenizer.from_pretrained(out))])
    with torch.no_grad():
        expected = trained[600](input_ids=ids).logits

    deployed = tmp_path / "deploy" / "a" / "b" / "export"
    shutil.copytree(out, deployed)
    relative = json.loads((deployed / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not Path(relative).is_absolute()
    shutil.copytree(project.root / "model", (deployed / relative).resolve())  # where the card says the base goes
    shutil.rmtree(project.root)

    merged = AutoModelForCausalLM.from_pretrained(deployed / "merged").eval()
    monkeypatch.chdir(deployed)
    adapter = AutoPeftModelForCausalLM.from_pretrained(".").eval()
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_exported_template_gives_the_training_prompt_tokens(project):
    """Every held-out prompt of a compiled bundle, as a user message alone through the exported
    tokenizer, is token for token the prompt the model was trained and evaluated on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(project.root / "model")
    run = _make_run(project, {"kind": "full"}, lambda ckpt, step: base.save_pretrained(ckpt), steps=(600,),
                    system=TRICKY_SYSTEM)
    out = export_run(run)
    tokenizer = AutoTokenizer.from_pretrained(out)
    bundle = project.root / "bundles" / run.name
    prompts = [json.loads(line) for line in (bundle / "eval_prompts.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (project.root / "data" / "rows.jsonl").read_text().splitlines()]
    assert len(prompts) >= 4
    for prompt in prompts:
        user = next(r["prompt"] for r in rows if r["prompt"] in prompt["prompt_text"])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        assert list(ids) == prompt["prompt_ids"], prompt["index"]
    assert TRICKY_SYSTEM in prompts[0]["prompt_text"]
    # an explicit system message still wins
    own = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                        add_generation_prompt=True, tokenize=False)
    assert "Be brief." in own and "access policy" not in own
    card = (out / "README.md").read_text()
    assert TRICKY_SYSTEM in card
    assert json.loads((out / "provenance.json").read_text())["prompt"]["system"] == TRICKY_SYSTEM


def test_model_card_front_matter_is_hub_valid(project):
    from huggingface_hub import ModelCard

    run = _make_run(project, LORA, _lora_saver(project.root / "model", {}), steps=(400, 600))
    held_out = json.loads((project.root / "bundles" / run.name / "bundle.lock.json").read_text())["eval_manifest"]["prompts"]
    out = export_run(run)
    for directory, library in ((out, "peft"), (out / "merged", "transformers")):
        text = (directory / "README.md").read_text()
        card = ModelCard(text)
        data = card.data.to_dict()
        assert data["pipeline_tag"] == "text-generation" and data["library_name"] == library
        assert "sftc" in data["tags"] and "lora" in data["tags"]
        assert "base_model" not in data  # a local base with no known hub id: absent, never a path
        assert "datasets" not in data and "license" not in data  # local data; the spec has no license field
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results == {"eval_loss": 1.79, "policy_pass_rate": 0.97, "format_pass_rate": 0.98}  # step 600
        assert f"{SCORED} of the {held_out} held-out prompts" in text and held_out > SCORED
        assert "data/rows.jsonl" in text  # the data manifest, in the body


def test_base_named_by_hub_id_when_certain(tmp_path):
    from types import SimpleNamespace

    from sftc.runtime.export import base_reference

    root = tmp_path / "proj"
    export = root / "runs" / "demo-0123456789ab" / "export"

    def bundle(source, path, revision=None):
        model = SimpleNamespace(source=source, path=path, revision=revision, config_sha256="sha256:" + "c" * 64)
        return SimpleNamespace(lock=SimpleNamespace(model=model), resolve=lambda value: root / value)

    hub = base_reference(bundle("hub", "Qwen/Qwen2.5-0.5B-Instruct", "7ae557604adf67be50417f59c2c2f167def9a775"), export)
    assert hub["adapter_base"] == "Qwen/Qwen2.5-0.5B-Instruct" and hub["revision"].startswith("7ae5576")

    snapshot = tmp_path / "hf" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (root / "models").mkdir(parents=True)
    (root / "models" / "qwen").symlink_to(snapshot)
    cached = base_reference(bundle("local", "models/qwen"), export)
    assert (cached["adapter_base"], cached["revision"]) == ("Qwen/Qwen2.5-0.5B", "0123abcd")
    assert cached["project_path"] == "models/qwen"

    # transformers 4 wrote _name_or_path into configs: lineage for the card, not the adapter's base
    local = root / "models" / "tuned"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    declared = base_reference(bundle("local", "models/tuned"), export)
    assert declared["declared_hub_id"] == "Qwen/Qwen2.5-0.5B-Instruct" and declared["hub_id"] is None
    assert declared["adapter_base"] == "../../../models/tuned"


def test_adapter_over_a_hub_base_loads_anywhere_the_cache_has_it(project, tmp_path, monkeypatch):
    """A base given as a hub id: the adapter names it by id and the locked commit, so
    AutoPeftModelForCausalLM finds it through the Hugging Face cache from any directory."""
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sftc-test--tiny"
    shutil.copytree(project.root / "model", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    shutil.rmtree(project.root / "model")

    adapters: dict = {}
    snapshot = repo / "snapshots" / commit
    bundle_spec = {**LORA, "merge_on_export": False}
    original = project.compile

    def compile_hub(**overrides):
        return original(**overrides, model={"path": "sftc-test/tiny"})

    monkeypatch.setattr(project, "compile", compile_hub)
    out = export_run(_make_run(project, bundle_spec, _lora_saver(snapshot, adapters), steps=(600,)))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("sftc-test/tiny", commit)
    card = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert card["base_model"] == "sftc-test/tiny"

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out, elsewhere)
    shutil.rmtree(project.root)
    monkeypatch.chdir(tmp_path)
    ids = _prompt(AutoTokenizer.from_pretrained(elsewhere))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(elsewhere).eval()
    assert _greedy(reloaded, ids) == _greedy(adapters[600], ids)



def test_same_run_elsewhere_exports_the_same_bytes(project, tmp_path):
    """The same project at another path (another machine, another clone) exports identical files:
    nothing in an export depends on where the project lives."""
    other = type(project)(tmp_path / "another" / "clone" / "proj")
    shutil.copytree(project.root, other.root)
    exports = []
    for each in (project, other):
        run = _make_run(each, LORA, _lora_saver(each.root / "model", {}), steps=(600,), system=TRICKY_SYSTEM)
        exports.append(export_run(run))
    files = [{p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
             for out in exports]
    assert files[0] == files[1]
    assert {"README.md", "provenance.json", "adapter_config.json", "merged/README.md", "merged/model.safetensors"} <= set(files[0])
