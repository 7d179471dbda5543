"""The fault campaign at CI size: three faults (a SIGKILL inside a checkpoint write, a corrupted
checkpoint on disk, a SIGKILL at a random moment of training), each resumed from, and the run
still ends bit-identical to the uninterrupted reference. The larger size is for benchmarks:
`python scripts/fault_campaign.py --faults 40 --seed 1 --size large` (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _campaign_module():
    spec = importlib.util.spec_from_file_location("fault_campaign", REPO / "scripts" / "fault_campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fault_campaign_small(tmp_path, figures):
    fc = _campaign_module()
    out = tmp_path / "reliability.json"
    report = fc.main(["--faults", "3", "--seed", "0", "--size", "small", "--work-dir", str(tmp_path / "work"),
                      "--out", str(out)])
    figures["faults_injected"] += report["faults_injected"]
    figures["faults_survived"] += report["faults_survived"]
    figures["corrupt_checkpoints_loaded"] += report["corrupt_checkpoints_loaded"]
    figures["tracebacks"] += report["tracebacks"]

    assert report["faults_injected"] == 3 and report["faults_survived"] == 3, report["trials"]
    assert report["corrupt_checkpoints_loaded"] == 0 and report["wrong_resumes"] == 0
    assert report["half_checkpoints_visible"] == 0 and report["tracebacks"] == 0
    kinds = {f["kind"] for f in report["faults"]}
    assert {"kill_during_checkpoint", "corrupt_checkpoint"} <= kinds, kinds
    during = [f for f in report["faults"] if f["kind"] == "kill_during_checkpoint"]
    # the kill really landed mid-save: its staging dir was on disk until the next session removed it
    assert all(f["staging_left"] for f in during), during
    assert all(t["bit_identical"] for t in report["trials"])
    assert json.loads(out.read_text())["faults_survived"] == 3

    # the comparison can see a difference: one flipped bit in the reference's final weights
    runs = tmp_path / "work" / "proj" / "runs"
    trial = sorted(p for p in runs.iterdir() if p.name.startswith("trial-"))[-1]
    assert fc.compare(runs / "reference", trial, report["optimizer_steps"]) == []
    tampered = tmp_path / "tampered"
    shutil.copytree(trial, tampered)
    weights = next((tampered / "checkpoints" / f"checkpoint-{report['optimizer_steps']}").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data
    weights.write_bytes(bytes(data))
    problems = fc.compare(runs / "reference", tampered, report["optimizer_steps"])
    assert any("final weights differ" in p for p in problems), problems
