"""The compile side of scale-out (spec options, launch.sh for one and several nodes, the ZeRO
refusal) and the refusals that need no second process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftc.runtime.distributed import check_strategy
from sftc.errors import RunError, SpecError


def _stand_in_python(tmp_path, imports_sftc: bool = True) -> Path:
    """A `python` that prints the command line it was given; `-c 'import sftc'` (the script's probe)
    succeeds or fails as asked."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(exist_ok=True)
    probe = "exit 0" if imports_sftc else "exit 1"
    fake.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == "-c" ]]; then {probe}; fi\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return fake


def _launch(tmp_path, script, env, *args):
    # only the stand-in's directory and the tools the script uses: no real python is found by accident
    tools = tmp_path / "tools"
    if not tools.exists():
        tools.mkdir()
        for tool in ("bash", "dirname", "sed", "env"):
            (tools / tool).symlink_to(shutil.which(tool))
    path = ":".join(p for p in (env.pop("PREPEND_PATH", None), str(tools)) if p)
    return subprocess.run(["/bin/bash", str(script), *args], env={"PATH": path, **env}, capture_output=True, text=True)


def test_launch_sh_for_two_nodes_uses_static_ranks_from_the_scheduler(project, tmp_path):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 4},
                             distributed={"strategy": "fsdp", "nodes": 2, "procs_per_node": 2})
    script = bundle / "launch.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert str(project.root) not in script.read_text()  # nothing of this machine in the bundle
    python = _stand_in_python(tmp_path)

    def launched(env):
        out = _launch(tmp_path, script, {"SFTC_PYTHON": str(python), **env}, "--fresh")
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    k8s = launched({"MASTER_ADDR": "trainer-0.trainer", "MASTER_PORT": "23456", "JOB_COMPLETION_INDEX": "1"})
    # static rendezvous: the node rank decides the global ranks (c10d would number nodes by arrival)
    assert k8s[:2] == ["-m", "torch.distributed.run"] and "--rdzv-backend=static" in k8s
    assert "--nnodes=2" in k8s and "--nproc-per-node=2" in k8s and "--node-rank=1" in k8s
    assert "--master-addr=trainer-0.trainer" in k8s and "--master-port=23456" in k8s
    assert k8s[-5:] == ["-m", "sftc.cli", "run", str(bundle.resolve()), "--fresh"]
    slurm = launched({"MASTER_ADDR": "node17", "SLURM_NODEID": "1"})
    assert "--node-rank=1" in slurm and "--master-addr=node17" in slurm and "--master-port=29500" in slurm
    explicit = launched({"MASTER_ADDR": "10.0.0.5", "NODE_RANK": "0", "SLURM_NODEID": "1"})
    assert "--node-rank=0" in explicit  # NODE_RANK wins over the scheduler's variables
    assert "--node-rank=1" in launched({"MASTER_ADDR": "10.0.0.5", "NODE_RANK": "01"})  # not octal
    # under SLURM without MASTER_ADDR: the first host of the job (a long list must not end the script by SIGPIPE)
    (python.parent / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && '
                                            'for ((i = 0; i < 20000; i++)); do printf "gpu%05d\\n" $i; done\n')
    (python.parent / "scontrol").chmod(0o755)
    slurm = _launch(tmp_path, script, {"PREPEND_PATH": str(python.parent), "SLURM_JOB_NODELIST": "gpu[00000-19999]",
                                        "SLURM_NODEID": "1"})
    assert slurm.returncode == 0, slurm.stderr
    assert "--master-addr=gpu00000" in slurm.stdout.splitlines() and "--node-rank=1" in slurm.stdout.splitlines()
    # found on PATH when SFTC_PYTHON is not set
    assert _launch(tmp_path, script, {"PREPEND_PATH": str(python.parent), "MASTER_ADDR": "h", "NODE_RANK": "1"}).returncode == 0


