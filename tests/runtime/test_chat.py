"""`sftc generate` / `sftc chat`: a quick try of an export, prompted through its exported template
(so the training system message applies), for full, adapter and merged exports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sftc.runtime.export import export_run
from tests.runtime.test_export import LORA, TRICKY_SYSTEM, _full_saver, _lora_saver, _make_run

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Ticket 3: the admin role of user u3 needs a decision under AC-104."


def _sftc(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sftc", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def _expected_reply(model, export: Path, system: str | None, n: int) -> str:
    """Greedy by hand: the training prompt (system message included) and a cut at the terminator."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if end in out:
        out = out[:out.index(end)]
    return tokenizer.decode(out, skip_special_tokens=False)


def test_generate_full_export_uses_the_training_system_prompt(project, tmp_path):
    models: dict = {}
    run = _make_run(project, {"kind": "full"}, _full_saver(project.root / "model", models), steps=(600,),
                    system=TRICKY_SYSTEM)
    out = export_run(run)
    proc = _sftc("generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        trained_prompt = _expected_reply(models[600], out, TRICKY_SYSTEM, 24)
        other_prompt = _expected_reply(models[600], out, "Be brief.", 24)
    assert proc.stdout == trained_prompt + "\n"
    assert trained_prompt != other_prompt  # the system message changes the reply, so the check can fail


def test_generate_adapter_and_merged_exports_from_elsewhere(project, tmp_path):
    adapters: dict = {}
    run = _make_run(project, LORA, _lora_saver(project.root / "model", adapters), steps=(600,))
    out = export_run(run)
    with torch.no_grad():
        expected = _expected_reply(adapters[600], out, None, 16)
    assert expected.strip()
    # the adapter's base is found relative to the export directory, not the working directory
    for export in (out, out / "merged"):
        proc = _sftc("generate", str(export), "--prompt", PROMPT, "--max-new-tokens", "16", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == expected + "\n", export.name

    proc = _sftc("chat", str(out), "--max-new-tokens", "16", cwd=tmp_path, stdin=f"{PROMPT}\n/clear\n{PROMPT}\n/exit\nignored\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"{expected}\n{expected}\n"  # /clear forgets the first exchange; /exit ends

    # a deployer who copied only the adapter gets told where the base must go, not a traceback
    lonely = tmp_path / "only-the-adapter"
    shutil.copytree(out, lonely, ignore=shutil.ignore_patterns("merged"))
    proc = _sftc("generate", str(lonely), "--prompt", PROMPT, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "../../../model" in proc.stderr and "merged/" in proc.stderr


def test_a_damaged_export_is_named_before_anything_loads_it(project, tmp_path):
    """Every file an export lists in provenance.json is checked first; without a provenance (not an
    sftc export) a file no loader can read is still a clear error, never a traceback."""
    from click.testing import CliRunner

    from sftc.cli import main

    models: dict = {}
    run = _make_run(project, {"kind": "full"}, _full_saver(project.root / "model", models), steps=(600,))
    out = export_run(run)
    for name, damage in (("model.safetensors", lambda b: b[:1000]), ("config.json", lambda b: b"{\"bad"),
                         ("tokenizer.json", lambda b: b"\xff\xfe")):
        copy = tmp_path / f"export-{name}"
        shutil.copytree(out, copy)
        (copy / name).write_bytes(damage((copy / name).read_bytes()))
        result = CliRunner().invoke(main, ["generate", str(copy), "--prompt", PROMPT, "--max-new-tokens", "2"])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert f"{name}: sha256 differs from provenance.json" in result.output, result.output
        (copy / "provenance.json").unlink()  # the same damage, nothing to check it against
        result = CliRunner().invoke(main, ["generate", str(copy), "--prompt", PROMPT, "--max-new-tokens", "2"])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert "could not be loaded" in result.output and "re-export" in result.output, result.output
