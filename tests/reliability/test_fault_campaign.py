"""The fault campaign at CI size: three faults (a SIGKILL inside a checkpoint write, a corrupted
checkpoint on disk, a SIGKILL at a random moment of training), each resumed from, and the run
still ends bit-identical to the uninterrupted reference, with no metrics record lost and no staging
dir leaked; and one SIGKILL mid-export and one mid-compile (each with its staging dir on disk),
cleaned by the next session or compile. The larger size is for benchmarks:
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
    figures["records_lost"] += report["records_lost"]
    figures["leaks"] += report["leaks"]

    assert report["faults_injected"] == 3 and report["faults_survived"] == 3, report["trials"]
    assert report["corrupt_checkpoints_loaded"] == 0 and report["wrong_resumes"] == 0
    assert report["records_lost"] == 0 and report["leaks"] == 0, report["trials"]
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


def test_fault_campaign_kills_mid_export_and_mid_compile(tmp_path, figures):
    fc = _campaign_module()
    report = fc.main(["--faults", "2", "--seed", "0", "--size", "small", "--work-dir", str(tmp_path / "work"),
                      "--kinds", "kill_during_compile,kill_during_export"])
    for key in ("faults_injected", "faults_survived", "corrupt_checkpoints_loaded", "tracebacks", "records_lost", "leaks"):
        figures[key] += report[key]

    assert report["faults_injected"] == 2 and report["faults_survived"] == 2, report["trials"]
    assert report["by_kind"]["kill_during_compile"] == 1 and report["by_kind"]["kill_during_export"] == 1
    assert report["sigkills"] == 2 and report["tracebacks"] == 0
    assert report["records_lost"] == 0 and report["leaks"] == 0, report["trials"]
    assert all(t["bit_identical"] for t in report["trials"])
    by_kind = {f["kind"]: f for f in report["faults"]}
    # the kills really landed mid-staging: the staging dir was on disk until the next writer removed it
    export = by_kind["kill_during_export"]
    assert any(name.startswith(".export.pid") and name.endswith(".tmp") for name in export["staging_left"]), export
    compiled = by_kind["kill_during_compile"]
    assert any(name.startswith(f".{compiled['bundle']}.pid") and name.endswith(".tmp")
               for name in compiled["staging_left"]), compiled
    assert compiled["problems"] == [] and compiled["leaks"] == []
    bundles = tmp_path / "work" / "proj" / "bundles"
    assert sorted(p.name for p in bundles.iterdir()) == [compiled["bundle"]]

    # a record missing from the log is counted
    runs = tmp_path / "work" / "proj" / "runs"
    trial = sorted(p for p in runs.iterdir() if p.name.startswith("trial-"))[-1]
    tampered = tmp_path / "tampered"
    shutil.copytree(trial, tampered)
    metrics = tampered / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[1:]) + "{not json\n")
    lost, torn = fc.records_lost(runs / "reference", tampered)
    assert len(lost) == 2 and torn == 0, lost
