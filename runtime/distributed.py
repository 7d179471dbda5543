"""Several processes, one run: the process group, the engine, and proof that it does what it says.

`sftc run` under torchrun (launch.sh) reads WORLD_SIZE / RANK / LOCAL_RANK from the environment.
Nothing here is assumed from configuration alone; each claim is checked on the live objects:

- the process group exists, has the world size the layout was derived for, and uses the backend
  the device needs (gloo on CPU, nccl on CUDA);
- under `fsdp` the parameters are really sharded: every parameter the trainer steps is a DTensor
  with a Shard placement, the local pieces add up (all_reduce) to the model's parameter count, and
  no rank holds much more than total / world. transformers' `fsdp` training arguments on CPU
  silently fall back to DDP (accelerate enables its FSDP plugin only on accelerators), so FSDP2's
  `fully_shard` is applied here, to each decoder layer and the root, before the trainer sees the
  model; the check runs again on the model the trainer actually steps;
- under `ddp` the model the trainer steps is a DistributedDataParallel.

A worker dies with its launcher: torchrun starts every worker in a session of its own, so killing
the agent (or its process group) used to leave the workers training on; `die_with_launcher` asks
the kernel to SIGKILL the worker when its parent goes (Linux's parent-death signal).

Checkpoints are always written *full* (docs/distributed.md): rank 0 gathers the model and the
optimizer state and writes them in the single-process layout (optimizer state keyed by parameter
index), so a checkpoint written at any world size and strategy resumes at any other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from sftc.errors import RunError

# launch.sh exports its own pid before it execs torchrun, so a worker knows which parent started it,
# and the node rank the scheduler asked for, so a worker can check the rendezvous honoured it
LAUNCHER_PID_ENV = "SFTC_LAUNCHER_PID"
NODE_RANK_ENV = "SFTC_NODE_RANK"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# test hook: apply no sharding under strategy fsdp, to prove the sharding check refuses such a run
SKIP_SHARDING_ENV = "SFTC_FAULT_SKIP_FSDP_SHARDING"
# a rank may hold a little more than total / world (uneven dim-0 splits)
SHARD_SLACK = 1.25


@dataclass
class Dist:
    """Where this process stands. `strategy` is the engine actually used (after the world-size rules)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"
    strategy_locked: str = "none"
    backend: str | None = None
    device: str = "cpu"
    options: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.active and self.strategy == "fsdp"

    def record(self) -> dict:
        return {
            "world_size": self.world_size, "strategy": self.strategy, "strategy_locked": self.strategy_locked,
            "backend": self.backend, "device": self.device, "options": self.options, "checks": self.checks,
        }


