"""The bundle's launch.sh on a simulated cluster: two torchrun agents on one host (loopback), each
a "node" with its own node rank, and a launcher killed under its workers.

Every run here goes through the real launch.sh of the bundle (static rendezvous), the way each
node of a cluster runs it; the scheduler's environment is set by hand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftc.runtime.run import run_bundle

from .conftest import REPO
from .test_data_parallel import TOL, _report, max_diffs

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    """The environment a node's launch.sh sees: the scheduler's variables come in `extra`."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_NODEID",
            "SLURM_JOB_NODELIST", "JOB_COMPLETION_INDEX")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "SFTC_PYTHON": sys.executable,
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def start_node(bundle: Path, run_dir: Path, log: Path, **env) -> subprocess.Popen:
    # a session of its own, as a scheduler starts each node's launcher: killpg reaches the agent only
    return subprocess.Popen(["bash", str(bundle / "launch.sh"), "--run-dir", str(run_dir)], cwd=REPO,
                            env=launch_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log.read_text()[-4000:]


def test_two_nodes_on_loopback_take_the_ranks_of_their_node_rank_and_equal_one_rank(project, tmp_path):
    # 2 nodes x 2 processes, fsdp across both: per_device 2, one micro-batch per rank per update,
    # against one process with grad_accum 4
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 4},
                             distributed={"strategy": "fsdp", "nodes": 2, "procs_per_node": 2,
                                          "activation_checkpointing": True},
                             schedule={"max_steps": STEPS}, checkpoint={"every_steps": 2, "keep_last": 3})
    one = project.root / "runs" / "one"
    run_bundle(bundle, run_dir=one)

    run_dir = project.root / "runs" / "two-nodes"
    endpoint = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [tmp_path / "node1.log", tmp_path / "node0.log"]
    # node 1 arrives first: c10d would have made it node 0 (global ranks 0..1)
    node1 = start_node(bundle, run_dir, logs[0], NODE_RANK="1", **endpoint)
    time.sleep(3)
    node0 = start_node(bundle, run_dir, logs[1], SLURM_NODEID="0", **endpoint)  # the rank from SLURM's variable
    finish([node1, node0], logs, timeout=420)
    assert "node 1 of 2 (global ranks 2..3), rendezvous 127.0.0.1:" in logs[0].read_text()

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["world_size"] == 4
    checks = record["distributed"]["checks"]
    # what each worker found in its own environment, all_gathered in global rank order
    assert checks["ranks"] == [
        {"rank": 0, "local_rank": 0, "node_rank": 0, "node_rank_asked": 0},
        {"rank": 1, "local_rank": 1, "node_rank": 0, "node_rank_asked": 0},
        {"rank": 2, "local_rank": 0, "node_rank": 1, "node_rank_asked": 1},
        {"rank": 3, "local_rank": 1, "node_rank": 1, "node_rank_asked": 1},
    ]
    assert checks["parent_death_signal"] == "SIGKILL"
    for check in checks["sharding"]:
        assert sum(check["local_parameters"]) == check["total_parameters"] and len(check["local_parameters"]) == 4
    # gradients and Adam state measured per rank after the first optimizer step: a quarter each
    shares = checks["state_shares"]
    print(f"\nper rank: parameters {checks['sharding'][-1]['local_parameters']}, gradients "
          f"{shares['gradients']['local']}, optimizer state {shares['optimizer_state']['local']}")
    for name in ("gradients", "optimizer_state"):
        total, local = shares[name]["total"], shares[name]["local"]
        assert len(local) == 4 and sum(local) == total and max(local) <= 1.01 * total / 4, shares
    assert shares["gradients"]["total"] == checks["sharding"][0]["total_parameters"]
    assert shares["optimizer_state"]["total"] == 2 * shares["gradients"]["total"]  # exp_avg and exp_avg_sq
    assert checks["activation_checkpointing"] is True
    assert record["consumption"]["checked_against_plan"]
    assert record["consumption"]["supervised_tokens_total"] == record["supervised_tokens_predicted"]

    loss_diffs, weight_diff = max_diffs(one, run_dir, STEPS)
    _report("fsdp 2 nodes x 2 procs vs 1 rank x 4", loss_diffs, weight_diff)
    assert max(loss_diffs) <= TOL and weight_diff <= TOL


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped; only its reaping is left


def test_killing_the_launcher_stops_its_workers_and_the_run_resumes(project, tmp_path):
    steps = 40  # long enough that the workers cannot finish on their own inside the bound below
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "ddp", "procs_per_node": 2},
                             schedule={"max_steps": steps}, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.root / "runs" / "killed"
    log = tmp_path / "node.log"
    agent = start_node(bundle, run_dir, log)
    try:
        deadline = time.monotonic() + 300
        # any checkpoint: checkpoint-2 alone is rotated away (keep_last 2) by step 6, and a poll can
        # miss that window on a fast run, then wait until the run has finished
        while not any((run_dir / "checkpoints").glob("checkpoint-*/checkpoint.json")):
            assert agent.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.killpg(agent.pid, signal.SIGKILL)  # the agent's process group; the workers are in their own sessions
        agent.wait(timeout=10)
        killed_at = time.monotonic()
        while any(_alive(w) for w in workers) and time.monotonic() - killed_at < 10:
            time.sleep(0.05)
        stopped_after = time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:  # leave nothing behind whatever the outcome
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} still running 10 s after their launcher was killed"
    print(f"\nworkers stopped {stopped_after:.2f} s after the launcher was killed")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] != "finished"
    last = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert last < steps

    # the relaunch (the same script) resumes from the newest checkpoint and finishes
    relaunch = start_node(bundle, run_dir, tmp_path / "relaunch.log")
    finish([relaunch], [tmp_path / "relaunch.log"], timeout=420)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["resumed_step"] == last
    assert record["consumption"]["supervised_tokens_total"] == record["supervised_tokens_predicted"]


