"""The compile's per-row passes on a Ray cluster (compiler/workers.RayCluster, issue 17): on a local
cluster of two nodes, every row goes out to Ray and the bundle is byte for byte the one a local
compile gives, with rejects, eval prompts and continued pretraining; a task's error is the serial
pass's; `sftc compile --executor ray --ray-address` runs the same."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import sftc.compiler.workers as workers_mod
from sftc.cli import main
from sftc.compiler import compile_spec
from sftc.compiler.data import Example
from sftc.errors import DataError

from .conftest import TINY_CORPUS, base_spec
from .test_workers import _files, _rows, continued_pretraining_spec

ray = pytest.importorskip("ray", reason="Ray is an optional dependency: pip install 'sftc[ray]'")


def _rows_with_near_copies() -> list[dict]:
    """_rows(), and pairs of rows in two groups whose prompts differ by one word: the split merges them."""
    import random

    words = sorted(set(" ".join(TINY_CORPUS).lower().replace(".", " ").replace(",", " ").split()))
    rows = _rows()
    for i in range(10):
        prompt = random.Random(i).sample(words, 24)
        copy = [*prompt[:12], "changed", *prompt[13:]]
        rows.append({"thread_id": f"P{i}", "prompt": " ".join(prompt), "completion": "Rotate the key."})
        rows.append({"thread_id": f"N{i}", "prompt": " ".join(copy), "completion": "Rotate the key now."})
    return rows


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two nodes of one CPU each, on this machine (ray.cluster_utils: how Ray tests
    a multi-node cluster on one host); the compile connects to it by address, as to a real one."""
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    local.add_node(num_cpus=1)
    local.wait_for_nodes()
    yield local
    ray.shutdown()
    local.shutdown()


@pytest.fixture
def on_ray(cluster, monkeypatch):
    """The RayCluster to compile with, and how many rows were sent to it."""
    sent = []
    detached = Example.detached
    monkeypatch.setattr(Example, "detached", lambda self: sent.append(self.ref) or detached(self))
    monkeypatch.setattr(workers_mod, "ROWS_PER_REMOTE_RANGE", 7)  # several ranges in flight on both nodes
    executor = workers_mod.RayCluster(cluster.address)
    assert executor.workers == 2 and len(ray.nodes()) == 2
    yield executor, sent
    executor.close()


def test_the_bundle_on_ray_is_the_local_bundle(project, on_ray):
    executor, sent = on_ray
    rows = _rows_with_near_copies()
    project.write_jsonl("data/rows.jsonl", rows)
    spec = project.write_spec(base_spec(
        split={"eval_fraction": 0.3, "near_duplicates": 0.6}, tokenize={"max_length": 192},
        packing={"strategy": "bfd", "seq_length": 256}, eval={"max_new_tokens": 8}))
    local, lock, _ = compile_spec(spec, bundles_dir=project.root / "local", force=True, workers=1)
    assert lock.data_manifest.rejected.keys() >= {"control_token_in_text", "answer_truncated", "empty_completion"}
    assert lock.eval_manifest.prompts > 0
    assert len(lock.split.merged_near_duplicates) >= 8  # the near-duplicate search found the copies
    on_cluster, _, _ = compile_spec(spec, bundles_dir=project.root / "ray", force=True, workers=executor)
    assert on_cluster.name == local.name and _files(on_cluster) == _files(local)
    # every accepted row was tokenized on the cluster (train and eval), none in this process
    accepted = sum(1 for row in rows if row["completion"])
    assert len(sent) == accepted and len(set(sent)) == accepted


def test_continued_pretraining_on_ray(project, on_ray):
    executor, _ = on_ray
    spec = continued_pretraining_spec(project, "wrapped")
    local, lock, _ = compile_spec(spec, bundles_dir=project.root / "local", force=True, workers=1)
    assert lock.data_manifest.rejected == {"control_token_in_text": 1}
    on_cluster, _, _ = compile_spec(spec, bundles_dir=project.root / "ray", force=True, workers=executor)
    assert _files(on_cluster) == _files(local)


def test_an_error_in_a_ray_task_is_the_serial_passes_error(project, on_ray):
    executor, _ = on_ray
    project.write_jsonl("data/rows.jsonl", _rows())
    spec = project.write_spec(base_spec(tokenize={"max_length": 192, "on_truncated_answer": "error"}))
    messages = []
    for name, workers in (("local", 1), ("ray", executor)):
        with pytest.raises(DataError) as caught:
            compile_spec(spec, bundles_dir=project.root / name, force=True, workers=workers)
        messages.append(str(caught.value))
        assert not list((project.root / name).iterdir()), "nothing left behind"
    assert messages[0] == messages[1] and "answer truncated" in messages[0]


@pytest.mark.parametrize("address_from", ["option", "RAY_ADDRESS"])
def test_sftc_compile_executor_ray(project, cluster, monkeypatch, address_from):
    ray.shutdown()  # as a fresh `sftc compile` process: it connects itself, and disconnects at the end
    project.write_jsonl("data/rows.jsonl", _rows(40))
    spec = project.write_spec(base_spec(split={"eval_fraction": 0.3}))
    runner = CliRunner()
    local = runner.invoke(main, ["compile", str(spec), "--bundles-dir", str(project.root / "local"), "--quiet"])
    assert local.exit_code == 0, local.output
    if address_from == "option":
        where = ["--ray-address", cluster.address]
    else:
        where = []
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    on_cluster = runner.invoke(main, ["compile", str(spec), "--bundles-dir", str(project.root / "ray"), "--quiet",
                                      "--executor", "ray", *where])
    assert on_cluster.exit_code == 0, on_cluster.output
    assert not ray.is_initialized()  # it disconnected; the cluster runs on
    local_bundle, ray_bundle = (project.root / local.output.strip(), project.root / on_cluster.output.strip())
    assert ray_bundle.name == local_bundle.name and _files(ray_bundle) == _files(local_bundle)
    mixed = runner.invoke(main, ["compile", str(spec), "--executor", "ray", "--workers", "2"])
    assert mixed.exit_code == 2 and "--workers counts local processes" in mixed.output
