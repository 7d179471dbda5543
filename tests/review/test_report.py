"""Run report, status and the runs overview, from a run directory alone (no model needed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from sftc.io import pretty_json, sha256_file
from sftc.review.report import render_report
from sftc.review.runs import format_runs, list_runs
from sftc.runtime.select import select_best
from sftc.review.status import status
from sftc.runtime.checkpoint import SEAL, seal
from tests.lock_factory import sample_lock, write_lock

RULE = {"require": {"format_pass_rate": ">= 0.98"}, "maximize": "policy_pass_rate",
        "tie_break": [{"minimize": "eval_loss"}], "export_if_none_eligible": False}
EVALS = {200: (1.91, 0.93, 0.99), 400: (1.77, 0.91, 1.00), 600: (1.79, 0.97, 0.98)}


LOCK = sample_lock(
    spec={"parameterization": {"kind": "lora", "rank": 16}, "tokenize": {"max_length": 512}, "select": RULE,
          "batch": {"per_device": 4, "grad_accum": 8},
          "data": {"files": ["data/rows.jsonl"]}},
    packing={"seq_length": 512},
    budget={"optimizer_steps": 600, "total_tokens": 4_915_200,
            "supervised_tokens_per_update": {"min": 2100, "mean": 2480.4, "max": 2900}},
    parameters={"trainable": 1_703_936, "total": 3_700_000, "trainable_fraction": 0.46},
    data_manifest={"hash": "sha256:5ca1ab1e" + "0" * 56},
    template={"version": "sha256:7e3a1a7e" + "0" * 56},
    eval_manifest={"metrics": ["format_pass_rate", "policy_pass_rate"]},
)
BUNDLE_ID = LOCK["bundle_id"]


def make_run(root: Path) -> Path:
    bundle = write_lock(root / "bundles" / BUNDLE_ID, LOCK)  # 32 rows per update: spec batch 4 x 8 x 1
    run = root / "runs" / BUNDLE_ID
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"bundle_id": BUNDLE_ID, "bundle_dir": str(bundle), "world_size": 1}))
    rng = random.Random(3)
    lines = []
    for step in range(10, 601, 10):
        lines.append({"kind": "train", "step": step, "loss": 2.6 * math.exp(-step / 300) + 1.0 + rng.uniform(-.05, .05),
                      "lr": 1e-4, "grad_norm": 1.0, "supervised_tokens": rng.randint(2100, 2900),
                      "supervised_tokens_total": step * 2480})
        if step in EVALS:
            loss, policy, fmt = EVALS[step]
            lines.append({"kind": "eval", "step": step, "eval_loss": loss, "policy_pass_rate": policy,
                          "format_pass_rate": fmt, "n_prompts": 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cands = [{"step": s, "eval_loss": v[0], "policy_pass_rate": v[1], "format_pass_rate": v[2]} for s, v in EVALS.items()]
    (run / "best.json").write_text(pretty_json(select_best(cands, RULE)))
    for step in (400, 600):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        manifest = {"bundle_id": BUNDLE_ID, "global_step": step,
                    "files": {"adapter_model.safetensors": sha256_file(ckpt / "adapter_model.safetensors")}}
        (ckpt / "checkpoint.json").write_text(pretty_json({**manifest, SEAL: seal(manifest)}))  # as the runtime seals it
    return run


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_writes_pngs_and_html(tmp_path):
    run = make_run(tmp_path)
    page = render_report(run)
    assert page == run / "report" / "report.html"
    for name in ("loss.png", "behaviour.png", "tokens.png"):
        assert _is_png(run / "report" / name), name
    text = page.read_text()
    assert "Step 600 selected" in text and "600 (selected)" in text
    assert all(f'src="{n}"' in text for n in ("loss.png", "behaviour.png", "tokens.png"))


def test_report_of_a_run_with_nothing_logged(tmp_path):
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    page = render_report(run, tmp_path / "out")
    assert page.parent == tmp_path / "out" and _is_png(tmp_path / "out" / "behaviour.png")
    assert "no checkpoint selected yet" in page.read_text()


def test_status_lists_checkpoints_best_and_progress(tmp_path):
    run = make_run(tmp_path)
    weights = run / "checkpoints" / "checkpoint-400" / "adapter_model.safetensors"
    weights.write_bytes(b"tampered")
    text = status(run)
    assert "last train step 600" in text
    assert "step    400  INVALID: checkpoint-400/adapter_model.safetensors: sha256 differs" in text
    assert "* step    600  valid  eval_loss 1.79  format_pass_rate 0.98  policy_pass_rate 0.97" in text
    assert "evaluated but rotated away: steps 200" in text
    assert "best: step 600" in text and "why: Step 600 selected" in text
    assert "step    400  valid" in status(run, verify_hashes=False)  # files present; not re-hashed


def test_runs_overview(tmp_path):
    make_run(tmp_path)
    (tmp_path / "runs" / "orphan").mkdir()
    rows = list_runs(tmp_path)
    assert [r["run"] for r in rows] == [BUNDLE_ID, "orphan"]
    row = rows[0]
    assert row["parameterization"] == "lora r=16" and row["trainable_params"] == 1_703_936
    assert row["seq_length"] == 512 and row["examples_per_update"] == 32
    assert row["supervised_tokens_per_update"] == 2480.4 and row["total_tokens"] == 4_915_200
    assert row["best_step"] == 600 and row["best_metrics"]["policy_pass_rate"] == 0.97
    assert "error" in rows[1]
    table = format_runs(rows)
    header, first = table.splitlines()[:2]
    assert header.split()[:5] == ["run", "status", "param", "trainable", "seq"]
    for needle in (BUNDLE_ID, "lora r=16", "1,703,936", "2,480", "5ca1ab1e0000", "7e3a1a7e0000", "600/600", "0.97"):
        assert needle in first, needle