def test_a_world_size_the_bundle_cannot_keep_is_refused_once_and_ends_torchruns_summary(project):
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "ddp", "procs_per_node": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--max-restarts=0",
           "-m", "sftc.cli", "run", str(bundle), "--run-dir", str(project.root / "runs" / "three")]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    refusal = "error: world size 3 cannot keep the bundle's 4 examples per update"
    # the workers' output, then the agent's ChildFailedError traceback and its failure summary
    workers, _, agent = proc.stderr.partition("Traceback (most recent call last)")
    summary = agent.partition("Root Cause (first observed failure)")[2]
    # printed once by the workers (rank 0), not once per rank ...
    assert workers.count(refusal) == 1, proc.stderr[-6000:]
    # ... and it is the root cause torchrun's closing summary names
    assert refusal in summary and "To enable traceback" not in summary, summary
    # the whole fix in one message: the world sizes that work, or both spec keys to change
    assert "Either launch 1, 2 process(es) in all (the bundle's launch.sh starts 2)" in workers
    assert "`batch.world_size: 3` and `distributed: {nodes: 1, procs_per_node: 3}`" in workers
    assert not (project.root / "runs" / "three" / "checkpoints").exists()


def test_a_bundle_copied_alone_to_another_directory_trains(project, tmp_path):
    # what a node receives: the bundle directory and the base model (checked by hash), nothing else
    # of the project (no raw data, spec, template)
    import shutil

    bundle = project.compile(schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})
    node = tmp_path / "node" / "bundles" / bundle.name
    shutil.copytree(bundle, node)
    shutil.copytree(project.root / "model", tmp_path / "node" / "model")
    shutil.rmtree(project.root / "data")
    run_dir = tmp_path / "node" / "runs" / "alone"
    proc = subprocess.run(["bash", str(node / "launch.sh"), "--run-dir", str(run_dir)], cwd=tmp_path,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"


def test_when_node_0_goes_the_other_node_stops_too(project, tmp_path):
    # node 0 hosts the rendezvous store and rank 0; its launcher is killed like a lost host
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "ddp", "nodes": 2, "procs_per_node": 1},
                             schedule={"max_steps": 40}, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = project.root / "runs" / "lost-node"
    endpoint = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(bundle, run_dir, logs[n], NODE_RANK=str(n), **endpoint) for n in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        # any checkpoint: checkpoint-2 alone is rotated away (keep_last 2) by step 6, and a poll can
        # miss that window on a fast run, then wait until the run has finished
        while not any((run_dir / "checkpoints").glob("checkpoint-*/checkpoint.json")):
            assert all(n.poll() is None for n in nodes), [log.read_text()[-3000:] for log in logs]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        survivors = _children(nodes[1].pid)
        os.killpg(nodes[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        nodes[1].wait(timeout=120)  # its worker fails in the next collective; its agent then stops
        stopped_after = time.monotonic() - killed_at
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    print(f"\nnode 1 stopped {stopped_after:.2f} s after node 0 was killed")
    assert nodes[1].returncode != 0 and not any(_alive(w) for w in survivors)
    assert json.loads((run_dir / "run.json").read_text())["status"] != "finished"


def test_a_rendezvous_that_numbers_nodes_by_arrival_is_refused(project, tmp_path):
    # what launch.sh used to run: torchrun's c10d rendezvous, which ignores --node-rank. Node 1
    # arrives first and would become node 0 (global rank 0); every worker compares the node rank
    # it was given with the one its launcher asked for (SFTC_NODE_RANK) and refuses.
    bundle = project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                             distributed={"strategy": "ddp", "nodes": 2, "procs_per_node": 1})
    endpoint = f"127.0.0.1:{free_port()}"
    logs, nodes = [], []
    for node in (1, 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=arrival",
               "--max-restarts=0", "-m", "sftc.cli", "run", str(bundle), "--run-dir", str(tmp_path / "run")]
        logs.append(tmp_path / f"node{node}.log")
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=launch_env(SFTC_NODE_RANK=str(node)), stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(4)
    try:
        for proc in nodes:
            proc.wait(timeout=300)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = logs[0].read_text() + logs[1].read_text()
    assert all(proc.returncode != 0 for proc in nodes), text[-4000:]
    assert "node rank 1 was asked for (NODE_RANK / SLURM_NODEID / JOB_COMPLETION_INDEX) but the rendezvous made it " \
           "node 0 (global rank 0)" in text, text[-4000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
