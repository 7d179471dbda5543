"""Two ranks x per_device b equal one rank x per_device b with grad_accum doubled (DDP and FSDP2),
checked on real torchrun runs on CPU (gloo). Also: the locked stream's per-rank slicing, and the
FSDP2 sharding check refusing a run whose parameters were not sharded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sftc.runtime.batching import plan_updates
from sftc.runtime.run import run_bundle

from .conftest import final_tensors, torchrun, train_losses

TOL = 1e-5
STEPS = 4


def _compile(project, strategy: str, grad_accum: int = 1, **extra):
    distributed = {"strategy": strategy, "procs_per_node": 2, **extra.pop("distributed", {})}
    return project.compile(
        batch={"per_device": 2, "grad_accum": grad_accum, "world_size": 2},
        distributed=distributed,
        schedule={"max_steps": STEPS}, checkpoint={"every_steps": 2, "keep_last": 3}, **extra,
    )


def max_diffs(reference, other, steps: int) -> tuple[list[float], float]:
    ref_l, got_l = train_losses(reference), train_losses(other)
    assert sorted(ref_l) == sorted(got_l) == list(range(1, steps + 1))
    loss_diffs = [abs(ref_l[s] - got_l[s]) for s in sorted(ref_l)]
    ref_w, got_w = final_tensors(reference, steps), final_tensors(other, steps)
    assert ref_w.keys() == got_w.keys()
    weight_diff = max(float((ref_w[k].double() - got_w[k].double()).abs().max()) for k in ref_w)
    return loss_diffs, weight_diff


def _report(name, loss_diffs, weight_diff):
    # shown with -s / in the CI log: the numbers docs/distributed.md quotes
    print(f"\n{name}: max |loss diff| per step {['%.2e' % d for d in loss_diffs]}, max |weight diff| {weight_diff:.2e}")


def test_per_rank_plan_is_the_documented_slice():
    # update u: rows order[u*E:(u+1)*E]; micro-step a of rank r: per_device rows from u*E + (a*W + r)*per_device
    per_device, grad_accum, world, steps = 2, 3, 2, 5
    e = per_device * grad_accum * world
    order = np.random.default_rng(0).permutation(200)[: steps * e]
    for r in range(world):
        plan = plan_updates([order], per_device, grad_accum, steps, world_size=world, rank=r)
        for u, update in enumerate(plan):
            for a, rows in enumerate(update["microbatches"]):
                start = u * e + (a * world + r) * per_device
                assert rows == order[start:start + per_device].tolist()
    # the ranks together cover every row of the stream exactly once
    together = sorted(x for r in range(world) for u in plan_updates([order], per_device, grad_accum, steps, world, r)
                      for mb in u["microbatches"] for x in mb)
    assert together == sorted(order.tolist())


LORA = {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.0}  # no dropout: its masks follow each rank's RNG


@pytest.mark.parametrize("strategy, parameterization", [("ddp", None), ("fsdp", None), ("ddp", LORA)],
                         ids=["ddp", "fsdp", "ddp-lora"])
def test_two_ranks_equal_one_rank_with_doubled_grad_accum(project, strategy, parameterization):
    # fsdp also with activation checkpointing (recomputation must not change a number) and with 2
    # micro-batches per update at world 2 (the first under no_sync: FSDP2 reduce-scatters once)
    extra = {"parameterization": parameterization} if parameterization else {}
    grad_accum = 2 if strategy == "fsdp" else 1
    bundle = _compile(project, strategy, grad_accum=grad_accum,
                      distributed={"activation_checkpointing": strategy == "fsdp"}, **extra)
    one = project.root / "runs" / "one"
    run_bundle(bundle, run_dir=one)  # WORLD_SIZE unset: grad_accum re-derived x 2
    record_one = json.loads((one / "run.json").read_text())
    assert record_one["layout"]["grad_accum"] == 2 * grad_accum and record_one["world_size"] == 1

    two = project.root / "runs" / "two"
    proc = torchrun(bundle, two, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((two / "run.json").read_text())
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["layout"]["grad_accum"] == grad_accum
    dist = record["distributed"]
    assert dist["strategy"] == strategy and dist["backend"] == "gloo" and dist["checks"]["world_size"] == 2
    # every micro-batch of both ranks was checked against the slice; the tokens add up across ranks
    assert record["consumption"]["checked_against_plan"]
    assert record["consumption"]["supervised_tokens_total"] == record["supervised_tokens_predicted"]
    assert record["supervised_tokens_predicted"] == record_one["supervised_tokens_predicted"]
    if strategy == "fsdp":
        assert dist["checks"]["activation_checkpointing"] is True
        for check in dist["checks"]["sharding"]:
            total, local = check["total_parameters"], check["local_parameters"]
            assert sum(local) == total and max(local) <= 1.01 * total / 2, check
        assert [c["where"] for c in dist["checks"]["sharding"]] == ["after fully_shard", "model the trainer steps"]
    else:
        assert dist["checks"]["ddp_wrapped"] is True
    ck = two / "checkpoints" / f"checkpoint-{STEPS}"
    manifest = json.loads((ck / "checkpoint.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "strategy": strategy, "state": "full",
                                       "rng_files": ["rng_state_0.pth", "rng_state_1.pth"]}
    assert not list(two.glob("checkpoints/.checkpoint-*"))  # no staging left by any rank

    loss_diffs, weight_diff = max_diffs(one, two, STEPS)
    _report(f"{strategy}{'-lora' if parameterization else ''} 2x1 vs 1x2", loss_diffs, weight_diff)
    assert max(loss_diffs) <= TOL and weight_diff <= TOL
    # the per-update token counts of the metrics are the global ones
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    tok = lambda ls: [(x["step"], x["supervised_tokens"]) for x in ls if x["kind"] == "train"]  # noqa: E731
    assert tok(lines) == tok(ref)


def test_fsdp_refuses_when_the_parameters_are_not_sharded(project):
    bundle = _compile(project, "fsdp")
    run_dir = project.root / "runs" / "unsharded"
    proc = torchrun(bundle, run_dir, nproc=2, env={"SFTC_FAULT_SKIP_FSDP_SHARDING": "1"})
    assert proc.returncode != 0
    err = proc.stderr
    assert "distributed.strategy 'fsdp' but the parameters are not sharded" in err, err[-4000:]
    # the numbers: each rank should hold about half, both hold everything
    assert "should hold about 57,504 of 115,008 parameters, they hold [115008, 115008]" in err, err[-4000:]
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