@pytest.mark.parametrize("env, message", [
    ({"NODE_RANK": "1"}, "MASTER_ADDR is not set; with 2 nodes"),
    ({"NODE_RANK": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}, "MASTER_ADDR is not set"),  # no scontrol to ask
    ({"MASTER_ADDR": "node0"}, "node rank '' (from NODE_RANK, SLURM_NODEID or JOB_COMPLETION_INDEX) must be one of 0 .. 1"),
    ({"MASTER_ADDR": "node0", "SLURM_NODEID": "2"}, "node rank '2'"),
    ({"MASTER_ADDR": "node0", "NODE_RANK": "x"}, "node rank 'x'"),
])
def test_launch_sh_refuses_a_node_without_endpoint_or_rank(project, tmp_path, env, message):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 4},
                             distributed={"strategy": "ddp", "nodes": 2, "procs_per_node": 2})
    out = _launch(tmp_path, bundle / "launch.sh", {"SFTC_PYTHON": str(_stand_in_python(tmp_path)), **env})
    assert out.returncode == 2 and out.stdout == ""  # torchrun never started
    assert out.stderr.startswith("sftc launch: error: ") and message in out.stderr, out.stderr


def test_launch_sh_without_a_python_that_imports_sftc_says_how_to_point_at_one(project, tmp_path):
    bundle = project.compile()
    no_sftc = _stand_in_python(tmp_path, imports_sftc=False)
    out = _launch(tmp_path, bundle / "launch.sh", {"PREPEND_PATH": str(no_sftc.parent)})
    assert out.returncode == 2 and out.stdout == ""
    assert "no python that can import sftc" in out.stderr and "SFTC_PYTHON=" in out.stderr
    out = _launch(tmp_path, bundle / "launch.sh", {"SFTC_PYTHON": str(no_sftc)})
    assert out.returncode == 2 and f"SFTC_PYTHON={no_sftc} cannot import sftc" in out.stderr


def test_single_process_bundle_launches_sftc_run(project, tmp_path):
    bundle = project.compile()
    out = _launch(tmp_path, bundle / "launch.sh", {"SFTC_PYTHON": str(_stand_in_python(tmp_path))}, "--fresh")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["-m", "sftc.cli", "run", str(bundle.resolve()), "--fresh"]


def test_one_node_bundle_launches_torchrun_standalone(project, tmp_path):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "ddp", "procs_per_node": 2})
    out = _launch(tmp_path, bundle / "launch.sh", {"SFTC_PYTHON": str(_stand_in_python(tmp_path))})
    assert out.returncode == 0, out.stderr  # no MASTER_ADDR needed on one node
    args = out.stdout.splitlines()
    assert args[:3] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in args


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_strategies_are_refused_at_compile_with_the_fsdp_lines(project, strategy):
    with pytest.raises(SpecError) as err:
        project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                        distributed={"strategy": strategy, "procs_per_node": 2, "cpu_offload": True})
    message = str(err.value)
    assert f"distributed.strategy: {strategy!r} (DeepSpeed ZeRO) is not supported" in message
    assert "`distributed: {strategy: fsdp, cpu_offload: true}`" in message
    assert not list((project.root / "bundles").glob("*")) if (project.root / "bundles").exists() else True


def test_a_zero3_bundle_compiled_before_the_refusal_is_refused_at_any_world_size(project):
    from sftc.compiler.spec import Spec

    lock = json.loads((project.compile() / "bundle.lock.json").read_text())
    raw = dict(lock["spec"])
    raw["distributed"] = {**raw["distributed"], "strategy": "zero3"}
    for world in (1, 2):
        with pytest.raises(RunError, match="compiled by an older sftc; recompile it.*strategy: fsdp"):
            check_strategy(Spec.model_validate(raw), world_size=world)


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


def test_a_worker_whose_launcher_is_gone_before_it_arms_refuses_to_train(tmp_path):
    # the launcher exported its pid; this process's parent is another one (the launcher died and the
    # worker was re-parented before prctl ran): stop instead of training alone
    code = "from sftc.runtime.distributed import die_with_launcher; print(die_with_launcher())"
    env = {k: v for k, v in os.environ.items() if k != "SFTC_LAUNCHER_PID"}
    gone = subprocess.run([sys.executable, "-c", code], env={**env, "SFTC_LAUNCHER_PID": "999999999"},
                          capture_output=True, text=True)
    assert gone.returncode != 0 and "launcher (pid 999999999) exited before training started" in gone.stderr
    alive = subprocess.run([sys.executable, "-c", code], env={**env, "SFTC_LAUNCHER_PID": str(os.getpid())},
                           capture_output=True, text=True)
    assert alive.returncode == 0 and "'parent_death_signal': 'SIGKILL'" in alive.stdout, alive.stderr
