"""No third-party noise that sftc knows does not apply: `sftc compile` of a full or LoRA spec
prints none of bitsandbytes' hub-kernel message, transformers' FutureWarning or the tokenizer's
max-length warning, and does not import bitsandbytes at all; QLoRA still finds it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import base_spec

NOISE = ("gemm_4bit_forward", "pip install kernels", "FutureWarning", "is_gradient_checkpointing",
         "Token indices sequence length")


def _rows(n: int = 8) -> list[dict]:
    rows = [{"thread_id": f"t{i}", "prompt": f"Is key T10{i} stale?", "completion": f"Key T10{i} is stale. Rotate it."}
            for i in range(n)]
    # longer than the tokenizer's model_max_length: sftc rejects it (answer_truncated) on its own terms
    rows.append({"thread_id": "long", "prompt": "Explain.", "completion": "Rotate the stale key now. " * 400})
    return rows


def _compile(project, kind: str) -> subprocess.CompletedProcess:
    project.write_jsonl("data/rows.jsonl", _rows())
    parameterization = {"kind": kind} if kind == "full" else {"kind": kind, "rank": 4, "alpha": 8}
    spec = project.write_spec(base_spec(name=f"quiet-{kind}", parameterization=parameterization), f"{kind}.yaml")
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "sftc.cli", "compile", str(spec)],
                          cwd=project.root, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_compile_prints_no_inapplicable_warnings(project, kind):
    done = _compile(project, kind)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled:" in done.stdout
    messages = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert not [line for line in messages if any(n in line for n in NOISE)], messages
    # -X importtime lists every module imported; a real bitsandbytes import brings its submodules
    assert not [line for line in done.stderr.splitlines() if "bitsandbytes." in line]


def test_qlora_spec_still_sees_bitsandbytes(project):
    pytest.importorskip("bitsandbytes")
    done = _compile(project, "qlora")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs bitsandbytes" not in done.stderr


def test_allow_bitsandbytes_undoes_the_hiding_for_peft():
    pytest.importorskip("bitsandbytes")
    code = (
        "from sftc.quiet import hide_bitsandbytes, allow_bitsandbytes\n"
        "hide_bitsandbytes()\n"
        "import peft.import_utils as u\n"
        "assert not u.is_bnb_available()\n"
        "allow_bitsandbytes()\n"
        "assert u.is_bnb_available() and u.is_bnb_4bit_available()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("kind, hidden", [("lora", True), ("full", True), ("qlora", False)])
def test_run_hides_bitsandbytes_unless_the_bundle_is_qlora(tmp_path, kind, hidden):
    """`sftc run BUNDLE` reads the bundle's parameterization before anything is imported."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "bundle.lock.json").write_text('{"spec": {"parameterization": {"kind": "%s"}}}' % kind)
    code = (
        "import sys\n"
        "from sftc.quiet import quiet_for_command\n"
        f"quiet_for_command('run', ['--run-dir', 'x', {str(bundle)!r}])\n"
        "print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str(hidden), done.stderr
