"""The compile side of scale-out (spec options, launch.sh for several nodes, deepspeed.json) and
the refusals that need no second process."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from sftc.runtime.distributed import check_strategy
from sftc.runtime.train import run_bundle
from sftc.errors import RunError, SpecError


def test_launch_sh_for_two_nodes_takes_endpoint_and_node_rank_from_the_scheduler(project, tmp_path):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 4},
                             distributed={"strategy": "fsdp", "nodes": 2, "procs_per_node": 2})
    script = bundle / "launch.sh"
    text = script.read_text()
    assert "--nnodes=2" in text and "--nproc-per-node=2" in text and "-m sftc.cli run" in text
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # a stand-in torchrun prints the command line it was given
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "TORCHRUN": str(fake)}

    def launched(env):
        out = subprocess.run(["bash", str(script), "--fresh"], env={**base, **env}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    k8s = launched({"MASTER_ADDR": "trainer-0.trainer", "MASTER_PORT": "23456", "JOB_COMPLETION_INDEX": "1"})
    assert "--node-rank=1" in k8s and "--rdzv-endpoint=trainer-0.trainer:23456" in k8s
    assert f"--rdzv-id={bundle.name}" in k8s and k8s[-3:] == ["run", str(bundle.resolve()), "--fresh"]
    slurm = launched({"MASTER_ADDR": "node17", "SLURM_NODEID": "1"})
    assert "--node-rank=1" in slurm and "--rdzv-endpoint=node17:29500" in slurm
    explicit = launched({"MASTER_ADDR": "10.0.0.5", "NODE_RANK": "0", "SLURM_NODEID": "1"})
    assert "--node-rank=0" in explicit  # NODE_RANK wins over the scheduler's variables


def test_single_process_bundle_launches_sftc_run(project):
    text = (project.compile() / "launch.sh").read_text()
    assert 'exec "$SFTC" run "$BUNDLE_DIR" "$@"' in text and "torchrun" not in text.split("set -euo")[1]


def test_zero3_bundle_has_deepspeed_config_and_the_run_refuses_without_deepspeed(project):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "zero3", "procs_per_node": 2, "mixed_precision": "bf16"})
    config = json.loads((bundle / "deepspeed.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["train_batch_size"] == 4
    assert config["gradient_accumulation_steps"] == 1 and config["bf16"]["enabled"] is True
    lock = json.loads((bundle / "bundle.lock.json").read_text())
    assert "deepspeed.json" in lock["files"]  # hashed like every bundle file
    assert not (project.compile() / "deepspeed.json").exists()
    from sftc.runtime.distributed import deepspeed_available

    if deepspeed_available():
        pytest.skip("deepspeed is installed here")
    with pytest.raises(RunError, match="deepspeed is not installed"):
        run_bundle(bundle, run_dir=project.root / "runs" / "zero3")
    assert not (project.root / "runs" / "zero3" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"distributed": {"strategy": "ddp", "cpu_offload": True}}, "distributed.cpu_offload"),
    ({"distributed": {"strategy": "ddp", "mixed_precision": "bf16"}}, "distributed.mixed_precision"),
    ({"distributed": {"strategy": "fsdp", "mixed_precision": "bf16"}, "model": {"dtype": "bfloat16"}},
     "mixed precision keeps float32 weights"),
])
def test_spec_refuses_inconsistent_engine_options(project, overrides, message):
    with pytest.raises(SpecError) as err:
        project.compile(**overrides)
    assert message in str(err.value)


def test_sharded_strategy_refusals_before_any_model_is_loaded(project):
    from sftc.compiler.spec import Spec

    lock = json.loads((project.compile() / "bundle.lock.json").read_text())

    def spec(**dist):
        raw = dict(lock["spec"])
        raw["distributed"] = {**raw["distributed"], **dist}
        return Spec.model_validate(raw)

    with pytest.raises(RunError, match="sharding LoRA / QLoRA"):
        raw = dict(lock["spec"], parameterization={"kind": "lora"})
        raw["distributed"] = {**raw["distributed"], "strategy": "fsdp"}
        check_strategy(Spec.model_validate(raw), world_size=2)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="cpu_offload"):
            check_strategy(spec(strategy="fsdp", cpu_offload=True), world_size=2)
        with pytest.raises(RunError, match="fp16"):
            check_strategy(spec(strategy="fsdp", mixed_precision="fp16"), world_size=2)
    check_strategy(spec(strategy="fsdp"), world_size=2)  # allowed
    check_strategy(spec(strategy="fsdp", cpu_offload=True), world_size=1)  # one process: nothing to offload
