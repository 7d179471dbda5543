"""A checkpoint written at one world size resumes at another (grad_accum re-derived to keep the
examples per update), and the losses continue those of the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from sftc.runtime.run import run_bundle

from .conftest import torchrun
from .test_data_parallel import STEPS, TOL, _compile, _report, max_diffs


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_checkpoint_at_world_2_resumes_at_world_1(project, strategy):
    bundle = _compile(project, strategy)
    reference = project.root / "runs" / "reference"
    run_bundle(bundle, run_dir=reference)

    run_dir = project.root / "runs" / "moved"
    proc = torchrun(bundle, run_dir, nproc=2, stop_after=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    run_bundle(bundle, run_dir=run_dir)  # one process: grad_accum 2
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_step"] == 2 and record["world_size"] == 1 and record["status"] == "finished"
    assert record["consumption"]["supervised_tokens_total"] == record["supervised_tokens_predicted"]
    loss_diffs, weight_diff = max_diffs(reference, run_dir, STEPS)
    _report(f"{strategy} world 2 -> 1 resume", loss_diffs, weight_diff)
    assert max(loss_diffs) <= TOL and weight_diff <= TOL


def test_checkpoint_at_world_1_resumes_sharded_at_world_2(project):
    bundle = _compile(project, "fsdp")
    reference = project.root / "runs" / "reference"
    run_bundle(bundle, run_dir=reference)

    run_dir = project.root / "runs" / "moved"
    run_bundle(bundle, run_dir=run_dir, stop_after_steps=2)
    proc = torchrun(bundle, run_dir, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_step"] == 2 and record["world_size"] == 2 and record["status"] == "finished"
    assert record["distributed"]["strategy"] == "fsdp"
    assert record["consumption"]["first_microbatches"][0]["update"] == 3
    loss_diffs, weight_diff = max_diffs(reference, run_dir, STEPS)
    _report("fsdp world 1 -> 2 resume", loss_diffs, weight_diff)
    assert max(loss_diffs) <= TOL and weight_diff <= TOL