def env_ranks() -> tuple[int, int, int]:
    def num(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise RunError(f"{name}={value!r} is not an integer (set by torchrun / the scheduler)") from None

    return num("WORLD_SIZE", 1), num("RANK", 0), num("LOCAL_RANK", 0)


RANK_REFUSAL_GRACE_S = 3.0


def tell_launcher(message: str) -> bool:
    """Hand a refusal to the torchrun agent; True if this process should print it too.

    Under torchrun every rank fails with the same message and the agent then prints a
    ChildFailedError traceback whose root cause reads "To enable traceback see ...". torch elastic
    reads the worker's TORCHELASTIC_ERROR_FILE into that root cause, so the message is written
    there (the plain-string form ProcessFailure accepts) and ends the output; only rank 0 prints
    it as well, so it appears once above the traceback instead of once per rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return True
    import json
    import time

    with contextlib.suppress(OSError):  # the summary is a courtesy; the exit status already says it failed
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)
    if os.environ.get("RANK", "0") == "0":
        return True
    # The agent stops every worker at the first failure. Rank 0 does more before the checks every
    # rank shares (the raw data is checked on rank 0 only), so a rank that exited at once could end
    # the run before rank 0 printed the refusal (seen in the multinode test once bundles loaded
    # faster). Other ranks wait a moment; a failure of one rank alone only exits that much later.
    time.sleep(RANK_REFUSAL_GRACE_S)
    return False


def die_with_launcher() -> dict:
    """Make the kernel SIGKILL this worker when its parent, the torchrun agent, exits.

    torchrun's workers run in sessions of their own (Popen(start_new_session=True)), so neither a
    `kill -9` of the agent nor of its process group reaches them; torch elastic only stops workers
    from a live agent. SIGKILL rather than SIGTERM: a rank that outlives its peers waits in a
    collective, and checkpoints are staged and renamed (runtime/checkpoint.py), so a kill at any
    moment leaves the newest valid checkpoint to resume from. The parent may have died before
    prctl ran; then the worker was already re-parented, which the pid check catches.
    Linux only (prctl); elsewhere it records that nothing was armed."""
    if not sys.platform.startswith("linux"):
        return {"parent_death_signal": None}
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise RunError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    parent, launcher = os.getppid(), os.environ.get(LAUNCHER_PID_ENV, "")
    # without launch.sh (torchrun by hand) the launcher's pid is unknown; re-parenting to init is
    # the one sign left that it is gone
    gone = parent != int(launcher) if launcher.isdigit() else parent == 1
    if gone:
        raise RunError(
            f"this worker's launcher (pid {launcher or 'unknown'}) exited before training started (parent is now pid "
            f"{parent}); stopping instead of training alone. Relaunch the job: it resumes from the newest checkpoint"
        )
    return {"parent_death_signal": "SIGKILL"}


def check_strategy(spec, world_size: int) -> None:
    """Refusals that need no process group: run before the model is loaded."""
    from sftc.compiler.spec import ZERO_STRATEGIES, zero_refusal

    dist = spec.distributed
    strategy = dist.strategy
    if strategy in ZERO_STRATEGIES:
        # only a bundle compiled before the spec check refused ZeRO gets here
        raise RunError(f"this bundle was compiled by an older sftc; recompile it. {zero_refusal(strategy, dist.cpu_offload)}")
    if strategy == "fsdp" and world_size > 1 and spec.parameterization.kind != "full":
        raise RunError(
            f"distributed.strategy 'fsdp' with parameterization {spec.parameterization.kind!r}: sharding LoRA / QLoRA "
            "models is not supported by this runtime (adapters are small: use strategy 'ddp', which replicates them)"
        )
    if world_size > 1 and strategy == "fsdp":
        import torch

        cuda = torch.cuda.is_available()
        if dist.cpu_offload and not cuda:
            raise RunError(
                "distributed.cpu_offload: offloading moves sharded state from the GPU to CPU memory; this machine "
                "trains on the CPU already (no CUDA device). Set cpu_offload: false"
            )
        if dist.mixed_precision == "fp16" and not cuda:
            raise RunError("distributed.mixed_precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")


def setup(spec, layout: dict) -> Dist:
    """Join (or create) the process group and check it against the layout. World 1: no group."""
    world, rank, local_rank = env_ranks()
    if world != layout["world_size"]:
        raise RunError(f"WORLD_SIZE={world} but the layout was derived for world size {layout['world_size']}")
    check_strategy(spec, world)
    dspec = spec.distributed
    options = {"mixed_precision": dspec.mixed_precision, "cpu_offload": dspec.cpu_offload,
               "activation_checkpointing": dspec.activation_checkpointing}
    if world == 1:
        # one process: nothing to shard or replicate, whatever the bundle was compiled for
        return Dist(strategy="none", strategy_locked=dspec.strategy, options=options)

    # first, before any collective can hang on a peer whose launcher is gone
    parent_death = die_with_launcher()

    import torch
    import torch.distributed as tdist

    cuda = torch.cuda.is_available()
    expected_backend = "nccl" if cuda else "gloo"
    device = "cpu"
    if cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise RunError(
                f"{local_world} process(es) on this node but only {torch.cuda.device_count()} CUDA device(s) visible; "
                "set --nproc-per-node (distributed.procs_per_node) to the device count"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=expected_backend, device_id=torch.device(device) if cuda else None)
    got_world, got_rank, backend = tdist.get_world_size(), tdist.get_rank(), str(tdist.get_backend())
    problems = []
    if got_world != world:
        problems.append(f"process group has {got_world} ranks, WORLD_SIZE says {world}")
    if got_rank != rank:
        problems.append(f"process group rank {got_rank}, RANK says {rank}")
    if expected_backend not in backend.split(":") and expected_backend not in backend:
        problems.append(f"process group backend {backend!r}, this device needs {expected_backend!r}")
    # every rank must agree on what it is running: same bundle layout, same strategy
    mine = (layout["world_size"], layout["per_device"], layout["grad_accum"], dspec.strategy)
    where = placement(got_rank, local_rank)
    everyone = [None] * got_world
    tdist.all_gather_object(everyone, (mine, where))
    if any(o[0] != mine for o in everyone):
        problems.append(f"ranks disagree on (world, per_device, grad_accum, strategy): {[o[0] for o in everyone]}")
    ranks = [o[1] for o in everyone]
    problems += [
        f"node rank {w['node_rank_asked']} was asked for (NODE_RANK / SLURM_NODEID / JOB_COMPLETION_INDEX) but the "
        f"rendezvous made it node {w['node_rank']} (global rank {w['rank']}); torchrun's c10d rendezvous assigns node "
        "ranks in arrival order: launch with the bundle's launch.sh (static rendezvous)"
        for w in ranks if w["node_rank_asked"] is not None and w["node_rank_asked"] != w["node_rank"]
    ]
    if problems:
        raise RunError(f"rank {rank}: the process group is not the one this run needs", problems)
    strategy = "fsdp" if dspec.strategy == "fsdp" else "ddp"  # 'none' launched with several processes is DDP
    checks = {"world_size": got_world, "backend": backend, "ranks_agree": True, "ranks": ranks, **parent_death}
    return Dist(world_size=world, rank=rank, local_rank=local_rank, strategy=strategy, strategy_locked=dspec.strategy,
                backend=backend, device=device, options=options, checks=checks)


def placement(rank: int, local_rank: int) -> dict:
    """Where this worker sits, as torchrun's environment says (GROUP_RANK is the node rank the
    rendezvous assigned) and as the launcher asked (SFTC_NODE_RANK, exported by launch.sh)."""
    asked = os.environ.get(NODE_RANK_ENV, "")
    group = os.environ.get("GROUP_RANK", "")
    return {"rank": rank, "local_rank": local_rank, "node_rank": int(group) if group.isdigit() else None,
            "node_rank_asked": int(asked) if asked.isdigit() else None}


# --- collectives that are no-ops in one process ----------------------------------------------


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as tdist

        tdist.barrier()


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.active:
        return obj
    import torch.distributed as tdist

    box = [obj if d.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(d: Dist, values: list[int]) -> list[int]:
    if not d.active:
        return list(values)
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.long, device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    if not d.active:
        return [obj]
    import torch.distributed as tdist

    out = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out


def first_error(d: Dist, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (so no rank waits forever in the next collective)."""
    errors = gather_objects(d, None if error is None else f"rank {d.rank}: {error}")
    failed = [e for e in errors if e]
    if error is not None:
        raise error
    if failed:
        raise RunError("another rank failed: " + "; ".join(failed))


