"""The cluster recipes of docs/distributed.md, run as far as one host allows.

The SLURM batch script and the Kubernetes indexed Job are read from the doc itself (so the doc
cannot drift from what was run), and executed once per "node" on loopback, with the variables
the scheduler would set given by hand and stand-ins for `srun` / `scontrol`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import yaml

from .conftest import REPO
from .test_multinode import finish, free_port, launch_env

DOC = REPO / "docs" / "distributed.md"


def doc_block(section: str, language: str) -> str:
    """The first ```language block after the heading `section`."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(section)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"{DOC}: no {language} block after {section!r}"
    return match.group(1)


def two_node_bundle(project):
    return project.compile(batch={"per_device": 2, "grad_accum": 1, "world_size": 2},
                           distributed={"strategy": "ddp", "nodes": 2, "procs_per_node": 1},
                           schedule={"max_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1})


def stand_in(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return path


def assert_two_nodes_trained(run_dir):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["distributed"]["checks"]["ranks"] == [
        {"rank": 0, "local_rank": 0, "node_rank": 0, "node_rank_asked": 0},
        {"rank": 1, "local_rank": 0, "node_rank": 1, "node_rank_asked": 1},
    ]


def test_slurm_recipe_on_two_loopback_nodes(project, tmp_path):
    bundle = two_node_bundle(project)
    script = doc_block("### SLURM", "bash").replace("<id>", bundle.name)
    port = free_port()
    assert "export MASTER_PORT=29500" in script
    script = script.replace("export MASTER_PORT=29500", f"export MASTER_PORT={port}")  # a free port on this shared host
    (tmp_path / "train.sbatch").write_text(script)
    # the project's environment, where the script looks for it ($PWD/.venv/bin/python)
    stand_in(project.root / ".venv" / "bin" / "python", f'exec {sys.executable} "$@"')
    bin_dir = tmp_path / "slurm-bin"
    stand_in(bin_dir / "srun", 'exec "$@"')  # one task per node: run the command here
    stand_in(bin_dir / "scontrol", '[[ "$1 $2" == "show hostnames" ]] && printf "127.0.0.1\\nnode-b\\n"')
    logs, nodes = [], []
    for node in (1, 0):  # node 1's task first
        env = launch_env(PATH=f"{bin_dir}:{launch_env()['PATH']}", SLURM_JOB_NODELIST="node-a,node-b",
                         SLURM_NODEID=str(node), SLURM_NNODES="2")
        del env["SFTC_PYTHON"]  # the script sets it
        logs.append(tmp_path / f"slurm-node{node}.log")
        nodes.append(subprocess.Popen(["bash", str(tmp_path / "train.sbatch")], cwd=project.root, env=env,
                                      stdout=logs[-1].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(2)
    finish(nodes, logs, timeout=300)
    assert f"rendezvous 127.0.0.1:{port}" in logs[0].read_text()  # MASTER_ADDR from the node list
    assert_two_nodes_trained(project.root / "runs" / bundle.name)


def test_kubernetes_indexed_job_on_two_loopback_nodes(project, tmp_path):
    bundle = two_node_bundle(project)
    docs = list(yaml.safe_load_all(doc_block("### Kubernetes", "yaml").replace("<id>", bundle.name)))
    job = next(d for d in docs if d["kind"] == "Job")
    service = next(d for d in docs if d["kind"] == "Service")
    spec = job["spec"]
    # one pod per node, each told its index: the node rank
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MASTER_ADDR"] == f"{pod['subdomain']}-0.{pod['subdomain']}"  # pod index 0, via the headless Service
    # no cluster DNS here: the rendezvous host is this one
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # the image's environment: a python on PATH that imports sftc
    image_bin = tmp_path / "image-bin"
    stand_in(image_bin / "python3", f'exec {sys.executable} "$@"')
    logs, pods = [], []
    for index in (1, 0):
        pod_env = launch_env(**env, JOB_COMPLETION_INDEX=str(index), PATH=f"{image_bin}:/usr/bin:/bin")
        del pod_env["SFTC_PYTHON"]
        logs.append(tmp_path / f"pod{index}.log")
        pods.append(subprocess.Popen(container["command"], cwd=project.root, env=pod_env, stdout=logs[-1].open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(2)
    finish(pods, logs, timeout=300)
    assert_two_nodes_trained(project.root / "runs" / bundle.name)