def shutdown(d: Dist, clean: bool = True) -> None:
    """Leave the process group; after a clean run wait for every rank first (rank 0 may still be
    exporting). After an error no barrier: the other ranks may never arrive (torchrun stops them)."""
    if d.active:
        import torch.distributed as tdist

        if tdist.is_initialized():
            if clean:
                with contextlib.suppress(Exception):
                    tdist.barrier()
            with contextlib.suppress(Exception):
                tdist.destroy_process_group()


# --- FSDP2 -------------------------------------------------------------------------------------


def decoder_layers(model) -> list:
    """The repeated blocks to shard one by one: modules of the classes the model names in
    `_no_split_modules` (every HF decoder does), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for module in model.modules():
        if type(module).__name__ in names and not any(module is f or _contains(f, module) for f in found):
            found.append(module)
    return found


def _contains(parent, child) -> bool:
    return any(m is child for m in parent.modules())


def shard_fsdp(model, d: Dist):
    """FSDP2 `fully_shard` on each decoder layer, then the root. Returns the (same) model."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if os.environ.get(SKIP_SHARDING_ENV):
        return model
    if d.options.get("activation_checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    device_type = "cuda" if d.device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        model.to(d.device)
    mesh = init_device_mesh(device_type, (d.world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    precision = d.options.get("mixed_precision", "no")
    if precision != "no":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else torch.float16, reduce_dtype=torch.float32
        )
    if d.options.get("cpu_offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    _add_no_sync(model)
    d.checks["fsdp_units"] = len(layers) + 1
    return model


def _add_no_sync(model) -> None:
    """accelerate's `no_sync(model)` looks for `model.no_sync`; FSDP2 spells it
    set_requires_gradient_sync. With it, the micro-batches of an update accumulate unsharded
    gradients locally and reduce-scatter once, at the last one."""

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    model.no_sync = no_sync


def sharding_facts(model, d: Dist) -> dict:
    """Per-rank counts of the trainable parameters: sharded (DTensor with a Shard placement) or not."""
    from torch.distributed.tensor import DTensor, Shard

    total = local = 0
    unsharded = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements):
            total += p.numel()
            local += p.to_local().numel()
        else:
            total += p.numel()
            local += p.numel()
            unsharded.append(name)
    return {"total": total, "local": local, "unsharded": unsharded}


def verify_sharding(model, d: Dist, where: str) -> dict:
    """Refuse unless the parameters the trainer steps are sharded across the world. Collective."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    facts = sharding_facts(model, d)
    wrapped_in_ddp = isinstance(model, DistributedDataParallel)
    per_rank = gather_objects(d, (facts["local"], facts["total"], len(facts["unsharded"]), wrapped_in_ddp))
    total = facts["total"]
    local_sum = sum(p[0] for p in per_rank)
    bound = SHARD_SLACK * total / d.world_size
    problems = []
    if wrapped_in_ddp:
        problems.append("the model the trainer steps is a DistributedDataParallel (replicated), not an FSDP2 module")
    if facts["unsharded"]:
        shown = facts["unsharded"][:5] + (["..."] if len(facts["unsharded"]) > 5 else [])
        problems.append(f"rank {d.rank}: {len(facts['unsharded'])} trainable parameter(s) are not sharded: {shown}")
    if local_sum != total:
        problems.append(f"the ranks' local parameters add up to {local_sum:,}, the model has {total:,}")
    heavy = [(r, p[0]) for r, p in enumerate(per_rank) if p[0] > bound]
    if heavy:
        problems.append(
            f"rank(s) hold more than {SHARD_SLACK} x total / world = {bound:,.0f} parameters: "
            + ", ".join(f"rank {r}: {n:,}" for r, n in heavy)
        )
    if problems:
        raise RunError(
            f"distributed.strategy 'fsdp' but the parameters are not sharded ({where}): each of {d.world_size} ranks "
            f"should hold about {total / d.world_size:,.0f} of {total:,} parameters, they hold "
            f"{[p[0] for p in per_rank]}; refusing to train replicated under a sharded strategy",
            problems,
        )
    tdist.barrier()
    record = {"where": where, "total_parameters": total, "local_parameters": [p[0] for p in per_rank],
              "expected_per_rank": round(total / d.world_size, 1), "max_over_expected": round(
                  max(p[0] for p in per_rank) / (total / d.world_size), 4)}
    d.checks.setdefault("sharding", []).append(record)
    return record


def _local_and_global(tensor) -> tuple[int, int]:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local().numel(), tensor.numel()
    return tensor.numel(), tensor.numel()


def verify_state_shares(model, optimizer, d: Dist) -> dict:
    """Under fsdp, after an optimizer step (gradients still held, Adam state created): each rank's
    share of the gradients and of the optimizer state, measured like the parameters' in
    verify_sharding. A gradient or state tensor that is whole on a rank (replicated) is refused.
    Collective."""
    import torch

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    grads = [0, 0]
    state = [0, 0]
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            local, total = _local_and_global(p.grad)
            grads[0], grads[1] = grads[0] + local, grads[1] + total
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # skip the scalar step counter
                local, total = _local_and_global(value)
                state[0], state[1] = state[0] + local, state[1] + total
    per_rank = gather_objects(d, (grads[0], state[0]))
    record = {}
    problems = []
    for i, (name, total) in enumerate((("gradients", grads[1]), ("optimizer_state", state[1]))):
        locals_ = [r[i] for r in per_rank]
        record[name] = {"total": total, "local": locals_}
        if total == 0:
            problems.append(f"no {name} to measure after the optimizer step")
        elif sum(locals_) != total or max(locals_) > SHARD_SLACK * total / d.world_size:
            problems.append(f"{name}: the ranks hold {locals_} of {total:,} elements; sharded, each would hold "
                            f"about {total / d.world_size:,.0f}")
    if problems:
        raise RunError("distributed.strategy 'fsdp' but the training state is not sharded", problems)
    d.checks["state_shares"] = record
    return record


def verify_replicated(model, d: Dist) -> dict:
    """Under ddp the model the trainer steps must be a DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    ok = isinstance(model, DistributedDataParallel)
    everyone = gather_objects(d, ok)
    if not all(everyone):
        raise RunError(
            f"distributed.strategy {d.strategy_locked!r} at world size {d.world_size}: the trainer's model is "
            f"{type(model).__name__} on rank(s) {[r for r, v in enumerate(everyone) if not v]}, not DDP; gradients "
            "would not be averaged across ranks"
        )
    d.checks["ddp_wrapped"] = True
    return {"ddp": True}


# --- full checkpoints from a sharded model ---------------------------------------------------


def full_model_state(model) -> dict:
    """Every parameter and buffer, full size, on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) once, under the name a single process saves it
    kept = {n for n, _ in model.named_parameters()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in state.items() if k not in tied}


def _param_order(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise RunError("the optimizer steps a parameter the model does not name; cannot checkpoint it") from None


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state, full size, in the single-process layout (keyed by parameter index, the
    order of optimizer.param_groups) on rank 0; empty elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    order = _param_order(model, optimizer)
    index = {name: i for i, name in enumerate(order)}
    groups = []
    for group in osd["param_groups"]:
        groups.append({**group, "params": [index[n] for n in group["params"]]})
    return {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a single-process-layout optimizer state (any world size wrote it) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _param_order(model, optimizer)
    if len(state["param_groups"]) != len(optimizer.param_groups) or sum(
        len(g["params"]) for g in state["param_groups"]
    ) != len(order):
        raise RunError(
            f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])} parameters in "
            f"{len(state['param_groups'])} group(s); this model's has {len(order)} in {len(optimizer.param_groups)}"
        )
    osd = {
        "state": {order[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model, checkpoint_dir) -> None:
    """Load a checkpoint's full weights into an *unsharded* model (before fully_shard); missing keys
    are allowed only for weights tied to a loaded one."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    ck = Path(checkpoint_dir)
    index = ck / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (ck / name).is_file():
            raise RunError(f"{ck / name}: the checkpoint's weights are missing")
        state.update(load_file(str(ck / name)))
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded_ids)]
    if missing or result.unexpected_keys:
        raise RunError(
            f"{ck}: weights do not fit the model", [f"missing: {missing[:8]}", f"unexpected: {result.unexpected_keys[:8]}"]
        )
